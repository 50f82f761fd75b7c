"""``python -m align.bench NAME [--key value ...]`` runs ``align.bench.NAME.main(args)``: speed against a reference.

Each bench module has a ``BenchArgs`` dataclass (its keys, ``NAME --help``) and a ``main(argv)`` that parses it
with ``align.config.parse``; a new ``align/bench/NAME.py`` needs no entry here.
"""

import importlib
import pkgutil
import sys

import align.bench


def main(argv: list[str] | None = None) -> int:
    from align.config import parse_verb, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name for m in pkgutil.iter_modules(align.bench.__path__) if not m.name.startswith("_"))
    name = next((a for a in argv if a in names), None)
    if name is not None and "--help" not in argv and "-h" not in argv:
        rest = argv[: argv.index(name)] + argv[argv.index(name) + 1 :]  # options before the name work too
        return importlib.import_module(f"align.bench.{name}").main(rest) or 0  # imports only the bench that runs
    # --help, no bench or an unknown one: the shared parser lists the benches, a bench's keys, or names the error
    verbs = {n: importlib.import_module(f"align.bench.{n}").BenchArgs for n in names}
    run_command(parse_verb, verbs, argv, prog="python -m align.bench", about=__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
