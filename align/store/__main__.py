"""``python -m align.store init | import | export | stats | annotators`` (see docs/store.md)."""

from __future__ import annotations

import getpass
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from align.config import parse_verb, run_command
from align.data.formats import DataError
from align.store.store import DEFAULT_URL, Store, StoreError

Kind = Literal["human", "ai", "rule"]
Role = Literal["admin", "annotator"]


def _url() -> str:
    return os.environ.get("ALIGN_STORE_URL", DEFAULT_URL)


# one dataclass per verb; every verb takes --db (before or after the verb), snake_case keys (kebab-case still works)
@dataclass(kw_only=True)
class _Db:
    db: str = field(default_factory=_url,
                    metadata={"help": f"SQLAlchemy URL (default: $ALIGN_STORE_URL or {DEFAULT_URL})"})


@dataclass(kw_only=True)
class Init(_Db):
    """create the schema / apply migrations"""


@dataclass(kw_only=True)
class Import(_Db):
    """import preference files (one transaction per file)"""

    files: list[str] = field(metadata={"positional": True,
                                       "help": ".json, .jsonl, .jsonl.gz, .json.gz files or datasets dirs"})
    skip_bad: bool = field(default=False, metadata={"help": "skip bad records, report them"})
    labeller: str = field(default="dataset", metadata={"help": "rule labeller for the labels"})
    source: str | None = field(default=None, metadata={"help": "source name (default: the file name)"})
    max_text_bytes: int = field(default=1_000_000, metadata={"help": "longest text stored"})
    limit: int | None = field(default=None, metadata={"help": "read at most this many records per file"})
    queue: float | None = field(default=None, metadata={"help": "also queue the pairs for annotators with this "
                                                                "priority"})


@dataclass(kw_only=True)
class Export(_Db):
    """export labelled pairs (TRL preference format)"""

    out: str | None = field(default=None, metadata={"positional": True, "help": "out.jsonl (default: stdout as JSONL)"})
    standard: bool = field(default=False, metadata={"help": "strings instead of message lists"})
    unpaired: bool = field(default=False, metadata={"help": "KTO rows {prompt, completion, label}"})
    min_labels: int = field(default=1, metadata={"help": "non-skip labels a pair needs"})
    min_agreement: float = field(default=0.0, metadata={"help": "share of votes the winner needs"})
    test_fraction: float = field(default=0.0, metadata={"help": "share of prompts in the test split"})
    split_seed: str = field(default="", metadata={"help": "salt of the prompt hash that picks the split (as the "
                                                          "trainers' split_seed)", "aliases": ["seed"]})
    kinds: list[Kind] | None = field(default=None, metadata={"help": "only labels of these annotator kinds"})
    annotators: list[str] | None = field(default=None, metadata={"help": "only labels of these annotators"})
    sources: list[str] | None = field(default=None, metadata={"help": "only pairs of these sources"})
    both_bad: Literal["drop", "negatives"] = field(default="drop", metadata={"help": "what a both-bad label makes"})
    with_meta: bool = field(default=False, metadata={"help": "add comparison id, agreement, labels, source"})
    aggregate: Literal["majority", "reliability"] = field(
        default="majority", metadata={"help": "reliability: weigh annotators by their estimated accuracy "
                                              "(Dawid-Skene, gold-anchored)"})
    soft: bool = field(default=False, metadata={"help": "add p_chosen (soft label) and weight to paired rows"})
    dataset: str | None = field(default=None, metadata={"help": "save a datasets.Dataset in this dir instead"})

    def __post_init__(self):
        for name in ("kinds", "annotators", "sources"):  # one word on the command line is a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])


@dataclass(kw_only=True)
class Stats(_Db):
    """counts, agreement, position bias"""

    json: bool = field(default=False, metadata={"help": "print JSON"})


@dataclass(kw_only=True)
class AddAnnotator(_Db):
    """add an annotator (a person, or an AI / rule labeller)"""

    name: str = field(metadata={"positional": True})
    role: Role = "annotator"
    kind: Kind = "human"
    password: str | None = field(default=None, metadata={"help": "default: $ALIGN_PASSWORD or prompt (humans only)"})


@dataclass(kw_only=True)
class ListAnnotators(_Db):
    """list the annotators and their label counts"""


@dataclass(kw_only=True)
class SetPassword(_Db):
    """set an annotator's password"""

    name: str = field(metadata={"positional": True})
    password: str | None = field(default=None, metadata={"help": "default: $ALIGN_PASSWORD or prompt"})


@dataclass(kw_only=True)
class SetRole(_Db):
    """make an annotator an admin or an annotator"""

    name: str = field(metadata={"positional": True})
    role: Role = field(metadata={"positional": True})


