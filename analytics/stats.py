"""Association statistics between per-row feature values and row metadata, for all features at once.

Every function takes a matrix `X` [n_rows, n_features] (one column per SAE feature, one
row per dataset row) and computes one statistic per column with a few matrix products,
so thousands of features x a dozen metadata levels take well under a second:

* `auroc_mwu(X, y)`: AUROC of each column as a score for the binary label `y` (level vs
  rest), from average ranks (ties count one half, as in sklearn's `roc_auc_score`), and the
  two-sided Mann-Whitney U p-value, the AUROC's own test (normal approximation with tie and
  continuity corrections, as `scipy.stats.mannwhitneyu(method="asymptotic")`). The ranks do
  not depend on the label, so `rank_columns` is computed once per field and shared by all
  of its levels.
* `spearman(X, y)`: Spearman's rho of each column with an ordinal or continuous `y`, and its
  two-sided p-value from Student's t with n-2 degrees of freedom (as `scipy.stats.spearmanr`).
* `discretize` + `mutual_info`: mutual information (bits) between a binary label and each
  column binned into "not firing" (x <= 0) plus equal-frequency bins of the firing values
  (by rank, reusing the ranks above),
  and the G-test (likelihood-ratio chi-square) p-value of independence on the same
  contingency table (G = 2 N MI in nats; as `scipy.stats.chi2_contingency(lambda_=
  "log-likelihood")`). Binning keeps MI exact and deterministic (no kNN estimator noise).
* `bh_qvalues(p)`: Benjamini-Hochberg (1995) adjusted p-values (q-values); NaNs are ignored
  and stay NaN.

Features that fire in too few rows can be dropped before testing without breaking the
false-discovery control, because that filter does not look at the labels (independent
filtering, Bourgon, Gentleman & Huber 2010).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import special, stats


class Ranks(NamedTuple):
    avg: np.ndarray  # [n_features, n_rows] average ranks (1-based), float64, feature-major
    tie_term: np.ndarray  # [n_features] sum over tie groups of t^3 - t


def rank_columns(X: np.ndarray) -> Ranks:
    """Average ranks of each column of X [n, F], and each column's tie term (for the U test).

    One argsort per feature (feature-major, which is ~2x faster than sorting strided
    columns): in sorted order a tie group spans positions [a, b], its members' average rank
    is (a + b) / 2 + 1 and its t = b - a + 1 members each add t^2 - 1 to the tie term, which
    sums to t^3 - t per group. Matches `scipy.stats.rankdata(X, axis=0)` exactly."""
    X = np.asarray(X)
    X = X if X.dtype.kind == "f" else X.astype(np.float64)  # ranks depend only on the order
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_rows, n_features], got shape {X.shape}")
    n, F = X.shape
    xt = np.ascontiguousarray(X.T)
    order = np.argsort(xt, axis=1, kind="stable")
    xs = np.take_along_axis(xt, order, axis=1)
    idx = np.arange(n, dtype=np.int64)[None, :]
    new = np.ones((F, n), dtype=bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    last = np.ones((F, n), dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.minimum.accumulate(np.where(last, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]
    t = (end - start + 1).astype(np.float64)
    avg = np.empty((F, n))
    np.put_along_axis(avg, order, (start + end) / 2.0 + 1.0, axis=1)
    return Ranks(avg, (t * t - 1.0).sum(axis=1))


def _labels(y: np.ndarray, n: int) -> tuple[np.ndarray, bool]:
    """y as a float [n, L] 0/1 matrix, and whether it was a single vector."""
    y = np.asarray(y)
    single = y.ndim == 1
    Y = y[:, None] if single else y
    if Y.ndim != 2 or Y.shape[0] != n:
        raise ValueError(f"labels have shape {y.shape}, expected ({n},) or ({n}, n_levels)")
    return Y.astype(bool).astype(np.float64), single


def auroc_mwu(X: np.ndarray | None, y: np.ndarray, ranks: Ranks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of every column as a score for labels y, and the Mann-Whitney two-sided p-value.

    y is one boolean vector [n] (results [F]) or one column per level [n, L] (results
    [F, L]). Columns where every value ties get AUROC 0.5 and p 1; a level with no positives
    or no negatives gets NaN."""
    r = ranks if ranks is not None else rank_columns(X)
    F, n = r.avg.shape
    Y, single = _labels(y, n)
    n1 = Y.sum(axis=0)[None, :]  # [1, L]
    n0 = n - n1
    r1 = r.avg @ Y  # rank sums of the positives [F, L]
    with np.errstate(divide="ignore", invalid="ignore"):
        u1 = r1 - n1 * (n1 + 1) / 2.0
        auc = u1 / (n1 * n0)
        # scipy.stats.mannwhitneyu, two-sided asymptotic: U = max(U1, U2), continuity 0.5.
        u = np.maximum(u1, n1 * n0 - u1)
        var = n1 * n0 / 12.0 * ((n + 1) - r.tie_term[:, None] / (n * (n - 1)))
        z = (u - n1 * n0 / 2.0 - 0.5) / np.sqrt(var)
    p = np.clip(2.0 * stats.norm.sf(z), 0.0, 1.0)
    const = np.broadcast_to(r.tie_term[:, None] >= n**3 - n, auc.shape)
    p = np.where(const, 1.0, p)
    auc = np.where(const, 0.5, auc)
    empty = np.broadcast_to((n1 == 0) | (n0 == 0), auc.shape)
    auc, p = np.where(empty, np.nan, auc), np.where(empty, np.nan, p)
    return (auc[:, 0], p[:, 0]) if single else (auc, p)


