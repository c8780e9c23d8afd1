"""Layer features and the layer selector: which layers to steer at.

    python -m trainers.steering compute --layers 6 12 17 24     # writes layer_features rows (no effect yet)
    python -m trainers.steering evaluate --alpha 4              # fills their effect and `best` label
    python -m trainers.layer_selector                           # train on every evaluated run, leave-one-run-out
    python -m trainers.layer_selector --epochs 100 --store /tmp/st   # CPU-sized (it is small anyway)
    python -m trainers.steering generate --layers auto --top-k 2 --alpha 4   # steer at its top-2 layers

Table `layer_features`: one row per (steering run, layer): the vector's norm and its ratio to
the mean hidden-state norm of the selected tokens, group sizes (rows, tokens), the share of
the groups' completion tokens the token rule selected, the selected tokens' mean and max
stored gradient norm (gradnorm/layer_L, where present), the token selector's held-out AUROC
and the newest probe's validation AUROC at that layer (where present), then, once
`steering evaluate` ran, the measured effect (log-prob effect with its 95% CI, math accuracy
change) and `best` (1 for the run's layer with the largest effect).

The layer selector is an MLP (trainers.steering.mlp) on FEATURE_KEYS, z-scored (means/stds and
`feature_keys` are in the checkpoint; a missing feature is imputed with the training mean,
i.e. 0 after z-scoring), trained with BCE on `best`. Leave-one-run-out evaluation: for each
evaluated run, a selector trained on the other runs ranks the held-out run's layers; we report
how often its top layer is the best one against chance (1 / layers in the run). The final
selector is trained on every run. `top_k_layers(features, k, selector)` returns the k
highest-scoring distinct layers of one run's feature rows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from store.catalog.runs import Run
from store.cli import ProgressOptions, SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import STORE_VERSION, Store, StoreError
from trainers.steering.mlp import MLP, fit_mlp, load_mlp, save_mlp

TABLE = "layer_features"
FEATURE_KEYS = [
    "layer",
    "norm",
    "relative_norm",
    "n_pos_rows",
    "n_neg_rows",
    "n_pos_tokens",
    "n_neg_tokens",
    "selected_share",
    "grad_norm_mean",
    "grad_norm_max",
    "selector_auroc",
    "probe_auroc",
]
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("layer", pa.int32()),
        ("token_rule", pa.string()),
        ("norm", pa.float64()),
        ("mean_hidden_norm", pa.float64()),
        ("relative_norm", pa.float64()),
        ("n_pos_rows", pa.int64()),
        ("n_neg_rows", pa.int64()),
        ("n_pos_tokens", pa.int64()),
        ("n_neg_tokens", pa.int64()),
        ("selected_share", pa.float64()),
        ("grad_norm_mean", pa.float64()),
        ("grad_norm_max", pa.float64()),
        ("selector_auroc", pa.float64()),
        ("probe_auroc", pa.float64()),
        ("effect", pa.float64()),
        ("effect_ci_low", pa.float64()),
        ("effect_ci_high", pa.float64()),
        ("math_change", pa.float64()),
        ("best", pa.int32()),
        ("evaluated_by", pa.string()),
    ]
)


def probe_aurocs(store: Store) -> dict[int, float]:
    """{layer: validation AUROC} of the newest finished probe run holding the layer."""
    if not store.has_table("runs"):
        return {}
    out: dict[int, float] = {}
    for m in (
        store.query("SELECT metrics FROM runs WHERE kind = 'probe' AND status = 'finished' ORDER BY started_at")
        .column(0)
        .to_pylist()
    ):
        for L, d in (json.loads(m).get("by_layer") or {}).items():
            if isinstance(d, dict) and d.get("val_auroc_mean") is not None:
                out[int(L)] = float(d["val_auroc_mean"])
    return out


def write_layer_features(store: Store, run_id: str, rows: list[dict[str, Any]]) -> None:
    """The steering compute run's rows (effect and best empty until evaluated)."""
    probes = probe_aurocs(store)
    recs = [
        {
            **{k: r.get(k) for k in SCHEMA.names},
            "run_id": run_id,
            "probe_auroc": probes.get(r["layer"]),
            "relative_norm": r["norm"] / r["mean_hidden_norm"] if r.get("mean_hidden_norm") else None,
        }
        for r in rows
    ]
    store.write_table(TABLE, pa.Table.from_pylist(recs, schema=SCHEMA), part=run_id)