VERBS = {"init": Init, "import": Import, "export": Export, "stats": Stats, "annotators add": AddAnnotator,
         "annotators list": ListAnnotators, "annotators set-password": SetPassword, "annotators set-role": SetRole}


def _password(args) -> str | None:
    pw = args.password or os.environ.get("ALIGN_PASSWORD")
    if pw is None and sys.stdin.isatty():
        pw = getpass.getpass(f"password for {args.name}: ")
    return pw


def _print_stats(s: dict) -> None:
    c = s["counts"]
    print("counts:     " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    print("by choice:  " + ", ".join(f"{k} {v:,}" for k, v in s["labels_by_choice"].items()))
    print("annotators:")
    for name, d in s["labels_per_annotator"].items():
        print(f"  {name:<20} {d['kind']:<6} {d['labels']:>8,} labels  "
              + " ".join(f"{k}={d[k]}" for k in ("a", "b", "tie", "both_bad", "skip")))
    ag = s["agreement"]
    print(f"agreement:  {ag['comparisons_with_2plus_labels']:,} comparisons with 2+ labels; "
          f"Fleiss kappa {ag['fleiss_kappa']}, Krippendorff alpha {ag['krippendorff_alpha']}")
    for p in ag["cohen"]:
        print(f"  Cohen {p['annotators'][0]} ~ {p['annotators'][1]}: kappa {p['kappa']} "
              f"(observed {p['observed_agreement']}, {p['shared']} shared)")
    pb = s["position_bias"]
    print(f"position:   left-shown response won {pb['left_win_rate']} of "
          f"{pb['decisive_labels_with_side']} decisive labels")
    print(f"time:       median {s['seconds_per_label']['median']} s per label "
          f"({s['seconds_per_label']['n']} timed)")


def main(argv: list[str] | None = None) -> int:
    cmd, args = run_command(parse_verb, VERBS, argv, prog="python -m align.store", about=__doc__)
    store = Store(args.db, max_text_bytes=getattr(args, "max_text_bytes", 1_000_000))
    try:
        if cmd == "init":
            store.init()
            print(f"{store!r}: schema version {store.schema_version()}")
        elif cmd == "import":
            store.init()
            failed = 0
            for f in args.files:
                try:
                    r = store.import_file(f, source=args.source, labeller=args.labeller,
                                          skip_bad=args.skip_bad, limit=args.limit,
                                          priority=args.queue)
                except DataError as e:
                    print(f"error: {e}\n  nothing from {f} was stored (use --skip_bad to import "
                          "the rest)", file=sys.stderr)
                    failed += 1
                    continue
                print(r.summary())
            return 1 if failed else 0
        elif cmd == "export":
            opts = dict(format="standard" if args.standard else "conversational",
                        unpaired=args.unpaired, min_labels=args.min_labels,
                        min_agreement=args.min_agreement, test_fraction=args.test_fraction,
                        seed=args.split_seed, kinds=args.kinds, annotators=args.annotators,
                        sources=args.sources, both_bad=args.both_bad, with_meta=args.with_meta,
                        aggregate=args.aggregate, soft=args.soft)
            if args.dataset:
                ds = store.export(None, **opts)
                ds.save_to_disk(args.dataset)
                print(f"saved {ds} to {args.dataset}", file=sys.stderr)
            elif args.out:
                res = store.export(args.out, **opts)
                print(json.dumps(res, indent=1), file=sys.stderr)
            else:
                splits, report = store.export_rows(**opts)
                for rows in splits.values():
                    for row in rows:
                        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(json.dumps(report), file=sys.stderr)
        elif cmd == "stats":
            s = store.stats()
            if args.json:
                print(json.dumps(s, indent=1, default=str))
            else:
                _print_stats(s)
        elif cmd == "annotators add":
            pw = _password(args) if args.kind == "human" else args.password
            a = store.add_annotator(args.name, pw, role=args.role, kind=args.kind)
            print(f"added {a.name} ({a.kind}, {a.role})")
        elif cmd == "annotators list":
            for a in store.list_annotators():
                print(f"{a['id']:>4} {a['name']:<24} {a['kind']:<6} {a['role']:<10} "
                      f"{a['labels']:>8} labels{'' if a['has_password'] else '  (no password)'}")
        elif cmd == "annotators set-password":
            pw = _password(args)
            if not pw:
                print("error: no password given", file=sys.stderr)
                return 2
            store.set_password(args.name, pw)
            print(f"password of {args.name} changed")
        elif cmd == "annotators set-role":
            store.set_role(args.name, args.role)
            print(f"{args.name} is now {args.role}")
    except (StoreError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
