"""Reward model: ``python -m align.reward configs/reward.yaml [--key value ...]``.

A sequence-classification model with one output (``num_labels=1``), trained with TRL's
``RewardTrainer`` on preference pairs with the pairwise logistic (Bradley-Terry) loss

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) + c * mean((r_chosen + r_rejected)^2)

(``margin`` 0 unless a margin column is made, Llama 2 sec. 3.2.2, https://arxiv.org/abs/2307.09288;
``c = center_rewards_coefficient``, https://arxiv.org/abs/2312.09244 eq. 2). The model starts from an
SFT/pretrain run's ``final/`` (a causal LM: its ``lm_head`` is dropped and a fresh ``score`` head is
made) or any HF model dir; ``use_peft`` trains LoRA adapters *and* the score head (task type SEQ_CLS,
``modules_to_save=["score"]``), and ``final/`` gets the merged standalone model + tokenizer.

Data (``dataset_name``): ``store`` (default: the labelled pairs exported from ``store_url`` with the
store's aggregation options), ``world`` (the built-in world's pairs), or any preference file the store
can import / a ``datasets`` dir. Train/test split by a hash of the prompt (a prompt is never in both).
Bad pairs are dropped and counted: identical chosen and rejected, an empty response, and pairs whose
chosen or rejected is longer than ``max_length`` tokens (TRL's rule; never truncated, since the reward
is read at the last token). ``eval.json``: held-out pairwise accuracy, mean margin, accuracy by margin
bucket, calibration (also ``calibration.png``) and, with ``eval_world``, accuracy on pairs built from
the world's held-out prompts (``accuracy_style``, ``accuracy_correctness``, ``accuracy_world``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import ModelConfig, RewardConfig, RewardTrainer, get_peft_config

from align.config import parse, run_command
from align.data.world import STYLE_TEMPLATES, World, render
from align.generate import load_tokenizer
from align.distributed import save_final, zero3_init_disabled
from align.runs import MetricsCallback, resume_checkpoint, setup_logging, write_config, write_json
from align.score import HEAD_FILE, encode, score_ids

logger = logging.getLogger("align.reward")

MARGIN_BUCKETS = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)  # |r_chosen - r_rejected| bucket edges
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RewardArguments:
    dataset_name: str = field(
        default="store",
        metadata={"help": "'store' (labelled pairs exported from store_url), 'world' (the built-in world's pairs), "
                  "a preference file the store can import (.json/.jsonl(.gz), any supported format) or a datasets dir."},
    )
    store_url: str = field(
        default="sqlite:///data/preferences.db", metadata={"help": "Preference store read when dataset_name=store."}
    )
    min_labels: int = field(default=1, metadata={"help": "Store: drop comparisons with fewer non-skip votes."})
    min_agreement: float = field(
        default=0.0, metadata={"help": "Store: drop comparisons whose majority share is below this (0-1)."}
    )
    annotator_kinds: list[str] | None = field(
        default=None, metadata={"help": "Store: only labels of these annotator kinds (human, ai, rule); default all."}
    )
    annotators: list[str] | None = field(
        default=None, metadata={"help": "Store: only labels of these annotator names; default all."}
    )
    sources: list[str] | None = field(default=None, metadata={"help": "Store: only comparisons from these sources."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; defaults to model_name_or_path's."}
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world (dataset_name=world, eval_world)."})
    test_size: float = field(
        default=0.1, metadata={"help": "Share of prompts held out (split by a hash of the prompt), in [0, 1)."}
    )
    split_seed: str = field(default="", metadata={"help": "Salt of the prompt-hash split (same rule as the store's)."})
    margin: str = field(
        default="none",
        metadata={"help": "Margin in the loss: 'none', 'scores' (score_chosen - score_rejected of the records, "
                  "times margin_scale) or the name of a numeric record field."},
    )
    margin_scale: float = field(default=1.0, metadata={"help": "Multiplier of the margin."})
    skip_bad: bool = field(
        default=False, metadata={"help": "Files: skip unreadable records (counted) instead of stopping at the first."}
    )
    max_train_pairs: int = field(default=0, metadata={"help": "Use at most this many training pairs (0 = all)."})
    bootstrap: bool = field(
        default=False,
        metadata={"help": "Train on a bootstrap resample of the training pairs (as many, drawn with replacement, "
                          "seeded by seed): a member of a reward-model ensemble (align.score.RewardEnsemble)."},
    )
    eval_world: bool = field(
        default=True, metadata={"help": "Also evaluate on pairs built from the built-in world's held-out prompts."}
    )
    eval_world_prompts: int = field(default=300, metadata={"help": "Held-out world prompts (a style and a "
                                                                   "correctness pair each)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the held-out scoring."})
    score_loglik: bool = field(
        default=False,
        metadata={"help": "Add a learned multiple of the response's mean token log-likelihood (the backbone's LM "
                          "head) to the score head's output (docs/reward.md, 'The likelihood term'). align's decoder "
                          "only; other models keep the linear head, with a warning."},
    )

    def __post_init__(self):
        if not 0 <= self.test_size < 1:
            raise ValueError(f"test_size must be in [0, 1), got {self.test_size}")
        if self.min_labels < 1:
            raise ValueError(f"min_labels must be >= 1, got {self.min_labels}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.eval_world_prompts < 0 or self.max_train_pairs < 0:
            raise ValueError("eval_world_prompts and max_train_pairs must be >= 0")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


CONFIG_TYPES = (RewardArguments, ModelConfig, RewardConfig)


# ------------------------------------------------------------------------------------------ data
def prompt_hash(prompt: list[dict]) -> str:
    """sha256 of the prompt messages, canonical JSON: the store's ``content_hash`` of a prompt."""
    canon = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def split_of(prompt: list[dict], test_size: float, seed: str = "") -> str:
    """'test' for a ``test_size`` share of prompts (the store's rule, so both paths split alike)."""
    if test_size <= 0:
        return "train"
    h = int(hashlib.sha256(f"{seed}{prompt_hash(prompt)}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if h < test_size else "train"


def _as_msgs(x: Any, role: str) -> list[dict]:
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


def _margin_of(pref: dict, raw: dict, args: RewardArguments, where: str) -> float:
    from align.data.formats import DataError

    if args.margin == "scores":
        if "score_chosen" not in pref or "score_rejected" not in pref:
            raise DataError(f"{where}: margin=scores needs score_chosen and score_rejected in the record")
        return args.margin_scale * (pref["score_chosen"] - pref["score_rejected"])
    v = raw.get(args.margin)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise DataError(f"{where}: margin={args.margin!r}: the record's field {args.margin!r} is {v!r}, not a number")
    return args.margin_scale * float(v)


def load_pairs(args: RewardArguments) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``({"train": pairs, "test": pairs}, info)``; pairs are conversational ``{prompt, chosen, rejected}``."""
    info: dict[str, Any] = {"source": args.dataset_name}
    rows: list[dict] = []
    if args.dataset_name == "store":
        from align.store import Store

        if args.margin != "none":
            raise ValueError("margin needs per-pair scores or fields; the store's export has none (use margin: none)")
        url = args.store_url
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            raise FileNotFoundError(
                f"store {url}: no such database; fill it (python -m align.store import FILE, or the quickstart) "
                "or train on --dataset_name world / a preference file"
            )
        store = Store(url)
        try:
            splits, rep = store.export_rows(
                min_labels=args.min_labels, min_agreement=args.min_agreement, test_fraction=args.test_size,
                seed=args.split_seed, kinds=args.annotator_kinds, annotators=args.annotators, sources=args.sources,
            )
        finally:
            store.close()
        info["store"] = {"url": url, **rep["report"]}
        if not splits["train"]:
            raise ValueError(f"store {url}: no labelled pairs to train on after aggregation ({rep['report']})")
        return splits, info
    if args.dataset_name == "world":
        if args.margin != "none":
            raise ValueError("the world's pairs have no margins (use margin: none)")
        rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in World(args.world_seed).preference_pairs()]
    else:
        from align.data.formats import DataError, location, read_records, to_preference

        skipped = []
        for key, rec in read_records(args.dataset_name):
            where = location(args.dataset_name, key)
            try:
                pref = to_preference(rec, where)
                row = {k: pref[k] for k in ("prompt", "chosen", "rejected")}
                row.update({k: float(rec[k]) for k in SOFT_COLUMNS if k in rec})  # the store's soft-label export
                if args.margin != "none":
                    row["margin"] = _margin_of(pref, rec, args, where)
            except DataError as e:
                if not args.skip_bad:
                    raise
                skipped.append(str(e))
                continue
            rows.append(row)
        info["unreadable"] = len(skipped)
        if skipped:
            logger.warning("skipped %d unreadable records, first: %s", len(skipped), skipped[0])
    splits = {"train": [], "test": []}
    for r in rows:
        splits[split_of(r["prompt"], args.test_size, args.split_seed)].append(r)
    return splits, info


def clean_pairs(pairs: list[dict], tokenizer, max_length: int | None) -> tuple[list[dict], Counter]:
    """Drop (and count) identical pairs, empty responses and pairs over ``max_length`` tokens; the kept
    pairs get ``chosen_ids``/``rejected_ids`` (tokenized once, by ``align.score.encode``, as TRL would)."""
    kept, dropped = [], Counter()
    for p in pairs:
        prompt, chosen = _as_msgs(p["prompt"], "user"), _as_msgs(p["chosen"], "assistant")
        rejected = _as_msgs(p["rejected"], "assistant")
        if chosen == rejected:
            dropped["identical"] += 1
            continue
        if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
            dropped["empty_response"] += 1
            continue
        ids_c, ids_r = encode(tokenizer, prompt, chosen), encode(tokenizer, prompt, rejected)
        if max_length and max(len(ids_c), len(ids_r)) > max_length:
            dropped["too_long"] += 1
            continue
        kept.append({**p, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_ids": ids_c, "rejected_ids": ids_r})
    return kept, dropped


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


# ------------------------------------------------------------------------------------------ evaluation
def pair_margins(model, tokenizer, pairs: list[dict], batch_size: int = 64, max_length: int | None = None) -> list[float]:
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
        sel = [(_sigmoid(abs(m)), c) for m, c in zip(margins, correct) if lo <= _sigmoid(abs(m)) < hi or (b == n_bins - 1 and _sigmoid(abs(m)) >= hi)]
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


def evaluate_world(model, tokenizer, seed: int, n: int, batch_size: int = 64, max_length: int | None = None) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------ model
def lora_config(model_args: ModelConfig, model):
    """LoRA for a reward model: task type SEQ_CLS and the score head trained and saved with the adapter
    (without ``modules_to_save=['score']`` the head stays random: trl#1379, OpenRLHF#873, LLaMA-Factory#6934)."""
    model_args.lora_task_type = "SEQ_CLS"
    if model_args.lora_target_modules is None:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        model_args.lora_target_modules = [t for t in LORA_DEFAULT_TARGETS if t in names] or "all-linear"
    save = list(model_args.lora_modules_to_save or [])
    if "score" not in save:
        save.append("score")
    model_args.lora_modules_to_save = save
    return get_peft_config(model_args)


def response_token_id(tokenizer) -> int:
    """The special token the chat template puts right before a response (``<|assistant|>`` here)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    if not ids or ids[-1] not in tokenizer.all_special_ids:
        raise ValueError(
            f"score_loglik: the chat template's generation prompt does not end in a special token (it ends in "
            f"{tokenizer.convert_ids_to_tokens(ids[-1:])}), so the response start cannot be found; use score_loglik: false"
        )
    return ids[-1]


def head_kwargs(path: str, tokenizer, score_loglik: bool = False) -> dict[str, Any]:
    """Config keys of the reward head: one output, the tokenizer's pad id and, with ``score_loglik``, the
    response log-likelihood term of align's decoder (DecoderConfig.score_loglik)."""
    from transformers import AutoConfig

    kw: dict[str, Any] = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}
    if score_loglik:
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type != "align_decoder":  # the shipped config turns it on; other models keep the linear head
            logger.warning("score_loglik applies to align's decoder only; %s is %r: linear score head", path, model_type)
            return kw
        kw |= {"score_loglik": True, "response_token_id": response_token_id(tokenizer)}
    return kw


def load_model(model_args: ModelConfig, head: dict[str, Any]):
    """A sequence-classification model with the head config ``head`` (``head_kwargs``); from a causal LM
    dir, the ``score`` head is new."""
    return AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, dtype=model_args.dtype or "float32", **head
    )


# ------------------------------------------------------------------------------------------ train
# --- soft labels (annotator-aware export of align.store: p_chosen = P(chosen beats rejected), weight) ---
SOFT_COLUMNS = ("p_chosen", "weight")


class SoftLabelRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose loss, when the batch has ``p_chosen`` (and ``weight``), is the Bradley-Terry
    log-loss against the soft label, d = r(chosen) − r(rejected):
        loss = Σ w · [−p·logσ(d) − (1−p)·logσ(−d)] / Σ w      (w = 1 without ``weight``)
    With p = 1 and w = 1 it is TRL's loss. Batches without ``p_chosen`` use TRL's loss unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.data_collator

        def collate(examples: list[dict]) -> dict:
            out = base([{k: v for k, v in e.items() if k not in SOFT_COLUMNS} for e in examples])
            for k in SOFT_COLUMNS:
                if k in examples[0]:
                    out[k] = torch.tensor([e[k] for e in examples], dtype=torch.float)
            return out
        self.data_collator = collate

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *SOFT_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p, w = inputs.pop("p_chosen", None), inputs.pop("weight", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if p is not None:
            r_c, r_r = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)  # (B,), (B,)
            d = r_c - r_r
            per_pair = -(p * torch.nn.functional.logsigmoid(d) + (1 - p) * torch.nn.functional.logsigmoid(-d))
            w = torch.ones_like(per_pair) if w is None else w
            loss = (w * per_pair).sum() / w.sum().clamp_min(1e-8)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)
        return (loss, outputs) if return_outputs else loss


