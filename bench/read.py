"""Read throughput of the store against a raw np.memmap of the same bytes, cold and warm.

    python -m bench.read                                       # synthetic bf16 array on a scratch store
    python -m bench.read --store ./store_data --array hidden/layer_17   # a real store (read-only use)
    python -m bench.read --rows 60 --n-tokens 2000 --n-rows 10  # CPU-sized smoke run

Cases, each timed cold (page cache dropped with posix_fadvise before every repeat, after the
store's kept readers and the baseline's kept map are dropped: mapped pages stay cached) and warm:

* `tokens`  materialize a seeded sample of N tokens of the committed tokens
            (`store.materialize.materialize(..., sample=N, seed=--seed)`: SQL, seeded sample
            without a sort, commit check, sorted chunk-aware gather, bf16 -> float32), the
            same call timed in its two parts (`select` then `gather`: the SQL share and the
            gather share of each call), its gather alone (`store.materialize.gather`), and a
            sorted `np.memmap` gather of the same sample's indices
            from one raw file holding the same bytes, decoded the same way, mapped afresh per
            call (`memmap`) and mapped once and kept (`memmap kept map`: the store keeps its
            chunk maps between calls, so warm it is compared with both);
* `rows`    the same for every token of a seeded sample of R whole rows (a row-level view:
            `row_id` only, so the rows are located through row_layout);
* `stream`  `iter_materialize` over a whole view (--view, default content_tokens: the SAE
            training set) in chunk order and in a shuffled order, against a memmap pass over
            the same indices in the same batches; and the raw file read sequentially, the
            disk's read limit measured in the same run.

Without --store, a scratch store is built: the embedded sample is ingested and tokenized
(no model needed) and the array is filled with random bf16 values in the real layout (read
speed does not depend on the values). With --store, the array must be extracted already;
the benchmark only reads it and writes its raw copy under the store's runs/ folder, then
deletes it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Bench,
    BenchOutOptions,
    ScratchOptions,
    drop_cache,
    ingest_rows,
    print_table,
)
from extractors.chat_tokens import ensure_tokenization
from extractors.model import EMBEDDED, load_tokenizer
from store.arrays import commit_unit, create_array, decode, encode, open_array, record_array, write_unit
from store.catalog.runs import Run
from store.cli import ProgressOptions, SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store
from store.materialize import drop_read_cache, gather, iter_materialize, materialize, select
from trainers.plots import bar_chart


@dataclass
class BenchReadConfig(StoreOptions, SeedOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Measure view materialization and streaming against a raw np.memmap and the disk.

    Without --store: a temporary scratch store with a synthetic array (deleted afterwards unless
    --keep-store). With --store: a store whose --array is extracted, read only. --seed seeds the
    random selections."""

    store: str | None = None
    array: str = field(default="hidden/layer_17", metadata={"help": "array to read"})
    rows: int = field(default=800, metadata={"help": "rows of the embedded sample in the scratch store"})
    width: int = field(default=576, metadata={"help": "width of the synthetic array (SmolLM2: 576)"})
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit (chunk) of the scratch store"})
    n_tokens: int = field(default=20000, metadata={"help": "random tokens per 'tokens' materialization"})
    n_rows: int = field(default=50, metadata={"help": "random whole rows per 'rows' materialization"})
    view: str = field(default="content_tokens", metadata={"help": "view streamed by the 'stream' case"})
    batch_size: int = field(default=8192, metadata={"help": "tokens per streamed batch"})
    repeats: int = field(default=3, metadata={"help": "repeats per measurement (the median is reported)"})

    def __post_init__(self) -> None:
        for name in ("rows", "width", "unit_tokens", "n_tokens", "n_rows", "batch_size", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def _synthetic_array(store: Store, cfg: BenchReadConfig) -> None:
    """Fill cfg.array with random bf16 rows in the layout of the store's tokenization."""
    layout = ensure_tokenization(store, load_tokenizer(EMBEDDED), EMBEDDED, cfg.unit_tokens, progress=cfg.progress)
    with Run(store, "bench_synthetic", {"bench": True, **config_dict(cfg)}, model_id="synthetic") as run:
        arr = create_array(
            store,
            cfg.array,
            n_slots=layout.n_slots,
            width=cfg.width,
            chunk_slots=layout.unit_tokens,
            dtype="bf16",
            attrs={
                "tokenization": layout.tokenization,
                "run_id": run.run_id,
                "model": "synthetic",
                "kind": "hidden",
                "synthetic": True,
            },
        )
        rng = np.random.default_rng(cfg.seed)
        for unit, idx in sorted(layout.rows_of_unit().items()):
            buf = np.zeros((layout.unit_tokens, cfg.width), dtype=np.uint16)
            used = sum(layout.lengths[i] for i in idx)
            buf[:used] = encode(rng.standard_normal((used, cfg.width), dtype=np.float32), "bf16")
            write_unit(store, arr, cfg.array, unit, buf)
            commit_unit(store, cfg.array, unit, [layout.row_ids[i] for i in idx], run.run_id)
        record_array(store, cfg.array, arr, kind="hidden", layer=None, run_id=run.run_id)
        run.finish(counts={"tokens": sum(layout.lengths)})
    store.refresh_catalog()


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, cold: Callable[[], None]) -> dict[str, tuple]:
    """{name: (median cold seconds, median warm seconds)}. Methods alternate within each
    repeat, so a shared machine's varying load hits them alike, and each repeat starts one
    method later (the first call after another case's large reads ran up to 1.6x slower than
    the same call second: a repeat's first place is not always the same method's); cold runs
    drop the page cache first, warm runs follow one untimed pass."""
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in fns}
    names = list(fns)
    for kind in ("cold", "warm"):
        if kind == "warm":
            for fn in fns.values():
                fn()
        for i in range(repeats):
            for k in names[i % len(names) :] + names[: i % len(names)]:
                fn = fns[k]
                if kind == "cold":
                    cold()
                t0 = time.perf_counter()
                fn()
                times[k][kind].append(time.perf_counter() - t0)
    return {k: (float(np.median(v["cold"])), float(np.median(v["warm"]))) for k, v in times.items()}


