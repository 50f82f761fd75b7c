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

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import ModelConfig, RewardConfig, RewardTrainer

from align.config import parse, run_command
from align.data.formats import DataError
from align.data.prompts import as_messages
from align.evaluate import world_eval_applies
from align.models import HEAD_FILE, check_exists, load, load_tokenizer, model_type, peft_config
from align.preferences import SOFT_COLUMNS, PreferenceDataArguments, load_preferences, soft_label_columns
from align.reward_eval import calibration_plot, evaluate_world, margin_metrics, pair_margins
from align.runs import MetricsCallback, setup_logging, write_json
from align.score import encode
from align.soft_labels import SoftLabelRewardTrainer
from align.stage import StageResult, run_stage

logger = logging.getLogger("align.reward")

LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RewardArguments(PreferenceDataArguments):
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of prompts held out (by a hash of the prompt), in [0, 1).",
                               "aliases": ["test_size"]}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; defaults to model_name_or_path's."}
    )
    margin: str = field(
        default="none",
        metadata={"help": "Margin in the loss: 'none', 'scores' (score_chosen - score_rejected of the records, "
                  "times margin_scale) or the name of a numeric record field."},
    )
    margin_scale: float = field(default=1.0, metadata={"help": "Multiplier of the margin."})
    max_train_pairs: int = field(default=0, metadata={"help": "Use at most this many training pairs (0 = all)."})
    bootstrap: bool = field(
        default=False,
        metadata={"help": "Train on a bootstrap resample of the training pairs (as many, drawn with replacement, "
                          "seeded by seed): a member of a reward-model ensemble (align.score.RewardEnsemble)."},
    )
    eval_world: bool | None = field(
        default=None,
        metadata={"help": "Also evaluate on pairs built from the built-in world's held-out prompts. Default: when "
                          "the data is the world's or the model is align's decoder (the world's checks say nothing "
                          "about a real model's replies)."},
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
        super().__post_init__()
        if self.eval_world_prompts < 0 or self.max_train_pairs < 0:
            raise ValueError("eval_world_prompts and max_train_pairs must be >= 0")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.margin != "none" and self.dataset_name in ("store", "world"):
            raise ValueError(f"margin needs per-pair scores or fields; {self.dataset_name}'s pairs have none "
                             "(use margin: none)")


CONFIG_TYPES = (RewardArguments, ModelConfig, RewardConfig)


# ------------------------------------------------------------------------------------------ data
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
    def extra(pref: dict, rec: dict, where: str) -> dict:
        row = soft_label_columns(pref, rec, where)  # the store's soft-label export, where the file has it
        if args.margin != "none":
            row["margin"] = _margin_of(pref, rec, args, where)
        return row

    return load_preferences(args, extra=extra)


def clean_pairs(pairs: list[dict], tokenizer, max_length: int | None) -> tuple[list[dict], Counter]:
    """Drop (and count) identical pairs, empty responses and pairs over ``max_length`` tokens; the kept
    pairs get ``chosen_ids``/``rejected_ids`` (tokenized once, by ``align.score.encode``, as TRL would)."""
    kept, dropped = [], Counter()
    for p in pairs:
        prompt, chosen = as_messages(p["prompt"]), as_messages(p["chosen"], "assistant")
        rejected = as_messages(p["rejected"], "assistant")
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
    return peft_config(model_args, model)


def response_token_id(tokenizer) -> int:
    """The special token the chat template puts right before a response (``<|assistant|>`` here)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    if not ids or ids[-1] not in tokenizer.all_special_ids:
        raise ValueError(
            f"score_loglik: the chat template's generation prompt does not end in a special token (it ends in "
            f"{tokenizer.convert_ids_to_tokens(ids[-1:])}), so the response start cannot be found; "
            "use score_loglik: false"
        )
    return ids[-1]


def head_kwargs(path: str, tokenizer, score_loglik: bool = False) -> dict[str, Any]:
    """Config keys of the reward head: one output, the tokenizer's pad id and, with ``score_loglik``, the
    response log-likelihood term of align's decoder (DecoderConfig.score_loglik)."""
    kw: dict[str, Any] = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id}
    if score_loglik:
        kind = model_type(path)
        if kind != "align_decoder":  # the shipped config turns it on; other models keep the linear head
            logger.warning("score_loglik applies to align's decoder only; %s is %r: linear score head", path, kind)
            return kw
        kw |= {"score_loglik": True, "response_token_id": response_token_id(tokenizer)}
    return kw


