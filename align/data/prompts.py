"""One identity for a prompt, and one train/test split by it.

A prompt is a string (one user turn) or a list of chat messages; both name the same prompt when the
string is the one user message. Its identity is the sha256 of its messages as canonical JSON (sorted
keys, no spaces): the store's ``content_hash``, the reward model's, DPO's and the evaluators' alike, so
every command holds out the same prompts from the same file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

Messages = list[dict[str, Any]]


def as_messages(prompt: str | Messages, role: str = "user") -> Messages:
    """A string as one ``role`` message; a message list as it is."""
    return [{"role": role, "content": prompt}] if isinstance(prompt, str) else list(prompt)


def content_hash(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (the store's ``content_hash`` of prompts and responses)."""
    canon = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def prompt_hash(prompt: str | Messages) -> str:
    return content_hash(as_messages(prompt))


def split_of(prompt: str | Messages, test_fraction: float, seed: str = "") -> str:
    """'test' for a ``test_fraction`` share of prompts, else 'train'; ``seed`` salts the draw."""
    return split_of_hash(prompt_hash(prompt), test_fraction, seed)


def split_of_hash(prompt_hash: str, test_fraction: float, seed: str = "") -> str:
    """``split_of`` for a prompt known by its hash (the store's rows)."""
    if test_fraction <= 0:
        return "train"
    u = int(hashlib.sha256(f"{seed}{prompt_hash}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if u < test_fraction else "train"
