"""Liger's fused Triton kernels (https://github.com/linkedin/Liger-Kernel) for the decoder's hot spots.

Opt-in through `DecoderConfig.use_liger_kernel`; used only on CUDA tensors where liger-kernel is installed, so
elsewhere the model runs its plain ops and its numerics do not change. liger_kernel is imported on first use,
through importlib: it needs triton, which CPU machines lack, and transformers' remote-code loader (a portable
final/ carries this file) would otherwise require it of every user.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn


@functools.cache
def available() -> bool:
    """liger-kernel is installed and there is a GPU for its Triton kernels."""
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def enabled(flag: bool, x: torch.Tensor) -> bool:
    """The one test of the fast path: asked for (the config flag), x on CUDA, the kernels installed, and not under
    torch.compile. There the whole fast path steps aside: traced into the graph, Liger's kernels fault, and Inductor's
    own fusion of the plain model measured faster than the concatenated matmuls or the fused loss (docs/benchmarks.md).
    is_compiling comes before available(): Dynamo will not trace importlib, and the graph break it made there ran this
    test eagerly, where it says "not compiling", which put Liger's kernels into the graph."""
    return flag and x.is_cuda and not torch.compiler.is_compiling() and available()


def _liger(module: str):
    """liger_kernel.<module>, imported on first use."""
    return importlib.import_module(f"liger_kernel.{module}")


def plain_linear(*modules: nn.Module) -> bool:
    """All are bias-free nn.Linear, not subclasses or PEFT/quantised wrappers: their weights may be concatenated
    into one matmul (or fed to the fused loss) without skipping an adapter."""
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in one kernel; "llama" casting is align's: rstd in fp32, the normalised x cast back, times weight.
    Not in place: the input is the residual stream, which the block still adds to."""
    return _liger("transformers.functional").liger_rms_norm(x, weight, eps, casting_mode="llama", in_place=False)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel; its backward recomputes silu instead of keeping it."""
    return _liger("transformers.functional").liger_swiglu(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb in one kernel: q (B, nh, T, hs), k (B, nkv, T, hs), cos/sin (B|1, T, hs).
    The kernel may rotate q and k in place (when their (B, T, heads, hs) layout is contiguous)."""
    return _liger("transformers.functional").liger_rope(q, k, cos, sin, unsqueeze_dim=1)


def causal_lm_loss(
    hidden: torch.Tensor,  # (B, T, C) final hidden states
    lm_head_weight: torch.Tensor,  # (V, C)
    labels: torch.Tensor,  # (B, T) unshifted, like HF's ForCausalLMLoss
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """LM head + cross-entropy fused and chunked over the tokens: the (B*T, V) logits are never materialised.
    Shifts the labels itself; sums / num_items_in_batch when given (gradient accumulation), else the mean."""
    return _liger("transformers.model.loss_utils").LigerForCausalLMLoss(
        hidden_states=hidden,
        lm_head_weight=lm_head_weight,
        labels=labels,
        hidden_size=hidden.shape[-1],
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
    )
