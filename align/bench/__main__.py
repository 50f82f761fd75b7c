"""``python -m align.bench NAME [args]`` runs ``align.bench.NAME.main(args)``."""

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m align.bench NAME [args]  (NAME: store, app, annotators, model, score)")
        return 0 if argv else 2
    return importlib.import_module(f"align.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
