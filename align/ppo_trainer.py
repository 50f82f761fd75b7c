"""PPO with a value head: the trainer and its config (the command is ``align.ppo``).

TRL dropped its PPO trainer (``trl.experimental.ppo``, trl 1.0-1.12, removed in 1.13); this module keeps the
same recipe in the project, the TRL way: a :class:`PPOConfig` dataclass on ``transformers.TrainingArguments``
(``help`` metadata, checked in ``__post_init__``) and a :class:`PPOTrainer` on ``transformers.Trainer`` (its
optimizer/scheduler creation, callbacks, ``log`` and ``TrainerState``), with TRL's ``selective_log_softmax``,
``entropy_from_logits`` and ``disable_dropout_in_model``.

One PPO iteration (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Stiennon et al. 2020; Huang et al.
"The N+ Implementation Details of RLHF with PPO", 2024, https://arxiv.org/abs/2403.17031):

1. Rollout: ``B = per_device_train_batch_size * gradient_accumulation_steps`` prompts; one reply each, sampled
   at ``temperature`` with top-k/top-p off, at most ``max_completion_length`` tokens. Replies are cut after the
   first EOS (the EOS is kept as the last action); a reply without EOS gets ``score -= missing_eos_penalty``
   (Huang et al. detail: penalise truncated replies instead of scoring them normally).
2. Scores: ``align.reward_funcs`` (rule rewards and/or the RM stage's reward model through ``RewardScorer``),
   weighted by ``reward_weights``, on the decoded reply.
3. Per-token reward ``r_t = -kl_coef * KL_t`` with ``KL_t = log pi(y_t) - log pi_ref(y_t)`` (k1, or the k3
   estimator), plus the score on the reply's last token. ``kl_coef`` is fixed, or adapted by Ziegler et al.'s
   ``AdaptiveKLController`` towards ``kl_target`` (``adaptive_kl``). The log-probs use logits / temperature,
   the same distribution the replies were sampled from (Huang et al. detail).
4. GAE (``gamma``, ``lam``) on the value head's estimates; returns = advantages + values; advantages whitened
   over the batch (``whiten_advantages``), rewards optionally whitened (``whiten_rewards``).
5. ``num_ppo_epochs`` passes over the rollout, each shuffled into ``num_mini_batches`` mini-batches (one
   optimizer step each, gradient accumulated over micro-batches of ``per_device_train_batch_size``): clipped
   policy loss (``cliprange``) + ``vf_coef`` * clipped value loss (``cliprange_value``), gradient clipping.

Models: the policy (full fine-tuning or LoRA via ``use_peft``); the reference is the policy with adapters
disabled under LoRA, else a frozen copy; dropout is disabled everywhere. The value model is either
- a linear head on the policy's last hidden states (:class:`PolicyWithValueHead`, the default: one forward
  gives logits and values, as OpenAI's lm-human-preferences and TRL's old ``AutoModelForCausalLMWithValueHead``
  did; under LoRA the value gradient moves the adapters too), or
- a separate model, ``value_model_path``: a sequence-classification model, usually the RM stage's, fully
  trained (:class:`PolicyAndValueModel`, as Huang et al. 2024 and TRL 1.12 do; twice the compute).
Either critic can train at its own ``value_learning_rate`` (OpenRLHF's separate critic learning rate).

Departures from the references: (a) the default value head shares the policy's trunk (above); (b) the score
sits on the reply's last real token (EOS) and values are masked after it (TRL 1.12 put it one position later,
on the first padding slot); (c) no reward-model normalisation from a calibration set (Ziegler et al. normalise
RM outputs; rule rewards are in [0, 1] already); (d) the learning-rate schedule steps once per PPO iteration, as
in TRL.

Under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3; docs/distributed.md), as TRL 1.12 did: each process rolls
out its own ``B`` prompts of the global batch of ``B * num_processes`` (with its own sampling seed), scores them and
computes its GAE; the advantage (and reward) whitening uses the mean and variance of the global batch (sums
all-reduced); the policy and its critic are one module prepared by accelerate (DDP all-reduces the gradients,
DeepSpeed shards them); generation under ZeRO-3 gathers the weights (TRL's ``unwrap_model_for_generation``); the
frozen reference copy is a DeepSpeed inference engine (TRL's ``prepare_deepspeed``: sharded under ZeRO-3); the
logged figures and the adaptive KL are means over processes; rank 0 writes logs, checkpoints (DeepSpeed: every rank
its shard) and ``final/``.

Logged per iteration (``metrics.jsonl``, names as TRL 1.12): ``objective/scores``, ``rewards/<name>/mean``,
``objective/kl`` (mean per-reply KL), ``objective/kl_coef``, ``objective/entropy`` (per-reply NLL sum),
``policy/entropy_avg`` (per-token entropy), ``objective/non_score_reward``, ``objective/rlhf_reward``,
``loss/policy_avg``, ``loss/value_avg``, ``policy/clipfrac_avg``, ``val/clipfrac_avg``, ``policy/approxkl_avg``,
``val/ratio``, ``val/frac_missing_eos``. Checkpoints (trainable weights incl. the value head, optimizer,
scheduler, state, KL coefficient, RNG) every ``save_steps``; a re-run resumes from the last one. ``final/`` is
the policy alone (LoRA merged), a standalone causal LM.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from accelerate.utils import AutocastKwargs
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations.deepspeed import deepspeed_init, deepspeed_load_checkpoint, is_deepspeed_zero3_enabled
from transformers.trainer_utils import TrainOutput
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model, selective_log_softmax_and_entropy

from align import reward_funcs as R
from align.generate import prompt_ids
from align.logprobs import keep_kwargs, last_positions, left_pad, masked_inputs, response_mask

logger = logging.getLogger("align.ppo")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class PPOConfig(TrainingArguments):
    """``TrainingArguments`` plus PPO's knobs. The rollout batch is ``per_device_train_batch_size *
    gradient_accumulation_steps`` prompts; ``max_steps`` counts PPO iterations (rollout + update)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (TRL 1.12 default 3e-6)."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Trade compute for memory (gradient_checkpointing is the old name)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N PPO iterations."})
    max_completion_length: int = field(default=32, metadata={"help": "Most tokens per sampled reply."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Mini-batches (optimizer steps) per PPO epoch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon: [1-eps, 1+eps]."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip: |V - V_old| <= cliprange_value."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty coefficient (initial, if adaptive)."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Ziegler et al.'s adaptive KL coefficient."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL: target per-reply KL (nats)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL: horizon in episodes."})
    kl_estimator: str = field(default="k1", metadata={"help": "'k1' (log-ratio) or 'k3' (ratio-1-log ratio)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages over the batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Normalise per-token rewards (scale only)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of replies that hit max_completion_length."}
    )
    stop_token: str | None = field(default="eos", metadata={"help": "'eos': replies end at the EOS; None: never."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward_funcs entry (default 1 each)."}
    )
    total_episodes: int | None = field(
        default=None, metadata={"help": "Replies to roll out in all; used when max_steps <= 0."}
    )
    value_head_std: float = field(default=0.0, metadata={"help": "Init std of the value head (0: zeros)."})
    value_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the value head or value model (None: learning_rate). "
                                        "At a policy's small rate a zero-initialised head barely fits the returns."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Turn off dropout in policy and reference."})

    def __post_init__(self):
        super().__post_init__()
        checks = {
            "num_ppo_epochs": self.num_ppo_epochs >= 1,
            "num_mini_batches": self.num_mini_batches >= 1,
            "max_completion_length": self.max_completion_length >= 1,
            "temperature": self.temperature > 0,
            "cliprange": self.cliprange > 0,
            "cliprange_value": self.cliprange_value > 0,
            "vf_coef": self.vf_coef >= 0,
            "gamma": 0 <= self.gamma <= 1,
            "lam": 0 <= self.lam <= 1,
            "kl_coef": self.kl_coef >= 0,
            "kl_target": self.kl_target > 0,
            "kl_horizon": self.kl_horizon > 0,
            "kl_estimator": self.kl_estimator in ("k1", "k3"),
            "value_learning_rate": self.value_learning_rate is None or self.value_learning_rate > 0,
            "stop_token": self.stop_token in ("eos", None),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid PPO setting(s): " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if self.batch_size_total % self.num_mini_batches:
            raise ValueError(
                f"the rollout batch (per_device_train_batch_size * gradient_accumulation_steps = "
                f"{self.batch_size_total}) must divide by num_mini_batches ({self.num_mini_batches})"
            )
        if self.whiten_rewards and self.batch_size_total // self.num_mini_batches < 8:
            raise ValueError("whiten_rewards needs mini-batches of at least 8 replies")

    @property
    def batch_size_total(self) -> int:
        """Prompts per process and iteration (the global batch is this times the number of processes)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------- the maths


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: beta <- beta * (1 + K_beta * e_t * n / horizon),
    e_t = clip(KL/target - 1, +-0.2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased var); ``shift_mean=False`` keeps the mean.
    ``all_reduce`` (a sum over processes) makes mean and variance those of the global batch."""
    reduce = all_reduce or (lambda t: t)
    total, n = reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = (total / n.clamp(min=1)).to(x.dtype)
    sq = reduce(((x - mean) ** 2 * mask).sum().double())
    var = (sq / (n - 1).clamp(min=1)).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) per-token rewards and values.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1};  V and r are 0 past the mask,
    so the last real token bootstraps from 0. Returns (advantages, returns = advantages + values), 0 past the mask.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.size(1)
    last = torch.zeros_like(rewards[:, 0])
    adv = []
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv.append(last)
    advantages = torch.stack(adv[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def ppo_losses(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, vpred: torch.Tensor,
    old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float, cliprange_value: float,
) -> dict[str, torch.Tensor]:
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017), all (B, T), masked."""
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    vf1, vf2 = (vpred - returns) ** 2, (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        stats = {
            "pg_clipfrac": masked_mean((pg2 > pg1).float(), mask),
            "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, **stats}


# ----------------------------------------------------------------------------------------------- models


class _PolicyAndCritic(nn.Module):
    """What both critics share: trl's ``unwrap_model_for_generation`` turns activation checkpointing off around
    ``generate`` through these."""

    policy: nn.Module

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_activation_checkpointing", False))

    def gradient_checkpointing_disable(self) -> None:
        self.policy.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.policy.activation_checkpointing_enable(gradient_checkpointing_kwargs)


class PolicyWithValueHead(_PolicyAndCritic):
    """The policy plus a linear value head on its last hidden states: ``forward -> (logits, values)``,
    (B, S, V), (B, S)."""

    def __init__(self, policy: nn.Module, init_std: float = 0.0):
        super().__init__()
        self.policy = policy
        config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        self.value_head = nn.Linear(config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=init_std) if init_std > 0 else nn.init.zeros_(
            self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(**masked_inputs(self.policy, input_ids, attention_mask), output_hidden_states=True,
                          use_cache=False, **keep_kwargs(self.policy, logits_to_keep))
        h = last_positions(out.hidden_states[-1], logits_to_keep)
        values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)
        return last_positions(out.logits, logits_to_keep), values

    def critic(self) -> nn.Module:
        return self.value_head


class PolicyAndValueModel(_PolicyAndCritic):
    """The policy plus a separate value model: ``forward -> (logits, values)``, (B, S, V), (B, S).

    The value model is a sequence-classification model (TRL 1.12's ``PolicyAndValueWrapper``): its backbone's
    last hidden states go through its ``score`` head at every position, not only at the last token."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.config = policy.config
        prefix, head = getattr(value_model, "base_model_prefix", ""), getattr(value_model, "score", None)
        if not isinstance(getattr(value_model, prefix, None), nn.Module) or not isinstance(head, nn.Linear):
            raise ValueError(f"value model {type(value_model).__name__}: need a sequence-classification model with a "
                             f"backbone at .{prefix or '<base_model_prefix>'} and a linear .score head")
        if head.out_features != 1:
            raise ValueError(f"value model {type(value_model).__name__}: its score head has {head.out_features} "
                             "labels, a value needs 1")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(**masked_inputs(self.policy, input_ids, attention_mask), use_cache=False,
                             **keep_kwargs(self.policy, logits_to_keep)).logits
        logits = last_positions(logits, logits_to_keep)
        backbone = getattr(self.value_model, self.value_model.base_model_prefix)
        h = backbone(**masked_inputs(backbone, input_ids, attention_mask), use_cache=False).last_hidden_state
        h = last_positions(h, logits_to_keep)
        score = self.value_model.score  # a plain linear map per position (ScoreHead's loglik term needs a whole reply)
        return logits, nn.functional.linear(h.to(score.weight.dtype), score.weight, score.bias).squeeze(-1)

    def critic(self) -> nn.Module:
        return self.value_model


@dataclass
class Rollout:
    """One batch of sampled replies and everything PPO needs about them; tensors are (B, T) unless noted."""

    query_responses: torch.Tensor  # (B, L + T) left-padded prompt + reply (padding after EOS)
    attention_mask: torch.Tensor  # (B, L + T)
    context_length: int  # L
    mask: torch.Tensor  # reply tokens up to and including the first EOS
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # (B,) weighted reward (after the missing-EOS penalty)
    kl: torch.Tensor  # per-token KL estimate
    stats: dict[str, float]
    completions: list[str]


# ----------------------------------------------------------------------------------------------- trainer


class PPOTrainer(Trainer):
    """PPO for causal LMs on ``transformers.Trainer``: ``train()`` runs rollout + update iterations."""

    def __init__(
        self,
        model: nn.Module,
        args: PPOConfig,
        processing_class: PreTrainedTokenizerBase,
        reward_funcs: Sequence[Any],
        train_dataset,
        peft_config: Any = None,
        ref_model: nn.Module | None = None,
        value_model: nn.Module | None = None,
        callbacks: list | None = None,
    ):
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft = hasattr(model, "disable_adapter")
        if self.is_peft:
            self.ref_model = None
        else:
            if ref_model is None and is_deepspeed_zero3_enabled():
                # a ZeRO-3 partitioned model cannot be deep-copied: reload the start model, partitioned (as TRL does)
                from align.models import load

                ref_model = load(model.config._name_or_path, dtype=model.dtype)
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False).eval()
        if args.disable_dropout:
            for m in (model, self.ref_model, value_model):
                if m is not None:
                    disable_dropout_in_model(m)
        if args.activation_checkpointing:
            model.activation_checkpointing_enable()
        self.reward_funcs = R.build_reward_funcs(reward_funcs) if reward_funcs and isinstance(reward_funcs[0], str) \
            else [R.checked(f) if not hasattr(f, "__wrapped__") else f for f in reward_funcs]
        self.reward_weights = R.validate_weights([f.__name__ for f in self.reward_funcs], args.reward_weights)
        wrapper = (PolicyWithValueHead(model, init_std=args.value_head_std) if value_model is None
                   else PolicyAndValueModel(model, value_model))
        super().__init__(model=wrapper, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=lambda rows: rows, callbacks=callbacks)
        self.policy = model
        if self.is_fsdp_enabled:  # generation would need the FSDP shards gathered, which is not wired up
            raise ValueError("align.ppo runs under DDP and DeepSpeed ZeRO-2/3, not FSDP: launch it with "
                             "configs/accelerate/ddp.yaml, zero2.yaml or zero3.yaml (docs/distributed.md)")
        if self.ref_model is not None:  # DeepSpeed: an inference engine (ZeRO-3: sharded, else replicated)
            self.ref_model = (prepare_deepspeed(self.ref_model, self.accelerator) if self.is_deepspeed_enabled
                              else self.ref_model.to(args.device))
        self.kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl
                       else FixedKLController(args.kl_coef))
        tok = processing_class
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id if args.stop_token == "eos" else None
        B = args.batch_size_total * args.world_size  # the global batch
        if args.max_steps and args.max_steps > 0:
            self.num_updates = args.max_steps
        elif args.total_episodes:
            self.num_updates = math.ceil(args.total_episodes / B)
        else:
            self.num_updates = math.ceil(args.num_train_epochs * len(train_dataset) / B)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Trainer's optimizer; with ``value_learning_rate`` the critic's weights get their own group at that rate."""
        fresh = self.optimizer is None
        opt = super().create_optimizer(model)
        if fresh and self.args.value_learning_rate is not None:
            critic = [p for p in self.model.critic().parameters() if p.requires_grad]
            ids = {id(p) for p in critic}
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            opt.add_param_group({"params": critic, "lr": self.args.value_learning_rate, "weight_decay": 0.0})
        return opt

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """pi_ref: the policy with its adapters disabled (LoRA), else the frozen copy (a DeepSpeed engine under
        DeepSpeed)."""
        if self.is_peft:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.ref_model

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (the identity in one process)."""
        return self.accelerator.reduce(t, reduction="sum") if self.accelerator.num_processes > 1 else t

    def _mean_over_processes(self, stats: dict[str, float]) -> dict[str, float]:
        """Each figure's mean over processes (their batches are of equal size, so the global batch's mean)."""
        if self.accelerator.num_processes == 1:
            return stats
        keys = sorted(stats)
        t = self._sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.args.device))
        return {k: v / self.accelerator.num_processes for k, v in zip(keys, t.tolist())}

    def _logprobs(self, logits: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs of ``responses`` and per-token entropies (no gradient) under ``logits / temperature``,
        in one pass over the vocabulary: TRL's fused Triton kernel on CUDA (fp32 inside, so bf16 logits go in as
        they are), else in fp32 by ``selective_log_softmax`` and ``entropy_from_logits``."""
        if not logits.is_cuda:
            logits = logits.float()
        return selective_log_softmax_and_entropy(logits, responses, entropy_requires_grad=False,
                                                 temperature=self.args.temperature)

    def _rows(self, update: int) -> list[dict]:
        """This process's prompts of iteration ``update``: its share of the global batch, from a fresh seeded
        permutation of the dataset per pass (resumable; N processes x B see the prompts 1 process x N*B sees)."""
        n, B = len(self.train_dataset), self.args.batch_size_total
        first = (update * self.args.world_size + self.args.process_index) * B
        idx = [int(self._pass_permutation(p // n)[p % n]) for p in range(first, first + B)]
        return [self.train_dataset[i] for i in idx]

    def _pass_permutation(self, k: int) -> np.ndarray:
        """The dataset's order in pass ``k`` (drawn once per pass, not once per prompt)."""
        cache = self.__dict__.setdefault("_permutations", {})
        if k not in cache:
            cache.clear()
            cache[k] = np.random.default_rng(self.args.seed + k).permutation(len(self.train_dataset))
        return cache[k]

    def _encode_prompts(self, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        q, m = left_pad(prompt_ids(self.processing_class, prompts), self.pad_id)
        return q.to(self.args.device), m.to(self.args.device)

    # ------------------------------------------------------------------ 1-4: rollout, rewards, GAE

    def _sample(self, q: torch.Tensor, qm: torch.Tensor) -> torch.Tensor:
        """(B, T) replies sampled from the policy, padded after the first EOS by ``generate``. Under ZeRO-3 the
        weights are gathered for the whole ``generate`` (trl's ``unwrap_model_for_generation``)."""
        args = self.args
        # in the training forward's precision: accelerate puts autocast on the prepared wrapper's forward only, so
        # without this the policy generated in fp32 under bf16 (TRL's GRPO generates under autocast). No autocast
        # cache: fastgen replays its decode step from a CUDA graph.
        autocast = self.accelerator.autocast(AutocastKwargs(cache_enabled=False))
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped, autocast:
            out = unwrapped.policy.generate(
                input_ids=q, attention_mask=qm, max_new_tokens=args.max_completion_length, do_sample=True,
                temperature=args.temperature, top_k=0, top_p=1.0, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            )
        return out[:, q.size(1):]

    @torch.no_grad()
    def rollout(self, rows: Sequence[dict]) -> Rollout:
        args, model = self.args, self.model
        t0 = time.time()
        prompts = [r["prompt"] for r in rows]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        q, qm = self._encode_prompts(prompts)
        L = q.size(1)
        model.eval()
        responses = self._sample(q, qm)
        mask = response_mask(responses, self.eos_id)
        responses = responses.masked_fill(mask == 0, self.pad_id)
        seqs, attn = torch.cat([q, responses], 1), torch.cat([qm, mask], 1)
        t_gen = time.time() - t0

        # logits and values of the T positions that predict the reply only: the LM head skips the prompt
        T = responses.size(1)
        logits, values = model(input_ids=seqs, attention_mask=attn, logits_to_keep=T + 1)
        logits, values = logits[:, :-1], values[:, -T - 1 : -1]
        logprobs, token_entropy = self._logprobs(logits, responses)
        entropy = masked_mean(token_entropy, mask.float())
        del logits
        with self.reference() as ref, self.accelerator.autocast():  # the precision the policy's forward runs at
            unwrapped_ref = self.accelerator.unwrap_model(ref)
            ref_logits = ref(**masked_inputs(unwrapped_ref, seqs, attn), **keep_kwargs(unwrapped_ref, T + 1)).logits
            ref_logprobs, _ = self._logprobs(last_positions(ref_logits, T + 1)[:, :-1], responses)
            del ref_logits

        # the replies on the host in one transfer (per-row boolean indexing on the GPU syncs once per row)
        completion_ids = [r[m].tolist() for r, m in zip(responses.cpu(), mask.bool().cpu())]
        completions = [self.processing_class.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
        scores_list, per = R.score_all(self.reward_funcs, self.reward_weights, prompts, completions,
                                       completion_ids, **columns)
        scores = torch.tensor(scores_list, dtype=torch.float32, device=seqs.device)
        has_eos = (responses == self.eos_id).any(1) if self.eos_id is not None else torch.ones_like(scores).bool()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~has_eos).float()

        maskf = mask.float()
        log_ratio = (logprobs - ref_logprobs) * maskf
        kl = log_ratio if args.kl_estimator == "k1" else ((-log_ratio).exp() - 1 + log_ratio) * maskf
        non_score = -self.kl_ctl.value * kl
        rewards = non_score.clone()
        last = mask.sum(1) - 1  # index of the EOS (or of the last token of a reply without one)
        rewards[torch.arange(len(rows), device=seqs.device), last] += scores
        if args.whiten_rewards:  # over the global batch: the statistics of all processes' replies
            rewards = masked_whiten(rewards, maskf, shift_mean=False, all_reduce=self._sum) * maskf
        values = values.float() * maskf
        advantages, returns = compute_gae(rewards, values, maskf, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, maskf, all_reduce=self._sum) * maskf

        on_device = {  # one transfer to the host, not one sync per figure
            "objective/scores": scores.mean(),
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-logprobs * maskf).sum(1).mean(),
            "policy/entropy_avg": entropy,
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
            "val/mean": masked_mean(values, maskf),
            "val/frac_missing_eos": (~has_eos).float().mean(),
            "val/num_eos_tokens": has_eos.float().sum(),
            "completion_length": mask.sum(1).float().mean(),
        }
        host = dict(zip(on_device, torch.stack([v.float() for v in on_device.values()]).tolist()))
        stats = {
            **host,
            "objective/kl_coef": self.kl_ctl.value,
            "val/num_eos_tokens": int(host["val/num_eos_tokens"]),
            "time/generate_s": round(t_gen, 2),
            **{f"rewards/{k}/mean": float(np.mean(v)) for k, v in per.items()},
        }
        stats = self._mean_over_processes(stats)  # every process logs and adapts the KL coefficient alike
        stats["val/num_eos_tokens"] = int(round(stats["val/num_eos_tokens"] * self.accelerator.num_processes))
        return Rollout(seqs, attn, L, maskf, logprobs * maskf, ref_logprobs * maskf, values, advantages, returns,
                       scores, kl, stats, completions)

    # ------------------------------------------------------------------ 5: PPO epochs

    def ppo_update(self, ro: Rollout) -> dict[str, float]:
        args, model = self.args, self.model_wrapped  # DDP / DeepSpeed engine (the module itself in one process)
        model.train()
        B = ro.query_responses.size(0)
        mini = B // args.num_mini_batches
        micro = min(args.per_device_train_batch_size, mini)
        L = ro.context_length
        keys = ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")
        # reply lengths (incl. EOS) and prompt lengths, one transfer for all micro-batches
        widths, prompt_lens = ro.mask.sum(1).long().cpu(), ro.attention_mask[:, :L].sum(1).cpu()
        acc: dict[str, list[torch.Tensor]] = {k: [] for k in keys}  # on device; read once at the end
        for _ in range(args.num_ppo_epochs):
            perm = torch.randperm(B)
            for s in range(0, B, mini):
                mb = perm[s : s + mini]
                self.optimizer.zero_grad()
                for m0 in range(0, len(mb), micro):
                    idx = mb[m0 : m0 + micro]
                    # the micro-batch's columns from its longest prompt to its longest reply: the rest is padding
                    # before every prompt (masked; positions follow the mask) or after every EOS (a causal model's
                    # earlier positions never see it), so the log-probs and values are the same
                    T = int(widths[idx].max())
                    cols = slice(L - int(prompt_lens[idx].max()), L + T)
                    idx = idx.to(ro.query_responses.device)
                    last = m0 + micro >= len(mb)
                    m = ro.mask[idx, :T]
                    with self._accumulating(model, last):
                        logits, vpred = model(input_ids=ro.query_responses[idx, cols],
                                              attention_mask=ro.attention_mask[idx, cols], logits_to_keep=T + 1)
                        logits, vpred = logits[:, :-1], vpred[:, -T - 1 : -1].float()
                        responses = ro.query_responses[idx, L : L + T]
                        new_lp, token_entropy = self._logprobs(logits, responses)
                        out = ppo_losses(new_lp, ro.logprobs[idx, :T], ro.advantages[idx, :T], vpred,
                                         ro.values[idx, :T], ro.returns[idx, :T], m, args.cliprange,
                                         args.cliprange_value)
                        loss = (out["pg_loss"] + args.vf_coef * out["vf_loss"]) * (len(idx) / len(mb))
                        self._backward(loss, last)
                    out["entropy"] = masked_mean(token_entropy, m)
                    for k in keys:
                        acc[k].append(out[k].detach())
                if not self.is_deepspeed_enabled:  # DeepSpeed clipped and stepped in its backward
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
        acc = dict(zip(keys, torch.stack([torch.stack(acc[k]).float() for k in keys]).tolist()))  # one transfer
        return self._mean_over_processes({
            "loss/policy_avg": float(np.mean(acc["pg_loss"])),
            "loss/value_avg": float(np.mean(acc["vf_loss"])),
            "loss/value_first": acc["vf_loss"][0],
            "loss/value_last": acc["vf_loss"][-1],
            "policy/clipfrac_avg": float(np.mean(acc["pg_clipfrac"])),
            "val/clipfrac_avg": float(np.mean(acc["vf_clipfrac"])),
            "policy/approxkl_avg": float(np.mean(acc["approxkl"])),
            "val/ratio": float(np.mean(acc["ratio"])),
            "policy/entropy_train": float(np.mean(acc["entropy"])),
        })

    def _accumulating(self, model: nn.Module, last: bool):
        """DDP: all-reduce the gradients on the mini-batch's last micro-batch only (they add up until then)."""
        if last or not isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.is_deepspeed_enabled:
            # The engine accumulates until the boundary (the mini-batch's last micro-batch), then reduces, clips
            # (gradient_clipping: max_grad_norm) and steps. The loss is weighted already: no 1/accumulation scaling.
            self.accelerator.sync_gradients = last
            self.accelerator.backward(loss, scale_wrt_gas=False)
            self.accelerator.sync_gradients = True
        else:
            loss.backward()

    # ------------------------------------------------------------------ the loop

    def _prepare(self) -> None:
        """Optimizer and scheduler, then the policy + critic wrapped by accelerate (DDP, a DeepSpeed engine, or
        itself in one process), as ``Trainer`` does. The scheduler stays ours: it steps once per iteration."""
        if self.is_deepspeed_enabled:  # fills the DeepSpeed config's "auto" fields; our optimizer (no "optimizer" key)
            self.optimizer, self.lr_scheduler = deepspeed_init(self, num_training_steps=self.num_updates)
            self.create_scheduler(num_training_steps=self.num_updates, optimizer=self.optimizer)
        else:
            self.create_optimizer_and_scheduler(num_training_steps=self.num_updates)
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped

    def train(self, resume_from_checkpoint: str | None = None, **kwargs) -> TrainOutput:
        args = self.args
        self._prepare()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self.state.max_steps = self.num_updates
        self.state.logging_steps = max(1, int(args.logging_steps))
        self.state.save_steps = int(args.save_steps) if args.save_strategy != "no" else 0
        self.state.train_batch_size = args.batch_size_total
        if resume_from_checkpoint:
            self._load_ppo_checkpoint(Path(resume_from_checkpoint))
        # each process samples its own replies (TRL 1.12's local_seed); one process keeps the seed it had
        torch.manual_seed(args.seed + self.state.global_step + 100003 * args.process_index)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        t0, losses = time.time(), []
        n = len(self.train_dataset)
        while self.state.global_step < self.num_updates:
            step = self.state.global_step
            t_it = time.time()
            ro = self.rollout(self._rows(step))
            t_roll = time.time() - t_it
            upd = self.ppo_update(ro)
            self.kl_ctl.update(ro.stats["objective/kl"], args.batch_size_total * args.world_size)
            self.lr_scheduler.step()
            losses.append(upd["loss/policy_avg"] + args.vf_coef * upd["loss/value_avg"])
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * args.batch_size_total * args.world_size / n
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            gs = self.state.global_step
            if gs % self.state.logging_steps == 0 or gs == self.num_updates or gs == 1:
                self.log({**ro.stats, **upd, "lr": self.lr_scheduler.get_last_lr()[0],
                          "episode": gs * args.batch_size_total * args.world_size, "time/rollout_s": round(t_roll, 2),
                          "time/iteration_s": round(time.time() - t_it, 2)})
            if self.state.save_steps and (gs % self.state.save_steps == 0 or gs == self.num_updates):
                self._save_ppo_checkpoint()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        runtime = time.time() - t0
        return TrainOutput(self.state.global_step, float(np.mean(losses)) if losses else 0.0,
                           {"train_runtime": runtime})

    # ------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.named_parameters() if v.requires_grad}

    def _save_ppo_checkpoint(self) -> Path:
        """Trainable weights (policy or adapters + critic) and optimizer: ``trainable.pt`` + ``optimizer.pt`` from
        rank 0, or under DeepSpeed the engine's sharded ``global_step*/`` (every rank writes its shard). Then the
        scheduler, KL coefficient and state (rank 0); ``trainer_state.json`` last, so a cut checkpoint is skipped."""
        out = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        main = self.is_world_process_zero()
        if main:
            out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if self.is_deepspeed_enabled:
            self.model_wrapped.save_checkpoint(str(out))  # collective
        elif main:
            torch.save(self._trainable_state(), out / "trainable.pt")
            torch.save(self.optimizer.state_dict(), out / "optimizer.pt")
        if main:
            torch.save(self.lr_scheduler.state_dict(), out / "scheduler.pt")
            (out / "ppo_state.json").write_text(json.dumps({"kl_coef": self.kl_ctl.value}))
            self.state.save_to_json(str(out / "trainer_state.json"))
            limit = self.args.save_total_limit
            if limit:
                ckpts = sorted(Path(self.args.output_dir).glob("checkpoint-*"),
                               key=lambda p: int(p.name.split("-")[-1]))
                for old in ckpts[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return out

    def _load_ppo_checkpoint(self, path: Path) -> None:
        if self.is_deepspeed_enabled:  # weights + optimizer states: the engine's own checkpoint
            deepspeed_load_checkpoint(self.model_wrapped, str(path), load_module_strict=not self.is_peft)
        else:
            if not (path / "trainable.pt").exists():
                raise FileNotFoundError(f"{path}: not a PPO checkpoint (no trainable.pt)")
            state = torch.load(path / "trainable.pt", map_location="cpu")
            missing = set(self._trainable_state()) - set(state)
            if missing:
                raise ValueError(f"{path}: checkpoint lacks {len(missing)} trainable weights, "
                                 f"e.g. {sorted(missing)[:3]}")
            self.model.load_state_dict(state, strict=False)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt"))
        self.kl_ctl.value = json.loads((path / "ppo_state.json").read_text())["kl_coef"]
        saved = TrainerState.load_from_json(str(path / "trainer_state.json"))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        self.state.log_history = saved.log_history
        logger.info("resumed PPO from %s at iteration %d", path, saved.global_step)

    # ------------------------------------------------------------------ final/

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy alone (its adapter under LoRA), gathered from ZeRO-3 shards: call it on every process, rank 0
        writes (``align.distributed.save_final`` calls it and merges the adapter). The critic stays in the
        checkpoints."""
        output_dir = output_dir or self.args.output_dir
        full = self.accelerator.get_state_dict(self.model_wrapped)  # collective under ZeRO-3; rank 0 gets it
        if self.is_world_process_zero():
            state = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")}
            self.policy.save_pretrained(output_dir, state_dict=state)
        self.accelerator.wait_for_everyone()
