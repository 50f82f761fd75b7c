"""align's HF-native base decoder. Importing this package registers it with the Auto classes:
AutoConfig (model_type "align_decoder"), AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from . import flash  # noqa: F401  registers attn_implementation="align_fa4"
from .config import DecoderConfig
from .modeling import (
    DecoderCausalLMOutput,
    DecoderForCausalLM,
    DecoderForSequenceClassification,
    DecoderModel,
    DecoderModelOutput,
    DecoderPreTrainedModel,
)
from .moe import MoEFeedForward

AutoConfig.register(DecoderConfig.model_type, DecoderConfig, exist_ok=True)
AutoModel.register(DecoderConfig, DecoderModel, exist_ok=True)
AutoModelForCausalLM.register(DecoderConfig, DecoderForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DecoderConfig, DecoderForSequenceClassification, exist_ok=True)


def moe_stats(model: nn.Module) -> dict[str, float]:
    """Last forward's router statistics, for logging: {"moe/aux_loss": mean over MoE layers,
    "moe/dropped_tokens": token->expert assignments dropped for capacity, summed over layers}.
    Empty for dense models. Works through PEFT/DDP wrappers (walks all modules)."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.last_aux_loss is not None]
    if not layers:
        return {}
    return {
        "moe/aux_loss": torch.stack([m.last_aux_loss.float() for m in layers]).mean().item(),
        "moe/dropped_tokens": float(sum(int(m.last_dropped_tokens) for m in layers)),
    }


__all__ = [
    "DecoderConfig",
    "DecoderModel",
    "DecoderForCausalLM",
    "DecoderForSequenceClassification",
    "DecoderPreTrainedModel",
    "DecoderModelOutput",
    "DecoderCausalLMOutput",
    "MoEFeedForward",
    "moe_stats",
]
