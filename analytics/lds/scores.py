"""What each source predicts for a subset, and the linear datamodeling score with its bootstrap CI.

**Sign convention** (one for every source): a row's *benefit* is a number where higher means
"predicted to help more", i.e. to lower the eval loss more when the row is in the training set.
A subset's `predicted` is the sum of its rows' benefits, and

    LDS = Spearman(predicted, -actual_loss)   over the subsets,

so a source whose higher predictions go with lower measured losses has LDS > 0 (1 = a perfect
rank agreement; 0 = none; < 0 = it points the wrong way). Per source:

* `attribution:<run>`: the `attribution_scores.score` of the run, as stored. bergson's score is
  g_pool . H^-1 mean(g_query) (docs/selection.md "The ranking's sign"): a high score is a pool row
  whose gradient step lowers the query loss, rank 1 = the highest score = the most helpful. So
  benefit = score, unchanged.
* `predictor:<run>`: the SAE predictor's `predictor_scores.predicted`. A predicted *rank* is better
  when lower (rank 1 = most helpful), so benefit = -predicted; a predicted *score* is used as is.
  The predictor was fitted on part of these pool rows (split train), so its predictions there are
  in-sample; the LDS sums over every pool row of the subset either way.
* `reward_model`: `rows.reward_model_score` (higher = better, as trainers.subsets ranks it).
* `random`: one standard normal per pool row, `numpy.random.default_rng(--seed)` over the pool's
  row ids in sorted order: the chance baseline (its LDS should cover 0).

The 95% CI is the percentile bootstrap over subsets (`--n-boot` resamples with replacement, seeded
by `--stats-seed`): each replicate recomputes Spearman on the resampled (predicted, actual) pairs;
replicates where either side is constant (no rank correlation defined) are dropped and counted.
The p-value is the bootstrap's own, from the same replicates (analytics.select_stats.bootstrap_p),
so the interval and the test agree; Spearman's own t-test p is reported beside it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from analytics import stats
from analytics.select_stats import bootstrap_p, interval
from store.core import Store, StoreError
from trainers.selection.subsets import PREDICTOR_TABLE, ranking

RANDOM = "random"
REWARD = "reward_model"


class Source(NamedTuple):
    """One predictor of subset quality: its name in `lds_runs.source`, each pool row's benefit
    (higher = predicted more helpful), or the reason it is skipped."""

    name: str
    benefit: dict[str, float] | None
    sign: str  # how the benefit is made from the stored value (the sign convention, in words)
    skipped_because: str | None = None


def pool_of(store: Store, run: str, pool_split: str) -> pl.DataFrame:
    """The attribution run's scored pool rows: row_id, rank (1 = highest score), score."""
    return ranking(store, f"attribution:{run}", pool_split)


def resolve_predictor(store: Store, spec: str, attribution_run: str) -> tuple[str | None, str | None]:
    """(predictor run, None) or (None, why the predictor baseline is skipped). `latest` is the newest
    predictor run fitted on this attribution run; a named run that does not exist is an error."""
    if spec == "none":
        return None, "--predictor none"
    if not store.has_table(PREDICTOR_TABLE):
        if spec != "latest":
            raise StoreError(
                f"--predictor {spec}: {store.root} has no {PREDICTOR_TABLE} table; fit one with python -m "
                f"trainers.sae_predictor --sae latest --attribution {attribution_run}, or pass --predictor latest"
            )
        fit = f"python -m trainers.sae_predictor --attribution {attribution_run}"
        return None, f"no predictor run in this store ({fit})"
    runs = store.query(
        f"SELECT p.run, any_value(p.attribution_run) AS attribution_run, max(r.started_at) AS started_at "
        f"FROM {PREDICTOR_TABLE} p LEFT JOIN runs r ON r.run_id = p.run GROUP BY p.run "
        "ORDER BY started_at DESC NULLS LAST, p.run DESC"
        if store.has_table("runs")
        else f"SELECT run, any_value(attribution_run) AS attribution_run FROM {PREDICTOR_TABLE} GROUP BY run "
        "ORDER BY run DESC"
    ).to_pylist()
    if spec == "latest":
        mine = [r["run"] for r in runs if r["attribution_run"] == attribution_run]
        if not mine:
            return None, (
                f"no predictor run was fitted on attribution run {attribution_run} (python -m trainers.sae_predictor "
                f"--sae latest --attribution {attribution_run})"
            )
        return mine[0], None
    found = [r for r in runs if r["run"] == spec]
    if not found:
        known = ", ".join(r["run"] for r in runs[:5]) or "none"
        raise StoreError(f"--predictor {spec!r} has no rows in {PREDICTOR_TABLE}; runs there: {known} (or latest)")
    if found[0]["attribution_run"] != attribution_run:
        raise StoreError(
            f"--predictor {spec} was fitted on attribution run {found[0]['attribution_run']}, not on "
            f"{attribution_run}; pass a predictor of this attribution run, latest, or none"
        )
    return spec, None


