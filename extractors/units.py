"""The unit engine: how every array kind is computed, written and committed.

A layout (store.catalog.tokens) cuts the token axis into units, each a chunk of whole rows. For
each unit this rank owns (`unit % world_size == rank`) the engine asks the array kind to
compute the selected rows not yet committed there, in batches formed within that unit
alone, into one zeroed `[unit_tokens, ...]` buffer per array; a writer thread then writes
the unit's whole chunk, fsyncs it and commits its rows (store.arrays). Because a unit's
batches depend only on the unit and the selection, a killed run rerun with the same
command recomputes exactly the uncommitted units with the same batches: the arrays end up
byte-identical to an uninterrupted run, and a finished run is a no-op. Each unit is
claimed before it is computed (store.claims), so two writers started on the same store and
arrays split the units between them instead of both computing every one.

An array kind (hidden states, SAE codes, ...) subclasses `ArrayKind`: it names its arrays
(`specs`), looks at the planned work once (`plan`), sets up what it needs around the loop
(`__enter__`/`__exit__`: hooks, no-grad modes), fills one unit's buffers (`fill`) and reports
its own counts. `extract_units` does
the rest: plans the work, opens the run record, creates the arrays (rank 0; other ranks
wait for them), runs the loop with `Staging` and `UnitWriter`, records the arrays.

Staging: on CPU a unit's buffers are fresh host arrays handed straight to the writer. On
CUDA (`resident`) they live on the device and go to the host once per unit, non-blocking
into pinned buffers from a small pool, with an event the writer waits on; the GPU never
waits for the host except when every host buffer is still queued for writing.
`resident=True` on CPU runs the same bookkeeping without pinning or events, so the GPU
path is testable on CPU. Every setting writes the same bytes.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from store import claims
from store.arrays import (
    StorageDtype,
    array_exists,
    commit_unit,
    committed_in_unit,
    committed_rows,
    create_array,
    open_array_rw,
    record_array,
    write_unit,
)
from store.catalog.runs import Run
from store.catalog.tokens import Layout
from store.core import Store, StoreError, sweep_temp_files
from store.materialize import view_sql


def wait_for(check: Callable[[], bool], what: str, timeout: float = 3600.0) -> None:
    """Block until rank 0 has written `what` (checked every 0.5 s)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise StoreError(f"gave up after {timeout:.0f} s waiting for rank 0 to write {what}")
        time.sleep(0.5)


def select_rows(store: Store, split: str, max_rows: int | None, view: str | None = None) -> list[str]:
    """Row ids of a split ('all' for every row), kept to those `view` returns (a view name or
    SQL with a row_id column) when given; with max_rows, the first N by row_id (a content
    hash, so effectively a fixed random sample)."""
    if split == "all":
        ids = store.query("SELECT row_id FROM rows ORDER BY row_id").column(0).to_pylist()
    else:
        ids = (
            store.query("SELECT row_id FROM split_members WHERE split = ? ORDER BY row_id", [split])
            .column(0)
            .to_pylist()
        )
        if not ids:
            have = store.query("SELECT DISTINCT split FROM split_members ORDER BY 1").column(0).to_pylist()
            raise ValueError(f"--split {split!r} has no rows; splits in this store: {', '.join(have)} or all")
    if view is not None:
        try:
            t = store.query(f"SELECT * FROM ({view_sql(store, view)}) LIMIT 0")
        except Exception as e:  # noqa: BLE001 - duckdb's errors, or no such view
            raise ValueError(f"--rows-view {view!r} cannot run: {str(e).splitlines()[0]}") from e
        if "row_id" not in t.column_names:
            raise ValueError(
                f"--rows-view {view!r} returns no row_id column (it has {', '.join(t.column_names)}); "
                "select row_id, e.g. SELECT row_id FROM rows WHERE quality = 'poor'"
            )
        keep = set(store.query(f"SELECT DISTINCT row_id FROM ({view_sql(store, view)})").column(0).to_pylist())
        ids = [r for r in ids if r in keep]
        if not ids:
            raise ValueError(f"--rows-view {view!r} keeps none of the {split} rows; check its WHERE clause")
    return ids[:max_rows] if max_rows is not None else ids


class UnitWork(NamedTuple):
    unit: int
    rows: list[int]  # layout indices to compute
    todo: dict[str, set[str]]  # array name -> row ids to write


