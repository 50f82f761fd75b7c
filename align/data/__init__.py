"""Data: the built-in task world (`align.data.world`) and the chat format (`align.data.chat`).

Names are imported lazily so `python -m align.data.world` runs without a double import.
"""

import importlib

_EXPORTS = {
    "chat": ["BOS", "CHAT_TEMPLATE", "EOS", "PAD", "ROLE_TOKENS", "SPECIAL_TOKENS", "UNK", "ensure_chat_template",
             "render_chat"],
    "world": ["STYLES", "TASKS", "Example", "World", "check", "example_from_dict", "parse_reply", "render", "reward"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"align.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'align.data' has no attribute {name!r}")
