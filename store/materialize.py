"""Materialize a view: the vectors of the tokens it selects, beside its columns.

`materialize(store, "needle_tokens", array="hidden/layer_17")` runs the view (a name in
sql/views or the store's views/, or any SQL over the catalog; it returns `row_id` and
`tok_index`, one line per token), checks that every selected row is committed in the array
(else says which extraction to run), and gathers the rows of the array. A view that returns
`row_id` and no token columns (e.g. `SELECT row_id, category FROM rows WHERE ...`) selects
whole rows: every token of each row, located through `row_layout` without scanning the
tokens table. The order of the result is the view's: a view without ORDER BY has none in
DuckDB (parallel scans, joins), so order explicitly where it matters.

* indices are sorted and grouped by chunk, and each chunk file of an uncompressed local
  array is memory-mapped and fancy-indexed (a chunk file is raw C-order rows), which
  beats zarr's own `oindex` several-fold; compressed arrays fall back to `oindex`;
* results come back in the view's row order, as float32 (bf16 is widened exactly, in
  place in the output); `sample=N, seed=S` keeps a seeded uniform sample of N of the view's
  tokens (or rows) instead, in key order, drawn in linear time without a sort (store.reads.sample);
* `iter_materialize` streams batches for selections larger than memory, in chunk order or
  in a given permutation (a stored shuffle), gathering each batch sorted; `columns=` projects
  the view inside DuckDB, so the columns a training loop does not use are never built.

The fixed cost of a call is small and mostly the view's own SQL: the store's DuckDB views
are registered once per Store and the small tables are native in-memory copies (store.core,
store.native), the commit check reads a cached list of committed rows, and each process
keeps one `ArrayReader` per array (`reader()`) whose chunk maps live between calls (each
checked against its file once per call, so rewritten chunks are seen). `drop_read_cache()`
forgets them, as a fresh process starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np
import polars as pl
import zarr

from store.arrays import committed_row_ids, open_array
from store.catalog.tokens import read_layout
from store.core import Store, StoreError, _sql_str, file_signature
from store.reads.ranges import range_reader
from store.reads.sample import check_sample, draw

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Materialized(NamedTuple):
    X: np.ndarray  # [n, width] float32 (or a torch tensor with as_torch=True)
    frame: pl.DataFrame  # the view's columns, row i describes X[i]
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


def select(
    store: Store,
    view_or_sql: str,
    array: str | None = None,
    *,
    columns: list[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> pl.DataFrame:
    """Run the view; with `array`, fail unless all its rows are committed there.

    `columns`: only these of the view's columns (row_id, tok_index and token_pos always, where
    the view has them), projected inside DuckDB so the others are never read or built (a
    streamed `content_tokens` without its 11 text/metadata columns: 112 -> 44 ms).
    `sample=N, seed=S`: the seeded uniform sample of N of the view's tokens (of a row-level
    view: N rows, with all their tokens), in key order, drawn without sorting (store.reads.sample)."""
    if sample is not None:
        check_sample(sample, seed)
    sql = view_sql(store, view_or_sql)
    con = store.connect()
    try:
        if columns is None:
            frame = pl.from_arrow(con.sql(sql).to_arrow_table())
        else:  # one statement (a second bind of the view costs ms): the wanted columns it has
            wanted = sorted({"row_id", "tok_index", "token_pos", *columns})
            pattern = "^(" + "|".join(re.escape(c) for c in wanted) + ")$"
            try:
                frame = pl.from_arrow(
                    con.sql(
                        f"SELECT COLUMNS({_sql_str(pattern)}) FROM (\n{sql.strip().rstrip(';')}\n) AS _view"
                    ).to_arrow_table()
                )
            except (
                duckdb.Error
            ):  # not a plain SELECT, or none of those columns: as written, and the checks below say why
                frame = pl.from_arrow(con.sql(sql).to_arrow_table())
            unknown = sorted(set(columns) - set(frame.columns) - {"tok_index", "token_pos"})
            if unknown:
                raise ValueError(f"columns {unknown} are not in the view; it has {con.sql(sql).columns}")
    finally:
        con.close()
    if sample is not None:
        frame = _sample(store, array, frame, sample, seed)
    if array is not None and len(frame):
        if "row_id" not in frame.columns:
            raise StoreError("the view must return row_id (join tokens or rows) to be materialized")
        selected = frame["row_id"].unique()
        missing = selected.filter(~selected.is_in(pl.Series(committed_row_ids(store, array)).implode()))
        if len(missing):
            missing_error(store, array, missing.sort(), len(selected))
    if array is not None and "tok_index" not in frame.columns:
        if "token_pos" in frame.columns or "row_id" not in frame.columns or frame["row_id"].is_duplicated().any():
            raise StoreError(
                "the view must return tok_index (join the tokens table) to be materialized, "
                "or return each row_id once (and no token columns) to select whole rows"
            )
        frame = _whole_rows(store, array, frame)
    return frame


def _sample(store: Store, array: str | None, frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """The view's lines of the seeded sample: tokens keyed by tok_index; whole rows (a row-level
    view) by their first token's tok_index, so a row sample is N rows."""
    if "tok_index" in frame.columns:
        return frame[draw(frame["tok_index"].to_numpy(), n, seed)]
    if array is None or "row_id" not in frame.columns or "token_pos" in frame.columns:
        raise StoreError(
            f"a sample needs the view to return tok_index (tokens), or row_id and no token columns "
            f"(whole rows, with an array); it returns {frame.columns}"
        )
    tz = reader(store, array).arr.attrs.get("tokenization")
    starts = frame.select("row_id").join(_layout_frame(store, tz), on="row_id", how="left", maintain_order="left")
    if tz is None or starts["tok_start"].null_count() or frame["row_id"].is_duplicated().any():
        return frame  # unsampled: select's checks below say what is wrong
    return frame[draw(starts["tok_start"].to_numpy(), n, seed)]


