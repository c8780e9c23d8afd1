"""`python -m analytics.feature_importance`: the config, the run, its tables, plot and report.

    python -m analytics.feature_importance --sae latest --layer 17 --metric completion_loss --exact 50
    python -m analytics.feature_importance --sae latest --layer 17 --metric category:math --method ap ig --steps 10
    python -m analytics.feature_importance --layer 17 --metric probe:needle_tokens --baseline mean --max-rows 4

Writes table `feature_importance` (sae, layer, feature, metric, method, baseline, effect,
n_rows, run_id: one row per method for every feature active on the rows' site tokens, plus
feature -1, the SAE error node; method `ap`, `ig` or `exact`), table
`feature_importance_checks` (per method: Spearman's rho between the estimate and the exact
effect over the top --exact features by |estimate|, with its percentile bootstrap 95% CI),
a `runs` record (kind feature_importance) and, in the run dir, `feature_importance.json`
and `estimate_vs_exact.png`. One Parquet file per run in each table.
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
from analytics.feature_importance import attribution as attr
from analytics.feature_importance.inputs import (
    check_category,
    denominator,
    find_probe,
    make_batches,
    parse_metric,
    select_rows,
    tokenization_of,
)
from extractors.model import check_model_hash, load_model, pad_token_id
from extractors.sae.load import load_sae, pick_layer
from store.catalog.runs import Run
from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    SeedOptions,
    StoreOptions,
    config_dict,
    parse_config,
    user_errors,
)
from store.core import Store, StoreError
from trainers import plots

TABLE = "feature_importance"
CHECKS = "feature_importance_checks"
METHODS = {"ap": "attribution patching", "ig": "integrated gradients"}
SCHEMA = pa.schema(
    [
        ("sae", pa.string()),
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("metric", pa.string()),
        ("method", pa.string()),
        ("baseline", pa.string()),
        ("effect", pa.float64()),
        ("n_rows", pa.int32()),
        ("run_id", pa.string()),
    ]
)


@dataclass(kw_only=True)
class FeatureImportanceConfig(StoreOptions, LayerOptions, ModelOptions, SeedOptions, ProgressOptions):
    """Rank SAE features by their effect on a metric: attribution patching (activation x gradient),
    integrated gradients, and exact ablation of the top K as the check. One layer, --layer L."""

    layers: list[int]  # required: one layer (--layer L)
    sae: str = field(
        default="latest",
        metadata={"help": "the SAE: latest (newest of --layer in the saes table), a store name, or a sae-lens folder"},
    )
    metric: str = field(
        default="completion_loss",
        metadata={
            "help": "completion_loss (mean loss of the supervised tokens), category:<name> (mean log-prob of the "
            "supervised tokens of that category's rows), probe:<name> (mean logit of a saved probe, a name or file)"
        },
    )
    methods: list[str] = field(
        default_factory=lambda: ["ap"],
        metadata={"help": "ap (attribution patching) and/or ig (integrated gradients)", "aliases": ["--method"]},
    )
    steps: int = field(default=10, metadata={"help": "integrated-gradients steps (alpha = k/steps, k = 1..steps)"})
    exact: int = field(
        default=0, metadata={"help": "ablate the top K features by |estimate| one at a time (0: no check)"}
    )
    baseline: Literal["zero", "mean"] = field(
        default="zero",
        metadata={"help": "what a node is set to: zero, or its mean over the rows' site tokens (mean ablation)"},
    )
    view: str = field(
        default="content_tokens",
        metadata={"help": "view (or SQL) of the site tokens: where the SAE is spliced and effects summed"},
    )
    split: str = field(default="eval", metadata={"help": "rows: a split name, or all"})
    max_rows: int = field(default=8, metadata={"help": "the first N rows of the view in the split, by row_id"})
    batch_tokens: int = field(default=2048, metadata={"help": "padded tokens per forward"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of the Spearman CI"})
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"

    def __post_init__(self) -> None:
        self.check_device()
        self.one_layer("feature importance")
        parse_metric(self.metric)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--method {bad[0] if bad else ''!r} is not one of {', '.join(METHODS)}")
        self.methods = list(dict.fromkeys(self.methods))
        for name in ("steps", "max_rows", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.exact < 0 or self.n_boot < 0:
            raise ValueError(f"--exact and --n-boot must be >= 0, got {self.exact}, {self.n_boot}")

    @property
    def layer(self) -> int:
        return self.one_layer("feature importance")


class ImportanceResult(NamedTuple):
    run_id: str
    sae: str
    layer: int
    table: pl.DataFrame  # the rows written to feature_importance
    checks: pl.DataFrame  # the rows written to feature_importance_checks
    metrics: dict[str, Any]
    plot: str | None


def spearman_ci(est: np.ndarray, exact: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Spearman's rho of the pairs and its percentile bootstrap 95% CI (pairs resampled)."""
    rho = float(stats.spearman(est[:, None], exact)[0][0])
    if n_boot == 0 or len(est) < 3:
        return rho, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        for b in range(n_boot):
            i = rng.integers(0, len(est), len(est))
            boots[b] = stats.spearman(est[i][:, None], exact[i])[0][0]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return rho, float(lo), float(hi)