def spearman(X: np.ndarray | None, y: np.ndarray, ranks: Ranks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho of every column with y [n], and the two-sided t-test p-value.

    Constant columns (or a constant y) give NaN, as scipy does."""
    r = ranks if ranks is not None else rank_columns(X)
    F, n = r.avg.shape
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape}, expected ({n},)")
    ry = stats.rankdata(y)
    ry = ry - ry.mean()
    rx = r.avg - r.avg.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (rx @ ry) / (np.sqrt((rx * rx).sum(axis=1)) * np.sqrt(ry @ ry))
        rho = np.clip(rho, -1.0, 1.0)
        dof = n - 2
        t = rho * np.sqrt(dof / ((1.0 - rho) * (1.0 + rho)))
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    p[np.abs(rho) == 1.0] = 0.0
    return rho, p


def discretize(X: np.ndarray, n_bins: int = 4, ranks: Ranks | None = None) -> np.ndarray:
    """Bin codes [n, F] (int8): 0 = not firing (x <= 0), 1..n_bins-1 = equal-frequency bins
    of the column's firing values, by their rank among the firing values (tied values share
    a bin, so bins can be uneven under ties)."""
    if n_bins < 2 or n_bins > 100:
        raise ValueError(f"n_bins must be in 2..100 (not firing + at least one firing bin), got {n_bins}")
    X = np.asarray(X)
    r = ranks if ranks is not None else rank_columns(X)
    firing = X > 0
    n_fire = firing.sum(axis=0)
    # Ranks of the firing values among themselves: every non-firing value ranks below them.
    rank_fire = r.avg.T - (len(X) - n_fire)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.ceil(rank_fire / n_fire[None, :] * (n_bins - 1))
    return np.where(firing, np.clip(b, 1, n_bins - 1), 0).astype(np.int8)


def mutual_info(codes: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """MI in bits between binary labels and each column of bin codes [n, F], and the G-test
    p-value (df = non-empty bins - 1). y is [n] (results [F]) or [n, L] (results [F, L]).
    Columns with one non-empty bin give MI 0 and p 1; a constant label gives NaN."""
    n, F = codes.shape
    Y, single = _labels(y, n)
    n1 = Y.sum(axis=0)[None, :]
    mi = np.zeros((F, Y.shape[1]))
    nonempty = np.zeros((F, 1))
    for b in range(n_bins):
        m = (codes == b).astype(np.float64)
        nb = m.sum(axis=0)[:, None]  # [F, 1]
        nb1 = m.T @ Y  # [F, L]
        for nbc, nc in ((nb1, n1), (nb - nb1, n - n1)):
            with np.errstate(divide="ignore", invalid="ignore"):
                mi += np.where(nbc > 0, nbc / n * np.log(nbc * n / (nb * nc)), 0.0)
        nonempty += nb > 0
    mi = np.maximum(mi, 0.0)
    dof = np.broadcast_to(nonempty - 1, mi.shape)
    p = np.where(dof > 0, special.chdtrc(np.maximum(dof, 1), 2.0 * n * mi), 1.0)
    empty = np.broadcast_to((n1 == 0) | (n1 == n), mi.shape)
    mi, p = np.where(empty, np.nan, mi / np.log(2.0)), np.where(empty, np.nan, p)
    return (mi[:, 0], p[:, 0]) if single else (mi, p)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: q_(i) = min_{j >= i} p_(j) m / j, capped at 1.

    Rejecting q <= alpha controls the false discovery rate at alpha for independent (or
    positively dependent) tests. NaN entries are not counted in m and stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    ps = p[ok]
    if (ps < 0).any() or (ps > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = len(ps)
    if m == 0:
        return out
    order = np.argsort(ps, kind="stable")
    scaled = ps[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    qs = np.empty(m)
    qs[order] = np.minimum(q, 1.0)
    out[ok] = qs
    return out
