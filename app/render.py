"""Turning store rows into what the annotator sees: safe Markdown, chats, the header.

Model text is untrusted. ``safe_markdown`` escapes ``<``, ``>`` and ``&`` everywhere except inside code
spans and fenced code blocks (where Markdown already shows characters literally), so
``<script>`` or ``<img onerror=...>`` in a response is *shown* as text and never parsed as HTML; the
Markdown component's own sanitiser stays on as a second line of defence.
"""

from __future__ import annotations

import html
import re
from typing import Any, Mapping, Sequence

_FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")
_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)  # inline code span


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


def _escape_outside_spans(text: str) -> str:
    out, pos = [], 0
    for m in _SPAN.finditer(text):
        out.append(_escape(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def safe_markdown(text: str | None) -> str:
    """Markdown source whose only HTML is what Markdown itself generates."""
    text = "" if text is None else str(text)
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None  # the opening fence while inside a code block
    for line in text.splitlines(keepends=True):
        if fence is None:
            m = _FENCE_OPEN.match(line)
            if m:
                out.append(_escape_outside_spans("".join(prose)))
                prose = []
                fence = m.group(1)
                out.append(line)
            else:
                prose.append(line)
        else:
            out.append(line)
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                fence = None
    out.append(_escape_outside_spans("".join(prose)))
    if fence is not None:  # unterminated fence: close it, as Markdown would at the end of the text
        out.append(("" if out[-1].endswith("\n") or not "".join(out) else "\n") + fence + "\n")
    return "".join(out)


ROLE_TITLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def as_messages(prompt: Any) -> list[dict]:
    """Store prompts are ``[{"role", "content"}]``; accept a bare string too."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in prompt]


def chat_messages(prompt: Any) -> list[dict]:
    """Messages for ``gr.Chatbot``: system turns folded into a labelled user-side note, content escaped."""
    out = []
    for m in as_messages(prompt):
        content = safe_markdown(m["content"])
        if m["role"] == "system":
            out.append({"role": "user", "content": f"**System:** {content}"})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": content})
        else:
            out.append({"role": "user", "content": content})
    return out


def response_markdown(text: str | None, messages: Sequence[Mapping[str, Any]] | None = None) -> str:
    """One response card's body; a multi-turn completion shows each turn with its role."""
    if messages and len(messages) > 1:
        parts = []
        for m in messages:
            role = ROLE_TITLES.get(str(m.get("role")), str(m.get("role")))
            parts.append(f"**{_escape(role)}:**\n\n{safe_markdown(m.get('content', ''))}")
        return "\n\n---\n\n".join(parts)
    if text is None or not str(text).strip():
        return "*(empty response)*"
    return safe_markdown(text)


def header_html(user: str | None, role: str | None, done: int = 0, assigned: int = 0,
                remaining: int | None = None, title: str = "align") -> str:
    """The top bar: app name, who is logged in, and a progress bar."""
    t = _escape(title)
    if not user:
        return f'<div class="al-header"><div class="al-brand">{t}</div></div>'
    pct = 0 if assigned <= 0 else min(100, round(100 * done / assigned))
    left = "" if remaining is None else f' · <b>{remaining}</b> left in queue'
    badge = ' <span class="al-badge">admin</span>' if role == "admin" else ""
    return (
        f'<div class="al-header"><div class="al-brand">{t}</div>'
        f'<div class="al-progress"><div class="al-progress-text"><b>{done}</b> / {assigned} labelled{left}</div>'
        f'<div class="al-bar"><div class="al-bar-fill" style="width:{pct}%"></div></div></div>'
        f'<div class="al-user">{_escape(user)}{badge}</div></div>'
    )
