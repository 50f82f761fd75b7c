"""One config convention for every command: ``python -m align.X [VERB] [configs/X.yaml | ARG ...] [--key value ...]``.

Keys are the field names (snake_case) of the dataclasses a command takes: TRL/transformers configs
(``SFTConfig``, ``DPOConfig``, ``ModelConfig``, ...) and the command's own ``XArguments``. The YAML file gives
values, command-line ``--key value`` pairs override them, in any position (values are read as YAML, so
``--lora_target_modules '[q_proj, v_proj]'`` and ``--learning_rate 1e-4`` work; a text key takes its word
verbatim). An unknown key or a wrong type stops the command before any work, naming the file, the line and the
key. ``--help`` lists every key with its type, default and help text.

Commands with verbs (``python -m align.store import FILE --db URL``) have one dataclass per verb
(``parse_verb``); fields with ``metadata={"positional": True}`` are its bare words. Old spellings keep working
with a deprecation warning naming the new one: a renamed field's ``metadata={"aliases": ["old_name"]}``, and
kebab-case on the command line (``--max-new-tokens`` for ``--max_new_tokens``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence, TypeVar

import yaml

T = TypeVar("T")
logger = logging.getLogger("align.config")


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
    name: str = ""  # the key as written (an old name, a kebab-case spelling)


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
    return {k: _Value(v, f"{path}:{lines.get(k, '?')}", str(k)) for k, v in data.items()}


class _Keys:
    """The keys of a command (the init fields of its dataclasses) with their types, and the old names that still
    work: a field's ``metadata={"aliases": [...]}``, transformers' renames (``_ALIASES``) and, on the command line,
    kebab-case (``--max-new-tokens``). An old name logs a deprecation warning naming the new one."""

    def __init__(self, dataclass_types: Sequence[type], warn: bool = True):
        self.types: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        self.warn = warn
        for cls in dataclass_types:
            try:
                hints = typing.get_type_hints(cls)
            except Exception:  # unresolvable forward references: skip type checks for that class
                hints = {}
            for f in dataclasses.fields(cls):
                if f.init:
                    self.types.setdefault(f.name, hints.get(f.name, Any))
                    self.aliases.update({old: f.name for old in f.metadata.get("aliases", ())})
        self.aliases.update({old: new for old, new in _ALIASES.items() if new in self.types})

    def canonical(self, name: str, where: str) -> str:
        """The key that ``name`` (as written in a file or after ``--``) stands for; unknown names stay as written."""
        key = name.replace("-", "_") if where == "command line" else name
        key = self.aliases.get(key, key)
        if key not in self.types:
            return name
        if key != name and self.warn:
            dash = "--" if where == "command line" else ""
            logger.warning("%s: '%s%s' is deprecated, use '%s%s'", where, dash, name, dash, key)
        return key


def _collect(pairs: Iterable[tuple[str, _Value]]) -> dict[str, _Value]:
    """One source's values (a file, the command line) by key: the same key under two names (an old and the new)
    is an error; the same name twice on the command line: the last wins."""
    out: dict[str, _Value] = {}
    for key, v in pairs:
        if key in out and out[key].name != v.name:
            raise ConfigError(f"{v.where}: '{out[key].name}' and '{v.name}' are the same key '{key}' (one is its old "
                              "name); give it once")
        out[key] = v
    return out


def _args_of(tp: Any) -> set:
    return set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}


def _is_list(tp: Any) -> bool:
    return any(typing.get_origin(a) in (list, tuple, Sequence, typing.Sequence) for a in _args_of(tp))


def _read(word: str, tp: Any) -> Any:
    """A command-line word as YAML (``1e-4``, ``[a, b]``, ``true``), but verbatim for a text key: a prompt such as
    'Q: 3 + 4?' or a password '007' is text, not YAML."""
    args = _args_of(tp)
    if str in args and args <= {str, type(None)}:
        return None if word == "null" and type(None) in args else word
    try:
        return _yaml(word) if word != "" else ""
    except yaml.YAMLError:
        return word


def _split_command_line(argv: Sequence[str], keys: _Keys) -> tuple[list[str], list[tuple[str, _Value]]]:
    """Bare words (a config file, a verb, positional arguments) and ``--key value`` pairs, in any order.

    ``--key=value`` always; otherwise a bool key takes the next word only if it is true/false (a bare ``--flag`` is
    true), a list key takes every word up to the next ``--key`` (``--model A B``), any other key one word."""
    words: list[str] = []
    pairs: list[tuple[str, _Value]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            words.append(arg)
            continue
        name, eq, raw = arg[2:].partition("=")
        if not name:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = keys.canonical(name, "command line")
        tp = keys.types.get(key)
        taken = [raw] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--") and (not taken or _is_list(tp)):
            taken.append(argv[i])
            i += 1
        if not eq and bool in _args_of(tp) and taken and not isinstance(_read(taken[0], Any), bool):
            i, taken = i - 1, []  # a bare --flag before a positional word
        if not taken:
            value = [] if _is_list(tp) else True
        elif len(taken) == 1:
            value = _read(taken[0], tp)
            if _is_list(tp) and isinstance(value, (int, float)):  # --writers 10: a list of one
                value = [value]
        else:
            value = [_read(w, Any) for w in taken]
        pairs.append((key, _Value(value, "command line", name)))
    return words, pairs


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
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if isinstance(value, str):  # one text item, kept as is: TRL takes lora_target_modules: all-linear
            return _type_ok(value, item)[0], value
        if not isinstance(value, (list, tuple)):
            return False, value
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
    if typing.get_args(tp):  # list[str], Literal['a', 'b'], int | None
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# transformers 5 renamed these TrainingArguments fields; the old names stay usable and are one key with the new
# (the command line overrides a file's value under either name; both names in one file is an error).
_ALIASES = {"gradient_checkpointing": "activation_checkpointing",
            "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def parse(dataclass_types: Sequence[type], argv: Sequence[str] | None = None,
          overrides: dict[str, Any] | None = None, *, prog: str | None = None) -> tuple:
    """Parse ``[config.yaml] [--key value ...]`` (in any order) into one instance of each dataclass type;
    ``overrides`` (typed values, checked alike) win over both. ``prog``: the command's name in ``--help``.

    A key may belong to several dataclasses (``seed``, ``output_dir``): each gets the value.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(dataclass_types, prog))
        raise SystemExit(0)
    keys = _Keys(dataclass_types)
    words, pairs = _split_command_line(argv, keys)
    if len(words) > 1:
        raise ConfigError(f"command line: expected one config file and --key value pairs, got {words[1]!r} too")
    values: dict[str, _Value] = {}
    source = words[0] if words else "command line"
    if words:
        values.update(_collect((keys.canonical(k, v.where), v) for k, v in _load_yaml(Path(words[0])).items()))
    values.update(_collect(pairs))
    values.update({keys.canonical(k, "overrides"): _Value(v, "overrides", k) for k, v in (overrides or {}).items()})
    return _build(dataclass_types, keys, values, source)


