"""Probe scores back into the store, and the document-level monitor built on them.

A trained token probe (probe_layer_{L}_seed_{S}.safetensors + .json, see trainers.probe)
scores every token of a view, and the logits land in the store twice:

* table `probe_token_scores(run_id, probe, layer, seed, row_id, token_pos, split, label,
  probe_logit)`, so SQL finds what a probe fires on:
      SELECT s.probe_logit, t.token_text, s.row_id FROM probe_token_scores s
      JOIN tokens t USING (row_id, token_pos) WHERE s.layer = 17 ORDER BY s.probe_logit DESC LIMIT 20
* a 1-D float32 Zarr array `probe/<probe>/layer_<L>` over the token layout (a token's logit
  is at its `tok_index`; tokens outside the view are 0), committed per unit like every array,
  so `materialize(store, view, array="probe/needle_tokens/layer_17")` reads logits back.

The monitor aggregates each row's token logits (max, mean, mean of the top k) into table
`probe_doc_scores(run_id, probe, layer, seed, row_id, split, label, n_tokens, max_logit,
mean_logit, topk_mean_logit)`; `doc_metrics` gives each aggregate's AUROC against the row
label (the view's `has_needle`, else the max of its token labels).

    python -m trainers.monitor --store S --probe S/runs/<run>/probe_layer_17_seed_0.json --view content_tokens
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
import torch
from safetensors.torch import load_file

from extractors.model import pick_device
from store.arrays import commit_unit, create_array, open_array, record_array, write_unit
from store.catalog.runs import Run
from store.catalog.tokens import read_layout
from store.cli import DeviceOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from store.loaders import ActivationDataset
from store.materialize import view_sql
from trainers.probes.logreg import Standardizer, binary_metrics, logits_of, to_device

AGGREGATES = ("max_logit", "mean_logit", "topk_mean_logit")
TOKEN_SCORES = "probe_token_scores"
DOC_SCORES = "probe_doc_scores"


class LoadedProbe:
    """A saved probe: standardized-space weights with their standardizer, and its metadata."""

    def __init__(self, path: str | Path):
        p = Path(path)
        st_path, js_path = p.with_suffix(".safetensors"), p.with_suffix(".json")
        if not st_path.is_file() or not js_path.is_file():
            raise StoreError(f"probe {p}: need both {st_path.name} and {js_path.name} (from python -m trainers.probe)")
        t = load_file(str(st_path))
        self.coef, self.bias = t["coef"], t["bias"]
        self.st = Standardizer(t["mean"].numpy(), t["std"].numpy())
        self.meta: dict[str, Any] = json.loads(js_path.read_text())

    def score(self, X: np.ndarray, device: torch.device, feature_dtype: str = "float32") -> np.ndarray:
        return logits_of(to_device(X, self.st, device, feature_dtype), self.coef, self.bias)


def scored_tokens(store: Store, view: str, array: str) -> pl.DataFrame:
    """The view's tokens whose rows are committed in `array`, with split and the labels it has."""
    con = store.connect()
    try:
        cols = [c[0] for c in con.sql(f"SELECT * FROM ({view_sql(store, view)}) LIMIT 0").description]
        for need in ("row_id", "tok_index", "token_pos"):
            if need not in cols:
                raise StoreError(f"view {view!r} must return {need} to be scored (join the tokens table)")
        extra = [c for c in ("label", "has_needle") if c in cols]
        q = (
            f"WITH v AS ({view_sql(store, view)}) "
            f"SELECT v.row_id, v.token_pos, v.tok_index, r.split{''.join(', v.' + c for c in extra)} "
            f"FROM v JOIN rows r USING (row_id) "
            f"WHERE v.row_id IN (SELECT row_id FROM array_units WHERE array_name = $a) "
            f"ORDER BY v.tok_index"
        )
        return pl.from_arrow(con.sql(q, params={"a": array}).to_arrow_table())
    finally:
        con.close()


def score_frame(
    store: Store,
    probe: LoadedProbe,
    frame: pl.DataFrame,
    array: str,
    device: torch.device,
    feature_dtype: str = "float32",
    batch: int = 65536,
) -> np.ndarray:
    """Logits of the frame's tokens, in batches of `batch` read through the training loaders."""
    out = np.zeros(len(frame), np.float32)
    if not len(frame):
        return out
    ds = ActivationDataset(store, frame.select("row_id", "tok_index"), [array], columns=[], batch_size=batch)
    for i in range(len(ds)):
        out[i * batch : (i + 1) * batch] = probe.score(ds[i][array].numpy(), device, feature_dtype)
    return out


