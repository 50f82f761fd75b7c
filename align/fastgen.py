"""Fast generation: a static KV cache and a decode step replayed from a CUDA graph.

HF ``generate`` re-launches every kernel of every layer from Python at each new token, so a small model at
small batch is bound by kernel launches, not by the GPU (about 140 tokens/s at batch 1 for 100M parameters
on an H200, where the weights' memory traffic would allow ~20,000). Here the KV cache is a fixed-size
``StaticCache``, so one decode step has the same shapes and addresses every time: it is captured once per
call in a CUDA graph and replayed for each token, one launch for the whole forward. Token selection (greedy,
or sampling with temperature / top-k / top-p) stays in eager PyTorch on device, and finished rows are
checked on the host only every ``sync_every`` steps.

    ids = fast_generate(model, input_ids, attention_mask, max_new_tokens=64)   # (B, new), pad after eos

Works on our decoder and on HF decoders that take a 4D attention mask and a ``Cache`` (Llama, Qwen2, ...).
On CPU (``cuda_graph`` off) the same loop runs eagerly, which is how the tests compare it with HF generate.
Measured (docs/benchmarks.md, 100M, bf16, H200): 4.8x HF generate at batch 1 and 3.2x at 64 with the graph,
10.1x and 7.4x with ``compile=True`` as well.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from torch import nn
from transformers.cache_utils import StaticCache

# decoders whose forward takes a 4D mask, position ids and a StaticCache as this loop passes them (greedy
# tokens checked equal to HF generate on CPU for each: tests for align_decoder and llama, by hand for the rest)
FAST_MODEL_TYPES = ("align_decoder", "llama", "qwen2", "qwen3", "mistral")


def supports_fast_generate(model) -> bool:
    """True for causal LMs whose forward this loop drives: our dense decoder and Llama-like HF decoders with
    full attention in every layer, adapters (LoRA) injected or not. MoE routing needs the 2D padding mask and
    sliding-window layers a mask of their own, and dual chunk attention chunk ids over the keys written so far (not
    a static cache's slots), so those models keep HF generate; so does a ``PeftModel`` wrapper itself, whose
    ``generate`` reaches the model inside (prompt-learning methods with inputs this loop does not take, which then
    fall back)."""
    config = model.config
    if (getattr(config, "num_experts", 0) or getattr(config, "dca_chunk_size", None)
            or hasattr(model, "get_base_model")):  # get_base_model: a PeftModel
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types) or (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    ):
        return False
    return config.model_type in FAST_MODEL_TYPES


def _compiled(model):
    """The model's forward through torch.compile (inductor fuses norms, RoPE and activations into fewer kernels),
    built once per model; our own CUDA graph still wraps it, so compile's cudagraphs stay off."""
    if "_align_compiled" not in model.__dict__:  # in __dict__, not as a submodule: state_dict stays the model's
        # the class's forward, not ``model.forward``: trainers patch the latter (TRL's fused log-prob head). Dynamo
        # guards on the modules' hooks: a model from align.models.load keeps their number fixed (input_grads_once)
        forward = type(model).forward
        model.__dict__["_align_compiled"] = torch.compile(lambda *a, **kw: forward(model, *a, **kw), dynamic=False)
    return model.__dict__["_align_compiled"]


def _select(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next token (B,) from last-position logits (B, V): argmax, or a sample after temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def fast_generate(
    model,
    input_ids: torch.Tensor,  # (B, W) left-padded prompts
    attention_mask: torch.Tensor | None = None,  # (B, W) 1 = real token
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    cuda_graph: bool | None = None,
    compile: bool = False,
    sync_every: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """New tokens (B, max_new_tokens); after a row's eos, pad_token_id (HF generate's convention).

    ``cuda_graph``: None = on for CUDA tensors. ``compile``: the decode step through torch.compile (pays a
    compile per new batch size, tens of seconds; worth it for long or repeated generation). Greedy tokens
    equal HF generate's up to float rounding (the attention kernels see the same masked keys, over a longer
    zero-padded cache)."""
    B, W = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if compile and W % 64:  # prompt widths in buckets of 64 (more left padding): one compiled step per bucket
        extra = 64 - W % 64
        input_ids = torch.nn.functional.pad(input_ids, (extra, 0), value=pad_token_id)
        attention_mask = torch.nn.functional.pad(attention_mask, (extra, 0), value=0)
        B, W = input_ids.shape
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else [e for e in eos_token_id or [] if e is not None]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    L = W + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=L)
    real = attention_mask.bool()  # (B, W)

    keys = torch.zeros(B, L, dtype=torch.bool, device=device)
    keys[:, :W] = real
    # prefill. No padding: the model's own causal mask, which SDPA runs as its flash kernel with native GQA (a 4D
    # mask takes its masked kernel over repeated K/V). Padding: causal over real keys; a left-pad query sees itself
    # only (a row of no keys gives NaN in SDPA, which the cache would carry into every later step as 0 * NaN)
    prefill_mask = attention_mask
    if not bool(real.all()):
        q, k = torch.arange(W, device=device)[:, None], torch.arange(L, device=device)[None, :]
        prefill_mask = (((k <= q)[None] & keys[:, None, :]) | (k == q)[None])[:, None]  # (B, 1, W, L)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, W) positions count real tokens only
    logits = model(input_ids=input_ids, attention_mask=prefill_mask, position_ids=pos, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)

    # decode buffers the graph reads: token, position, key mask over the whole cache
    step_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
    step_pos = pos[:, -1:].clone()  # (B, 1)
    step_mask = keys[:, None, None, :].clone()  # (B, 1, 1, L)
    step_logits = None

    forward, amp = model, None
    if compile:
        forward = _compiled(model)
        # a trainer's autocast lives in model.forward (accelerate wraps it), which the compiled class forward
        # skips: run the step in the dtype the prefill wrote the cache in
        kv_dtype = cache.layers[0].values.dtype
        amp = kv_dtype if kv_dtype != model.dtype else None

    def step():  # no autocast context of our own otherwise: one with enabled=False would end the caller's
        with torch.autocast(device.type, dtype=amp, cache_enabled=False) if amp else contextlib.nullcontext():
            return forward(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]

    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    graph = None
    for i in range(max_new_tokens):
        tok = _select(logits, do_sample, temperature, top_k, top_p, generator)
        tok = tok.masked_fill(done, pad_token_id)
        out[:, i] = tok
        if eos.numel():
            done |= torch.isin(tok, eos)
        if i == max_new_tokens - 1 or (eos.numel() and (i + 1) % sync_every == 0 and bool(done.all())):
            break
        step_ids.copy_(tok[:, None])
        step_pos.add_(1)
        step_mask[..., W + i] = True  # the new token's own slot
        if not cuda_graph:
            logits = step()
        elif graph is not None:
            graph.replay()
            logits = step_logits
        else:  # first decode step: run it eagerly on a side stream (warm-up), then capture the next ones
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                logits = step().clone()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records only: the cache's write position is a device tensor
                step_logits = step()
    return out


# generation settings the loop implements only at their neutral values, and the keyword arguments it takes
_UNSUPPORTED = {"num_beams": (None, 1), "num_return_sequences": (None, 1), "min_p": (None, 0.0),
                "repetition_penalty": (None, 1.0), "min_new_tokens": (None, 0), "suppress_tokens": (None, []),
                "bad_words_ids": (None, []), "typical_p": (None, 1.0), "no_repeat_ngram_size": (None, 0)}
_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "eos_token_id", "pad_token_id",
           "disable_compile", "use_cache"}


def generate_like_hf(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     generation_config=None, fallback=None, compile: bool = False, **kwargs) -> torch.Tensor:
    """``model.generate``'s contract (prompt + new tokens, cut after the last row's eos) on the fast loop, for
    trainers that call ``model.generate`` (TRL's GRPO without vLLM, align's PPO). Settings the loop does not
    implement (beams, min_p, repetition penalty, suppressed tokens, ...) go to ``fallback`` (HF generate)."""
    gc = generation_config if generation_config is not None else model.generation_config
    opts = {**gc.to_dict(), **kwargs}
    unsupported = [k for k in _UNSUPPORTED if opts.get(k) not in _UNSUPPORTED[k]]
    unsupported += sorted(set(kwargs) - _KWARGS)
    if unsupported or not opts.get("max_new_tokens") or not supports_fast_generate(model):
        if fallback is None:
            raise ValueError(f"fast generation does not implement {unsupported or 'this model'}")
        return fallback(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        **kwargs)
    eos = opts.get("eos_token_id")
    pad = opts.get("pad_token_id")
    pad = pad if pad is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    do_sample = bool(opts.get("do_sample"))
    new = fast_generate(model, input_ids, attention_mask, max_new_tokens=opts["max_new_tokens"], do_sample=do_sample,
                        temperature=opts.get("temperature") or 1.0, top_k=opts.get("top_k") or 0,
                        top_p=opts.get("top_p") or 1.0, eos_token_id=eos, pad_token_id=pad, compile=compile)
    if eos is not None:  # HF stops once every row has ended: drop the all-pad columns after that step
        hit = torch.isin(new, torch.tensor([eos] if isinstance(eos, int) else eos, device=new.device))
        ends = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, new.shape[1])  # (B,) tokens per row incl. eos
        new = new[:, : int(ends.max())]
    return torch.cat([input_ids, new], dim=1)


