"""Gradient-norm extraction throughput against its limits, in one run on the same rows and batches.

    python -m bench.gradnorm                                   # embedded SmolLM2, layers 17 24, 48 rows
    python -m bench.gradnorm --rows 8 --layers 2 --model random:smollm2-135m --repeats 1   # smoke run
    python -m bench.gradnorm --model random:smollm2-135m --rows 2000 --layers 17 24 --repeats 2   # on a GPU

Methods, all over the same rows cut into the same batches (the extractor's per-unit,
length-sorted batches, `extractors.hidden.unit_batches`, with gradnorm's batch size):

* `forward`    the whole model, no grad, inputs on the device: the forward-only limit (the
               completion loss needs every block, so this is the floor of any method);
* `hand`       the cheapest correct method written by hand: `extractors.gradnorm.token_grad_norms`
               per batch (detach at the shallowest layer, one `autograd.grad` for all layers,
               parameters frozen, logits only where a supervised token is predicted), no store;
* `extract`    `extractors.gradnorm.extract_gradnorms` end to end into the store (float32 Zarr
               chunks, fsynced, committed per unit, the values table copied);
* `reference`  plain autograd: full model with `output_hidden_states`, `retain_grad` on the
               requested layers, full-vocabulary logits, `loss.backward()` through every block.

Target: extract >= 0.9 x hand. `hand` and `reference` are also compared value by value on the
first batch (max relative difference). Results: a table, a JSON and a PNG bar chart (--out).
The scratch store is a temporary folder unless --store is given.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.common import Bench, BenchOutOptions, ScratchOptions, ingest_rows, load_bench_model, print_table
from bench.extract.run import _clear_arrays
from extractors.chat_tokens import ensure_tokenization
from extractors.forward import pad_batch, validate_layers
from extractors.gradnorm import (
    extract_gradnorms,
    gradnorm_array_name,
    reference_grad_norms,
    row_tokens,
    token_grad_norms,
)
from extractors.hidden import unit_batches
from extractors.model import decoder_layers, pad_token_id
from extractors.pipeline import ExtractConfig
from extractors.units import plan_work, select_rows
from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    StoreOptions,
    parse_config,
    user_errors,
)
from store.core import Store
from trainers.plots import bar_chart

METHODS = ("forward", "hand", "extract", "reference")


@dataclass
class BenchGradnormConfig(StoreOptions, ModelOptions, LayerOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Measure gradient-norm tokens/s against the forward pass, a hand-written loop and plain autograd.

    --model also takes random:smollm2-135m / random:llama-1b (random init of that shape); one
    backward gives the norms of all --layers. --store is a scratch store (default: a temporary
    folder): the benchmark deletes the gradnorm arrays it measures."""

    store: str | None = None
    layers: list[int] = field(default_factory=lambda: [17, 24])
    progress: bool = False
    rows: int = field(default=48, metadata={"help": "rows of the embedded sample (the first N by row_id)"})
    batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "padded tokens per batch (default as extractors.run --kinds gradnorm: 2048 on CPU, 32768 on GPU)"
        },
    )
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit of the scratch store"})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": f"what to measure, among {', '.join(METHODS)}"}
    )
    repeats: int = field(default=1, metadata={"help": "rounds over all methods; each method's fastest round counts"})

    def __post_init__(self) -> None:
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ValueError(f"--methods {bad[0]!r} is not one of {', '.join(METHODS)}")
        if self.rows < 1 or self.repeats < 1:
            raise ValueError("--rows and --repeats must be at least 1")


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Setup:
    def __init__(self, cfg: BenchGradnormConfig, store: Store):
        self.lm = load_bench_model(cfg.model, cfg.device, cfg.compute_dtype, cfg.model_cache)
        self.layers = validate_layers(cfg.layers, len(decoder_layers(self.lm.model)), self.lm.model_id)
        self.names = [gradnorm_array_name(L) for L in self.layers]
        self.layout = ensure_tokenization(
            store, self.lm.tokenizer, self.lm.model_id, cfg.unit_tokens, progress=cfg.progress
        )
        self.selected = select_rows(store, "all", cfg.rows)
        _clear_arrays(store, self.names)
        work = plan_work(self.layout, self.selected, self.names, 0, 1, store)
        self.batch_tokens = cfg.batch_tokens or (32768 if self.lm.device.type == "cuda" else 2048)
        self.batches = [b for w in work for b in unit_batches(self.layout, w.rows, self.batch_tokens)]
        toks = row_tokens(store, self.layout.tokenization, [self.layout.row_ids[i] for w in work for i in w.rows])
        pad, dev = pad_token_id(self.lm.tokenizer), self.lm.device
        self.inputs = []
        for b in self.batches:
            rows = [toks[self.layout.row_ids[i]] for i in b.rows]
            sup = torch.zeros((len(rows), b.width), dtype=torch.bool)
            for j, (_, s) in enumerate(rows):
                sup[j, : len(s)] = torch.as_tensor(s)
            self.inputs.append((pad_batch([ids for ids, _ in rows], b.width, pad, dev), sup.to(dev)))
        self.tokens = sum(sum(b.lengths) for b in self.batches)
        self.units = len(work)