def doc_label_expr(frame: pl.DataFrame) -> pl.Expr | None:
    if "has_needle" in frame.columns:
        return pl.col("has_needle").cast(pl.Int32).max()
    if "label" in frame.columns:
        return pl.col("label").cast(pl.Int32).max()
    return None


def doc_scores(frame: pl.DataFrame, logits: np.ndarray, topk: int) -> pl.DataFrame:
    """One line per row: n_tokens, max / mean / top-k mean logit, and the row label."""
    f = frame.with_columns(pl.Series("probe_logit", logits, dtype=pl.Float32))
    label = doc_label_expr(frame)
    aggs = [
        pl.col("split").first(),
        pl.len().alias("n_tokens"),
        pl.col("probe_logit").max().alias("max_logit"),
        pl.col("probe_logit").cast(pl.Float64).mean().cast(pl.Float32).alias("mean_logit"),
        pl.col("probe_logit")
        .sort(descending=True)
        .head(topk)
        .cast(pl.Float64)
        .mean()
        .cast(pl.Float32)
        .alias("topk_mean_logit"),
    ]
    aggs.append((label if label is not None else pl.lit(None, pl.Int32)).alias("label"))
    return f.group_by("row_id").agg(aggs).sort("row_id")


def doc_metrics(docs: pl.DataFrame, row_ids: set[str] | None = None) -> dict[str, Any]:
    """AUROC / AUPRC of each aggregate against the row label, over `row_ids` (default: all)."""
    d = docs if row_ids is None else docs.filter(pl.col("row_id").is_in(sorted(row_ids)))
    d = d.filter(pl.col("label").is_not_null())
    y = d["label"].to_numpy()
    out: dict[str, Any] = {"n_docs": len(d), "n_pos_docs": int(y.sum()) if len(d) else 0}
    for a in AGGREGATES:
        m = binary_metrics(y, d[a].to_numpy())
        out[a] = {"auroc": m["auroc"], "auprc": m["auprc"], "accuracy_best": m["accuracy_best"]}
    return out


def write_scores(
    store: Store,
    *,
    run_id: str,
    probe_name: str,
    layer: int,
    seed: int,
    frame: pl.DataFrame,
    logits: np.ndarray,
    docs: pl.DataFrame,
    source_array: str,
    attrs: dict[str, Any],
) -> str:
    """Write the token table, the doc table and the Zarr array; returns the array's name."""
    n = len(frame)
    label = frame["label"].cast(pl.Int32).to_arrow() if "label" in frame.columns else pa.nulls(n, pa.int32())
    store.write_table(
        TOKEN_SCORES,
        pa.table(
            {
                "run_id": pa.array([run_id] * n, pa.string()),
                "probe": pa.array([probe_name] * n, pa.string()),
                "layer": pa.array([layer] * n, pa.int32()),
                "seed": pa.array([seed] * n, pa.int32()),
                "row_id": frame["row_id"].to_arrow(),
                "token_pos": frame["token_pos"].cast(pl.Int32).to_arrow(),
                "split": frame["split"].to_arrow(),
                "label": label,
                "probe_logit": pa.array(logits, pa.float32()),
            }
        ),
        part=f"{probe_name}/{run_id}/layer_{layer}",
    )
    m = len(docs)
    store.write_table(
        DOC_SCORES,
        pa.table(
            {
                "run_id": pa.array([run_id] * m, pa.string()),
                "probe": pa.array([probe_name] * m, pa.string()),
                "layer": pa.array([layer] * m, pa.int32()),
                "seed": pa.array([seed] * m, pa.int32()),
                **{c: docs[c].to_arrow() for c in ("row_id", "split", "label", "n_tokens", *AGGREGATES)},
            }
        ),
        part=f"{probe_name}/{run_id}/layer_{layer}",
    )
    return write_score_array(
        store,
        f"probe/{probe_name}/layer_{layer}",
        frame,
        logits,
        run_id=run_id,
        layer=layer,
        source_array=source_array,
        attrs=attrs,
    )


