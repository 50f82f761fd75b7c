"""Preference optimisation: ``python -m align.dpo configs/dpo.yaml [--key value ...]``.

TRL's ``DPOTrainer`` (every ``loss_type`` it has, mixed with ``loss_weights``), and through the same
command ``KTOTrainer`` (``trainer: kto``, unpaired data; ``configs/kto.yaml``), SimPO/CPO and ORPO
(``trainer: simpo | cpo | orpo``, from ``trl.experimental``; reference-free).

Policy: an SFT run's ``final/`` or any HF causal LM dir / hub id. LoRA by default (``use_peft: true``):
the reference is the same weights with the adapter disabled (``ref_model=None`` + ``peft_config``), so
there is no second copy in memory; ``use_peft: false`` trains every weight against a frozen copy
(TRL loads it from ``model_name_or_path``, or from ``ref_model_name_or_path``).

Data (``dataset_name``):
- ``store`` (default): the labelled comparisons of the preference store at ``store_url``, aggregated over
  annotators (``store_min_labels``, ``store_min_agreement``, ``store_kinds``, ``store_annotators``,
  ``store_sources``). Comparisons whose majority is a tie, or "both bad", are dropped (no pair to learn
  from); with ``trainer: kto`` and ``store_both_bad: negatives`` both responses become undesirable examples.
- a preference file in any format the store imports (``align.data.formats``) or a ``datasets`` dir;
- ``world``: the built-in world's rule-labelled pairs.
The test split is deterministic: a ``test_fraction`` share of *prompts*, chosen by a hash of the prompt
(``align.data.prompts``: the reward model holds out the same prompts of the same data).

Every run writes ``output_dir/``: ``config.yaml``, ``metrics.jsonl`` + ``metrics.png``, checkpoints (a
killed run resumes from the last one when re-run), ``adapter/`` (LoRA), ``final/`` (a standalone model,
adapter merged), ``eval.json`` + ``compare.png``: TRL's reward accuracy and margin on the test split, the
win rate against the starting policy judged by a reward model (on held-out world prompts, or the test
split's prompts for other data), and, where the world's checks apply (its data, or align's decoder), exact
match and preferred rate before and after.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, TrainerCallback
from trl import DPOConfig, ModelConfig

from align.config import parse, peek, run_command
from align.evaluate import compare_plot, world_eval_applies
from align.judge import judge, sample_replies
from align.models import check_exists, load, load_tokenizer
from align.preference_trainers import (
    TRAINERS,
    LogpsDropWarning,
    build_trainer,
    trainer_args,
    trainer_config_class,
)
from align.preferences import (
    PreferenceDataArguments,
    fit_max_length,
    heldout_prompts,
    load_preferences,
    soft_label_columns,
)
from align.runs import MetricsCallback, setup_logging
from align.stage import StageResult, run_stage

logger = logging.getLogger("align.dpo")

@dataclass
class DPOArguments(PreferenceDataArguments):
    trainer: str = field(
        default="dpo",
        metadata={"help": "dpo (DPOTrainer, any loss_type) | kto (KTOTrainer, unpaired) | simpo | cpo | orpo "
                          "(trl.experimental, reference-free)."},
    )
    store_both_bad: str = field(
        default="drop",
        metadata={"help": "'both bad' majorities: 'drop' (default), or 'negatives' (KTO only: both responses "
                          "become undesirable examples). Ties are always dropped."},
    )
    max_train_samples: int = field(default=0, metadata={"help": "Use at most this many training rows (0 = all)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; defaults to model_name_or_path's."}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An explicit reference model (full fine-tuning). Default: LoRA -> the adapter-disabled "
                          "policy; use_peft false -> a frozen copy of model_name_or_path."},
    )
    merge_adapter: bool = field(
        default=True, metadata={"help": "LoRA: write the merged standalone model to final/ (adapter in adapter/)."}
    )
    reward_model_path: str | None = field(
        default="runs/quickstart/reward/final",
        metadata={"help": "Reward model judging win_rate_vs_sft (empty / missing dir: skipped)."},
    )
    win_rate_num_prompts: int = field(default=200, metadata={"help": "Prompts for win_rate_vs_sft (0 skips it)."})
    win_rate_prompts: str | None = field(
        default=None,
        metadata={"help": "Where the win-rate prompts come from: 'world' (held-out built-in prompts) or 'test' (the "
                          "prompts of the data's test split). Default: 'world' where the world's checks apply "
                          "(eval_world), else 'test'."},
    )
    eval_world: bool | None = field(
        default=None,
        metadata={"help": "Exact match / preferred rate on the world's held-out prompts, before and after. Default: "
                          "when the data is the world's or the model is align's decoder."},
    )
    eval_num_prompts: int = field(
        default=200, metadata={"help": "Held-out world prompts for exact match / preferred rate (0 skips it)."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length in the evaluations."})
    warn_logps_drop: float = field(
        default=5.0,
        metadata={"help": "Warn when logps/chosen falls more than max(this many nats, 25% of its first value) "
                          "below its first logged value: the policy is un-learning the preferred answers."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.store_both_bad not in ("drop", "negatives"):
            raise ValueError(f"store_both_bad must be 'drop' or 'negatives', got {self.store_both_bad!r}")
        if self.store_both_bad == "negatives" and self.trainer != "kto":
            raise ValueError("store_both_bad: 'negatives' needs unpaired data, i.e. trainer: kto")
        for name in ("max_train_samples", "win_rate_num_prompts", "eval_num_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.win_rate_prompts not in (None, "world", "test"):
            raise ValueError(f"win_rate_prompts must be 'world' or 'test', got {self.win_rate_prompts!r}")


CONFIG_TYPES = (DPOArguments, ModelConfig, DPOConfig)


def config_types(trainer: str) -> tuple[type, ...]:
    """The dataclasses a run parses into. For trainers other than DPO the DPOConfig is parsed too, so that
    configs/dpo.yaml (whose loss_type is a list) also runs with ``--trainer simpo`` etc."""
    if trainer == "dpo":
        return CONFIG_TYPES
    return (DPOArguments, ModelConfig, DPOConfig, trainer_config_class(trainer))


# --------------------------------------------------------------------------------------------------
# Data


def load_preference_rows(args: DPOArguments) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``({"train": rows, "test": rows}, info)``: conversational prompt/chosen/rejected rows, or
    prompt/completion/label for KTO."""
    splits, info = load_preferences(args, unpaired=args.trainer == "kto", both_bad=args.store_both_bad,
                                    extra=soft_label_columns if args.trainer == "dpo" else None)  # soft labels
    if args.max_train_samples:
        splits["train"] = splits["train"][: args.max_train_samples]
    info.update(train_rows=len(splits["train"]), test_rows=len(splits["test"]))
    return splits, info


