"""Materialize a view: the vectors of the tokens it selects, beside its columns.

`materialize(store, "needle_tokens", array="hidden/layer_17")` runs the view (a name in
sql/views or the store's views/, or any SQL over the catalog; it must return `tok_index`),
checks that every selected row is committed in the array (else says which extraction to
run), and gathers the rows of the array:

* indices are sorted and grouped by chunk, and each chunk file of an uncompressed local
  array is memory-mapped and fancy-indexed (a chunk file is raw C-order rows), which
  beats zarr's own `oindex` several-fold; compressed arrays fall back to `oindex`;
* results come back in the view's row order, as float32 (bf16 is widened exactly);
* `iter_materialize` streams batches for selections larger than memory, in chunk order or
  in a given permutation (a stored shuffle), gathering each batch sorted.
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import zarr

from store.arrays import decode, open_array
from store.core import Store, StoreError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Materialized(NamedTuple):
    X: np.ndarray           # [n, width] float32 (or a torch tensor with as_torch=True)
    frame: pl.DataFrame     # the view's columns, row i describes X[i]
    array: str


def view_sql(store: Store, view_or_sql: str) -> str:
    """A bare name is a view or table of the store; anything else is SQL."""
    name = view_or_sql.strip()
    if _IDENT.match(name):
        known = {p.stem for p in store.view_files()} | set(store.tables())
        if name not in known:
            raise StoreError(f"no view or table named {name!r}; views: {', '.join(sorted(known))}")
        return f'SELECT * FROM "{name}"'
    return view_or_sql


def view_text(store: Store, view_or_sql: str) -> str:
    """The SQL text behind a view name (its .sql file), for run records; SQL is returned as is."""
    name = view_or_sql.strip()
    if _IDENT.match(name):
        for p in store.view_files():
            if p.stem == name:
                return p.read_text()
    return view_sql(store, view_or_sql)


def select(store: Store, view_or_sql: str, array: str | None = None) -> pl.DataFrame:
    """Run the view; with `array`, fail unless all its rows are committed there."""
    sql = view_sql(store, view_or_sql)
    con = store.connect()
    try:
        frame = pl.from_arrow(con.sql(sql).to_arrow_table())
        if array is not None and len(frame):
            if "row_id" not in frame.columns:
                raise StoreError("the view must return row_id (join tokens or rows) to be materialized")
            con.register("_sel", pa.table({"row_id": frame["row_id"].unique().to_arrow()}))
            committed = "(SELECT row_id FROM array_units WHERE array_name = $a)" if store.has_table("array_units") \
                else "(SELECT NULL::VARCHAR AS row_id WHERE false)"
            missing = con.sql(f"SELECT s.row_id, r.split FROM _sel s JOIN rows r USING (row_id) "
                              f"ANTI JOIN {committed} u USING (row_id) ORDER BY 1",
                              params={"a": array} if "$a" in committed else None).fetchall()
            if missing:
                counts: dict[str, int] = {}
                for _, split in missing:
                    counts[split] = counts.get(split, 0) + 1
                where = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))
                layer = array.rsplit("_", 1)[-1] if array.startswith("hidden/layer_") else "L"
                raise StoreError(
                    f"{len(missing)} of {frame['row_id'].n_unique()} selected rows are not in {array} "
                    f"(e.g. {missing[0][0]}; splits: {where}); extract them first: "
                    f"python -m extractors.run --layer {layer} --store {store.root}")
    finally:
        con.close()
    if array is not None and "tok_index" not in frame.columns:
        raise StoreError("the view must return tok_index (join the tokens table) to be materialized")
    return frame


def gather(store: Store, array: str | zarr.Array, tok_index: np.ndarray, *, decoded: bool = True) -> np.ndarray:
    """Rows `tok_index` of an array, in the given order (sorted, chunk-aware reads)."""
    arr = open_array(store, array) if isinstance(array, str) else array
    idx = np.asarray(tok_index, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    out = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
    if len(idx):
        if sidx[0] < 0 or sidx[-1] >= arr.shape[0]:
            raise StoreError(f"tok_index out of range 0..{arr.shape[0] - 1} for {arr.attrs.get('store_array')}")
        _gather_sorted(arr, sidx, out, order)
    return decode(out, arr.attrs.get("dtype", str(arr.dtype))) if decoded else out


def _chunk_file(arr: zarr.Array, chunk: int):
    from pathlib import Path

    root = getattr(arr.store, "root", None)
    if root is None or arr.compressors or arr.filters:
        return None
    base = Path(root) / arr.path if arr.path else Path(root)
    return base / "c" / str(chunk) / "0" if arr.ndim == 2 else base / "c" / str(chunk)


def _gather_sorted(arr: zarr.Array, sidx: np.ndarray, out: np.ndarray, order: np.ndarray) -> None:
    rows = arr.chunks[0]
    chunk_of = sidx // rows
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(sidx)]])
    fast = _chunk_file(arr, 0) is not None
    for s, e in zip(starts, ends):
        c = int(chunk_of[s])
        local = sidx[s:e] - c * rows
        path = _chunk_file(arr, c) if fast else None
        if path is not None and path.exists():
            mm = np.memmap(path, dtype=arr.dtype, mode="r", shape=(rows, *arr.shape[1:]))
            out[order[s:e]] = mm[local]
            del mm
        elif path is not None:
            out[order[s:e]] = 0  # chunk never written: fill value (commit checks keep this unread)
        else:
            out[order[s:e]] = arr.oindex[sidx[s:e]] if arr.ndim > 1 else arr.oindex[(sidx[s:e],)]


def _pool(X: np.ndarray, frame: pl.DataFrame, pool: str) -> tuple[np.ndarray, pl.DataFrame]:
    """One vector per row_id (first-appearance order): mean over its tokens, or its last token."""
    f = frame.with_row_index("_i")
    groups = f.group_by("row_id", maintain_order=True).agg(pl.col("_i"))
    if pool == "last":
        pos = "token_pos" if "token_pos" in f.columns else "_i"
        last = f.sort(pos).group_by("row_id", maintain_order=True).agg(pl.col("_i").last())
        last = groups.select("row_id").join(last, on="row_id", how="left")
        take = last["_i"].to_numpy()
        return X[take], frame[take]
    if pool != "mean":
        raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
    out = np.stack([X[np.asarray(ix)].mean(axis=0) for ix in groups["_i"].to_list()]) if len(groups) else X[:0]
    first = np.array([ix[0] for ix in groups["_i"].to_list()], dtype=np.int64)
    return out, frame[first]


def materialize(store: Store, view_or_sql: str, array: str = "hidden/layer_17", *,
                pool: str | None = None, as_torch: bool = False) -> Materialized:
    """Vectors + columns of the tokens the view selects (see the module docstring).

    `pool="mean"|"last"` returns one vector per row_id instead (row-level probes)."""
    frame = select(store, view_or_sql, array)
    X = gather(store, array, frame["tok_index"].to_numpy())
    if pool is not None:
        X, frame = _pool(X, frame, pool)
    if as_torch:
        import torch

        X = torch.from_numpy(X)
    return Materialized(X, frame, array)


def iter_materialize(store: Store, view_or_sql: str, array: str = "hidden/layer_17", *,
                     batch_size: int = 65536, order: str | np.ndarray = "chunk") -> Iterator[Materialized]:
    """Stream a large selection in batches of `batch_size` tokens.

    order: "chunk" (ascending tok_index: sequential reads), "view" (the view's order), or a
    permutation of range(n_selected) (e.g. a shuffle saved with a training run)."""
    frame = select(store, view_or_sql, array)
    arr = open_array(store, array)
    if isinstance(order, str):
        if order not in ("chunk", "view"):
            raise ValueError(f"order must be 'chunk', 'view' or a permutation, got {order!r}")
        perm = np.argsort(frame["tok_index"].to_numpy(), kind="stable") if order == "chunk" else np.arange(len(frame))
    else:
        perm = np.asarray(order, dtype=np.int64)
        if len(perm) != len(frame) or not np.array_equal(np.sort(perm), np.arange(len(frame))):
            raise ValueError(f"order must be a permutation of range({len(frame)}) (the view's row count)")
    tok = frame["tok_index"].to_numpy()
    for s in range(0, len(perm), batch_size):
        take = perm[s: s + batch_size]
        yield Materialized(gather(store, arr, tok[take]), frame[take], array)
