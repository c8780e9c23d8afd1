"""A decoder from stored SAE codes to the frozen model's next-token distribution, gated on KL.

    python -m extractors.run --kinds logits --split train_base --max-rows 200 # once: the frozen logits
    python -m extractors.run --kinds logits --split eval --max-rows 60
    python -m trainers.decoder --sae latest --layer 17 --ood-category math  # linear, 3 epochs, gate 1.5
    python -m trainers.decoder --sae latest --layer 17 --arch transformer --n-layers 2 --d-model 256
    python -m trainers.decoder --sae latest --layer 17 --max-train-rows 200 --max-eval-rows 60 --gate strict

Inputs (trainers.decoder.data): the SAE's stored codes (sparse, straight from the codes arrays),
the stored frozen logits (extractors.logits) and the layer's hidden states (for the baselines) of
the first --max-train-rows train_base and --max-eval-rows eval rows; --ood-category C holds that
category out of training and evaluates on its rows as the OOD split. Models
(trainers.decoder.models): `linear` or `transformer` over the features, read out through the
frozen model's final norm and unembedding. Loss: CE of the true next token + --kl-weight x
KL(frozen || decoder) from the stored top-k plus one tail bucket (trainers.decoder.kl: a lower
bound on the full KL). Baselines in the same report (trainers.decoder.train): a linear decoder on
the raw residual stream of the same layer and tokens, trained the same way on the same batches;
the logit lens at that layer; the frozen model (KL 0).

Gate: the decoder passes an epoch when its mean eval KL is at most --max-kl; the passing epoch
with the lowest eval KL is exported as `decoder_best` (runs/<id>/decoder_best.safetensors + .json:
config, view SQL, SAE identity, store version). A run with no passing epoch says so; with
--gate strict it exits 1. Records (trainers.decoder.report): table `decoders`, runs/<id>/curves.json
and curves.png, a `runs` record (kind train_decoder).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import polars as pl
import torch

from extractors.logits import final_norm_and_head
from extractors.model import check_model_hash, load_model
from extractors.sae.load import SAELoadError, load_sae
from store.arrays import open_array
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
from store.core import STORE_VERSION, Store, StoreError
from trainers.decoder.data import arrays_for, check_inputs, dataset, rows_sql, select_splits, to_batch
from trainers.decoder.models import FrozenReadout, ResidualLinear, build_decoder
from trainers.decoder.report import curves_plot, export_best, final_rows, write_table
from trainers.decoder.train import fit


@dataclass(kw_only=True)
class DecoderConfig(StoreOptions, ModelOptions, LayerOptions, SeedOptions, ProgressOptions):
    """Train a decoder from stored SAE codes to the frozen model's next-token logits, gated on KL."""

    sae: str = field(
        default="latest",
        metadata={
            "help": "the SAE whose stored codes are the input: latest (the newest of --layer), a saes-table name"
        },
    )
    arch: Literal["linear", "transformer"] = field(
        default="linear",
        metadata={"help": "linear (codes @ W, W from the SAE's W_dec) or transformer (+ a small causal transformer)"},
    )
    n_layers: int = field(default=2, metadata={"help": "--arch transformer: transformer blocks"})
    d_model: int = field(default=256, metadata={"help": "--arch transformer: width of the transformer"})
    kl_weight: float = field(default=1.0, metadata={"help": "loss = CE(true next token) + kl_weight x KL(frozen||dec)"})
    epochs: int = field(default=3, metadata={"help": "passes over the training rows (evaluated after each)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (decoder and residual baseline)"})
    batch_rows: int = field(
        default=4, metadata={"help": "rows per training batch (whole rows: the transformer reads them)"}
    )
    max_train_rows: int = field(default=200, metadata={"help": "the first N train_base rows by row_id"})
    max_eval_rows: int = field(
        default=60, metadata={"help": "the first N eval rows by row_id (and at most N OOD rows)"}
    )
    ood_category: str | None = field(
        default=None, metadata={"help": "a category held out of training; its rows form the OOD split"}
    )
    max_kl: float = field(default=1.5, metadata={"help": "the gate: mean eval KL (nats/token) at most this"})
    gate: Literal["report", "strict"] = field(
        default="report", metadata={"help": "strict: exit 1 when no epoch passes the gate; report: say so"}
    )

    def __post_init__(self) -> None:
        self.layer = self.one_layer("trainers.decoder")
        for name in ("n_layers", "d_model", "epochs", "batch_rows", "max_train_rows", "max_eval_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.d_model % 4:
            raise ValueError(f"--d-model must be a multiple of 4 (the transformer's heads), got {self.d_model}")
        if self.kl_weight < 0 or self.lr <= 0 or self.max_kl <= 0:
            raise ValueError("--kl-weight must be >= 0, --lr and --max-kl > 0")


class DecoderResult(NamedTuple):
    run_id: str
    table: pl.DataFrame
    passed: bool
    best_epoch: int | None
    plot: str


def run_decoder(cfg: DecoderConfig) -> DecoderResult:
    """Check inputs, load the model, fit the decoder and its baselines, record everything."""
    store = Store(cfg.store)
    loaded = load_sae(cfg.sae, "cpu", layer=cfg.layer, store=store)
    if loaded.layer is not None and loaded.layer != cfg.layer:
        raise StoreError(f"SAE {cfg.sae} ({loaded.name}) is of layer {loaded.layer}; pass --layer {loaded.layer}")
    arrays = arrays_for(loaded.name, cfg.layer)
    splits = select_splits(
        store, arrays, loaded.name, max_train=cfg.max_train_rows, max_eval=cfg.max_eval_rows,
        ood_category=cfg.ood_category,
    )  # fmt: skip
    check_inputs(store, arrays, splits, cfg.max_train_rows, cfg.max_eval_rows)
    attrs = dict(open_array(store, arrays.ids).attrs)
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    check_model_hash(lm, attrs, arrays.ids)
    torch.manual_seed(cfg.seed)
    readout = FrozenReadout(*final_norm_and_head(lm.model))
    decoder = build_decoder(cfg.arch, loaded.sae, cfg.n_layers, cfg.d_model)
    residual = ResidualLinear(lm.model.config.hidden_size)
    tz = attrs["tokenization"]
    sae_id = {"sae": loaded.name, "sae_path": loaded.path, "sae_source": loaded.source, "d_sae": loaded.d_sae,
              "k": loaded.k, "architecture": loaded.architecture, "layer": cfg.layer}  # fmt: skip
    record = {**config_dict(cfg), "train_sql": rows_sql(tz, splits.train), "arrays": arrays._asdict(), **sae_id}
    with Run(store, "train_decoder", record, model_id=lm.model_id, model_hash=lm.model_hash, layers=[cfg.layer]) as run:
        t0 = time.perf_counter()
        train_ds = dataset(store, arrays, tz, splits.train, cfg.batch_rows)
        eval_sets = {
            s: [to_batch(b, arrays) for b in dataset(store, arrays, tz, rows, cfg.batch_rows)]
            for s, rows in (("eval", splits.eval), ("ood", splits.ood))
            if rows
        }
        fitted = fit(
            decoder, residual, readout, train_ds, eval_sets, arrays, epochs=cfg.epochs, lr=cfg.lr,
            kl_weight=cfg.kl_weight, max_kl=cfg.max_kl, seed=cfg.seed, progress=cfg.progress,
        )  # fmt: skip
        rows = final_rows(fitted, cfg.epochs, cfg.max_kl)
        name = f"{run.run_id}/decoder_best" if fitted.best else None
        common = {"run_id": run.run_id, "decoder": name, "arch": cfg.arch, "sae": loaded.name, "layer": cfg.layer,
                  "max_kl": cfg.max_kl, "kl_weight": cfg.kl_weight}  # fmt: skip
        table = write_table(store, rows, common, run.run_id)
        meta = {
            "config": config_dict(cfg),
            "view_sql": {"train": rows_sql(tz, splits.train), "eval": rows_sql(tz, splits.eval),
                         "ood": rows_sql(tz, splits.ood) if splits.ood else None},
            "token_rule": "positions with a next token in the row, token_pos > 0",
            "sae_identity": sae_id,
            "store_version": STORE_VERSION,
            "model": lm.model_id,
            "model_hash": lm.model_hash,
            "logits_k": attrs.get("k"),
            "arrays": arrays._asdict(),
        }  # fmt: skip
        best = export_best(run.dir, fitted, meta)
        store.write_json(run.dir / "curves.json", {"curves": fitted.curves, "fixed": fitted.fixed})
        title = (
            f"{cfg.arch} decoder on SAE {loaded.name} layer {cfg.layer}: {len(splits.train)} train rows, "
            f"{len(splits.eval)} eval, {len(splits.ood)} OOD ({cfg.ood_category or 'none'})"
        )
        png = curves_plot(fitted, run.dir / "curves.png", cfg.max_kl, title)
        counts = {"train_rows": len(splits.train), "eval_rows": len(splits.eval), "ood_rows": len(splits.ood),
                  "train_tokens": fitted.train_tokens}  # fmt: skip
        secs = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "seconds": secs,
            **{f"{k}_seconds": v for k, v in fitted.seconds.items()},
            "train_tokens_per_s": fitted.train_tokens / fitted.seconds["train"] if fitted.seconds["train"] else 0.0,
            "passed_gate": fitted.best is not None,
            "best_epoch": fitted.best["epoch"] if fitted.best else None,
            "decoder_best": str(best) if best else None,
            "table": table.to_dicts(),
        }
        run.finish(counts=counts, metrics=metrics)
    return DecoderResult(run.run_id, table, fitted.best is not None, metrics["best_epoch"], str(png))


