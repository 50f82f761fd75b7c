"""``python -m align.bench sft``: SFT throughput vs TRL's defaults (align.bench.train has the details)."""

from align.bench.train import bench_main


def main(argv: list[str] | None = None) -> int:
    return bench_main("sft", argv)
