"""FlashAttention-4 (the `flash-attn-4` package's CuTe kernels, Hopper and Blackwell) as an attention function of
transformers' registry: ``attn_implementation="align_fa4"``, for align's decoder and for any HF model that takes
the registry (Llama, Qwen, SmolLM, ...).

transformers' own ``"flash_attention_4"`` calls the kernels through a Python autograd.Function that torch.compile
cannot trace, so a compiled model breaks its graph at every layer (0.59x compiled SDPA on the H200). Here the forward
and backward are torch custom ops with fake (shape-only) versions, so a compiled model stays one graph
(1.2x compiled SDPA; docs/benchmarks.md). They call the package's `_flash_attn_fwd` and `_flash_attn_bwd`, which its
autograd.Function wraps (hence the pinned version in the `flash` extra).

The kernels run where they apply: CUDA tensors of compute capability 9 or 10, bf16/fp16, head_dim a multiple of 8
up to 128, plain causal attention over the whole sequence (no mask, i.e. no padding and no packed rows; no dropout,
softcap or sliding window), on at least ``MIN_TOKENS`` query tokens a call. Everything else, CPU included, runs
transformers' SDPA function, so the same model and config work everywhere. The mask function is SDPA's, except that
plain causal attention gets no mask under torch.compile too (transformers builds one there with torch < 2.14, which
would send every compiled call to SDPA).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

NAME = "align_fa4"
# looked up once, at import: Dynamo will not trace find_spec
INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("flash_attn", "flash_attn.cute"))
DEFAULT = NAME if INSTALLED else None  # align's loader uses it unless asked for another (None: transformers' default)
HALF = (torch.bfloat16, torch.float16)
# Each call spends ~0.4 ms of host time in the package's Python interface. On fewer tokens (batch x length) the
# GPU finishes first and the step is host-bound: SDPA, launched from C++, ran the 100M decoder's compiled step
# 1.5x faster at 4 x 1024 tokens on an H200 (docs/benchmarks.md).
MIN_TOKENS = 16384


def enough_tokens(tokens: int) -> bool:
    """Whether a call of ``tokens`` query tokens (batch x length) pays the kernels' host cost."""
    return tokens >= MIN_TOKENS


@torch.compiler.assume_constant_result
@functools.cache
def _capable() -> bool:
    """flash-attn-4 is installed and the current GPU is one its kernels are built for (sm90, sm100)."""
    return INSTALLED and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def _device_ok(q: Tensor) -> bool:
    return q.is_cuda and _capable()


def applies(module, q: Tensor, k: Tensor, attention_mask: Tensor | None, dropout: float, **kwargs) -> bool:
    """The kernels take this call: q (B, nh, T, hs), k (B, nkv, S, hs)."""
    plain = (attention_mask is None and dropout == 0.0 and getattr(module, "is_causal", True)
             and kwargs.get("is_causal", True) is not False
             and all(kwargs.get(key) is None for key in ("sliding_window", "softcap", "s_aux")))
    shapes = (q.shape[2] == k.shape[2] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
              and enough_tokens(q.shape[0] * q.shape[2]))
    return plain and shapes and q.dtype in HALF and k.dtype == q.dtype and _device_ok(q)


def _kernel_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
    return out, lse


def _kernel_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, scale, True)[:3]
    return dq, dk, dv


@torch.library.custom_op("align::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention: q (B, T, nh, hs), k and v (B, T, nkv, hs) -> out (B, T, nh, hs), lse (B, nh, T) fp32."""
    return _kernel_fwd(q, k, v, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, scale):
    B, T, nh, _ = q.shape
    return q.new_empty(B, T, nh, v.shape[-1]), q.new_empty((B, nh, T), dtype=torch.float32)


@torch.library.custom_op("align::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel_bwd(q, k, v, out, dout, lse, scale)


@flash_attn_bwd.register_fake
def _(q, k, v, out, dout, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output) -> None:
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors  # lse is not an output anyone differentiates: dlse is ignored
    return (*flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, ctx.scale), None)


flash_attn_fwd.register_autograd(_backward, setup_context=_save)


class _EagerFlash(torch.autograd.Function):
    """The same kernels for eager calls, without the custom op's dispatch (its Python layers: autograd, redispatch,
    aliasing checks): 0.12 ms less host time a call on an H200 host, 3 ms of the 100M decoder's eager step, which is
    host-bound (docs/benchmarks.md). torch.compile keeps the op, which it can trace."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = _kernel_fwd(q, k, v, scale)
        ctx.mark_non_differentiable(lse)
        _save(ctx, (q, k, v, scale), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_kernel_bwd(q, k, v, out, dout.contiguous(), lse, ctx.scale), None)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of causal attention, q (B, T, nh, hs): the custom op under torch.compile, the Function eagerly."""
    return flash_attn_fwd(q, k, v, scale) if torch.compiler.is_compiling() else _EagerFlash.apply(q, k, v, scale)


def flash_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The registry's signature: (B, nh, T, hs) query, (B, nkv, S, hs) key and value -> (B, T, nh, hs), no probs."""
    if not applies(module, query, key, attention_mask, dropout, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # the kernels' (B, T, heads, hs)
    return attend(q, k, v, scale)[0], None


def causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                mask_function=causal_mask_function, attention_mask: Tensor | None = None, local_size: int | None = None,
                allow_is_causal_skip: bool = True, **kwargs) -> Tensor | None:
    """None for plain causal attention over the whole sequence (no padding mask, no past, no window, no packed rows:
    those change ``mask_function``), else SDPA's mask."""
    if (allow_is_causal_skip and attention_mask is None and local_size is None and q_length == kv_length
            and mask_function is causal_mask_function):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     local_size, allow_is_causal_skip, **kwargs)


AttentionInterface.register(NAME, flash_attention_forward)
AttentionMaskInterface.register(NAME, causal_mask)
