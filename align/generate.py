"""Loading a causal LM with its tokenizer, and batched chat generation with it.

Used by evaluation, the app (candidate generation) and the loop. Works on our decoder and on any HF
causal LM: prompts go through the tokenizer's chat template (the project's template is set on a
tokenizer that has none), batches are left-padded, sorted by length, and cut at eos or stop ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import align.model  # noqa: F401  (registers the Auto classes for our decoder)

Messages = list[dict[str, str]]


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer ready for chat: the project's chat template if it has none, and a pad token."""
    from align.data.chat import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a run's ``final/``, any HF model dir or hub id, or a LoRA adapter dir."""
    path = str(path)
    if Path(path).is_dir() and (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
    elif Path(path).exists() or "/" in path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        raise FileNotFoundError(f"model '{path}' not found: give a run's final/ dir, an HF model dir or a hub id")
    model.to(device or default_device()).eval()
    return model, load_tokenizer(path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    batch_size: int = 64,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> list[list[str]]:
    """Replies to each prompt: ``num_return_sequences`` strings per prompt, special tokens removed."""
    if seed is not None:
        torch.manual_seed(seed)
    texts = [
        tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    eos = [tokenizer.eos_token_id, *stop_token_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = [[] for _ in prompts]
    device = model.device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            num_return_sequences=num_return_sequences,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        new = gen[:, width:].cpu()
        for j, seq in enumerate(new):
            out[idx[j // num_return_sequences]].append(tokenizer.decode(seq, skip_special_tokens=True).strip())
    return out
