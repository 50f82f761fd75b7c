"""Annotator-aware aggregation: a one-coin Dawid–Skene model fitted by EM (numpy).

Each annotator j answers a pair correctly with probability q_j, whichever side is better; the
pair's true winner is 'a' with prior 1/2 (the app shows the sides in random order). EM alternates
  E: logit P(a wins | labels) = Σ_j ±logit(q_j)     (+ when j said 'a', − when j said 'b')
  M: q_j = (Σ_i P(j's answer on i is right) + α − 1) / (n_j + α + β − 2)   (Beta(α, β) prior)
Gold pairs are clamped to their known answer, so they anchor q_j. A careless (random) annotator
gets q ≈ 1/2 and weight logit(q) ≈ 0; an adversarial one q < 1/2 and a negative weight.
Dawid & Skene 1979, "Maximum likelihood estimation of observer error-rates using the EM algorithm".
(crowd-kit has the full class-confusion model; this one-coin form is 40 lines and needs no pandas.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np


@dataclass
class Aggregate:
    p_a: dict[Hashable, float]        # item -> P(response A is the better one)
    accuracy: dict[Hashable, float]   # annotator -> q_j
    labels: dict[Hashable, int]       # annotator -> decisive labels used
    iterations: int


def dawid_skene(votes: Iterable[tuple[Hashable, Hashable, str]], gold: dict[Hashable, str] | None = None, *,
                prior: tuple[float, float] = (3.0, 2.0), max_iter: int = 100, tol: float = 1e-6,
                clip: float = 0.01) -> Aggregate:
    """``votes``: (item, annotator, 'a' | 'b'); other choices are ignored. ``gold``: item -> 'a' | 'b'."""
    gold = {k: v for k, v in (gold or {}).items() if v in ("a", "b")}
    rows = [(i, j, c == "a") for i, j, c in votes if c in ("a", "b")]
    items = list(dict.fromkeys([i for i, _, _ in rows]))
    people = list(dict.fromkeys([j for _, j, _ in rows]))
    if not rows:
        return Aggregate({}, {}, {}, 0)
    idx_i = {k: n for n, k in enumerate(items)}
    ii = np.array([idx_i[i] for i, _, _ in rows])
    idx_p = {k: n for n, k in enumerate(people)}
    jj = np.array([idx_p[j] for _, j, _ in rows])
    sign = np.where([y for _, _, y in rows], 1.0, -1.0)  # +1 said 'a'
    n_j = np.bincount(jj, minlength=len(people)).astype(float)
    fixed = np.array([gold.get(i) is not None for i in items])
    fixed_p = np.array([1.0 if gold.get(i) == "a" else 0.0 for i in items])
    # start from the majority vote
    p = np.clip(0.5 + 0.5 * np.bincount(ii, weights=sign, minlength=len(items))
                / np.maximum(np.bincount(ii, minlength=len(items)), 1), 0.05, 0.95)
    p = np.where(fixed, fixed_p, p)
    a, b = prior
    q = np.full(len(people), 0.7)
    it = 0
    while it < max_iter:
        it += 1
        right = np.where(sign > 0, p[ii], 1 - p[ii])  # P(this label is right)
        q_new = np.clip((np.bincount(jj, weights=right, minlength=len(people)) + a - 1) / (n_j + a + b - 2),
                        clip, 1 - clip)
        w = np.log(q_new / (1 - q_new))  # log-odds weight of each annotator's vote
        logit = np.bincount(ii, weights=sign * w[jj], minlength=len(items))
        p = np.where(fixed, fixed_p, 1 / (1 + np.exp(-np.clip(logit, -30, 30))))
        done = np.max(np.abs(q_new - q)) < tol
        q = q_new
        if done:
            break
    return Aggregate({i: float(p[n]) for n, i in enumerate(items)},
                     {j: float(q[n]) for n, j in enumerate(people)},
                     {j: int(n_j[n]) for n, j in enumerate(people)}, it)
