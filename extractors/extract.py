"""Hidden-state extraction into the store: the library behind `python -m extractors.run`.

For each unit of the layout (a chunk of the token axis holding whole rows) that this rank
owns (`unit % world_size == rank`), the extractor computes the selected rows not yet
committed for each requested layer, in length-sorted batches formed from that unit alone,
writes the unit's whole chunk, fsyncs it, then commits the unit's rows. Because batches
depend only on the unit and the selection, a killed run rerun with the same command
recomputes exactly the uncommitted units with the same batches: the arrays end up
byte-identical to an uninterrupted run. A background thread writes units while the next
one computes.

Per batch there is no per-token Python and no host synchronisation: the real tokens' flat
positions and their unit slots are computed with numpy, each layer's output is gathered
(`index_select`), cast to the storage dtype and scattered into the unit buffer
(`index_copy_`) where the model runs. On CUDA the unit buffer lives on the GPU and goes to
the host once per unit, non-blocking into pinned memory, with an event the writer waits on
(see `_Staging`); on CPU the unit buffer is the host array the writer gets. Both paths give
the same bytes as `store.arrays.encode` of the masked outputs.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
import zarr
from tqdm.auto import tqdm

from extractors.chat_tokens import tokenize_rows, tokenizer_hash
from extractors.forward import Batch, LayerCapture, pad_batch, padding_fraction, plan_batches, validate_layers
from extractors.model import decoder_layers
from store.arrays import commit_unit, committed_in_unit, committed_rows, create_array, record_array, write_unit
from store.core import Store, StoreError
from store.runs import Run
from store.tokens import Layout, plan_layout, read_layout, tokenizations, write_tokenization


class ExtractResult(NamedTuple):
    run_id: str | None
    rows: int
    tokens: int
    seconds: float
    tokens_per_s: float
    forward_tokens_per_s: float
    padding: float
    skipped: bool


def hidden_array_name(layer: int) -> str:
    return f"hidden/layer_{layer}"


def wait_for(check, what: str, timeout: float = 3600.0) -> None:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise StoreError(f"gave up after {timeout:.0f} s waiting for rank 0 to write {what}")
        time.sleep(0.5)


def ensure_tokenization(store: Store, tok: Any, model_id: str, unit_tokens: int, rank: int = 0,
                        progress: bool = True) -> Layout:
    """The store's tokenization for this tokenizer, created on first use (by rank 0)."""
    ingest_id = store.query("SELECT ingest_id FROM manifests").column(0)[0].as_py()
    tz = "tok-" + hashlib.sha256(f"{tokenizer_hash(tok)}:{ingest_id}".encode()).hexdigest()[:12]
    have = tokenizations(store)
    if any(t["tokenization"] == tz for t in have):
        return read_layout(store, tz)
    if have:
        raise StoreError(
            f"{store.root} is tokenized for {have[0]['model']} ({have[0]['tokenization']}); "
            f"{model_id} tokenizes differently. Use another --store for this model.")
    if rank != 0:
        wait_for(lambda: any(t["tokenization"] == tz for t in tokenizations(store)), f"tokenization {tz}")
        return read_layout(store, tz)
    rows = store.query("SELECT row_id, split, messages FROM rows ORDER BY row_id").to_pydict()
    table = tokenize_rows(tok, rows["row_id"],
                          tqdm(rows["messages"], desc="tokenize", unit="row", disable=not progress))
    counts: dict[str, int] = {}
    for r in table.column("row_id").to_pylist():
        counts[r] = counts.get(r, 0) + 1
    layout = plan_layout(tz, [(r, s, counts[r]) for r, s in zip(rows["row_id"], rows["split"])], unit_tokens)
    write_tokenization(store, layout, table, {"model": model_id, "tokenizer_hash": tokenizer_hash(tok),
                                              "ingest_id": ingest_id})
    store.refresh_catalog()
    return layout


