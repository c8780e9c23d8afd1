"""SAE -> attribution-rank predictor: `python -m trainers.sae_predictor --sae NAME --attribution RUN`.

    python -m trainers.sae_predictor --sae latest --attribution latest           # rank, grouped split
    python -m trainers.sae_predictor --sae latest --attribution latest --split-mode stratified --seed 1
    python -m trainers.sae_predictor --sae latest --attribution latest --target score --store /tmp/st
    python -m trainers.sae_predictor --sae latest --attribution latest --apply-to /data/new_store
    python -m trainers.sae_predictor --predictor latest --apply-to /data/new_store   # reuse a fitted one

Ridge regression (scikit-learn) from a row's SAE features to its attribution `rank` (default;
1 = highest score) or `score`. Features (trainers.selection.predictor_data): the `sae_sample_stats`
columns, z-scored with the training rows' mean and sd (a null becomes the mean), and every
feature's `mean_act` from `sae_row_features` as a scipy CSR matrix, scaled by its training
root-mean-square without centering, so it stays sparse. Split: `--split-mode group` holds out
whole `group_id`s (GroupShuffleSplit: a group is never on both sides; a row without one is its
own group), `stratified` holds out the same share of every category (StratifiedShuffleSplit);
`--test-size` of the labelled rows, seeded by `--seed`. Alpha is chosen on the training rows
alone by grouped inner cross-validation (GroupKFold, `--inner-folds`), maximising the mean
held-out Spearman over `--alphas` (ties: the larger alpha).

Held-out metrics: Spearman and Kendall between prediction and target, a 95% bootstrap CI of
Spearman (`--bootstrap` resamples of the test rows), and top-k overlap (k = `--top-frac` of the
test rows: the share of the predictor's best k that are among the attribution's best k)
against what random would give (k / n_test). Two baselines are fitted the same way (same split,
inner CV and metrics): `reward_model` (rows.reward_model_score alone) and `metadata` (one-hots of
category, difficulty, quality); the paired bootstrap difference of Spearman (predictor minus
baseline, same resamples) comes with its CI. Whether the predictor finds something the reward
model does not: Spearman of the prediction with reward_model_score, difficulty and quality
(ordinal), and eta^2 of category, over every row with SAE features (and the same for the
attribution target itself, over its rows).

Outputs in runs/<id>/: predictor.safetensors (intercept, coefficients, feature ids, the
standardisation) + predictor.json (alpha, config, SAE identity, view SQL, store version, top
features), predictor_metrics.json and predictor_scatter.png (predicted vs actual, held-out
rows, predictor beside the reward-model baseline). Table `predictor_scores` (run, row_id,
predicted, split = train | test | unlabelled, target, sae, layer, attribution_run) holds a
prediction for every row with SAE features, including rows without attribution; the model is the
one fitted on the training rows (the metrics describe it). `--apply-to OTHER_STORE` writes the
same table in another store of the same model and SAE (checked: model hash, SAE name, shape and
weights), its rows all `unlabelled`; `python -m trainers.subsets --from predictor:<run>` ranks by it.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, StratifiedShuffleSplit
from tqdm.auto import tqdm

from store.catalog.runs import Run
from store.cli import LayerOptions, ProgressOptions, SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import STORE_VERSION, Store, StoreError, write_json
from trainers.plots import save_figure
from trainers.selection.predictor_data import (
    STATS,
    SAERows,
    attribution_labels,
    check_identity,
    features_sql,
    load_rows,
    resolve_sae,
    sae_identity,
    stats_sql,
)
from trainers.selection.predictor_stats import correlations, evaluate, paired_difference
from trainers.selection.subsets import PREDICTOR_TABLE as TABLE
from trainers.selection.subsets import resolve_source

SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("row_id", pa.string()),
        ("predicted", pa.float64()),
        ("split", pa.string()),
        ("target", pa.string()),
        ("sae", pa.string()),
        ("layer", pa.int32()),
        ("attribution_run", pa.string()),
    ]
)
MIN_LABELLED = 20


@dataclass(kw_only=True)
class PredictorConfig(StoreOptions, LayerOptions, SeedOptions, ProgressOptions):
    """Fit the SAE -> attribution predictor (see the module docstring). --layer L picks the SAE
    tables' layer (needed when the SAE name has several); --seed seeds the split and the bootstrap."""

    sae: str = field(default="latest", metadata={"help": "SAE whose tables to read: a name from saes, or latest"})
    attribution: str = field(
        default="latest", metadata={"help": "attribution run whose ranks are the target, or latest"}
    )
    target: Literal["rank", "score"] = field(
        default="rank", metadata={"help": "regress on the attribution rank (1 = best) or its score"}
    )
    split_mode: Literal["group", "stratified"] = field(
        default="group", metadata={"help": "hold out whole group_ids, or the same share of every category"}
    )
    test_size: float = field(default=0.25, metadata={"help": "held-out share of the labelled rows"})
    alphas: list[float] = field(
        default_factory=lambda: [float(a) for a in np.logspace(-2, 5, 15)],
        metadata={"help": "ridge alphas tried by the inner CV (default 1e-2 .. 1e5, 15 values)"},
    )
    inner_folds: int = field(default=5, metadata={"help": "GroupKFold folds of the inner CV"})
    top_frac: float = field(default=0.1, metadata={"help": "top-k overlap: k = this share of the held-out rows"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})
    apply_to: str | None = field(default=None, metadata={"help": "also score this other store (same model and SAE)"})
    predictor: str | None = field(
        default=None,
        metadata={"help": "apply this fitted predictor run (or latest) to --apply-to instead of fitting a new one"},
    )
    layers: list[int] = field(default_factory=list, metadata={"default_help": "the SAE's only layer"})

    def __post_init__(self) -> None:
        if len(self.layers) > 1:
            self.one_layer("the predictor")
        if not 0 < self.test_size < 1:
            raise ValueError(f"--test-size must be between 0 and 1, got {self.test_size}")
        if not 0 < self.top_frac <= 1:
            raise ValueError(f"--top-frac must be in (0, 1], got {self.top_frac}")
        if self.inner_folds < 2:
            raise ValueError(f"--inner-folds must be >= 2, got {self.inner_folds}")
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(f"--alphas must be positive numbers, got {self.alphas}")
        if self.predictor and not self.apply_to:
            raise ValueError("--predictor RUN applies a fitted predictor: it needs --apply-to OTHER_STORE")

    @property
    def layer(self) -> int | None:
        return self.layers[0] if self.layers else None


