"""Label scores per feature: balanced accuracy and F1 of the scorer's Yes/No decisions, AUROC of
its continuous score (log p(Yes) - log p(No)), and a percentile bootstrap CI of the AUROC with
examples resampled within each class (delphi reports the first three per latent)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Scores(NamedTuple):
    bacc: float
    f1: float
    auroc: float
    n_pos: int
    n_neg: int


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U)."""
    pos, neg = score[y], score[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.r_[pos, neg], kind="stable")
    ranks = np.empty(len(order))
    allv = np.r_[pos, neg][order]
    # average ranks of ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def classify(score: np.ndarray, y: np.ndarray) -> Scores:
    """The scorer says Yes where score > 0 (p(Yes) > p(No))."""
    y = y.astype(bool)
    pred = score > 0
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    tnr = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return Scores((tpr + tnr) / 2, f1, auroc(score, y), int(y.sum()), int((~y).sum()))


def bootstrap_auroc(parts: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile CI of the mean AUROC over `parts` (e.g. detection and fuzzing), each
    part's positives and negatives resampled with replacement."""
    parts = [(s, y) for s, y in parts if y.any() and (~y).any()]  # an AUROC needs both classes
    if n_boot == 0 or not parts:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        vals = []
        for score, y in parts:
            pi, ni = np.flatnonzero(y), np.flatnonzero(~y)
            idx = np.r_[rng.choice(pi, len(pi)), rng.choice(ni, len(ni))]
            vals.append(auroc(score[idx], y[idx]))
        boots[b] = np.mean(vals)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def confidence(auroc_low: float) -> float:
    """How far the CI's lower end is above chance, 0 (at or below 0.5) to 1 (at 1.0)."""
    if not np.isfinite(auroc_low):
        return 0.0
    return float(np.clip((auroc_low - 0.5) / 0.5, 0.0, 1.0))