_LAYOUTS: dict[tuple[str, str], tuple[list[tuple], pl.DataFrame]] = {}


def _layout_frame(store: Store, tz: str) -> pl.DataFrame:
    """row_id, tok_start, n_tokens of a tokenization, cached until row_layout's files change."""
    sig = [(str(p), *file_signature(p)) for p in store.table_files("row_layout")]
    hit = _LAYOUTS.get((str(store.root), tz))
    if hit is None or hit[0] != sig:
        lay = read_layout(store, tz)
        hit = _LAYOUTS[(str(store.root), tz)] = (
            sig,
            pl.DataFrame(
                {"row_id": lay.row_ids, "tok_start": lay.tok_starts, "n_tokens": lay.lengths},
                schema={"row_id": pl.String, "tok_start": pl.Int64, "n_tokens": pl.Int64},
            ),
        )
    return hit[1]


def _whole_rows(store: Store, array: str, frame: pl.DataFrame) -> pl.DataFrame:
    """A row-level view (row_id, no tok_index) -> one line per token of each row, in the view's
    row order, with token_pos and tok_index from row_layout: rows are contiguous runs of the
    token axis, so the tokens table is not scanned."""
    tz = reader(store, array).arr.attrs.get("tokenization")
    if tz is None:
        raise StoreError(
            f"{array} has no tokenization attribute, so whole rows cannot be located; "
            "select tokens (join the tokens table and return tok_index)"
        )
    f = frame.select("row_id").with_row_index("_i").join(_layout_frame(store, tz), on="row_id", how="left").sort("_i")
    if f["tok_start"].null_count():
        bad = f.filter(pl.col("tok_start").is_null())["row_id"][0]
        raise StoreError(f"row {bad!r} is not in tokenization {tz} of {store.root}")
    start, n = f["tok_start"].to_numpy(), f["n_tokens"].to_numpy()
    line = np.repeat(np.arange(len(f)), n)  # the view's line of each token
    first = np.repeat(np.cumsum(n) - n, n)
    pos = np.arange(len(line), dtype=np.int64) - first
    return frame[line].with_columns(
        pl.Series("token_pos", pos.astype(np.int32)), pl.Series("tok_index", start[line] + pos)
    )


