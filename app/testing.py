"""Helpers for tests and demos: seed a store with pairs and accounts, serve the app on a free port."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

XSS = '<script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1"> end'

ACCOUNTS = {"alice": ("pw-alice", "annotator"), "bob": ("pw-bob", "annotator"), "root": ("pw-root", "admin")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_store(url: str, n_pairs: int = 6, *, xss: bool = True, chat: bool = True) -> list[int]:
    """Accounts alice / bob (annotators) and root (admin), ``n_pairs`` queued arithmetic pairs, a
    pair whose response carries script/onerror HTML (highest priority) and a multi-turn chat pair.
    Returns the comparison ids in queue order."""
    from app.backend import Store

    s = Store(url)
    s.init()
    for name, (pw, role) in ACCOUNTS.items():
        s.add_annotator(name, pw, role)
    made = []
    if xss:
        pid = s.add_prompt("Say hello <b>politely</b>.")
        a = s.add_response(pid, "Hello! **Nice** to meet you.", model="m1")
        b = s.add_response(pid, XSS, model="m2")
        made.append((100.0, s.add_comparison(pid, a, b, priority=100.0)))
    if chat:
        pid = s.add_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                            {"role": "assistant", "content": "Red."},
                            {"role": "user", "content": "Another, and show `x < y` in Python?"}])
        a = s.add_response(pid, "Blue.\n\n```python\nprint(1 < 2)\n```", model="m1")
        b = s.add_response(pid, "Green!\nThat's all.", model="m2")
        made.append((50.0, s.add_comparison(pid, a, b, priority=50.0)))
    for i in range(n_pairs):
        pid = s.add_prompt(f"What is {i} + {i + 1}?")
        a = s.add_response(pid, f"The answer is **{2 * i + 1}**.", model="m1")
        b = s.add_response(pid, f"I think it is {2 * i + 2}.", model="m2")
        made.append((float(10 - i), s.add_comparison(pid, a, b, priority=float(10 - i))))
    s.close()
    return [cid for _, cid in sorted(made, key=lambda t: (-t[0], t[1]))]


@contextmanager
def serve(db: str, **kw) -> Iterator[tuple[object, str]]:
    """Run the app in this process on a free localhost port; yields ``(demo, url)``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.main import AppArguments
    from app.ui import build_app, launch_kwargs

    args = AppArguments(db=db, port=free_port(), **kw)
    demo = build_app(args)
    demo.queue(default_concurrency_limit=8).launch(
        server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True,
        **launch_kwargs(args))
    try:
        yield demo, f"http://127.0.0.1:{args.port}/"
    finally:
        demo.close()


# Debian's Chromium for the browser tests; without the background-networking flags it tries the closed network.
CHROMIUM = os.environ.get("ALIGN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
