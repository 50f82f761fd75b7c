"""align's base decoder: the LLaMA blueprint as a Hugging Face model, in one readable file.

References:
1) LLaMA: https://arxiv.org/abs/2302.13971 (pre-norm RMSNorm, SwiGLU, RoPE, no biases)
2) GQA: https://arxiv.org/abs/2305.13245 (k/v heads shared by groups of query heads)
3) nanoGPT (https://github.com/karpathy/nanoGPT) for the style, HF `modeling_llama.py` for the API.

Module names are Llama's (model.embed_tokens, model.layers.N.self_attn.q_proj, ...mlp.down_proj,
model.norm, lm_head) so PEFT target lists and align.convert work unchanged. Shapes: B batch, T query
length, S key length (past + T), C hidden, nh query heads, nkv kv heads, hs head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    MoeCausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging

from . import kernels
from .config import DecoderConfig
from .moe import MoEFeedForward, SwiGLU
from .rope import RotaryEmbedding, apply_rotary_pos_emb

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------- outputs


@dataclass
class DecoderModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast (last_hidden_state, cache, hidden_states) + MoE statistics."""

    aux_loss: torch.Tensor | None = None  # () mean load-balancing loss over MoE layers (None if dense)
    dropped_tokens: torch.Tensor | None = None  # () token->expert assignments over capacity, all layers


@dataclass
class DecoderCausalLMOutput(MoeCausalLMOutputWithPast):
    """loss (LM loss + router_aux_loss_coef * aux_loss), aux_loss, logits, cache, ... + dropped_tokens."""

    dropped_tokens: torch.Tensor | None = None


@dataclass
class DecoderSequenceClassifierOutput(SequenceClassifierOutputWithPast):
    aux_loss: torch.Tensor | None = None
    dropped_tokens: torch.Tensor | None = None


