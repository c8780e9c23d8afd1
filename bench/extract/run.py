"""Extraction throughput against its limits, in one run on one model, rows and batches.

    python -m bench.extract                                   # embedded SmolLM2, layer 17, 200 rows
    python -m bench.extract --rows 40 --disk-mb 64            # CPU-sized smoke run
    python -m bench.extract --rows 40 --threads 1 --profile --methods packed forward_windows saelens
                                                              # where each method's time goes
    python -m bench.extract --model random:smollm2-135m --rows 20000 --unit-tokens 65536 --repeats 2
    python -m bench.extract --model random:llama-1b --layers 15 --rows 8000 --unit-tokens 65536 --repeats 2

(the last two on a GPU: batches never span a unit, so GPU runs want larger units).

Methods, all over the same rows cut into the same batches (the extractor's own per-unit,
length-sorted batches, `extractors.hidden.unit_batches`):

* `forward`   the model alone, stopped after the deepest requested layer (inputs already on
              the device), over right-padded batches (`--pack off`'s path);
* `packed`    the same over packed batches (`extractors.hidden.unit_packs`, each unit's rows end to
              end without padding, per-row positions and attention: extractors.packing), the
              extractor's default path: the compute limit;
* `extract`   `extractors.hidden.extract_hidden` end to end into the store (bf16 Zarr
              chunks, fsynced, committed per unit; packed where the model allows, as by default);
* `naive`     what users write today: `model(x, output_hidden_states=True)`, `.cpu()`,
              `np.save` per batch and layer (full forward, padded, fp32, no fsync);
* `saelens`   SAELens' `CacheActivationsRunner` on the same model (it reads fixed-length
              windows, so the same tokens are concatenated and cut into --saelens-context
              windows; one hook, the deepest layer; its default float32 Arrow cache);
* `forward_windows`  the forward-only limit on those windows: packed windows have no
              padding and shorter attention spans than whole rows (and rows leak into each
              other's context), so SAELens is compared with its own limit as well;
* `forward_full` (opt-in) the whole model with logits: the naive approach's limit.

Per method the table gives the padding fraction, the token slots the dense layers run on and the
query-key pairs attention computes, both per real token (`extractors.packing.attention_cost`; a
row alone needs L(L+1)/2 pairs, a window of C tokens C(C+1)/2 across its rows).

`--profile` runs each method once more under torch.profiler and prints their top ops side by
side (bench/extract/profile.py), with each call's process CPU time, kernel share and page faults;
`--threads 1` lets a loaded shared CPU hurt every method alike. `--malloc default` keeps glibc's
allocator defaults instead of the extractor's CPU setting (extractors/model.py (keep_freed_memory)), for the
whole process: run it once with each value to A/B that setting.

The disk's write bandwidth is measured in the same run on the store's filesystem, so
`disk limit = write GB/s / bytes per token` tells whether extraction is disk-bound. The
goal on a GPU: extract >= 0.9 x min(forward, disk limit). Results: a table, a JSON and a
PNG bar chart (--out). The scratch store is a temporary folder unless --store is given.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal
from unittest import mock

import numpy as np
import torch

from bench.common import (
    Bench,
    BenchOutOptions,
    ScratchOptions,
    disk_write_bandwidth,
    folder_bytes,
    ingest_rows,
    load_bench_model,
    print_table,
)
from bench.extract.profile import OpProfile, op_table, profiled
from extractors.chat_tokens import ensure_tokenization
from extractors.forward import LayerCapture, pad_batch, padding_fraction, validate_layers
from extractors.hidden import HiddenSpec, extract_hidden, unit_batches, unit_packs
from extractors.model import decoder_layers, keep_freed_memory, pad_token_id
from extractors.packing import PackedForward, attention_cost, use_packing
from extractors.units import plan_work, select_rows
from store.arrays import UNITS_TABLE, array_key
from store.catalog.tokens import row_token_ids
from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    StoreOptions,
    config_dict,
    parse_config,
    user_errors,
)
from store.core import Store
from trainers.plots import bar_chart

METHODS = ("forward", "packed", "extract", "naive", "forward_full", "forward_windows", "saelens")


@dataclass
class BenchExtractConfig(StoreOptions, ModelOptions, LayerOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Measure extraction tokens/s against the forward pass, the naive approach, SAELens and the disk.

    --model also takes random:smollm2-135m / random:llama-1b (random init of that shape, no
    weights). --layers are extracted in one pass. --store is a scratch store (ingested on first
    use; default: a temporary folder): the benchmark deletes and rewrites the hidden arrays it
    measures, and refuses a store whose arrays were written by anything else."""

    store: str | None = None
    layers: list[int] = field(default_factory=lambda: [17])
    rows: int = field(
        default=200,
        metadata={"help": "rows of the embedded sample to run (the first N by row_id)", "aliases": ["--max-rows"]},
    )
    batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "padded tokens per batch (default as "
            "extractors.run: 8192 on CPU, 131072 on GPU; batches never span units)"
        },
    )
    unit_tokens: int = field(
        default=16384,
        metadata={
            "help": "token slots per unit when the scratch store is tokenized (batches are formed within a unit)"
        },
    )
    methods: list[str] = field(
        default_factory=lambda: ["forward", "packed", "extract", "naive", "forward_windows", "saelens"],
        metadata={"help": f"what to measure, among {', '.join(METHODS)}"},
    )
    repeats: int = field(
        default=1,
        metadata={
            "help": "rounds over all methods; each method's fastest round is "
            "reported (rounds interleave the methods, so a busy shared CPU penalises them alike)"
        },
    )
    disk_mb: int = field(default=256, metadata={"help": "MB written + fsynced by the disk probe"})
    saelens_context: int = field(default=256, metadata={"help": "SAELens window length (tokens)"})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads for every method (default: torch's own, all cores); 1 makes a "
            "loaded shared CPU hurt the methods alike"
        },
    )
    profile: bool = field(
        default=False,
        metadata={
            "help": "after the timed rounds, run each method once more under torch.profiler and print "
            "its top ops by self CPU time side by side (ms per 1k tokens, share; bench/extract/profile.py)"
        },
    )
    profile_top: int = field(default=10, metadata={"help": "ops per method in the --profile table"})
    malloc: Literal["keep", "default"] = field(
        default="keep",
        metadata={
            "help": "CPU: keep freed memory for reuse as the extractor does (extractors.model.keep_freed_memory), or "
            "glibc's defaults (page faults every layer); for the whole process, so every method alike"
        },
    )

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods {bad[0]!r} is not one of {', '.join(METHODS)}")
        for name in ("rows", "repeats", "disk_mb", "saelens_context", "unit_tokens", "profile_top"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            raise ValueError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be positive, got {self.threads} (omit it for torch's default)")


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_arrays(store: Store, names: list[str]) -> None:
    """Delete the arrays a previous benchmark left, refusing arrays a real run wrote."""
    if store.has_table("arrays"):
        con = store.connect()
        try:
            owners = con.sql(
                "SELECT a.name, r.config FROM arrays a LEFT JOIN runs r ON r.run_id = a.created_by_run "
                "WHERE a.name IN (SELECT unnest($n))",
                params={"n": names},
            ).fetchall()
        finally:
            con.close()
        for name, config in owners:
            if '"bench": true' not in (config or ""):
                raise ValueError(
                    f"--store {store.root} holds {name} written by a real extraction; the benchmark "
                    "would overwrite it. Pass a scratch --store (or none: a temporary one)"
                )
    for name in names:
        shutil.rmtree(store.array_path(name), ignore_errors=True)
        shutil.rmtree(store.table_dir(UNITS_TABLE) / array_key(name), ignore_errors=True)
        store.delete_part("arrays", array_key(name))


class _Setup:
    """Everything the methods share: model, layout, units, batches, token ids."""

    def __init__(self, cfg: BenchExtractConfig, store: Store):
        self.lm = load_bench_model(cfg.model, cfg.device, cfg.compute_dtype, cfg.model_cache)
        self.layers = validate_layers(cfg.layers, len(decoder_layers(self.lm.model)), self.lm.model_id)
        self.names = [f"hidden/layer_{L}" for L in self.layers]
        self.layout = ensure_tokenization(
            store, self.lm.tokenizer, self.lm.model_id, cfg.unit_tokens, progress=cfg.progress
        )
        self.selected = select_rows(store, "all", cfg.rows)
        _clear_arrays(store, self.names)
        self.work = plan_work(self.layout, self.selected, self.names, 0, 1, store)
        self.batch_tokens = cfg.batch_tokens or (131072 if self.lm.device.type == "cuda" else 8192)
        self.batches = [b for w in self.work for b in unit_batches(self.layout, w.rows, self.batch_tokens)]
        rows = [self.layout.row_ids[i] for w in self.work for i in w.rows]
        ids = row_token_ids(store, self.layout.tokenization, rows)
        self.ids = [[ids[self.layout.row_ids[i]] for i in b.rows] for b in self.batches]
        self.tokens = sum(sum(b.lengths) for b in self.batches)
        self.padding = padding_fraction(self.batches)
        self.packs = [b for w in self.work for b in unit_packs(self.layout, w.rows, self.batch_tokens)]
        self.pack_ids = [[ids[self.layout.row_ids[i]] for i in b.rows] for b in self.packs]
        self.extract_packs = use_packing(self.lm.model, "auto")
        self.pad_id = pad_token_id(self.lm.tokenizer)
        self.d_model = self.lm.model.config.hidden_size

    def inputs(self):
        return [
            pad_batch(ids, b.width, self.pad_id, self.lm.device) for ids, b in zip(self.ids, self.batches, strict=False)
        ]


def _forward(s: _Setup, full: bool) -> dict[str, Any]:
    xs = s.inputs()
    with nullcontext() if full else LayerCapture(s.lm.model, s.layers) as cap, torch.inference_mode():
        step = (lambda x: s.lm.model(input_ids=x, use_cache=False)) if full else cap.capture
        step(xs[0][:1, :16])  # warm-up (kernels, allocator), not timed
        _sync(s.lm.device)
        t0 = time.perf_counter()
        for x in xs:
            step(x)
        _sync(s.lm.device)
    secs = time.perf_counter() - t0
    what = "whole model with logits" if full else f"stops after layer {s.layers[-1]}"
    return {"seconds": secs, "tokens": s.tokens, "note": f"{what}; inputs already on the device"}


def _packed(s: _Setup) -> dict[str, Any]:
    """Forward-only over the extractor's packed batches (what `extract` runs by default)."""
    if not use_packing(s.lm.model, "auto"):
        return {"skipped": f"not run: {type(s.lm.model).__name__} cannot pack (extractors.packing)"}
    with PackedForward(s.lm.model, s.layers) as fwd:
        fwd.run([s.pack_ids[0][0][:16]], s.lm.device)  # warm-up, not timed
        _sync(s.lm.device)
        t0 = time.perf_counter()
        for ids in s.pack_ids:
            fwd.run(ids, s.lm.device)
        _sync(s.lm.device)
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "tokens": s.tokens,
        "note": f"packed: {len(s.packs)} batches, no padding, per-row positions and causal attention; "
        f"stops after layer {s.layers[-1]}; token ids -> device included",
    }


def _costs(m: str, s: _Setup, ctx: int) -> dict[str, float]:
    """Padding and attention cost per real token of a method's batches (module docstring)."""
    if m in ("saelens", "forward_windows"):
        return {"padding": 0.0, "dense_slots_per_token": 1.0, "attention_pairs_per_token": (ctx + 1) / 2}
    packed = m == "packed" or (m == "extract" and s.extract_packs)
    cost = attention_cost(s.packs if packed else s.batches, packed)
    return {"padding": 0.0 if packed else s.padding, **cost}


def _extract(s: _Setup, cfg: BenchExtractConfig, store: Store) -> dict[str, Any]:
    _clear_arrays(store, s.names)  # the previous round's arrays
    t0 = time.perf_counter()
    res = extract_hidden(
        store,
        s.lm,
        s.layout,
        s.selected,
        HiddenSpec(s.layers, "bf16"),
        batch_tokens=s.batch_tokens,
        run_config={"bench": True, **config_dict(cfg)},
        progress=cfg.progress,
    )
    secs = time.perf_counter() - t0
    if res.tokens != s.tokens:
        raise RuntimeError(f"the extractor ran {res.tokens} tokens, the benchmark planned {s.tokens}")
    m = json.loads(store.query("SELECT metrics FROM runs WHERE run_id = ?", [res.run_id]).column(0)[0].as_py())
    disk = sum(folder_bytes(store.array_path(n)) for n in s.names)
    return {
        "seconds": secs,
        "tokens": s.tokens,
        "bytes_per_token": disk / s.tokens,
        "payload_bytes_per_token": 2 * s.d_model * len(s.layers),
        "forward_seconds_inside": m["forward_seconds"],
        "writer_seconds": m["writer_seconds"],
        "overhead_beyond_forward": 1 - m["forward_seconds"] / secs,
        "writer_threads": m.get("writer_threads"),
        "writer_tokens_per_s": s.tokens / m["writer_seconds"] if m["writer_seconds"] else None,
        "note": f"end to end ({'packed' if s.extract_packs else 'padded'}): bf16 Zarr chunks, fsync + "
        "commit per unit, run record",
    }


def _naive(s: _Setup, store: Store) -> dict[str, Any]:
    folder = store.run_dir("bench-naive")
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    xs = s.inputs()
    _sync(s.lm.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, x in enumerate(xs):
            out = s.lm.model(input_ids=x, output_hidden_states=True, use_cache=False)
            for L in s.layers:
                h = out.hidden_states[L + 1].cpu()
                np.save(folder / f"batch{k:05d}_layer{L}.npy", h.float().numpy())
    secs = time.perf_counter() - t0
    size = folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "seconds": secs,
        "tokens": s.tokens,
        "bytes_per_token": size / s.tokens,
        "note": "output_hidden_states=True (full forward), .cpu(), np.save per batch: padded fp32, no fsync",
    }


def _windows(s: _Setup, ctx: int) -> tuple[list[list[int]], int]:
    """The benchmark's tokens concatenated and cut into ctx-token windows, as SAELens reads
    them, trimmed to whole batches of the same padded size as ours; returns (windows, batch)."""
    flat = [t for ids in s.ids for row in ids for t in row]
    n_seq = len(flat) // ctx
    bs = max(1, min(s.batch_tokens // ctx, n_seq))
    n_seq -= n_seq % bs
    return [flat[i * ctx : (i + 1) * ctx] for i in range(n_seq)], bs


def _forward_windows(s: _Setup, cfg: BenchExtractConfig) -> dict[str, Any]:
    """Forward-only over SAELens' packed windows: the compute limit of `saelens`."""
    windows, bs = _windows(s, cfg.saelens_context)
    if not windows:
        return {"skipped": f"not run: fewer tokens ({s.tokens}) than one --saelens-context window"}
    xs = [torch.tensor(windows[i : i + bs], device=s.lm.device) for i in range(0, len(windows), bs)]
    with LayerCapture(s.lm.model, s.layers) as cap, torch.inference_mode():
        cap.capture(xs[0][:1, :16])
        _sync(s.lm.device)
        t0 = time.perf_counter()
        for x in xs:
            cap.capture(x)
        _sync(s.lm.device)
    return {
        "seconds": time.perf_counter() - t0,
        "tokens": len(windows) * cfg.saelens_context,
        "note": f"forward only over saelens' {cfg.saelens_context}-token windows (batch {bs}): no padding, "
        "and rows share windows, so attention spans row boundaries (not the per-row computation)",
    }


def _saelens(s: _Setup, cfg: BenchExtractConfig, store: Store) -> dict[str, Any]:
    """SAELens' CacheActivationsRunner over the same tokens (see the module docstring)."""
    try:  # lazy: optional here (the method reports itself skipped without sae-lens); datasets is heavy
        from datasets import Dataset
        from sae_lens import CacheActivationsRunner
        from sae_lens.config import CacheActivationsRunnerConfig
        from sae_lens.load_model import HookedProxyLM
    except ImportError as e:
        return {"skipped": f"not run: sae-lens is not importable ({e})"}
    ctx = cfg.saelens_context
    windows, bs = _windows(s, ctx)
    if not windows:
        return {"skipped": f"not run: fewer tokens ({s.tokens}) than one --saelens-context window ({ctx})"}
    n_seq = len(windows)
    bpt = 4 * s.d_model  # its default cache dtype: float32
    n_batches = n_seq // bs
    per_buffer = max(k for k in range(1, n_batches + 1) if n_batches % k == 0 and (k == 1 or k * bs * ctx * bpt <= 2e9))
    ds = Dataset.from_dict({"input_ids": windows})
    out = store.run_dir("bench-saelens")
    shutil.rmtree(out)
    hook = f"model.layers.{s.layers[-1]}"
    sl_cfg = CacheActivationsRunnerConfig(
        dataset_path="bench-rows",
        model_name=s.lm.model_id,
        model_class_name="AutoModelForCausalLM",
        hook_name=hook,
        d_in=s.d_model,
        context_size=ctx,
        model_batch_size=bs,
        training_tokens=n_seq * ctx,
        buffer_size_gb=(per_buffer * bs * ctx * bpt + bs * ctx * bpt // 2) / 1e9,
        new_cached_activations_path=str(out),
        device=str(s.lm.device),
        prepend_bos=False,
        model_kwargs={},
        model_from_pretrained_kwargs={},
    )
    # SAELens loads AutoModelForCausalLM by name and wraps it in HookedProxyLM. We hand it the
    # model already in memory (same weights; random-init shapes have no folder; load time is
    # excluded for every method) and remove the hooks it adds to every submodule afterwards.
    before = {id(m): set(m._forward_hooks) for m in s.lm.model.modules()}
    try:
        with mock.patch(
            "sae_lens.cache_activations_runner.load_model", lambda **kw: HookedProxyLM(s.lm.model, s.lm.tokenizer)
        ):
            t0 = time.perf_counter()
            runner = CacheActivationsRunner(sl_cfg, override_dataset=ds)
            result = runner.run()
            secs = time.perf_counter() - t0
        written = len(result) * ctx
        size = folder_bytes(out)
    finally:
        for m in s.lm.model.modules():
            for k in set(m._forward_hooks) - before.get(id(m), set()):
                del m._forward_hooks[k]
        shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": secs,
        "tokens": written,
        "bytes_per_token": size / written,
        "note": f"CacheActivationsRunner, {hook}, {ctx}-token windows of the same tokens, batch {bs}, "
        "float32 Arrow shards, shuffled (its default); no padding",
    }


def _summarize(results: dict[str, dict[str, Any]], s: _Setup, disk: dict[str, float], ctx: int) -> tuple[dict, str]:
    """Rates, ratios, the disk limit and the goal; prints and returns the table."""
    fwd = results.get("forward", {}).get("seconds")
    fwd_tps = s.tokens / fwd if fwd else None
    for r in results.values():
        if "seconds" in r:
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["vs_forward"] = r["tokens_per_s"] / fwd_tps if fwd_tps else None
    ours = results.get("extract", {})
    bpt = ours.get("bytes_per_token", 2 * s.d_model * len(s.layers))
    disk_limit = disk["write_GBps"] * 1e9 / bpt
    summary: dict[str, Any] = {
        "disk_write_GBps": disk["write_GBps"],
        "bytes_per_token": bpt,
        "disk_limit_tokens_per_s": disk_limit,
        "forward_tokens_per_s": fwd_tps,
        "padding_fraction": s.padding,
        "packed_batches": len(s.packs),
        **{f"padded_{k}": v for k, v in attention_cost(s.batches, False).items()},
        **{f"packed_{k}": v for k, v in attention_cost(s.packs, True).items()},
    }
    tps = {m: r["tokens_per_s"] for m, r in results.items() if "tokens_per_s" in r}
    for a, b in (("packed", "saelens"), ("packed", "forward_windows"), ("packed", "forward"), ("extract", "packed")):
        if a in tps and b in tps:
            summary[f"{a}_vs_{b}"] = tps[a] / tps[b]
    if "tokens_per_s" in ours:
        limit = min(x for x in (fwd_tps, disk_limit) if x)
        summary |= {
            "extract_tokens_per_s": ours["tokens_per_s"],
            "goal_tokens_per_s": 0.9 * limit,
            "extract_vs_limit": ours["tokens_per_s"] / limit,
            "extract_overhead_vs_forward": 1 - ours["tokens_per_s"] / fwd_tps if fwd_tps else None,
            "extract_overhead_beyond_own_forward": ours["overhead_beyond_forward"],
            "bound": "disk" if disk_limit < (fwd_tps or np.inf) else "compute",
        }
        if "tokens_per_s" in results.get("naive", {}):
            summary["extract_vs_naive"] = ours["tokens_per_s"] / results["naive"]["tokens_per_s"]
        if "tokens_per_s" in results.get("saelens", {}):
            summary["extract_vs_saelens"] = ours["tokens_per_s"] / results["saelens"]["tokens_per_s"]
    if "tokens_per_s" in results.get("saelens", {}) and "tokens_per_s" in results.get("forward_windows", {}):
        summary["saelens_vs_its_forward"] = (
            results["saelens"]["tokens_per_s"] / results["forward_windows"]["tokens_per_s"]
        )
    table = []
    for m, r in results.items():
        r |= _costs(m, s, ctx)
        table.append(
            {
                "method": m,
                "tokens_per_s": r.get("tokens_per_s"),
                "vs_forward": r.get("vs_forward"),
                "ours_vs": (ours["tokens_per_s"] / r["tokens_per_s"])
                if "tokens_per_s" in r and "tokens_per_s" in ours
                else None,
                "bytes_per_token": r.get("bytes_per_token"),
                "disk": disk["write_GBps"],
                "padding": r["padding"],
                "slots": r["dense_slots_per_token"],
                "pairs": r["attention_pairs_per_token"],
                "note": r.get("skipped") or r.get("note"),
            }
        )
    print()
    text = print_table(
        table,
        [
            ("method", "method", ""),
            ("tokens_per_s", "tokens/s", ",.0f"),
            ("vs_forward", "x forward", ".2f"),
            ("ours_vs", "extract/this", ".2f"),
            ("bytes_per_token", "bytes/token", ",.0f"),
            ("disk", "disk GB/s", ".2f"),
            ("padding", "padding", ".1%"),
            ("slots", "dense slots/token", ".3f"),
            ("pairs", "attn pairs/token", ",.0f"),
            ("note", "note", ""),
        ],
    )
    print(
        f"\ndisk limit {disk_limit:,.0f} tokens/s at {bpt:,.0f} bytes/token; "
        + (
            f"extract = {summary['extract_vs_limit']:.2f} x min(forward, disk limit) ({summary['bound']}-bound); "
            f"time beyond its own forward passes: {ours['overhead_beyond_forward']:.1%}; writer busy "
            f"{ours['writer_seconds']:.2f} s ({ours['writer_tokens_per_s'] or 0:,.0f} tokens/s when writing)"
            if "extract_vs_limit" in summary
            else ""
        )
    )
    return summary, text


def _run(m: str, s: _Setup, cfg: BenchExtractConfig, store: Store) -> dict[str, Any]:
    if m in ("forward", "forward_full"):
        return _forward(s, m == "forward_full")
    if m == "packed":
        return _packed(s)
    if m == "extract":
        return _extract(s, cfg, store)
    if m == "naive":
        return _naive(s, store)
    if m == "forward_windows":
        return _forward_windows(s, cfg)
    return _saelens(s, cfg, store)


def _profile(cfg: BenchExtractConfig, s: _Setup, store: Store) -> tuple[dict[str, Any], str]:
    """Each method once more under torch.profiler (bench/extract/profile.py); returns (JSON part, table)."""
    profiles: dict[str, OpProfile] = {}
    for m in [m for m in METHODS if m in cfg.methods]:
        print(f"profiling {m} ...", flush=True)
        r, prof = profiled(lambda m=m: _run(m, s, cfg, store), cuda=s.lm.device.type == "cuda")
        if "tokens" in r:
            prof.tokens = r["tokens"]
            profiles[m] = prof
    if not profiles:
        return {}, ""
    print(f"\ntop ops by self CPU time ({torch.get_num_threads()} threads), one profiled call per method:")
    text = op_table(profiles, cfg.profile_top)
    return {m: p.as_dict(cfg.profile_top) for m, p in profiles.items()}, text


def _measure(cfg: BenchExtractConfig, s: _Setup, store: Store) -> dict[str, dict[str, Any]]:
    """Every method, in interleaved rounds; each method's fastest round is kept."""
    results: dict[str, dict[str, Any]] = {}
    order = [m for m in METHODS if m in cfg.methods]  # saelens last: it hooks every module while it runs
    for rnd in range(cfg.repeats):
        for m in order:
            print(
                f"measuring {m}" + (f" (round {rnd + 1}/{cfg.repeats})" if cfg.repeats > 1 else "") + " ...",
                flush=True,
            )
            c0 = time.process_time()
            r = _run(m, s, cfg, store)
            r["cpu_seconds_call"] = time.process_time() - c0
            rounds = results.get(m, {}).get("seconds_per_round", []) + [r.get("seconds")]
            if m not in results or r.get("seconds", np.inf) < results[m].get("seconds", np.inf):
                results[m] = r
            results[m]["seconds_per_round"] = rounds
    return results


def run_bench(cfg: BenchExtractConfig) -> dict[str, Any]:
    """Set up once, measure each method, print the table, write JSON + PNG; returns the result."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.device.startswith("cuda"):
        keep_freed_memory(cfg.malloc == "keep")  # the first call decides; load_model's then agrees
    with Bench("extract", cfg.store, cfg.out, keep=cfg.keep_store) as bench:
        store = bench.store
        ingest_rows(store, cfg.rows, cfg.model, cfg.progress)
        s = _Setup(cfg, store)
        print(
            f"model {s.lm.model_id} on {s.lm.device} ({str(s.lm.dtype).replace('torch.', '')}); "
            f"{len(s.selected)} rows, {s.tokens:,} tokens, {len(s.batches)} batches in {len(s.work)} units, "
            f"padding {s.padding:.1%} ({len(s.packs)} packed batches: none); layers {s.layers}"
        )
        disk = disk_write_bandwidth(store.run_dir("bench-disk"), cfg.disk_mb)
        print(f"disk: write + fsync {disk['write_GBps']:.2f} GB/s on {store.root}")
        results = _measure(cfg, s, store)
        summary, text = _summarize(results, s, disk, cfg.saelens_context)
        profile, profile_text = _profile(cfg, s, store) if cfg.profile else ({}, "")
        result = {
            **bench.header(cfg, s.lm.device),
            "model": {
                "id": s.lm.model_id,
                "hash": s.lm.model_hash,
                "device": str(s.lm.device),
                "dtype": str(s.lm.dtype).replace("torch.", ""),
                "d_model": s.d_model,
                "n_layers": len(decoder_layers(s.lm.model)),
                "note": s.lm.note,
            },
            "layers": s.layers,
            "rows": len(s.selected),
            "tokens": s.tokens,
            "batches": len(s.batches),
            "units": len(s.work),
            "batch_tokens": s.batch_tokens,
            "disk": disk,
            "summary": summary,
            "methods": results,
            "table": text,
            "torch_threads": torch.get_num_threads(),
            "keep_freed_memory": keep_freed_memory(),
            **({"profile": profile, "profile_table": profile_text} if cfg.profile else {}),
        }
        labels = [m for m in results if "tokens_per_s" in results[m]]
        bench.write(
            result,
            bench.path(cfg.model, s.lm.device.type),
            lambda png: bar_chart(
                png,
                labels,
                [results[m]["tokens_per_s"] for m in labels],
                f"{cfg.model if len(cfg.model) < 40 else '...' + cfg.model[-37:]} on {s.lm.device}, "
                f"layers {s.layers}, {s.tokens:,} tokens",
                "tokens / s",
                {
                    "forward (compute limit)": summary["forward_tokens_per_s"] or 0.0,
                    "disk write limit": summary["disk_limit_tokens_per_s"],
                },
            ),
        )
        return result


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchExtractConfig, argv, prog="python -m bench.extract"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
