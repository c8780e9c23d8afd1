"""Where a store lives: a local folder, or an fsspec URL (`s3://bucket/prefix`, `memory://x`).

A plain path (or `file://`) keeps every local fast path: memory-mapped chunk reads, atomic
writes by temp file + `os.replace` + fsync, `O_EXCL` claims. A URL root gives the Store
`RemotePath`s instead of `Path`s: the same small part of the `pathlib` API the store uses
(`/`, `name`, `parent`, `exists`, `is_dir`, `glob`, `rglob`, `read_bytes`, `write_bytes`,
`unlink`, `stat`, ...) over one fsspec filesystem, so store code that only joins, lists and
reads paths runs unchanged on both; the few operations that differ are here:

* whole-object writes (`RemotePath.write_bytes`, used by `Store.write_table` and
  `atomic_write_bytes`): an S3 PUT is atomic per object, readers see the old object or the
  new one, never a part of it, which is what the local temp-file + rename gives; so a unit's
  commit file still appears whole or not at all.
* `create_exclusive(path, data)`: create-if-absent (`O_EXCL` locally; on S3 a conditional
  PUT with `If-None-Match: *`, s3fs's `mode="xb"`), for claims and Zarr group metadata.
* `scan(folder)`: (name, signature) of the files in one folder, one listing request.
* `read_parquet(path)`: a Parquet file of the catalog, local or remote.
* `StoreFiles(root)`: every file of a store listed once, with batched (remotely concurrent)
  whole and ranged reads, CRC-32s and deletes: what `store.verify` checks and repairs with.

Credentials and the endpoint are never stored in the store: s3fs (botocore) reads them
from the environment or the AWS config files as every AWS tool does (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server, `AWS_PROFILE`).
Listings are never cached (`use_listings_cache=False`): other processes add commit files
and claims, and a cached listing would hide them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import pyarrow.parquet as pq


class RemoteStat(NamedTuple):
    """What `file_signature` reads off a file: st_ino stands in for the object's ETag (a new
    object, even of the same size and second, gets a new one)."""

    st_ino: int
    st_mtime_ns: int
    st_size: int


def is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def storage_options(protocol: str) -> dict[str, Any]:
    """The fsspec options this package sets (never credentials): no cached listings, and for
    S3 the endpoint botocore would read from AWS_ENDPOINT_URL anyway, passed explicitly so
    that fsspec's cache of filesystem instances (keyed by these options) never hands a
    client made for one endpoint to a store on another."""
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {"use_listings_cache": False}
    if os.environ.get("AWS_ENDPOINT_URL"):
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return opts


def filesystem(url: str):
    """(fsspec filesystem, path without protocol) of a store URL; an actionable error when the
    protocol's package is missing."""
    import fsspec
    from fsspec.core import split_protocol

    protocol, _ = split_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol or "file"))
    except (ImportError, ValueError) as e:
        raise ImportError(
            f"store URL {url!r}: no fsspec filesystem for {protocol!r} ({e}); for s3:// "
            "install s3fs (pip install s3fs, a dependency of this package)"
        ) from e
    return fs, path.rstrip("/")


def _signature(info: dict) -> RemoteStat:
    tag = str(info.get("ETag") or info.get("etag") or info.get("md5") or "")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    size = int(info.get("size") or info.get("Size") or 0)
    ino = int.from_bytes(hashlib.blake2b(f"{tag}|{mtime}|{size}".encode(), digest_size=7).digest(), "big")
    return RemoteStat(ino, int(float(mtime) * 1e9), size)


