"""The decoder's fused fast path: Liger's Triton kernels (https://github.com/linkedin/Liger-Kernel) for RoPE and the
cross-entropy, torch's fused RMSNorm, and the LM head + loss chunked without logits or host syncs.

Opt-in through `DecoderConfig.use_liger_kernel`; used only on CUDA tensors where liger-kernel is installed, so
elsewhere the model runs its plain ops and its numerics do not change. liger_kernel is imported on first use,
through importlib: it needs triton, which CPU machines lack, and transformers' remote-code loader (a portable
final/ carries this file) would otherwise require it of every user.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

INSTALLED = importlib.util.find_spec("liger_kernel") is not None  # looked up once: Dynamo will not trace importlib


def available() -> bool:
    """liger-kernel is installed and there is a GPU for its Triton kernels."""
    return INSTALLED and torch.cuda.is_available()


def enabled(flag: bool, x: torch.Tensor) -> bool:
    """The test of the fast path's layers: asked for (the config flag), x on CUDA, the kernels installed, and not under
    torch.compile. There they step aside: traced into the graph, Liger's kernels fault, and Inductor's own fusion of
    the plain norms, RoPE and MLP measured faster than the concatenated matmuls (docs/benchmarks.md)."""
    return flag and x.is_cuda and not torch.compiler.is_compiling() and available()


def loss_enabled(flag: bool, x: torch.Tensor) -> bool:
    """The fused loss's test: as enabled(), but under torch.compile too, where the loss is one opaque custom op and
    beats Inductor's cross-entropy (docs/benchmarks.md)."""
    return flag and x.is_cuda and available()


def _liger(module: str):
    """liger_kernel.<module>, imported on first use."""
    return importlib.import_module(f"liger_kernel.{module}")


def plain_linear(*modules: nn.Module) -> bool:
    """All are bias-free nn.Linear, not subclasses or PEFT/quantised wrappers: their weights may be concatenated
    into one matmul (or fed to the fused loss) without skipping an adapter."""
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as torch's own fused CUDA kernel (forward and backward one kernel each). Liger's Triton RMSNorm does the
    same GPU work behind Python wrappers that cost up to ~0.2 ms of host time a call (docs/benchmarks.md)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


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
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(hidden.device)  # t predicts t+1
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    n = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    n = n.to(h.device, torch.float32) if torch.is_tensor(n) else h.new_full((), float(n), dtype=torch.float32)
    # one dtype for the chunks' matmuls: a trainer's autocast (fp32 weights, bf16 matmuls) by casting the inputs here,
    # where autograd takes the gradients back to fp32; inside, the in-place matmuls need their operands to agree
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lm_head_weight.dtype
    grads = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        h, w = h.to(dtype), lm_head_weight.to(dtype)
        return linear_cross_entropy(h, w, labels, n, ignore_index, grads and h.requires_grad,
                                    grads and w.requires_grad)[0]


CHUNK = 2**27  # logits per chunk of the fused loss: ~256 MB in bf16


@torch.library.custom_op("align::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, n: torch.Tensor, ignore_index: int, grad_h: bool,
    grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum(CE(h W^T, labels)) / n and the gradients of the sum for h (N, C) and W (V, C), made here in the forward,
    chunk by chunk (Liger's fused loss, reshaped); an empty tensor for a gradient not asked for.

    Each chunk's logits go through Liger's Triton cross-entropy kernel, which overwrites them with their gradient in
    one pass; two matmuls take that to h and W. Unlike Liger's own fused loss, nothing here reads a value back to the
    host (it calls .item() for the token count and compares the incoming gradient with 1.0, two syncs a step), and
    chunks are CHUNK logits, not the size of h: 4 for the 100M decoder's 16k-token batch instead of 32. An eager step
    is host-bound, and every sync and launch shows in its wall time (docs/benchmarks.md). A custom op, so that
    torch.compile keeps it whole: Inductor's own cross-entropy reads the logits at a third of the memory bandwidth."""
    N, V = h.shape[0], weight.shape[0]
    rows = max(1, min(N, CHUNK // V))
    loss = torch.zeros(N, dtype=torch.float32, device=h.device)  # ignored rows stay 0
    gh = torch.empty_like(h) if grad_h else None
    gw = torch.zeros_like(weight) if grad_w else None
    for s in range(0, N, rows):
        hs = h[s:s + rows]
        logits = hs @ weight.t()  # (r, V), turned into d(sum CE)/d logits in place
        cross_entropy_grad_(logits, labels[s:s + rows], loss[s:s + rows], ignore_index)
        if gh is not None:
            torch.mm(logits, weight, out=gh[s:s + rows])
        if gw is not None:
            gw.addmm_(logits.t(), hs)
    return loss.sum() / n, *(g if g is not None else h.new_empty(0) for g in (gh, gw))  # 1/n: in the backward


@linear_cross_entropy.register_fake
def _(h, weight, labels, n, ignore_index, grad_h, grad_w):
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h) if grad_h else h.new_empty(0),
            torch.empty_like(weight) if grad_w else h.new_empty(0))


def _save_grads(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:], inputs[3])
    ctx.wanted = inputs[5:]


def _backward(ctx, grad: torch.Tensor, *_):  # the gradients' own outputs are not differentiated
    *sums, n = ctx.saved_tensors
    grads = [g * (grad / n) if wanted else None for g, wanted in zip(sums, ctx.wanted)]
    return (*grads, None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_save_grads)


def cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ignore_index: int) -> None:
    """In place, in one pass of Liger's Triton kernel: logits (r, V) become d(sum CE)/d(logits) (zero rows where the
    label is ignore_index) and loss (r,) fp32 gets each row's cross-entropy."""
    V = logits.shape[1]
    _liger("ops.cross_entropy").liger_cross_entropy_kernel[(logits.shape[0],)](
        X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=labels, Y_stride=labels.stride(-1), weight_ptr=None,
        loss_ptr=loss, z_loss_ptr=None, loss_stride=loss.stride(-1), token_accuracy_ptr=None, token_accuracy_stride=0,
        predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=V, n_non_ignore=1, sum_non_ignore_weight=1,
        weight_sum=0.0, ignore_index=ignore_index, lse_square_scale=0.0, label_smoothing=0.0, reduction="sum",
        softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
        HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True, BLOCK_SIZE=min(32768, 1 << (V - 1).bit_length()),
        num_warps=32)
