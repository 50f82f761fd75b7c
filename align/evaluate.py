"""Evaluation on held-out prompts of the built-in world, reused by every stage.

For each model: greedy and sampled (T=1) replies to the same held-out prompts, checked by the world's
rule checker. Reported:
- ``exact_match``: share of greedy replies with the right answer (any style), also per task;
- ``exact_match_sampled``: the same for replies sampled at T=1;
- ``preferred_rate``: share of *sampled* replies that are correct and in the preferred (helpful) style.
  Greedy style is all-or-nothing (the first token picks it), so the sampled rate is the one that moves;
  ``preferred_rate_greedy`` is reported too;
- ``mean_length``: mean reply length in tokens (sampled), and a few sample generations.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.data import world
from align.generate import generate


def score_replies(examples: Sequence["world.Example"], replies: Sequence[str]) -> dict[str, Any]:
    """Exact match (overall and per task), preferred rate and style shares of one reply per example."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    correct = preferred = 0
    styles: dict[str, int] = defaultdict(int)
    for ex, reply in zip(examples, replies, strict=True):
        c = world.check(ex, reply)
        per_task[ex.task].append(c["correct"])
        correct += c["correct"]
        preferred += c["preferred"]
        styles[c["style"] or "other"] += 1
    n = max(len(examples), 1)
    return {
        "exact_match": correct / n,
        "preferred_rate": preferred / n,
        "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        "styles": {s: k / n for s, k in sorted(styles.items())},
    }


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence["world.Example"] | None = None,
    *,
    num_prompts: int = 300,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 100,
    num_samples: int = 8,
) -> dict[str, Any]:
    """Greedy and sampled generation on held-out prompts, checked by rule. Returns a JSON-ready dict."""
    if examples is None:
        examples = world.World(seed=seed).eval_prompts(num_prompts)
    t0 = time.time()
    was_training = model.training
    model.eval()
    prompts = [ex.prompt for ex in examples]
    greedy = [r[0] for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
    sampled = [
        r[0]
        for r in generate(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
            batch_size=batch_size, seed=seed,
        )
    ]
    model.train(was_training)
    g, s = score_replies(examples, greedy), score_replies(examples, sampled)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in sampled]
    return {
        "num_prompts": len(examples),
        "exact_match": g["exact_match"],
        "exact_match_sampled": s["exact_match"],
        "preferred_rate": s["preferred_rate"],
        "preferred_rate_greedy": g["preferred_rate"],
        "exact_match_per_task": g["per_task"],
        "exact_match_sampled_per_task": s["per_task"],
        "styles_sampled": s["styles"],
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "seconds": round(time.time() - t0, 1),
        "samples": [
            {"task": ex.task, "prompt": ex.prompt, "answer": ex.answer, "greedy": gr, "sampled": sa}
            for ex, gr, sa in list(zip(examples, greedy, sampled))[:num_samples]
        ],
    }


def compare_plot(results: dict[str, dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of exact match (greedy, sampled) and preferred rate for several models (e.g. sft vs dpo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["exact_match", "exact_match_sampled", "preferred_rate"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(keys), 3.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [results[name].get(k, 0.0) for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], keys, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