class _Raw:
    """The array's bytes as one flat file, read through np.memmap: the baseline."""

    def __init__(self, arr, path: Path):
        self.path, self.dtype = path, arr.attrs.get("dtype", str(arr.dtype))
        rows = arr.chunks[0]
        with open(path, "wb") as fh:
            fh.writelines(np.ascontiguousarray(arr[s : s + rows]).tobytes() for s in range(0, arr.shape[0], rows))
            fh.flush()
            os.fsync(fh.fileno())
        self.shape, self.storage = tuple(arr.shape), arr.dtype
        self.row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))

    def open(self) -> np.memmap:
        # `memmap` maps the file afresh at every call (what the store's gather did until it kept
        # its chunk maps); `memmap kept map` maps it once and keeps it between warm calls, as the
        # store now does. Mapped pages cannot be evicted, so cold runs drop every kept map first.
        return np.memmap(self.path, dtype=self.storage, mode="r", shape=self.shape)

    def gather(self, idx: np.ndarray, mm: np.memmap | None = None) -> np.ndarray:
        mm = self.open() if mm is None else mm
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.storage)
        out[order] = mm[idx[order]]
        return decode(out, self.dtype)

    def read_all(self, block: int = 64 << 20) -> int:
        n = 0
        with open(self.path, "rb", buffering=0) as fh:
            buf = bytearray(min(block, self.path.stat().st_size))
            while k := fh.readinto(buf):
                n += k
        return n


