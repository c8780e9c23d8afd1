"""Held-out statistics of the SAE predictor and its baselines (trainers.sae_predictor).

* `evaluate`: Spearman, Kendall, a 95% percentile-bootstrap CI of Spearman over the test rows,
  and top-k overlap with the attribution's top k against the random expectation k / n.
* `paired_difference`: Spearman(a) - Spearman(b) on the same bootstrap resamples (paired), its
  95% CI and a two-sided bootstrap p-value (2 x the smaller tail share at 0).
* `correlations`: what a prediction tracks besides attribution: Spearman with
  reward_model_score, difficulty and quality (ordinal, in the sample's level order), and the
  share of its variance between categories (eta^2).

Every bootstrap draws `numpy.random.default_rng(seed).integers(0, n, (B, n))`, so two models
evaluated with the same seed on the same rows share their resamples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from scipy.stats import kendalltau, rankdata, spearmanr

from extractors.ingest.sample.generate import DIFFICULTIES, QUALITIES


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho; None when it is undefined (fewer than 3 rows, or a constant side)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _boot_spearman(a: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Spearman of every resample (rows of idx); NaN where a resample is constant."""
    ra, ry = rankdata(a[idx], axis=1), rankdata(y[idx], axis=1)
    ra -= ra.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * ry).sum(1) / np.sqrt((ra**2).sum(1) * (ry**2).sum(1))


def _resamples(n: int, B: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(B, n))


def _ci(x: np.ndarray) -> list[float | None]:
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else [None, None]


def best_first(v: np.ndarray, target: str) -> np.ndarray:
    """Indices best first: the lowest rank, or the highest score; ties by position."""
    key = v if target == "rank" else -v
    return np.lexsort((np.arange(len(v)), key))


def evaluate(pred: np.ndarray, y: np.ndarray, target: str, top_frac: float, B: int, seed: int) -> dict[str, Any]:
    n = len(y)
    k = max(1, int(round(top_frac * n)))
    overlap = len(set(best_first(pred, target)[:k]) & set(best_first(y, target)[:k])) / k
    rho = spearman(pred, y)
    tau = None if rho is None else float(kendalltau(pred, y).statistic)
    return {
        "n_test": n,
        "spearman": rho if rho is not None else 0.0,
        "spearman_defined": rho is not None,
        "spearman_ci": _ci(_boot_spearman(pred, y, _resamples(n, B, seed))),
        "kendall": tau or 0.0,
        "k": k,
        "top_k_overlap": overlap,
        "top_k_random": k / n,
    }


def paired_difference(a: np.ndarray, b: np.ndarray, y: np.ndarray, B: int, seed: int) -> dict[str, Any]:
    idx = _resamples(len(y), B, seed)
    d = _boot_spearman(a, y, idx) - _boot_spearman(b, y, idx)
    d = d[np.isfinite(d)]
    sa, sb = spearman(a, y), spearman(b, y)
    p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))) if len(d) else None
    return {"difference": (sa or 0.0) - (sb or 0.0), "ci": _ci(d), "p_bootstrap": p, "resamples": int(len(d))}


def _ordinal(values: list[Any], levels: tuple[str, ...]) -> np.ndarray:
    pos = {v: i for i, v in enumerate(levels)}
    return np.array([pos.get(v, np.nan) for v in values], dtype=np.float64)


def eta_squared(x: np.ndarray, groups: list[Any]) -> float | None:
    """Between-group sum of squares / total sum of squares of x (rows with a group)."""
    keep = np.array([g is not None for g in groups])
    x, g = x[keep], np.array(groups, dtype=object)[keep]
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    m = x.mean()
    between = sum(len(x[g == c]) * (x[g == c].mean() - m) ** 2 for c in set(g))
    return float(between / ((x - m) ** 2).sum())


def correlations(x: np.ndarray, meta: pl.DataFrame) -> dict[str, float | None]:
    """Spearman of x with reward_model_score / difficulty / quality, eta^2 of category (module docstring)."""
    out: dict[str, float | None] = {}
    rm = meta["reward_model_score"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    for name, v in (
        ("reward_model_score", rm),
        ("difficulty", _ordinal(meta["difficulty"].to_list(), DIFFICULTIES)),
        ("quality", _ordinal(meta["quality"].to_list(), QUALITIES)),
    ):
        ok = np.isfinite(v)
        out[name] = spearman(x[ok], v[ok])
    out["category_eta2"] = eta_squared(np.asarray(x, dtype=np.float64), meta["category"].to_list())
    return out
