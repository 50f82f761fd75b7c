"""One config convention for every command: ``python -m align.X configs/X.yaml [--key value ...]``.

Keys are the field names of the dataclasses a command takes: TRL/transformers configs (``SFTConfig``,
``DPOConfig``, ``ModelConfig``, ...) and the command's own ``XArguments``. The YAML file gives values,
command-line ``--key value`` pairs override them (values are read as YAML, so ``--lora_target_modules
'[q_proj, v_proj]'`` and ``--learning_rate 1e-4`` work). An unknown key or a wrong type stops the command
before any work, naming the file, the line and the key. ``--help`` lists every key with its type, default and
help text.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false, so ``save_strategy: no`` stays the text 'no'."""


_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or command-line override that cannot be used; the message names where and why."""


@dataclasses.dataclass
class _Value:
    value: Any
    where: str  # "configs/sft.yaml:12" or "command line"


def _load_yaml(path: Path) -> dict[str, _Value]:
    """Read a flat YAML mapping, remembering the line of every key."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return {k: _Value(v, f"{path}:{lines.get(k, '?')}") for k, v in data.items()}


def _parse_overrides(argv: Sequence[str]) -> dict[str, _Value]:
    """``--key value``, ``--key=value`` and a bare ``--flag`` (true)."""
    out: dict[str, _Value] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key.replace("-", "_")] = _Value(value, "command line")
        i += 1
    return out


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; returns (ok, value coerced where harmless)."""
    if tp is Any or tp is None or isinstance(tp, (str, typing.TypeVar)):
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return type(None) in args, value
        for arg in sorted(args, key=lambda a: a is str):  # try str last so "1e-4" becomes a float
            ok, coerced = _type_ok(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple, Sequence, typing.Sequence):
        if isinstance(value, str):  # TRL accepts e.g. lora_target_modules: all-linear, loss_type: sigmoid
            return True, value
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        item = args[0] if args else Any
        checked = [_type_ok(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:  # a YAML scalar read as a bool or number ("false", 2024) is meant as text here
        if isinstance(value, bool):
            return True, str(value).lower()
        return isinstance(value, (str, int, float)), value if isinstance(value, str) else str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return True, tp(value)
        except ValueError:
            return False, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# transformers 5 renamed these TrainingArguments fields; the old names stay usable and are one key with the new
# (the command line overrides a file's value under either name; given both, the new name would win silently).
_ALIASES = {"gradient_checkpointing": "activation_checkpointing",
            "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def parse(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
          overrides: dict[str, Any] | None = None) -> tuple:
    """Parse ``[config.yaml] [--key value ...]`` into one instance of each dataclass type; ``overrides`` (typed
    values, checked alike) win over both.

    A key may belong to several dataclasses (``seed``, ``output_dir``): each gets the value.
    """
    hints: dict[str, Any] = {}
    for cls in dataclass_types:
        try:
            cls_hints = typing.get_type_hints(cls)
        except Exception:  # unresolvable forward references: skip type checks for that class
            cls_hints = {}
        for f in dataclasses.fields(cls):
            if f.init:
                hints.setdefault(f.name, cls_hints.get(f.name, Any))

    def canonical(d: dict[str, _Value]) -> dict[str, _Value]:
        return {(_ALIASES[k] if k in _ALIASES and _ALIASES[k] in hints else k): v for k, v in d.items()}

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(dataclass_types))
        raise SystemExit(0)
    values: dict[str, _Value] = {}
    source = "command line"
    if argv and not argv[0].startswith("--"):
        source = argv[0]
        values.update(canonical(_load_yaml(Path(argv.pop(0)))))
    values.update(canonical(_parse_overrides(argv)))
    values.update(canonical({k: _Value(v, "overrides") for k, v in (overrides or {}).items()}))

    kwargs: dict[str, Any] = {}
    for key, v in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{v.where}: unknown key '{key}'{hint}")
        ok, coerced = _type_ok(v.value, hints[key])
        if not ok:
            raise ConfigError(
                f"{v.where}: key '{key}' expects {_describe(hints[key])}, got {v.value!r} ({type(v.value).__name__})"
            )
        kwargs[key] = coerced

    if "bf16" in hints and "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = _bf16_supported()  # TRL defaults bf16 to True, which stops a CPU run

    out = []
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            out.append(cls(**{k: v for k, v in kwargs.items() if k in names}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: invalid {cls.__name__}: {e}") from e
    return tuple(out)


def configure(dataclass_types: Sequence[type], path: str | Path, **overrides: Any) -> tuple:
    """A command's configs from its YAML file with typed ``overrides``: how the quickstart and the loop call a
    stage (``sft.train(*configure(sft.CONFIG_TYPES, "configs/sft.yaml", output_dir=...))``). The same parser
    checks them, so a wrong key fails naming it. (Not ``dataclasses.replace``: TRL's configs derive fields
    in ``__post_init__``, e.g. GRPO's generation batch, which a replace would then find set twice.)"""
    return parse(dataclass_types, [str(path)], overrides)


def help_text(dataclass_types: Sequence[type]) -> str:
    """Every key of a command, by dataclass: ``--name TYPE (default: X)`` and its help metadata."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else "python -m align.<command>"
    out = [f"usage: {prog} [config.yaml] [--key value ...]",
           "Keys come from the YAML file and the command line (which wins); values are read as YAML."]
    for cls in dataclass_types:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - as in parse: no types for that class
            hints = {}
        module = spec.name if spec and cls.__module__ == "__main__" else cls.__module__
        out.append(f"\n{cls.__name__} ({module}):")
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = "required" if default is dataclasses.MISSING else f"default: {default!r}"
            out.append(f"  --{f.name} {_describe(hints.get(f.name, Any))} ({default})")
            if f.metadata.get("help"):
                out.append(textwrap.fill(" ".join(str(f.metadata["help"]).split()), 110, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6))
    return "\n".join(out)


def run_command(main: Callable[[], Any]) -> None:
    """A command's ``__main__``: bad input (a config, a data file, a missing path) ends with its message on stderr
    and exit status 2 instead of a traceback; any other error keeps its traceback."""
    from align.data.formats import DataError

    try:
        main()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def to_dict(config: Any) -> dict[str, Any]:
    """A YAML-safe dict of a dataclass (TrainingArguments' own ``to_dict`` hides tokens and enums)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return {k: _plain(v) for k, v in d.items() if not k.startswith("_")}


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
