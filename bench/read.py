"""Read throughput of the store against a raw np.memmap of the same bytes, cold and warm.

    python -m bench.read                                       # synthetic bf16 array on a scratch store
    python -m bench.read --store ./store_data --array hidden/layer_17   # a real store (read-only use)
    python -m bench.read --rows 60 --n-tokens 2000 --n-rows 10  # CPU-sized smoke run

Cases, each timed cold (page cache dropped with posix_fadvise before every repeat, after the
store's kept readers and the baseline's kept map are dropped: mapped pages stay cached) and warm:

* `tokens`  materialize a view of N random tokens (`store.materialize.materialize`: SQL,
            commit check, sorted chunk-aware gather, bf16 -> float32), its gather alone
            (`store.materialize.gather`), and a sorted `np.memmap` gather of the same indices
            from one raw file holding the same bytes, decoded the same way, mapped afresh per
            call (`memmap`) and mapped once and kept (`memmap kept map`: the store keeps its
            chunk maps between calls, so warm it is compared with both);
* `rows`    the same for every token of R random whole rows (a row-level view: `row_id` only,
            so the rows are located through row_layout);
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

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store.cli import config_dict, parse_config, user_errors


@dataclass
class BenchReadConfig:
    """Measure view materialization and streaming against a raw np.memmap and the disk."""

    store: str | None = field(
        default=None,
        metadata={
            "help": "a store whose --array is extracted (read only); "
            "default: a temporary scratch store with a synthetic array"
        },
    )
    array: str = field(default="hidden/layer_17", metadata={"help": "array to read"})
    rows: int = field(default=800, metadata={"help": "rows of the embedded sample in the scratch store"})
    width: int = field(default=576, metadata={"help": "width of the synthetic array (SmolLM2: 576)"})
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit (chunk) of the scratch store"})
    n_tokens: int = field(default=20000, metadata={"help": "random tokens per 'tokens' materialization"})
    n_rows: int = field(default=50, metadata={"help": "random whole rows per 'rows' materialization"})
    view: str = field(default="content_tokens", metadata={"help": "view streamed by the 'stream' case"})
    batch_size: int = field(default=8192, metadata={"help": "tokens per streamed batch"})
    repeats: int = field(default=3, metadata={"help": "repeats per measurement (the median is reported)"})
    seed: int = field(default=0, metadata={"help": "seed of the random selections"})
    out: str | None = field(
        default=None, metadata={"help": "result JSON (a PNG chart goes beside it) (default: bench_out/read.json)"}
    )
    keep_store: bool = field(default=False, metadata={"help": "keep the temporary scratch store"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for name in ("rows", "width", "unit_tokens", "n_tokens", "n_rows", "batch_size", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def _synthetic_array(store, cfg: BenchReadConfig) -> None:
    """Fill cfg.array with random bf16 rows in the layout of the store's tokenization."""
    from extractors.chat_tokens import ensure_tokenization
    from extractors.model import EMBEDDED, load_tokenizer
    from store.arrays import commit_unit, create_array, encode, record_array, write_unit
    from store.catalog.runs import Run

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
    repeat, so a shared machine's varying load hits them alike; cold runs drop the page
    cache first, warm runs follow one untimed pass."""
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in fns}
    for kind in ("cold", "warm"):
        if kind == "warm":
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                if kind == "cold":
                    cold()
                t0 = time.perf_counter()
                fn()
                times[k][kind].append(time.perf_counter() - t0)
    return {k: (float(np.median(v["cold"])), float(np.median(v["warm"]))) for k, v in times.items()}


class _Raw:
    """The array's bytes as one flat file, read through np.memmap: the baseline."""

    def __init__(self, arr, path: Path):
        import os

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
        from store.arrays import decode

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


