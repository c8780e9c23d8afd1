"""The file operations of `store.verify`, on a local folder or an fsspec store (`s3://...`).

`StoreFiles` lists the store once (`os.walk` locally; one recursive listing, `fs.find`, on
object storage: S3 lists 1,000 keys per request, not one request per folder) and keeps
{path relative to the root: size}; every check then asks that listing instead of the
filesystem, so `verify` makes no request per array or per unit to find files. What it reads:

* whole small objects (commit files, `zarr.json`, catalog tables); remotely in one
  concurrent `fs.cat_ranges` of many objects, each a GET of its listed size;
* the footer alone of a catalog table file (`footers`: a ranged read of its last 64 KiB,
  the Parquet metadata that `pq.read_metadata` checks);
* whole chunks for their CRC-32 (`crc32`): streamed in blocks locally (`chunk_checksum`),
  fetched concurrently remotely, in batches of at most `CRC_BATCH_BYTES`.

Deleting (`delete`) removes the listed files at a path and below it (a file, or a "folder",
which on object storage is a key prefix), remotely in one batched delete request per 1,000
keys; locally it then removes the folders it left empty, as the old local repair did. The
listing is a snapshot: run verify while no writer works on the store.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from store.arrays import chunk_checksum
from store.core import Store
from store.fs import AnyPath, RemotePath

FOOTER_READ = 64 << 10  # a catalog file's footer is a few KiB; one ranged read usually has it all
CRC_BATCH_BYTES = 256 << 20  # remote chunks fetched at once for their CRC-32 (bounds memory)


class StoreFiles:
    """Every file of `store`, listed once, and the reads and deletes verify makes."""

    def __init__(self, store: Store):
        self.root: AnyPath = store.root
        self.remote = isinstance(self.root, RemotePath)
        self.sizes: dict[str, int] = self._list()

    def _list(self) -> dict[str, int]:
        if isinstance(self.root, RemotePath):
            try:
                found = self.root.fs.find(self.root.path, detail=True)
            except FileNotFoundError:
                return {}
            base = self.root.path + "/"
            return {
                k[len(base) :]: int(i.get("size") or 0)
                for k, i in found.items()
                if k.startswith(base) and i.get("type", "file") == "file"
            }
        out: dict[str, int] = {}
        for d, _, files in os.walk(self.root):
            rel = Path(d).relative_to(self.root).as_posix()
            for f in files:
                try:
                    out[f if rel == "." else f"{rel}/{f}"] = os.stat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    continue  # removed since the walk listed it
        return out

    # ---- the listing ---------------------------------------------------------------
    def under(self, prefix: str, suffix: str = "") -> list[str]:
        """Sorted relative paths of the files below folder `prefix` ending in `suffix`."""
        p = prefix.rstrip("/") + "/"
        return sorted(k for k in self.sizes if k.startswith(p) and k.endswith(suffix))

    def size(self, rel: str) -> int | None:
        return self.sizes.get(rel)

    def path(self, rel: str) -> AnyPath:
        """The file as the store names it (a local path or an fsspec URL), for messages."""
        return self.root / rel

    def rel(self, path: str | os.PathLike) -> str:
        """A path that `path` gave back (`str` of it) -> relative to the root."""
        return PurePosixPath(str(path)).relative_to(PurePosixPath(str(self.root))).as_posix()

    # ---- reads -----------------------------------------------------------------------
    def read_many(self, rels: Iterable[str]) -> dict[str, bytes | Exception]:
        """{rel: content, or the error reading it} of listed files; remotely one concurrent
        fetch, each a ranged GET of its listed size (a plain `cat` would HEAD each first)."""
        rels = list(rels)
        return dict(zip(rels, self._ranges(rels, [0] * len(rels), None), strict=True))

    def _ranges(self, rels: list[str], starts: list[int], ends: list[int] | None) -> list[bytes | Exception]:
        """Bytes [start, end) of each file (`ends` None: to its listed end), or the error."""
        ends = [self.sizes.get(r, 0) for r in rels] if ends is None else ends
        if not isinstance(self.root, RemotePath):
            out: list[bytes | Exception] = []
            for r, a, b in zip(rels, starts, ends, strict=True):
                try:
                    with open(self.path(r), "rb") as fh:
                        fh.seek(a)
                        out.append(fh.read(b - a))
                except OSError as e:
                    out.append(e)
            return out
        todo = [i for i, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a]
        got = (
            self.root.fs.cat_ranges(
                [self._key(rels[i]) for i in todo],
                [starts[i] for i in todo],
                [ends[i] for i in todo],
                on_error="return",
            )
            if todo
            else []
        )
        out = [b""] * len(rels)  # empty ranges: no request (a Range of 0 bytes is invalid)
        for i, data in zip(todo, got, strict=True):
            out[i] = data
        return out

    def parquet(self, rels: Iterable[str], columns: list[str] | None = None) -> dict[str, pa.Table | Exception]:
        """{rel: the Parquet file as a table (only `columns` that it has), or why not}."""
        out: dict[str, pa.Table | Exception] = {}
        for r, data in self.read_many(rels).items():
            try:
                if isinstance(data, Exception):
                    raise data
                f = pq.ParquetFile(io.BytesIO(data))
                cols = None if columns is None else [c for c in columns if c in f.schema_arrow.names]
                out[r] = f.read(columns=cols)
            except Exception as e:  # noqa: BLE001 - truncated, not Parquet, gone: the caller reports it
                out[r] = e
        return out

    def footers(self, rels: list[str]) -> dict[str, pq.FileMetaData | Exception]:
        """{rel: the Parquet metadata of the file, or what pyarrow raised} from ranged reads of
        each file's end only (its last FOOTER_READ bytes; a second read if the footer is longer)."""
        sizes = [self.sizes[r] for r in rels]
        tails = self._ranges(rels, [max(0, n - FOOTER_READ) for n in sizes], sizes)
        longer = {}
        for i, t in enumerate(tails):
            if not isinstance(t, Exception) and len(t) >= 8 and t[-4:] == b"PAR1":
                need = struct.unpack("<I", t[-8:-4])[0] + 8
                if len(t) < need <= sizes[i]:
                    longer[i] = need
        more = self._ranges(
            [rels[i] for i in longer], [sizes[i] - n for i, n in longer.items()], [sizes[i] for i in longer]
        )
        for i, t in zip(longer, more, strict=True):
            tails[i] = t
        out: dict[str, pq.FileMetaData | Exception] = {}
        for r, t in zip(rels, tails, strict=True):
            try:
                if isinstance(t, Exception):
                    raise t
                out[r] = pq.read_metadata(io.BytesIO(t))
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                out[r] = e
        return out

    def crc32(self, rels: list[str]) -> Iterator[tuple[str, int | Exception]]:
        """(rel, CRC-32 of the whole file, or the error reading it) of each of `rels`."""
        if not isinstance(self.root, RemotePath):
            for r in rels:
                try:
                    yield r, chunk_checksum(self.path(r))[1]
                except OSError as e:
                    yield r, e
            return
        batch: list[str] = []
        held = 0
        for i, r in enumerate(rels):
            batch.append(r)
            held += self.sizes.get(r, 0)
            if i + 1 == len(rels) or held >= CRC_BATCH_BYTES:
                for b, data in self.read_many(batch).items():
                    yield b, data if isinstance(data, Exception) else zlib.crc32(data)
                batch, held = [], 0

    # ---- repair ---------------------------------------------------------------------
    def delete(self, rel: str) -> int:
        """Delete the listed files at `rel` and below it; returns how many."""
        gone = [k for k in self.sizes if k == rel or k.startswith(rel.rstrip("/") + "/")]
        if isinstance(self.root, RemotePath):
            if gone:
                self.root.fs.rm([self._key(k) for k in gone])
        else:
            for k in gone:
                (self.root / k).unlink(missing_ok=True)
            for k in gone:
                self._prune(PurePosixPath(k).parent)
        for k in gone:
            del self.sizes[k]
        return len(gone)

    def _prune(self, folder: PurePosixPath) -> None:
        """Remove `folder` and its parents while they are empty, up to `catalog/<table>`,
        `arrays/` and `claims/<scope>` (an object store has no folders to remove)."""
        while len(folder.parts) > 2:
            try:
                (self.root / folder.as_posix()).rmdir()
            except OSError:
                return  # not empty, or gone
            folder = folder.parent

    def _key(self, rel: str) -> str:
        return f"{self.root.path}/{rel}"