def missing_error(store: Store, array: str, missing: pl.Series, n_selected: int) -> None:
    splits = pl.from_arrow(store.query("SELECT row_id, split FROM rows")).join(
        missing.to_frame("row_id"), on="row_id", how="semi"
    )
    counts = splits.group_by("split").len().sort("split").rows()
    where = ", ".join(f"{k} ({v})" for k, v in counts)
    layer = array.rsplit("_", 1)[-1] if array.startswith("hidden/layer_") else "L"
    raise StoreError(
        f"{len(missing)} of {n_selected} selected rows are not in {array} "
        f"(e.g. {missing[0]}; splits: {where}); extract them first: "
        f"python -m extractors.run --layer {layer} --store {store.root}"
    )


class ArrayReader:
    """Gathers rows of one array, keeping its chunk files memory-mapped between calls.

    `gather()` below makes one per call; a loop over batches (streaming, training) keeps one
    for the whole pass. Chunk files are replaced atomically by writers, so a map held open
    sees the chunk as it was when first read, never a torn one."""

    def __init__(self, store: Store, array: str | zarr.Array):
        self.arr = open_array(store, array) if isinstance(array, str) else array
        self.name = self.arr.attrs.get("store_array", str(array))
        self.dtype = self.arr.attrs.get("dtype", str(self.arr.dtype))
        self._rows = self.arr.chunks[0]
        self._base = _chunk_base(self.arr)
        # On object storage (no files to map): byte-range reads of the chunk objects (store.reads.ranges).
        self._ranges = range_reader(self.arr) if self._base is None else None
        # chunk -> (its file's signature, its map); a map is checked against the file once per
        # gather call, so a reader kept between calls (`reader()`) sees replaced chunks.
        self._maps: dict[int, tuple[tuple | None, np.memmap | None]] = {}
        self._checked: set[int] = set()

    def _chunk(self, c: int) -> np.memmap | None:
        """The chunk's rows (None: never written, read as the fill value 0)."""
        if c in self._checked:
            return self._maps[c][1]
        path = self._base / "c" / str(c)
        path = path / "0" if self.arr.ndim == 2 else path
        try:
            sig = file_signature(path)
        except FileNotFoundError:
            sig = None
        hit = self._maps.get(c)
        if hit is None or hit[0] != sig:
            if len(self._maps) >= _MAX_MAPS:  # bounded: the kernel allows ~65k maps per process
                self._maps.pop(next(iter(self._maps)))
            # A plain ndarray view of the map: np.memmap's subclass hooks slow every slice.
            self._maps[c] = hit = (
                sig,
                None
                if sig is None
                else np.asarray(
                    np.memmap(path, dtype=self.arr.dtype, mode="r", shape=(self._rows, *self.arr.shape[1:]))
                ),
            )
        self._checked.add(c)
        return hit[1]

    def gather(self, tok_index: np.ndarray, *, decoded: bool = True) -> np.ndarray:
        """Rows `tok_index`, in the given order: sorted reads, chunk by chunk, written straight
        into the output (bf16 is widened in place: one pass, no temporary float copy)."""
        arr, idx = self.arr, np.asarray(tok_index, dtype=np.int64)
        self._checked = set()
        widen = decoded and self.dtype == "bfloat16"
        out_dtype = np.uint32 if widen else np.float32 if decoded and arr.dtype.kind == "f" else arr.dtype
        out = np.empty((len(idx), *arr.shape[1:]), dtype=out_dtype)
        if not len(idx):
            return out.view(np.float32) if widen else out
        if idx.min() < 0 or idx.max() >= arr.shape[0]:
            raise StoreError(f"tok_index out of range 0..{arr.shape[0] - 1} for {self.name}")
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        if self._base is not None and (len(breaks) + 1) * 16 <= len(idx):
            self._copy_runs(idx, np.r_[0, breaks], np.r_[breaks, len(idx)], out, widen)
            return out.view(np.float32) if widen else out
        ascending = bool(np.all(idx[1:] >= idx[:-1]))
        order = None if ascending else np.argsort(idx, kind="stable")
        sidx = idx if ascending else idx[order]
        if self._ranges is not None:
            src = self._ranges.read_sorted(sidx)
            if ascending and widen:
                np.left_shift(src, 16, out=out, dtype=np.uint32)
            else:
                out[slice(None) if ascending else order] = src
                if widen:
                    out <<= 16
            return out.view(np.float32) if widen else out
        chunk_of = sidx // self._rows
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        # Unsorted input: rows are read in sorted order into `buf`, then put in the caller's
        # order by one np.take with the inverse permutation. np.take is several-fold faster than
        # fancy indexing a memmap and than fancy assignment (20k random 576-wide rows, warm:
        # 36 + 10 ms -> 8 + 3 ms on 2 cores).
        buf = None if ascending else np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
        for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(sidx)]]), strict=False):
            c = int(chunk_of[s])
            mm = None if self._base is None else self._chunk(c)
            if buf is not None:
                if self._base is None:
                    buf[s:e] = arr.oindex[sidx[s:e]] if arr.ndim > 1 else arr.oindex[(sidx[s:e],)]
                elif mm is None:
                    buf[s:e] = 0  # chunk never written: fill value 0 (commit checks keep this unread)
                else:  # in range: idx was checked above, and a chunk file is a whole chunk
                    np.take(mm, sidx[s:e] - c * self._rows, axis=0, out=buf[s:e], mode="clip")
                continue
            if self._base is None:
                src = arr.oindex[sidx[s:e]] if arr.ndim > 1 else arr.oindex[(sidx[s:e],)]
            elif mm is None:
                src = None
            else:
                src = np.take(mm, sidx[s:e] - c * self._rows, axis=0)
            if src is None:
                out[s:e] = 0
            elif widen:  # read, widen and shift in one pass
                np.left_shift(src, 16, out=out[s:e], dtype=np.uint32)
            else:
                out[s:e] = src
        if buf is not None:
            inv = np.empty(len(order), dtype=np.int64)
            inv[order] = np.arange(len(order))
            src = np.take(buf, inv, axis=0)
            if widen:
                np.left_shift(src, 16, out=out, dtype=np.uint32)
            else:
                out[...] = src
        return out.view(np.float32) if widen else out

    def _copy_runs(self, idx: np.ndarray, starts: np.ndarray, ends: np.ndarray, out: np.ndarray, widen: bool) -> None:
        """Runs of consecutive tok_index (whole rows, spans) are copied as slices of the chunk
        maps, widened on the way: no index arrays, no temporaries."""
        rows = self._rows
        for o, e in zip(starts.tolist(), ends.tolist(), strict=False):
            t0, t1 = int(idx[o]), int(idx[e - 1]) + 1
            while t0 < t1:  # a run may cross a chunk boundary
                c = t0 // rows
                stop = min(t1, (c + 1) * rows)
                dst = out[o : o + stop - t0]
                mm = self._chunk(c)
                if mm is None:
                    dst[...] = 0
                elif widen:
                    np.left_shift(mm[t0 - c * rows : stop - c * rows], 16, out=dst, dtype=np.uint32)
                else:
                    dst[...] = mm[t0 - c * rows : stop - c * rows]
                o += stop - t0
                t0 = stop

    def close(self) -> None:
        self._maps.clear()
        self._checked = set()


