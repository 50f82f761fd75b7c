"""The admin dashboard: plots (matplotlib figures) and tables from the store's labels and stats."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any, Sequence

CHOICE_ORDER = ("a", "b", "tie", "both_bad", "skip")
CHOICE_NAMES = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad", "skip": "skip"}
COLORS = ["#6366f1", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9", "#ec4899", "#84cc16"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titleweight": "bold", "axes.titlesize": 10})
    return plt


def _empty(plt, title: str):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.set_title(title)
    ax.text(0.5, 0.5, "no labels yet", ha="center", va="center", color="#888", transform=ax.transAxes)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def labels_over_time(labels: Sequence[Any]):
    """Cumulative labels per annotator against time."""
    plt = _plt()
    if not labels:
        return _empty(plt, "Labels per annotator over time")
    fig, ax = plt.subplots(figsize=(5, 3))
    by: dict[str, list] = defaultdict(list)
    for lab in labels:
        if lab.created_at is not None:
            by[lab.annotator].append(lab.created_at)
    for i, (name, times) in enumerate(sorted(by.items())):
        times.sort()
        ax.step(times, range(1, len(times) + 1), where="post", label=name, color=COLORS[i % len(COLORS)])
    ax.set_title("Labels per annotator over time")
    ax.set_ylabel("labels (cumulative)")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def label_distribution(labels: Sequence[Any]):
    plt = _plt()
    if not labels:
        return _empty(plt, "Label distribution")
    counts = Counter(lab.choice for lab in labels)
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = [CHOICE_NAMES[c] for c in CHOICE_ORDER]
    ys = [counts.get(c, 0) for c in CHOICE_ORDER]
    bars = ax.bar(xs, ys, color=COLORS[: len(xs)])
    ax.bar_label(bars, fontsize=8)
    ax.set_title("Label distribution (A/B = the comparison's responses)")
    fig.tight_layout()
    return fig


def position_bias(quality: Sequence[dict]):
    """Per annotator, the share of decisive judgements (labels and re-asks) that picked the response shown on the
    left: the quality table's ``left share`` (``Store.annotator_quality``), drawn."""
    plt = _plt()
    rows = [q for q in quality if q["left_share"] is not None]
    if not rows:
        return _empty(plt, "Position bias")
    fig, ax = plt.subplots(figsize=(5, 3))
    vals = [q["left_share"] for q in rows]
    bars = ax.barh([q["name"] for q in rows], vals,
                   color=[COLORS[0] if abs(v - 0.5) < 0.15 else COLORS[3] for v in vals])
    ax.bar_label(bars, labels=[f"{v:.0%} of {q['sided_n']}" for v, q in zip(vals, rows)], fontsize=8)
    ax.axvline(0.5, color="#999", ls="--", lw=1)
    ax.set_xlim(0, 1.15)
    ax.set_title("Position bias: picked the LEFT response")
    fig.tight_layout()
    return fig


def seconds_per_label(labels: Sequence[Any]):
    plt = _plt()
    by: dict[str, list[float]] = defaultdict(list)
    for lab in labels:
        if lab.seconds is not None and lab.choice != "skip":
            by[lab.annotator].append(float(lab.seconds))
    if not by:
        return _empty(plt, "Seconds per label")
    fig, ax = plt.subplots(figsize=(5, 3))
    names = sorted(by)
    ax.boxplot([by[n] for n in names], tick_labels=names, orientation="horizontal", showfliers=False,
               medianprops={"color": COLORS[0]})
    ax.set_xlabel("seconds")
    ax.set_title("Seconds per label (median, quartiles)")
    fig.tight_layout()
    return fig


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    n = len(x)
    if n == 0:
        return None
    cats = set(x) | set(y)
    po = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    pe = sum(cx[c] * cy[c] for c in cats) / (n * n)
    if math.isclose(pe, 1.0):
        return 1.0 if math.isclose(po, 1.0) else None
    return (po - pe) / (1 - pe)


def agreement_rows(labels: Sequence[Any]) -> list[list]:
    """Pairwise Cohen's kappa over comparisons both annotators labelled (skips left out)."""
    by: dict[str, dict[int, str]] = defaultdict(dict)
    for lab in labels:
        if lab.choice != "skip":
            by[lab.annotator][lab.comparison_id] = lab.choice
    rows = []
    for a, b in combinations(sorted(by), 2):
        common = sorted(set(by[a]) & set(by[b]))
        if not common:
            continue
        k = cohen_kappa([by[a][c] for c in common], [by[b][c] for c in common])
        agree = sum(by[a][c] == by[b][c] for c in common) / len(common)
        rows.append([a, b, len(common), round(agree, 3), None if k is None else round(k, 3)])
    return rows


def summary_markdown(stats: dict | None, labels: Sequence[Any]) -> str:
    """Headline numbers; prefers the store's ``stats()``, falls back to counting labels."""
    humans = {lab.annotator for lab in labels}
    parts = [f"**{len(labels)}** labels", f"**{len(humans)}** labellers"]
    if stats:
        counts = stats.get("counts") or {}
        for k, name in (("prompts", "prompts"), ("comparisons", "comparisons"),
                        ("queued_comparisons", "queued")):
            if k in counts:
                parts.append(f"**{counts[k]}** {name}")
        for key, name in (("fleiss_kappa", "Fleiss κ"), ("krippendorff_alpha", "Krippendorff α")):
            v = _find(stats, key)
            if isinstance(v, (int, float)):
                parts.append(f"{name} **{v:.3f}**")
        left = _find(stats, "left_win_rate")
        if isinstance(left, (int, float)):
            parts.append(f"left picked **{left:.0%}** of decisive labels")
        med = (stats.get("seconds_per_label") or {}).get("median")
        if isinstance(med, (int, float)):
            parts.append(f"median **{med:.1f} s**/label")
    return " · ".join(parts)


def agreement_table(stats: dict | None, labels: Sequence[Any]) -> list[list]:
    """Rows [annotator 1, annotator 2, pairs, agreement, Cohen κ]: the store's (statsmodels) when
    it has them, else computed here."""
    cohen = ((stats or {}).get("agreement") or {}).get("cohen")
    if cohen:
        return [[*c["annotators"], c.get("shared"), c.get("observed_agreement"), c.get("kappa")] for c in cohen]
    return agreement_rows(labels)


def _find(d: Any, key: str) -> Any:
    """First value under ``key`` anywhere in a nested dict (stats layouts vary)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            got = _find(v, key)
            if got is not None:
                return got
    return None
