"""Zarr arrays of the store: token-major, preallocated, written and committed in units.

An array is `[n_slots, width]` over a tokenization's layout (see `store.catalog.tokens`): token
`tok_index` of every row is its row in every array of that tokenization. The token axis
is chunked by the layout's unit (one chunk = one unit = a run of whole rows), so a writer
owns whole chunks and two ranks never write the same chunk.

A unit is committed by writing `catalog/array_units/<array>/u<unit>.parquet` listing the
rows it holds (and its chunk file's size and CRC-32), only after its chunk file is fsynced.
Readers trust the commit table,
never the chunk files, so a killed writer leaves nothing visible that is half-written.

Storage dtypes: zarr 3.1 has no bfloat16, so bf16 is stored as its uint16 bit pattern with
`attrs["dtype"] = "bfloat16"`; `decode()` turns it back (exactly) into float32. A plain
zarr reader does the same with `arr[:].astype("uint32") << 16` viewed as float32.
"""

from __future__ import annotations

import os
import threading
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import zarr

from store.core import Store, StoreError, fsync_path
from store.fs import RemotePath, read_parquet, scan, zarr_store
from store.groups import ensure_groups

StorageDtype = Literal["bf16", "fp16", "fp32", "int32", "uint16", "int64"]
_ZARR_DTYPE = {
    "bf16": "uint16",
    "fp16": "float16",
    "fp32": "float32",
    "int32": "int32",
    "uint16": "uint16",
    "int64": "int64",
}
_REAL_DTYPE = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "int32": "int32",
    "uint16": "uint16",
    "int64": "int64",
}

UNITS_TABLE = "array_units"
ARRAYS_TABLE = "arrays"


def array_key(name: str) -> str:
    """`hidden/layer_17` -> `hidden__layer_17`: the name as one path component."""
    return name.replace("/", "__")