# ------------------------------------------------------------------------------------------ train
def train(args: RewardArguments, model_args: ModelConfig, training_args: RewardConfig) -> StageResult:
    start = check_exists(model_args.model_name_or_path)
    args.check_data()
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or start)
    splits, info = load_pairs(args)
    max_length = training_args.max_length
    train_pairs, dropped_train = clean_pairs(splits["train"], tokenizer, max_length)
    test_pairs, dropped_test = clean_pairs(splits["test"], tokenizer, max_length)
    if args.max_train_pairs:
        train_pairs = train_pairs[: args.max_train_pairs]
    if args.bootstrap:  # each ensemble member sees another resample of the same labels
        rng = random.Random(f"{training_args.seed}:bootstrap")
        train_pairs = [rng.choice(train_pairs) for _ in train_pairs]
    data = {
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
        raise DataError(f"no training pairs left after dropping bad pairs: {data}")
    logger.info("reward model on %d train / %d test pairs from %s", len(train_pairs), len(test_pairs),
                args.dataset_name)

    torch.manual_seed(training_args.seed)
    head = head_kwargs(start, tokenizer, args.score_loglik)
    model = load(start, "reward", dtype=model_args.dtype or "float32",
                 attn_implementation=model_args.attn_implementation, **head)
    peft_config = lora_config(model_args, model) if model_args.use_peft else None
    columns = ["chosen_ids", "rejected_ids"] + (["margin"] if args.margin != "none" else [])  # pre-tokenized
    columns += [c for c in SOFT_COLUMNS if all(c in p for p in train_pairs + test_pairs)]  # soft labels
    data["soft_labels"] = "p_chosen" in columns

    def to_ds(pairs: list[dict]) -> Dataset:
        return Dataset.from_list([{k: p[k] for k in columns} for p in pairs])

    def make_trainer() -> RewardTrainer:
        out = Path(training_args.output_dir)
        trainer = SoftLabelRewardTrainer(
            model=model, args=training_args, train_dataset=to_ds(train_pairs),
            eval_dataset=to_ds(test_pairs) if test_pairs and training_args.eval_strategy != "no" else None,
            processing_class=tokenizer, peft_config=peft_config,
            callbacks=[MetricsCallback(out, title=f"reward {out.name}")],
        )
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        data.update(params=n_params, trained_params=n_train)
        logger.info("%.2fM params, %.2fM trained%s", n_params / 1e6, n_train / 1e6,
                    " (LoRA + score head)" if peft_config else "")
        return trainer

    eval_world = world_eval_applies(args.eval_world, args.dataset_name, start) and args.eval_world_prompts > 0

    def evaluate(rm, before) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        curves: dict[str, dict[str, Any]] = {}
        if test_pairs:
            ev = margin_metrics(pair_margins(rm, tokenizer, test_pairs, args.eval_batch_size, max_length))
            curves["held-out split"] = ev
        if eval_world:
            w = evaluate_world(rm, tokenizer, args.world_seed, args.eval_world_prompts, args.eval_batch_size,
                               max_length)
            ev |= {"world": w, "accuracy_world": w["accuracy"], "accuracy_style": w["accuracy_style"],
                   "accuracy_correctness": w["accuracy_correctness"]}
            curves["world held-out prompts"] = w
            if not test_pairs:
                ev.setdefault("accuracy", w["accuracy"])
                ev.setdefault("mean_margin", w["mean_margin"])
        ev["data"] = data
        plot = calibration_plot(curves, f"{training_args.output_dir}/calibration.png")
        if plot:
            ev["calibration_png"] = str(plot)
        logger.info("held-out accuracy %s, world: style %s correctness %s", _fmt(ev.get("accuracy")),
                    _fmt(ev.get("accuracy_style")), _fmt(ev.get("accuracy_correctness")))
        return ev

    def save(trainer, final):
        from align.distributed import save_final

        final = save_final(trainer, tokenizer, final, adapter_dir=final.parent / "adapter", **head)
        if peft_config is not None and trainer.is_world_process_zero():
            write_json(final.parent / "adapter" / HEAD_FILE, head)  # what the adapter's base needs for its head
        return final

    return run_stage("reward", (args, model_args, training_args), make_trainer, tokenizer, start=start,
                     evaluate=evaluate, head="reward", data=data, save=save)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> StageResult:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
