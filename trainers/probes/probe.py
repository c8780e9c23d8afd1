"""Linear probes on stored activations, read from a view instead of re-running the model.

    python -m extractors.run --layers 6 12 17 24                  # once: hidden states into ./store_data
    python -m trainers.probe --config configs/probe.yaml         # probes, CSV, plot, run record, scores
    python -m trainers.probe --config configs/probe.yaml --store /tmp/st --layers 17 --train-seeds 0 \
        --l2-grid 0.001 0.01 --num-epochs 20                     # CPU-sized
    python -m trainers.probe --store /tmp/st --target row --view assistant_tokens --pool mean \
        --row-label "quality IN ('poor','very poor')"            # a metadata probe, one example per row

Token target: documents (rows) are split by the dataset's splits (train_base -> train, eval ->
validation). Every label-1 token of the view is a positive; up to `negatives_per_doc` label-0
tokens per document are sampled (training: per seed; validation: one fixed sample, seed 0, so
all seeds and layers are judged on the same tokens). Row target: one mean-pooled or
last-token vector per row, labelled by an SQL expression over `rows`.

Per layer and seed, features are standardized with the training statistics and one
logistic regression is fit per L2 value (trainers.probes.logreg); the L2 with the best validation
AUROC is kept. Outputs (in runs/<run_id>/ of the store, or --output-dir):
probe_layer_{L}_seed_{S}.safetensors + .json, probe_metrics.csv (one line per layer x seed x
l2), probe_auroc_by_layer.png, probe_run.json; a `runs` record (kind probe) with the config,
the view SQL and the store version; and, for token probes, the logits of the first seed's
probes written back into the store with a document-level monitor (trainers.monitor).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from extractors.model import pick_device
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run_extract
from store.arrays import array_exists, committed_set, open_array, stored_layers
from store.catalog.runs import Run
from store.cli import config_dict, user_errors
from store.core import STORE_VERSION, Store, StoreError, atomic_write_bytes, write_json
from store.materialize import view_text
from trainers.probes import monitor
from trainers.probes.config import ProbeConfig, load_config
from trainers.probes.data import ProbeData, load_probe_data
from trainers.probes.logreg import (
    FitResult,
    binary_metrics,
    class_weights,
    fit_logreg,
    logits_of,
    raw_coef,
    single_threaded,
    standardize,
    to_device,
)


class ProbeResult(NamedTuple):
    run_id: str
    out_dir: Path
    metrics: dict[str, Any]  # what the run record holds
    rows: list[dict[str, Any]]  # probe_metrics.csv


# ---- layers -----------------------------------------------------------------------------
def missing_layers(store: Store, cfg: ProbeConfig, layers: list[int], row_ids: set[str]) -> dict[int, int]:
    """{layer: how many of `row_ids` its array lacks} for layers not fully extracted."""
    out = {}
    for L in layers:
        name = cfg.array_name(L)
        if not array_exists(store, name):
            out[L] = len(row_ids)
            continue
        have = committed_set(store, name)
        if row_ids - have:
            out[L] = len(row_ids - have)
    return out


def ensure_layers(store: Store, cfg: ProbeConfig, row_ids: set[str]) -> list[int]:
    """The layers to probe, all present for `row_ids` (extracting them with --extract-missing)."""
    layers = list(cfg.layers) or sorted(stored_layers(store, cfg.array_kind))
    if not layers:
        raise StoreError(
            f"--layers: the store {store.root} has no {cfg.array_kind}/layer_* arrays; "
            f"extract some first: python -m extractors.run --layers 6 12 17 24 --store {store.root}"
        )
    missing = missing_layers(store, cfg, layers, row_ids)
    if not missing:
        return layers
    if cfg.array_kind != "hidden":
        raise StoreError(
            f"--layers: {cfg.array_kind}/layer_{{{','.join(map(str, missing))}}} are missing "
            f"or incomplete in {store.root}, and only hidden states can be extracted from here"
        )
    cmd = f"python -m extractors.run --layers {' '.join(map(str, missing))} --store {store.root}"
    if not cfg.extract_missing:
        what = ", ".join(f"layer {L} ({n} of {len(row_ids)} rows missing)" for L, n in missing.items())
        raise StoreError(f"--layers: {what} not extracted in {store.root}; run: {cmd}  (or pass --extract-missing)")
    _extract(store, cfg, sorted(missing))
    still = missing_layers(store, cfg, layers, row_ids)
    if still:
        raise StoreError(f"layers {sorted(still)} are still incomplete after extraction; run: {cmd}")
    return layers


def _extract(store: Store, cfg: ProbeConfig, layers: list[int]) -> None:
    """--extract-missing: run the extractor (which also ingests the embedded sample into an empty store)."""
    print(
        f"extracting layers {layers}: python -m extractors.run --layers {' '.join(map(str, layers))} "
        f"--store {store.root} --model {cfg.model}",
        file=sys.stderr,
    )
    run_extract(
        ExtractConfig(
            layers=layers,
            store=str(store.root),
            model=cfg.model,
            device=cfg.device,
            compute_dtype=cfg.compute_dtype,
            model_cache=cfg.model_cache,
            progress=cfg.progress,
        )
    )


# ---- training ---------------------------------------------------------------------------
def _fit_seed(L: int, seed: int, l2_index: int) -> int:
    """The minibatch-order seed of one fit: distinct per (layer, seed, l2), fixed across runs."""
    return (seed * 1_000_003 + L * 10_007 + l2_index * 101) % (2**63 - 1)


def _stats(y: np.ndarray, docs: np.ndarray) -> dict[str, Any]:
    n_pos = int(y.sum())
    return {"n": int(len(y)), "n_pos": n_pos, "n_neg": int(len(y) - n_pos), "n_docs": int(len(np.unique(docs)))}


def train_layer(
    cfg: ProbeConfig, data: ProbeData, X: np.ndarray, need: np.ndarray, L: int, device: torch.device, bar: tqdm
) -> list[dict[str, Any]]:
    """Fit every (seed, l2) of one layer; X holds the features of the sorted indices `need`.
    Returns one result per seed, with every fit and the index of the selected one."""
    results = []
    val_idx = data.val
    Xv = X[np.searchsorted(need, val_idx)]
    yv = data.y[val_idx]
    for seed in cfg.train_seeds:
        tr = data.train[seed]
        Xt, yt = X[np.searchsorted(need, tr)], data.y[tr]
        st = standardize(Xt)
        Zt, Zv = to_device(Xt, st, device, cfg.feature_dtype), to_device(Xv, st, device, cfg.feature_dtype)
        w_neg, w_pos = class_weights(yt) if cfg.class_balance == "weighted" else (1.0, 1.0)
        sw = None if cfg.class_balance == "downsample" else torch.from_numpy(np.where(yt == 1, w_pos, w_neg)).to(device)
        yt_t = torch.from_numpy(yt.astype(np.float32)).to(device)
        fits: list[tuple[float, FitResult, dict]] = []
        for li, l2 in enumerate(cfg.l2_grid):
            t0 = time.perf_counter()
            fit = fit_logreg(
                Zt,
                yt_t,
                sw,
                l2=l2,
                lr=cfg.learning_rate,
                epochs=cfg.num_epochs,
                batch_size=cfg.batch_size,
                seed=_fit_seed(L, seed, li),
            )
            train_m = binary_metrics(yt, logits_of(Zt, fit.coef, fit.bias))
            val_m = binary_metrics(yv, logits_of(Zv, fit.coef, fit.bias))
            fits.append((l2, fit, {"train": train_m, "val": val_m, "seconds": time.perf_counter() - t0}))
            bar.update(1)
            bar.set_postfix(layer=L, seed=seed, l2=l2, val_auroc=f"{val_m['auroc']:.3f}")
        best = max(range(len(fits)), key=lambda i: (fits[i][2]["val"]["auroc"], -i))
        results.append(
            {
                "layer": L,
                "seed": seed,
                "standardizer": st,
                "fits": fits,
                "best": best,
                "class_weights": {"neg": w_neg, "pos": w_pos},
                "train_stats": _stats(yt, data.doc[tr]),
                "val_stats": _stats(yv, data.doc[val_idx]),
            }
        )
    return results


def csv_rows(cfg: ProbeConfig, res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, (l2, fit, m) in enumerate(res["fits"]):
        out.append(
            {
                "probe": cfg.name,
                "layer": res["layer"],
                "seed": res["seed"],
                "l2": l2,
                "selected": i == res["best"],
                "train_loss": fit.train_loss,
                "train_auroc": m["train"]["auroc"],
                "val_auroc": m["val"]["auroc"],
                "val_auprc": m["val"]["auprc"],
                "val_accuracy_best": m["val"]["accuracy_best"],
                "val_best_threshold": m["val"]["best_threshold"],
                "val_accuracy_at_0": m["val"]["accuracy_at_0"],
                "n_train": res["train_stats"]["n"],
                "n_train_pos": res["train_stats"]["n_pos"],
                "n_val": res["val_stats"]["n"],
                "n_val_pos": res["val_stats"]["n_pos"],
                "steps": fit.steps,
                "seconds": round(m["seconds"], 3),
            }
        )
    return out


# ---- outputs ----------------------------------------------------------------------------
def probe_metadata(
    cfg: ProbeConfig,
    data: ProbeData,
    res: dict[str, Any],
    *,
    array: str,
    attrs: dict,
    run_id: str,
    view_sql_body: str,
    store: Store,
) -> dict[str, Any]:
    l2, fit, m = res["fits"][res["best"]]
    return {
        "probe": cfg.name,
        "layer": res["layer"],
        "seed": res["seed"],
        "target": cfg.target,
        "selected_l2": l2,
        "l2_grid": list(cfg.l2_grid),
        "val_auroc_by_l2": {str(l2_): mm["val"]["auroc"] for l2_, _, mm in res["fits"]},
        "train_stats": {
            **res["train_stats"],
            "class_weights": res["class_weights"],
            "class_balance": cfg.class_balance,
            "final_loss": fit.train_loss,
            "steps": fit.steps,
            "auroc": m["train"]["auroc"],
        },
        "val_stats": res["val_stats"],
        "val_metrics": {
            "auroc": m["val"]["auroc"],
            "auprc": m["val"]["auprc"],
            "accuracy_best": m["val"]["accuracy_best"],
            "best_threshold": m["val"]["best_threshold"],
            "accuracy_at_0": m["val"]["accuracy_at_0"],
        },
        "view": cfg.view,
        "view_sql": view_sql_body,
        "query_sql": data.sql,
        "token_rule": data.token_rule,
        "pool": cfg.pool if cfg.target == "row" else None,
        "row_label": cfg.row_label,
        "store": str(store.root),
        "store_version": STORE_VERSION,
        "run_id": run_id,
        "array": array,
        "activation_site": cfg.activation_site,
        "model_id": attrs.get("model", ""),
        "model_hash": attrs.get("model_hash", ""),
        "tokenization": attrs.get("tokenization", ""),
        "feature_dtype": cfg.feature_dtype,
        "optimizer": {
            "name": "adam",
            "learning_rate": cfg.learning_rate,
            "num_epochs": cfg.num_epochs,
            "batch_size": cfg.batch_size,
        },
        "tensors": "coef, bias: on standardized features (x - mean) / std; coef_raw, bias_raw: on raw "
        "activations; logit = x . coef_raw + bias_raw",
    }


def save_probe(out_dir: Path, store: Store, res: dict[str, Any], meta: dict[str, Any]) -> Path:
    """probe_layer_{L}_seed_{S}.safetensors (+ .json): weights, standardizer, and how they were made."""
    _, fit, _ = res["fits"][res["best"]]
    st = res["standardizer"]
    c_raw, b_raw = raw_coef(fit.coef.numpy(), float(fit.bias[0]), st)
    path = out_dir / f"probe_layer_{res['layer']}_seed_{res['seed']}.safetensors"
    tensors = {
        "coef": fit.coef.contiguous(),
        "bias": fit.bias.contiguous(),
        "mean": torch.from_numpy(st.mean),
        "std": torch.from_numpy(st.std),
        "coef_raw": torch.from_numpy(c_raw),
        "bias_raw": torch.tensor([b_raw], dtype=torch.float32),
    }
    atomic_write_bytes(
        path,
        save(
            tensors,
            metadata={
                "probe": meta["probe"],
                "layer": str(res["layer"]),
                "seed": str(res["seed"]),
                "l2": repr(meta["selected_l2"]),
            },
        ),
    )
    write_json(path.with_suffix(".json"), meta)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    pl.DataFrame(rows).write_csv(buf)
    atomic_write_bytes(path, buf.getvalue())


def plot_auroc_by_layer(path: Path, cfg: ProbeConfig, metrics: dict[str, Any]) -> Path:
    """Validation AUROC of the selected probes by layer (each seed, the mean, its AUPRC), plus
    the document monitor's AUROC (max aggregate) when token scores were written. The y axis
    zooms in when every value is high, so near-ceiling layers stay distinguishable."""
    from matplotlib.figure import Figure  # lazy: matplotlib only when a run ends

    by = metrics["by_layer"]
    layers = sorted(int(L) for L in by)
    mean = [by[str(L)]["val_auroc_mean"] for L in layers]
    fig = Figure(figsize=(6, 4), dpi=120)  # stand-alone: a notebook's pyplot backend is left alone
    ax = fig.subplots()
    shown = list(mean)
    for s in cfg.train_seeds:
        ys = [by[str(L)]["val_auroc_by_seed"][str(s)] for L in layers]
        shown += ys
        ax.scatter(
            layers,
            ys,
            s=12,
            color="tab:blue",
            alpha=0.45,
            label="probe AUROC, each seed" if s == cfg.train_seeds[0] else None,
        )
    ax.plot(layers, mean, "-o", color="tab:blue", label=f"probe AUROC, mean of {len(cfg.train_seeds)} seeds")
    for L, m in zip(layers, mean, strict=False):
        ax.annotate(
            f"{m:.3f}", (L, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="tab:blue"
        )
    auprc = [by[str(L)]["val_auprc_mean"] for L in layers]
    ax.plot(layers, auprc, ":^", color="tab:green", ms=4, label="probe AUPRC, mean")
    shown += auprc
    mon = metrics.get("monitor") or {}
    if mon:
        ys = [mon[str(L)]["max_logit"]["auroc"] for L in layers]
        shown += ys
        ax.plot(
            layers,
            ys,
            "--s",
            color="tab:orange",
            ms=4,
            label=f"document monitor AUROC (max logit, seed {cfg.train_seeds[0]})",
        )
    finite = [v for v in shown if np.isfinite(v)] or [0.5]
    pad = max(0.005, 0.15 * (1 - min(finite)))
    lo = max(0.0, min(finite) - pad)
    if lo <= 0.5:
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(lo, 1 + pad / 2)
    ax.set_xlabel("layer (output of decoder block L)")
    ax.set_ylabel("validation AUROC / AUPRC (chance AUROC 0.5)")
    ax.set_xticks(layers)
    what = f"{cfg.target} probe, view {cfg.view}" if len(cfg.view) < 40 else f"{cfg.target} probe"
    ax.set_title(f"{cfg.name}: validation metrics by layer ({what})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- the run ----------------------------------------------------------------------------
def run_probe(cfg: ProbeConfig) -> ProbeResult:
    """Load the view, check the layers, train, write outputs and scores; see the module docstring."""
    store = Store(cfg.store)
    if not store.has_table("tokens"):
        layers = " ".join(map(str, cfg.layers or [6, 12, 17, 24]))
        if not (cfg.extract_missing and cfg.layers and cfg.array_kind == "hidden"):
            raise StoreError(
                f"store: {store.root} has no tokens yet; extract first: python -m extractors.run "
                f"--layers {layers} --store {store.root}  (or pass --layers and "
                f"--extract-missing)"
            )
        _extract(store, cfg, list(cfg.layers))
    data = load_probe_data(store, cfg)
    layers = ensure_layers(store, cfg, set(data.frame["row_id"].unique().to_list()))
    device = pick_device(cfg.device)
    attrs = dict(open_array(store, cfg.array_name(layers[0])).attrs)
    body = view_text(store, cfg.view)
    with Run(
        store,
        "probe",
        {**config_dict(cfg), "view_sql": body, "query_sql": data.sql},
        model_id=attrs.get("model", ""),
        model_hash=attrs.get("model_hash", ""),
        layers=layers,
    ) as run:
        run.update(note=f"view {cfg.view}; target {cfg.target}; store_version {STORE_VERSION}")
        out_dir = Path(cfg.output_dir).expanduser().resolve() if cfg.output_dir else run.dir
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, per_layer, all_res = [], {}, []
        n_fits = len(layers) * len(cfg.train_seeds) * len(cfg.l2_grid)
        need = np.unique(np.concatenate([data.val, *data.train.values()]))
        with tqdm(total=n_fits, desc="train probes", unit="fit", disable=not cfg.progress) as bar:
            for L in tqdm(layers, desc="load layers", unit="layer", disable=not cfg.progress, leave=False):
                array = cfg.array_name(L)
                X = data.features(store, array, need)
                with single_threaded(device):
                    res = train_layer(cfg, data, X, need, L, device, bar)
                for r in res:
                    rows += csv_rows(cfg, r)
                    meta = probe_metadata(
                        cfg, data, r, array=array, attrs=attrs, run_id=run.run_id, view_sql_body=body, store=store
                    )
                    save_probe(out_dir, store, r, meta)
                per_layer[L] = res
                all_res += res
                del X
        metrics = summarize(cfg, per_layer)
        if cfg.write_scores:
            with single_threaded(device):
                metrics["monitor"] = write_back(store, cfg, data, per_layer, out_dir, run.run_id, device)
        write_csv(out_dir / "probe_metrics.csv", rows)
        plot_auroc_by_layer(out_dir / "probe_auroc_by_layer.png", cfg, metrics)
        counts = {
            "layers": len(layers),
            "seeds": len(cfg.train_seeds),
            "fits": n_fits,
            "train_docs": data.n_docs["train"],
            "val_docs": data.n_docs["val"],
            "train_examples": all_res[0]["train_stats"]["n"],
            "val_examples": all_res[0]["val_stats"]["n"],
        }
        metrics["outputs"] = str(out_dir)
        write_json(
            out_dir / "probe_run.json",
            {
                "run_id": run.run_id,
                "config": config_dict(cfg),
                "view_sql": body,
                "store_version": STORE_VERSION,
                "counts": counts,
                "metrics": metrics,
            },
        )
        run.finish(counts=counts, metrics=metrics)
    return ProbeResult(run.run_id, out_dir, metrics, rows)


def summarize(cfg: ProbeConfig, per_layer: dict[int, list[dict]]) -> dict[str, Any]:
    """Per layer: the selected probes' validation metrics (each seed, and the mean over seeds)."""
    by_layer = {}
    for L, res in per_layer.items():
        sel = [r["fits"][r["best"]] for r in res]
        aurocs = [m["val"]["auroc"] for _, _, m in sel]
        by_layer[str(L)] = {
            "val_auroc_mean": float(np.mean(aurocs)),
            "val_auroc_std": float(np.std(aurocs)),
            "val_auroc_by_seed": {str(r["seed"]): a for r, a in zip(res, aurocs, strict=False)},
            "val_auprc_mean": float(np.mean([m["val"]["auprc"] for _, _, m in sel])),
            "val_accuracy_best_mean": float(np.mean([m["val"]["accuracy_best"] for _, _, m in sel])),
            "selected_l2_by_seed": {str(r["seed"]): l2 for r, (l2, _, _) in zip(res, sel, strict=False)},
        }
    best = max(by_layer, key=lambda k: by_layer[k]["val_auroc_mean"])
    return {
        "probe": cfg.name,
        "view": cfg.view,
        "target": cfg.target,
        "store_version": STORE_VERSION,
        "by_layer": by_layer,
        "best_layer": int(best),
        "best_val_auroc": by_layer[best]["val_auroc_mean"],
    }


