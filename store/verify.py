"""Check a store's catalog against its arrays; with --repair, fix what can be fixed.

    python -m store.verify                      # ./store_data: sizes and CRC-32 of every chunk
    python -m store.verify --quick              # sizes only (no chunk is read)
    python -m store.verify --repair --store /tmp/st   # then rerun the extraction command
    python -m store.verify --store s3://bucket/prefix  # the same checks on object storage

What is checked (one line per problem, naming the array, unit and file; exit code 1 when
there is any):

* every table's Parquet files are readable, and the store version the catalog records
  (`manifests`, `runs`) is one this code knows;
* every array's `zarr.json` is readable, its dtype is the one the `arrays` table records;
* every committed unit: its commit file is readable, its chunk file exists with the size
  the array's chunk shape and dtype give and (without --quick) the CRC-32 its commit
  recorded (commits written before checksums existed are checked for size only);
* every committed row lies in the unit it is committed in (so none of its tokens lacks its
  vector), and exists in the store's layout;
* no orphans: no chunk file without a commit, no commit of a unit outside its array or of
  an array that does not exist, no `*.partial` file (zarr's unfinished writes), `.*.tmp`
  file (an unfinished atomic write) or claim of a writer that is gone (store.claims) left behind.

Runs still marked `running` whose process is gone (same host, pid not alive) are reported
as notes: a killed run keeps its record, by design, and does not make the store inconsistent.

`--repair` deletes orphans and leftovers, un-commits units whose chunk is missing, has the
wrong size or fails its checksum (their commit file and chunk are removed, so rerunning the
same extraction command recomputes exactly those units), marks stale `running` runs as
failed, and says what it did. Unreadable tables and dtype mismatches are not repaired: the
message says what to do. Run it while no writer is working on the store.

Local folders and fsspec stores (`s3://...`) go through the same checks: the file operations
are `store.fs.StoreFiles`, which lists the store once and reads only what a check
needs (a table file's footer by a ranged read; whole chunks for their CRC-32, fetched
concurrently from object storage). Every repair has its object-store form (deletes are object
deletes, a run is marked failed by rewriting its record's object); an action the backend
refuses (read-only credentials) is one `not repaired:` line naming it and what to do.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store import claims
from store.arrays import UNITS_TABLE, array_key, chunk_path
from store.catalog.runs import mark_failed
from store.cli import StoreOptions, parse_config, user_errors
from store.core import STORE_VERSION, Store, StoreError, pid_alive
from store.fs import StoreFiles

KNOWN_STORE_VERSIONS = {STORE_VERSION}
COMMIT_COLUMNS = ["unit", "row_id", "chunk_crc32"]
CLAIM_TIMEOUT = 3600.0  # store.claims' default: another host's claim is stale after an hour
FOOTER_READ = 64 << 10  # a catalog file's Parquet footer is a few KiB: one ranged read has it


class Problem(NamedTuple):
    kind: str  # corrupt_chunk, missing_chunk, orphan_chunk, orphan_commit, leftover, ...
    where: str  # array (and unit) or table
    path: str  # the file concerned
    message: str
    repair: str | None  # what --repair does: "uncommit", "delete", "mark_failed", or None

    def line(self) -> str:
        return f"{self.kind}: {self.where}: {self.message} ({self.path})"


@dataclass(kw_only=True)
class VerifyConfig(StoreOptions):
    """Check a store's catalog against its arrays (see the module docstring)."""

    quick: bool = field(
        default=False, metadata={"help": "check chunk sizes only, not their CRC-32 (reads no chunk data)"}
    )
    repair: bool = field(
        default=False,
        metadata={
            "help": "delete orphans and leftovers, un-commit units whose "
            "chunk is missing or corrupt (rerun the extraction to recompute them), mark stale "
            "running runs failed"
        },
    )


