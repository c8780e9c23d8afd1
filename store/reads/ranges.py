"""Gathers from uncompressed chunks on object storage, by byte-range reads.

A chunk file of an uncompressed array is its rows in C order, so the rows a gather wants
are byte ranges of the chunk objects. Where the chunks cannot be memory-mapped (the store
is on S3 or another fsspec filesystem), `RangeReader` turns sorted token indices into a
few ranges per chunk: runs of consecutive rows, merged while the gap between them is at
most `max_gap` bytes (reading a gap costs less than another request), and fetches them all
in one `fs.cat_ranges` call, which s3fs issues concurrently. Whole rows and dense
selections become one or a few ranges per chunk; sparse random tokens, one per run.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RangeReader:
    """Rows of one uncompressed array whose chunk objects live at `base`/c/<chunk>[/0]."""

    def __init__(
        self,
        fs: Any,
        base: str,
        dtype: np.dtype,
        rows_per_chunk: int,
        row_shape: tuple[int, ...],
        max_gap: int = 1 << 20,
    ):
        self.fs, self.base = fs, base.rstrip("/")
        self.dtype = np.dtype(dtype)
        self.rows = rows_per_chunk
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.max_gap = max_gap
        self.requests = 0  # ranges fetched so far (what bench.s3 reports)

    def key(self, chunk: int) -> str:
        return f"{self.base}/c/{chunk}/0" if self.row_shape else f"{self.base}/c/{chunk}"

    def plan(self, sidx: np.ndarray) -> list[tuple[int, int, int, int, int]]:
        """(chunk, first row, end row, first output line, end output line) of each range, for
        ascending `sidx`; a range covers rows [first, end) of its chunk."""
        out = []
        if not len(sidx):
            return out
        chunk = sidx // self.rows
        row = sidx - chunk * self.rows
        gap_rows = max(1, self.max_gap // max(1, self.row_bytes))
        # a new range where the chunk changes or the gap to the previous row is too wide
        cut = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(row) > gap_rows)) + 1
        starts = np.r_[0, cut]
        ends = np.r_[cut, len(sidx)]
        for s, e in zip(starts.tolist(), ends.tolist(), strict=False):
            out.append((int(chunk[s]), int(row[s]), int(row[e - 1]) + 1, s, e))
        return out

    def read_sorted(self, sidx: np.ndarray) -> np.ndarray:
        """Rows `sidx` (ascending, duplicates allowed) as a `[len, *row_shape]` array of the
        storage dtype; rows of chunks never written read as 0 (the fill value)."""
        sidx = np.asarray(sidx, dtype=np.int64)
        out = np.empty((len(sidx), *self.row_shape), dtype=self.dtype)
        ranges = self.plan(sidx)
        if not ranges:
            return out
        blobs = self.fs.cat_ranges(
            [self.key(c) for c, *_ in ranges],
            [r0 * self.row_bytes for _, r0, *_ in ranges],
            [r1 * self.row_bytes for _, _, r1, *_ in ranges],
            on_error="return",
        )
        self.requests += len(ranges)
        for (c, r0, r1, s, e), blob in zip(ranges, blobs, strict=False):
            if isinstance(blob, FileNotFoundError):
                out[s:e] = 0
                continue
            if isinstance(blob, BaseException):
                raise blob
            block = np.frombuffer(blob, dtype=self.dtype).reshape(r1 - r0, *self.row_shape)
            out[s:e] = block[sidx[s:e] - c * self.rows - r0]
        return out


def range_reader(arr: Any) -> RangeReader | None:
    """A RangeReader for a zarr array on an FsspecStore with uncompressed, unsharded chunks
    in the default key encoding; None otherwise (the caller falls back to zarr's oindex)."""
    store = arr.store
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is None or path is None or arr.compressors or arr.filters or arr.shards is not None:
        return None
    enc = arr.metadata.chunk_key_encoding
    if getattr(enc, "name", "default") != "default" or getattr(enc, "separator", "/") != "/":
        return None
    if any(c != s for c, s in zip(arr.chunks[1:], arr.shape[1:], strict=False)):
        return None  # the row axis alone may be chunked
    sync_fs = getattr(fs, "sync_fs", None)  # zarr wraps sync filesystems (memory://) in an async shim
    if sync_fs is None:
        from fsspec import filesystem

        sync_fs = filesystem(
            fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol,
            **{k: v for k, v in fs.storage_options.items() if k != "asynchronous"},
        )
    base = f"{path}/{arr.path}" if arr.path else path
    return RangeReader(sync_fs, base, arr.dtype, arr.chunks[0], tuple(arr.shape[1:]))