def select_rows(store: Store, split: str, max_rows: int | None) -> list[str]:
    """Row ids of a split ('all' for every row); with max_rows, the first N by row_id (a
    content hash, so effectively a fixed random sample)."""
    if split == "all":
        ids = store.query("SELECT row_id FROM rows ORDER BY row_id").column(0).to_pylist()
    else:
        ids = store.query("SELECT row_id FROM split_members WHERE split = ? ORDER BY row_id", [split]).column(0).to_pylist()
        if not ids:
            have = store.query("SELECT DISTINCT split FROM split_members ORDER BY 1").column(0).to_pylist()
            raise ValueError(f"--split {split!r} has no rows; splits in this store: {', '.join(have)} or all")
    return ids[:max_rows] if max_rows is not None else ids


def row_token_ids(store: Store, tokenization: str, row_ids: list[str]) -> dict[str, list[int]]:
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        t = con.sql(
            "SELECT row_id, list(token_id ORDER BY token_pos) AS ids FROM tokens JOIN wanted USING (row_id) "
            "WHERE tokenization = ? GROUP BY row_id", params=[tokenization]).to_arrow_table()
    finally:
        con.close()
    return dict(zip(t.column("row_id").to_pylist(), t.column("ids").to_pylist()))


class UnitWork(NamedTuple):
    unit: int
    rows: list[int]                  # layout indices to compute
    todo: dict[str, set[str]]        # array name -> row ids to write


def plan_work(layout: Layout, selected: list[str], names: list[str], rank: int, world_size: int,
              store: Store) -> list[UnitWork]:
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
        self.seconds = 0.0                      # busy time, summed over threads
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self.run, daemon=True, name=f"unit-writer-{k}")
                         for k in range(max(1, threads))]

    def start(self) -> None:
        for t in self._threads:
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
            buf = buffers[name]
            if done:
                # Keep the committed rows' values: they may come from other batches.
                old = self.arrays[name][lo: lo + self.layout.unit_tokens]
                for i, rid in enumerate(self.layout.row_ids):
                    if self.layout.units[i] == work.unit and rid in done:
                        s = self.layout.tok_starts[i] - lo
                        buf[s: s + self.layout.lengths[i]] = old[s: s + self.layout.lengths[i]]
            write_unit(self.store, self.arrays[name], name, work.unit, buf)
            commit_unit(self.store, name, work.unit, sorted(done | todo), self.run_id)

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self, raise_error: bool = True) -> None:
        """Finish the queued units, then stop (units already computed are still committed)."""
        for _ in self._threads:
            self.q.put(None)
        for t in self._threads:
            t.join()
        if raise_error and self.error is not None:
            raise self.error


@dataclass
class HiddenSpec:
    layers: list[int]
    dtype: str                 # storage dtype: bf16 | fp16 | fp32


