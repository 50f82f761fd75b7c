"""Export labelled comparisons as TRL preference data (paired or unpaired/KTO)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import sqlalchemy as sa

from align.data.prompts import split_of_hash
from align.store import schema as S

FORMATS = ("conversational", "standard")
AGGREGATES = ("majority", "reliability")
_ROLE_TAG = {"user": "Human", "assistant": "Assistant", "system": "System"}


def render(msgs: list[dict], *, open_assistant: bool = False) -> str:
    """Messages -> one string for TRL's *standard* format. A single user message is its text;
    anything else is an HH-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    if len(msgs) == 1 and msgs[0]["role"] in ("user", "assistant") and not open_assistant:
        return msgs[0]["content"]
    s = "".join(f"\n\n{_ROLE_TAG[m['role']]}: {m['content']}" for m in msgs)
    return s + "\n\nAssistant:" if open_assistant else s


def _completion(text: str, messages) -> list[dict]:
    return messages if messages else [{"role": "assistant", "content": text}]


def majority(votes: Counter, min_labels: int, min_agreement: float) -> tuple[str | None, str]:
    """Majority vote over non-skip votes -> (winner, reason-if-dropped)."""
    n = sum(votes.values())
    if n == 0 or n < min_labels:
        return None, "too_few_labels"
    (top, k), *rest = votes.most_common()
    if rest and rest[0][1] == k:
        return None, "no_majority"
    if k / n < min_agreement:
        return None, "low_agreement"
    return top, ""