# The baseline of each store method, for the ratio columns ("memmap kept map" peers likewise).
BASELINE = {
    "materialize": "memmap",
    "materialize in parts": "memmap",
    "gather": "memmap",
    "iter_materialize chunk order": "memmap chunk order",
    "iter_materialize shuffled": "memmap shuffled",
}
COLUMNS = [
    ("case", "case", ""),
    ("method", "method", ""),
    ("tokens", "tokens", ","),
    ("cold_tokens_per_s", "cold tok/s", ",.0f"),
    ("warm_tokens_per_s", "warm tok/s", ",.0f"),
    ("cold_GBps", "cold GB/s", ".2f"),
    ("warm_GBps", "warm GB/s", ".2f"),
    ("warm_s", "warm s", ".3f"),
    ("cold_vs_memmap", "cold vs memmap", ".2f"),
    ("warm_vs_memmap", "warm vs memmap", ".2f"),
    ("warm_vs_kept_map", "warm vs kept map", ".2f"),
    ("sql_share", "SQL share c/w", ""),
    ("gather_share", "gather share c/w", ""),
    ("note", "note", ""),
]


class _Reads:
    """The measurements on one store: the array, its raw copy, the cold-read reset and the
    results so far (one dict per case and method)."""

    def __init__(self, store: Store, cfg: BenchReadConfig, raw_path: Path):
        self.store, self.cfg = store, cfg
        self.arr = open_array(store, cfg.array)
        chunk_files = sorted(p for p in store.array_path(cfg.array).joinpath("c").rglob("*") if p.is_file())
        self.raw = _Raw(self.arr, raw_path)
        self.files = chunk_files + [self.raw.path]
        self.kept: np.memmap | None = None
        self.results: list[dict[str, Any]] = []

    def cold(self) -> None:
        # A cold read starts as a fresh process would: the store's kept readers (their maps
        # pin pages in the page cache) and the baseline's kept map go first.
        drop_read_cache()
        self.kept = None
        drop_cache(self.files)

    def kept_map(self) -> np.memmap:
        """The raw file mapped once and kept between calls, as the store keeps its chunk maps."""
        if self.kept is None:
            self.kept = self.raw.open()
        return self.kept

    def record(self, case: str, method: str, n: int, t_cold: float, t_warm: float, note: str = "") -> None:
        row_bytes = self.raw.row_bytes
        r = {
            "case": case,
            "method": method,
            "tokens": n,
            "cold_s": t_cold,
            "warm_s": t_warm,
            "cold_tokens_per_s": n / t_cold,
            "warm_tokens_per_s": n / t_warm,
            "cold_GBps": n * row_bytes / t_cold / 1e9,
            "warm_GBps": n * row_bytes / t_warm / 1e9,
            "note": note,
        }
        if method == "select":  # reads no vectors
            r["cold_GBps"] = r["warm_GBps"] = None
        self.results.append(r)

    def measure(self, case: str, n: int, fns: dict[str, tuple[Callable[[], Any], str]]) -> None:
        """Time `fns` ({method: (call, note)}) interleaved, cold and warm, and record them."""
        timed = _interleaved({k: fn for k, (fn, _) in fns.items()}, self.cfg.repeats, self.cold)
        for method, (_, note) in fns.items():
            self.record(case, method, n, *timed[method], note)

    def selections(self) -> dict[str, tuple[str, int]]:
        """The 'tokens' and 'rows' cases: {case: (view, sample size)}; the committed tokens, and
        the committed rows, each sampled by materialize's seeded sample (store.reads.sample: no sort;
        DuckDB's SAMPLE is not repeatable across threads, ORDER BY hash() LIMIT sorts)."""
        cfg = self.cfg
        committed = f"(SELECT DISTINCT row_id FROM array_units WHERE array_name = '{cfg.array}')"
        tz = self.arr.attrs.get("tokenization")
        tz_sql = f"t.tokenization = '{tz}'" if tz else "true"
        return {
            "tokens": (
                f"SELECT t.row_id, t.tok_index FROM tokens t WHERE {tz_sql} AND t.row_id IN {committed}",
                cfg.n_tokens,
            ),
            # A row-level view: whole rows come from row_layout, no scan of the tokens table.
            "rows": (f"SELECT row_id FROM {committed}", cfg.n_rows),
        }

    def measure_selections(self) -> None:
        """The 'tokens' and 'rows' cases: materialize, its parts, and the memmap baselines."""
        store, name, raw, seed = self.store, self.cfg.array, self.raw, self.cfg.seed
        for case, (sql, n) in self.selections().items():
            ref = materialize(store, sql, name, sample=n, seed=seed)
            idx = ref.frame["tok_index"].to_numpy()
            if not np.array_equal(ref.X, raw.gather(idx)):
                raise RuntimeError("the store and the raw copy disagree; the benchmark is broken")
            splits: list[tuple[float, float]] = []

            def parts(sql=sql, n=n, splits=splits) -> None:
                # materialize's body (pool=None), each part timed: the SQL share and the gather share
                t0 = time.perf_counter()
                frame = select(store, sql, name, sample=n, seed=seed)
                t1 = time.perf_counter()
                gather(store, name, frame["tok_index"].to_numpy())
                splits.append((t1 - t0, time.perf_counter() - t1))

            fns = {
                "materialize": (
                    lambda sql=sql, n=n: materialize(store, sql, name, sample=n, seed=seed),
                    f"SQL + seeded sample of {n} + commit check + gather + decode",
                ),
                "materialize in parts": (parts, "the same call as select, then gather, each timed"),
                "select": (
                    lambda sql=sql, n=n: select(store, sql, name, sample=n, seed=seed),
                    "the view's SQL + sample + commit check alone (materialize less its gather)",
                ),
                "gather": (
                    lambda idx=idx: gather(store, name, idx),
                    "store gather of the same indices + decode (the process's kept reader)",
                ),
                "memmap": (lambda idx=idx: raw.gather(idx), "sorted np.memmap gather from a raw file + decode"),
                "memmap kept map": (
                    lambda idx=idx: raw.gather(idx, self.kept_map()),
                    "the same, the file mapped once and kept (no page faults when warm)",
                ),
            }
            self.measure(case, len(idx), fns)
            self.shares(case, splits)

    def shares(self, case: str, splits: list[tuple[float, float]]) -> None:
        """Median per-call SQL and gather shares of 'materialize in parts', cold / warm, on the
        case's materialize row. `_interleaved` calls it `repeats` times cold, once untimed to
        warm up, then `repeats` times warm."""
        r = self.cfg.repeats
        split = {"cold": splits[:r], "warm": splits[r + 1 :]}
        med = {k: [float(np.median([p[i] / sum(p) for p in v])) for i in (0, 1)] for k, v in split.items()}
        for row in self.results:
            if row["case"] == case and row["method"] in ("materialize", "materialize in parts"):
                row["sql_share"] = f"{med['cold'][0]:.2f} / {med['warm'][0]:.2f}"
                row["gather_share"] = f"{med['cold'][1]:.2f} / {med['warm'][1]:.2f}"

    def measure_stream(self) -> None:
        """The 'stream' case: a whole view streamed, as SAE / probe training does, in chunk
        order and shuffled, against memmap passes; then the raw file read sequentially."""
        store, cfg, raw = self.store, self.cfg, self.raw
        tok = select(store, cfg.view, cfg.array)["tok_index"].to_numpy()
        n = len(tok)
        perm = np.random.default_rng(cfg.seed).permutation(n)

        def stream(order) -> None:
            for m in iter_materialize(
                store, cfg.view, cfg.array, batch_size=cfg.batch_size, order=order, columns=[]
            ):  # as the SAE trainer streams: X alone
                m.X.sum()

        def stream_raw(order_idx: np.ndarray, keep: bool = False) -> None:
            mm = self.kept_map() if keep else raw.open()
            for s in range(0, n, cfg.batch_size):
                raw.gather(tok[order_idx[s : s + cfg.batch_size]], mm).sum()

        chunk_order = np.argsort(tok, kind="stable")
        fns = {
            "select": (
                lambda: select(store, cfg.view, cfg.array, columns=[]),
                "the view's SQL (row_id, tok_index: columns=[], as streamed) + commit check alone",
            ),
            "iter_materialize chunk order": (lambda: stream("chunk"), f"view {cfg.view}, batches of {cfg.batch_size}"),
            "memmap chunk order": (lambda: stream_raw(chunk_order), "same batches from the raw file"),
            "memmap kept map chunk order": (lambda: stream_raw(chunk_order, True), "the file mapped once, kept"),
            "iter_materialize shuffled": (lambda: stream(perm), "a stored permutation (shuffled training)"),
            "memmap shuffled": (lambda: stream_raw(perm), "same batches from the raw file"),
            "memmap kept map shuffled": (lambda: stream_raw(perm, True), "the file mapped once, kept"),
        }
        self.measure("stream", n, fns)
        timed = _interleaved({"raw": raw.read_all}, cfg.repeats, self.cold)
        self.record(
            "stream",
            "raw sequential read",
            self.arr.shape[0],
            *timed["raw"],
            "the whole raw file (all slots), 64 MB reads: the disk / page-cache limit",
        )


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each store method's speed over its memmap baseline's, cold and warm, and (warm) over
    the kept-map baseline's."""
    for r in results:
        peer = next((x for x in results if x["case"] == r["case"] and x["method"] == BASELINE.get(r["method"])), None)
        if peer is not None:
            r["cold_vs_memmap"] = peer["cold_s"] / r["cold_s"]
            r["warm_vs_memmap"] = peer["warm_s"] / r["warm_s"]
        kept_peer = next(
            (
                x
                for x in results
                if x["case"] == r["case"]
                and BASELINE.get(r["method"])
                and x["method"] == BASELINE[r["method"]].replace("memmap", "memmap kept map")
            ),
            None,
        )
        if kept_peer is not None:
            r["warm_vs_kept_map"] = kept_peer["warm_s"] / r["warm_s"]


