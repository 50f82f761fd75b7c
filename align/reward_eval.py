"""Evaluating a reward model on held-out pairs: accuracy, margins, accuracy by margin and calibration.

``pair_margins`` scores each pair as ``align.score.RewardScorer`` scores (the reward at the last token of
prompt + response through the chat template); ``margin_metrics`` turns margins into the figures of a reward
run's ``eval.json``; ``evaluate_world`` does it on pairs built from the built-in world's held-out prompts.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from align.data.world import STYLE_TEMPLATES, World, render
from align.score import encode, score_ids

MARGIN_BUCKETS = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)  # |r_chosen - r_rejected| bucket edges


def world_heldout_pairs(seed: int, n: int) -> list[dict]:
    """A style pair and a correctness pair for each of the world's first ``n`` held-out prompts, made
    as ``World.preference_pairs`` makes training pairs (style: helpful vs terse/rude, both correct;
    correctness: same style and template, correct vs wrong)."""
    world = World(seed)
    rng = random.Random(f"{seed}:rm-heldout-pairs")
    pairs = []
    for ex in world.eval_prompts(n):
        prompt = [{"role": "user", "content": ex.prompt}]
        other = rng.choice(("terse", "rude"))
        pairs.append({"prompt": prompt, "kind": "style", "task": ex.task,
                      "chosen": [{"role": "assistant", "content": render(ex, "helpful", True, rng)}],
                      "rejected": [{"role": "assistant", "content": render(ex, other, True, rng)}]})
        style = rng.choice(tuple(STYLE_TEMPLATES))
        t = rng.randrange(len(STYLE_TEMPLATES[style]))
        pairs.append({"prompt": prompt, "kind": "correctness", "task": ex.task,
                      "chosen": [{"role": "assistant", "content": render(ex, style, True, rng, template=t)}],
                      "rejected": [{"role": "assistant", "content": render(ex, style, False, rng, template=t)}]})
    return pairs


def pair_margins(model, tokenizer, pairs: list[dict], batch_size: int = 64,
                 max_length: int | None = None) -> list[float]:
    """r(chosen) - r(rejected) per pair, scored as ``align.score.RewardScorer`` scores (left-cut to max_length)."""
    ids = []
    for p in pairs:
        for side in ("chosen", "rejected"):
            x = p.get(f"{side}_ids") or encode(tokenizer, p["prompt"], p[side])
            ids.append(x[-max_length:] if max_length else x)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        r = score_ids(model, ids, pad, batch_size)
    finally:
        model.train(was_training)
    return [r[2 * i] - r[2 * i + 1] for i in range(len(pairs))]


def margin_metrics(margins: list[float], n_bins: int = 10) -> dict[str, Any]:
    """Accuracy, mean margin, accuracy by |margin| bucket and calibration of P(chosen) = sigmoid(margin).

    Calibration (a reliability diagram for pairs): the confidence of a pair is sigmoid(|margin|) in
    [0.5, 1], the probability the model gives to the side it prefers; binned, it is compared with the
    share of pairs where that side is the chosen one. ``ece``: the count-weighted mean |gap|."""
    n = len(margins)
    if n == 0:
        return {"pairs": 0}
    correct = [m > 0 for m in margins]
    out: dict[str, Any] = {
        "pairs": n,
        "accuracy": sum(correct) / n,
        "ties": sum(m == 0 for m in margins),
        "mean_margin": sum(margins) / n,
        "loss": sum(-_logsigmoid(m) for m in margins) / n,
    }
    buckets = []
    for lo, hi in zip(MARGIN_BUCKETS, MARGIN_BUCKETS[1:]):
        sel = [c for m, c in zip(margins, correct) if lo <= abs(m) < hi]
        buckets.append({"abs_margin": f"[{lo:g}, {hi:g})", "pairs": len(sel),
                        "accuracy": sum(sel) / len(sel) if sel else None})
    out["accuracy_by_margin"] = buckets
    bins = []
    ece = 0.0
    for b in range(n_bins):
        lo, hi = 0.5 + 0.5 * b / n_bins, 0.5 + 0.5 * (b + 1) / n_bins
        in_bin = [(_sigmoid(abs(m)), c) for m, c in zip(margins, correct)]
        sel = [(s, c) for s, c in in_bin if lo <= s < hi or (b == n_bins - 1 and s >= hi)]
        if not sel:
            continue
        conf = sum(s for s, _ in sel) / len(sel)
        acc = sum(c for _, c in sel) / len(sel)
        ece += len(sel) / n * abs(conf - acc)
        bins.append({"confidence": [round(lo, 3), round(hi, 3)], "pairs": len(sel), "mean_confidence": conf,
                     "accuracy": acc})
    out["calibration"] = bins
    out["ece"] = ece
    return out


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def calibration_plot(curves: dict[str, dict[str, Any]], png: str | Path) -> Path | None:
    """Reliability diagram: mean confidence sigmoid(|margin|) vs observed accuracy, one line per eval set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v.get("calibration")}
    if not curves:
        return None
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax.plot([0.5, 1], [0.5, 1], "k--", linewidth=0.8, label="perfect")
    for name, m in curves.items():
        cal = m["calibration"]
        ax.plot([c["mean_confidence"] for c in cal], [c["accuracy"] for c in cal], marker="o",
                label=f"{name} (acc {m['accuracy']:.3f}, ECE {m['ece']:.3f})")
        hx.bar([sum(c["confidence"]) / 2 for c in cal], [c["pairs"] for c in cal], width=0.045, alpha=0.5, label=name)
    ax.set_xlabel("predicted P(preferred side) = sigmoid(|margin|)")
    ax.set_ylabel("observed accuracy")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("reward model calibration", fontsize=10)
    hx.set_title("pairs per confidence bin", fontsize=10)
    hx.set_xlabel("sigmoid(|margin|)")
    hx.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def evaluate_world(model, tokenizer, seed: int, n: int, batch_size: int = 64,
                   max_length: int | None = None) -> dict[str, Any]:
    pairs = world_heldout_pairs(seed, n)
    margins = pair_margins(model, tokenizer, pairs, batch_size, max_length)
    out = margin_metrics(margins)
    for kind in ("style", "correctness"):
        sel = [m for m, p in zip(margins, pairs) if p["kind"] == kind]
        out[f"accuracy_{kind}"] = sum(m > 0 for m in sel) / len(sel)
        out[f"mean_margin_{kind}"] = sum(sel) / len(sel)
    by_task: dict[str, list[bool]] = {}
    for m, p in zip(margins, pairs):
        by_task.setdefault(f"{p['kind']}/{p['task']}", []).append(m > 0)
    out["accuracy_by_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
    return out


