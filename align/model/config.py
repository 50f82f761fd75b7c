"""DecoderConfig: the hyper-parameters of align's base decoder (LLaMA blueprint, optional MoE).

transformers 5.x configs are dataclasses: fields below are the constructor's keyword arguments,
`__post_init__` derives/validates. RoPE follows HF Llama's 5.x convention exactly: everything lives
in `rope_parameters` ({"rope_type", "rope_theta", "factor", ...}); the legacy `rope_theta=` and
`rope_scaling=` keyword arguments are accepted and folded into it, so Llama <-> align conversion
copies one dict and is lossless.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import PretrainedConfig

from .rope import usable_context

# RoPE variants the rotary embedding implements (see align/model/rope.py)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class DecoderConfig(PretrainedConfig):
    model_type: ClassVar[str] = "align_decoder"
    # GRPO reloads its reference model from `config._name_or_path` and reads `auto_map` (must exist).
    auto_map: ClassVar[dict[str, str]] = {}
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]

    # --- size -------------------------------------------------------------------------------------
    vocab_size: int = 32000  # LLaMA's SentencePiece vocabulary; set to your tokenizer's size
    hidden_size: int = 768  # d_model (GPT-2 small width)
    intermediate_size: int | None = None  # SwiGLU width; None -> derived from multiple_of (below)
    multiple_of: int = 256  # LLaMA: intermediate = multiple_of-rounded 2/3 * 4 * hidden
    num_hidden_layers: int = 12  # transformer blocks
    num_attention_heads: int = 12  # query heads (head_dim = hidden / heads = 64)
    num_key_value_heads: int | None = None  # GQA kv heads; None -> = num_attention_heads (MHA)
    head_dim: int | None = None  # derived: hidden_size // num_attention_heads (kept for HF parity)
    max_position_embeddings: int = 2048  # context the model is trained for (LLaMA-1)
    # --- positions --------------------------------------------------------------------------------
    # {"rope_type": "default"|"linear"|"dynamic"|"yarn"|"llama3", "rope_theta": 10000.0, "factor": ...,
    #  "original_max_position_embeddings": ..., yarn: "beta_fast", "beta_slow", "attention_factor"}
    rope_parameters: dict | None = None  # None -> {"rope_type": "default", "rope_theta": 10000.0}
    # --- numerics / regularisation ----------------------------------------------------------------
    rms_norm_eps: float = 1e-6  # LLaMA's RMSNorm epsilon
    hidden_act: str = "silu"  # SwiGLU gate activation (kept for HF parity; only silu is used)
    attention_bias: bool = False  # LLaMA has no biases in q/k/v/o
    mlp_bias: bool = False  # ... nor in the MLP
    attention_dropout: float = 0.0  # dropout on attention probabilities (0 for pretraining at scale)
    embedding_dropout: float = 0.0  # dropout on the token embeddings (GPT-2/nanoGPT's `drop`)
    residual_dropout: float = 0.0  # dropout on each residual branch (attention and MLP outputs) before the add
    initializer_range: float = 0.02  # std of normal init (GPT-2); o_proj/down_proj get /sqrt(2*layers)
    tie_word_embeddings: bool = True  # share lm_head with embed_tokens (saves vocab*hidden params)
    use_cache: bool = True  # return a KV cache from forward (generation)
    # the fused fast path (align/model/kernels.py): torch's fused RMSNorm, Liger's RoPE, the LM head + cross-entropy
    # chunked without logits, one matmul for q/k/v and one for gate/up, on CUDA where liger-kernel is installed;
    # elsewhere the plain ops. TRL/transformers' TrainingArguments field has the same name.
    use_liger_kernel: bool = False
    # --- attention and long context ------------------------------------------------------------------
    # The attention function is chosen by `attn_implementation` (PretrainedConfig's own, as in Llama): "sdpa"
    # (default), "eager" (manual softmax: returns the probabilities, for inspection), "flash_attention_2"
    # where installed -- through transformers' attention-function registry.
    # Dual chunk attention (An et al. 2024, https://arxiv.org/abs/2402.17463; Qwen2.5-1M): positions are cut into
    # chunks of dca_chunk_size; no query-key distance exceeds dca_chunk_size + dca_local_window, which must stay
    # below max_position_embeddings. None = off (ordinary attention).
    dca_chunk_size: int | None = None
    dca_local_window: int | None = None  # successive-chunk window w; None -> max_position_embeddings // 8
    # YaRN's attention temperature under DCA, as ChunkLlama applies it: a query at position p > trained length c
    # has its logits scaled by (0.1 ln(p / c) + 1)^2, against the dilution of attention over many more keys
    dca_attention_scaling: bool = True
    # Usable context for generation (align.generate cuts or refuses longer prompts); None -> derived:
    # max_position_embeddings x the RoPE factor of scaled RoPE, none (unlimited) with dual chunk attention.
    max_context_length: int | None = None
    # --- mixture of experts (num_experts = 0 -> dense) --------------------------------------------
    num_experts: int = 0  # experts per MoE layer; 0 = every layer is a dense SwiGLU MLP
    num_experts_per_tok: int = 2  # top-k routing (Mixtral/GShard use 2)
    moe_layer_freq: int = 1  # every n-th layer is MoE (1 = all, 2 = every other like Switch/GShard)
    moe_intermediate_size: int | None = None  # expert SwiGLU width; None -> intermediate_size
    expert_capacity_factor: float | None = 1.25  # training capacity (Switch); None = no dropping
    eval_capacity_factor: float | None = None  # capacity in eval/generation; None = no dropping
    router_noise: float = 0.0  # std of Gaussian noise on router logits in training (noisy top-k)
    # "all": every token goes to its top-k experts; "random" (GShard, top-2 only): in training the second
    # expert serves a token with probability min(1, 2 * its renormalised gate), so weak seconds are skipped
    second_expert_policy: str = "all"
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added to the LM loss (0 if dense)
    # --- sequence classification (reward models) --------------------------------------------------
    # Add a learned multiple of the response's mean token log-likelihood under the model's own (tied) LM
    # head to the score: a small backbone ranks a right answer above a wrong one by likelihood long before a
    # fresh linear head on the last token learns to (docs/reward.md, "The likelihood term").
    score_loglik: bool = False
    score_loglik_init: float = 1.0  # initial scale of that term (learned with the head)
    response_token_id: int | None = None  # the response is what follows its last occurrence (<|assistant|>)
    # --- special tokens ---------------------------------------------------------------------------
    pad_token_id: int | None = None  # needed for batched sequence classification pooling
    bos_token_id: int | None = 1  # LLaMA convention
    eos_token_id: int | list[int] | None = 2  # LLaMA convention; generate() stops on it

    def __post_init__(self, **kwargs: Any) -> None:
        # Derived sizes first (HF's RoPE helpers read head_dim).
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "multiple_of", "moe_layer_freq")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # LLaMA: 2/3 of the 4x GPT MLP (SwiGLU has 3 matrices), rounded up to multiple_of
            hidden = int(2 * 4 * self.hidden_size / 3)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_experts ({self.num_experts})"
                )
            for name in ("expert_capacity_factor", "eval_capacity_factor"):
                value = getattr(self, name)
                if value is not None and value <= 0:
                    raise ValueError(f"{name} must be > 0 or None (no capacity limit), got {value}")
            if self.router_noise < 0:
                raise ValueError(f"router_noise must be >= 0, got {self.router_noise}")
        for name in ("attention_dropout", "embedding_dropout", "residual_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.second_expert_policy not in ("all", "random"):
            raise ValueError(f"second_expert_policy must be 'all' or 'random', got {self.second_expert_policy!r}")
        if self.second_expert_policy == "random" and self.num_experts and self.num_experts_per_tok != 2:
            raise ValueError("second_expert_policy='random' (GShard) needs num_experts_per_tok=2, got "
                             f"{self.num_experts_per_tok}")
        if self.max_context_length is not None:
            _positive(self, "max_context_length")
        if self.dca_chunk_size is not None:
            _positive(self, "dca_chunk_size")
            if self.dca_local_window is None:
                self.dca_local_window = self.max_position_embeddings // 8
            w, s = self.dca_local_window, self.dca_chunk_size
            if not isinstance(w, int) or not 0 <= w < s:
                raise ValueError(f"dca_local_window must be an integer in [0, dca_chunk_size={s}), got {w!r}")
            if s + w >= self.max_position_embeddings:
                raise ValueError(
                    f"dual chunk attention needs dca_chunk_size + dca_local_window ({s} + {w}) < "
                    f"max_position_embeddings ({self.max_position_embeddings}): that sum is the longest "
                    "query-key distance it produces"
                )
        if self.score_loglik and not self.tie_word_embeddings:
            raise ValueError("score_loglik reads the LM head through the tied embeddings: it needs "
                             f"tie_word_embeddings=True, got {self.tie_word_embeddings}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if not self.num_experts:
            # A dense model has no load-balancing loss. TRL decides "this is an MoE model" from a non-zero
            # router_aux_loss_coef next to the `output_router_logits` that its SFTTrainer writes into the
            # config, and would then ask a dense model for router logits.
            self.router_aux_loss_coef = 0.0

        # RoPE: legacy rope_theta= / rope_scaling= kwargs are folded into rope_parameters by the base
        # class (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict) -- same code path as Llama.
        rope = kwargs.get("rope_scaling") or self.rope_parameters or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
        if rope_type != "default" and not isinstance(rope.get("factor"), (int, float)):
            raise ValueError(f"rope_parameters['factor'] is required for rope_type={rope_type!r}, got {rope}")
        super().__post_init__(**kwargs)

    # `rope_theta` reads/writes rope_parameters["rope_theta"] (HF 5.x keeps it inside the dict).
    @property
    def rope_theta(self) -> float:
        return (getattr(self, "rope_parameters", None) or {}).get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters = {**(self.rope_parameters or {"rope_type": "default"}), "rope_theta": value}

    @property
    def usable_context(self) -> int | None:
        """Longest prompt + generation this config is meant for (None: no limit). See max_context_length."""
        return usable_context(self)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` uses the MoE feed-forward (every moe_layer_freq-th layer, 1-based)."""
        return self.num_experts > 0 and (layer_idx + 1) % self.moe_layer_freq == 0


def _positive(config: DecoderConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