def gather(store: Store, array: str | zarr.Array, tok_index: np.ndarray, *, decoded: bool = True) -> np.ndarray:
    """Rows `tok_index` of an array, in the given order (sorted, chunk-aware reads)."""
    r = reader(store, array) if isinstance(array, str) else ArrayReader(store, array)
    return r.gather(tok_index, decoded=decoded)


# Readers kept between calls, per process: re-opening the array and re-mapping its chunk
# files cost every call ~0.5 ms and a page fault per touched page (a warm 20k-token random
# gather took 76 ms with kept maps, 124 ms re-mapped). A reader is reused while its zarr.json
# is unchanged (a resized or recreated array gets a new one), and each map while its chunk
# file is (see ArrayReader._chunk).
_READERS: dict[tuple[str, str], tuple[tuple | None, ArrayReader]] = {}
_MAX_READERS = 8
_MAX_MAPS = 4096


def reader(store: Store, array: str) -> ArrayReader:
    """This process's kept `ArrayReader` of one array of the store (see `_READERS`)."""
    key = (str(store.root), array)
    try:
        sig = file_signature(store.array_path(array) / "zarr.json")
    except FileNotFoundError:
        sig = None  # ArrayReader raises the store's error
    hit = _READERS.get(key)
    if hit is None or hit[0] != sig or sig is None:
        r = ArrayReader(store, array)
        if len(_READERS) >= _MAX_READERS and key not in _READERS:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = hit = (sig, r)
    return hit[1]