def _parquet(files: StoreFiles, rels: list[str], columns: list[str]) -> dict[str, pa.Table | Exception]:
    """{file: its table (those of `columns` it has), or why it cannot be read}."""
    out: dict[str, pa.Table | Exception] = {}
    for r, data in files.read_many(rels).items():
        try:
            if isinstance(data, Exception):
                raise data
            f = pq.ParquetFile(io.BytesIO(data))
            out[r] = f.read(columns=[c for c in columns if c in f.schema_arrow.names])
        except Exception as e:  # noqa: BLE001 - truncated, not Parquet, gone: the caller reports it
            out[r] = e
    return out


def _footers(files: StoreFiles, rels: list[str]) -> dict[str, pq.FileMetaData | Exception]:
    """{file: its Parquet metadata, or what pyarrow raised}, from ranged reads of each file's
    end only (its last FOOTER_READ bytes; a second read for a longer footer)."""
    sizes = [files.sizes[r] for r in rels]
    tails = files.ranges(rels, [max(0, n - FOOTER_READ) for n in sizes], sizes)
    longer = {}
    for i, t in enumerate(tails):
        if not isinstance(t, Exception) and len(t) >= 8 and t[-4:] == b"PAR1":
            need = struct.unpack("<I", t[-8:-4])[0] + 8  # footer length + length field + magic
            if len(t) < need <= sizes[i]:
                longer[i] = need
    more = files.ranges(
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


def _table_files(store: Store, files: StoreFiles, table: str) -> list[str]:
    return files.under(files.rel(store.table_dir(table)), ".parquet")


def _read(store: Store, files: StoreFiles, table: str, columns: list[str]) -> dict[str, list]:
    """The readable files of a table, each read on its own: verify must work on a catalog
    where a file is broken (DuckDB's views over the table would fail as a whole)."""
    out: dict[str, list] = {c: [] for c in columns}
    for t in _parquet(files, _table_files(store, files, table), columns).values():
        if isinstance(t, Exception):
            continue  # reported by _check_tables
        for c in columns:
            out[c] += t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
    return out


def _array_metas(store: Store, files: StoreFiles) -> dict[str, tuple[str, dict | Exception]]:
    """{array name: (folder, its zarr.json or why it cannot be read)} of every Zarr array
    under arrays/ (groups' zarr.json are read and skipped)."""
    base = files.rel(store.arrays_dir)
    metas = [
        r
        for r in files.under(base, "/zarr.json")
        if "c" not in PurePosixPath(r).parts[len(PurePosixPath(base).parts) : -1]  # not in a chunk folder
    ]
    out: dict[str, tuple[str, dict | Exception]] = {}
    for r, data in files.read_many(metas).items():
        try:
            if isinstance(data, Exception):
                raise data
            meta = json.loads(data)
            node = meta.get("node_type")
        except (OSError, ValueError, AttributeError) as e:
            meta, node = e, "unreadable"
        folder = str(PurePosixPath(r).parent)
        if node in ("array", "unreadable") and folder != base:
            out[folder[len(base) + 1 :]] = (folder, meta)
    return out


def _check_tables(store: Store, files: StoreFiles) -> list[Problem]:
    out = []
    cat = files.rel(store.catalog_dir)
    below = [PurePosixPath(r).relative_to(cat).parts for r in files.under(cat, ".parquet")]
    tables = sorted({parts[0] for parts in below if len(parts) > 1})
    for table in tables:
        if table == UNITS_TABLE:
            continue  # commit files: checked per array
        for r, meta in _footers(files, _table_files(store, files, table)).items():
            if isinstance(meta, Exception):
                out.append(
                    Problem(
                        "unreadable_table_file",
                        table,
                        str(files.path(r)),
                        f"cannot read ({str(meta)[:120]}); restore it from a backup or rerun the step that wrote it",
                        None,
                    )
                )
    leftovers = [r for r in files.under(cat, ".tmp") if PurePosixPath(r).name.startswith(".")]
    leftovers += sorted(r for r in files.sizes if "/" not in r and fnmatch(r, ".catalog.*.tmp"))
    for r in leftovers:
        out.append(Problem("leftover", "catalog", str(files.path(r)), "unfinished atomic write", "delete"))
    for table in ("manifests", "runs"):
        have = set(_read(store, files, table, ["store_version"])["store_version"])
        unknown = sorted(str(v) for v in have - KNOWN_STORE_VERSIONS - {None})
        if unknown:
            out.append(
                Problem(
                    "unknown_version",
                    table,
                    str(store.table_dir(table)),
                    f"store_version {', '.join(unknown)} is not one this code knows "
                    f"({', '.join(sorted(KNOWN_STORE_VERSIONS))}); use the matching version",
                    None,
                )
            )
    return out


def _recorded_dtypes(store: Store, files: StoreFiles) -> dict[str, str]:
    t = _read(store, files, "arrays", ["name", "storage_dtype"])
    return dict(zip(t["name"], t["storage_dtype"], strict=False))


def _layout_units(store: Store, files: StoreFiles) -> dict[str, dict[str, int]]:
    """{tokenization: {row_id: unit}}."""
    t = _read(store, files, "row_layout", ["tokenization", "row_id", "unit"])
    out: dict[str, dict[str, int]] = {}
    for tz, r, u in zip(t["tokenization"], t["row_id"], t["unit"], strict=False):
        out.setdefault(tz, {})[r] = int(u)
    return out


def _check_array(
    store: Store,
    files: StoreFiles,
    name: str,
    folder: str,
    meta: dict | Exception,
    quick: bool,
    recorded: dict[str, str],
    layouts: dict[str, dict[str, int]],
) -> list[Problem]:
    meta_path = str(files.path(f"{folder}/zarr.json"))
    try:
        if isinstance(meta, Exception):
            raise meta
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        dtype = np.dtype(meta["data_type"])
        attrs = meta.get("attributes", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Problem("unreadable_array", name, meta_path, f"cannot read its metadata: {e}", None)]
    out: list[tuple[str, Problem]] = []  # (commit file, problem): sorted by unit at the end
    if name in recorded and recorded[name] and recorded[name] != str(dtype):
        out.append(
            (
                "",
                Problem(
                    "dtype_mismatch",
                    name,
                    meta_path,
                    f"stored as {dtype}, but the arrays table records {recorded[name]}; the array was "
                    f"replaced by hand: delete it and extract it again",
                    None,
                ),
            )
        )
    n_units = -(-shape[0] // chunks[0])
    expect = int(np.prod(chunks)) * dtype.itemsize
    units_dir = files.rel(store.table_dir(UNITS_TABLE) / array_key(name))
    commits = [r for r in files.under(units_dir, ".parquet") if "/" not in r[len(units_dir) + 1 :]]
    committed: set[int] = set()
    layout = layouts.get(attrs.get("tokenization"), {})
    checked = []  # commits whose chunk has the right size: (commit file, where, chunk, unit, table)
    for r, t in _parquet(files, commits, COMMIT_COLUMNS).items():
        where, f = f"{name} unit {PurePosixPath(r).stem.lstrip('u')}", str(files.path(r))
        if isinstance(t, Exception) or t.num_rows == 0 or "unit" not in t.column_names:
            why = str(t)[:80] if isinstance(t, Exception) else "no rows"
            msg = f"commit file unreadable ({why}); repair un-commits the unit"
            out.append((r, Problem("unreadable_commit", where, f, msg, "uncommit")))
            continue
        t = t.to_pydict()
        unit = int(t["unit"][0])
        if not 0 <= unit < n_units:
            msg = f"unit {unit} is outside the array's {n_units} units"
            out.append((r, Problem("orphan_commit", where, f, msg, "delete")))
            continue
        committed.add(unit)
        chunk = files.rel(chunk_path(store, name, unit, len(shape)))
        size = files.sizes.get(chunk)
        if size is None:
            msg = "committed, but its chunk file is missing"
            out.append((r, Problem("missing_chunk", where, str(files.path(chunk)), msg, "uncommit")))
        elif size != expect:
            msg = f"chunk is {size} bytes, expected {expect}"
            out.append((r, Problem("corrupt_chunk", where, str(files.path(chunk)), msg, "uncommit")))
        else:
            checked.append((r, where, chunk, unit, t))
    want_crc = [c for _, _, c, _, t in checked if any(x is not None for x in t.get("chunk_crc32", []))]
    crcs = {} if quick else dict(files.crc32(want_crc))  # commits from before checksums: size only
    for r, where, chunk, unit, t in checked:
        rec = {c for c in t.get("chunk_crc32", []) if c is not None}
        crc = crcs.get(chunk)
        if crc is not None and (isinstance(crc, Exception) or crc not in rec):
            msg = (
                f"cannot read the chunk ({str(crc)[:80]})"
                if isinstance(crc, Exception)
                else f"CRC-32 {crc:08x} differs from the {next(iter(rec)):08x} recorded at commit"
            )
            out.append((r, Problem("corrupt_chunk", where, str(files.path(chunk)), msg, "uncommit")))
            continue
        strays = [x for x in t["row_id"] if layout.get(x) != unit] if layout else []
        if strays:
            msg = f"{len(strays)} committed rows (e.g. {strays[0]}) do not lie in unit {unit} of the layout"
            out.append((r, Problem("misplaced_rows", where, str(files.path(r)), msg, "uncommit")))
    problems = [p for _, p in sorted(out, key=lambda x: x[0])]
    cdir, orphans = f"{folder}/c/", set()
    for r in files.under(cdir):
        u = r[len(cdir) :].split("/")[0]
        if ".partial" not in r and u.isdigit() and int(u) not in committed and u not in orphans:
            orphans.add(u)
            msg = f"chunk of unit {u} has no commit"
            problems.append(Problem("orphan_chunk", name, str(files.path(cdir + u)), msg, "delete"))
    for r in files.under(folder, ".partial"):
        problems.append(Problem("leftover", name, str(files.path(r)), "an unfinished chunk write", "delete"))
    return problems


def _stale_runs(store: Store, files: StoreFiles) -> list[Problem]:
    t = _read(store, files, "runs", ["run_id", "status", "host", "pid"])
    rows = [dict(zip(t, vals, strict=False)) for vals in zip(*t.values(), strict=False) if vals[1] == "running"]
    out, host = [], socket.gethostname()
    for r in rows:
        pid, rhost = r.get("pid"), r.get("host")
        if pid is None or rhost != host:
            continue  # another machine's, or a record without a pid
        if pid_alive(int(pid)):
            continue
        out.append(
            Problem(
                "stale_run",
                r["run_id"],
                str(store.table_dir("runs")),
                f"marked running, but process {pid} on {host} is gone (killed?); rerun its command to finish the work",
                "mark_failed",
            )
        )
    return out


def _stale_claims(store: Store, files: StoreFiles) -> list[Problem]:
    """Claim files of writers whose process is gone (see store.claims)."""
    out = []
    base = files.rel(store.claims_dir)
    for r in files.under(base, ".json"):
        p = PurePosixPath(r)
        try:
            info = claims.owner(store, "/".join(p.parts[len(PurePosixPath(base).parts) : -1]), p.stem)
        except ValueError:
            continue  # not a claim's name: no writer made it
        if info is not None and claims.is_stale(info, CLAIM_TIMEOUT):
            msg = f"claim of a writer that is gone (pid {info.get('pid')} on {info.get('host')})"
            out.append(Problem("leftover", "claims", str(files.path(r)), msg, "delete"))
    return out


def verify(store: Store, quick: bool = False, files: StoreFiles | None = None) -> tuple[list[Problem], list[Problem]]:
    """(problems, notes) of the store, local or on object storage; see the module docstring.
    `files`: the store's listing (made here when not given: one listing of the store)."""
    files = files or StoreFiles(store.root)
    problems = _check_tables(store, files) + _stale_claims(store, files)
    arrays = _array_metas(store, files)
    recorded = _recorded_dtypes(store, files)
    layouts = _layout_units(store, files)
    for name, (folder, meta) in sorted(arrays.items()):
        problems += _check_array(store, files, name, folder, meta, quick, recorded, layouts)
    udir = PurePosixPath(files.rel(store.table_dir(UNITS_TABLE)))
    keys = {array_key(n) for n in arrays}
    below = [PurePosixPath(r).relative_to(udir).parts for r in files.under(str(udir))]
    for k in sorted({parts[0] for parts in below if len(parts) > 1} - keys):
        msg = "commits of an array that does not exist"
        problems.append(Problem("orphan_commit", k.replace("__", "/"), str(files.path(f"{udir}/{k}")), msg, "delete"))
    return problems, _stale_runs(store, files)


class Repaired(NamedTuple):
    done: list[str]  # one line per action carried out
    refused: list[str]  # one line per action the backend refused, naming it and the fix


def repair(store: Store, problems: list[Problem], files: StoreFiles | None = None) -> Repaired:
    """Carry out each problem's repair, on a local folder or object storage alike (deletes
    are object deletes there; marking a run failed rewrites its record's Parquet object)."""
    files = files or StoreFiles(store.root)
    done, refused = [], []
    for p in problems:
        try:
            if p.repair == "delete":
                files.delete(files.rel(p.path))
                done.append(f"deleted {p.path}")
            elif p.repair == "uncommit":
                name, _, unit = p.where.rpartition(" unit ")
                commit = store.table_dir(UNITS_TABLE) / array_key(name) / f"u{unit}.parquet" if unit else p.path
                files.delete(files.rel(commit))
                if unit.isdigit():
                    files.delete(files.rel(store.array_path(name) / "c" / str(int(unit))))
                done.append(
                    f"un-committed {p.where} (removed {PurePosixPath(str(commit)).name} and its chunk): "
                    "rerun the extraction"
                )
            elif p.repair == "mark_failed":
                mark_failed(store, p.where, "process gone (found by python -m store.verify)")
                done.append(f"marked run {p.where} failed")
        except (PermissionError, NotImplementedError) as e:
            backend = getattr(store.root, "protocol", "the local filesystem")
            refused.append(
                f"{p.repair} of {p.path} refused by {backend} ({str(e)[:120]}): rerun --repair with "
                "credentials that may delete and write under the store, or remove it by hand"
            )
    if done:
        store.refresh_catalog()
    return Repaired(done, refused)


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(VerifyConfig, argv, prog="python -m store.verify")
    store = Store(cfg.store)
    if not store.remote and not store.root.is_dir():
        raise ValueError(f"no store at {store.root}; pass --store PATH")
    files = StoreFiles(store.root)  # the one listing of the store that every check reads
    if store.remote and not files.sizes:
        raise ValueError(f"no store at {store.root} (no object under that prefix); pass --store URL")
    problems, notes = verify(store, quick=cfg.quick, files=files)
    for p in problems:
        print(p.line())
    for n in notes:
        print("note: " + n.line())
    if cfg.repair and (problems or notes):
        done, refused = repair(store, [*problems, *notes], files)
        for line in done:
            print("repair: " + line)
        for line in refused:
            print("not repaired: " + line)
        left = [p for p in problems if p.repair is None]
        n_left = len(left) + len(refused)
        print(f"{len(problems) - n_left} problems repaired, {n_left} left (see their messages)")
        return 1 if n_left else 0
    print(f"{len(problems)} problems in {store.root}" + (" (--quick: sizes only)" if cfg.quick else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