def write_back(
    store: Store,
    cfg: ProbeConfig,
    data: ProbeData,
    per_layer: dict[int, list[dict]],
    out_dir: Path,
    run_id: str,
    device: torch.device,
) -> dict[str, Any]:
    """Score with the first seed's probes: token logits + doc monitor (token target), or
    per-row logits (row target); returns the document-level metrics per layer."""
    seed = cfg.train_seeds[0]
    out: dict[str, Any] = {}
    val_docs = set(data.doc[data.val].tolist())
    for L in tqdm(per_layer, desc="score", unit="layer", disable=not cfg.progress, leave=False):
        array = cfg.array_name(L)
        probe = monitor.LoadedProbe(out_dir / f"probe_layer_{L}_seed_{seed}.json")
        if cfg.target == "row":
            X = data.features(store, array, np.arange(len(data.y)))
            logits = probe.score(X, device, cfg.feature_dtype)
            f = data.frame.select("row_id", "split").with_columns(
                pl.Series("label", data.y, dtype=pl.Int32),
                pl.Series("probe_logit", logits, dtype=pl.Float32),
                pl.lit(run_id).alias("run_id"),
                pl.lit(cfg.name).alias("probe"),
                pl.lit(L, pl.Int32).alias("layer"),
                pl.lit(seed, pl.Int32).alias("seed"),
            )
            store.write_table("probe_row_scores", f.to_arrow(), part=f"{cfg.name}/{run_id}/layer_{L}")
            continue
        view = cfg.score_view or cfg.view
        frame = monitor.scored_tokens(store, view, array)
        logits = monitor.score_frame(store, probe, frame, array, device, cfg.feature_dtype)
        docs = monitor.doc_scores(frame, logits, cfg.monitor_topk)
        monitor.write_scores(
            store,
            run_id=run_id,
            probe_name=cfg.name,
            layer=L,
            seed=seed,
            frame=frame,
            logits=logits,
            docs=docs,
            source_array=array,
            attrs={"probe": cfg.name, "view": view, "probe_run": run_id},
        )
        out[str(L)] = monitor.doc_metrics(docs, val_docs)
    return out


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    res = run_probe(load_config(argv))
    m = res.metrics
    for L, d in m["by_layer"].items():
        line = f"layer {L:>3}: val AUROC {d['val_auroc_mean']:.3f} ± {d['val_auroc_std']:.3f}"
        mon = m.get("monitor", {}).get(L)
        if mon:
            line += (
                f"; doc monitor AUROC max {mon['max_logit']['auroc']:.3f} mean "
                f"{mon['mean_logit']['auroc']:.3f} top-k {mon['topk_mean_logit']['auroc']:.3f}"
            )
        print(line)
    print(
        f"run {res.run_id}: outputs in {res.out_dir} (probe_metrics.csv, probe_auroc_by_layer.png); "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
