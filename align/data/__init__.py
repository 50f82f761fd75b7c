"""Data: the built-in task world (`align.data.world`) and the chat format (`align.data.chat`)."""

from align.data.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK, ensure_chat_template, render_chat
from align.data.world import STYLES, TASKS, Example, World, check, example_from_dict, parse_reply, render, reward

__all__ = [
    "BOS", "CHAT_TEMPLATE", "EOS", "PAD", "ROLE_TOKENS", "SPECIAL_TOKENS", "UNK", "ensure_chat_template",
    "render_chat", "STYLES", "TASKS", "Example", "World", "check", "example_from_dict", "parse_reply", "render",
    "reward",
]