def plan_work(
    layout: Layout, selected: list[str], names: list[str], rank: int, world_size: int, store: Store
) -> list[UnitWork]:
    """The units of this rank holding selected rows not yet committed in every array."""
    sel = set(selected)
    done = {n: committed_rows(store, n) for n in names}
    work = []
    for unit, idx in sorted(layout.rows_of_unit().items()):
        if unit % world_size != rank:
            continue
        mine = [i for i in idx if layout.row_ids[i] in sel]
        todo = {n: {layout.row_ids[i] for i in mine} - done[n].get(unit, set()) for n in names}
        need = set().union(*todo.values())
        if need:
            work.append(UnitWork(unit, [i for i in mine if layout.row_ids[i] in need], todo))
    return work


def row_slices(layout: Layout, rows: list[int], lo: int) -> list[tuple[int, int, int]]:
    """(layout index, start within the unit, length) of rows, in token order."""
    return sorted(((i, layout.tok_starts[i] - lo, layout.lengths[i]) for i in rows), key=lambda t: t[1])


def drop_partials(store: Store, name: str, unit: int) -> None:
    """Delete zarr's unfinished writes (`*.partial`) of one unit's chunk: a killed writer's,
    since the unit is claimed by this process now."""
    c = store.array_path(name) / "c"
    for f in [*c.glob(f"{unit}.*.partial"), *(c / str(unit)).glob("*.partial")]:
        f.unlink(missing_ok=True)


class UnitWriter:
    """Writes and commits finished units on background threads while the next unit computes.

    An item is `(work, buffers)` or `(work, buffers, ready, release)`: `ready` (a CUDA event,
    or None) is waited on before the buffers are read (their device-to-host copy was queued
    without blocking), and `release(buffers)` hands them back to their pool once written.
    Units are independent (each its own chunk and commit file), so with `threads > 1` they
    are written concurrently, which keeps the disk busy during each unit's fsyncs and
    commit; the order of commits does not matter for readers or for resume."""

    def __init__(self, store: Store, arrays: dict[str, Any], layout: Layout, run_id: str, threads: int = 1):
        self.store, self.arrays, self.layout, self.run_id = store, arrays, layout, run_id
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.seconds = 0.0  # busy time, summed over threads
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, daemon=True, name=f"unit-writer-{k}") for k in range(max(1, threads))
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            work, buffers, ready, release = (*item, None, None)[:4]
            try:
                if self.error is None:
                    if ready is not None:
                        ready.synchronize()
                    t0 = time.perf_counter()
                    self._write(work, buffers)
                    with self._lock:
                        self.seconds += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
            finally:
                if release is not None:
                    release(buffers)

    def _write(self, work: UnitWork, buffers: dict[str, np.ndarray]) -> None:
        lo = work.unit * self.layout.unit_tokens
        for name, todo in work.todo.items():
            if not todo:
                continue
            done = committed_in_unit(self.store, name, work.unit)
            drop_partials(self.store, name, work.unit)  # a killed writer's, of this claimed unit
            buf = buffers[name]
            if done:
                # Keep the committed rows' values: they may come from other batches.
                old = self.arrays[name][lo : lo + self.layout.unit_tokens]
                for i, rid in enumerate(self.layout.row_ids):
                    if self.layout.units[i] == work.unit and rid in done:
                        s = self.layout.tok_starts[i] - lo
                        buf[s : s + self.layout.lengths[i]] = old[s : s + self.layout.lengths[i]]
            write_unit(self.store, self.arrays[name], name, work.unit, buf)
            commit_unit(self.store, name, work.unit, sorted(done | todo), self.run_id)

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self, raise_error: bool = True) -> None:
        """Finish the queued units, then stop (units already computed are still committed)."""
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if raise_error and self.error is not None:
            raise self.error


# numpy storage dtype -> the torch dtype a stage buffer holds (same bits; uint16 as int16)
_TORCH_OF = {
    np.dtype("uint16"): torch.int16,
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("int32"): torch.int32,
    np.dtype("int64"): torch.int64,
}


def stage_dtype(arr: Any) -> torch.dtype:
    return _TORCH_OF[np.dtype(arr.dtype)]