def write_score_array(
    store: Store,
    name: str,
    frame: pl.DataFrame,
    logits: np.ndarray,
    *,
    run_id: str,
    layer: int,
    source_array: str,
    attrs: dict[str, Any],
) -> str:
    """A 1-D float32 array over the source array's layout holding the logits at their tok_index."""
    src = open_array(store, source_array)
    tokenization = src.attrs.get("tokenization")
    layout = read_layout(store, tokenization)
    arr = create_array(
        store,
        name,
        n_slots=layout.n_slots,
        width=None,
        chunk_slots=layout.unit_tokens,
        dtype="fp32",
        attrs={
            **attrs,
            "tokenization": tokenization,
            "model": src.attrs.get("model"),
            "model_hash": src.attrs.get("model_hash"),
            "layer": layer,
            "run_id": run_id,
            "source_array": source_array,
        },
    )
    tok = frame["tok_index"].to_numpy()
    unit_of = tok // layout.unit_tokens
    rows = frame["row_id"].to_numpy()
    for u in np.unique(unit_of):
        sel = unit_of == u
        buf = np.zeros(layout.unit_tokens, np.float32)
        buf[tok[sel] - u * layout.unit_tokens] = logits[sel]
        write_unit(store, arr, name, int(u), buf)
        commit_unit(store, name, int(u), sorted(set(rows[sel].tolist())), run_id)
    record_array(store, name, arr, kind="probe", layer=layer, run_id=run_id, extra={"probe": attrs.get("probe")})
    return name


# ---- python -m trainers.monitor: score any view with a saved probe ------------------------
@dataclass(kw_only=True)
class MonitorConfig(StoreOptions, DeviceOptions):
    """Score a view's tokens with a saved probe and aggregate them per row (document monitor)."""

    probe: str = field(
        metadata={"help": "a probe file from python -m trainers.probe (probe_layer_L_seed_S.json or .safetensors)"}
    )
    view: str = field(
        default="needle_tokens",
        metadata={
            "help": "view or SQL whose tokens to score "
            "(row_id, token_pos, tok_index; label/has_needle give the doc label)"
        },
    )
    probe_name: str | None = field(
        default=None, metadata={"help": "name in the score tables and array (default: the probe's own name)"}
    )
    topk: int = field(default=5, metadata={"help": "k of the top-k mean logit"})

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"topk: must be at least 1, got {self.topk}")


def run_monitor(cfg: MonitorConfig) -> dict[str, Any]:
    store = Store(cfg.store)
    probe = LoadedProbe(cfg.probe)
    meta = probe.meta
    array, layer = meta["array"], int(meta["layer"])
    name = cfg.probe_name or meta["probe"]
    frame = scored_tokens(store, cfg.view, array)
    if not len(frame):
        raise StoreError(f"view {cfg.view!r} selects no tokens committed in {array}")
    with Run(
        store,
        "probe_monitor",
        {**config_dict(cfg), "view_sql": view_sql(store, cfg.view)},
        model_id=meta.get("model_id", ""),
        model_hash=meta.get("model_hash", ""),
        layers=[layer],
    ) as run:
        logits = score_frame(store, probe, frame, array, pick_device(cfg.device), meta.get("feature_dtype", "float32"))
        docs = doc_scores(frame, logits, cfg.topk)
        arr = write_scores(
            store,
            run_id=run.run_id,
            probe_name=name,
            layer=layer,
            seed=int(meta["seed"]),
            frame=frame,
            logits=logits,
            docs=docs,
            source_array=array,
            attrs={"probe": name, "view": cfg.view, "probe_file": str(cfg.probe)},
        )
        by_split = {s: doc_metrics(docs.filter(pl.col("split") == s)) for s in sorted(set(docs["split"]))}
        metrics = {"array": arr, "doc_metrics_by_split": by_split}
        run.finish(counts={"tokens": len(frame), "docs": len(docs)}, metrics=metrics)
    return metrics


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    m = run_monitor(parse_config(MonitorConfig, argv, prog="python -m trainers.monitor"))
    for split, d in m["doc_metrics_by_split"].items():
        if not d["n_docs"]:
            print(f"{split}: no row labels (the view has no label or has_needle column)")
            continue
        aucs = ", ".join(f"{a} {d[a]['auroc']:.3f}" for a in AGGREGATES)
        print(f"{split}: {d['n_docs']} docs ({d['n_pos_docs']} positive): doc AUROC {aucs}")
    print(f"logits in array {m['array']} and tables {TOKEN_SCORES}, {DOC_SCORES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