def run_bench(cfg: BenchReadConfig) -> dict[str, Any]:
    """Build or open the store, measure every case, print the table, write JSON + PNG."""
    from bench.common import drop_cache, ingest_rows, machine, print_table, result_path, scratch_store, write_json
    from store.arrays import open_array
    from store.materialize import drop_read_cache, gather, iter_materialize, materialize, select
    from trainers.plots import bar_chart

    store, tmp = scratch_store(cfg.store, "bench-read-")
    try:
        if tmp is not None:
            ingest_rows(store, cfg.rows, "embedded", cfg.progress)
            _synthetic_array(store, cfg)
        arr = open_array(store, cfg.array)
        chunk_files = sorted(p for p in store.array_path(cfg.array).joinpath("c").rglob("*") if p.is_file())
        workdir = store.run_dir("bench-read")
        raw = _Raw(arr, workdir / "raw.bin")
        row_bytes = raw.row_bytes
        files = chunk_files + [raw.path]

        kept: dict[str, np.memmap | None] = {"map": None}

        def cold() -> None:
            # A cold read starts as a fresh process would: the store's kept readers (their maps
            # pin pages in the page cache) and the baseline's kept map go first.
            drop_read_cache()
            kept["map"] = None
            drop_cache(files)

        def kept_map() -> np.memmap:
            """The raw file mapped once and kept between calls, as the store keeps its chunk maps."""
            if kept["map"] is None:
                kept["map"] = raw.open()
            return kept["map"]

        committed = f"(SELECT DISTINCT row_id FROM array_units WHERE array_name = '{cfg.array}')"
        tz = arr.attrs.get("tokenization")
        tz_sql = f"t.tokenization = '{tz}'" if tz else "true"
        # Pseudo-random but deterministic selections (DuckDB's SAMPLE is not repeatable across threads).
        views = {
            "tokens": f"SELECT t.row_id, t.tok_index FROM tokens t WHERE {tz_sql} AND t.row_id IN {committed} "
            f"ORDER BY hash(t.tok_index + {cfg.seed}) LIMIT {cfg.n_tokens}",
            # A row-level view: whole rows come from row_layout, no scan of the tokens table.
            "rows": f"SELECT row_id FROM {committed} ORDER BY hash(row_id || '{cfg.seed}') LIMIT {cfg.n_rows}",
        }
        results: list[dict[str, Any]] = []

        def record(case: str, method: str, n: int, t_cold: float, t_warm: float, note: str = "") -> dict[str, Any]:
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
            results.append(r)
            return r

        for case, sql in views.items():
            ref = materialize(store, sql, cfg.array)
            idx = ref.frame["tok_index"].to_numpy()
            if not np.array_equal(ref.X, raw.gather(idx)):
                raise RuntimeError("the store and the raw copy disagree; the benchmark is broken")
            n = len(idx)
            fns = {
                "materialize": (
                    lambda sql=sql: materialize(store, sql, cfg.array),
                    "SQL + commit check + gather + decode",
                ),
                "select": (
                    lambda sql=sql: select(store, sql, cfg.array),
                    "the view's SQL + commit check alone (materialize less its gather)",
                ),
                "gather": (
                    lambda idx=idx: gather(store, cfg.array, idx),
                    "store gather of the same indices + decode (the process's kept reader)",
                ),
                "memmap": (lambda idx=idx: raw.gather(idx), "sorted np.memmap gather from a raw file + decode"),
                "memmap kept map": (
                    lambda idx=idx: raw.gather(idx, kept_map()),
                    "the same, the file mapped once and kept (no page faults when warm)",
                ),
            }
            timed = _interleaved({k: fn for k, (fn, _) in fns.items()}, cfg.repeats, cold)
            for method, (_, note) in fns.items():
                record(case, method, n, *timed[method], note)

        # Streaming a whole view, as SAE / probe training does.
        frame = select(store, cfg.view, cfg.array)
        tok = frame["tok_index"].to_numpy()
        n = len(tok)
        perm = np.random.default_rng(cfg.seed).permutation(n)

        def stream(order) -> None:
            for m in iter_materialize(
                store, cfg.view, cfg.array, batch_size=cfg.batch_size, order=order, columns=[]
            ):  # as the SAE trainer streams: X alone
                m.X.sum()

        def stream_raw(order_idx: np.ndarray, keep: bool = False) -> None:
            mm = kept_map() if keep else raw.open()
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
        timed = _interleaved({k: fn for k, (fn, _) in fns.items()}, cfg.repeats, cold)
        for method, (_, note) in fns.items():
            record("stream", method, n, *timed[method], note)
        total = arr.shape[0]
        timed = _interleaved({"raw": raw.read_all}, cfg.repeats, cold)
        record(
            "stream",
            "raw sequential read",
            total,
            *timed["raw"],
            "the whole raw file (all slots), 64 MB reads: the disk / page-cache limit",
        )

        baseline = {
            "materialize": "memmap",
            "gather": "memmap",
            "iter_materialize chunk order": "memmap chunk order",
            "iter_materialize shuffled": "memmap shuffled",
        }
        for r in results:
            peer = next(
                (x for x in results if x["case"] == r["case"] and x["method"] == baseline.get(r["method"])), None
            )
            if peer is not None:
                r["cold_vs_memmap"] = peer["cold_s"] / r["cold_s"]
                r["warm_vs_memmap"] = peer["warm_s"] / r["warm_s"]
            kept_peer = next(
                (
                    x
                    for x in results
                    if x["case"] == r["case"]
                    and baseline.get(r["method"])
                    and x["method"] == baseline[r["method"]].replace("memmap", "memmap kept map")
                ),
                None,
            )
            if kept_peer is not None:
                r["warm_vs_kept_map"] = kept_peer["warm_s"] / r["warm_s"]
        print()
        text = print_table(
            results,
            [
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
                ("note", "note", ""),
            ],
        )
        out = result_path(cfg.out, "read")
        result = {
            "benchmark": "read",
            "config": config_dict(cfg),
            "machine": machine(),
            "array": {
                "name": cfg.array,
                "shape": list(arr.shape),
                "chunks": list(arr.chunks),
                "dtype": arr.attrs.get("dtype"),
                "synthetic": bool(arr.attrs.get("synthetic", False)),
                "bytes": total * row_bytes,
            },
            "results": results,
            "table": text,
        }
        write_json(out, result)
        shown = [r for r in results if r["warm_GBps"] is not None]
        labels = [f"{r['case']}: {r['method']}" for r in shown]
        bar_chart(
            out.with_suffix(".png"),
            labels,
            [r["warm_GBps"] for r in shown],
            f"{cfg.array} ({'synthetic' if result['array']['synthetic'] else 'extracted'}), warm reads",
            "GB/s",
            {"raw sequential read (warm)": results[-1]["warm_GBps"]},
        )
        print(f"wrote {out} and {out.with_suffix('.png')}")
        shutil.rmtree(workdir, ignore_errors=True)
        return result
    finally:
        if tmp is not None and not cfg.keep_store:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"kept the scratch store at {store.root}")


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchReadConfig, argv, prog="python -m bench.read"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