class Staging:
    """Where each unit is assembled: one `[unit_tokens, *width]` buffer per array (see the
    module docstring for the CPU and the device-resident paths)."""

    def __init__(
        self,
        arrays: dict[str, Any],
        unit_tokens: int,
        device: torch.device,
        pool_size: int,
        resident: bool | None = None,
    ):
        self.arrays, self.rows = arrays, unit_tokens
        self.cuda = device.type == "cuda"
        self.resident = self.cuda if resident is None else resident
        self.shape = {n: (unit_tokens, *a.shape[1:]) for n, a in arrays.items()}
        self.dev: dict[str, torch.Tensor] = {}
        self.pool: queue.Queue = queue.Queue()
        if self.resident:
            for n, a in arrays.items():
                self.dev[n] = torch.zeros(self.shape[n], dtype=stage_dtype(a), device=device)
            for _ in range(pool_size):
                self.pool.put(
                    {
                        n: torch.empty(self.shape[n], dtype=stage_dtype(a), pin_memory=self.cuda)
                        for n, a in arrays.items()
                    }
                )

    def begin(self) -> dict[str, torch.Tensor]:
        """Zeroed buffers for the next unit (slots of unselected rows and the tail stay 0)."""
        if self.resident:
            for t in self.dev.values():
                t.zero_()
            return self.dev
        self._host = {n: np.zeros(self.shape[n], dtype=a.dtype) for n, a in self.arrays.items()}
        return {n: torch.from_numpy(h.view(np.int16) if h.dtype == np.uint16 else h) for n, h in self._host.items()}

    def finish(self) -> tuple[dict[str, np.ndarray], Any, Any]:
        """(numpy buffers for the writer, event to wait on or None, release callback or None)."""
        if not self.resident:
            return self._host, None, None
        host = self.pool.get()
        for n in self.arrays:
            host[n].copy_(self.dev[n], non_blocking=self.cuda)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        views = {n: host[n].numpy().view(self.arrays[n].dtype) for n in self.arrays}
        return views, ready, lambda _views, host=host: self.pool.put(host)


class ArraySpec(NamedTuple):
    """One array an array kind fills, on the layout's token axis."""

    name: str  # e.g. hidden/layer_17
    width: int | None  # None: 1-D (one value per token)
    dtype: StorageDtype
    attrs: dict[str, Any]  # the array's own attributes (model, layer, run id, ...)
    kind: str  # the `arrays` table's kind column
    layer: int | None
    extra: dict[str, Any] | None = None  # more `arrays` columns


class ArrayKind:
    """What an array kind plugs into the engine. Subclasses set `names`, `run_kind` and
    `desc`, and implement `specs` and `fill`; `__enter__`/`__exit__` wrap the unit loop."""

    names: list[str] = []
    run_kind = ""  # the runs table's kind, e.g. extract_hidden
    desc = "extract"  # progress bar label

    def specs(self, run_id: str) -> list[ArraySpec]:
        raise NotImplementedError

    def plan(self, work: list[UnitWork]) -> None:
        """Called once with all of this run's work before the loop (e.g. to fetch token ids)."""

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        """Compute `work.rows` of one unit (first slot `lo`) into `stage` (zeroed, slot s of
        a buffer = token lo + s); call `tick(n)` as n tokens are done."""
        raise NotImplementedError

    def counts(self) -> dict[str, Any]:
        return {}

    def metrics(self, seconds: float) -> dict[str, Any]:
        return {}

    def __enter__(self) -> ArrayKind:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


@dataclass(frozen=True)
class UnitOptions:
    """How the engine runs a kind (not what it computes): this process's share of the units, its
    writer threads and staging, how long another writer's claim is honoured, progress bars."""

    rank: int = 0
    world_size: int = 1
    writers: int | None = None  # writer threads; None: 2 on CUDA, 1 on CPU
    resident: bool | None = None  # device-resident unit buffers; None: on with CUDA
    claim_timeout: float = 3600.0  # seconds before another writer's claim counts as stale
    progress: bool = True


class UnitRun(NamedTuple):
    run_id: str | None  # None: nothing was missing
    rows: int
    tokens: int
    seconds: float
    counts: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return self.run_id is None


def claimed_units(
    store: Store,
    scope: str,
    work: list[UnitWork],
    replan: Callable[[], list[UnitWork]],
    timeout: float,
    poll: float = 0.5,
):
    """The units of `work` this process gets to compute, each claimed first. Units another
    live writer holds are left to it; once nothing else is left, they are waited for until
    committed (dropped) or their claim goes stale (taken over, with their work re-planned)."""
    deferred = []
    for w in work:
        if claims.acquire(store, scope, f"u{w.unit:06d}", timeout):
            yield w
        else:
            deferred.append(w.unit)
    if deferred:
        print(f"{len(deferred)} units are claimed by another writer; computing them only if it stops")
    while deferred:
        fresh = {w.unit: w for w in replan()}
        left = []
        for u in deferred:
            if u not in fresh:
                continue  # committed by the other writer
            if claims.acquire(store, scope, f"u{u:06d}", timeout):
                yield fresh[u]
            else:
                left.append(u)
        deferred = left
        if deferred:
            time.sleep(poll)


