"""Which SAE features track which metadata: `python -m analytics.correlations`.

    python -m extractors.run --layer 17                                   # hidden states
    python -m trainers.sae --layer 17                                     # an SAE (run dir .../sae)
    python -m extractors.run --layer 17 --kinds sae --sae store_data/runs/<run_id>/sae   # codes + tables
    python -m analytics.correlations --layer 17 --sae store_data/runs/<run_id>/sae
    python -m analytics.correlations --layer 17                           # the store's only SAE at layer 17

Input: the per-row feature summaries `sae_row_features` (long format; a feature absent for
a row never fired there, so its value is 0) over the rows of `sae_sample_stats`, joined to
`rows`. The value per (row, feature) is `--value` (default `mean_act`, the activation
averaged over all the row's token-set tokens). For every feature that fires in at least
`--min-rows` rows, and every metadata field:

* categorical fields (`--categorical`, default category, difficulty, quality), per level,
  one-vs-rest: `auroc` (AUROC of the feature as a score for the level; p = two-sided
  Mann-Whitney U, the AUROC's own test) and `mi` (mutual information in bits between the
  level indicator and the binned feature; p = G-test);
* ordinal fields (`--ordinal`: difficulty very easy < ... < very hard, quality very poor
  < ... < excellent) and continuous ones (`--continuous`: reward_model_score,
  conversation_tokens): `spearman` rho and its p-value;
* q-values: Benjamini-Hochberg within each (field, stat) family of this SAE and layer.

Output: the tidy table `feature_metadata_assoc` (one Parquet file per SAE and layer,
replaced by a rerun) with columns sae, layer, feature, field, kind, level, stat, effect,
p_value, q_value, n_pos, n_neg, mean_pos, mean_neg, run_id (for `spearman` rows n_pos is
the number of rows with a value and level/n_neg/mean_* are null); a `runs` record (kind
feature_correlations); and in the run dir `summary.json`, `top_features.md` (the top
features per category with their top-activating token contexts), `heatmap.png`,
`volcano.png` and `layers.png` (every SAE layer with results in the store).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from analytics import stats
from analytics.row_features import attach_contexts, load_row_matrix, resolve_sae
from store.arrays import array_key
from store.catalog.runs import Run
from store.cli import LayerOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from trainers import plots

TABLE = "feature_metadata_assoc"
ORDINAL_ORDERS: dict[str, list[str]] = {
    "quality": ["very poor", "poor", "average", "good", "excellent"],
    "difficulty": ["very easy", "easy", "medium", "hard", "very hard"],
}
# How features are ranked within a level: AUROC, then q, then mean activation in the level
# (AUROC 1.0 ties are common on the embedded sample). plots.category_heatmap uses the same.
RANK_ORDER = (["level", "effect", "q_value", "mean_pos"], [False, True, False, True])
SCHEMA = pa.schema(
    [
        ("sae", pa.string()),
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("field", pa.string()),
        ("kind", pa.string()),
        ("level", pa.string()),
        ("stat", pa.string()),
        ("effect", pa.float64()),
        ("p_value", pa.float64()),
        ("q_value", pa.float64()),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("mean_pos", pa.float64()),
        ("mean_neg", pa.float64()),
        ("run_id", pa.string()),
    ]
)


@dataclass(kw_only=True)
class CorrelationConfig(StoreOptions, LayerOptions, ProgressOptions):
    """Associate every SAE feature with the rows' metadata (AUROC / MI / Spearman + BH).
    One layer, --layer L: the SAE of that layer whose row features are analysed."""

    layers: list[int]  # required: one layer (--layer L)
    sae: str | None = field(
        default=None,
        metadata={
            "help": "the SAE: latest (the newest SAE of --layer in the saes "
            "table with row features), its store name (the `sae` column), its sae-lens folder, or "
            "RELEASE/SAE_ID; default: the only SAE with row features at --layer"
        },
    )
    value: Literal["mean_act", "max_act", "n_active"] = field(
        default="mean_act",
        metadata={
            "help": "per-row feature value: mean activation over the row's tokens (inactive = 0), max, or "
            "the number of tokens where it fires"
        },
    )
    split: str = field(
        default="all",
        metadata={"help": "rows to analyse: all, or one split (train_base, attr_query, eval, score_pool)"},
    )
    categorical: list[str] = field(
        default_factory=lambda: ["category", "difficulty", "quality"],
        metadata={"help": "fields tested per level, one-vs-rest (AUROC + Mann-Whitney p, MI + G-test p)"},
    )
    ordinal: list[str] = field(
        default_factory=lambda: ["difficulty", "quality"],
        metadata={"help": f"ordered fields tested by Spearman; known orders: {', '.join(ORDINAL_ORDERS)}"},
    )
    continuous: list[str] = field(
        default_factory=lambda: ["reward_model_score", "conversation_tokens"],
        metadata={"help": "numeric fields tested by Spearman"},
    )
    min_rows: int = field(
        default=3,
        metadata={
            "help": "test only features that fire in at least this many rows (a label-blind filter, so BH stays valid)"
        },
    )
    mi_bins: int = field(
        default=4,
        metadata={"help": "bins for MI: not firing + (mi_bins - 1) equal-frequency bins of the firing values"},
    )
    alpha: float = field(default=0.05, metadata={"help": "false discovery rate for 'significant'"})
    top_n: int = field(default=5, metadata={"help": "top features per category level in the report"})
    contexts: int = field(default=3, metadata={"help": "top-activating token contexts per top feature"})
    heatmap_per_level: int = field(default=2, metadata={"help": "features per category level in the heatmap"})

    def __post_init__(self) -> None:
        self.one_layer("feature correlations")
        if self.min_rows < 1:
            raise ValueError(f"--min-rows must be >= 1, got {self.min_rows}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")
        if not 2 <= self.mi_bins <= 100:
            raise ValueError(f"--mi-bins must be in 2..100, got {self.mi_bins}")
        for name in ("top_n", "contexts", "heatmap_per_level"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        unknown = sorted(set(self.ordinal) - set(ORDINAL_ORDERS))
        if unknown:
            raise ValueError(
                f"--ordinal {unknown[0]!r} has no known level order (known: "
                f"{', '.join(ORDINAL_ORDERS)}); test it with --categorical instead"
            )

    @property
    def layer(self) -> int:
        return self.one_layer("feature correlations")


class CorrelationResult(NamedTuple):
    run_id: str
    sae: str
    layer: int
    assoc: pl.DataFrame  # the rows written to feature_metadata_assoc
    top: pl.DataFrame  # top features per category level (with contexts when available)
    plots: dict[str, str]
    metrics: dict[str, Any]


def _frame(
    feat: np.ndarray,
    field_: str,
    kind: str,
    stat: str,
    levels: list[str | None],
    effect: np.ndarray,
    p: np.ndarray,
    n_pos: np.ndarray,
    n_neg: np.ndarray | None,
    mean_pos: np.ndarray | None,
    mean_neg: np.ndarray | None,
) -> pl.DataFrame:
    """Tidy rows for a [F, L] block of results."""
    F, L = effect.shape
    nulls = np.full(F * L, np.nan)
    return pl.DataFrame(
        {
            "feature": np.repeat(feat, L).astype(np.int32),
            "field": [field_] * (F * L),
            "kind": [kind] * (F * L),
            "level": pl.Series(levels * F, dtype=pl.String),
            "stat": [stat] * (F * L),
            "effect": effect.ravel(),
            "p_value": p.ravel(),
            "n_pos": np.tile(n_pos, F).astype(np.int32),
            "n_neg": pl.Series(np.tile(n_neg, F) if n_neg is not None else [None] * (F * L), dtype=pl.Int32),
            "mean_pos": mean_pos.ravel() if mean_pos is not None else nulls,
            "mean_neg": mean_neg.ravel() if mean_neg is not None else nulls,
        }
    ).with_columns(pl.col("mean_pos", "mean_neg").fill_nan(None))


def associate(
    X: np.ndarray,
    features: np.ndarray,
    meta: pl.DataFrame,
    *,
    categorical: list[str],
    ordinal: list[str],
    continuous: list[str],
    mi_bins: int = 4,
    orders: dict[str, list[str]] | None = None,
) -> pl.DataFrame:
    """Tidy association rows (without sae/layer/run_id) for every feature column of X.

    Rows with a null value in a field are left out of that field's tests; ordinal values
    outside the field's order too. q-values are BH within each (field, stat)."""
    orders = orders or ORDINAL_ORDERS
    parts: list[pl.DataFrame] = []
    cache: dict[bytes, list] = {}  # rows kept -> [X rows, ranks, MI bin codes]: shared by fields

    def ranked(keep: np.ndarray, need_codes: bool):
        key = keep.tobytes()
        if key not in cache:
            Xk = X[keep]
            cache[key] = [Xk, stats.rank_columns(Xk), None]
        c = cache[key]
        if need_codes and c[2] is None:
            c[2] = stats.discretize(c[0], mi_bins, c[1])
        return c

    for f in categorical:
        vals = meta[f].cast(pl.String).to_numpy()
        keep = np.array([v is not None for v in vals], dtype=bool)
        levels = sorted({str(v) for v in vals[keep]})
        if len(levels) < 2:
            continue
        Xk, r, codes = ranked(keep, True)
        Y = np.stack([vals[keep] == lv for lv in levels], axis=1)  # [n, L]
        n_pos = Y.sum(0)
        n_neg = len(Y) - n_pos
        Yf = Y.astype(np.float64)
        mean_pos = (Xk.T @ Yf) / np.maximum(n_pos, 1)
        mean_neg = (Xk.sum(0)[:, None] - Xk.T @ Yf) / np.maximum(n_neg, 1)
        auc, p = stats.auroc_mwu(None, Y, r)
        parts.append(_frame(features, f, "categorical", "auroc", levels, auc, p, n_pos, n_neg, mean_pos, mean_neg))
        mi, pm = stats.mutual_info(codes, Y, mi_bins)
        parts.append(_frame(features, f, "categorical", "mi", levels, mi, pm, n_pos, n_neg, mean_pos, mean_neg))
    for f, kind in [(f, "ordinal") for f in ordinal] + [(f, "continuous") for f in continuous]:
        if kind == "ordinal":
            code = {lv: i for i, lv in enumerate(orders[f])}
            y = np.array(
                [code.get(v, np.nan) if v is not None else np.nan for v in meta[f].cast(pl.String).to_list()],
                dtype=np.float64,
            )
        else:
            if not meta[f].dtype.is_numeric():
                raise StoreError(f"--continuous field {f!r} is {meta[f].dtype}, not numeric")
            y = meta[f].cast(pl.Float64).fill_null(np.nan).to_numpy()
        keep = np.isfinite(y)
        if keep.sum() < 3:
            continue
        _, r, _ = ranked(keep, False)
        rho, p = stats.spearman(None, y[keep], r)
        parts.append(
            _frame(
                features,
                f,
                kind,
                "spearman",
                [None],
                rho[:, None],
                p[:, None],
                np.array([keep.sum()]),
                None,
                None,
                None,
            )
        )
    if not parts:
        raise StoreError("no field had two or more levels (or three numeric values) to test")
    out = pl.concat(parts, how="vertical")
    q = np.empty(len(out))
    fam = out.select(pl.struct("field", "stat").rank("dense").alias("_f"))["_f"].to_numpy()
    pv = out["p_value"].to_numpy()
    for g in np.unique(fam):
        m = fam == g
        q[m] = stats.bh_qvalues(pv[m])
    return out.with_columns(pl.Series("q_value", q).fill_nan(None), pl.col("effect", "p_value").fill_nan(None))


