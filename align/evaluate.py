"""Evaluation on held-out prompts of the built-in world, reused by every stage.

For each model: greedy and sampled (T=1) replies to the same held-out prompts, checked by the world's
rule checker. Reported:
- ``exact_match``: share of greedy replies with the right answer (any style), also per task;
- ``exact_match_sampled``: the same for replies sampled at T=1, averaged over ``samples_per_prompt``
  samples per prompt (one sample on 200 prompts has a standard error of ~3 points; eight have ~1.5);
- ``answer_match`` / ``answer_match_sampled``: the same with the reply's *final answer* read out of free text
  (``world.final_answer``: the last number, letter or list), for real models that answer in their own words;
- ``pass_at_k`` / ``maj_at_k``: share of prompts with at least one right sample / whose most frequent
  sampled answer is right (k = ``samples_per_prompt``): what RL can at most sharpen the policy towards
  without teaching it anything new (Wang et al. 2022, https://arxiv.org/abs/2203.11171);
- ``preferred_rate``: share of *sampled* replies, correct and in the preferred (helpful) style (greedy style is
  all-or-nothing: the first token picks it; ``preferred_rate_greedy`` is reported too);
- ``mean_length``: mean reply length in tokens (sampled), and a few sample generations.

:func:`evaluate_policy` adds the KL to a reference and each reward's mean on sampled replies (the RL figures);
``python -m align.evaluate configs/evaluate.yaml`` puts several models side by side.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align import reward_funcs as R
from align.data import world
from align.generate import generate
from align.logprobs import sample_with_kl
from align.models import default_device, load, load_tokenizer

SAMPLES_PER_PROMPT = 8  # sampled replies per held-out prompt: the sampled figures are means over them


def world_eval_applies(setting: bool | None, dataset_name: str, model: str) -> bool:
    """Whether the world's held-out checks say something about this run: ``setting`` where given, else when the
    data is the world's or the model is align's decoder (a real model's replies are not in the world's format)."""
    if setting is not None:
        return setting
    from align.models import model_type

    return dataset_name == "world" or model_type(model) == "align_decoder"


def score_replies(examples: Sequence["world.Example"], replies: Sequence[str]) -> dict[str, Any]:
    """Exact match (overall and per task), preferred rate and style shares of one reply per example."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    correct = preferred = answer_correct = 0
    styles: dict[str, int] = defaultdict(int)
    for ex, reply in zip(examples, replies, strict=True):
        c = world.check(ex, reply)
        per_task[ex.task].append(c["correct"])
        correct += c["correct"]
        preferred += c["preferred"]
        answer_correct += c["answer_correct"]
        styles[c["style"] or "other"] += 1
    n = max(len(examples), 1)
    return {
        "exact_match": correct / n,
        "answer_match": answer_correct / n,
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
        "answer_match": g["answer_match"],
        "answer_match_sampled": s["answer_match"],
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


def reply_figures(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any], columns: dict[str, list],
    reward_funcs: Sequence[Any], ref_path: str | None, *, max_new_tokens: int = 32, seed: int = 0,
) -> tuple[dict[str, Any], list[str]]:
    """One reply sampled at T=1 per prompt, and its figures: ``kl_to_reference`` (mean per-sequence KL) and
    ``reward/<name>`` (each reward's mean, with ``columns`` passed as in training; ``mean_rm_reward``)."""
    replies, kls = sample_with_kl(model, tokenizer, list(prompts), ref_path, max_new_tokens=max_new_tokens, seed=seed)
    ev: dict[str, Any] = {"kl_to_reference": sum(kls) / len(kls)}
    for f in reward_funcs:
        vals = f(prompts=list(prompts), completions=replies, completion_ids=None, **columns)
        ev[f"reward/{f.__name__}"] = sum(vals) / len(vals)
    if "reward/rm" in ev:
        ev["mean_rm_reward"] = ev["reward/rm"]
    return ev, replies