def peek(dataclass_types: Sequence[type], argv: Sequence[str], key: str) -> Any:
    """The value of one key before the full parse (the command line's, else the config file's; None if neither
    gives it, or the file cannot be read: ``parse`` then says why). For a key that picks the dataclasses, as
    ``align.dpo``'s ``trainer``; ``dataclass_types`` tell the bare ``--flag`` words from the config file."""
    keys = _Keys(dataclass_types, warn=False)
    words, pairs = _split_command_line(list(argv), keys)
    given = {k: v.value for k, v in pairs}
    if key in given:
        return given[key]
    try:
        values = _load_yaml(Path(words[0])) if words else {}
    except ConfigError:
        return None
    return next((v.value for k, v in values.items() if keys.canonical(k, v.where) == key), None)


def configure(dataclass_types: Sequence[type], path: str | Path, **overrides: Any) -> tuple:
    """A command's configs from its YAML file with typed ``overrides``: how the quickstart and the loop call a
    stage (``sft.train(*configure(sft.CONFIG_TYPES, "configs/sft.yaml", output_dir=...))``). The same parser
    checks them, so a wrong key fails naming it. (Not ``dataclasses.replace``: TRL's configs derive fields
    in ``__post_init__``, e.g. GRPO's generation batch, which a replace would then find set twice.)"""
    return parse(dataclass_types, [str(path)], overrides)


