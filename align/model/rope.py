"""Rotary position embeddings (RoPE, https://arxiv.org/abs/2104.09864) and their context-extension variants.

The inverse-frequency math of the scaled variants is transformers' own (`ROPE_INIT_FUNCTIONS`), so a
converted model matches HF Llama bit for bit:
  - default: inv_freq_i = 1 / theta^(2i/d)
  - linear (position interpolation, https://arxiv.org/abs/2306.15595): inv_freq / factor
  - dynamic NTK-aware (https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr): once the sequence grows past
    max_position_embeddings, theta is rescaled to theta * ((factor*L/max) - (factor-1))^(d/(d-2)) and the
    frequencies are recomputed on the fly (transformers' `dynamic_rope_update`, same state machine as Llama)
  - yarn (https://arxiv.org/abs/2309.00071): per-dimension blend of interpolation/extrapolation plus an
    attention temperature folded into cos/sin (`attention_scaling`)
  - llama3: Llama-3.1's wavelength-banded scaling
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


def cos_sin(position_ids: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """position_ids (B, T) -> cos, sin (B, T, hs) in ``dtype``, computed in fp32 whatever the model dtype."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs): rotate_half pairs dim i with i + hs/2
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


# Under torch.compile the angles are one opaque op. Inductor would otherwise inline cos/sin into every layer's
# rotation (reading no memory, they look free) and evaluate two fp32 trig functions per q/k element per layer,
# forward and backward: 6x the rotation's memory-bound time, 1.6 of 27 ms in the 100M step on an H200
# (docs/benchmarks.md). A portable final/ carries a copy of this module: the op is defined once per process.
try:
    cos_sin_op = torch.ops.align.rope_cos_sin
except AttributeError:
    cos_sin_op = torch.library.custom_op("align::rope_cos_sin", mutates_args=())(cos_sin)

    @cos_sin_op.register_fake
    def _(position_ids, inv_freq, scaling, dtype):
        shape = (*position_ids.shape, 2 * inv_freq.shape[0])
        return inv_freq.new_empty(shape, dtype=dtype), inv_freq.new_empty(shape, dtype=dtype)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape (B, T, head_dim) for the given position ids."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        # state read by `dynamic_rope_update` (dynamic NTK grows/resets inv_freq with the sequence length)
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        default = self.compute_default_rope_parameters
        init_fn = default if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)  # (hs/2,), float
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE: inv_freq_i = 1 / theta^(2i/d) for i < d/2; no attention scaling."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (base**exponent), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # no-op unless rope_type == "dynamic"
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = cos_sin_op if torch.compiler.is_compiling() else cos_sin
        return fn(position_ids, self.inv_freq.to(x.device), float(self.attention_scaling), x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (the GPT-NeoX/Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q (B, nh, T, hs) and k (B, nkv, T, hs) by the angles in cos/sin (B, T, hs)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs) broadcasts over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def usable_context(config) -> int | None:
    """The longest prompt + generation a causal-LM config is meant for, any HF config: `max_context_length` if
    set; None (no limit) under dual chunk attention; else max_position_embeddings, or the trained length x the
    factor of a scaled RoPE (linear, dynamic, yarn, llama3). None when the config names no length at all."""
    if getattr(config, "max_context_length", None) is not None:
        return config.max_context_length
    if getattr(config, "dca_chunk_size", None) is not None:
        return None  # dual chunk attention keeps every query-key distance inside the trained range
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is None:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) == "default" or not rope.get("factor"):
        return max_pos
    trained = rope.get("original_max_position_embeddings") or max_pos
    return max(max_pos, int(trained * rope["factor"]))