def run_features(store: Store, run_id: str) -> pl.DataFrame:
    """One steering run's layer_features rows."""
    if not store.has_table(TABLE):
        raise StoreError(
            f"no {TABLE} in {store.root}; compute steering vectors first: python -m trainers.steering "
            f"compute --layers 12 17 --store {store.root}"
        )
    f = pl.from_arrow(store.query(f"SELECT * FROM {TABLE} WHERE run_id = ? ORDER BY layer", [run_id]))
    if not len(f):
        raise StoreError(f"steering run {run_id!r} has no {TABLE} rows")
    return f


def update_layer_features(
    store: Store, run_id: str, effects: dict[int, dict[str, Any]], best: int, eval_run: str
) -> None:
    """Fill a run's effect columns and its `best` label from `steering evaluate`."""
    f = run_features(store, run_id).to_dicts()
    for r in f:
        e = effects.get(r["layer"])
        if e is not None:
            r.update(e)
            r["best"], r["evaluated_by"] = int(r["layer"] == best), eval_run
    store.write_table(
        TABLE, pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in f], schema=SCHEMA), part=run_id
    )


def feature_matrix(f: pl.DataFrame, keys: list[str]) -> np.ndarray:
    """[n, len(keys)] float32; nulls as NaN (imputed later)."""
    missing = [k for k in keys if k not in f.columns]
    if missing:
        raise StoreError(f"layer features lack {missing}; they must have {', '.join(keys)} (table {TABLE})")
    return np.column_stack([f[k].cast(pl.Float64).fill_null(np.nan).to_numpy() for k in keys]).astype(np.float32)


def _impute(X: np.ndarray, fill: np.ndarray) -> np.ndarray:
    X = X.copy()
    bad = np.isnan(X)
    X[bad] = np.broadcast_to(fill, X.shape)[bad]
    return X


class LayerSelector:
    """A trained layer selector: scores one run's layer feature rows."""

    def __init__(self, mlp: MLP):
        self.mlp, self.meta = mlp, mlp.meta
        self.keys = list(self.meta["feature_keys"])
        self.fill = np.asarray(self.meta["impute"], np.float32)

    @classmethod
    def load(cls, path: str | Path) -> LayerSelector:
        mlp = load_mlp(path)
        if mlp.meta.get("kind") != "layer_selector":
            raise StoreError(f"{path} is not a layer selector checkpoint (python -m trainers.layer_selector)")
        return cls(mlp)

    @classmethod
    def load_latest(cls, store: Store) -> LayerSelector:
        import json

        if store.has_table("runs"):
            for m in (
                store.query(
                    "SELECT metrics FROM runs WHERE kind = 'layer_selector' AND status = 'finished' "
                    "ORDER BY started_at DESC"
                )
                .column(0)
                .to_pylist()
            ):
                ck = json.loads(m).get("checkpoint")
                if ck and Path(ck).is_file():
                    return cls.load(ck)
        raise StoreError(
            f"no layer selector in {store.root}; train one: python -m trainers.layer_selector "
            f"--store {store.root} (or pass --layers with numbers)"
        )

    def scores(self, features: pl.DataFrame | list[dict[str, Any]]) -> np.ndarray:
        f = features if isinstance(features, pl.DataFrame) else pl.DataFrame(features)
        return self.mlp.logits(_impute(feature_matrix(f, self.keys), self.fill))


def top_k_layers(features: pl.DataFrame | list[dict[str, Any]], k: int, selector: LayerSelector) -> list[int]:
    """The k distinct layers of one run's feature rows that the selector scores highest."""
    f = features if isinstance(features, pl.DataFrame) else pl.DataFrame(features)
    layers = [int(x) for x in f["layer"].to_list()]
    if len(set(layers)) != len(layers):
        raise StoreError(f"layer feature rows must be one steering run (one row per layer); got layers {layers}")
    if not 1 <= k <= len(layers):
        raise StoreError(f"--top-k {k} must be in 1..{len(layers)}: the run has layers {sorted(layers)}")
    s = selector.scores(f)
    order = sorted(range(len(layers)), key=lambda i: (-s[i], layers[i]))
    return [layers[i] for i in order[:k]]