# --------------------------------------------------------------------------------------------------
# Evaluation


def win_rate_prompts(args: DPOArguments, splits: dict[str, list[dict]], world: bool) -> list[Any]:
    """Held-out world prompts (strings), or the distinct prompts of the test split."""
    if (args.win_rate_prompts or ("world" if world else "test")) == "world":
        from align.data.world import World

        return [e.prompt for e in World(seed=args.world_seed).eval_prompts(args.win_rate_num_prompts)]
    out = heldout_prompts(splits, args.win_rate_num_prompts)
    if not out:
        logger.warning("win rate: the data has no test split (test_fraction > 0): skipped")
    return out


def _world_eval(model, tokenizer, args: DPOArguments, seed: int) -> dict[str, Any]:
    from align.data.world import World
    from align.evaluate import evaluate

    examples = World(seed=args.world_seed).eval_prompts(args.eval_num_prompts)
    return evaluate(model, tokenizer, examples, max_new_tokens=args.eval_max_new_tokens, seed=seed)


def _reusable_before(model_path: str, args: DPOArguments, seed: int) -> dict[str, Any] | None:
    """``<model_dir>/../eval.json`` (the SFT run's own evaluation) if it is on the same held-out prompts."""
    from align.data.world import World
    from align.evaluate import SAMPLES_PER_PROMPT

    path = Path(model_path).parent / "eval.json"
    if not Path(model_path).is_dir() or not path.exists():
        return None
    try:
        ev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    examples = World(seed=args.world_seed).eval_prompts(args.eval_num_prompts)
    samples = ev.get("samples") or []
    same = (
        ev.get("num_prompts") == len(examples)
        and samples
        and all(s.get("prompt") == ex.prompt for s, ex in zip(samples, examples))
        and all(k in ev for k in ("exact_match", "exact_match_sampled", "preferred_rate"))
        and ev.get("samples_per_prompt") == SAMPLES_PER_PROMPT
    )
    if not same:
        logger.info("%s is on other prompts or sampling: evaluating the start policy again", path)
        return None
    logger.info("start policy's figures reused from %s", path)
    return ev | {"source": str(path)}


# --------------------------------------------------------------------------------------------------
# Training