def live_features(store: Store, sae: str, layer: int) -> int | None:
    """Features that fire on the SAE's token set per sae_feature_stats, when the store has it."""
    if not store.has_table("sae_feature_stats"):
        return None
    n = store.query(
        "SELECT count(*) FILTER (WHERE n_tokens_active > 0), count(*) FROM sae_feature_stats "
        "WHERE sae = ? AND layer = ?",
        [sae, layer],
    ).to_pylist()[0]
    vals = list(n.values())
    return int(vals[0]) if vals[1] else None


def scatter(est: dict[str, np.ndarray], exact: np.ndarray, path: Path, title: str) -> Path:
    from matplotlib.figure import Figure  # lazy: only when a plot is drawn

    fig = Figure(figsize=(4.2 * len(est), 4))
    for j, (m, e) in enumerate(est.items()):
        ax = fig.add_subplot(1, len(est), j + 1)
        ax.scatter(exact, e, s=12, alpha=0.7)
        lim = [min(exact.min(), e.min()), max(exact.max(), e.max())]
        ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("exact ablation effect")
        ax.set_ylabel(f"{METHODS[m]} estimate")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    fig.suptitle(title, fontsize=9)
    return plots.save_figure(fig, path)


def run_feature_importance(cfg: FeatureImportanceConfig) -> ImportanceResult:
    """Estimates, exact check, tables and run record (see the package docstring)."""
    store = Store(cfg.store)
    L = cfg.layer
    spec = parse_metric(cfg.metric)
    tokenization, attrs = tokenization_of(store, L)
    probe = None
    if spec.kind == "category":
        check_category(store, spec.name)
    elif spec.kind == "probe":
        probe = find_probe(store, spec.name, L)
    target = "site" if probe is not None else "supervised"
    rows = select_rows(
        store,
        tokenization,
        view=cfg.view,
        split=cfg.split,
        max_rows=cfg.max_rows,
        category=spec.name if spec.kind == "category" else None,
        supervised=target == "supervised",
    )
    loaded = load_sae(cfg.sae, "cpu", layer=L, store=store)
    pick_layer([L], loaded.layer, cfg.sae)
    live = live_features(store, loaded.name, L)
    if cfg.exact > (live if live is not None else loaded.d_sae):
        where = "fire on its token set (sae_feature_stats)" if live is not None else "exist"
        raise StoreError(
            f"--exact {cfg.exact} is more than the {live if live is not None else loaded.d_sae} features of SAE "
            f"{loaded.name} that {where}; pass --exact <= that"
        )
    t0 = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    if attrs:
        check_model_hash(lm, attrs, f"hidden/layer_{L}")
    if probe is not None:
        made_by = {"model": probe.meta.get("model_id"), "model_hash": probe.meta.get("model_hash")}
        check_model_hash(lm, made_by, f"probe {probe.path}")
    sae = loaded.sae.to(lm.device)
    pad = pad_token_id(lm.tokenizer)
    batches = make_batches(rows, target=target, batch_tokens=cfg.batch_tokens, pad_id=pad, device=lm.device)
    denom = denominator(batches, target)
    if denom == 0:
        raise StoreError(f"the {len(rows.row_ids)} rows have no {target} tokens to measure {cfg.metric} on")
    kind = {"completion_loss": "loss", "category": "logprob", "probe": "probe"}[spec.kind]
    metric = attr.Metric(kind, denom)
    if probe is not None:
        metric = attr.Metric(kind, denom, probe.layer, probe.coef.to(lm.device), probe.bias)
    secs: dict[str, float] = {"load_model": time.perf_counter() - t0}
    t = time.perf_counter()
    clean = attr.clean_pass(lm.model, sae, L, batches, metric, cfg.progress)
    secs["clean"] = time.perf_counter() - t
    n_live = int((clean.fires > 0).sum())
    if cfg.exact > n_live:
        raise StoreError(
            f"--exact {cfg.exact}: only {n_live} features of SAE {loaded.name} fire on the {clean.n_site} site tokens "
            f"of these {len(rows.row_ids)} rows; lower --exact or raise --max-rows"
        )
    base = attr.baselines(sae, clean, cfg.baseline)
    n_rows = len(rows.row_ids)
    with Run(
        store,
        "feature_importance",
        {**config_dict(cfg), "sae_name": loaded.name, "table": TABLE, "rows": rows.row_ids},
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=[L],
    ) as run:
        est: dict[str, attr.Effects] = {}
        for m in cfg.methods:
            t = time.perf_counter()
            if m == "ap":
                est[m] = attr.attribution_patching(lm.model, sae, L, batches, metric, base, cfg.progress)
            else:
                est[m] = attr.integrated_gradients(lm.model, sae, L, batches, metric, base, cfg.steps, cfg.progress)
            secs[m] = time.perf_counter() - t
        top = {m: np.argsort(-np.abs(e.features), kind="stable")[: cfg.exact] for m, e in est.items()}
        exact: dict[int, float] = {}
        if cfg.exact:
            nodes = sorted({int(i) for ix in top.values() for i in ix}) + [attr.ERR]
            t = time.perf_counter()
            exact = attr.exact_ablation(lm.model, sae, L, batches, metric, base, clean, nodes, cfg.progress)
            secs["exact"] = time.perf_counter() - t
            secs["exact_forwards"] = len(nodes) * len(batches)
        feats = np.flatnonzero(clean.fires > 0)
        parts = []
        for m, e in est.items():
            parts.append((m, np.r_[feats, attr.ERR], np.r_[e.features[feats], e.err]))
        if exact:
            ids = np.array(list(exact), dtype=np.int64)
            parts.append(("exact", ids, np.array([exact[i] for i in ids])))
        table = pl.DataFrame(
            {
                "sae": loaded.name,
                "layer": L,
                "feature": np.concatenate([p[1] for p in parts]).astype(np.int32),
                "metric": cfg.metric,
                "method": np.concatenate([[p[0]] * len(p[1]) for p in parts]),
                "baseline": cfg.baseline,
                "effect": np.concatenate([p[2] for p in parts]).astype(np.float64),
                "n_rows": n_rows,
                "run_id": run.run_id,
            }
        ).select(SCHEMA.names)
        store.write_table(TABLE, table.to_arrow().cast(SCHEMA), part=run.run_id)
        checks, plot = [], None
        if exact:
            for m, ix in top.items():
                ex = np.array([exact[int(i)] for i in ix])
                rho, lo, hi = spearman_ci(est[m].features[ix], ex, cfg.n_boot, cfg.seed)
                checks.append(
                    {
                        "sae": loaded.name,
                        "layer": L,
                        "metric": cfg.metric,
                        "method": m,
                        "baseline": cfg.baseline,
                        "steps": cfg.steps if m == "ig" else 1,
                        "k": len(ix),
                        "spearman": rho,
                        "ci_low": lo,
                        "ci_high": hi,
                        "n_boot": cfg.n_boot,
                        "n_rows": n_rows,
                        "n_site_tokens": clean.n_site,
                        "run_id": run.run_id,
                    }
                )
            store.write_rows(CHECKS, checks, part=run.run_id)
            union = sorted({int(i) for ix in top.values() for i in ix})
            plot = str(
                scatter(
                    {m: e.features[union] for m, e in est.items()},
                    np.array([exact[i] for i in union]),
                    run.dir / "estimate_vs_exact.png",
                    f"SAE {loaded.name} layer {L}, {cfg.metric}, {cfg.baseline} baseline: "
                    f"top {cfg.exact}, {n_rows} rows",
                )
            )
        metrics = {
            "clean_metric": clean.value,
            "seconds": secs,
            "features_live": n_live,
            "error_node": {m: e.err for m, e in est.items()} | ({"exact": exact[attr.ERR]} if exact else {}),
            "checks": {c["method"]: {k: c[k] for k in ("k", "spearman", "ci_low", "ci_high")} for c in checks},
        }
        counts = {"rows": n_rows, "site_tokens": clean.n_site, "metric_tokens": int(denom), "batches": len(batches)}
        store.write_json(
            run.dir / "feature_importance.json",
            {"run_id": run.run_id, "config": config_dict(cfg), "counts": counts, "metrics": metrics, "plot": plot},
        )
        run.finish(counts=counts, metrics=metrics)
    return ImportanceResult(run.run_id, loaded.name, L, table, pl.DataFrame(checks), metrics | {"counts": counts}, plot)


