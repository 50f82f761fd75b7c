"""Loading a causal LM with its tokenizer, and batched chat generation with it.

Used by evaluation, the app (candidate generation) and the loop. Works on our decoder and on any HF
causal LM: prompts go through the tokenizer's chat template (the project's template is set on a
tokenizer that has none), batches are left-padded, sorted by length, and cut at eos or stop ids.

    python -m align.generate --model DIR --input prompts.jsonl --output cands.jsonl --num_return_sequences 4 \
        --do_sample --temperature 1.0          # adds "responses" to each record
    python -m align.score rank --model RM_DIR --input cands.jsonl --output best.jsonl   # then best-of-n
    python -m align.generate --model DIR --prompt "What is 3 + 4?"     # prints the reply

Input records need a ``prompt`` (text or messages); a bad record stops the command before any generation,
naming its file and line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

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


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | Messages]) -> list[list[int]]:
    """Token ids of each prompt through the chat template, ending with the assistant's generation prompt."""
    texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def fit_context(ids: list[list[int]], limit: int | None, max_new_tokens: int, overflow: str) -> list[list[int]]:
    """Prompts that fit `limit` (the model's usable context, align.model.rope.usable_context) with room for
    max_new_tokens: overflow="truncate" keeps each long prompt's last tokens (its end, where the question and
    the generation prompt are) and logs how many were cut; overflow="error" refuses with a ValueError."""
    if overflow not in ("truncate", "error"):
        raise ValueError(f"context_overflow must be 'truncate' or 'error', got {overflow!r}")
    if limit is None:
        return ids
    room = limit - max_new_tokens
    if room <= 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's usable "
                         f"context of {limit} tokens")
    long = [i for i, x in enumerate(ids) if len(x) > room]
    if not long:
        return ids
    what = (f"{len(long)} of {len(ids)} prompts are longer than the usable context ({limit} tokens) less "
            f"max_new_tokens ({max_new_tokens}): {room}; the longest has {max(len(ids[i]) for i in long)} tokens")
    if overflow == "error":
        raise ValueError(f"{what} (prompt indices {long[:10]}); pass context_overflow='truncate' to cut them")
    cut = sum(len(ids[i]) - room for i in long)
    logging.getLogger("align.generate").warning("%s; cut %d tokens from their left", what, cut)
    return [x[-room:] if len(x) > room else x for x in ids]


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
    context_overflow: str = "truncate",
) -> list[list[str]]:
    """Replies to each prompt: ``num_return_sequences`` strings per prompt, special tokens removed.

    A prompt longer than the model's usable context (less max_new_tokens) is cut from the left with a warning
    (``context_overflow="truncate"``) or refused with a ValueError (``"error"``); see `fit_context`."""
    if seed is not None:
        torch.manual_seed(seed)
    from align.model.rope import usable_context

    ids = fit_context(prompt_ids(tokenizer, prompts), usable_context(model.config), max_new_tokens, context_overflow)
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


# ------------------------------------------------------------------------------------------ command
def read_prompts(path: str) -> list[tuple[dict, str | Messages]]:
    """(record, prompt) for each record of a data file; a record without a usable prompt is a DataError."""
    from align.data.formats import DataError, location, normalize_messages, read_records

    out = []
    for key, rec in read_records(path):
        where, prompt = location(path, key), rec.get("prompt")
        if isinstance(prompt, list):
            prompt = normalize_messages(prompt, where, "prompt")
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: need a 'prompt' (text or messages); record has {sorted(rec)}")
        out.append((rec, prompt))
    return out


def main(argv: list[str] | None = None) -> Any:
    ap = argparse.ArgumentParser(prog="python -m align.generate", description="Sample replies from a causal LM")
    ap.add_argument("--model", required=True, help="a run's final/, any HF causal LM dir or hub id, a LoRA adapter dir")
    ap.add_argument("--input", help="JSONL/JSON file or datasets dir of records with a 'prompt' (text or messages)")
    ap.add_argument("--output", help="output JSONL: each record + 'responses' (default: stdout)")
    ap.add_argument("--prompt", help="one prompt: print its replies")
    ap.add_argument("--num_return_sequences", "--num-return-sequences", type=int, default=1)
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--do_sample", "--do-sample", action="store_true", help="sample (default: greedy)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", "--top-p", type=float, default=1.0)
    ap.add_argument("--top_k", "--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", "--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    a = ap.parse_args(argv)
    if (a.input is None) == (a.prompt is None):
        ap.error("give --input FILE or --prompt TEXT")
    if a.num_return_sequences > 1 and not a.do_sample:
        ap.error("--num_return_sequences > 1 needs --do_sample (greedy replies would all be the same)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from align.data.formats import DataError, write_jsonl

    try:
        rows = read_prompts(a.input) if a.input else [({"prompt": a.prompt}, a.prompt)]
        model, tok = load_causal_lm(a.model, device=a.device)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    replies = generate(model, tok, [p for _, p in rows], max_new_tokens=a.max_new_tokens, do_sample=a.do_sample,
                       temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                       num_return_sequences=a.num_return_sequences, batch_size=a.batch_size, seed=a.seed)
    n = sum(map(len, replies))
    logging.getLogger("align.generate").info("%d replies in %.2fs on %s", n, time.perf_counter() - t0, model.device)
    if a.prompt is not None:
        print("\n".join(replies[0]))
        return replies[0]
    out = [{**rec, "responses": rs} for (rec, _), rs in zip(rows, replies)]
    write_jsonl(out, a.output)
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
