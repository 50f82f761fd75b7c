"""The TRL preference trainers ``align.dpo`` drives: which trainer, its config class and loss types, building it.

``trainer``: ``dpo`` (``DPOTrainer``, every ``loss_type`` it has, mixed with ``loss_weights``), ``kto``
(``KTOTrainer``, unpaired rows), ``simpo`` / ``cpo`` and ``orpo`` (``trl.experimental``, reference-free). With a
PEFT config and no explicit reference, the reference is the adapter-disabled policy. ``LogpsDropWarning``
watches for the DPO collapse.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import PreTrainedModel, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, ModelConfig

from align.config import ConfigError
from align.models import peft_config as checked_peft_config
from align.preferences import SOFT_COLUMNS
from align.soft_labels import SoftLabelDPOTrainer

logger = logging.getLogger("align.dpo")

TRAINERS = ("dpo", "kto", "simpo", "cpo", "orpo")
# Every loss TRL 1.16's DPOTrainer implements (trl/trainer/dpo_trainer.py, `_compute_loss`).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def trainer_config_class(trainer: str) -> type:
    if trainer == "dpo":
        return DPOConfig
    if trainer == "kto":
        return KTOConfig
    if trainer in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOConfig

        return CPOConfig
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


class LogpsDropWarning(TrainerCallback):
    """Warns when the chosen responses' log-probability falls steeply from its first logged value.

    The classic DPO failure on small models: the loss only needs chosen - rejected to grow, and it can do
    so by pushing *both* down; measured on a 4.2M-parameter Llama, sigmoid DPO took logps/chosen from -4 to
    -28 and wrecked the model. An SFT term (``loss_type: [sigmoid, sft]``, RPO) or a lower learning rate
    or higher beta prevents it."""

    def __init__(self, threshold: float = 5.0, fraction: float = 0.25, key: str = "logps/chosen"):
        self.threshold, self.fraction, self.key = threshold, fraction, key
        self.first: float | None = None
        self.warned_at: float | None = None
        self.warnings: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        v = (logs or {}).get(self.key)
        if v is None or not math.isfinite(v):
            return
        if self.first is None:
            self.first = v
            return
        limit = max(self.threshold, self.fraction * abs(self.first))
        drop = self.first - v
        if drop > limit and (self.warned_at is None or v < self.warned_at - limit):
            self.warned_at = v
            self.warnings.append({"step": state.global_step, "first": self.first, "now": v})
            logger.warning(
                "%s fell from %.2f to %.2f (-%.1f nats) by step %d: the policy is lowering the probability of "
                "the preferred responses (the DPO collapse). Add an SFT term (loss_type: [sigmoid, sft]), lower "
                "learning_rate or raise beta.", self.key, self.first, v, drop, state.global_step,
            )


def build_trainer(
    args: Any,
    model_args: ModelConfig,
    training_args: Any,
    model: PreTrainedModel,
    tokenizer,
    splits: dict[str, list[dict]],
    callbacks: list[TrainerCallback] | None = None,
    ref_model: PreTrainedModel | None = None,
):
    """The TRL trainer for ``args.trainer`` on conversational rows; ``training_args`` is the config that
    trainer takes (see ``trainer_args``). LoRA when ``model_args.use_peft`` (reference = adapter disabled)."""
    from datasets import Dataset

    # Soft labels (p_chosen, weight): kept where every row has them, and then DPO trains on them.
    rows = splits["train"] + splits["test"]
    soft = [c for c in SOFT_COLUMNS if all(c in r for r in rows)] if args.trainer == "dpo" else []
    if "p_chosen" not in soft:
        if args.trainer == "dpo" and any("p_chosen" in r for r in rows):
            n = sum("p_chosen" in r for r in rows)
            logger.warning("only %d of %d rows have p_chosen: soft labels ignored, hard labels used", n, len(rows))
        soft = []

    def to_ds(rows: list[dict]) -> Dataset:
        return Dataset.from_list([{k: v for k, v in r.items() if k not in SOFT_COLUMNS or k in soft} for r in rows])

    train_ds = to_ds(splits["train"])
    eval_ds = to_ds(splits["test"]) if splits["test"] else None
    peft_config = checked_peft_config(model_args, model)
    common = dict(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
    )
    if args.trainer == "dpo":
        if soft:
            logger.info("DPO on soft labels (%s)", ", ".join(soft))
        return (SoftLabelDPOTrainer if soft else DPOTrainer)(ref_model=ref_model, **common)
    if args.trainer == "kto":
        return KTOTrainer(ref_model=ref_model, **common)
    if args.trainer in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer(**common)
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(**common)


def trainer_args(args: Any, dpo_args: DPOConfig, extra: Any | None = None):
    """The config the chosen trainer takes; loss_type translated for SimPO/CPO."""
    if args.trainer == "dpo":
        bad = [t for t in dpo_args.loss_type if t not in DPO_LOSS_TYPES]
        if bad:
            raise ConfigError(f"loss_type: unknown {bad}; DPOTrainer supports {list(DPO_LOSS_TYPES)}")
        return dpo_args
    if extra is None or isinstance(extra, DPOConfig):
        name = trainer_config_class(args.trainer).__name__
        raise ValueError(f"trainer {args.trainer!r} needs its own config ({name})")
    cfg = extra
    if args.trainer == "orpo":  # ORPO has one loss (odds ratio + NLL, arXiv:2403.07691); beta is its lambda
        return cfg
    lt = cfg.loss_type if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    if args.trainer == "simpo":
        cfg.loss_type, cfg.cpo_alpha = "simpo", 0.0  # SimPO (arXiv:2405.14734): length-normalised, no NLL term
    elif args.trainer == "cpo":
        if isinstance(lt, list):
            if set(lt) <= {"sigmoid", "sft"}:
                lt = "sigmoid"  # CPO = sigmoid + cpo_alpha * NLL, the reference-free analogue of [sigmoid, sft]
            elif len(lt) == 1 and lt[0] in CPO_LOSS_TYPES:
                lt = lt[0]
            else:
                raise ConfigError(f"loss_type {lt}: CPO takes one of {list(CPO_LOSS_TYPES)}")
        if lt not in CPO_LOSS_TYPES:
            raise ConfigError(f"loss_type {lt!r}: CPO takes one of {list(CPO_LOSS_TYPES)}")
        cfg.loss_type = lt
    elif args.trainer == "kto":
        if isinstance(lt, list):  # a DPO list from configs/dpo.yaml: KTO's own loss
            lt = lt[0] if len(lt) == 1 and lt[0] in KTO_LOSS_TYPES else "kto"
        if lt not in KTO_LOSS_TYPES:
            raise ConfigError(f"loss_type {lt!r}: KTO takes one of {list(KTO_LOSS_TYPES)}")
        cfg.loss_type = lt
    return cfg
