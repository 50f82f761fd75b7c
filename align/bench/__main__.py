"""``python -m align.bench NAME [--key value ...]`` runs ``align.bench.NAME.main(args)``: speed against a reference.

A bench is any ``align/bench/NAME.py`` with a ``main(argv)`` (no entry here); its keys are a dataclass parsed by
``align.config.parse`` (``NAME --help`` lists them), in any position: ``--device cuda model`` = ``model --device cuda``.
"""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import align.bench


def benches() -> dict[str, str]:
    """NAME -> the first line of its docstring, for every bench module with a ``main`` (read, not imported: the
    benches import torch, sqlalchemy, ...)."""
    out = {}
    for m in pkgutil.iter_modules(align.bench.__path__):
        tree = ast.parse(Path(align.bench.__path__[0], f"{m.name}.py").read_text()) if not m.ispkg else None
        if tree and not m.name.startswith("_") and any(isinstance(n, ast.FunctionDef) and n.name == "main"
                                                       for n in tree.body):
            out[m.name] = (ast.get_docstring(tree) or "").strip().split("\n")[0].replace("``", "")
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = benches()
    name = next((a for a in argv if a in names), None)
    if name is not None:
        rest = argv[: argv.index(name)] + argv[argv.index(name) + 1 :]
        return importlib.import_module(f"align.bench.{name}").main(rest) or 0
    if argv and "--help" not in argv and "-h" not in argv:
        print(f"error: command line: expected a bench ({', '.join(names)}); got {argv[0]!r}", file=sys.stderr)
        return 2
    width = max(map(len, names)) + 2
    print("usage: python -m align.bench NAME [--key value ...]   (python -m align.bench NAME --help lists its keys)\n"
          + "\nbenches:\n" + "\n".join(f"  {n:<{width}}{doc}" for n, doc in names.items()))
    return 0 if argv else 2


if __name__ == "__main__":
    sys.exit(main())
