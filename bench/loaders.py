"""Training loaders (store.loaders) against the alternatives, tokens/s into a no-op training step:

    python -m bench.loaders                                        # synthetic bf16 store (scratch)
    python -m bench.loaders --store ./store_data --array hidden/layer_17   # a real store, read only
    python -m bench.loaders --rows 60 --repeats 1                  # CPU-sized smoke run

One epoch over the view's tokens (--view, default content_tokens), batches of --batch-size, each
case timed cold (page cache and the store's kept readers dropped before each repeat) and warm
(after an untimed pass), the median of --repeats:

* `stream w0` / `stream w2`: `ActivationStream` (seeded block permutation, --shuffle-buffer
  tokens of shuffle buffer), built once (its SQL and commit checks are not timed: a training loop
  builds it once for every epoch), an epoch iterated directly, and through
  `DataLoader(num_workers=2, persistent_workers=True)`;
* `materialize + randperm`: the whole view into memory (`store.materialize.materialize`), then
  `torch.randperm` batches of it;
* `memmap gather (limit)`: the stream's own batches (the same tokens, recorded from one epoch
  beforehand), each gathered sorted from one raw np.memmap file holding the array's bytes and
  widened bf16 -> float32: the same reads with no store, no buffer and no batch dict;
* `SAELens ActivationsStore`: SAELens' own loader over the same tokens, cached in its layout by
  `python -m store.export --format saelens` beforehand (its mixing buffer, `store_batch_size_prompts`
  sequences of --context-size per read).

Peak RSS is sampled every 5 ms during each case (this process and its DataLoader workers) above
the RSS when the case starts: a stream's is bounded by its buffer (`buffer MB` = (shuffle_buffer +
batch_size + block_tokens) x width x (stored + float32 bytes)), materialize's grows with the view.
Without --store, the embedded sample is ingested and the array filled with random bf16 values
(read speed does not depend on them); the raw copy and the export go under the store's runs/
folder and are deleted at the end.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from bench.common import Bench, BenchOutOptions, ScratchOptions, drop_cache, ingest_rows, print_table
from bench.read import _Raw, _synthetic_array
from store.arrays import decode, open_array
from store.cli import ProgressOptions, SeedOptions, StoreOptions, parse_config, user_errors
from store.core import Store
from store.export.export import ExportConfig, default_hook_name, export
from store.loaders import ActivationStream
from store.materialize import drop_read_cache, materialize
from trainers.plots import bar_chart


@dataclass
class BenchLoadersConfig(StoreOptions, SeedOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Training loaders' tokens/s into a no-op step: ActivationStream (0 and 2 workers), materialize +
    randperm, a raw np.memmap gather of the same batches, and SAELens' ActivationsStore."""

    store: str | None = None
    array: str = field(default="hidden/layer_17", metadata={"help": "array to read"})
    rows: int = field(default=800, metadata={"help": "rows of the embedded sample in the scratch store"})
    width: int = field(default=576, metadata={"help": "width of the synthetic array (SmolLM2: 576)"})
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit (chunk) of the scratch store"})
    view: str = field(default="content_tokens", metadata={"help": "the view the loaders read"})
    batch_size: int = field(default=4096, metadata={"help": "tokens per batch"})
    shuffle_buffer: int = field(default=65536, metadata={"help": "the stream's shuffle buffer, tokens"})
    block_tokens: int = field(default=4096, metadata={"help": "the stream's block, tokens"})
    context_size: int = field(default=128, metadata={"help": "SAELens: tokens per cached sequence"})
    repeats: int = field(default=3, metadata={"help": "repeats per measurement (the median is reported)"})

    def __post_init__(self) -> None:
        for name in ("rows", "width", "unit_tokens", "batch_size", "shuffle_buffer", "block_tokens", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


class _PeakRSS:
    """Peak resident memory (this process + its children) above the level at start, sampled."""

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = 0

    def _rss(self) -> int:
        """RSS less shared file-backed pages (the memory-mapped chunk files are page cache, which
        the kernel reclaims; counting them would make any reader's memory the array's size)."""
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                m = p.memory_info()
                total += m.rss - m.shared
            except psutil.Error:
                pass
        return total

    def __enter__(self) -> _PeakRSS:
        self.base = self._rss()
        self.peak, self._stop = self.base, threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above(self) -> int:
        return self.peak - self.base


def _step(x: torch.Tensor) -> int:
    """The no-op training step: the batch arrives as a [B, d] float32 tensor and is touched."""
    assert x.dtype == torch.float32 and x.ndim == 2
    return x.shape[0]


class _Cases:
    def __init__(self, store: Store, cfg: BenchLoadersConfig, workdir: Path):
        self.store, self.cfg = store, cfg
        self.arr = open_array(store, cfg.array)
        self.dtype = self.arr.attrs.get("dtype", str(self.arr.dtype))
        self.kw = {
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "shuffle_buffer": cfg.shuffle_buffer,
            "block_tokens": cfg.block_tokens,
        }
        probe = ActivationStream(store, cfg.view, arrays=[cfg.array], columns=[], **self.kw)
        self.n = probe.sel.n
        self.batches = [b["tok_index"].numpy() for b in probe]  # the stream's batches, for the limit
        self.raw = _Raw(self.arr, workdir / "raw.bin")
        self.cached = workdir / "saelens"
        export(
            ExportConfig(
                store=str(store.root),
                out=str(self.cached),
                view=cfg.view,
                array=cfg.array,
                format="saelens",
                context_size=cfg.context_size,
                progress=False,
            )
        )
        self.n_cached = (self.n // cfg.context_size) * cfg.context_size
        chunks = sorted(p for p in store.array_path(cfg.array).joinpath("c").rglob("*") if p.is_file())
        self.files = chunks + [self.raw.path] + sorted(self.cached.rglob("*.arrow"))

    def cold(self) -> None:
        drop_read_cache()
        drop_cache(self.files)

    def stream(self, workers: int) -> Callable[[], int]:
        """An epoch of a stream built once (as a training loop does: the view's SQL and commit
        checks run at construction, not per epoch); with workers, persistent ones."""
        s = ActivationStream(self.store, self.cfg.view, arrays=[self.cfg.array], columns=[], **self.kw)
        loader: Any = s
        if workers:
            loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers, persistent_workers=True)

        def run() -> int:
            return sum(_step(b[self.cfg.array]) for b in loader)

        return run

    def materialize_randperm(self) -> int:
        X = torch.from_numpy(materialize(self.store, self.cfg.view, self.cfg.array).X)
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(self.cfg.seed))
        b = self.cfg.batch_size
        return sum(_step(X[perm[i : i + b]]) for i in range(0, len(X), b))

    def memmap(self) -> int:
        raw = self.raw.open()

        def one(t: np.ndarray) -> torch.Tensor:  # np.take and an in-place widen: the fastest raw path measured
            rows = np.take(raw, np.sort(t), axis=0)
            if self.dtype != "bfloat16":
                return torch.from_numpy(decode(rows, self.dtype))
            x = rows.astype(np.uint32)
            x <<= 16
            return torch.from_numpy(x.view(np.float32))

        return sum(_step(one(t)) for t in self.batches)

    def saelens(self) -> int:
        from sae_lens.training.activations_store import ActivationsStore

        c, b = self.cfg.context_size, self.cfg.batch_size
        acts = ActivationsStore(
            model=None,
            dataset=None,
            streaming=False,
            hook_name=default_hook_name(self.cfg.array),
            hook_head_index=None,
            context_size=c,
            d_in=int(self.arr.shape[1]),
            n_batches_in_buffer=max(-(-b // c), self.cfg.shuffle_buffer // c),  # its buffer: shuffle_buffer tokens
            total_training_tokens=self.n_cached,
            store_batch_size_prompts=max(1, b // c),
            train_batch_size_tokens=b,
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device("cpu"),
            dtype="float32",
            cached_activations_path=str(self.cached),
        )
        with warnings.catch_warnings():  # its mixing buffer reads ahead, past the epoch's end: said, not an error
            warnings.simplefilter("ignore", UserWarning)
            return sum(_step(next(acts)) for _ in range(self.n_cached // b))


def _time(fns: dict[str, Callable[[], int]], repeats: int, cold: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """{case: cold_s, warm_s, tokens, peak_rss} (medians; methods rotate within each repeat)."""
    out: dict[str, dict[str, Any]] = {k: {"cold": [], "warm": [], "rss": 0} for k in fns}
    names = list(fns)
    for kind in ("cold", "warm"):
        for i in range(repeats):
            for k in names[i % len(names) :] + names[: i % len(names)]:
                if kind == "cold":
                    cold()
                elif i == 0:
                    fns[k]()  # warm: after one untimed pass
                with _PeakRSS() as rss:
                    t0 = time.perf_counter()
                    n = fns[k]()
                    dt = time.perf_counter() - t0
                out[k][kind].append(dt)
                out[k]["tokens"] = n
                out[k]["rss"] = max(out[k]["rss"], rss.above)
    return {
        k: {"cold_s": float(np.median(v["cold"])), "warm_s": float(np.median(v["warm"])), "tokens": v["tokens"],
            "peak_rss": v["rss"]}
        for k, v in out.items()
    }  # fmt: skip


COLUMNS = [
    ("method", "method", ""),
    ("tokens", "tokens", ",d"),
    ("cold_tokens_per_s", "cold tok/s", ",.0f"),
    ("warm_tokens_per_s", "warm tok/s", ",.0f"),
    ("warm_vs_memmap", "warm vs memmap", ".2f"),
    ("warm_vs_saelens", "warm vs SAELens", ".2f"),
    ("peak_rss_mb", "peak RSS MB", ",.0f"),
    ("note", "note", ""),
]


def run_bench(cfg: BenchLoadersConfig) -> dict[str, Any]:
    """Build or open the store, time every case, print the table, write JSON + PNG."""
    with Bench("loaders", cfg.store, cfg.out, keep=cfg.keep_store) as bench:
        store = bench.store
        if bench.scratch:
            ingest_rows(store, cfg.rows, "embedded", cfg.progress)
            _synthetic_array(store, cfg)
        workdir = store.run_dir("bench-loaders")
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            cases = _Cases(store, cfg, workdir)
            fns = {
                "stream w0": cases.stream(0),
                "stream w2": cases.stream(2),
                "materialize + randperm": cases.materialize_randperm,
                "memmap gather (limit)": cases.memmap,
                "SAELens ActivationsStore": cases.saelens,
            }
            timed = _time(fns, cfg.repeats, cases.cold)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        width = int(cases.arr.shape[1])
        stored = cases.arr.dtype.itemsize
        buffer_mb = (cfg.shuffle_buffer + cfg.batch_size + cfg.block_tokens) * width * (stored + 4) / 2**20
        notes = {
            "stream w0": f"buffer {buffer_mb:.0f} MB",
            "stream w2": "2 persistent workers; batches cross a process boundary",
            "materialize + randperm": f"view in memory: {cases.n * width * 4 / 2**20:.0f} MB float32",
            "memmap gather (limit)": "the stream's batches, one raw file",
            "SAELens ActivationsStore": f"its cached layout, {cases.n_cached:,} tokens (whole sequences)",
        }
        results = []
        for k, v in timed.items():
            results.append(
                {
                    "method": k,
                    **v,
                    "cold_tokens_per_s": v["tokens"] / v["cold_s"],
                    "warm_tokens_per_s": v["tokens"] / v["warm_s"],
                    "peak_rss_mb": v["peak_rss"] / 2**20,
                    "note": notes[k],
                }
            )
        lim = timed["memmap gather (limit)"]
        sl = timed["SAELens ActivationsStore"]
        for r in results:
            r["warm_vs_memmap"] = (r["tokens"] / r["warm_s"]) / (lim["tokens"] / lim["warm_s"])
            r["warm_vs_saelens"] = (r["tokens"] / r["warm_s"]) / (sl["tokens"] / sl["warm_s"])
        print()
        text = print_table(results, COLUMNS)
        result = {
            **bench.header(cfg),
            "array": {"name": cfg.array, "shape": list(cases.arr.shape), "dtype": cases.dtype,
                      "synthetic": bool(cases.arr.attrs.get("synthetic", False))},
            "view_tokens": cases.n,
            "buffer_mb": buffer_mb,
            "results": results,
            "table": text,
        }  # fmt: skip

        def chart(png: Path) -> None:
            bar_chart(
                png,
                [r["method"] for r in results],
                [r["warm_tokens_per_s"] / 1e6 for r in results],
                f"{cfg.array} over {cfg.view}: {cases.n:,} tokens, batches of {cfg.batch_size}, warm",
                "M tokens/s",
            )

        bench.write(result, bench.path(), chart)
        return result


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchLoadersConfig, argv, prog="python -m bench.loaders"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
