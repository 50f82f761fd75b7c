"""Log-probabilities of sampled replies under a policy and its reference: PPO's rollouts and the KL figure.

Prompts are left-padded (``left_pad``), the model sees position ids derived from the mask (``masked_inputs``),
and a reply's tokens after its first EOS are masked (``response_mask``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import selective_log_softmax

from align.generate import prompt_ids
from align.models import load


@contextlib.contextmanager
def reference_of(model: torch.nn.Module, ref_path: str | None) -> Iterator[torch.nn.Module]:
    """The reference policy: the same model with its LoRA adapters disabled, else the start model from disk."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    elif ref_path is None:
        yield model
    else:
        ref = load(ref_path, device=next(model.parameters()).device, key="reference")
        yield ref
        del ref


@functools.lru_cache(maxsize=None)
def _takes_position_ids(cls: type) -> bool:  # once per model class: masked_inputs runs on every PPO micro-batch
    return "position_ids" in inspect.signature(cls.forward).parameters


def masked_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Forward kwargs for a left-padded batch: position ids that start at 0 on each row's first real token, as
    ``generate`` uses, where the model takes them. RoPE models score the same without them; absolute-position
    ones (GPT-2) need them; some (ALiBi, e.g. BLOOM) take none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _takes_position_ids(type(base)):
        kw["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return kw


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keep_kwargs(model: torch.nn.Module, logits_to_keep: int) -> dict[str, int]:
    """``logits_to_keep`` for a causal LM that takes it (transformers' decoders, ours): the LM head then runs on the
    last positions only, not on the prompt's (PEFT passes it through to the base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": logits_to_keep} if logits_to_keep and _takes_logits_to_keep(type(base)) else {}


def last_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` positions of (B, S, ...) (all for 0); a no-op on logits the model already cut to ``n``."""
    return x[:, -n:] if n and x.size(1) != n else x


def left_pad(ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and attention mask of token lists left-padded to the longest."""
    L = max(map(len, ids))
    q = torch.full((len(ids), L), pad, dtype=torch.long)
    m = torch.zeros_like(q)
    for i, x in enumerate(ids):
        q[i, L - len(x):], m[i, L - len(x):] = torch.tensor(x), 1
    return q, m


def response_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens ``input_ids[:, context_length:]`` under ``model``: logits of the
    response's positions only, the chosen token's log-prob without a (B, T, V) log-softmax."""
    T = input_ids.size(1) - context_length
    logits = model(**masked_inputs(model, input_ids, attention_mask), **keep_kwargs(model, T + 1)).logits
    logits = last_positions(logits, T + 1)[:, :-1]
    return selective_log_softmax(logits if logits.is_cuda else logits.float(), input_ids[:, context_length:],
                                 temperature=temperature)


@torch.no_grad()
def sample_with_kl(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], ref_path: str | None,
    *, max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 50, seed: int = 0,
) -> tuple[list[str], list[float]]:
    """Replies sampled at ``temperature`` and each one's KL(policy || reference) estimate: the sum over its
    tokens of log pi(y_t) - log pi_ref(y_t) (unbiased for samples from pi; 0 when pi == pi_ref)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    kls: list[float] = []
    batches: list[tuple] = []
    for s in range(0, len(prompts), batch_size):
        q, qm = left_pad(prompt_ids(tokenizer, prompts[s : s + batch_size]), pad)
        q, qm, L = q.to(device), qm.to(device), q.size(1)
        out = model.generate(input_ids=q, attention_mask=qm, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        resp = out[:, L:]
        rmask = response_mask(resp, tokenizer.eos_token_id)
        full, fmask = torch.cat([q, resp], 1), torch.cat([qm, rmask], 1)
        lp = response_logprobs(model, full, fmask, L, temperature)
        batches.append((full, fmask, L, rmask, lp))
        replies += [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(resp, rmask)]
    with reference_of(model, ref_path) as ref:  # from disk once, not per batch
        for full, fmask, L, rmask, lp in batches:
            kls += ((lp - response_logprobs(ref, full, fmask, L, temperature)) * rmask).sum(1).tolist()
    model.train(was_training)
    return replies, kls


def response_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) 1 up to and including the first eos of each response, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_token_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first eos
    return (~after).long()


