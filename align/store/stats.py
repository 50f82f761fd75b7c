"""Store statistics: counts, per-annotator labels, agreement, position bias, time per label.

Agreement uses the four decisive-or-not categories a / b / tie / both_bad (skips are not
judgements and are left out):
- Cohen's kappa for each pair of annotators on the comparisons both labelled
  (``statsmodels.stats.inter_rater.cohens_kappa`` on their contingency table);
- Fleiss' kappa over comparisons with >= m labels, where m is the most common label count >= 2,
  using the first m labels of each (Fleiss needs the same number of raters per item);
- Krippendorff's alpha (nominal) over every annotator x comparison (missing allowed).
A value is None when it is undefined (too little overlap, or one category only).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from itertools import combinations

import sqlalchemy as sa

from align.store import schema as S

CATS = ("a", "b", "tie", "both_bad")


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else round(x, 4)


def compute_stats(store) -> dict:
    L, A = S.labels, S.annotators
    with store.engine.connect() as conn, conn.begin():
        def count(t):
            return conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
        counts = {"prompts": count(S.prompts), "responses": count(S.responses),
                  "comparisons": count(S.comparisons), "labels": count(L),
                  "annotators": count(A),
                  "queued_comparisons": conn.execute(
                      sa.select(sa.func.count()).where(S.comparisons.c.priority.is_not(None))
                  ).scalar()}
        by_choice = dict(conn.execute(sa.select(L.c.choice, sa.func.count())
                                      .group_by(L.c.choice)).all())
        rows = conn.execute(sa.select(L.c.id, L.c.comparison_id, L.c.choice, L.c.left_side,
                                      L.c.seconds, A.c.name, A.c.kind)
                            .join(A, A.c.id == L.c.annotator_id).order_by(L.c.id)).all()
    per_annotator: dict[str, dict] = {}
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for r in rows:
        d = per_annotator.setdefault(r.name, {"kind": r.kind, "labels": 0, **{c: 0 for c in
                                                                              (*CATS, "skip")}})
        d["labels"] += 1
        d[r.choice] += 1
        if r.choice != "skip":
            by_item[r.comparison_id][r.name] = r.choice
    # position bias: among decisive labels where the left side is known
    shown = [r for r in rows if r.left_side in ("a", "b") and r.choice in ("a", "b")]
    left_wins = sum(r.choice == r.left_side for r in shown)
    secs = [r.seconds for r in rows if r.seconds is not None]
    return {
        "counts": counts,
        "labels_by_choice": {c: by_choice.get(c, 0) for c in (*CATS, "skip")},
        "labels_per_annotator": per_annotator,
        "agreement": agreement(by_item),
        "position_bias": {"decisive_labels_with_side": len(shown),
                          "left_win_rate": _num(left_wins / len(shown)) if shown else None},
        "seconds_per_label": {"median": _num(statistics.median(secs)) if secs else None,
                              "n": len(secs)},
    }


def agreement(by_item: dict[int, dict[str, str]]) -> dict:
    """by_item: comparison id -> {annotator: choice} (skips removed)."""
    import numpy as np

    idx = {c: i for i, c in enumerate(CATS)}
    multi = {cid: v for cid, v in by_item.items() if len(v) >= 2}
    out: dict = {"comparisons_with_2plus_labels": len(multi), "cohen": [], "fleiss_kappa": None,
                 "krippendorff_alpha": None}
    if not multi:
        return out
    from statsmodels.stats.inter_rater import aggregate_raters, cohens_kappa, fleiss_kappa

    shared: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for v in multi.values():
        for x, y in combinations(sorted(v), 2):
            shared[(x, y)].append((v[x], v[y]))
    for (x, y), pairs in sorted(shared.items()):
        table = np.zeros((len(CATS), len(CATS)))
        for cx, cy in pairs:
            table[idx[cx], idx[cy]] += 1
        agree = float(np.trace(table) / table.sum())
        kappa = None
        try:
            kappa = _num(cohens_kappa(table, return_results=False))
        except (ValueError, ArithmeticError, IndexError):  # degenerate table (one category only)
            kappa = None
        out["cohen"].append({"annotators": [x, y], "shared": len(pairs),
                             "observed_agreement": _num(agree), "kappa": kappa})
    m = Counter(len(v) for v in multi.values()).most_common(1)[0][0]
    data = [[idx[c] for _, c in sorted(v.items())][:m] for v in multi.values() if len(v) >= m]
    try:
        table, _ = aggregate_raters(np.array(data), n_cat=len(CATS))
        with np.errstate(all="ignore"):
            out["fleiss_kappa"] = _num(fleiss_kappa(table, method="fleiss"))
        out["fleiss_raters_per_item"] = m
        out["fleiss_items"] = len(data)
    except (ValueError, ArithmeticError, IndexError):  # degenerate data: undefined, reported as null
        out["fleiss_kappa"] = None
    try:
        import krippendorff

        names = sorted({a for v in by_item.values() for a in v})
        items = sorted(by_item)
        rel = np.full((len(names), len(items)), np.nan)
        ni = {a: i for i, a in enumerate(names)}
        for j, cid in enumerate(items):
            for a, c in by_item[cid].items():
                rel[ni[a], j] = idx[c]
        with np.errstate(all="ignore"):
            out["krippendorff_alpha"] = _num(krippendorff.alpha(
                reliability_data=rel, level_of_measurement="nominal",
                value_domain=list(range(len(CATS)))))
    except (ImportError, ValueError, ArithmeticError):  # not installed, or one value only: null
        out["krippendorff_alpha"] = None
    return out


def annotator_quality(store, *, idle_gap: float = 300.0) -> list[dict]:
    """Per annotator: labels, labels per active hour (gaps over ``idle_gap`` s count as breaks),
    median seconds per label, gold accuracy, self-consistency on swapped re-asks, agreement with
    the majority of the others, left-side share of decisive labels (0.5 = no position bias), the
    Dawid–Skene accuracy estimate and whether the admin paused them."""
    from align.store.reliability import dawid_skene

    L, A = S.labels, S.annotators
    with store.engine.connect() as conn, conn.begin():
        rows = conn.execute(sa.select(L.c.comparison_id, L.c.choice, L.c.left_side, L.c.seconds,
                                      L.c.created_at, A.c.name, A.c.kind)
                            .join(A, A.c.id == L.c.annotator_id).order_by(L.c.id)).all()
        people = conn.execute(sa.select(A.c.name, A.c.kind, A.c.role, A.c.paused).order_by(A.c.id)).all()
        gold = dict(conn.execute(sa.select(S.gold.c.comparison_id, S.gold.c.answer)).all())
    reasks = store.reasks()
    by_name: dict[str, list] = defaultdict(list)
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_name[r.name].append(r)
        if r.choice != "skip":
            by_item[r.comparison_id][r.name] = r.choice
    ds = dawid_skene(((r.comparison_id, r.name, r.choice) for r in rows if r.kind == "human"), gold)
    re_by: dict[str, list] = defaultdict(list)
    for x in reasks:
        re_by[x["annotator"]].append(x)
    out = []
    for p in people:
        mine = by_name.get(p.name, [])
        if p.kind != "human" and not mine:
            continue
        secs = [r.seconds for r in mine if r.seconds is not None]
        times = sorted(r.created_at for r in mine if r.created_at is not None)
        active = sum(min((t2 - t1).total_seconds(), idle_gap) for t1, t2 in zip(times, times[1:]))
        g = [(r.choice == gold[r.comparison_id]) for r in mine if r.comparison_id in gold and r.choice != "skip"]
        rs = [x["choice"] == x["first_choice"] for x in re_by.get(p.name, [])
              if "skip" not in (x["choice"], x["first_choice"])]
        agree = []
        for r in mine:
            if r.choice == "skip":
                continue
            others = Counter(c for n, c in by_item[r.comparison_id].items() if n != p.name)
            top = others.most_common(2)
            if top and (len(top) == 1 or top[0][1] > top[1][1]):
                agree.append(r.choice == top[0][0])
        sided = [(r.choice, r.left_side) for r in mine if r.choice in ("a", "b") and r.left_side in ("a", "b")]
        sided += [(x["choice"], x["left_side"]) for x in re_by.get(p.name, [])
                  if x["choice"] in ("a", "b") and x["left_side"] in ("a", "b")]
        out.append({
            "name": p.name, "kind": p.kind, "role": p.role, "paused": bool(p.paused), "labels": len(mine),
            "labels_per_hour": _num(3600 * (len(times) - 1) / active) if active > 0 else None,
            "seconds_per_label": _num(statistics.median(secs)) if secs else None,
            "gold_n": len(g), "gold_accuracy": _num(sum(g) / len(g)) if g else None,
            "reasks_n": len(rs), "self_consistency": _num(sum(rs) / len(rs)) if rs else None,
            "agreement_n": len(agree), "agreement": _num(sum(agree) / len(agree)) if agree else None,
            "left_share": _num(sum(c == s for c, s in sided) / len(sided)) if sided else None, "sided_n": len(sided),
            "estimated_accuracy": _num(ds.accuracy[p.name]) if p.name in ds.accuracy else None,
        })
    return out
