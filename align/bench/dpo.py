"""``python -m align.bench dpo``: DPO throughput vs TRL's defaults (align.bench.train has the details)."""

from align.bench.train import bench_main


def main(argv: list[str] | None = None) -> int:
    return bench_main("dpo", argv)