def top_features(assoc: pl.DataFrame, *, field_: str = "category", n: int = 5, alpha: float = 0.05) -> pl.DataFrame:
    """Per level of `field_`: the n features with the highest AUROC among those with q <= alpha
    and AUROC > 0.5 (features more active in that level), best first (see RANK_ORDER)."""
    a = assoc.filter(
        (pl.col("field") == field_)
        & (pl.col("stat") == "auroc")
        & (pl.col("q_value") <= alpha)
        & (pl.col("effect") > 0.5)
    )
    mi = assoc.filter((pl.col("field") == field_) & (pl.col("stat") == "mi")).select(
        "feature", "level", pl.col("effect").alias("mi_bits")
    )
    return (
        a.join(mi, on=["feature", "level"], how="left")
        .sort(RANK_ORDER[0], descending=RANK_ORDER[1])
        .group_by("level", maintain_order=True)
        .head(n)
        .select(
            "level",
            "feature",
            pl.col("effect").alias("auroc"),
            "q_value",
            "mi_bits",
            "mean_pos",
            "mean_neg",
            "n_pos",
            "n_neg",
        )
    )


# ---- the entry point ------------------------------------------------------------------------
def _summary(assoc: pl.DataFrame, alpha: float) -> dict[str, Any]:
    sig = (
        assoc.group_by("field", "stat")
        .agg(
            (pl.col("q_value") <= alpha).sum().alias("n_sig"),
            pl.len().alias("n_tests"),
            pl.col("feature").filter(pl.col("q_value") <= alpha).n_unique().alias("n_features_sig"),
        )
        .sort("field", "stat")
    )
    out = {
        f"{r['field']}/{r['stat']}": {"significant": r["n_sig"], "tests": r["n_tests"], "features": r["n_features_sig"]}
        for r in sig.iter_rows(named=True)
    }
    best = (
        assoc.filter(pl.col("stat") == "auroc")
        .sort("effect", descending=True)
        .group_by("field", "level", maintain_order=True)
        .first()
        .sort("field", "level")
    )
    out["best_auroc"] = {
        f"{r['field']}={r['level']}": {"feature": r["feature"], "auroc": r["effect"], "q_value": r["q_value"]}
        for r in best.iter_rows(named=True)
    }
    sp = (
        assoc.filter(pl.col("stat") == "spearman")
        .with_columns(pl.col("effect").abs().alias("_a"))
        .sort("_a", descending=True, nulls_last=True)
        .group_by("field", maintain_order=True)
        .first()
        .sort("field")
    )
    out["best_spearman"] = {
        r["field"]: {"feature": r["feature"], "rho": r["effect"], "q_value": r["q_value"]}
        for r in sp.iter_rows(named=True)
    }
    return out