def report(res: ImportanceResult, cfg: FeatureImportanceConfig, top: int = 10) -> str:
    m, c = res.metrics, res.metrics["counts"]
    lines = [
        f"SAE {res.sae} layer {res.layer}, metric {cfg.metric} = {m['clean_metric']:.4f} over {c['rows']} "
        f"{cfg.split} rows ({c['site_tokens']} site tokens, {c['metric_tokens']} metric tokens); "
        f"{m['features_live']} features fire; baseline {cfg.baseline}",
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in m["seconds"].items() if k != "exact_forwards"),
    ]
    t = res.table
    exact = t.filter(pl.col("method") == "exact").select("feature", pl.col("effect").alias("exact"))
    for meth in cfg.methods:
        g = (
            t.filter(pl.col("method") == meth)
            .join(exact, on="feature", how="left")
            .sort(pl.col("effect").abs(), descending=True)
            .head(top)
        )
        lines.append(f"top {top} by |{METHODS[meth]}| (feature -1 = the SAE error node):")
        for r in g.iter_rows(named=True):
            ex = f"  exact {r['exact']:+.5f}" if r["exact"] is not None else ""
            lines.append(f"  feature {r['feature']:>6}  estimate {r['effect']:+.5f}{ex}")
    for r in res.checks.iter_rows(named=True):
        lines.append(
            f"check {METHODS[r['method']]}: Spearman {r['spearman']:.3f} "
            f"(95% CI {r['ci_low']:.3f}..{r['ci_high']:.3f}) "
            f"over the top {r['k']} features vs exact ablation"
        )
    lines.append(f"tables {TABLE}, {CHECKS} (run {res.run_id})" + (f"; plot {res.plot}" if res.plot else ""))
    return "\n".join(lines)


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FeatureImportanceConfig, argv, prog="python -m analytics.feature_importance")
    res = run_feature_importance(cfg)
    print(report(res, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
