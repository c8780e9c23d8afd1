"""Check a store's catalog against its arrays; with --repair, fix what can be fixed.

    python -m store.verify                      # ./store_data: sizes and CRC-32 of every chunk
    python -m store.verify --quick              # sizes only (no chunk is read)
    python -m store.verify --repair --store /tmp/st   # then rerun the extraction command

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
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from store import claims
from store.arrays import UNITS_TABLE, array_key, chunk_checksum, chunk_path
from store.catalog.runs import mark_failed
from store.cli import StoreOptions, parse_config, user_errors
from store.core import STORE_VERSION, Store, StoreError, pid_alive

KNOWN_STORE_VERSIONS = {STORE_VERSION}


def _read(store: Store, table: str, columns: list[str]) -> dict[str, list]:
    """The readable files of a table, read with pyarrow one by one: verify must work on a
    catalog where a file is broken (DuckDB's views over the table would fail as a whole)."""
    out: dict[str, list] = {c: [] for c in columns}
    for f in store.table_files(table):
        try:
            t = pq.read_table(f)
        except Exception:  # noqa: BLE001 - reported by _check_tables
            continue
        for c in columns:
            out[c] += t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
    return out


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


def _array_dirs(store: Store) -> dict[str, Path]:
    """{array name: folder} of every Zarr array under arrays/."""
    out: dict[str, Path] = {}
    root = store.arrays_dir
    if not root.is_dir():
        return out
    for meta in root.rglob("zarr.json"):
        if "c" in meta.relative_to(root).parts[:-1]:
            continue  # inside an array's chunk folder
        try:
            node = json.loads(meta.read_bytes()).get("node_type")
        except (OSError, ValueError):
            node = "unreadable"
        if node in ("array", "unreadable"):
            out["/".join(meta.parent.relative_to(root).parts)] = meta.parent
    return out


def _check_tables(store: Store) -> list[Problem]:
    out = []
    for table in store.tables():
        if table == UNITS_TABLE:
            continue  # commit files: checked per array
        for f in store.table_files(table):
            try:
                pq.read_metadata(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                out.append(
                    Problem(
                        "unreadable_table_file",
                        table,
                        str(f),
                        f"cannot read ({str(e)[:120]}); restore it from a backup or rerun the step that wrote it",
                        None,
                    )
                )
    for d in [store.catalog_dir, store.root]:
        if d.is_dir():
            for f in d.rglob(".*.tmp") if d == store.catalog_dir else d.glob(".catalog.*.tmp"):
                out.append(Problem("leftover", "catalog", str(f), "unfinished atomic write", "delete"))
    for table in ("manifests", "runs"):
        if store.has_table(table):
            have = set(_read(store, table, ["store_version"])["store_version"])
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


def _recorded_dtypes(store: Store) -> dict[str, str]:
    t = _read(store, "arrays", ["name", "storage_dtype"])
    return dict(zip(t["name"], t["storage_dtype"], strict=False))


def _layout_units(store: Store) -> dict[str, dict[str, int]]:
    """{tokenization: {row_id: unit}}."""
    t = _read(store, "row_layout", ["tokenization", "row_id", "unit"])
    out: dict[str, dict[str, int]] = {}
    for tz, r, u in zip(t["tokenization"], t["row_id"], t["unit"], strict=False):
        out.setdefault(tz, {})[r] = int(u)
    return out


def _check_array(
    store: Store, name: str, folder: Path, quick: bool, recorded: dict[str, str], layouts: dict[str, dict[str, int]]
) -> list[Problem]:
    out = []
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        dtype = np.dtype(meta["data_type"])
        attrs = meta.get("attributes", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [Problem("unreadable_array", name, str(folder / "zarr.json"), f"cannot read its metadata: {e}", None)]
    if name in recorded and recorded[name] and recorded[name] != str(dtype):
        out.append(
            Problem(
                "dtype_mismatch",
                name,
                str(folder / "zarr.json"),
                f"stored as {dtype}, but the arrays table records {recorded[name]}; the array was "
                f"replaced by hand: delete it and extract it again",
                None,
            )
        )
    n_units = -(-shape[0] // chunks[0])
    expect = int(np.prod(chunks)) * dtype.itemsize
    units_dir = store.table_dir(UNITS_TABLE) / array_key(name)
    committed: set[int] = set()
    layout = layouts.get(attrs.get("tokenization"), {})
    for f in sorted(units_dir.glob("*.parquet")) if units_dir.is_dir() else []:
        where = f"{name} unit {f.stem.lstrip('u')}"
        try:
            t = pq.read_table(f).to_pydict()
            unit = int(t["unit"][0])
        except Exception as e:  # noqa: BLE001 - truncated or not parquet
            out.append(
                Problem(
                    "unreadable_commit",
                    where,
                    str(f),
                    f"commit file unreadable ({str(e)[:80]}); repair un-commits the unit",
                    "uncommit",
                )
            )
            continue
        if not 0 <= unit < n_units:
            out.append(
                Problem("orphan_commit", where, str(f), f"unit {unit} is outside the array's {n_units} units", "delete")
            )
            continue
        committed.add(unit)
        chunk = chunk_path(store, name, unit, len(shape))
        if not chunk.is_file():
            out.append(
                Problem("missing_chunk", where, str(chunk), "committed, but its chunk file is missing", "uncommit")
            )
            continue
        size = chunk.stat().st_size
        if size != expect:
            out.append(
                Problem("corrupt_chunk", where, str(chunk), f"chunk is {size} bytes, expected {expect}", "uncommit")
            )
            continue
        crcs = {c for c in t.get("chunk_crc32", []) if c is not None}
        if not quick and crcs:
            _, crc = chunk_checksum(chunk)
            if crc not in crcs:
                out.append(
                    Problem(
                        "corrupt_chunk",
                        where,
                        str(chunk),
                        f"CRC-32 {crc:08x} differs from the {next(iter(crcs)):08x} recorded at commit",
                        "uncommit",
                    )
                )
                continue
        if layout:
            strays = [r for r in t["row_id"] if layout.get(r) != unit]
            if strays:
                out.append(
                    Problem(
                        "misplaced_rows",
                        where,
                        str(f),
                        f"{len(strays)} committed rows (e.g. {strays[0]}) do not lie in unit {unit} of the layout",
                        "uncommit",
                    )
                )
    cdir = folder / "c"
    if cdir.is_dir():
        for p in sorted(cdir.iterdir()):
            if p.name.endswith(".partial") or ".partial" in p.name:
                continue  # reported below
            empty_dir = p.is_dir() and not any(p.iterdir())
            if p.name.isdigit() and int(p.name) not in committed and not empty_dir:
                out.append(Problem("orphan_chunk", name, str(p), f"chunk of unit {p.name} has no commit", "delete"))
    for p in folder.rglob("*.partial"):
        out.append(Problem("leftover", name, str(p), "an unfinished chunk write", "delete"))
    return out


def _stale_runs(store: Store) -> list[Problem]:
    t = _read(store, "runs", ["run_id", "status", "host", "pid"])
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


def _stale_claims(store: Store) -> list[Problem]:
    """Claim files of writers whose process is gone (see store.claims)."""
    return [
        Problem(
            "leftover",
            "claims",
            str(f),
            f"claim of a writer that is gone (pid {info.get('pid')} on {info.get('host')})",
            "delete",
        )
        for f, info in claims.stale_claims(store)
    ]


def verify(store: Store, quick: bool = False) -> tuple[list[Problem], list[Problem]]:
    """(problems, notes) of the store; see the module docstring."""
    if store.remote:
        raise StoreError(
            f"store.verify checks local stores only; {store.root} is on object storage, where "
            "commits are whole objects (docs/scale.md). To check it, copy it to a local folder "
            "(e.g. aws s3 sync) and run python -m store.verify --store FOLDER"
        )
    problems = _check_tables(store) + _stale_claims(store)
    arrays = _array_dirs(store)
    recorded = _recorded_dtypes(store)
    layouts = _layout_units(store)
    for name, folder in sorted(arrays.items()):
        problems += _check_array(store, name, folder, quick, recorded, layouts)
    udir = store.table_dir(UNITS_TABLE)
    keys = {array_key(n) for n in arrays}
    if udir.is_dir():
        for d in sorted(udir.iterdir()):
            if d.is_dir() and d.name not in keys:
                problems.append(
                    Problem(
                        "orphan_commit",
                        d.name.replace("__", "/"),
                        str(d),
                        "commits of an array that does not exist",
                        "delete",
                    )
                )
    return problems, _stale_runs(store)


def repair(store: Store, problems: list[Problem]) -> list[str]:
    """Carry out each problem's repair; returns one line per action."""
    done = []
    for p in problems:
        path = Path(p.path)
        if p.repair == "delete":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            done.append(f"deleted {path}")
        elif p.repair == "uncommit":
            name, _, unit = p.where.rpartition(" unit ")
            commit = store.table_dir(UNITS_TABLE) / array_key(name) / f"u{unit}.parquet" if unit else path
            commit.unlink(missing_ok=True)
            if unit and unit.isdigit():
                meta = json.loads((store.array_path(name) / "zarr.json").read_bytes())
                chunk = chunk_path(store, name, int(unit), len(meta["shape"]))
                chunk.unlink(missing_ok=True)
                if chunk.parent.name == unit.lstrip("0").rjust(1, "0") and not any(chunk.parent.iterdir()):
                    chunk.parent.rmdir()  # c/<unit>/ of a 2-D array
            done.append(f"un-committed {p.where} (removed {commit.name} and its chunk): rerun the extraction")
        elif p.repair == "mark_failed":
            mark_failed(store, p.where, "process gone (found by python -m store.verify)")
            done.append(f"marked run {p.where} failed")
    if done:
        store.refresh_catalog()
    return done


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(VerifyConfig, argv, prog="python -m store.verify")
    store = Store(cfg.store)
    if not store.remote and not store.root.is_dir():
        raise ValueError(f"no store at {store.root}; pass --store PATH")
    problems, notes = verify(store, quick=cfg.quick)
    for p in problems:
        print(p.line())
    for n in notes:
        print("note: " + n.line())
    if cfg.repair and (problems or notes):
        for line in repair(store, [*problems, *notes]):
            print("repair: " + line)
        left = [p for p in problems if p.repair is None]
        print(f"{len(problems) - len(left)} problems repaired, {len(left)} left (see their messages)")
        return 1 if left else 0
    print(f"{len(problems)} problems in {store.root}" + (" (--quick: sizes only)" if cfg.quick else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