def export_rows(store, *, format: str = "conversational", unpaired: bool = False,
                min_labels: int = 1, min_agreement: float = 0.0, test_fraction: float = 0.0,
                seed: str = "", kinds: Sequence[str] | None = None,
                annotators: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                comparison_ids: Sequence[int] | None = None, both_bad: str = "drop",
                with_meta: bool = False, aggregate: str = "majority", soft: bool = False) -> tuple[dict, dict]:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if aggregate == "reliability" and unpaired:
        raise ValueError("aggregate='reliability' makes paired rows; use it without unpaired")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if both_bad not in ("drop", "negatives"):
        raise ValueError(f"both_bad must be 'drop' or 'negatives', got {both_bad!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if min_labels < 1:
        raise ValueError(f"min_labels must be >= 1, got {min_labels}")
    L, A, C, P = S.labels, S.annotators, S.comparisons, S.prompts
    ra, rb = S.responses.alias("ra"), S.responses.alias("rb")
    report: Counter = Counter()
    with store.engine.connect() as conn, conn.begin():  # one consistent snapshot
        # a label's confidence c in [0, 1] (none: 1) says it is right with P = (1 + c) / 2
        q = (sa.select(L.c.comparison_id, L.c.choice, sa.func.count().label("n"),
                       sa.func.sum(sa.func.coalesce(L.c.confidence, 1.0)).label("c"))
             .join(A, A.c.id == L.c.annotator_id).where(L.c.choice != "skip")
             .group_by(L.c.comparison_id, L.c.choice))
        if kinds:
            q = q.where(A.c.kind.in_(list(kinds)))
        if annotators:
            q = q.where(A.c.name.in_(list(annotators)))
        if comparison_ids is not None:
            q = q.where(L.c.comparison_id.in_(set(comparison_ids)))
        votes: dict[int, Counter] = defaultdict(Counter)
        sure: dict[int, Counter] = defaultdict(Counter)  # the summed confidence of each choice's labels
        for cid, choice, n, c in conn.execute(q):
            votes[cid][choice] += n
            sure[cid][choice] += c
        winners: dict[int, tuple[str, float, int]] = {}
        p_a: dict[int, float] = {}  # P(response A is better), for soft labels
        if aggregate == "reliability":
            _reliability(conn, votes, q, min_labels, min_agreement, winners, p_a, report)
            votes = {}
        for cid, v in votes.items():
            if v["a"] + v["b"]:  # the mean over a/b labels of each one's P(A is better)
                p_a[cid] = (v["a"] + sure[cid]["a"] + v["b"] - sure[cid]["b"]) / (2 * (v["a"] + v["b"]))
            win, why = majority(v, min_labels, min_agreement)
            if win is None:
                report[why] += 1
            elif win == "tie" or (win == "both_bad" and not (unpaired and both_bad == "negatives")):
                report[win] += 1
            else:
                n = sum(v.values())
                winners[cid] = (win, v[win] / n, n)
        q = (sa.select(C.c.id, P.c.content_hash, P.c.messages, ra.c.text.label("ta"),
                       ra.c.messages.label("ma"), rb.c.text.label("tb"), rb.c.messages.label("mb"),
                       C.c.source, ra.c.model.label("model_a"), rb.c.model.label("model_b"))
             .join(P, P.c.id == C.c.prompt_id).join(ra, ra.c.id == C.c.response_a_id)
             .join(rb, rb.c.id == C.c.response_b_id).order_by(C.c.id))
        if sources:
            q = q.where(C.c.source.in_(list(sources)))
        if comparison_ids is not None:
            q = q.where(C.c.id.in_(set(comparison_ids)))
        splits: dict[str, list] = {"train": [], "test": []}
        for r in conn.execution_options(yield_per=2000).execute(q):
            w = winners.get(r.id)
            if w is None:
                continue
            choice, agreement, n = w
            prompt = r.messages
            a, b = _completion(r.ta, r.ma), _completion(r.tb, r.mb)
            if format == "standard":
                multi = not (len(prompt) == 1 and prompt[0]["role"] == "user")
                prompt = render(prompt, open_assistant=multi)
                a, b = (render(x) if not multi else " " + render(x).removeprefix(
                    "\n\nAssistant: ") for x in (a, b))
            meta = ({"comparison_id": r.id, "agreement": agreement, "n_labels": n,
                     "source": r.source} if with_meta else {})
            split = split_of_hash(r.content_hash, test_fraction, seed)
            out = splits[split]
            if soft and not unpaired:  # soft label: P(chosen beats rejected); weight: how decided
                pc = p_a.get(r.id, 1.0 if choice == "a" else 0.0)
                pc = pc if choice == "a" else 1 - pc
                meta = {**meta, "p_chosen": round(pc, 6), "weight": round(abs(2 * pc - 1), 6)}
            if not unpaired:
                chosen, rejected = (a, b) if choice == "a" else (b, a)
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta})
            elif choice == "both_bad":
                out.append({"prompt": prompt, "completion": a, "label": False, **meta})
                out.append({"prompt": prompt, "completion": b, "label": False, **meta})
            else:
                chosen, rejected = (a, b) if choice == "a" else (b, a)
                out.append({"prompt": prompt, "completion": chosen, "label": True, **meta})
                out.append({"prompt": prompt, "completion": rejected, "label": False, **meta})
            report["exported_pairs"] += 1
    report["train_rows"], report["test_rows"] = len(splits["train"]), len(splits["test"])
    return splits, {"report": dict(report)}


def _reliability(conn, votes: dict, q, min_labels: int, min_agreement: float, winners: dict, p_a: dict,
                 report: Counter) -> None:
    """Annotator-aware winners: one-coin Dawid–Skene over the decisive labels that the vote query
    ``q`` selected (same labellers and comparisons), gold pairs clamped to their answer."""
    from align.store.reliability import dawid_skene

    L, A = S.labels, S.annotators
    per = (q.with_only_columns(L.c.comparison_id, A.c.name, L.c.choice).group_by(None)
           .where(L.c.choice.in_(("a", "b"))))
    gold = dict(conn.execute(sa.select(S.gold.c.comparison_id, S.gold.c.answer)).all())
    agg = dawid_skene(conn.execute(per).all(), gold)
    for cid, v in votes.items():
        n = v["a"] + v["b"]
        if cid not in agg.p_a or n < min_labels:
            report["too_few_labels" if n < min_labels or not n else "no_majority"] += 1
            continue
        p = agg.p_a[cid]
        win, share = ("a", p) if p >= 0.5 else ("b", 1 - p)
        if p == 0.5:
            report["no_majority"] += 1
        elif share < min_agreement:
            report["low_agreement"] += 1
        else:
            winners[cid], p_a[cid] = (win, share, n), p
    report["annotators_weighted"] = len(agg.accuracy)
