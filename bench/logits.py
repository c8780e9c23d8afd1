"""Benchmark: the logits kind's extraction rate beside hidden states alone, and decoder training
tokens/s from sparse codes vs a dense-input PyTorch loop.

    python -m bench.logits                                  # embedded model, 16 eval rows, scratch store
    python -m bench.logits --rows 40 --layer 17 --out bench_out/logits.json

Extraction (the same rows, each case on a fresh copy of one ingested + tokenized scratch store,
through `python -m extractors.run`'s library call): hidden layer L alone (the forward stops after
block L), hidden of the last block alone (the full depth, without the head), logits alone, and
hidden L + logits in one pass. Ratios: each case's end-to-end tokens/s over hidden-L-alone's (the
issue's target: >= 0.9) and logits over full-depth hidden (what the head and top-k cost on top of
the same blocks).

Decoder training: the linear decoder of trainers.decoder on the stored codes of an untrained TopK
SAE (its codes extracted from the stored states), `--steps` batches of `--batch-rows` rows: ours
reads each batch from the store as a sparse COO tensor (store.loaders) and multiplies sparsely;
the reference densifies every token's codes into one in-memory [tokens, d_sae] float32 tensor
first (the plain PyTorch loop) and multiplies densely. Same loss (CE + KL from the stored top k),
same read-out; ratio = ours / dense (target >= 1.0). Prints a table; writes JSON (+ PNG).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import Bench, BenchOutOptions
from extractors.ingest import IngestConfig, run_ingest
from extractors.logits import final_norm_and_head
from extractors.model import load_model
from extractors.pipeline import ExtractConfig, run_extraction
from store.cli import LayerOptions, ModelOptions, parse_config, user_errors
from store.core import Store, StoreError
from trainers.decoder.data import arrays_for, dataset, to_batch
from trainers.decoder.models import FrozenReadout, LinearDecoder
from trainers.decoder.train import loss_of
from trainers.plots import bar_chart


@dataclass(kw_only=True)
class LogitsBenchConfig(ModelOptions, LayerOptions, BenchOutOptions):
    """Logits extraction rate vs hidden states alone; decoder training from sparse vs dense codes."""

    rows: int = field(default=16, metadata={"help": "eval rows of the embedded sample extracted in every case"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per extraction batch (every case)"})
    steps: int = field(default=6, metadata={"help": "decoder training batches timed per loop"})
    batch_rows: int = field(default=2, metadata={"help": "rows per decoder batch"})

    def __post_init__(self) -> None:
        self.layers = self.layers or [17]  # the layer the embedded default's SAE and probe use
        self.layer = self.one_layer("bench.logits")
        if self.rows <= 0 or self.steps <= 0 or self.batch_rows <= 0:
            raise ValueError("--rows, --steps and --batch-rows must be positive")


def _extract(root: str, cfg: LogitsBenchConfig, kinds: list[str], layers: list[int], **kw: Any) -> Any:
    return run_extraction(
        ExtractConfig(
            store=root, model=cfg.model, device=cfg.device, kinds=kinds, layers=layers, split="eval",
            max_rows=cfg.rows, batch_tokens=cfg.batch_tokens, progress=False, model_cache=cfg.model_cache, **kw,
        )
    )  # fmt: skip


def extraction_cases(bench: Bench, cfg: LogitsBenchConfig) -> tuple[list[dict[str, Any]], str]:
    base = bench.store.root
    run_ingest(
        IngestConfig(store=str(base), model=cfg.model, train_base=8, attr_query=2, eval=cfg.rows), progress=False
    )
    _extract(str(base), cfg, ["hidden"], [0])  # tokenizes once (and warms the model cache)
    n_layers = int(load_model(cfg.model, "cpu").model.config.num_hidden_layers)
    cases = [
        (f"hidden layer {cfg.layer}", ["hidden"], [cfg.layer]),
        (f"hidden layer {n_layers - 1} (full depth)", ["hidden"], [n_layers - 1]),
        ("logits", ["logits"], []),
        (f"hidden {cfg.layer} + logits, one pass", ["hidden", "logits"], [cfg.layer]),
    ]
    out, keep = [], ""
    for name, kinds, layers in cases:
        dst = base.parent / f"case{len(out)}"
        shutil.copytree(base, dst)
        res = _extract(str(dst), cfg, kinds, layers)
        tps = res.tokens_per_s if hasattr(res, "tokens_per_s") else res.metrics["tokens_per_s"]
        out.append({"case": name, "tokens": res.tokens, "seconds": res.seconds, "tokens_per_s": tps})
        if kinds == ["hidden", "logits"]:
            keep = str(dst)
        else:
            shutil.rmtree(dst)
    ref = out[0]["tokens_per_s"]
    for r in out:
        r["vs_hidden_L"] = r["tokens_per_s"] / ref if ref else 0.0
    return out, keep


def decoder_cases(root: str, cfg: LogitsBenchConfig) -> list[dict[str, Any]]:
    from sae_lens import TopKSAE, TopKSAEConfig

    store = Store(root)
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype)
    d = int(lm.model.config.hidden_size)
    torch.manual_seed(0)
    sae_dir = store.root.parent / "bench_sae"
    TopKSAE(TopKSAEConfig(d_in=d, d_sae=4 * d, k=32)).save_model(str(sae_dir))
    _extract(root, cfg, ["sae"], [cfg.layer], sae=str(sae_dir))
    name = store.query("SELECT sae FROM saes").column(0)[0].as_py()
    arrays = arrays_for(name, cfg.layer)
    tz = store.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    rows = store.query("SELECT row_id FROM split_members WHERE split = 'eval' ORDER BY row_id").column(0).to_pylist()
    ds = dataset(store, arrays, tz, rows[: cfg.rows], cfg.batch_rows)
    readout = FrozenReadout(*final_norm_and_head(lm.model))
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    steps = [i % len(ds) for i in range(cfg.steps)]

    def timed(step_fn) -> tuple[float, int]:
        step_fn(steps[0])  # warm-up
        t0, n = time.perf_counter(), 0
        for i in steps:
            n += step_fn(i)
        return time.perf_counter() - t0, n

    sparse_dec = LinearDecoder(sae.W_dec, sae.b_dec)
    opt = torch.optim.AdamW(sparse_dec.parameters(), lr=1e-4)

    def ours(i: int) -> int:
        b = to_batch(ds[i], arrays)
        opt.zero_grad()
        loss_of(sparse_dec, readout, b, 1.0).backward()
        opt.step()
        return len(b.target)

    # the dense loop: every batch's codes densified up front, as a plain PyTorch script would
    dense_batches = []
    for i in range(len(ds)):
        b = to_batch(ds[i], arrays)
        dense_batches.append(b._replace(codes=b.codes.to_dense()))
    dense_dec = LinearDecoder(sae.W_dec, sae.b_dec)
    dopt = torch.optim.AdamW(dense_dec.parameters(), lr=1e-4)
    dense_dec.embed = lambda x: x @ dense_dec.W + dense_dec.b  # dense matmul

    def dense(i: int) -> int:
        b = dense_batches[i]
        dopt.zero_grad()
        loss_of(dense_dec, readout, b, 1.0).backward()
        dopt.step()
        return len(b.target)

    out = []
    for name_, fn in (("sparse codes from the store (trainers.decoder)", ours), ("dense in-memory codes", dense)):
        secs, n = timed(fn)
        out.append({"case": name_, "tokens": n, "seconds": secs, "tokens_per_s": n / secs})
    out[0]["vs_dense"] = out[0]["tokens_per_s"] / out[1]["tokens_per_s"]
    out[1]["vs_dense"] = 1.0
    return out


def run(cfg: LogitsBenchConfig) -> dict[str, Any]:
    with Bench("logits", None, cfg.out) as bench:
        ext, keep = extraction_cases(bench, cfg)
        dec = decoder_cases(keep, cfg)
        result = {**bench.header(cfg), "extraction": ext, "decoder": dec}
        print(f"{'extraction case':<40} {'tokens':>7} {'tok/s':>9} {'vs hidden L':>11}")
        for r in ext:
            print(f"{r['case']:<40} {r['tokens']:>7} {r['tokens_per_s']:>9,.0f} {r['vs_hidden_L']:>11.2f}")
        full = next(r for r in ext if "full depth" in r["case"])["tokens_per_s"]
        lg = next(r for r in ext if r["case"] == "logits")["tokens_per_s"]
        result["logits_vs_full_depth_hidden"] = lg / full if full else 0.0
        print(f"logits vs full-depth hidden: {result['logits_vs_full_depth_hidden']:.2f}")
        print(f"{'decoder training':<48} {'tokens':>7} {'tok/s':>9} {'vs dense':>8}")
        for r in dec:
            print(f"{r['case']:<48} {r['tokens']:>7} {r['tokens_per_s']:>9,.0f} {r['vs_dense']:>8.2f}")
        path = bench.path()
        bench.write(
            result,
            path,
            lambda png: bar_chart(
                png, [r["case"] for r in ext + dec], [r["tokens_per_s"] for r in ext + dec], "logits bench", "tok/s"
            ),
        )
    return result


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    run(parse_config(LogitsBenchConfig, argv, prog="python -m bench.logits"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
