"""Evaluation on held-out prompts of the built-in world, reused by every stage.

For each model: greedy and sampled (T=1) replies to the same held-out prompts, checked by the world's
rule checker. Reported:
- ``exact_match``: share of greedy replies with the right answer (any style), also per task;
- ``exact_match_sampled``: the same for replies sampled at T=1, averaged over ``samples_per_prompt``
  samples per prompt (one sample on 200 prompts has a standard error of ~3 points; eight have ~1.5);
- ``pass_at_k`` / ``maj_at_k``: share of prompts with at least one right sample / whose most frequent
  sampled answer is right (k = ``samples_per_prompt``): what RL can at most sharpen the policy towards
  without teaching it anything new (Wang et al. 2022, https://arxiv.org/abs/2203.11171);
- ``preferred_rate``: share of *sampled* replies that are correct and in the preferred (helpful) style.
  Greedy style is all-or-nothing (the first token picks it), so the sampled rate is the one that moves;
  ``preferred_rate_greedy`` is reported too;
- ``mean_length``: mean reply length in tokens (sampled), and a few sample generations.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.data import world
from align.generate import generate


SAMPLES_PER_PROMPT = 8  # sampled replies per held-out prompt: the sampled figures are means over them


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


def sample_agreement(examples: Sequence["world.Example"], samples: Sequence[Sequence[str]]) -> dict[str, float]:
    """pass@k and maj@k of k sampled replies per example (k = len(samples[i]))."""
    passed = majority = 0
    for ex, replies in zip(examples, samples, strict=True):
        passed += any(world.check(ex, r)["correct"] for r in replies)
        answers = Counter(world.normalize(a) for a, _ in map(world.parse_reply, replies) if a is not None)
        if answers:
            top = answers.most_common(1)[0][0]
            majority += world.TASKS[ex.task].checker(top, ex.answer)
    n = max(len(examples), 1)
    return {"pass_at_k": passed / n, "maj_at_k": majority / n}


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
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
) -> dict[str, Any]:
    """Greedy and sampled generation on held-out prompts, checked by rule. Returns a JSON-ready dict."""
    if examples is None:
        examples = world.World(seed=seed).eval_prompts(num_prompts)
    t0 = time.time()
    was_training = model.training
    model.eval()
    prompts = [ex.prompt for ex in examples]
    greedy = [r[0] for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]
    k = samples_per_prompt
    sampled_k = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
        num_return_sequences=k, batch_size=batch_size, seed=seed,  # batch_size prompts: k x as many rows
    )
    model.train(was_training)
    g = score_replies(examples, greedy)
    s = score_replies([ex for ex in examples for _ in range(k)], [r for rs in sampled_k for r in rs])
    sampled = [rs[0] for rs in sampled_k]
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in sampled]
    return {
        "num_prompts": len(examples),
        "exact_match": g["exact_match"],
        "exact_match_sampled": s["exact_match"],
        "preferred_rate": s["preferred_rate"],
        "preferred_rate_greedy": g["preferred_rate"],
        "samples_per_prompt": k,
        **sample_agreement(examples, sampled_k),
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
    """Bar chart of exact match (greedy, sampled, maj@k, pass@k) and preferred rate for several models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    keys = [k for k in ("exact_match", "exact_match_sampled", "maj_at_k", "pass_at_k", "preferred_rate")
            if all(k in results[n] for n in names)]
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
