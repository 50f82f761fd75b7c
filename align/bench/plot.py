"""PNG of throughput from ``python -m align.bench generate|model --json FILE`` lines.

    python -m align.bench plot --files gen.jsonl [more.jsonl ...] --out docs/img/generate.png
    python -m align.bench plot --bench model --files train.jsonl --out docs/img/train.png

generate: left, new tokens/s against batch size, one line per method (at the most common prompt length); right,
against prompt length at each batch size that was run at several prompt lengths (ours and HF).
model: training tokens/s (forward + backward + AdamW) against batch size at the most common sequence length, and
against sequence length at the most common batch size, one line per model (ours, HF, the fast path) and compile mode.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

BENCHES = ("generate", "model")


@dataclass
class BenchArgs:
    """PNG of generation or training throughput from `bench generate|model --json` files"""

    files: list[str] = field(default_factory=list, metadata={"help": "JSON-lines files of `bench ... --json`"})
    out: str = field(default="generate.png", metadata={"help": "the PNG to write"})
    bench: str = field(default="generate", metadata={"help": f"whose rows to draw: one of {BENCHES}"})

    def __post_init__(self):
        if isinstance(self.files, str):  # one file given as one word
            self.files = [self.files]
        if self.bench not in BENCHES:
            raise ValueError(f"bench must be one of {BENCHES}, got {self.bench!r}")


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in a.files for line in open(f) if line.strip()]
    rows = [r for r in rows if r.get("bench") == a.bench]
    if not rows:
        print(f"error: no {a.bench} rows in {a.files}", file=sys.stderr)
        return 2
    fig = (generate_figure if a.bench == "generate" else train_figure)(rows, plt)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


def generate_figure(rows: list[dict], plt):
    counts = Counter(r["prompt_len"] for r in rows)
    plen = min(counts, key=lambda p: (-counts[p], p))  # the most common prompt length; the shortest of a tie
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
        colors = {b: f"C{i}" for i, b in enumerate(sorted({b for b, _ in by_batch}))}  # one colour a batch size
        for (b, method), pts in sorted(by_batch.items()):
            ax2.plot([pl for pl, _ in pts], [t for _, t in pts], marker="o", label=f"{method}, batch {b}",
                     color=colors[b], linestyle="-" if method == "ours" else "--")
        ax2.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="new tokens / s",
                title=r0["device"])
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend()
    return fig


def train_figure(rows: list[dict], plt):
    seq = Counter(r["seq"] for r in rows).most_common(1)[0][0]
    batch = Counter(r["batch"] for r in rows).most_common(1)[0][0]
    lines = defaultdict(lambda: ([], []))  # (model, compile mode) -> ((batch, tok/s) at seq, (seq, tok/s) at batch)
    for r in rows:
        key = f"{r['model']}" + (f", compiled ({r['compile']})" if r["compile"] else ", eager")
        if r["seq"] == seq:
            lines[key][0].append((r["batch"], r["train_tokens_per_s"]))
        if r["batch"] == batch:
            lines[key][1].append((r["seq"], r["train_tokens_per_s"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    r0 = rows[0]
    for ax, i, xlabel, title in ((ax1, 0, "batch size", f"seq {seq}"), (ax2, 1, "sequence length", f"batch {batch}")):
        for key, pts in sorted(lines.items()):
            best = defaultdict(float)  # several runs of one shape: the best, as the bench reports
            for x, y in pts[i]:
                best[x] = max(best[x], y)
            if pts := sorted(best.items()):
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=key,
                        linestyle="--" if key.startswith("hf") else "-")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel=xlabel, ylabel="train tokens / s (fwd + bwd + AdamW)",
               title=f"{r0['size']} {r0['dtype']}, {title}, {r0['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
