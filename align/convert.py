"""Convert between align's decoder and HF Llama, and merge LoRA adapters into standalone models.

    python -m align.convert to-llama SRC DST      # align_decoder dir -> LlamaFor{CausalLM,SequenceClassification} dir
    python -m align.convert from-llama SRC DST    # Llama dir -> align_decoder dir
    python -m align.convert merge SRC DST [--base BASE]   # PEFT LoRA adapter dir (+ its base) -> merged model dir

The architectures are the same network with the same parameter names, so conversion maps the config and
copies the state dict verbatim (lossless; RoPE parameters are copied as one dict). MoE models have no
Llama equivalent and are refused. Tokenizer files in SRC (or, for merge, the base dir) are copied along.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
)

from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification

# config fields shared 1:1 by DecoderConfig and LlamaConfig
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
    "attention_bias", "mlp_bias", "attention_dropout", "initializer_range", "tie_word_embeddings",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
)
# label/task fields carried along for sequence classification heads
TASK_FIELDS = ("id2label", "label2id", "problem_type")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
PAIRS = {  # ours <-> llama, per head
    DecoderForCausalLM: LlamaForCausalLM,
    DecoderForSequenceClassification: LlamaForSequenceClassification,
}


def _config_kwargs(config) -> dict:
    kwargs = {name: getattr(config, name) for name in SHARED_FIELDS}
    kwargs.update({name: getattr(config, name) for name in TASK_FIELDS})
    kwargs["num_labels"] = config.num_labels
    kwargs["rope_parameters"] = json.loads(json.dumps(config.rope_parameters))  # deep copy
    return kwargs


def _copy_weights(src: PreTrainedModel, dst_cls, dst_config) -> PreTrainedModel:
    dst = dst_cls(dst_config).to(src.dtype)
    dst.load_state_dict(src.state_dict(), strict=True)  # same names: a verbatim copy
    dst.tie_weights()
    if getattr(src, "generation_config", None) is not None and hasattr(dst, "generation_config"):
        dst.generation_config = src.generation_config
    return dst.eval() if not src.training else dst


def to_llama(model: DecoderForCausalLM | DecoderForSequenceClassification) -> PreTrainedModel:
    """align decoder -> LlamaForCausalLM (or LlamaForSequenceClassification), same weights."""
    config = model.config
    if config.num_experts:
        raise ValueError(
            f"to_llama: MoE models have no Llama equivalent (config.num_experts={config.num_experts}); "
            "only dense models (num_experts=0) convert"
        )
    if getattr(config, "score_loglik", False):
        raise ValueError("to_llama: a reward model with score_loglik (the response log-likelihood term) has no Llama "
                         "equivalent; LlamaForSequenceClassification has only the linear score head")
    llama_cls = PAIRS.get(type(model))
    if llama_cls is None:
        raise ValueError(f"to_llama: expected one of {[c.__name__ for c in PAIRS]}, got {type(model).__name__}")
    return _copy_weights(model, llama_cls, LlamaConfig(**_config_kwargs(config)))


def from_llama(model: LlamaForCausalLM | LlamaForSequenceClassification) -> PreTrainedModel:
    """LlamaForCausalLM (or LlamaForSequenceClassification) -> align decoder, same weights."""
    config = model.config
    if config.hidden_act != "silu":
        raise ValueError(f"from_llama: only hidden_act='silu' (SwiGLU) is supported, got {config.hidden_act!r}")
    ours = {v: k for k, v in PAIRS.items()}.get(type(model))
    if ours is None:
        raise ValueError(
            f"from_llama: expected LlamaForCausalLM or LlamaForSequenceClassification, got {type(model).__name__}"
        )
    return _copy_weights(model, ours, DecoderConfig(**_config_kwargs(config)))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in src to dst; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _load(src: str, classes: dict[str, type]) -> PreTrainedModel:
    """Load src with the class its config.json's `architectures` names (CausalLM by default)."""
    config = AutoConfig.from_pretrained(src)
    arch = (config.architectures or ["ForCausalLM"])[0]
    auto = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModelForCausalLM
    model = auto.from_pretrained(src)
    if type(model) not in classes.values():
        raise ValueError(f"{src}: expected one of {sorted(classes)}, found {type(model).__name__} ({arch})")
    return model


def convert_dir(direction: str, src: str, dst: str) -> PreTrainedModel:
    if direction == "to-llama":
        model = to_llama(_load(src, {c.__name__: c for c in PAIRS}))
    else:
        model = from_llama(_load(src, {c.__name__: c for c in PAIRS.values()}))
    Path(dst).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)  # safetensors
    copy_tokenizer_files(src, dst)
    return model


@dataclass(kw_only=True)
class _Paths:
    src: str = field(metadata={"positional": True, "help": "the model dir to read"})
    dst: str = field(metadata={"positional": True, "help": "the model dir to write"})


@dataclass(kw_only=True)
class ToLlama(_Paths):
    """align decoder dir -> Llama dir (LlamaForCausalLM / LlamaForSequenceClassification)"""


@dataclass(kw_only=True)
class FromLlama(_Paths):
    """Llama dir -> align decoder dir"""


@dataclass(kw_only=True)
class Merge(_Paths):
    """merge a PEFT LoRA adapter into its base and save a standalone model"""

    src: str = field(metadata={"positional": True, "help": "adapter dir (adapter_config.json + adapter weights)"})
    base: str | None = field(default=None, metadata={"help": "base model dir (default: the adapter's "
                                                              "base_model_name_or_path)"})


VERBS = {"to-llama": ToLlama, "from-llama": FromLlama, "merge": Merge}


def main(argv: list[str] | None = None) -> int:
    from align.config import parse_verb, run_command

    command, args = run_command(parse_verb, VERBS, argv, prog="python -m align.convert", about=__doc__)
    try:
        if command == "merge":
            from align.models import merge_adapter

            model = merge_adapter(args.src, args.dst, base=args.base)
        else:
            model = convert_dir(command, args.src, args.dst)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"{command}: {args.src} -> {args.dst} ({type(model).__name__}, {n:,} parameters)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