def _chart(png: Path, cfg: BenchReadConfig, result: dict[str, Any]) -> None:
    results = result["results"]
    shown = [r for r in results if r["warm_GBps"] is not None]
    bar_chart(
        png,
        [f"{r['case']}: {r['method']}" for r in shown],
        [r["warm_GBps"] for r in shown],
        f"{cfg.array} ({'synthetic' if result['array']['synthetic'] else 'extracted'}), warm reads",
        "GB/s",
        {"raw sequential read (warm)": results[-1]["warm_GBps"]},
    )


def run_bench(cfg: BenchReadConfig) -> dict[str, Any]:
    """Build or open the store, measure every case, print the table, write JSON + PNG."""
    with Bench("read", cfg.store, cfg.out, keep=cfg.keep_store) as bench:
        store = bench.store
        if bench.scratch:
            ingest_rows(store, cfg.rows, "embedded", cfg.progress)
            _synthetic_array(store, cfg)
        workdir = store.run_dir("bench-read")
        reads = _Reads(store, cfg, workdir / "raw.bin")
        reads.measure_selections()
        reads.measure_stream()
        add_ratios(reads.results)
        print()
        text = print_table(reads.results, COLUMNS)
        arr = reads.arr
        result = {
            **bench.header(cfg),
            "array": {
                "name": cfg.array,
                "shape": list(arr.shape),
                "chunks": list(arr.chunks),
                "dtype": arr.attrs.get("dtype"),
                "synthetic": bool(arr.attrs.get("synthetic", False)),
                "bytes": arr.shape[0] * reads.raw.row_bytes,
            },
            "results": reads.results,
            "table": text,
        }
        bench.write(result, bench.path(), lambda png: _chart(png, cfg, result))
        shutil.rmtree(workdir, ignore_errors=True)
        return result


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchReadConfig, argv, prog="python -m bench.read"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