def _markdown(res_top: pl.DataFrame, sae: str, layer: int, summary: dict[str, Any], alpha: float) -> str:
    lines = [
        f"# Features that track metadata: SAE `{sae}`, layer {layer}",
        "",
        f"Significant at BH q <= {alpha} (tests per field and statistic):",
        "",
        "| field / stat | significant tests | features | tests |",
        "|---|---|---|---|",
    ]
    for k, v in summary.items():
        if "/" in k:
            lines.append(f"| {k} | {v['significant']} | {v['features']} | {v['tests']} |")
    lines += ["", "## Top features per category (one-vs-rest AUROC)", ""]
    for (level,), g in res_top.group_by("level", maintain_order=True):
        lines.append(f"### {level}")
        for r in g.iter_rows(named=True):
            lines.append(
                f"- feature **{r['feature']}**: AUROC {r['auroc']:.3f}, q {r['q_value']:.2g}, "
                f"MI {r['mi_bits'] or 0:.3f} bits, mean act {r['mean_pos']:.3g} vs {r['mean_neg']:.3g}"
            )
            for c in r.get("contexts") or []:
                lines.append(f"    - `{c.strip()[:160]}`")
        lines.append("")
    return "\n".join(lines)


def run_correlations(cfg: CorrelationConfig) -> CorrelationResult:
    """Load, test, write the table, plots and run record (see the module docstring)."""

    def say(msg: str) -> None:
        if cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    store = Store(cfg.store)
    sae = resolve_sae(store, cfg.sae, cfg.layer)
    fields = sorted(set(cfg.categorical) | set(cfg.ordinal) | set(cfg.continuous))
    with Run(
        store, "feature_correlations", {**config_dict(cfg), "sae_name": sae, "table": TABLE}, layers=[cfg.layer]
    ) as run:
        t0 = time.perf_counter()
        rm = load_row_matrix(store, sae, cfg.layer, value=cfg.value, split=cfg.split, fields=fields)
        n_fire = (rm.X > 0).sum(axis=0)
        keep = n_fire >= cfg.min_rows
        t_load = time.perf_counter() - t0
        say(
            f"{len(rm.meta)} rows x {len(rm.features)} firing features of SAE {sae} layer {cfg.layer} "
            f"({int(keep.sum())} fire in >= {cfg.min_rows} rows) loaded in {t_load:.1f} s"
        )
        if not keep.any():
            raise StoreError(f"no feature fires in >= {cfg.min_rows} rows; lower --min-rows")
        assoc = associate(
            rm.X[:, keep],
            rm.features[keep],
            rm.meta,
            categorical=cfg.categorical,
            ordinal=cfg.ordinal,
            continuous=cfg.continuous,
            mi_bins=cfg.mi_bins,
        )
        t_stats = time.perf_counter() - t0 - t_load
        say(f"{len(assoc):,} tests in {t_stats:.2f} s; writing {TABLE}, contexts and plots")
        assoc = assoc.with_columns(
            pl.lit(sae).alias("sae"), pl.lit(cfg.layer, pl.Int32).alias("layer"), pl.lit(run.run_id).alias("run_id")
        ).select(SCHEMA.names)
        store.write_table(TABLE, assoc.to_arrow().cast(SCHEMA), part=array_key(f"{sae}/layer_{cfg.layer}"))
        top = (
            attach_contexts(store, top_features(assoc, n=cfg.top_n, alpha=cfg.alpha), sae, cfg.layer, cfg.contexts)
            if "category" in cfg.categorical
            else pl.DataFrame()
        )
        summary = _summary(assoc, cfg.alpha)
        out = run.dir
        all_layers = pl.from_arrow(store.query(f"SELECT * FROM {TABLE}"))
        made = {
            "heatmap": plots.category_heatmap(
                assoc,
                out / "heatmap.png",
                per_level=cfg.heatmap_per_level,
                alpha=cfg.alpha,
                title=f"SAE {sae} layer {cfg.layer}",
            ),
            "volcano": plots.volcano(assoc, out / "volcano.png", alpha=cfg.alpha, title=f"SAE {sae} layer {cfg.layer}"),
            "layers": plots.layer_summary(all_layers, out / "layers.png", alpha=cfg.alpha),
        }
        (out / "top_features.md").write_text(_markdown(top, sae, cfg.layer, summary, cfg.alpha))
        counts = {
            "rows": len(rm.meta),
            "features_firing": int(len(rm.features)),
            "features_tested": int(keep.sum()),
            "tests": len(assoc),
        }
        metrics = {**summary, "load_seconds": t_load, "stats_seconds": t_stats}
        store.write_json(
            out / "summary.json",
            {
                "run_id": run.run_id,
                "sae": sae,
                "layer": cfg.layer,
                "config": config_dict(cfg),
                "counts": counts,
                "metrics": metrics,
                "top_features": top.to_dicts(),
                "plots": {k: str(v) for k, v in made.items()},
            },
        )
        run.finish(counts=counts, metrics=metrics)
    return CorrelationResult(run.run_id, sae, cfg.layer, assoc, top, {k: str(v) for k, v in made.items()}, metrics)