def drop_read_cache() -> None:
    """Forget the kept readers and their maps, as a fresh process starts: what a benchmark
    calls before a cold read (mapped pages cannot be evicted from the page cache)."""
    _READERS.clear()


def _chunk_base(arr: zarr.Array):
    """The folder of an uncompressed local array's chunk files (raw C-order rows), else None."""
    root = getattr(arr.store, "root", None)
    if root is None or arr.compressors or arr.filters:
        return None
    return Path(root) / arr.path if arr.path else Path(root)


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
    if not len(groups):
        return X[:0], frame[:0]
    members = groups["_i"].explode().to_numpy()  # token rows, grouped by row_id
    sizes = groups["_i"].list.len().to_numpy().astype(np.int64)
    starts = np.zeros(len(sizes), np.int64)
    starts[1:] = np.cumsum(sizes)[:-1]
    sums = np.add.reduceat(X[members].astype(np.float64), starts, axis=0)
    return (sums / sizes[:, None]).astype(np.float32), frame[members[starts]]


def materialize(
    store: Store,
    view_or_sql: str,
    array: str = "hidden/layer_17",
    *,
    pool: str | None = None,
    as_torch: bool = False,
    sample: int | None = None,
    seed: int = 0,
) -> Materialized:
    """Vectors + columns of the tokens the view selects (see the module docstring).

    `pool="mean"|"last"` returns one vector per row_id instead (row-level probes).
    `sample=N, seed=S`: a seeded uniform sample of N of the view's tokens (or N whole rows of a
    row-level view), without sorting the selection; reproducible across runs and stores of the
    same tokenization, all of them if the view has fewer (store/reads/sample.py)."""
    frame = select(store, view_or_sql, array, sample=sample, seed=seed)
    X = gather(store, array, frame["tok_index"].to_numpy())
    if pool is not None:
        X, frame = _pool(X, frame, pool)
    if as_torch:
        import torch

        X = torch.from_numpy(X)
    return Materialized(X, frame, array)


def iter_materialize(
    store: Store,
    view_or_sql: str,
    array: str = "hidden/layer_17",
    *,
    batch_size: int = 65536,
    order: str | np.ndarray = "chunk",
    columns: list[str] | None = None,
) -> Iterator[Materialized]:
    """Stream a large selection in batches of `batch_size` tokens.

    order: "chunk" (ascending tok_index: sequential reads), "view" (the view's order), or a
    permutation of range(n_selected) (e.g. a shuffle saved with a training run).
    columns: the view's columns each batch's frame carries (default all; row_id and tok_index
    always), projected inside DuckDB: `columns=[]` for training loops that use X alone."""
    frame = select(store, view_or_sql, array, columns=columns)
    if columns is not None:
        unknown = sorted(set(columns) - set(frame.columns))
        if unknown:
            raise ValueError(f"columns {unknown} are not in the view; it has {frame.columns}")
        frame = frame.select(list(dict.fromkeys(["row_id", "tok_index", *columns])))
    if isinstance(order, str):
        if order not in ("chunk", "view"):
            raise ValueError(f"order must be 'chunk', 'view' or a permutation, got {order!r}")
        perm = np.argsort(frame["tok_index"].to_numpy(), kind="stable") if order == "chunk" else np.arange(len(frame))
    else:
        perm = np.asarray(order, dtype=np.int64)
        if len(perm) != len(frame) or not np.array_equal(np.sort(perm), np.arange(len(frame))):
            raise ValueError(f"order must be a permutation of range({len(frame)}) (the view's row count)")
    tok = frame["tok_index"].to_numpy()
    kept = reader(store, array)
    for s in range(0, len(perm), batch_size):
        take = perm[s : s + batch_size]
        yield Materialized(kept.gather(tok[take]), frame[take], array)