@dataclass(kw_only=True)
class LayerSelectorConfig(StoreOptions, SeedOptions, ProgressOptions):
    """Train the layer-selector MLP on the layer_features of evaluated steering runs (--seed seeds
    its initialisation and batch order)."""

    hidden_sizes: list[int] = field(default_factory=lambda: [16], metadata={"help": "MLP hidden layer sizes"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each hidden layer"})
    epochs: int = field(default=300, metadata={"help": "training epochs (full batch: the table is small)"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay"})
    pos_weight: float | None = field(
        default=None,
        metadata={
            "help": "weight of the best layers' BCE term "
            "(default: negatives / positives, so both classes weigh the same)"
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "checkpoint folder (default runs/<run_id>/)"})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")


def _fit(cfg: LayerSelectorConfig, f: pl.DataFrame, meta: dict[str, Any]) -> LayerSelector:
    X = feature_matrix(f, FEATURE_KEYS)
    fill = np.nanmean(np.where(np.isnan(X).all(0), 0.0, X), axis=0) if len(X) else np.zeros(X.shape[1])
    fill = np.where(np.isnan(fill), 0.0, fill).astype(np.float32)
    y = f["best"].to_numpy().astype(np.float32)
    pw = cfg.pos_weight if cfg.pos_weight is not None else float((y == 0).sum() / max((y == 1).sum(), 1))
    mlp, losses = fit_mlp(
        _impute(X, fill),
        y,
        hidden=cfg.hidden_sizes,
        dropout=cfg.dropout,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        batch_size=max(len(X), 1),
        seed=cfg.seed,
        pos_weight=pw,
        meta={**meta, "impute": fill.tolist()},
    )
    mlp.meta["final_train_loss"] = losses[-1]
    return LayerSelector(mlp)


def train_layer_selector(cfg: LayerSelectorConfig) -> dict[str, Any]:
    store = Store(cfg.store)
    if not store.has_table(TABLE):
        raise StoreError(f"no {TABLE} in {store.root}: run python -m trainers.steering compute, then evaluate")
    f = pl.from_arrow(store.query(f"SELECT * FROM {TABLE} WHERE best IS NOT NULL ORDER BY run_id, layer"))
    runs = sorted(set(f["run_id"].to_list()))
    if not runs:
        raise StoreError(f"no evaluated steering runs in {TABLE}: run python -m trainers.steering evaluate first")
    meta = {
        "kind": "layer_selector",
        "feature_keys": FEATURE_KEYS,
        "target": "best (1 = the run's layer with the largest log-prob steering effect)",
        "store": str(store.root),
        "store_version": STORE_VERSION,
        "training_runs": runs,
        "config": config_dict(cfg),
    }
    with Run(store, "layer_selector", config_dict(cfg)) as run:
        loro = []
        for r in tqdm(runs if len(runs) > 1 else [], desc="leave-one-run-out", disable=not cfg.progress):
            train, test = f.filter(pl.col("run_id") != r), f.filter(pl.col("run_id") == r)
            if train["best"].sum() == 0:
                continue
            sel = _fit(cfg, train, meta)
            top = top_k_layers(test, 1, sel)[0]
            best = int(test.filter(pl.col("best") == 1)["layer"][0])
            loro.append(
                {"run_id": r, "predicted": top, "best": best, "hit": int(top == best), "chance": 1.0 / len(test)}
            )
        final = _fit(cfg, f, {**meta, "run_id": run.run_id})
        final.mlp.meta["leave_one_run_out"] = loro
        out = Path(cfg.output_dir) if cfg.output_dir else run.dir
        st, js = save_mlp(final.mlp, out / "layer_selector")
        metrics = {
            "checkpoint": str(js),
            "weights": str(st),
            "n_runs": len(runs),
            "n_rows": len(f),
            "loro_top1_accuracy": float(np.mean([x["hit"] for x in loro])) if loro else None,
            "loro_chance": float(np.mean([x["chance"] for x in loro])) if loro else None,
            "loro": loro,
            "train_scores": dict(
                zip(
                    [f"{r}@{L}" for r, L in zip(f["run_id"], f["layer"], strict=False)],
                    final.scores(f).round(4).tolist(),
                    strict=False,
                )
            ),
        }
        run.finish(counts={"runs": len(runs), "rows": len(f)}, metrics=metrics)
    return {**metrics, "run_id": run.run_id}


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    m = train_layer_selector(parse_config(LayerSelectorConfig, argv, prog="python -m trainers.layer_selector"))
    print(f"layer selector on {m['n_rows']} layer rows of {m['n_runs']} evaluated steering runs")
    if m["loro_top1_accuracy"] is None:
        print("leave-one-run-out: needs at least two evaluated runs (skipped)")
    else:
        print(
            f"leave-one-run-out top-1 accuracy {m['loro_top1_accuracy']:.3f} vs chance {m['loro_chance']:.3f} "
            f"({len(m['loro'])} held-out runs)"
        )
    print(f"checkpoint {m['checkpoint']} (+ .safetensors); run {m['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