def report(res: CorrelationResult, alpha: float) -> str:
    m = res.metrics
    lines = [
        f"SAE {res.sae} layer {res.layer}: {res.assoc['feature'].n_unique()} features tested, "
        f"{len(res.assoc)} tests ({m['stats_seconds']:.2f} s for the statistics)"
    ]
    for k, v in m.items():
        if "/" in k:
            lines.append(
                f"  {k:<32} {v['features']:>5} features significant (q <= {alpha}), "
                f"{v['significant']} of {v['tests']} tests"
            )
    lines.append("best one-vs-rest AUROC per category:")
    for k, v in m["best_auroc"].items():
        if k.startswith("category="):
            lines.append(f"  {k[9:]:<28} feature {v['feature']:>6}  AUROC {v['auroc']:.3f}  q {v['q_value']:.2g}")
    for f, v in m["best_spearman"].items():
        lines.append(f"strongest Spearman with {f}: feature {v['feature']} rho {v['rho']:+.3f} q {v['q_value']:.2g}")
    lines.append(
        f"table {TABLE} (SELECT * FROM {TABLE} WHERE sae = '{res.sae}'); plots and top_features.md in "
        f"{Path(res.plots['heatmap']).parent}"
    )
    return "\n".join(lines)


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CorrelationConfig, argv, prog="python -m analytics.correlations")
    res = run_correlations(cfg)
    print(report(res, cfg.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