# ---- the model: standardisation + ridge coefficients -----------------------------------------
class Design(NamedTuple):
    stats_mean: np.ndarray
    stats_std: np.ndarray
    feature_ids: np.ndarray
    feature_scale: np.ndarray


def fit_design(rows: SAERows, train: np.ndarray) -> Design:
    S = rows.stats[train]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-null column: mean 0, sd 1 below
        mean, std = np.nanmean(S, axis=0), np.nanstd(S, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    F = rows.features[train]
    rms = np.sqrt(np.asarray(F.multiply(F).mean(axis=0)).ravel())
    return Design(mean, std, rows.feature_ids, np.where(rms > 0, rms, 1.0))


def design_matrix(rows: SAERows, d: Design) -> sp.csr_matrix:
    """[z-scored stats | scaled mean_act], sparse; rows.features must have d.feature_ids' columns."""
    Z = (rows.stats - d.stats_mean) / d.stats_std
    Z = np.where(np.isnan(Z), 0.0, Z)
    return sp.hstack([sp.csr_matrix(Z), rows.features @ sp.diags(1.0 / d.feature_scale)], format="csr")


def predict(rows: SAERows, d: Design, coef: np.ndarray, intercept: float) -> np.ndarray:
    """The predictor's output from its saved coefficients (what --apply-to runs)."""
    return np.asarray(design_matrix(rows, d) @ coef).ravel() + intercept


def save_predictor(folder: Path, d: Design, coef: np.ndarray, intercept: float, info: dict[str, Any]) -> None:
    n = len(STATS)
    save_file(
        {
            "intercept": np.array([intercept]),
            "stats_coef": coef[:n].copy(),
            "stats_mean": d.stats_mean,
            "stats_std": d.stats_std,
            "feature_ids": d.feature_ids.astype(np.int64),
            "feature_coef": coef[n:].copy(),
            "feature_scale": d.feature_scale,
        },
        str(folder / "predictor.safetensors"),
    )
    write_json(folder / "predictor.json", info)


def load_predictor(folder: Path) -> tuple[Design, np.ndarray, float, dict[str, Any]]:
    t = load_file(str(folder / "predictor.safetensors"))
    info = json.loads((folder / "predictor.json").read_text())
    d = Design(t["stats_mean"], t["stats_std"], t["feature_ids"], t["feature_scale"])
    return d, np.concatenate([t["stats_coef"], t["feature_coef"]]), float(t["intercept"][0]), info


# ---- split and fit -----------------------------------------------------------------------------
def groups_of(rows: SAERows) -> np.ndarray:
    g = rows.meta["group_id"].to_list()
    return np.array([x if x is not None else f"row:{r}" for x, r in zip(g, rows.row_ids, strict=False)], dtype=object)


def split_rows(rows: SAERows, labelled: np.ndarray, mode: str, test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, test) indices into rows, both subsets of `labelled` (module docstring)."""
    if mode == "group":
        groups = groups_of(rows)[labelled]
        if len(set(groups)) < 4:
            raise StoreError(
                f"--split-mode group: the {len(labelled)} labelled rows have only {len(set(groups))} "
                f"group_ids; use --split-mode stratified or more rows"
            )
        tr, te = next(
            GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(labelled, groups=groups)
        )
    else:
        cats = np.array([c if c is not None else "(none)" for c in rows.meta["category"].to_list()], dtype=object)[
            labelled
        ]
        try:
            tr, te = next(
                StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(labelled, cats)
            )
        except ValueError as e:
            raise StoreError(
                f"--split-mode stratified cannot split {len(labelled)} rows by category ({e}); "
                f"use --split-mode group or a different --test-size"
            ) from e
    return np.sort(labelled[tr]), np.sort(labelled[te])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def ridge(alpha: float) -> Any:
    """scikit-learn's Ridge; on sparse input it solves by conjugate gradients, whose default tolerance
    (1e-4) left coefficients ~2% from the exact (dense Cholesky) solution: 1e-8 matches it to ~1e-6."""
    return Ridge(alpha=alpha, tol=1e-8)


def fit_ridge(
    X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, alphas: list[float], folds: int, desc: str, progress: bool
) -> tuple[Any, float, dict[str, float]]:
    """(Ridge fitted on all of X, y with the alpha of best mean inner-CV Spearman, alpha, {alpha: score})."""
    nf = min(folds, len(set(groups)))
    if nf < 2:
        raise StoreError(f"the inner CV needs >= 2 groups among the training rows, has {nf}; use more rows")
    splits = list(GroupKFold(n_splits=nf).split(X, y, groups))
    cv: dict[str, float] = {}
    for a in tqdm(sorted(alphas), desc=f"inner CV {desc}", disable=not progress, leave=False):
        cv[repr(a)] = float(np.mean([_spearman(ridge(a).fit(X[tr], y[tr]).predict(X[va]), y[va]) for tr, va in splits]))
    best = max(sorted(alphas), key=lambda a: (round(cv[repr(a)], 12), a))
    return ridge(best).fit(X, y), best, cv


def _onehots(rows: SAERows, train: np.ndarray) -> sp.csr_matrix:
    cols = []
    for c in ("category", "difficulty", "quality"):
        v = np.array([x if x is not None else "(none)" for x in rows.meta[c].to_list()], dtype=object)
        for level in sorted(set(v[train])):
            cols.append((v == level).astype(np.float64))
    return sp.csr_matrix(np.column_stack(cols))


def _reward(rows: SAERows, train: np.ndarray) -> sp.csr_matrix:
    v = rows.meta["reward_model_score"].cast(float).fill_null(np.nan).to_numpy().astype(np.float64)
    m = np.nanmean(v[train]) if np.isfinite(v[train]).any() else 0.0
    v = np.where(np.isnan(v), m, v)
    s = v[train].std() or 1.0
    return sp.csr_matrix(((v - m) / s)[:, None])


def _top_features(d: Design, coef: np.ndarray, target: str, n: int = 20) -> dict[str, list[dict[str, Any]]]:
    """The features pushing a row towards the top / bottom of the attribution ranking (per unit mean_act)."""
    w = coef[len(STATS) :] / d.feature_scale
    toward_top = w if target == "score" else -w
    order = np.argsort(-toward_top)

    def pick(idx):
        return [{"feature": int(d.feature_ids[i]), "coef": float(w[i])} for i in idx if toward_top[i] != 0]

    return {"toward_top": pick(order[:n]), "toward_bottom": pick(order[::-1][:n])}


def _plot(
    path: Path, y: np.ndarray, preds: dict[str, np.ndarray], test: np.ndarray, target: str, metrics: dict[str, Any]
) -> Path:
    from matplotlib.figure import Figure  # lazy: matplotlib only when a run ends

    fig = Figure(figsize=(10.5, 4.4))
    fig.subplots_adjust(wspace=0.35)
    for i, name in enumerate(("sae", "reward_model")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(y[test], preds[name][test], s=10, alpha=0.6)
        m = metrics[name]
        ax.set_title(
            f"{'SAE predictor' if name == 'sae' else 'reward-model baseline'}: Spearman "
            f"{_n(m['spearman'])} [{_n(m['spearman_ci'][0])}, {_n(m['spearman_ci'][1])}]",
            fontsize=9,
        )
        ax.set_xlabel(f"actual attribution {target} (held-out rows)")
        ax.set_ylabel(f"predicted {target}")
        ax.ticklabel_format(useOffset=False)
    return save_figure(fig, path)


# ---- commands ----------------------------------------------------------------------------------
def labelled_target(
    store: Store, cfg: PredictorConfig, rows: SAERows, sae: str, layer: int, attr_run: str
) -> tuple[np.ndarray, np.ndarray]:
    """(y per row, NaN where the row has no attribution score; the indices of labelled rows)."""
    labels = attribution_labels(store, attr_run)
    col = 0 if cfg.target == "rank" else 1
    y = np.array([labels[r][col] if r in labels else np.nan for r in rows.row_ids], dtype=np.float64)
    labelled = np.flatnonzero(~np.isnan(y))
    if len(labelled) < MIN_LABELLED:
        raise StoreError(
            f"only {len(labelled)} rows have both SAE features ({sae}, layer {layer}: "
            f"{len(rows.row_ids)} rows) and attribution scores (run {attr_run}: {len(labels)} rows); the "
            f"predictor needs >= {MIN_LABELLED}: compute SAE codes for the attribution pool "
            f"(python -m extractors.run --layer {layer} --kinds sae --sae {sae}) or score more rows"
        )
    return y, labelled


class Fits(NamedTuple):
    design: Design  # the SAE predictor's standardisation
    preds: dict[str, np.ndarray]  # every row's prediction by each model (sae, reward_model, metadata)
    alphas: dict[str, float]
    cvs: dict[str, dict[str, float]]
    models: dict[str, Any]


def fit_models(cfg: PredictorConfig, rows: SAERows, y: np.ndarray, train: np.ndarray) -> Fits:
    """The SAE predictor and its two baselines, each a ridge with inner-CV alpha on the training rows."""
    groups = groups_of(rows)
    d = fit_design(rows, train)
    designs = {"sae": design_matrix(rows, d), "reward_model": _reward(rows, train), "metadata": _onehots(rows, train)}
    preds, alphas, cvs, models = {}, {}, {}, {}
    for name, X in designs.items():
        models[name], alphas[name], cvs[name] = fit_ridge(
            X[train], y[train], groups[train], cfg.alphas, cfg.inner_folds, name, cfg.progress
        )
        preds[name] = models[name].predict(X)
    return Fits(d, preds, alphas, cvs, models)


def write_predictions(
    store: Store, run_id: str, cfg: PredictorConfig, rows: SAERows, pred: np.ndarray, split: np.ndarray, resolved: dict
) -> None:
    """Every row's SAE prediction and its split into the predictor table."""
    n = len(rows.row_ids)
    store.write_table(
        TABLE,
        pa.table(
            {
                "run": [run_id] * n,
                "row_id": rows.row_ids,
                "predicted": pred,
                "split": split.tolist(),
                "target": [cfg.target] * n,
                "sae": [resolved["sae"]] * n,
                "layer": pa.array([resolved["layer"]] * n, pa.int32()),
                "attribution_run": [resolved["attribution_run"]] * n,
            },
            schema=SCHEMA,
        ),
        part=run_id,
    )


def fit_predictor(cfg: PredictorConfig) -> dict[str, Any]:
    """Fit, evaluate and write everything (module docstring); returns the metrics document."""
    store = Store(cfg.store)
    sae, layer = resolve_sae(store, cfg.sae, cfg.layer)
    _, attr_run = resolve_source(store, f"attribution:{cfg.attribution}")
    rows = load_rows(store, sae, layer)
    y, labelled = labelled_target(store, cfg, rows, sae, layer, attr_run)
    train, test = split_rows(rows, labelled, cfg.split_mode, cfg.test_size, cfg.seed)
    fits = fit_models(cfg, rows, y, train)
    d, preds = fits.design, fits.preds
    coef, intercept = np.asarray(fits.models["sae"].coef_, dtype=np.float64), float(fits.models["sae"].intercept_)
    rng_seed = cfg.seed
    metrics = {
        name: {
            **evaluate(preds[name][test], y[test], cfg.target, cfg.top_frac, cfg.bootstrap, rng_seed),
            "alpha": fits.alphas[name],
            "inner_cv_spearman": fits.cvs[name],
        }
        for name in preds
    }
    diffs = {
        f"sae_minus_{b}": paired_difference(preds["sae"][test], preds[b][test], y[test], cfg.bootstrap, rng_seed)
        for b in ("reward_model", "metadata")
    }
    corr = {
        "prediction": correlations(preds["sae"], rows.meta),
        "attribution_target": correlations(y[labelled], rows.meta.select(pl.all().gather(labelled))),
    }
    identity = sae_identity(store, sae, layer)
    split = np.full(len(rows.row_ids), "unlabelled", dtype=object)
    split[train], split[test] = "train", "test"
    resolved = {"sae": sae, "layer": layer, "attribution_run": attr_run}
    with Run(
        store,
        "sae_predictor",
        {**config_dict(cfg), **resolved},
        model_hash=identity["model_hash"] or "",
        layers=[layer],
    ) as run:
        views = {
            "features": features_sql(sae, layer),
            "sample_stats": stats_sql(sae, layer),
            "target": f"SELECT row_id, {cfg.target} FROM attribution_scores WHERE run_id = '{attr_run}'",
            "metadata": "SELECT row_id, group_id, category, difficulty, quality, reward_model_score FROM rows",
            "predictions": f"SELECT * FROM {TABLE} WHERE run = '{run.run_id}'",
        }
        info = {
            "run_id": run.run_id,
            "alpha": fits.alphas["sae"],
            "intercept": intercept,
            "target": cfg.target,
            "stats": list(STATS),
            "stats_coef": dict(zip(STATS, coef[: len(STATS)].tolist(), strict=False)),
            "n_features": int(len(d.feature_ids)),
            "feature_ids": d.feature_ids.tolist(),
            "feature_coef": coef[len(STATS) :].tolist(),
            "top_features": _top_features(d, coef, cfg.target),
            "config": {**config_dict(cfg), **resolved},
            "sae_identity": identity,
            "view_sql": views,
            "store_version": STORE_VERSION,
            "store": str(store.root),
            "rows": {
                "with_sae_features": len(rows.row_ids),
                "labelled": int(len(labelled)),
                "train": int(len(train)),
                "test": int(len(test)),
            },
        }
        save_predictor(run.dir, d, coef, intercept, info)
        write_predictions(store, run.run_id, cfg, rows, preds["sae"], split, resolved)
        doc = {
            "run_id": run.run_id,
            **resolved,
            "target": cfg.target,
            "split_mode": cfg.split_mode,
            "rows": info["rows"],
            "metrics": metrics,
            "differences": diffs,
            "correlations": corr,
            "top_features": info["top_features"],
            "view_sql": views,
            "store_version": STORE_VERSION,
        }
        store.write_json(run.dir / "predictor_metrics.json", doc)
        _plot(run.dir / "predictor_scatter.png", y, preds, test, cfg.target, metrics)
        run.finish(
            counts=info["rows"],
            metrics={
                n: {k: metrics[n][k] for k in ("spearman", "kendall", "top_k_overlap", "top_k_random")} for n in metrics
            },
        )
    print(report(doc))
    if cfg.apply_to:
        apply_predictor(store, run.run_id, Store(cfg.apply_to), progress=cfg.progress)
    return doc


def apply_predictor(store: Store, run_id: str, other: Store, progress: bool = True) -> int:
    """Score every row with SAE features in `other` with predictor `run_id` of `store`; returns the count."""
    d, coef, intercept, info = load_predictor(store.root / "runs" / run_id)
    want = info["sae_identity"]
    sae, layer = want["sae"], want["layer"]
    try:
        resolve_sae(other, sae, layer)
    except StoreError as e:
        raise StoreError(
            f"--apply-to {other.root}: predictor {run_id} reads SAE {sae} layer {layer}, which that store "
            f"has no tables of ({e}); compute them there with the same SAE: python -m extractors.run "
            f"--store {other.root} --layer {layer} --kinds sae --sae <folder of SAE {sae}>"
        ) from None
    check_identity(want, sae_identity(other, sae, layer), other, run_id)
    rows = load_rows(other, sae, layer, feature_ids=d.feature_ids)
    pred = predict(rows, d, coef, intercept)
    n = len(rows.row_ids)
    with Run(
        other,
        "sae_predictor_apply",
        {"predictor": run_id, "from_store": str(store.root)},
        model_hash=want.get("model_hash") or "",
        layers=[layer],
    ) as run:
        other.write_table(
            TABLE,
            pa.table(
                {
                    "run": [run_id] * n,
                    "row_id": rows.row_ids,
                    "predicted": pred,
                    "split": ["unlabelled"] * n,
                    "target": [info["target"]] * n,
                    "sae": [sae] * n,
                    "layer": pa.array([layer] * n, pa.int32()),
                    "attribution_run": [info["config"]["attribution_run"]] * n,
                },
                schema=SCHEMA,
            ),
            part=run_id,
        )
        run.finish(counts={"rows": n})
    print(
        f"predictor {run_id}: scored {n} rows of {other.root} (table {TABLE}, split unlabelled); rank them with "
        f"python -m trainers.subsets --store {other.root} --from predictor:{run_id} --k K"
    )
    return n


def _n(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _fmt(m: dict[str, Any]) -> str:
    lo, hi = m["spearman_ci"]
    return (
        f"Spearman {_n(m['spearman'])} [{_n(lo)}, {_n(hi)}]  Kendall {_n(m['kendall'])}  top-{m['k']} overlap "
        f"{m['top_k_overlap']:.2f} (random {m['top_k_random']:.2f})  alpha {m['alpha']:g}"
    )


def report(doc: dict[str, Any]) -> str:
    r = doc["rows"]
    lines = [
        f"predictor {doc['run_id']}: SAE {doc['sae']} layer {doc['layer']} -> attribution {doc['target']} "
        f"(run {doc['attribution_run']}); rows {r['with_sae_features']} with SAE features, {r['labelled']} "
        f"labelled, train {r['train']} / test {r['test']} ({doc['split_mode']} split)"
    ]
    lines += [f"  {name:<13} {_fmt(m)}" for name, m in doc["metrics"].items()]
    lines += [
        f"  {k}: Spearman difference {_n(v['difference'])} [{_n(v['ci'][0])}, {_n(v['ci'][1])}], "
        f"bootstrap p {_n(v['p_bootstrap'], '.3f')}"
        for k, v in doc["differences"].items()
    ]
    for what, c in doc["correlations"].items():
        lines.append(
            f"  {what}: Spearman with reward_model_score {_n(c['reward_model_score'])}, difficulty "
            f"{_n(c['difficulty'])}, quality {_n(c['quality'])}; category eta^2 {_n(c['category_eta2'], '.3f')}"
        )
    return "\n".join(lines)


def main_run(cfg: PredictorConfig) -> dict[str, Any] | int:
    if cfg.predictor:
        store = Store(cfg.store)
        _, run = resolve_source(store, f"predictor:{cfg.predictor}")
        return apply_predictor(store, run, Store(cfg.apply_to), progress=cfg.progress)
    return fit_predictor(cfg)


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    main_run(parse_config(PredictorConfig, argv, prog="python -m trainers.sae_predictor"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
