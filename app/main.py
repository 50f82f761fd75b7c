"""``python -m app configs/app.yaml [--key value ...]``: the A/B labelling app on the preference store.

    python -m app configs/app.yaml --db sqlite:///data/preferences.db
    python -m app configs/app.yaml --create_admin alice:secret --serve false   # make an account

Annotators log in with accounts from the store, compare two responses side by side and every click
is committed to the store before the next pair shows. Admins also add prompts, generate candidate
pairs, import preference files, watch the dashboard and export TRL data. See docs/app.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align.config import ConfigError, parse  # noqa: E402

DEFAULT_DB = "sqlite:///data/preferences.db"
DEFAULT_GUIDELINES = "docs/guidelines.md"


@dataclass
class AppArguments:
    """Settings of the labelling app (configs/app.yaml)."""

    db: str = field(default=DEFAULT_DB, metadata={"help": "SQLAlchemy URL of the preference store "
                                                  "(sqlite:///path.db or postgresql+psycopg://...)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0 for all)."})
    port: int = field(default=7860, metadata={"help": "TCP port (0 = pick a free one)."})
    root_path: str = field(default="", metadata={"help": "URL prefix when served behind a reverse proxy."})
    title: str = field(default="align · A/B labelling", metadata={"help": "Page title and header."})
    guidelines: str = field(default=DEFAULT_GUIDELINES,
                            metadata={"help": "Markdown file with the annotator guidelines."})
    overlap: int = field(default=1, metadata={"help": "Distinct human annotators per comparison "
                                              "(>= 2 to measure agreement)."})
    models: list[str] = field(default_factory=list,
                              metadata={"help": "Up to two model dirs (a run's final/ or any HF causal "
                                        "LM) pre-filled in the admin's generation form."})
    temperature: float = field(default=0.8, metadata={"help": "Default sampling temperature "
                                                      "(0 = greedy) for candidate generation."})
    top_p: float = field(default=0.95, metadata={"help": "Default nucleus-sampling top_p."})
    max_new_tokens: int = field(default=128, metadata={"help": "Default max new tokens per candidate."})
    seed: int | None = field(default=None, metadata={"help": "Sampling seed for generation (None = random)."})
    priority: float = field(default=0.0, metadata={"help": "Queue priority of pairs made in the app "
                                                   "(higher is labelled first)."})
    export_dir: str = field(default="", metadata={"help": "Where exports are written before download "
                                                  "('' = a temporary dir)."})
    create_admin: str | None = field(default=None,
                                      metadata={"help": "NAME:PASSWORD of an admin account to create."})
    create_annotator: str | None = field(default=None,
                                          metadata={"help": "NAME:PASSWORD of an annotator account to create."})
    loop_config: str = field(default="configs/loop.yaml",
                             metadata={"help": "The loop the admin's Loop tab runs (align.loop), on this db with "
                                       "labeller human."})
    gold_rate: float = field(default=0.05, metadata={"help": "Share of the pairs shown to an annotator that are "
                                                     "gold pairs (known answer; admin → Gold pairs)."})
    reask_rate: float = field(default=0.05, metadata={"help": "Share of the pairs shown that re-ask one of the "
                                                      "annotator's own earlier labels with the sides swapped."})
    reask_gap: int = field(default=20, metadata={"help": "A label is re-asked only after this many newer labels."})
    session_idle_minutes: float = field(default=120.0, metadata={"help": "Log a session out after this many "
                                                                 "idle minutes (0 = never)."})
    serve: bool = field(default=True, metadata={"help": "Start the server (false: only create accounts)."})

    def __post_init__(self):
        if not isinstance(self.db, str) or "://" not in self.db:
            raise ValueError(f"db must be a SQLAlchemy URL like sqlite:///data/preferences.db, got {self.db!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if isinstance(self.models, str):
            self.models = [self.models]
        if len(self.models) > 2:
            raise ValueError(f"models takes at most two model dirs, got {len(self.models)}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (0 <= self.gold_rate <= 1 and 0 <= self.reask_rate <= 1 and self.gold_rate + self.reask_rate <= 1):
            raise ValueError(f"gold_rate and reask_rate must be in [0, 1] with a sum <= 1, got {self.gold_rate} "
                             f"and {self.reask_rate}")
        if self.reask_gap < 0:
            raise ValueError(f"reask_gap must be >= 0, got {self.reask_gap}")
        if self.session_idle_minutes < 0:
            raise ValueError(f"session_idle_minutes must be >= 0, got {self.session_idle_minutes}")
        for key in ("create_admin", "create_annotator"):
            v = getattr(self, key)
            if v is not None and (":" not in v or not v.split(":", 1)[0].strip() or not v.split(":", 1)[1]):
                raise ValueError(f"{key} must be NAME:PASSWORD, got {v!r}")


CONFIG_TYPES = (AppArguments,)


def create_accounts(args: AppArguments, store=None) -> list[str]:
    """Create the accounts named by ``create_admin`` / ``create_annotator``; existing ones get the
    new password and role. Returns what was done, one line each."""
    from align.store.store import NotFound
    from app.backend import Store

    store = store or Store(args.db)
    done = []
    for key, role in (("create_admin", "admin"), ("create_annotator", "annotator")):
        spec = getattr(args, key)
        if not spec:
            continue
        name, password = spec.split(":", 1)
        name = name.strip()
        try:
            store.get_annotator(name)
            store.set_password(name, password)
            store.set_role(name, role)
            done.append(f"updated {role} '{name}' (new password)")
        except NotFound:
            store.add_annotator(name, password, role)
            done.append(f"created {role} '{name}'")
    return done


def main(argv: list[str] | None = None) -> None:
    try:
        (args,) = parse(CONFIG_TYPES, argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.create_admin or args.create_annotator:
        try:
            for line in create_accounts(args):
                print(f"{line} in {args.db}")
        except Exception as e:  # store errors of any driver: one line, not a traceback
            sys.exit(f"error: cannot create the account in {args.db}: {e}")
    if not args.serve:
        return
    from app.ui import build_app, launch_kwargs

    demo = build_app(args)
    print(f"Labelling app on the store {args.db}; guidelines: {args.guidelines}", flush=True)
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port or None, root_path=args.root_path or None,
        show_error=True, **launch_kwargs(args))


if __name__ == "__main__":
    main()