def evaluate_policy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[world.Example],
    reward_funcs: Sequence[Any], ref_path: str | None, *, kl_prompts: int = 100, max_new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate` on held-out prompts, plus on sampled replies to the first ``kl_prompts`` of them:
    ``kl_to_reference`` (mean per-sequence KL) and ``reward/<name>`` (mean of each reward; ``mean_rm_reward``)."""
    t0 = time.time()
    ev = evaluate(model, tokenizer, list(examples), max_new_tokens=max_new_tokens, seed=seed)
    sub = list(examples)[:kl_prompts]
    if sub:
        cols = {"task": [e.task for e in sub], "answer": [e.answer for e in sub]}
        ev |= reply_figures(model, tokenizer, [[{"role": "user", "content": e.prompt}] for e in sub], cols,
                            reward_funcs, ref_path, max_new_tokens=max_new_tokens, seed=seed)[0]
    ev["seconds"] = round(time.time() - t0, 1)
    return ev


def compare_plot(results: dict[str, dict[str, Any]], out_png: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of exact match (greedy, sampled, maj@k, pass@k) and preferred rate for several models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    keys = [k for k in ("exact_match", "exact_match_sampled", "maj_at_k", "pass_at_k", "preferred_rate")
            if all(k in results[n] for n in names)]
    fig, ax = plt.subplots(figsize=(2.6 + 1.8 * len(keys), 3.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [results[name].get(k, 0.0) for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], keys, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------- the command


@dataclass
class EvaluateArguments:
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Causal LMs to evaluate side by side: a run's final/, any HF model dir or hub id; "
                          "'label=path' names one (default: the run's dir name for .../<run>/final)."},
    )
    output_dir: str = field(default="runs/evaluate", metadata={"help": "eval.json, eval.md, eval.png go here."})
    reward_model_path: str | list[str] | None = field(
        default=None, metadata={"help": "A reward model dir (or an ensemble's dirs): adds each model's mean RM "
                                        "reward (reward/rm)."}
    )
    reference_model_path: str | None = field(
        default=None, metadata={"help": "A causal LM with the models' tokenizer: adds each model's KL to it on its "
                                        "own sampled replies."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correct", "polite"],
        metadata={"help": "Rewards (align.reward_funcs names) whose means on sampled replies are reported too."},
    )
    num_prompts: int = field(default=200, metadata={"help": "Held-out world prompts."})
    kl_prompts: int = field(default=100, metadata={"help": "Of those, prompts whose samples give the KL and rewards."})
    max_new_tokens: int = field(default=32, metadata={"help": "Reply length limit."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world (which prompts)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        if isinstance(self.models, str):
            self.models = [self.models]
        if not self.models:
            raise ValueError("models is empty: give one or more model dirs, "
                             "e.g. --models '[runs/quickstart/sft/final]'")
        if self.num_prompts < 1 or self.kl_prompts < 0:
            raise ValueError(f"num_prompts must be >= 1 and kl_prompts >= 0, got {self.num_prompts}, {self.kl_prompts}")
        labels = [label for label, _ in self.labelled()]
        if len(set(labels)) < len(labels):
            raise ValueError(f"models: two share a label ({labels}); name them with 'label=path'")

    def labelled(self) -> list[tuple[str, str]]:
        out = []
        for m in self.models:
            label, sep, path = m.partition("=")
            if not sep:
                p = Path(m)
                label, path = (p.parent.name if p.name == "final" and p.parent.name else p.name or m), m
            out.append((label, path))
        return out


CONFIG_TYPES = (EvaluateArguments,)
TABLE_KEYS = ("exact_match", "exact_match_sampled", "maj_at_k", "pass_at_k", "preferred_rate", "mean_length",
              "kl_to_reference", "mean_rm_reward")


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r for r in results.values())]
    rows = ["| model | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-"
                                                for k in keys) + " |")
    return "\n".join(rows) + "\n"


def run(args: EvaluateArguments) -> dict[str, dict[str, Any]]:
    """Evaluate every model on the same held-out prompts and samples; eval.json, eval.md (a table), eval.png."""
    from align.runs import write_config, write_json

    for label, path in args.labelled():  # before any work: a local path that is not there is a typo, not a hub id
        if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
            raise FileNotFoundError(f"models: {label}={path} not found (a model dir, e.g. runs/quickstart/sft/final, "
                                    "or a hub id such as org/name)")
    reward_funcs = R.eval_reward_funcs(args.reward_funcs, args.reward_model_path)
    examples = world.World(args.world_seed, n_heldout=args.num_prompts).eval_prompts(args.num_prompts)
    out = Path(args.output_dir)
    write_config(out, args)
    ref_tok = load_tokenizer(args.reference_model_path) if args.reference_model_path else None
    results: dict[str, dict[str, Any]] = {}
    for label, path in args.labelled():
        model, tok = load(path, device=default_device()), load_tokenizer(path)
        if ref_tok is not None and tok.get_vocab() != ref_tok.get_vocab():
            raise ValueError(f"models: {label}={path} has another tokenizer than reference_model_path "
                             f"{args.reference_model_path}: the KL compares log-probs of the same tokens")
        ev = evaluate_policy(model, tok, examples, reward_funcs, args.reference_model_path,
                             kl_prompts=args.kl_prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)
        if not args.reference_model_path:
            ev.pop("kl_to_reference", None)  # without a reference it is the model against itself
        results[label] = {"path": path, **ev}
        print(f"{label}: exact match {ev['exact_match']:.3f} greedy, {ev['exact_match_sampled']:.3f} sampled, "
              f"preferred {ev['preferred_rate']:.3f}", flush=True)
        del model
    write_json(out / "eval.json", results)
    table = markdown_table(results)
    (out / "eval.md").write_text(
        f"Held-out world prompts: {args.num_prompts} (world seed {args.world_seed}).\n\n" + table)
    compare_plot(results, out / "eval.png", title=f"{len(results)} models, {args.num_prompts} held-out prompts")
    print("\n" + table + f"\n{out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    from align.config import parse
    from align.runs import setup_logging

    setup_logging()
    (args,) = parse(CONFIG_TYPES, argv)
    return run(args)


if __name__ == "__main__":
    from align.config import run_command

    run_command(main)