def extract_hidden(store: Store, lm: Any, layout: Layout, selected: list[str], spec: HiddenSpec, *,
                   batch_tokens: int, run_config: dict, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> ExtractResult:
    """Fill hidden/layer_L for the selected rows (see the module docstring)."""
    n_layers = len(decoder_layers(lm.model))
    layers = validate_layers(spec.layers, n_layers, lm.model_id)
    names = [hidden_array_name(L) for L in layers]
    work = plan_work(layout, selected, names, rank, world_size, store)
    if not work:
        print(f"nothing to do: {', '.join(names)} already hold all {len(selected)} selected rows")
        return ExtractResult(None, 0, 0, 0.0, 0.0, 0.0, 0.0, True)

    run = Run(store, "extract_hidden", run_config, model_id=lm.model_id, model_hash=lm.model_hash,
              layers=layers, rank=rank, world_size=world_size)
    try:
        d_model = lm.model.config.hidden_size
        attrs = {"model": lm.model_id, "model_hash": lm.model_hash, "tokenization": layout.tokenization,
                 "run_id": run.run_id, "kind": "hidden", "d_model": d_model,
                 "layer_convention": "output of decoder block L (0-based) = transformers hidden_states[L+1]"}
        arrays = {}
        for L, name in zip(layers, names):
            if rank == 0:
                arrays[name] = create_array(store, name, n_slots=layout.n_slots, width=d_model,
                                            chunk_slots=layout.unit_tokens, dtype=spec.dtype, attrs={**attrs, "layer": L})
                record_array(store, name, arrays[name], kind="hidden", layer=L, run_id=run.run_id)
            else:
                wait_for(lambda n=name: (store.array_path(n) / "zarr.json").exists(), name)
                arrays[name] = zarr.open_array(str(store.array_path(name)), mode="r+")
        result = _run_units(store, lm, layout, work, layers, names, arrays, spec.dtype, batch_tokens, run, progress)
        for L, name in zip(layers, names):
            record_array(store, name, arrays[name], kind="hidden", layer=L, run_id=run.run_id)
    except BaseException as e:
        run.fail(e)
        raise
    return result


def unit_batches(layout: Layout, rows: list[int], batch_tokens: int) -> list[Batch]:
    """The batches of one unit's rows: sorted by (length, row_id), packed greedily up to
    batch_tokens padded tokens. A function of the unit's rows alone, so a resumed run
    recomputes a unit with the very batches an uninterrupted run used."""
    order = sorted(rows, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
    return plan_batches(layout.lengths, order, batch_tokens)


def token_index(layout: Layout, b: Batch, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) for a batch: flat positions of its real tokens in the padded [B*T] batch,
    and their slots in the unit buffer (row after row). Vectorized: no per-token Python."""
    lens = np.asarray(b.lengths, dtype=np.int64)
    n = int(lens.sum())
    first = np.repeat(np.cumsum(lens) - lens, lens)           # index of each token's row start
    pos = np.arange(n, dtype=np.int64) - first                # token position within its row
    rows = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    starts = np.asarray([layout.tok_starts[i] - lo for i in b.rows], dtype=np.int64)
    return rows * b.width + pos, starts[rows] + pos


# Same bits as store.arrays.encode(tensor, dtype), computed where the tensor lives.
_STAGE_DTYPE = {"bf16": torch.int16, "fp16": torch.float16, "fp32": torch.float32}


def to_storage(h: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "bf16":
        return h.to(torch.bfloat16).view(torch.int16)
    return h.to(_STAGE_DTYPE[dtype])


class _Staging:
    """Where each unit is assembled, one [unit_tokens, d] buffer per array.

    CPU: a fresh zeroed host buffer per unit, filled in place and handed to the writer.
    CUDA (`resident`): one buffer per array on the device, filled in place there; at the
    unit's end it is copied with non_blocking=True into a pinned host buffer taken from a
    small pool, and a CUDA event marks the copy, which the writer waits on. The GPU never
    waits for the host: the only blocking point is the pool (every host buffer still queued
    for writing). `resident=True` on CPU runs the same logic without pinning or events, so
    the GPU path's bookkeeping is testable on CPU."""

    def __init__(self, names: list[str], arrays: dict[str, Any], unit_tokens: int, dtype: str,
                 device: torch.device, pool_size: int, resident: bool | None = None):
        self.names, self.arrays, self.rows, self.dtype = names, arrays, unit_tokens, dtype
        self.cuda = device.type == "cuda"
        self.resident = self.cuda if resident is None else resident
        self.width = {n: arrays[n].shape[1] for n in names}
        self.dev: dict[str, torch.Tensor] = {}
        self.pool: queue.Queue = queue.Queue()
        if self.resident:
            for n in names:
                self.dev[n] = torch.zeros((unit_tokens, self.width[n]), dtype=_STAGE_DTYPE[dtype], device=device)
            for _ in range(pool_size):
                self.pool.put({n: torch.empty((unit_tokens, self.width[n]), dtype=_STAGE_DTYPE[dtype],
                                              pin_memory=self.cuda) for n in names})

    def begin(self) -> dict[str, torch.Tensor]:
        """Zeroed buffers for the next unit (slots of unselected rows and the tail stay 0)."""
        if self.resident:
            for t in self.dev.values():
                t.zero_()
            return self.dev
        self._host = {n: np.zeros((self.rows, self.width[n]), dtype=self.arrays[n].dtype) for n in self.names}
        return {n: torch.from_numpy(a.view(np.int16) if self.dtype == "bf16" else a) for n, a in self._host.items()}

    def finish(self) -> tuple[dict[str, np.ndarray], Any, Any]:
        """(numpy buffers for the writer, event to wait on or None, release callback or None)."""
        if not self.resident:
            return self._host, None, None
        host = self.pool.get()
        for n in self.names:
            host[n].copy_(self.dev[n], non_blocking=self.cuda)
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        views = {n: host[n].numpy().view(self.arrays[n].dtype) for n in self.names}
        return views, ready, lambda _views, host=host: self.pool.put(host)


def _run_units(store, lm, layout, work, layers, names, arrays, dtype, batch_tokens, run, progress,
               writers: int | None = None, resident: bool | None = None):
    """The extraction loop (see the module docstring). `writers` (writer threads) and
    `resident` (device-resident unit buffers + host pool) default to the device's best:
    2 and True on CUDA, 1 and False on CPU; any setting writes the same bytes."""
    ids = row_token_ids(store, layout.tokenization, [layout.row_ids[i] for w in work for i in w.rows])
    total = sum(layout.lengths[i] for w in work for i in w.rows)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    dev = lm.device
    cuda = dev.type == "cuda"
    # On a GPU the disk is the bound: two writer threads overlap one unit's fsync with the next write.
    writer = UnitWriter(store, arrays, layout, run.run_id, threads=writers or (2 if cuda else 1))
    staging = _Staging(names, arrays, layout.unit_tokens, dtype, dev, pool_size=len(writer._threads) + 3,
                       resident=resident)
    writer.start()
    fwd_s, events = 0.0, []
    all_batches = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"extract {','.join(map(str, layers))}", unit="tok", unit_scale=True,
               disable=not progress)
    try:
        with LayerCapture(lm.model, layers) as cap, torch.inference_mode():
            for w in work:
                lo = w.unit * layout.unit_tokens
                batches = unit_batches(layout, w.rows, batch_tokens)
                all_batches += batches
                stage = staging.begin()
                for b in batches:
                    x = pad_batch([ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, dev)
                    src, dst = (_to_device(torch.from_numpy(a), dev) for a in token_index(layout, b, lo))
                    if cuda:
                        events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                        events[-1][0].record()
                    else:
                        tf = time.perf_counter()
                    out = cap.capture(x)
                    if cuda:
                        events[-1][1].record()
                    else:
                        fwd_s += time.perf_counter() - tf
                    for L, n in zip(layers, names):
                        h = out[L].reshape(-1, out[L].shape[-1]).index_select(0, src)
                        stage[n].index_copy_(0, dst, to_storage(h, dtype))
                    bar.update(sum(b.lengths))
                writer.put((w, *staging.finish()))
    except BaseException:
        writer.close(raise_error=False)   # units already computed are still committed
        raise
    writer.close()
    bar.close()
    secs = time.perf_counter() - t0
    if cuda:
        fwd_s = sum(a.elapsed_time(b) for a, b in events) / 1000.0   # all done: the writer waited
    pad = padding_fraction(all_batches)
    n_rows = sum(len(w.rows) for w in work)
    result = ExtractResult(run.run_id, n_rows, total, secs, total / secs, total / fwd_s if fwd_s else 0.0, pad, False)
    run.finish(counts={"rows": n_rows, "tokens": total, "units": len(work), "batches": len(all_batches),
                       "padding_fraction": round(pad, 4)},
               metrics={"tokens_per_s": result.tokens_per_s, "forward_tokens_per_s": result.forward_tokens_per_s,
                        "seconds": secs, "forward_seconds": fwd_s, "writer_seconds": writer.seconds,
                        "writer_threads": len(writer._threads)})
    return result


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned source on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