# --------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (https://arxiv.org/abs/1910.07467)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, liger: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.liger = liger  # config.use_liger_kernel: one fused kernel on CUDA (align/model/kernels.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(self.liger, x):
            return kernels.rms_norm(x, self.weight, self.variance_epsilon)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hs) -> (B, nkv * n_rep, S, hs): each kv head serves n_rep query heads (GQA)."""
    if n_rep == 1:
        return x
    B, nkv, S, hs = x.shape
    return x[:, :, None, :, :].expand(B, nkv, n_rep, S, hs).reshape(B, nkv * n_rep, S, hs)


def _allowed(mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """A bool (B|1, 1, T, S) mask, True = may attend: the bool mask as is, an additive float mask's zeros, or
    plain causality (the T queries are the last T of the S keys) when there is none."""
    if mask is None:
        return (torch.arange(S, device=device)[None, :] <= torch.arange(S - T, S, device=device)[:, None])[None, None]
    return mask if mask.dtype == torch.bool else mask == 0


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Manual softmax(q k^T * scale + mask) v: slow, but returns the probabilities (B, nh, T, S) for inspection.
    query (B, nh, T, hs), key/value (B, nkv, S, hs) -> (B, T, nh, hs), probabilities."""
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, nh, T, S)
    allowed = _allowed(attention_mask, query.shape[2], k.shape[2], query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


@dataclass
class ChunkedPositions:
    """Dual chunk attention's rotations (An et al. 2024, https://arxiv.org/abs/2402.17463), from chunk size s and
    local window w. Keys always sit at p mod s. Queries take one position per kind of key:
      intra (key in the query's chunk):      p mod s           -> distances 0 .. s-1 (the true ones)
      successive (key in the previous chunk): min(p mod s + s, s + w) -> the true distance while it is <= s + w
      inter (key in an earlier chunk):       s + w             -> distances w+1 .. s+w
    so no query-key distance exceeds s + w. cos/sin are (B, T, hs); chunk ids (B, T) of the queries and (B, S)
    of every key (cache included); the remapped integer positions are kept for inspection and tests."""

    intra: tuple[torch.Tensor, torch.Tensor]
    successive: tuple[torch.Tensor, torch.Tensor]
    inter: tuple[torch.Tensor, torch.Tensor]
    query_chunk: torch.Tensor
    key_chunk: torch.Tensor
    query_positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # intra, successive, inter (B, T)
    key_positions: torch.Tensor  # (B|1, S) p mod s
    query_scale: torch.Tensor | None = None  # (B, T) logit multiplier (the attention temperature), None = 1


def chunk_masks(allowed: torch.Tensor, pos: ChunkedPositions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an allowed-mask (B|1, 1, T, S) into the intra, successive and inter keys of each query."""
    qc, kc = pos.query_chunk[:, None, :, None], pos.key_chunk[:, None, None, :]  # (B, 1, T, 1), (B, 1, 1, S)
    return allowed & (kc == qc), allowed & (kc == qc - 1), allowed & (kc < qc - 1)


def dual_chunk_attention_eager(module, queries, key, value, masks, scaling, dropout=0.0):
    """The paper's form: one softmax per kind of key, merged exactly through their log-sum-exps.
    queries: 3 x (B, nh, T, hs) (intra, successive, inter rotations); masks: 3 x (B, 1, T, S) bool."""
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    outs, lses = [], []
    for q, m in zip(queries, masks):
        scores = (torch.matmul(q, k.transpose(2, 3)) * scaling).float().masked_fill(~m, float("-inf"))  # (B,nh,T,S)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, nh, T, 1); -inf where the kind has no key
        probs = torch.exp(scores - lse.clamp(min=torch.finfo(scores.dtype).min)).nan_to_num(0.0)
        probs = F.dropout(probs, p=dropout, training=module.training)
        outs.append(torch.matmul(probs.to(v.dtype), v))
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # (B, nh, T, 1) over all keys
    y = sum(torch.exp(part - lse).nan_to_num(0.0).to(o.dtype) * o for part, o in zip(lses, outs))
    return y.transpose(1, 2).contiguous()  # (B, T, nh, hs)


def _key_span(key_chunk: torch.Tensor, lo, hi) -> tuple[int, int]:
    """The index range [a, b) of the keys in chunks lo..hi of any row (positions grow along the keys)."""
    hit = ((key_chunk >= lo) & (key_chunk <= hi)).any(dim=0).nonzero()
    return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)


def dual_chunk_attention_sdpa(module, queries, key, value, masks, pos, scaling, dropout=0.0, block: int = 256):
    """The same on SDPA, in one softmax per block of queries: the three query rotations side by side (dim 3*hs)
    against three key slices, each zero-padded into its rotation's slot (so slice r scores q_r . k): the
    query block's own chunks (intra), the chunks before them (successive) and everything earlier (inter). One
    softmax over the three slices, each masked to its kind, is exactly the log-sum-exp merge of three softmaxes,
    with no lse needed out of SDPA. The intra and successive slices are about a chunk long each, so the cost
    is ~2x plain attention, not 3x3."""
    hs = key.shape[-1]
    q3 = torch.cat(queries, dim=-1)  # (B, nh, T, 3hs)
    out = []
    for i in range(0, q3.shape[2], block):
        qc = pos.query_chunk[:, i : i + block]  # (B|1, t)
        lo, hi = qc.min(), qc.max()
        spans = (_key_span(pos.key_chunk, lo, hi), _key_span(pos.key_chunk, lo - 1, hi - 1),
                 _key_span(pos.key_chunk, -1, hi - 2))
        k3 = torch.cat([F.pad(key[:, :, a:b], (r * hs, (2 - r) * hs)) for r, (a, b) in enumerate(spans)], dim=2)
        v3 = torch.cat([value[:, :, a:b] for a, b in spans], dim=2)  # (B, nkv, S', hs)
        m3 = torch.cat([m[:, :, i : i + block, a:b] for m, (a, b) in zip(masks, spans)], dim=-1)  # (B|1, 1, t, S')
        m3 = m3 | ~m3.any(dim=-1, keepdim=True)  # a padding query with no key: any finite row, never read
        out.append(F.scaled_dot_product_attention(
            q3[:, :, i : i + block], k3, v3, attn_mask=m3, dropout_p=dropout if module.training else 0.0,
            scale=scaling, enable_gqa=module.num_key_value_groups > 1,
        ))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous()  # (B, T, nh, hs)


class Attention(nn.Module):
    """Causal self-attention with RoPE, GQA and a KV cache. The attention function comes from transformers'
    registry by `config._attn_implementation` (sdpa, eager, flash_attention_2, ...), as in Llama; with
    `dca_chunk_size` set, dual chunk attention (eager or SDPA form) instead."""

    is_causal = True  # read by the registry's functions

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # n_rep
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        C, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, C, bias=bias)
        self.o_proj.scaled_init = True  # residual projection: init std / sqrt(2 * n_layer)
        self.keep_probs = False  # set by DecoderModel for output_attentions (eager only)
        self.last_probs: torch.Tensor | None = None  # (B, nh, T, S) of the last forward when keep_probs

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | ChunkedPositions,  # cos, sin (B, T, hs)
        attention_mask: torch.Tensor | None,  # (B, 1, T, S) bool/float, or None = plain causal
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        liger = kernels.enabled(self.config.use_liger_kernel, x)  # fused kernels (CUDA only)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        # training: one matmul for q, k, v (PEFT-wrapped ones stay apart); not when decoding, where the weights'
        # concatenation would cost more than the matmul it saves
        if self.training and liger and kernels.plain_linear(*projs):
            qkv = F.linear(x, torch.cat([p.weight for p in projs]))  # (B, T, (nh + 2 nkv) hs)
            q, k, v = qkv.split([p.out_features for p in projs], dim=-1)
        else:
            q, k, v = (p(x) for p in projs)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(position_embeddings, ChunkedPositions):
            pos = position_embeddings
            # keys at p mod s (the cache holds them so rotated: no re-rotation at decode time)
            q_intra, k = apply_rotary_pos_emb(q, k, *pos.intra)
            q_succ = apply_rotary_pos_emb(q, q, *pos.successive)[0]
            queries = (q_intra, q_succ, apply_rotary_pos_emb(q, q, *pos.inter)[0])
            if pos.query_scale is not None:
                queries = tuple(qq * pos.query_scale[:, None, :, None].to(qq.dtype) for qq in queries)
            if self.config._attn_implementation not in ("sdpa", "eager", "align_fa4"):  # align_fa4: SDPA here
                raise ValueError("dual chunk attention runs on attn_implementation 'sdpa' or 'eager', got "
                                 f"{self.config._attn_implementation!r}")
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hs) past + new
            masks = chunk_masks(_allowed(attention_mask, T, k.shape[2], x.device), pos)
            if self.config._attn_implementation == "eager":
                y = dual_chunk_attention_eager(self, queries, k, v, masks, self.scaling, dropout)
            else:
                y = dual_chunk_attention_sdpa(self, queries, k, v, masks, pos, self.scaling, dropout)
        else:
            rotate = kernels.rope if liger else apply_rotary_pos_emb
            q, k = rotate(q, k, *position_embeddings)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hs) past + new
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            # sdpa: native GQA (enable_gqa) where torch's kernels take it, repeat_kv otherwise (transformers decides)
            y, probs = fn(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)  # (B,T,nh,hs)
            self.last_probs = probs if self.keep_probs else None
        return self.o_proj(y.reshape(B, T, -1))  # (B, T, nh*hs) re-assembled heads


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); mlp is SwiGLU or an MoE."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = (
            MoEFeedForward(config) if self.is_moe
            else SwiGLU(config.hidden_size, config.intermediate_size, config.mlp_bias, config.use_liger_kernel)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.use_liger_kernel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.use_liger_kernel)
        self.dropout = nn.Dropout(config.residual_dropout)  # on each branch before its residual add (GPT-2)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, C) positional: needed by reentrant gradient checkpointing
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,  # (B, T) bool, MoE routing skips padding
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = hidden_states
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, cache))
        if not self.is_moe:
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x))), None, None
        y, aux_loss, dropped = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + self.dropout(y), aux_loss, dropped


# --------------------------------------------------------------------------------------- models


class DecoderPreTrainedModel(PreTrainedModel):
    config_class = DecoderConfig
    config: DecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True  # through the registry; used only where flash-attn is installed
    _supports_flex_attn = False
    _supports_attention_backend = True

    def set_use_liger_kernel(self, on: bool = True) -> None:
        """Turn the fused-kernel path (config.use_liger_kernel, align/model/kernels.py) on or off after loading: what
        a trainer's `use_liger_kernel` argument does to align's decoder."""
        self.config.use_liger_kernel = on
        for m in self.modules():
            if isinstance(m, (RMSNorm, SwiGLU)):
                m.liger = on

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for Linear/Embedding, ones for RMSNorm (PreTrainedModel's default),
        and the residual projections (o_proj, down_proj, experts' down_proj) at std / sqrt(2 * n_layer)
        (GPT-2, https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf)."""
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "scaled_init", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)


def _as_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    # transformers 5.x renamed `past_key_values` to `cache` (old name removed in 5.40): accept both
    return cache if cache is not None else past_key_values


class DecoderModel(DecoderPreTrainedModel):
    """Embeddings -> N decoder layers -> final RMSNorm. Returns DecoderModelOutput (last_hidden_state, cache)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.use_liger_kernel)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def chunked_positions(
        self, x: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, S: int
    ) -> ChunkedPositions:
        """Dual chunk attention's rotations for the queries at position_ids (B, T) and the chunk of each of the S
        keys (positions from a 2D padding mask when there is one, as for the queries; else 0 .. S-1)."""
        s, w = self.config.dca_chunk_size, self.config.dca_local_window
        in_chunk = position_ids % s  # (B, T)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == S:
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        else:
            key_pos = torch.arange(S, device=x.device)[None]  # (1, S)
        q_pos = (in_chunk, (in_chunk + s).clamp(max=s + w), torch.full_like(position_ids, s + w))
        scale = None
        if self.config.dca_attention_scaling:  # (0.1 ln(seen / c) + 1)^2 past the trained length c, else 1
            seen = (position_ids + 1).float() / self.config.max_position_embeddings
            scale = (0.1 * torch.log(seen.clamp(min=1.0)) + 1.0) ** 2  # (B, T)
        return ChunkedPositions(
            *(self.rotary_emb(x, p) for p in q_pos),
            query_chunk=position_ids // s,
            key_chunk=key_pos // s,
            query_positions=q_pos,
            key_positions=key_pos % s,
            query_scale=scale,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = token, 0 = padding; or a 4D mask
        position_ids: torch.LongTensor | None = None,  # (B, T); None -> from attention_mask
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, C)
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,  # the attention probabilities of every layer (eager only)
        **kwargs,  # trainer extras (num_items_in_batch, ...) are ignored here
    ) -> DecoderModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        B, T, _ = inputs_embeds.shape
        cache = _as_cache(cache, past_key_values)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # the backward recompute would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        elif not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0

        made_positions = position_ids is None
        if made_positions:
            if attention_mask is not None and attention_mask.dim() == 2:
                # left padding: positions count real tokens only, so a padded row equals the unpadded one
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]  # (1, T)

        # (B, 1, T, S) mask from padding + causality + cache offset; None when plain causal suffices (sdpa is_causal)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            # positions made here are one sequence a row: no check for packed rows, which under torch.compile
            # cannot look at the values and builds a packed-rows mask for every batch
            position_ids=None if made_positions else position_ids,
        )
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            # A left-pad query sees no key at all; cuDNN's SDPA backward (bf16 on GPU) returns NaN for such rows,
            # and one NaN poisons every weight. Let those rows see every key: real rows are unchanged, and pad
            # outputs are never read.
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, S)
        token_mask = None
        if self.config.num_experts and attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -T:].bool()  # (B, T) MoE routes real tokens only

        x = self.embed_dropout(inputs_embeds)
        if self.config.dca_chunk_size is not None:
            position_embeddings = self.chunked_positions(x, position_ids, attention_mask, past + T)
        else:
            position_embeddings = self.rotary_emb(x, position_ids)  # cos, sin (B, T, hs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        all_hidden = [] if output_hidden_states else None
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and (self.config._attn_implementation != "eager" or self.config.dca_chunk_size):
            raise ValueError("output_attentions needs attn_implementation='eager' and no dual chunk attention, got "
                             f"{self.config._attn_implementation!r}, dca_chunk_size={self.config.dca_chunk_size}")
        for layer in self.layers:
            layer.self_attn.keep_probs = bool(output_attentions)
        aux_losses, dropped = [], []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(x)
            x, aux, drop = layer(
                x,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                cache=cache,
                token_mask=token_mask,
            )
            if aux is not None:
                aux_losses.append(aux)
                dropped.append(drop)
        x = self.norm(x)
        if all_hidden is not None:
            all_hidden.append(x)

        return DecoderModelOutput(
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(layer.self_attn.last_probs for layer in self.layers) if output_attentions else None,
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
            dropped_tokens=torch.stack(dropped).sum() if dropped else None,
        )


class DecoderForCausalLM(DecoderPreTrainedModel, GenerationMixin):
    """DecoderModel + lm_head (tied to embed_tokens when config.tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.model = DecoderModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # (B, T) next-token targets (shifted inside), -100 ignored
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,  # 0 = all; generate() asks for the last position only
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,  # num_items_in_batch (Trainer gradient accumulation) goes to the loss
    ) -> DecoderCausalLMOutput:
        out: DecoderModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_as_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        h, logits, loss = out.last_hidden_state, None, None  # h (B, T, C)
        if (
            labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0
            and kernels.plain_linear(self.lm_head) and kernels.loss_enabled(self.config.use_liger_kernel, h)
        ):
            # LM head + cross-entropy fused: the (B*T, V) logits are never made, so none are returned (as Liger's Llama)
            loss = kernels.causal_lm_loss(h, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
        else:
            logits = self.lm_head(slice_logits_to_keep(h, logits_to_keep))  # (B, T', V)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
                if self.training:
                    # the loss is what trains; the logits come back for metrics, detached. Under torch.compile an
                    # output that requires grad but gets none is handed a zero gradient: a (B, T, V) fill and read
                    # every step (0.5 of 27 ms in the 100M step on an H200; Liger's Llama returns no logits here)
                    logits = logits.detach()
        if loss is not None and out.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * out.aux_loss.to(loss.device)
        return DecoderCausalLMOutput(
            loss=loss,
            aux_loss=out.aux_loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            dropped_tokens=out.dropped_tokens,
        )


class ScoreHead(nn.Linear):
    """The score head: linear on the pooled hidden state; with config.score_loglik, plus `loglik_scale` times
    the response's mean token log-likelihood (one learned scale per label, saved with the head)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config.hidden_size, config.num_labels, bias=False)
        self.loglik_scale = (
            nn.Parameter(torch.full((config.num_labels,), float(config.score_loglik_init)))
            if config.score_loglik
            else None
        )

    def forward(self, h: torch.Tensor, loglik: torch.Tensor | None = None) -> torch.Tensor:  # (B, C), (B,)
        out = super().forward(h)  # (B, num_labels)
        if self.loglik_scale is not None and loglik is not None:
            out = out + self.loglik_scale * loglik[:, None]
        return out


class DecoderForSequenceClassification(DecoderPreTrainedModel):
    """DecoderModel + `score` head read at the last non-pad token (reward / value models).

    Pooling is LlamaForSequenceClassification's (transformers' GenericForSequenceClassification): the
    rightmost token != pad_token_id (works for left and right padding); without pad_token_id only
    batch size 1 is allowed and the last position is used; with inputs_embeds, the last position.

    With ``config.score_loglik`` the score also gets ``loglik_scale * mean log p(response token)`` under
    the tied LM head (the embeddings), the response being the tokens after the last
    ``config.response_token_id`` (the whole sequence when a row has none). Like SimPO's reward
    (https://arxiv.org/abs/2405.14734) it is length-normalised; unlike it, a linear head sits beside it.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DecoderModel(config)
        self.score = ScoreHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ScoreHead) and module.loglik_scale is not None:
            init.constant_(module.loglik_scale, float(self.config.score_loglik_init))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def response_loglik(self, h: torch.Tensor, input_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Mean log p(x_t | x_<t) over the response tokens of each row. h (B, T, C), input_ids/real (B, T)."""
        logp = F.log_softmax(F.linear(h[:, :-1], self.model.embed_tokens.weight).float(), dim=-1)  # (B, T-1, V)
        logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p of each next token
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        start = torch.zeros_like(input_ids[:, 0])  # (B,) the last response marker, else position 0
        if self.config.response_token_id is not None:
            start = (pos * (input_ids == self.config.response_token_id)).argmax(-1)
        resp = (pos[None, 1:] > start[:, None]) & real[:, 1:].bool()  # (B, T-1) targets inside the response
        return (logp * resp).sum(-1) / resp.sum(-1).clamp(min=1)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DecoderSequenceClassifierOutput:
        out: DecoderModelOutput = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_as_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state  # (B, T, C)
        batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
        if pad_token_id is None:
            last_non_pad_token = -1
        elif input_ids is not None:
            # rightmost token that is not padding: handles both left and right padding
            non_pad_mask = (input_ids != pad_token_id).to(h.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=h.device, dtype=torch.int32)
            last_non_pad_token = (token_indices * non_pad_mask).argmax(-1)
        else:
            last_non_pad_token = -1
            logger.warning_once(
                f"{self.__class__.__name__} will not detect padding tokens in `inputs_embeds`. Results may be "
                "unexpected if using padding tokens in conjunction with `inputs_embeds.`"
            )
        loglik = None
        if self.config.score_loglik:
            if input_ids is None:
                raise ValueError("score_loglik needs input_ids (the response tokens), got inputs_embeds only")
            real = attention_mask  # (B, T) 1 = a real token
            if real is None:
                real = input_ids != pad_token_id if pad_token_id is not None else torch.ones_like(input_ids)
            loglik = self.response_loglik(h, input_ids, real)
        pooled = h[torch.arange(batch_size, device=h.device), last_non_pad_token]  # (B, C)
        pooled_logits = self.score(pooled, loglik)  # (B, num_labels)

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
            if out.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * out.aux_loss.to(loss.device)
        return DecoderSequenceClassifierOutput(
            loss=loss,
            logits=pooled_logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            aux_loss=out.aux_loss,
            dropped_tokens=out.dropped_tokens,
        )
