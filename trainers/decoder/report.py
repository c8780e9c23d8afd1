"""The decoder's records: the `decoders` table, curves.json + curves.png, and the exported
`decoder_best` (safetensors + JSON) of the best epoch that passes the KL gate.

Table `decoders`, one Parquet part per run: one row per (model, split) of the final comparison:
`model` decoder (its best passing epoch, else its last), residual (the linear decoder on the raw
residual stream, same epoch rule), logit_lens, frozen; with run_id, decoder (the exported name or
null), arch, sae, layer, split (eval / ood), epoch, ce, kl, kl_above_gate, accuracy, agreement,
n_tokens, passes_gate, max_kl, kl_weight, target_outside_topk (frozen only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from matplotlib.figure import Figure

from store.core import Store, atomic_write_bytes, write_json
from trainers.decoder.train import Fitted
from trainers.plots import save_figure

TABLE = "decoders"


def final_rows(fit: Fitted, epochs: int, max_kl: float) -> list[dict[str, Any]]:
    """The comparison: decoder and residual at the decoder's best passing epoch (else the last),
    logit lens and frozen model as evaluated once."""
    epoch = fit.best["epoch"] if fit.best else epochs
    rows = [dict(c) for c in fit.curves if c["epoch"] == epoch]
    rows += [{**f, "epoch": None} for f in fit.fixed]
    for r in rows:
        r["passes_gate"] = bool(r["kl"] <= max_kl)
    return rows


def write_table(store: Store, rows: list[dict[str, Any]], common: dict[str, Any], run_id: str) -> pl.DataFrame:
    order = {"decoder": 0, "residual": 1, "logit_lens": 2, "frozen": 3}
    t = pl.DataFrame([{**common, **r} for r in rows], infer_schema_length=None).with_columns(
        pl.col("epoch").cast(pl.Int32), pl.col("n_tokens").cast(pl.Int64), pl.col("layer").cast(pl.Int32)
    )
    if "target_outside_topk" not in t.columns:
        t = t.with_columns(pl.lit(None, pl.Float64).alias("target_outside_topk"))
    t = t.sort(pl.col("split"), pl.col("model").replace_strict(order, default=9))
    store.write_table(TABLE, t.to_arrow(), part=run_id)
    return t


def curves_plot(fit: Fitted, path: Path, max_kl: float, title: str) -> Path:
    """KL and CE per epoch of the decoder and the residual baseline, eval solid / OOD dashed, with
    the logit lens and the gate as horizontal lines."""
    fig = Figure(figsize=(10, 4))
    for j, metric in enumerate(("kl", "ce")):
        ax = fig.add_subplot(1, 2, j + 1)
        for model, color in (("decoder", "C0"), ("residual", "C1")):
            for split, ls in (("eval", "-"), ("ood", "--")):
                pts = [(c["epoch"], c[metric]) for c in fit.curves if c["model"] == model and c["split"] == split]
                if pts:
                    ax.plot(*zip(*pts, strict=True), ls=ls, color=color, marker="o", label=f"{model} {split}")
        for f in fit.fixed:
            if f["model"] == "logit_lens" or (metric == "ce" and f["model"] == "frozen"):
                ax.axhline(
                    f[metric],
                    color="grey" if f["model"] == "logit_lens" else "k",
                    ls="-" if f["split"] == "eval" else "--",
                    lw=0.8,
                    label=f"{f['model']} {f['split']}",
                )
        if metric == "kl":
            ax.axhline(max_kl, color="red", ls=":", label=f"gate {max_kl}")
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel({"kl": "KL(frozen || model), nats/token", "ce": "CE of the next token, nats"}[metric])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def export_best(run_dir: Path, fit: Fitted, meta: dict[str, Any]) -> Path | None:
    """runs/<id>/decoder_best.safetensors + decoder_best.json (the JSON last: it marks the pair complete)."""
    if fit.best is None:
        return None
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in fit.best["state"].items()}, metadata={"epoch": str(fit.best["epoch"])})
    atomic_write_bytes(run_dir / "decoder_best.safetensors", blob)
    doc = {**meta, "epoch": fit.best["epoch"], "eval": fit.best["metrics"], "tensors": "decoder_best.safetensors"}
    return write_json(run_dir / "decoder_best.json", doc)
