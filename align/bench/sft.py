"""``python -m align.bench sft``: SFT throughput vs TRL's defaults (align.bench.train has the details)."""

from align.bench.train import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main("sft", argv)