class RemotePath:
    """A path on an fsspec filesystem with the part of pathlib's API the store uses."""

    __slots__ = ("fs", "_p")

    def __init__(self, fs: Any, path: str | PurePosixPath):
        self.fs = fs
        self._p = PurePosixPath(str(path))

    # ---- pure path operations -------------------------------------------------------
    def _new(self, p: PurePosixPath | str) -> RemotePath:
        return RemotePath(self.fs, p)

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    @property
    def path(self) -> str:
        """The path as the filesystem takes it (no protocol)."""
        return str(self._p)

    def __str__(self) -> str:
        return f"{self.protocol}://{self._p}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __truediv__(self, other: str | os.PathLike) -> RemotePath:
        return self._new(self._p / str(other))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other._p == self._p and other.protocol == self.protocol

    def __hash__(self) -> int:
        return hash((self.protocol, self._p))

    def __lt__(self, other: RemotePath) -> bool:
        return self._p < other._p

    name = property(lambda self: self._p.name)
    stem = property(lambda self: self._p.stem)
    suffix = property(lambda self: self._p.suffix)
    parts = property(lambda self: self._p.parts)

    @property
    def parent(self) -> RemotePath:
        return self._new(self._p.parent)

    @property
    def parents(self) -> list[RemotePath]:
        return [self._new(p) for p in self._p.parents]

    def with_name(self, name: str) -> RemotePath:
        return self._new(self._p.with_name(name))

    def with_suffix(self, suffix: str) -> RemotePath:
        return self._new(self._p.with_suffix(suffix))

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        return self._p.relative_to(other._p)

    def as_posix(self) -> str:
        return str(self)

    def resolve(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    # ---- filesystem operations ------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def stat(self) -> RemoteStat:
        return _signature(self.fs.info(self.path))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object lies under it."""

    def iterdir(self) -> Iterator[RemotePath]:
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            names = []
        for n in sorted(names):
            if n.rstrip("/") != self.path:
                yield self._new(n.rstrip("/"))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Files and folders directly in this folder whose name matches `pattern`."""
        for p in self.iterdir():
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """Files at any depth below this folder whose name matches `pattern` (one listing)."""
        try:
            found = self.fs.find(self.path)
        except FileNotFoundError:
            found = []
        for f in sorted(found):
            if fnmatch.fnmatchcase(PurePosixPath(f).name, pattern):
                yield self._new(f)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        self.fs.pipe_file(self.path, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", **kw: Any):
        return self.fs.open(self.path, mode, **kw)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        try:
            self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass


AnyPath = Path | RemotePath


def temp_path(path: Path) -> Path:
    """Where to write `path` before renaming it into place: `.<name>.<pid>-<random>.tmp`, so
    a killed writer's leftover can be told from a live writer's (store.core.sweep_temp_files)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def create_exclusive(path: AnyPath, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist; True if this call created it.
    Remote: a conditional PUT (`If-None-Match: *`), which S3, MinIO, R2, GCS and moto honour;
    a server that ignored the condition would let two creators both win (see docs/scale.md)."""
    if isinstance(path, RemotePath):
        try:
            with path.fs.open(path.path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        return True
    # Locally: the content goes to a temp file first, which is then hard-linked into place;
    # the link fails if the name exists, and a reader never sees the file empty or half
    # written (with O_EXCL + write, a reader in between would see an empty claim).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def scan(folder: AnyPath, suffix: str = "") -> list[tuple[str, tuple[int, int, int]]]:
    """(name, (inode, mtime_ns, size)) of the files directly in `folder` ending in `suffix`
    (one directory scan, or one listing request); [] when the folder does not exist."""
    if isinstance(folder, RemotePath):
        try:
            infos = folder.fs.ls(folder.path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            (PurePosixPath(i["name"]).name, tuple(_signature(i)))
            for i in infos
            if i.get("type") == "file" and i["name"].endswith(suffix)
        )
    try:
        with os.scandir(folder) as it:
            return sorted(
                (e.name, (s.st_ino, s.st_mtime_ns, s.st_size))
                for e in it
                if e.name.endswith(suffix) and (s := e.stat())
            )
    except FileNotFoundError:
        return []


def read_parquet(path: AnyPath, columns: list[str] | None = None):
    """A Parquet file as a pyarrow Table (remote: one GET of the whole file; catalog files are
    small, and the big `tokens` table is read by DuckDB, not here)."""
    if isinstance(path, RemotePath):
        return pq.read_table(io.BytesIO(path.read_bytes()), columns=columns)
    return pq.read_table(path, columns=columns)


def zarr_store(path: AnyPath, read_only: bool):
    """What `zarr.open_array` / `zarr.create_array` take for the array at `path`: the local
    folder (zarr's LocalStore) or zarr's own FsspecStore on the same URL."""
    if isinstance(path, RemotePath):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            str(path), storage_options=storage_options(path.protocol) or None, read_only=read_only
        )
    return str(path)


def default_staging_dir() -> Path:
    """Where remote stores' run folders are staged on this machine: the user's cache (the
    tests point it at a temporary folder)."""
    return Path.home() / ".cache" / "activation-store" / "staging"


def staging_root(url: str) -> Path:
    """The local folder where a remote store's run folders are written before they are
    uploaded (see `Store.run_dir`): one per store URL, under `default_staging_dir()`."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return default_staging_dir() / key


class StoreFiles:
    """Every file under `root`, listed once: {path relative to the root: size} (`os.walk`
    locally; one recursive listing on object storage, 1,000 keys per S3 request, not one per
    folder), and the reads and deletes of `store.verify`, which asks this listing instead of
    the filesystem. Remote reads are concurrent ranged GETs of the listed sizes (s3fs's
    plain `cat` would HEAD each object first). A snapshot: use it while no writer works."""

    CRC_BATCH_BYTES = 256 << 20  # remote chunks fetched at once for their CRC-32 (bounds memory)

    def __init__(self, root: AnyPath):
        self.root = root
        self.sizes: dict[str, int] = {}
        if isinstance(root, RemotePath):
            try:
                found = root.fs.find(root.path, detail=True)
            except FileNotFoundError:
                found = {}
            n = len(root.path) + 1
            self.sizes = {
                k[n:]: int(i.get("size") or 0)
                for k, i in found.items()
                if k.startswith(root.path + "/") and i.get("type", "file") == "file"
            }
            return
        for d, _, names in os.walk(root):
            rel = Path(d).relative_to(root).as_posix()
            for f in names:
                try:
                    self.sizes[f if rel == "." else f"{rel}/{f}"] = os.stat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    continue  # removed since the walk listed it

    def under(self, prefix: str, suffix: str = "") -> list[str]:
        """Sorted relative paths of the files below folder `prefix` ending in `suffix`."""
        p = prefix.rstrip("/") + "/"
        return sorted(k for k in self.sizes if k.startswith(p) and k.endswith(suffix))

    def path(self, rel: str) -> AnyPath:
        """The file as the store names it (a local path or a URL)."""
        return self.root / rel

    def rel(self, path: str | os.PathLike | RemotePath) -> str:
        """A path under the root (or its `str`) -> relative to the root."""
        return PurePosixPath(str(path)).relative_to(PurePosixPath(str(self.root))).as_posix()

    def ranges(self, rels: list[str], starts: list[int], ends: list[int] | None = None) -> list[bytes | Exception]:
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
        keys = [f"{self.root.path}/{rels[i]}" for i in todo]
        got = (
            self.root.fs.cat_ranges(keys, [starts[i] for i in todo], [ends[i] for i in todo], on_error="return")
            if todo
            else []
        )
        out = [b""] * len(rels)  # empty ranges: no request (a Range of 0 bytes is invalid)
        for i, data in zip(todo, got, strict=True):
            out[i] = data
        return out

    def read_many(self, rels: Iterable[str]) -> dict[str, bytes | Exception]:
        """{rel: the whole file, or the error reading it}."""
        rels = list(rels)
        return dict(zip(rels, self.ranges(rels, [0] * len(rels)), strict=True))

    def crc32(self, rels: list[str]) -> Iterator[tuple[str, int | Exception]]:
        """(rel, CRC-32 of the whole file, or the error reading it): one file at a time
        locally, remotely batches of up to CRC_BATCH_BYTES fetched concurrently."""
        limit = self.CRC_BATCH_BYTES if isinstance(self.root, RemotePath) else 0
        batch: list[str] = []
        held = 0
        for i, r in enumerate(rels):
            batch.append(r)
            held += self.sizes.get(r, 0)
            if i + 1 == len(rels) or held >= limit:
                for b, data in self.read_many(batch).items():
                    yield b, data if isinstance(data, Exception) else zlib.crc32(data)
                batch, held = [], 0

    def delete(self, rel: str) -> int:
        """Delete the listed files at `rel` and below it (a file, or a folder: on object
        storage a key prefix, one batched delete); locally, then the folders left empty
        (up to `catalog/<table>`, `arrays/<x>`, `claims/<scope>`); returns how many."""
        gone = [k for k in self.sizes if k == rel or k.startswith(rel.rstrip("/") + "/")]
        if isinstance(self.root, RemotePath):
            if gone:
                self.root.fs.rm([f"{self.root.path}/{k}" for k in gone])
        else:
            for k in gone:
                (self.root / k).unlink(missing_ok=True)
            for folder in {PurePosixPath(k).parent for k in gone}:
                while len(folder.parts) > 2:
                    try:
                        (self.root / folder.as_posix()).rmdir()
                    except OSError:
                        break  # not empty, or gone
                    folder = folder.parent
        for k in gone:
            del self.sizes[k]
        return len(gone)