def _mergeable(layer) -> bool:
    """A LoRA Linear whose one active adapter can be folded into its weight: plain nn.Linear base, no DoRA, not
    merged or disabled already (those keep the adapters apart, as generated before)."""
    from peft.tuners.lora import Linear as LoraLinear

    return (type(layer) is LoraLinear and type(layer.get_base_layer()) is nn.Linear and not layer.merged
            and not layer.disable_adapters and len(layer.active_adapters) == 1
            and not layer.use_dora.get(layer.active_adapters[0], False))


@torch.no_grad()
def merged_lora(model, dtype: torch.dtype | None = None) -> nn.Module | None:
    """``model`` with its LoRA adapters folded into the weights, for the rollouts of LoRA GRPO/PPO; None when it
    carries no adapters (or ones that cannot be folded: DoRA, quantised bases, several active adapters).

    Unmerged, each adapted projection is three matmuls and a scaled add a decode step (W x + s B A x), small kernels
    whose fixed costs took a 64 x 128-token rollout of SmolLM2 from 0.69 to 1.13 s on an H200. The merged model runs
    one matmul, as vLLM's synced weights do (0.70 s; docs/benchmarks.md). It is a shadow built
    once (the adapted Linear layers as plain ones, every other tensor shared with ``model``) and refreshed from the
    live adapters at each call (W + scale B A), so the trainer's updates reach the next rollout; ``model``'s own
    weights are never touched (merging and unmerging in place drifts them by rounding). ``dtype``: the merged
    weights' (the rollouts' autocast dtype; None: the base weights')."""
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}  # peft's LoRA layers
    if not layers or not all(_mergeable(m) for m in layers.values()):
        return None
    shadow = model.__dict__.get("_align_merged")
    if shadow is None:
        adapters = {id(t) for m in layers.values() for t in (*m.lora_A.parameters(), *m.lora_B.parameters())}
        shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in adapters}
        shadow = copy.deepcopy(model, shared)  # the module tree anew; its tensors are model's own
        # model's caches, its routed generate, and a forward a trainer patched onto it: TRL's GRPO wraps the bound
        # forward in a closure (its fused log-prob head), which would run model, unmerged adapters and all
        for key in ("_align_merged", "_align_compiled", "generate", "forward"):
            shadow.__dict__.pop(key, None)
        for name, m in layers.items():
            base = m.get_base_layer()
            plain = nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device,
                              dtype=dtype or base.weight.dtype)
            plain.bias = base.bias  # shared; None for bias-free projections
            shadow.set_submodule(name, plain.requires_grad_(False))
        model.__dict__["_align_merged"] = shadow  # in __dict__, not a submodule: state_dict stays the model's
    for name, m in layers.items():
        base = m.get_base_layer().weight
        shadow.get_submodule(name).weight.copy_(base + m.get_delta_weight(m.active_adapters[0]).to(base.dtype))
    return shadow.train(model.training)


def use_fast_generate(model, compile: bool = False, dtype: torch.dtype | None = None) -> bool:
    """Route ``model.generate`` through the fast loop (falling back to HF's for what it does not implement).
    True if the model is supported and now routed; idempotent. ``dtype``: the trainer's mixed precision
    (bf16/fp16), which the rollouts then run under. A trainer's autocast wraps the forward of the model it was
    given: under LoRA that is the PeftModel, not this model, whose generate would otherwise decode in fp32."""
    if not supports_fast_generate(model):
        return False
    if not getattr(model.generate, "_align_fast", False):
        hf_generate = model.generate

        def generate(input_ids=None, attention_mask=None, generation_config=None, **kwargs):
            # LoRA (a trainer's PeftModel reaches this model): the adapters folded into a shadow's weights
            target = merged_lora(model, dtype) or model
            amp = torch.autocast(model.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with amp:
                return generate_like_hf(target, input_ids, attention_mask, generation_config=generation_config,
                                        fallback=hf_generate, compile=compile, **kwargs)

        generate._align_fast = True
        model.generate = generate
    return True