def _by_row(store: Store, sql: str, ids: list[str], params: list | None = None) -> dict[str, float | None]:
    con = store.connect()
    try:
        con.register("_pool", pa.table({"row_id": ids}))
        return dict(con.sql(sql, params=params).fetchall())
    finally:
        con.close()


def sources(store: Store, pool: pl.DataFrame, run: str, predictor_run: str | None, why_not: str | None, seed: int):
    """Every source's per-row benefit over the pool (the module docstring's sign convention)."""
    ids = pool["row_id"].to_list()
    out = [
        Source(
            f"attribution:{run}",
            dict(zip(ids, pool["score"].to_list(), strict=True)),
            "benefit = attribution score (bergson: high = the row's gradient step lowers the query loss)",
        )
    ]
    if predictor_run is None:
        out.append(Source("predictor", None, "", why_not))
    else:
        got = _by_row(
            store,
            f"SELECT p.row_id, p.predicted FROM {PREDICTOR_TABLE} p JOIN _pool USING (row_id) WHERE p.run = ?",
            ids,
            [predictor_run],
        )
        target = store.query(f"SELECT any_value(target) FROM {PREDICTOR_TABLE} WHERE run = ?", [predictor_run])
        target = target.column(0)[0].as_py()
        missing = [r for r in ids if got.get(r) is None]
        name = f"predictor:{predictor_run}"
        if missing:
            out.append(Source(name, None, "", f"{len(missing)} of {len(ids)} pool rows have no prediction"))
        elif target == "rank":
            out.append(Source(name, {r: -got[r] for r in ids}, "benefit = -predicted rank (rank 1 = most helpful)"))
        else:
            out.append(Source(name, {r: got[r] for r in ids}, "benefit = predicted attribution score"))
    rm = _by_row(store, "SELECT r.row_id, r.reward_model_score FROM rows r JOIN _pool USING (row_id)", ids)
    missing = [r for r in ids if rm.get(r) is None]
    if missing:
        out.append(Source(REWARD, None, "", f"{len(missing)} of {len(ids)} pool rows have no reward_model_score"))
    else:
        out.append(Source(REWARD, {r: float(rm[r]) for r in ids}, "benefit = reward_model_score (higher = better)"))
    srt = sorted(ids)
    noise = np.random.default_rng(seed).standard_normal(len(srt))
    out.append(
        Source(
            RANDOM,
            dict(zip(srt, noise.tolist(), strict=True)),
            f"benefit = standard normal per pool row (default_rng({seed}), sorted row ids): chance",
        )
    )
    return out


def predicted(src: Source, rows: list[str]) -> float:
    """A subset's prediction: the sum of its rows' benefits."""
    return float(sum(src.benefit[r] for r in rows))


def _rho(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    rho, p = stats.spearman(x[:, None], y)
    return float(rho[0]), float(p[0])


def lds(pred: np.ndarray, actual: np.ndarray, n_boot: int, seed: int) -> dict[str, float | int | None]:
    """LDS = Spearman(pred, -actual) over subsets, its percentile-bootstrap 95% CI over subsets and
    the bootstrap p (module docstring)."""
    pred, actual = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if pred.shape != actual.shape or pred.ndim != 1 or len(pred) < 3:
        raise ValueError(f"LDS needs at least 3 paired subsets, got {pred.shape} and {actual.shape}")
    est, p_t = _rho(pred, -actual)
    rng = np.random.default_rng(seed)
    n = len(pred)
    draws = []
    for idx in rng.integers(0, n, size=(n_boot, n)):
        x, y = pred[idx], -actual[idx]
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue  # Spearman is undefined on a constant side
        draws.append(_rho(x, y)[0])
    d = np.array(draws)
    ok = np.isfinite(est) and len(d) > 0
    lo, hi = interval(d) if ok else (None, None)
    return {
        "lds": est if np.isfinite(est) else None,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": bootstrap_p(d) if ok else None,
        "p_spearman_t": p_t if np.isfinite(p_t) else None,
        "n_subsets": n,
        "n_boot": n_boot,
        "n_boot_dropped": n_boot - len(d),
    }