def train(
    args: DPOArguments,
    model_args: ModelConfig,
    training_args: DPOConfig,
    trainer_config: Any | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> StageResult:
    """Run DPO (or KTO/SimPO/CPO/ORPO). ``result.eval``: the world figures (where they apply), ``win_rate_vs_sft``
    and ``mean_reward``, TRL's ``reward_accuracy`` / ``reward_margin``; ``result.before``: the start's."""
    start = check_exists(model_args.model_name_or_path)
    if args.ref_model_name_or_path:
        check_exists(args.ref_model_name_or_path, "ref_model_name_or_path")
    args.check_data()
    targs = trainer_args(args, training_args, trainer_config)
    seed = targs.seed
    splits, data = load_preference_rows(args)
    logger.info("data: %s", data)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or start)
    splits, data["over_max_length"] = fit_max_length(splits, tokenizer, targs.max_length)
    if any(v["cut"] or v["no_reply"] for v in data["over_max_length"].values()):
        logger.warning("rows over max_length=%s: 'cut' lose their reply's end (TRL keeps the start), 'no_reply' "
                       "(the prompt fills max_length) are dropped: %s", targs.max_length, data["over_max_length"])
    torch.manual_seed(seed)
    model = load(start, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    ref_model = load(args.ref_model_name_or_path, dtype=model_args.dtype,
                     attn_implementation=model_args.attn_implementation) if args.ref_model_name_or_path else None
    if ref_model is not None and model_args.use_peft:
        logger.warning("ref_model_name_or_path with use_peft: the explicit reference is used, not the base weights")

    world = world_eval_applies(args.eval_world, args.dataset_name, start) and args.eval_num_prompts > 0
    rm_path = args.reward_model_path
    if args.win_rate_num_prompts and rm_path and not Path(rm_path).exists():
        logger.warning("reward_model_path %s does not exist: win_rate_vs_sft skipped", rm_path)
        rm_path = None
    wr_prompts = win_rate_prompts(args, splits, world) if args.win_rate_num_prompts and rm_path else []

    def evaluate(policy: PreTrainedModel, before: dict | None) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        if world:
            ev |= (before is None and _reusable_before(start, args, seed)) or _world_eval(policy, tokenizer, args, seed)
        if wr_prompts:
            ev["replies"] = sample_replies(policy, tokenizer, wr_prompts, args.eval_max_new_tokens, seed)
        if wr_prompts and before is not None:
            ev |= judge(rm_path, wr_prompts, before["replies"], ev["replies"])
        return ev

    drop_cb = LogpsDropWarning(args.warn_logps_drop)

    def make_trainer():
        out = Path(targs.output_dir)
        cbs = [MetricsCallback(out, title=f"{args.trainer} {out.name}"), drop_cb, *(callbacks or [])]
        return build_trainer(args, model_args, targs, model, tokenizer, splits, cbs, ref_model)

    def log(result: StageResult) -> None:
        result.extra["logps_warnings"] = drop_cb.warnings
        if result.eval is not None:
            result.eval["over_max_length"] = data["over_max_length"]
        ev, before = result.eval or {}, result.before or {}
        if "preferred_rate" in ev and "preferred_rate" in before:
            compare_plot({"start": before, args.trainer: ev}, result.output_dir / "compare.png",
                         title=f"{args.trainer}: held-out world prompts")
        _log_summary(result)

    return run_stage(args.trainer, (args, model_args, targs), make_trainer, tokenizer, start=start,
                     start_model=model if (world or wr_prompts) else None, evaluate=evaluate, data=data,
                     trainer_eval=True, save_kwargs={"merge": args.merge_adapter}, log=log)


def _log_summary(result: StageResult) -> None:
    ev, b = result.eval or {}, result.before or {}
    parts = []
    if "preferred_rate" in ev and "preferred_rate" in b:
        parts.append(
            f"preferred rate {b['preferred_rate']:.3f} -> {ev['preferred_rate']:.3f}, exact match "
            f"{b['exact_match']:.3f} -> {ev['exact_match']:.3f} (sampled {b['exact_match_sampled']:.3f} -> "
            f"{ev['exact_match_sampled']:.3f})"
        )
    if ev.get("win_rate_vs_sft") is not None:
        parts.append(f"win rate vs start {ev['win_rate_vs_sft']:.3f}")
    if ev.get("reward_accuracy") is not None:
        parts.append(f"test reward accuracy {ev['reward_accuracy']:.3f}, margin {ev['reward_margin']:.3f}")
    logger.info("done in %.0fs (%d steps): %s", result.wall_seconds, result.steps, "; ".join(parts))


def peek_trainer(argv: Sequence[str]) -> str:
    """The ``trainer`` key (command line over the config file) before the full parse: it picks the config classes."""
    trainer = peek(CONFIG_TYPES, argv, "trainer")
    return trainer if trainer in TRAINERS else "dpo"  # an unknown value: DPOArguments names it


def main(argv: list[str] | None = None) -> StageResult:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse(config_types(peek_trainer(argv)), argv)
    return train(*parsed)


if __name__ == "__main__":
    run_command(main)