def print_table(t: pl.DataFrame) -> None:
    head = ("split", "model", "epoch", "CE", "KL", "KL>gate", "acc", "agree", "tokens")
    print("{:<5} {:<11} {:>5} {:>7} {:>7} {:>8} {:>6} {:>6} {:>7}".format(*head))
    for r in t.iter_rows(named=True):
        ep = "" if r["epoch"] is None else str(r["epoch"])
        print(
            f"{r['split']:<5} {r['model']:<11} {ep:>5} {r['ce']:>7.3f} {r['kl']:>7.3f} {r['kl_above_gate']:>8.3f} "
            f"{r['accuracy']:>6.3f} {r['agreement']:>6.3f} {r['n_tokens']:>7}"
        )


@user_errors(StoreError, ValueError, SAELoadError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DecoderConfig, argv, prog="python -m trainers.decoder")
    res = run_decoder(cfg)
    print_table(res.table)
    if res.passed:
        print(f"gate KL <= {cfg.max_kl}: passed; best epoch {res.best_epoch} exported as {res.run_id}/decoder_best")
    else:
        print(f"gate KL <= {cfg.max_kl}: no epoch passed; nothing exported (run {res.run_id})")
    print(f"table decoders (run {res.run_id}); curves {res.plot}")
    return 0 if res.passed or cfg.gate == "report" else 1


if __name__ == "__main__":
    sys.exit(main())