def train(args: RewardArguments, model_args: ModelConfig, training_args: RewardConfig) -> dict[str, Any]:
    t0 = time.time()
    if not model_args.model_name_or_path:
        raise ValueError("reward needs model_name_or_path: an SFT/pretrain run's final/ dir or any HF model dir")
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or model_args.model_name_or_path)
    torch.manual_seed(training_args.seed)
    head = head_kwargs(model_args.model_name_or_path, tokenizer, args.score_loglik)
    model = load_model(model_args, head)
    out = Path(training_args.output_dir)
    write_config(out, args, model_args, training_args)

    splits, info = load_pairs(args)
    max_length = training_args.max_length
    train_pairs, dropped_train = clean_pairs(splits["train"], tokenizer, max_length)
    test_pairs, dropped_test = clean_pairs(splits["test"], tokenizer, max_length)
    if args.max_train_pairs:
        train_pairs = train_pairs[: args.max_train_pairs]
    if args.bootstrap:  # each ensemble member sees another resample of the same labels
        rng = random.Random(f"{training_args.seed}:bootstrap")
        train_pairs = [rng.choice(train_pairs) for _ in train_pairs]
    data_report = {
        **info,
        "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
        "distinct_train_pairs": len({id(p) for p in train_pairs}),
        "dropped_train": dict(dropped_train), "dropped_test": dict(dropped_test),
        "drop_rule": f"identical chosen/rejected, an empty response, or chosen/rejected over max_length={max_length} "
                     "tokens (dropped, not truncated)",
    }
    for name, d in (("train", dropped_train), ("test", dropped_test)):
        if d:
            logger.warning("%s: dropped %s", name, dict(d))
    if not train_pairs:
        raise ValueError(f"no training pairs left after dropping bad pairs: {data_report}")
    logger.info("reward model on %d train / %d test pairs from %s", len(train_pairs), len(test_pairs), args.dataset_name)

    peft_config = lora_config(model_args, model) if model_args.use_peft else None
    columns = ["chosen_ids", "rejected_ids"] + (["margin"] if args.margin != "none" else [])  # pre-tokenized
    columns += [c for c in SOFT_COLUMNS if all(c in p for p in train_pairs + test_pairs)]
    to_ds = lambda ps: Dataset.from_list([{k: p[k] for k in columns} for p in ps])  # noqa: E731
    trainer = SoftLabelRewardTrainer(
        model=model,
        args=training_args,
        train_dataset=to_ds(train_pairs),
        eval_dataset=to_ds(test_pairs) if test_pairs and training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsCallback(out, title=f"reward {out.name}")],
    )
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logger.info("%.2fM params, %.2fM trained%s", n_params / 1e6, n_train / 1e6, " (LoRA + score head)" if peft_config else "")
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(out, training_args.resume_from_checkpoint))
    train_seconds = time.time() - t0

    # final/: a standalone seq-cls model (LoRA merged, score head kept), consolidated under ZeRO-3/FSDP
    final = save_final(trainer, tokenizer, out / "final", adapter_dir=out / "adapter",
                       auto_class=AutoModelForSequenceClassification, **head)
    if peft_config is not None and trainer.is_world_process_zero():
        write_json(out / "adapter" / HEAD_FILE, head)  # what the adapter's base needs to take its score head
    if not trainer.is_world_process_zero():
        return {"train_loss": result.training_loss}
    with zero3_init_disabled():
        model = AutoModelForSequenceClassification.from_pretrained(str(final)).to(trainer.args.device).eval()

    ev: dict[str, Any] = {}
    curves: dict[str, dict[str, Any]] = {}
    if test_pairs:
        m = pair_margins(model, tokenizer, test_pairs, args.eval_batch_size, max_length)
        ev = margin_metrics(m)
        curves["held-out split"] = ev
    if args.eval_world:
        w = evaluate_world(model, tokenizer, args.world_seed, args.eval_world_prompts, args.eval_batch_size, max_length)
        ev["world"] = w
        ev["accuracy_world"] = w["accuracy"]
        ev["accuracy_style"] = w["accuracy_style"]
        ev["accuracy_correctness"] = w["accuracy_correctness"]
        curves["world held-out prompts"] = w
        if not test_pairs:
            ev.setdefault("accuracy", w["accuracy"])
            ev.setdefault("mean_margin", w["mean_margin"])
    ev["data"] = data_report
    plot = calibration_plot(curves, out / "calibration.png")
    if plot:
        ev["calibration_png"] = str(plot)
    write_json(out / "eval.json", ev)
    logger.info(
        "held-out accuracy %s, world: style %s correctness %s",
        _fmt(ev.get("accuracy")), _fmt(ev.get("accuracy_style")), _fmt(ev.get("accuracy_correctness")),
    )
    summary = {"train_loss": result.training_loss, "params": n_params, "trained_params": n_train,
               "train_seconds": round(train_seconds, 1), "data": data_report, "eval": ev}
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "eval"})
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
