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

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.data.prompts import Messages, as_messages
from align.models import default_device, load, load_tokenizer

logger = logging.getLogger("align.generate")


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
    fast: bool | None = None,
    compile: bool = False,
    context_overflow: str = "truncate",
) -> list[list[str]]:
    """Replies to each prompt: ``num_return_sequences`` strings per prompt, special tokens removed.

    ``fast``: static KV cache + CUDA-graph decode (align.fastgen); None = on for CUDA models it supports,
    HF ``generate`` otherwise (CPU, MoE, PEFT-wrapped). Greedy replies are the same either way. ``compile``: the
    fast path's decode step through torch.compile as well (2x faster decode on an H200, ~15 s of compile per
    new batch shape: for long or repeated generation). A prompt longer than the model's usable context (less
    max_new_tokens) is cut from the left with a warning (``context_overflow="truncate"``) or refused with a
    ValueError (``"error"``); see `fit_context`."""
    from align.fastgen import fast_generate, supports_fast_generate

    if fast is None:
        fast = model.device.type == "cuda" and supports_fast_generate(model)
    if seed is not None:
        torch.manual_seed(seed)
    from align.model.rope import usable_context

    ids = fit_context(prompt_ids(tokenizer, prompts), usable_context(model.config), max_new_tokens, context_overflow)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    eos = [tokenizer.eos_token_id, *stop_token_ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = [[] for _ in prompts]
    device = model.device
    shown = time.monotonic()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        if fast:
            rep = lambda t: t.repeat_interleave(num_return_sequences, 0).to(device)  # noqa: E731
            new = fast_generate(model, rep(input_ids), rep(mask), max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos,
                                pad_token_id=pad, compile=compile).cpu()
        else:
            new = model.generate(
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
            )[:, width:].cpu()
        for j, seq in enumerate(new):
            out[idx[j // num_return_sequences]].append(tokenizer.decode(seq, skip_special_tokens=True).strip())
        if time.monotonic() - shown > 15 and start + batch_size < len(order):  # a long evaluation shows progress
            logger.info("generated replies to %d of %d prompts", start + len(idx), len(order))
            shown = time.monotonic()
    return out


# ------------------------------------------------------------------------------------------ command
def read_prompts(path: str) -> list[tuple[dict, str | Messages]]:
    """(record, prompt) for each record of a data file (``align.data.formats.to_prompt``: a ``prompt``, a chat, an
    instruction, or a preference record's prompt, so the shared preference files give RL prompts); the record
    keeps its other fields (reward-function columns) but not a preference record's replies. A record with no
    prompt is a DataError naming the file and line."""
    from align.data.formats import location, read_records, to_prompt

    return [({k: v for k, v in rec.items() if k not in ("chosen", "rejected")}, to_prompt(rec, location(path, key)))
            for key, rec in read_records(path)]


@dataclasses.dataclass
class GenerateArgs:
    """``python -m align.generate``: replies from a causal LM for a prompts file, or for one prompt."""

    model_name_or_path: str = dataclasses.field(
        metadata={"help": "a run's final/, any HF causal LM dir or hub id, a LoRA adapter dir, a .gguf file",
                  "aliases": ["model"]})
    input: str | None = dataclasses.field(
        default=None, metadata={"help": "JSONL/JSON file, datasets dir: records with a 'prompt' (text or messages)"})
    output: str | None = dataclasses.field(
        default=None, metadata={"help": "output JSONL: each record + 'responses' (default: stdout)"})
    prompt: str | None = dataclasses.field(default=None, metadata={"help": "one prompt: print its replies"})
    num_return_sequences: int = dataclasses.field(default=1, metadata={"help": "replies per prompt"})
    max_new_tokens: int = 64
    do_sample: bool = dataclasses.field(default=False, metadata={"help": "sample (default: greedy)"})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64
    device: str | None = dataclasses.field(
        default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    context_overflow: str = dataclasses.field(
        default="truncate", metadata={"help": "a prompt past the model's usable context: 'truncate' (cut from the "
                                              "left, with a warning and a count) or 'error'"})

    def __post_init__(self):
        if self.context_overflow not in ("truncate", "error"):
            raise ValueError(f"context_overflow must be 'truncate' or 'error', got {self.context_overflow!r}")
        if (self.input is None) == (self.prompt is None):
            raise ValueError("give --input FILE or --prompt TEXT")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError("--num_return_sequences > 1 needs --do_sample (greedy replies would all be the same)")


def main(argv: list[str] | None = None) -> Any:
    from align.config import parse, run_command

    (a,) = run_command(parse, [GenerateArgs], argv, prog="python -m align.generate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from align.data.formats import DataError, write_jsonl

    try:
        rows = read_prompts(a.input) if a.input else [({"prompt": a.prompt}, a.prompt)]
        model = load(a.model_name_or_path, device=a.device or default_device())
        tok = load_tokenizer(a.model_name_or_path, "model_name_or_path")
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    replies = generate(model, tok, [p for _, p in rows], max_new_tokens=a.max_new_tokens, do_sample=a.do_sample,
                       temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                       num_return_sequences=a.num_return_sequences, batch_size=a.batch_size, seed=a.seed,
                       context_overflow=a.context_overflow)
    n = sum(map(len, replies))
    logger.info("%d replies in %.2fs on %s", n, time.perf_counter() - t0, model.device)
    if a.prompt is not None:
        print("\n".join(replies[0]))
        return replies[0]
    out = [{**rec, "responses": rs} for (rec, _), rs in zip(rows, replies)]
    write_jsonl(out, a.output)
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
