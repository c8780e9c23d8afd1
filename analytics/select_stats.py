"""Paired statistics of the selection experiment: arm A vs arm B, per seed and pooled.

The data of one comparison are, for every seed s and every evaluated row i, a per-row paired
difference `delta[s, i]` of summed quantities (A - B) and the row's weight `w[i]`: for eval loss
the difference of the row's summed token losses with w = its supervised token count, so that the
statistic is exactly the difference of the two arms' token-weighted eval losses (what
trainers.eval_loss reports); for the downstream metric the difference of the 0/1 correct flags
with w = 1, so that the statistic is the difference of accuracies.

* Per seed: D_s = sum_i delta[s, i] / sum_i w[i].
* Pooled: D = mean_s D_s (every seed weighs the same; the eval rows are the same in every seed).
* 95% CI: percentile bootstrap. Per seed, rows are resampled with replacement (paired: a row's
  A and B values move together). Pooled, seeds and rows are resampled independently (a crossed
  two-way bootstrap, since every seed is evaluated on the same rows): each replicate draws S
  seeds and n rows, and the same row draw is used for every seed of the replicate, which keeps
  the between-seed and between-row variation both in the interval. D* is a ratio estimator
  (the weights are resampled too), exactly as D is computed.
* p-value (primary, `p_value`): the bootstrap's own two-sided p from the *same* replicates as the
  CI, so that the test and the interval resample the same things (rows, and pooled also seeds):
  p = min(1, 2 min(1 + #{D* <= 0}, 1 + #{D* >= 0}) / (1 + n_boot)), the smallest two-sided
  level at which the percentile interval excludes 0 (p < 0.05 exactly when the 95% CI excludes 0,
  up to the percentile's interpolation and the +1). With every delta = 0 (identical arms) p = 1.
  One verdict per comparison: read the CI and this p together.
* `p_sign_flip_rows` (secondary, a diagnostic): the two-sided sign-flip permutation test on the
  per-row differences pooled over seeds, a_i = sum_s delta[s, i] / (S sum_j w[j]) (so that
  sum_i a_i = D), p = (1 + #{|T*| >= |T|}) / (1 + n_perm). It treats the rows as the only source
  of variation, i.e. it is conditional on these seeds' trained arms: it answers "would these very
  adapters differ on other eval rows?", not "would another seed give the same sign?". On the
  embedded run it gave 0.045 beside a pooled CI of [-0.0002, +0.0100] (which also resamples
  seeds); that disagreement is why it is no longer the reported p.

Everything is seeded (`np.random.default_rng(seed)`), so a rerun gives the same intervals.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Estimate(NamedTuple):
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_rows: int
    n_seeds: int
    p_sign_flip_rows: float | None = None  # the secondary, rows-only test (module docstring)

    def as_dict(self) -> dict[str, float | int]:
        return self._asdict()


def _check(delta: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    delta = np.atleast_2d(np.asarray(delta, dtype=np.float64))
    w = np.asarray(w, dtype=np.float64)
    if delta.ndim != 2 or w.shape != (delta.shape[1],):
        raise ValueError(f"delta must be [n_seeds, n_rows] and w [n_rows], got {delta.shape} and {w.shape}")
    if delta.shape[1] == 0 or w.sum() <= 0:
        raise ValueError("no rows with weight to compare (every evaluated row has weight 0)")
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta has non-finite values (a row without supervised tokens?)")
    return delta, w


def point(delta: np.ndarray, w: np.ndarray) -> float:
    """D = mean over seeds of sum_i delta[s, i] / sum_i w[i]."""
    delta, w = _check(delta, w)
    return float((delta.sum(axis=1) / w.sum()).mean())


def _counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] multiplicities of n draws with replacement from range(n)."""
    idx = rng.integers(0, n, size=(n_boot, n))
    out = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(out, (np.arange(n_boot)[:, None], idx), 1.0)
    return out


def bootstrap_draws(
    delta: np.ndarray, w: np.ndarray, n_boot: int, rng: np.random.Generator, resample_seeds: bool = True
) -> np.ndarray:
    """[n_boot] replicates D* of `point` by the (crossed) paired bootstrap of the module docstring."""
    delta, w = _check(delta, w)
    S, n = delta.shape
    rows = _counts(rng, n, n_boot)  # [B, n]
    per_seed = (rows @ delta.T) / (rows @ w)[:, None]  # [B, S]  D_s of each replicate
    if resample_seeds and S > 1:
        seeds = _counts(rng, S, n_boot)  # [B, S]
        draws = (per_seed * seeds).sum(axis=1) / S
    else:
        draws = per_seed.mean(axis=1)
    return draws


def interval(draws: np.ndarray) -> tuple[float, float]:
    """The percentile 95% interval of bootstrap replicates."""
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def bootstrap_p(draws: np.ndarray) -> float:
    """Two-sided p of H0 "no difference" from the same bootstrap replicates as the CI (module docstring)."""
    tol = 1e-12 * max(1.0, float(np.max(np.abs(draws))))
    below, above = int((draws <= tol).sum()), int((draws >= -tol).sum())
    return min(1.0, 2 * (1 + min(below, above)) / (1 + len(draws)))


def bootstrap_ci(
    delta: np.ndarray, w: np.ndarray, n_boot: int, rng: np.random.Generator, resample_seeds: bool = True
) -> tuple[float, float]:
    """Percentile 95% CI of `point` by the (crossed) paired bootstrap of the module docstring."""
    return interval(bootstrap_draws(delta, w, n_boot, rng, resample_seeds))


def sign_flip_p(delta: np.ndarray, w: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """Two-sided sign-flip permutation p-value of the pooled per-row differences."""
    delta, w = _check(delta, w)
    a = delta.sum(axis=0) / (delta.shape[0] * w.sum())  # sum(a) == point(delta, w)
    t = abs(a.sum())
    hits = 0
    for s in range(0, n_perm, 4096):  # bounded memory for big n
        m = min(4096, n_perm - s)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, len(a)))
        # A tolerance so that exact ties (e.g. every a_i = 0) count as "as extreme".
        hits += int((np.abs(signs @ a) >= t - 1e-12 * max(1.0, t)).sum())
    return (1 + hits) / (1 + n_perm)


def compare(
    delta: np.ndarray, w: np.ndarray, *, n_boot: int = 2000, n_perm: int = 10000, seed: int = 0
) -> dict[str, object]:
    """Per-seed and pooled Estimates of A - B (see the module docstring): CI and p from one bootstrap."""
    delta, w = _check(delta, w)
    rng = np.random.default_rng(seed)

    def one(d: np.ndarray) -> Estimate:
        draws = bootstrap_draws(d, w, n_boot, rng)
        lo, hi = interval(draws)
        rows_p = sign_flip_p(d, w, n_perm, rng)
        return Estimate(point(d, w), lo, hi, bootstrap_p(draws), d.shape[1], d.shape[0], rows_p)

    per_seed = [one(delta[s : s + 1]) for s in range(delta.shape[0])]
    return {"per_seed": per_seed, "pooled": one(delta)}


def level(values: np.ndarray, w: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of one arm's weighted mean sum_i v_i / sum_i w_i (e.g. the base
    adapter's eval loss from its row sums), bootstrapping rows."""
    v, w = _check(values, w)
    lo, hi = bootstrap_ci(v, w, n_boot, rng)
    return point(v, w), lo, hi