def _build(dataclass_types: Sequence[type], keys: _Keys, values: dict[str, _Value], source: str) -> tuple:
    """Type-check the values and make one instance of each dataclass (its ``__post_init__`` validates it)."""
    kwargs: dict[str, Any] = {}
    for key, v in values.items():
        if key not in keys.types:
            close = difflib.get_close_matches(key, list(keys.types), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{v.where}: unknown key '{key}'{hint}")
        ok, coerced = _type_ok(v.value, keys.types[key])
        if not ok:
            raise ConfigError(f"{v.where}: key '{key}' expects {_describe(keys.types[key])}, got {v.value!r} "
                              f"({type(v.value).__name__})")
        kwargs[key] = coerced

    if "bf16" in keys.types and "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = _bf16_supported()  # TRL defaults bf16 to True, which stops a CPU run

    out = []
    for cls in dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        missing = [f"--{f.name}" for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{source}: {cls.__name__} needs {', '.join(missing)}")
        try:
            out.append(cls(**{k: v for k, v in kwargs.items() if k in names}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: invalid {cls.__name__}: {e}") from e
    return tuple(out)


def parse_verb(verbs: dict[str, type], argv: Sequence[str] | None = None, *, prog: str, about: str = "",
               default: str | None = None) -> tuple[str, Any]:
    """Parse ``VERB [POSITIONAL ...] [--key value ...]``, in any order, into ``(verb, instance of verbs[VERB])``.

    A verb is one word (``import``) or two (``annotators add``); its dataclass's docstring is its help line, and its
    fields with ``metadata={"positional": True}`` are bare words in field order (a list field: all the remaining
    ones). ``default``: the verb when none is given (``python -m align.score --model ...``). ``--help`` lists the
    verbs, ``VERB --help`` the verb's keys. Errors raise ``ConfigError`` (``run_command`` makes them one line).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    words, _ = _split_command_line(argv, _Keys(list(verbs.values()), warn=False))  # only to find the verb
    verb = next((v for v in sorted(verbs, key=lambda v: -len(v.split())) if words[: len(v.split())] == v.split()),
                None)
    named = verb is not None
    if not named and default is not None and not (words and any(v.split()[0] == words[0] for v in verbs)):
        verb = default
    if "--help" in argv or "-h" in argv:
        if named:
            print(help_text([verbs[verb]], f"{prog} {verb}", verb=verb))
        else:
            print(_verbs_help(verbs, prog, about, default))
            if default is not None:
                print(f"\nWithout a verb: {default}.\n" + help_text([verbs[default]], prog, verb=""))
        raise SystemExit(0)
    if verb is None:
        given = f"got {words[0]!r}" if words else "none given"
        raise ConfigError(f"command line: expected a verb ({', '.join(verbs)}); {given}")

    cls, keys = verbs[verb], _Keys([verbs[verb]])
    words, pairs = _split_command_line(argv, keys)
    words = words[len(verb.split()) :] if named else words
    values = _collect(pairs)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("positional") or not words:
            continue
        if f.name in values:
            raise ConfigError(f"command line: {f.name.upper()} given twice: {words[0]!r} and --{f.name}")
        value, words = (words, []) if _is_list(keys.types[f.name]) else (words[0], words[1:])
        values[f.name] = _Value(value, "command line", f.name)
    if words:
        raise ConfigError(f"command line: unexpected argument {words[0]!r} for {prog} {verb}")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            what = f.name.upper() if f.metadata.get("positional") else f"--{f.name}"
            raise ConfigError(f"command line: {prog} {verb} needs {what}")
    return verb, _build([cls], keys, values, "command line")[0]


def _verbs_help(verbs: dict[str, type], prog: str, about: str, default: str | None) -> str:
    verb = "VERB" if default is None else "[VERB]"
    out = [f"usage: {prog} {verb} [--key value ...]   ({prog} VERB --help lists its keys)"]
    if about:
        out.append(about.strip().split("\n\n")[0])
    out.append("\nverbs:")
    width = max(map(len, verbs)) + 2
    for verb, cls in verbs.items():
        doc = "" if (cls.__doc__ or "").startswith(f"{cls.__name__}(") else (cls.__doc__ or "").strip()
        out.append(f"  {verb:<{width}}{doc.splitlines()[0] if doc else ''}")
    return "\n".join(out)


def help_text(dataclass_types: Sequence[type], prog: str | None = None, verb: str | None = None) -> str:
    """Every key of a command, by dataclass: ``--name TYPE (default: X)`` and its help metadata. ``verb``: the
    usage line of a verb (its positional arguments instead of a config file)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if prog is None:
        prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else "python -m align.<command>"
    if verb is None:
        out = [f"usage: {prog} [config.yaml] [--key value ...]",
               "Keys come from the YAML file and the command line (which wins, in any order); values are read as "
               "YAML, text keys' verbatim."]
    else:
        types_ = _Keys(dataclass_types, warn=False).types
        names = [f.name.upper() + ("..." if _is_list(types_[f.name]) else "")
                 for cls in dataclass_types for f in dataclasses.fields(cls) if f.metadata.get("positional")]
        out = [f"usage: {' '.join([prog, *names])} [--key value ...]   (in any order)"]
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
            old = f.metadata.get("aliases")
            old = f"; old name: {', '.join(old)}" if old else ""
            name = f.name.upper() if f.metadata.get("positional") else f"--{f.name}"
            out.append(f"  {name} {_describe(hints.get(f.name, Any))} ({default}{old})")
            if f.metadata.get("help"):
                out.append(textwrap.fill(" ".join(str(f.metadata["help"]).split()), 110, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6))
    return "\n".join(out)


def run_command(main: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A command's ``__main__`` (or its parsing): bad input (a config, a data file, a missing path) ends with its
    message on stderr and exit status 2 instead of a traceback; any other error keeps its traceback."""
    from align.data.formats import DataError

    try:
        return main(*args, **kwargs)
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