def open_arrays(store: Store, layout: Layout, specs: list[ArraySpec], rank: int) -> dict[str, zarr.Array]:
    """The kind's arrays: created (or reopened, checked) by rank 0; other ranks wait for them."""
    arrays = {}
    for s in specs:
        if rank == 0:
            arrays[s.name] = create_array(
                store,
                s.name,
                n_slots=layout.n_slots,
                width=s.width,
                chunk_slots=layout.unit_tokens,
                dtype=s.dtype,
                attrs=s.attrs,
            )
            record_array(
                store, s.name, arrays[s.name], kind=s.kind, layer=s.layer, run_id=s.attrs["run_id"], extra=s.extra
            )
        else:
            wait_for(lambda n=s.name: array_exists(store, n), s.name)
            arrays[s.name] = open_array_rw(store, s.name)
    return arrays


def extract_units(
    store: Store,
    layout: Layout,
    selected: list[str],
    kind: ArrayKind,
    *,
    run_config: dict,
    device: torch.device,
    model_id: str = "",
    model_hash: str = "",
    layers: list[int] | None = None,
    engine: UnitOptions | None = None,
) -> UnitRun:
    """Fill `kind`'s arrays for the selected rows not yet committed (see the module docstring).
    `engine.writers` (writer threads) and `engine.resident` (device-resident unit buffers) default
    to the device's best: 2 and True on CUDA, 1 and False on CPU. Units are claimed (store.claims)
    before they are computed, so writers started on the same store and arrays split them;
    a claim older than `engine.claim_timeout` seconds is taken over."""
    engine = engine or UnitOptions()
    rank, world_size, claim_timeout = engine.rank, engine.world_size, engine.claim_timeout
    claims.sweep_stale(store, claim_timeout)  # a killed writer's claims, even of units it committed
    work = plan_work(layout, selected, kind.names, rank, world_size, store)
    if not work:
        print(f"nothing to do: {', '.join(kind.names)} already hold all {len(selected)} selected rows")
        return UnitRun(None, 0, 0, 0.0, {}, {})
    with Run(
        store,
        kind.run_kind,
        run_config,
        model_id=model_id,
        model_hash=model_hash,
        layers=layers,
        rank=rank,
        world_size=world_size,
    ) as run:
        specs = kind.specs(run.run_id)
        arrays = open_arrays(store, layout, specs, rank)
        for s in specs:
            sweep_temp_files(store.array_path(s.name), recursive=False)  # zarr.json writes of killed runs
        kind.plan(work)
        total = sum(layout.lengths[i] for w in work for i in w.rows)
        cuda = device.type == "cuda"
        # On a GPU the disk is the bound: two writer threads overlap one unit's fsync with the next write.
        writer = UnitWriter(store, arrays, layout, run.run_id, threads=engine.writers or (2 if cuda else 1))
        staging = Staging(
            arrays, layout.unit_tokens, device, pool_size=len(writer.threads) + 3, resident=engine.resident
        )
        writer.start()
        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=kind.desc, unit="tok", unit_scale=True, disable=not engine.progress)
        scope = "units-" + hashlib.sha256("|".join(sorted(kind.names)).encode()).hexdigest()[:16]
        replan = lambda: plan_work(layout, selected, kind.names, rank, world_size, store)  # noqa: E731
        mine: list[UnitWork] = []
        try:
            with kind:
                for w in claimed_units(store, scope, work, replan, claim_timeout):
                    stage = staging.begin()
                    kind.fill(w, w.unit * layout.unit_tokens, stage, bar.update)
                    writer.put((w, *staging.finish()))
                    mine.append(w)
        except BaseException:
            writer.close(raise_error=False)  # units already computed are still committed
            claims.release_all(store, scope, claim_timeout)
            raise
        finally:
            bar.close()
        writer.close()
        claims.release_all(store, scope, claim_timeout)  # after the commits: a claim lasts until its unit is visible
        secs = time.perf_counter() - t0
        work = mine
        total = sum(layout.lengths[i] for w in work for i in w.rows)
        for s in specs:
            record_array(store, s.name, arrays[s.name], kind=s.kind, layer=s.layer, run_id=run.run_id, extra=s.extra)
        n_rows = sum(len(w.rows) for w in work)
        counts = {"rows": n_rows, "tokens": total, "units": len(work), **kind.counts()}
        metrics = {
            "seconds": secs,
            "tokens_per_s": total / secs if secs else 0.0,
            "writer_seconds": writer.seconds,
            "writer_threads": len(writer.threads),
            **kind.metrics(secs),
        }
        run.finish(counts=counts, metrics=metrics)
    return UnitRun(run.run_id, n_rows, total, secs, counts, metrics)
