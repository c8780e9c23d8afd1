"""Hidden-state extraction into the store: the library behind `python -m extractors.run`.

For each unit of the layout (a chunk of the token axis holding whole rows) that this rank
owns (`unit % world_size == rank`), the extractor computes the selected rows not yet
committed for each requested layer, in length-sorted batches formed from that unit alone,
writes the unit's whole chunk, fsyncs it, then commits the unit's rows. Because batches
depend only on the unit and the selection, a killed run rerun with the same command
recomputes exactly the uncommitted units with the same batches: the arrays end up
byte-identical to an uninterrupted run. A background thread writes units while the next
one computes.
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
from extractors.model import decoder_layers
from extractors.forward import LayerCapture, pad_batch, padding_fraction, plan_batches, validate_layers
from store.arrays import commit_unit, committed_rows, create_array, encode, record_array, write_unit
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


def _wait_for(check, what: str, timeout: float = 3600.0) -> None:
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
        _wait_for(lambda: any(t["tokenization"] == tz for t in tokenizations(store)), f"tokenization {tz}")
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


class _Writer(threading.Thread):
    """Writes and commits finished units in order, while the next unit computes."""

    def __init__(self, store: Store, arrays: dict[str, Any], layout: Layout, run_id: str):
        super().__init__(daemon=True)
        self.store, self.arrays, self.layout, self.run_id = store, arrays, layout, run_id
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                self._write(*item)
                self.seconds += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def _write(self, work: UnitWork, buffers: dict[str, np.ndarray]) -> None:
        lo = work.unit * self.layout.unit_tokens
        for name, todo in work.todo.items():
            if not todo:
                continue
            done = committed_rows(self.store, name).get(work.unit, set())
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

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
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
                _wait_for(lambda n=name: (store.array_path(n) / "zarr.json").exists(), name)
                arrays[name] = zarr.open_array(str(store.array_path(name)), mode="r+")
        result = _run_units(store, lm, layout, work, layers, names, arrays, spec.dtype, batch_tokens, run, progress)
        for L, name in zip(layers, names):
            record_array(store, name, arrays[name], kind="hidden", layer=L, run_id=run.run_id)
    except BaseException as e:
        run.fail(e)
        raise
    return result


def _run_units(store, lm, layout, work, layers, names, arrays, dtype, batch_tokens, run, progress):
    ids = row_token_ids(store, layout.tokenization, [layout.row_ids[i] for w in work for i in w.rows])
    total = sum(layout.lengths[i] for w in work for i in w.rows)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    cuda = lm.device.type == "cuda"
    writer = _Writer(store, arrays, layout, run.run_id)
    writer.start()
    fwd_s = 0.0
    all_batches = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"extract {','.join(map(str, layers))}", unit="tok", unit_scale=True,
               disable=not progress)
    with LayerCapture(lm.model, layers) as cap:
        for w in work:
            lo = w.unit * layout.unit_tokens
            order = sorted(w.rows, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
            batches = plan_batches(layout.lengths, order, batch_tokens)
            all_batches += batches
            buffers = {n: np.zeros((layout.unit_tokens, arrays[n].shape[1]), dtype=arrays[n].dtype) for n in names}
            for b in batches:
                x = pad_batch([ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, lm.device)
                tf = time.perf_counter()
                out = cap.capture(x)
                if cuda:
                    torch.cuda.synchronize()
                fwd_s += time.perf_counter() - tf
                lens = torch.as_tensor(b.lengths, device=lm.device)
                mask = torch.arange(b.width, device=lm.device)[None, :] < lens[:, None]
                offs = np.concatenate([[0], np.cumsum(b.lengths)])
                for L, n in zip(layers, names):
                    flat = encode(out[L][mask], dtype)     # real tokens only, row after row
                    for k, i in enumerate(b.rows):
                        s = layout.tok_starts[i] - lo
                        buffers[n][s: s + b.lengths[k]] = flat[offs[k]: offs[k + 1]]
                bar.update(sum(b.lengths))
            writer.put((w, buffers))
    writer.close()
    bar.close()
    secs = time.perf_counter() - t0
    pad = padding_fraction(all_batches)
    n_rows = sum(len(w.rows) for w in work)
    result = ExtractResult(run.run_id, n_rows, total, secs, total / secs, total / fwd_s if fwd_s else 0.0, pad, False)
    run.finish(counts={"rows": n_rows, "tokens": total, "units": len(work), "batches": len(all_batches),
                       "padding_fraction": round(pad, 4)},
               metrics={"tokens_per_s": result.tokens_per_s, "forward_tokens_per_s": result.forward_tokens_per_s,
                        "seconds": secs, "forward_seconds": fwd_s, "writer_seconds": writer.seconds})
    return result
