"""The project's chat format: special tokens, the Jinja chat template and a pure-Python renderer.

    <|bos|><|system|>You are helpful.<|eos|><|user|>What is 3 + 4?<|eos|><|assistant|>The answer is 7.<|eos|>

One BOS at the very start (the tokenizer itself adds none); every turn is a role marker, the content
and `<|eos|>`. Each assistant turn's content *and* its `<|eos|>` sit inside
`{% generation %}...{% endgeneration %}`, so `return_assistant_tokens_mask=True` (and TRL's
`assistant_only_loss=True`) train exactly on what the model must generate, including when to stop.
`add_generation_prompt=True` appends `<|assistant|>`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS.values()]  # ids 0..6 in trained tokenizers

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = False,
                bos: bool = True) -> str:
    """The same text as `tokenizer.apply_chat_template(messages, tokenize=False)`, without Jinja."""
    parts = [BOS] if bos else []
    for m in messages:
        role = m["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role {role!r} in message {dict(m)!r}")
        parts.append(f"{ROLE_TOKENS[role]}{m['content']}{EOS}")
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give a Hugging Face tokenizer without a chat template this project's one (in place)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
