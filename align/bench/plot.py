"""PNG of generation throughput from ``python -m align.bench generate --json FILE`` lines.

    python -m align.bench plot --files gen.jsonl [more.jsonl ...] --out docs/img/generate.png

Left: tokens/s against batch size, one line per method (at the most common prompt length); right: tokens/s
against prompt length at each batch size that was run at several prompt lengths (ours and HF).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class BenchArgs:
    """PNG of generation throughput from `bench generate --json` files"""

    files: list[str] = field(default_factory=list, metadata={"help": "JSON-lines files of `bench generate --json`"})
    out: str = field(default="generate.png", metadata={"help": "the PNG to write"})

    def __post_init__(self):
        if isinstance(self.files, str):  # one file given as one word
            self.files = [self.files]


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in a.files for line in open(f) if line.strip()]
    rows = [r for r in rows if r.get("bench") == "generate"]
    if not rows:
        print(f"error: no generate rows in {a.files}", file=sys.stderr)
        return 2
    plen = Counter(r["prompt_len"] for r in rows).most_common(1)[0][0]
    by_batch = defaultdict(list)
    for r in rows:
        if r["method"] in ("hf", "ours"):
            by_batch[(r["batch"], r["method"])].append((r["prompt_len"], r["tokens_per_s"]))
    by_batch = {k: sorted(v) for k, v in by_batch.items() if len({pl for pl, _ in v}) > 1}
    fig, axes = plt.subplots(1, 2 if by_batch else 1, figsize=(11 if by_batch else 6, 4.2), squeeze=False)
    ax1 = axes[0, 0]
    by_method = defaultdict(list)
    for r in rows:
        if r["prompt_len"] == plen:
            by_method[r["method"]].append((r["batch"], r["tokens_per_s"]))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax1.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=method)
    r0 = rows[0]
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="new tokens / s",
            title=f"{r0['size']} {r0['dtype']}, prompt {plen} + {r0['new_tokens']} new, {r0['device']}")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    if by_batch:  # right panel only where several prompt lengths were run
        ax2 = axes[0, 1]
        for (b, method), pts in sorted(by_batch.items()):
            ax2.plot([pl for pl, _ in pts], [t for _, t in pts], marker="o", label=f"{method}, batch {b}",
                     linestyle="-" if method == "ours" else "--")
        ax2.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="new tokens / s",
                title=r0["device"])
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