def encode(x: Any, dtype: StorageDtype) -> np.ndarray:
    """A torch tensor or numpy array -> the numpy array zarr stores for `dtype`."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if dtype == "bf16":
            return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
        return x.cpu().numpy().astype(_ZARR_DTYPE[dtype], copy=False)
    x = np.asarray(x)
    if dtype == "bf16":
        if x.dtype == np.uint16:
            return x
        f = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # round to nearest even, as torch does
        rounded = (f + 0x7FFF + ((f >> 16) & 1)) >> 16
        return rounded.astype(np.uint16)
    return x.astype(_ZARR_DTYPE[dtype], copy=False)


def decode(raw: np.ndarray, real_dtype: str) -> np.ndarray:
    """Stored values -> float32 (bf16 bit patterns are widened exactly)."""
    if real_dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if raw.dtype.kind == "f":
        return raw.astype(np.float32, copy=False)
    return raw


def create_array(
    store: Store,
    name: str,
    *,
    n_slots: int,
    width: int | None,
    chunk_slots: int,
    dtype: StorageDtype,
    attrs: dict[str, Any],
) -> zarr.Array:
    """Create the array, or open it if it exists with the same shape, dtype and identity.

    `width=None` makes a 1-D array (e.g. per-token gradient norms).
    """
    path = store.array_path(name)
    shape = (n_slots,) if width is None else (n_slots, width)
    chunks = (chunk_slots,) if width is None else (chunk_slots, width)
    attrs = {**attrs, "dtype": _REAL_DTYPE[dtype], "storage_dtype": _ZARR_DTYPE[dtype], "store_array": name}
    ensure_groups(store, name)  # before the array's own metadata: readers that see it see its groups
    if (path / "zarr.json").exists():
        arr = open_array_rw(store, name)
        mism = [k for k in ("tokenization", "model_hash", "dtype") if k in attrs and arr.attrs.get(k) != attrs[k]]
        if tuple(arr.shape) != shape or mism:
            have = {k: arr.attrs.get(k) for k in mism}
            want = {k: attrs[k] for k in mism}
            raise StoreError(
                f"array {name!r} already exists with shape {tuple(arr.shape)} and {have}, "
                f"but this run would write shape {shape} and {want}; use another --store "
                f"or delete {path}"
            )
        return arr
    return zarr.create_array(
        store=zarr_store(path, read_only=False),
        shape=shape,
        chunks=chunks,
        dtype=_ZARR_DTYPE[dtype],
        compressors=None,
        fill_value=0,
        attributes=attrs,
        dimension_names=("token",) if width is None else ("token", "feature"),
        config={"write_empty_chunks": True},
    )


def open_array(store: Store, name: str) -> zarr.Array:
    path = store.array_path(name)
    if not (path / "zarr.json").exists():
        have = (
            [r["name"] for r in store.query("SELECT name FROM arrays ORDER BY 1").to_pylist()]
            if store.has_table(ARRAYS_TABLE)
            else []
        )
        raise StoreError(f"array {name!r} is not in {store.root}; arrays there: {have or 'none'}")
    return zarr.open_array(zarr_store(path, read_only=True), mode="r")


def open_array_rw(store: Store, name: str) -> zarr.Array:
    """An existing array opened for writing (local folder or object storage)."""
    return zarr.open_array(zarr_store(store.array_path(name), read_only=False), mode="r+")


def chunk_path(store: Store, name: str, unit: int, ndim: int) -> Path:
    """The chunk file of one unit (zarr v3's default key encoding: c/<unit>[/0])."""
    path = store.array_path(name) / "c" / str(unit)
    return path / "0" if ndim == 2 else path


def chunk_checksum(path: Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a chunk file: what its commit records and `verify` checks.
    CRC-32 reads at ~3 GB/s here, far above the disk's write speed."""
    crc, size = 0, 0
    with path.open("rb") as fh:  # a local file, or the object read back from the store
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def write_unit(store: Store, arr: zarr.Array, name: str, unit: int, data: np.ndarray) -> None:
    """Write the whole chunk of `unit` and make it durable."""
    chunk = arr.chunks[0]
    arr[unit * chunk : unit * chunk + data.shape[0]] = data
    path = chunk_path(store, name, unit, arr.ndim)
    if isinstance(path, RemotePath):
        return  # the chunk was one PUT, durable when it returned
    fsync_path(path)
    fsync_path(path.parent)


def _unit_part(name: str, unit: int) -> str:
    """The commit file of one unit, as a part of the array_units table."""
    return f"{array_key(name)}/u{unit:06d}"


def commit_unit(store: Store, name: str, unit: int, row_ids: list[str], run_id: str) -> None:
    """Make `row_ids` of `unit` visible to readers (call after `write_unit`). The commit file
    records the chunk file's size and CRC-32, which `python -m store.verify` checks."""
    now = datetime.now(UTC)
    ndim = 2 if (store.array_path(name) / "c" / str(unit)).is_dir() else 1
    size, crc = chunk_checksum(chunk_path(store, name, unit, ndim))
    n = len(row_ids)
    tbl = pa.table(
        {
            "array_name": pa.array([name] * n, pa.string()),
            "unit": pa.array([unit] * n, pa.int32()),
            "row_id": pa.array(sorted(row_ids), pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "committed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "chunk_bytes": pa.array([size] * n, pa.int64()),
            "chunk_crc32": pa.array([crc] * n, pa.int64()),
        }
    )
    store.write_table(UNITS_TABLE, tbl, part=_unit_part(name, unit))


_COMMITTED: dict[str, tuple[list[tuple], pa.Table, dict[str, tuple[tuple, pa.Table]]]] = {}
_COMMITTED_MAX = 64
_COMMITTED_LOCK = threading.Lock()


def _after_fork() -> None:  # a lock held by a parent thread at the fork would never be released
    global _COMMITTED_LOCK
    _COMMITTED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _committed_table(store: Store, name: str) -> pa.Table:
    """(unit, row_id) of every committed row of `name`, cached per process: a commit file is
    read again only when it is added or replaced (name, inode, mtime, size change)."""
    d = store.table_dir(UNITS_TABLE) / array_key(name)
    entries = [(n, *sig) for n, sig in scan(d, ".parquet")]
    with _COMMITTED_LOCK:
        hit = _COMMITTED.get(str(d))
        if hit is not None and hit[0] == entries:
            return hit[1]
        old_files = hit[2] if hit is not None else {}
    files = {}
    for e in entries:
        cached = old_files.get(e[0])
        files[e[0]] = (
            cached
            if cached is not None and cached[0] == e[1:]
            else (e[1:], read_parquet(d / e[0], columns=["unit", "row_id"]))
        )
    schema = pa.schema([("unit", pa.int32()), ("row_id", pa.string())])
    t = pa.concat_tables([f[1].cast(schema) for f in files.values()]) if files else schema.empty_table()
    with _COMMITTED_LOCK:
        if len(_COMMITTED) >= _COMMITTED_MAX and str(d) not in _COMMITTED:
            _COMMITTED.pop(next(iter(_COMMITTED)))
        _COMMITTED[str(d)] = (entries, t, files)
    return t


def committed_in_unit(store: Store, name: str, unit: int) -> set[str]:
    """Rows committed in one unit of one array (reads that unit's commit file alone)."""
    path = store.table_dir(UNITS_TABLE) / f"{_unit_part(name, unit)}.parquet"
    try:
        return set(read_parquet(path, columns=["row_id"]).column(0).to_pylist())
    except FileNotFoundError:
        return set()


def committed_rows(store: Store, name: str) -> dict[int, set[str]]:
    """{unit: rows committed} for one array."""
    t = _committed_table(store, name)
    out: dict[int, set[str]] = {}
    for u, r in zip(t.column("unit").to_pylist(), t.column("row_id").to_pylist(), strict=False):
        out.setdefault(u, set()).add(r)
    return out


def committed_row_ids(store: Store, name: str) -> pa.ChunkedArray:
    """Every row committed in one array (unordered)."""
    return _committed_table(store, name).column("row_id")


def record_array(
    store: Store,
    name: str,
    arr: zarr.Array,
    *,
    kind: str,
    layer: int | None,
    run_id: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """One row in the `arrays` table per array (rewritten when a run adds to it)."""
    a = dict(arr.attrs)
    row = {
        "name": name,
        "kind": kind,
        "layer": layer,
        "dtype": a.get("dtype"),
        "storage_dtype": a.get("storage_dtype"),
        "shape": list(arr.shape),
        "chunks": list(arr.chunks),
        "codec": "none",
        "tokenization": a.get("tokenization"),
        "model": a.get("model"),
        "model_hash": a.get("model_hash"),
        "created_by_run": a.get("run_id"),
        "last_run": run_id,
        "path": str(store.array_path(name).relative_to(store.root)),
        "updated_at": datetime.now(UTC),
        **(extra or {}),
    }
    store.write_rows(ARRAYS_TABLE, [row], part=array_key(name))


# ---- small questions every reader asks ------------------------------------------------
REAL_DTYPE = _REAL_DTYPE  # storage dtype name -> attrs["dtype"]
STORAGE_OF = {v: k for k, v in _REAL_DTYPE.items() if k != "uint16"}  # attrs["dtype"] -> storage name


def array_exists(store: Store, name: str) -> bool:
    """Has the array been created (its zarr.json written)? Says nothing about committed rows."""
    return (store.array_path(name) / "zarr.json").exists()


def committed_set(store: Store, name: str) -> set[str]:
    """Every row committed in one array, as a set (empty when the array does not exist)."""
    return set(committed_row_ids(store, name).to_pylist())


def stored_layers(store: Store, base: str = "hidden") -> dict[int, str]:
    """{layer: array name} of the arrays `<base>/layer_L` that the `arrays` table records and
    that exist (e.g. base "hidden", or "hidden/<adapter>" for an adapter's states)."""
    if not store.has_table(ARRAYS_TABLE):
        return {}
    rows = store.query("SELECT DISTINCT name, layer FROM arrays WHERE layer IS NOT NULL").to_pylist()
    return {
        int(r["layer"]): r["name"]
        for r in sorted(rows, key=lambda r: r["layer"])
        if r["name"] == f"{base}/layer_{r['layer']}" and array_exists(store, r["name"])
    }