def _timed(s: _Setup, step) -> dict[str, Any]:
    x, sup = s.inputs[0]
    step(x[:1, :16], sup[:1, :16])  # warm-up, not timed
    _sync(s.lm.device)
    t0 = time.perf_counter()
    for x, sup in s.inputs:
        step(x, sup)
    _sync(s.lm.device)
    return {"seconds": time.perf_counter() - t0, "tokens": s.tokens}


def _measure(cfg: BenchGradnormConfig, s: _Setup, store: Store) -> dict[str, dict[str, Any]]:
    """Every method, in rounds; each method's fastest round is kept."""
    model = s.lm.model
    ecfg = ExtractConfig(
        layers=s.layers,
        store=str(store.root),
        model=cfg.model,
        kinds=["gradnorm"],
        batch_tokens=s.batch_tokens,
        unit_tokens=cfg.unit_tokens,
        progress=cfg.progress,
    )

    @torch.inference_mode()
    def forward(x: Any, sup: Any) -> Any:
        return model(input_ids=x, use_cache=False)

    steps = {
        "forward": forward,
        "hand": lambda x, sup: token_grad_norms(model, x, sup, s.layers),
        "reference": lambda x, sup: reference_grad_norms(model, x, sup, s.layers),
    }
    results: dict[str, dict[str, Any]] = {}
    for rnd in range(cfg.repeats):
        for m in [m for m in METHODS if m in cfg.methods]:
            print(f"measuring {m}" + (f" (round {rnd + 1})" if cfg.repeats > 1 else "") + " ...", flush=True)
            if m == "extract":
                _clear_arrays(store, s.names)
                store.drop_table("token_gradnorm_values")
                t0 = time.perf_counter()
                res = extract_gradnorms(store, ecfg, s.lm, s.layout, s.selected, run_extra={"bench": True})
                r = {"seconds": time.perf_counter() - t0, "tokens": res.tokens}
                if res.tokens != s.tokens:
                    raise RuntimeError(f"the extractor ran {res.tokens} tokens, the benchmark planned {s.tokens}")
            else:
                r = _timed(s, steps[m])
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            if m not in results or r["seconds"] < results[m]["seconds"]:
                results[m] = r
    return results


def _summarize(cfg: BenchGradnormConfig, s: _Setup, results: dict[str, dict[str, Any]]) -> tuple[dict, str]:
    """The ratios, the hand vs reference agreement; prints and returns the table."""
    model = s.lm.model
    x, sup = s.inputs[0]
    agree = None
    if {"hand", "reference"} <= set(cfg.methods):
        a, b = token_grad_norms(model, x, sup, s.layers), reference_grad_norms(model, x, sup, s.layers)
        agree = max(float((a[L] - b[L]).abs().max() / b[L].abs().max().clamp(min=1e-12)) for L in s.layers)
    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    ratio = lambda a, b: tps[a] / tps[b] if a in tps and b in tps else None  # noqa: E731
    summary = {
        "extract_over_hand": ratio("extract", "hand"),
        "extract_over_forward": ratio("extract", "forward"),
        "extract_over_reference": ratio("extract", "reference"),
        "hand_over_reference": ratio("hand", "reference"),
        "max_relative_difference_hand_vs_reference": agree,
        "target": "extract >= 0.9 x hand",
    }
    rows = [
        {
            "method": m,
            "tok/s": tps[m],
            "seconds": results[m]["seconds"],
            "vs forward": tps[m] / tps["forward"] if "forward" in tps else None,
        }
        for m in results
    ]
    text = print_table(
        rows,
        [
            ("method", "method", ""),
            ("tok/s", "tokens/s", ",.0f"),
            ("seconds", "s", ".2f"),
            ("vs forward", "x forward", ".3f"),
        ],
    )
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
    return summary, text


def run_bench(cfg: BenchGradnormConfig) -> dict[str, Any]:
    with Bench("gradnorm", cfg.store, cfg.out, keep=cfg.keep_store) as bench:
        store = bench.store
        ingest_rows(store, cfg.rows, cfg.model, cfg.progress)
        s = _Setup(cfg, store)
        print(
            f"model {s.lm.model_id} on {s.lm.device}; {len(s.selected)} rows, {s.tokens:,} tokens, "
            f"{len(s.batches)} batches; layers {s.layers}"
        )
        results = _measure(cfg, s, store)
        summary, text = _summarize(cfg, s, results)
        tps = {m: r["tokens_per_s"] for m, r in results.items()}
        result = {
            **bench.header(cfg, s.lm.device),
            "model": {"id": s.lm.model_id, "device": str(s.lm.device), "dtype": str(s.lm.dtype).replace("torch.", "")},
            "layers": s.layers,
            "rows": len(s.selected),
            "tokens": s.tokens,
            "batches": len(s.batches),
            "batch_tokens": s.batch_tokens,
            "methods": results,
            "summary": summary,
            "table": text,
            "torch_threads": torch.get_num_threads(),
        }
        bench.write(
            result,
            bench.path(cfg.model, s.lm.device.type),
            lambda png: bar_chart(
                png,
                list(tps),
                list(tps.values()),
                f"gradient norms, layers {s.layers}, {s.lm.device}, {s.tokens:,} tokens",
                "tokens / s",
                {"forward only": tps.get("forward", 0.0)},
            ),
        )
        return json.loads(json.dumps(result, default=str))


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchGradnormConfig, argv, prog="python -m bench.gradnorm"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
