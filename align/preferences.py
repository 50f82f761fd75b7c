"""Preference data for the reward model and DPO: one set of options, one reader, one split.

``dataset_name``: ``store`` (the labelled comparisons of the store at ``store_url``, aggregated over
annotators), ``world`` (the built-in world's rule-labelled pairs), or a preference file in any format the
store imports (``align.data.formats``) or a ``datasets`` dir. Rows are conversational ``{prompt, chosen,
rejected}`` message lists. The train/test split is by prompt (``align.data.prompts.split_of``): the reward
model and DPO hold out the same prompts of the same data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.formats import DataError, location, read_records, to_preference
from align.data.prompts import as_messages, prompt_hash, split_of
from align.models import MissingInput

logger = logging.getLogger("align.preferences")


@dataclass
class PreferenceDataArguments:
    dataset_name: str = field(
        default="store",
        metadata={"help": "'store' (labelled pairs of the store at store_url), 'world' (the built-in world's pairs), "
                          "a preference file in any format the store imports (.json/.jsonl(.gz)) or a datasets dir; "
                          "several files comma-separated (read as one set, split by prompt)."},
    )
    store_url: str = field(default="sqlite:///data/preferences.db", metadata={"help": "Preference store URL."})
    store_min_labels: int = field(
        default=1, metadata={"help": "Store: drop comparisons with fewer non-skip votes.", "aliases": ["min_labels"]}
    )
    store_min_agreement: float = field(
        default=0.0, metadata={"help": "Store: drop comparisons whose majority share is below this (0-1).",
                               "aliases": ["min_agreement"]}
    )
    store_kinds: list[str] | None = field(
        default=None, metadata={"help": "Store: only labels by these annotator kinds (human, ai, rule); default all.",
                                "aliases": ["annotator_kinds"]}
    )
    store_annotators: list[str] | None = field(
        default=None, metadata={"help": "Store: only labels by these annotators; default all.",
                                "aliases": ["annotators"]}
    )
    store_sources: list[str] | None = field(
        default=None, metadata={"help": "Store: only comparisons from these sources.", "aliases": ["sources"]}
    )
    store_soft: bool = field(
        default=False, metadata={"help": "Store: soft labels: each pair's p_chosen, P(chosen beats rejected), from its "
                                         "votes and each label's confidence (the trainer's soft Bradley-Terry loss)."}
    )
    test_fraction: float = field(
        default=0.05, metadata={"help": "Share of prompts held out (by a hash of the prompt), in [0, 1).",
                                "aliases": ["test_size"]}
    )
    split_seed: str = field(default="", metadata={"help": "Salt of the prompt-hash split."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world (data and held-out prompts)."})
    skip_bad: bool = field(
        default=False, metadata={"help": "Files: skip unreadable records (counted) instead of stopping at the first."}
    )

    def __post_init__(self):
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.store_min_labels < 1:
            raise ValueError(f"store_min_labels must be >= 1, got {self.store_min_labels}")
        if not 0 <= self.store_min_agreement <= 1:
            raise ValueError(f"store_min_agreement must be in [0, 1], got {self.store_min_agreement}")

    def check_data(self) -> None:
        """``MissingInput`` for a store database or data file that does not exist (before anything is written:
        opening a SQLite URL would create an empty database)."""
        if self.dataset_name == "store":
            url = self.store_url
            if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
                raise MissingInput(
                    f"store_url: no database at {url}; fill it (`python -m align.store import FILE`, the app, or "
                    "`make quickstart`), or set --dataset_name world or a preference file"
                )
        elif self.dataset_name != "world":
            for path in self.files:
                if not Path(path).exists():
                    raise MissingInput(f"dataset_name: no such file or directory: {path!r} (or 'store' / 'world')")

    @property
    def files(self) -> list[str]:
        """The preference files of ``dataset_name`` (comma-separated)."""
        return [p.strip() for p in self.dataset_name.split(",") if p.strip()]


def load_preferences(args: PreferenceDataArguments, *, unpaired: bool = False, both_bad: str = "drop",
                     extra=None) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """``({"train": rows, "test": rows}, info)``. ``unpaired``: KTO rows ``{prompt, completion, label}``.
    ``extra(pref, record, where) -> dict``: more columns per file record (e.g. a margin)."""
    args.check_data()
    info: dict[str, Any] = {"source": args.dataset_name}
    if args.dataset_name == "store":
        return _from_store(args, unpaired, both_bad, info)
    if args.dataset_name == "world":
        from align.data.world import World

        rows = [{"prompt": as_messages(p["prompt"]), "chosen": as_messages(p["chosen"], "assistant"),
                 "rejected": as_messages(p["rejected"], "assistant")}
                for p in World(seed=args.world_seed).preference_pairs()]
    else:
        rows, unreadable = [], 0
        for path in args.files:
            rows += read_preference_file(path, args.skip_bad, extra, info)
            unreadable += info.get("unreadable", 0)
        info["unreadable"] = unreadable
    splits = split_rows(rows, args.test_fraction, args.split_seed)
    if unpaired:
        splits = {k: to_unpaired(v) for k, v in splits.items()}
    return splits, info


def split_rows(rows: list[dict], test_fraction: float, seed: str = "") -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}`` by prompt (``align.data.prompts.split_of``): a prompt is never in both."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for r in rows:
        splits[split_of(r["prompt"], test_fraction, seed)].append(r)
    return splits


def _from_store(args: PreferenceDataArguments, unpaired: bool, both_bad: str, info: dict) -> tuple[dict, dict]:
    from align.store import Store

    soft = args.store_soft and not unpaired  # soft labels are a paired idea
    store = Store(args.store_url)
    try:
        splits, report = store.export_rows(
            format="conversational", unpaired=unpaired, min_labels=args.store_min_labels,
            min_agreement=args.store_min_agreement, test_fraction=args.test_fraction, seed=args.split_seed,
            kinds=args.store_kinds, annotators=args.store_annotators, sources=args.store_sources, both_bad=both_bad,
            soft=soft,
        )
    finally:
        store.close()
    info.update(store_url=args.store_url, store_report=report["report"])
    if not splits["train"]:
        raise DataError(
            f"store {args.store_url}: no labelled pairs to train on after aggregation (export report: "
            f"{report['report']}); label comparisons in the app, import a file with `python -m align.store import "
            "FILE`, or set dataset_name to a file or 'world'"
        )
    keep = ("prompt", "completion", "label") if unpaired else ("prompt", "chosen", "rejected")
    keep += ("p_chosen",) if soft else ()  # it says how sure: no weight on top
    return {k: [{c: r[c] for c in keep} for r in v] for k, v in splits.items()}, info


def read_preference_file(path: str, skip_bad: bool = False, extra=None, info: dict | None = None) -> list[dict]:
    """Any preference file the store imports, as conversational rows. A bad record raises ``DataError`` naming
    the file, line and field (``skip_bad``: skipped and counted in ``info["unreadable"]``)."""
    rows, skipped = [], []
    for key, rec in read_records(path):
        where = location(path, key)
        try:
            p = to_preference(rec, where)
            row = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
            if extra is not None:
                row |= extra(p, rec, where)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        rows.append(row)
    if skipped:
        logger.warning("skipped %d unreadable records, first: %s", len(skipped), skipped[0])
    if info is not None:
        info["unreadable"] = len(skipped)
    if not rows:
        raise DataError(f"{path}: no preference records")
    return rows


SOFT_COLUMNS = ("p_chosen", "weight")  # the store's soft-label export (``export --aggregate reliability --soft``)


def soft_label_columns(pref: dict, rec: dict, where: str) -> dict:
    """An ``extra`` hook for ``read_preference_file``: a record's ``p_chosen`` (P(chosen beats rejected)) and
    ``weight``, where it has them, as floats checked to be in [0, 1] and >= 0."""
    row = {}
    for k in SOFT_COLUMNS:
        if k not in rec:
            continue
        v = rec[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{where}: field {k!r} is {v!r}, not a number")
        if not (0 <= v <= 1 if k == "p_chosen" else v >= 0):
            raise DataError(f"{where}: field {k!r} is {v!r}, outside {'[0, 1]' if k == 'p_chosen' else '[0, inf)'}")
        row[k] = float(v)
    return row


def fit_max_length(splits: dict[str, list[dict]], tokenizer: Any, max_length: int | None
                   ) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    """Rows for TRL's preference trainers, which keep the first ``max_length`` tokens of prompt + reply
    (``truncation_mode="keep_start"``): a row whose prompt alone fills ``max_length`` has nothing of its replies
    left to learn from and is dropped (``no_reply``); ``cut`` counts the rows whose reply loses its end. Per
    split, for eval.json."""
    if not max_length:
        return splits, {}

    def length(messages: list[dict], prompt: bool = False) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt,
                                                 return_dict=False))

    kept, counts = {}, {}
    for name, rows in splits.items():
        kept[name], cut = [], 0
        for r in rows:
            if length(r["prompt"], prompt=True) >= max_length:
                continue
            cut += any(length(r["prompt"] + r[k]) > max_length for k in ("chosen", "rejected", "completion") if k in r)
            kept[name].append(r)
        counts[name] = {"rows": len(rows), "cut": cut, "no_reply": len(rows) - len(kept[name])}
    return kept, counts


def to_unpaired(rows: list[dict]) -> list[dict]:
    """Paired rows -> KTO rows: the chosen response desirable, the rejected one undesirable."""
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def heldout_prompts(splits: dict[str, list[dict]], n: int) -> list[Any]:
    """The first ``n`` distinct prompts of the test split (a string when the prompt is one user message)."""
    out, seen = [], set()
    for r in splits["test"]:
        h = prompt_hash(r["prompt"])
        if h not in seen:
            seen.add(h)
            p = r["prompt"]
            out.append(p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p)
    return out[:n]
