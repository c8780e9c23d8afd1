"""Run records: every extraction, training and analysis run gets a row in `runs` (an ingest is
recorded in `manifests`).

A run writes its record when it starts (status `running`), with its config also saved as
`runs/<run_id>/config.json` (`config-rank<r>.json` per rank), and rewrites it when it ends (`finished` or `failed`);
a killed
run stays `running`, which is what it was. Each rank of a distributed run writes its own
record file, so ranks never contend. A `Run` is a context manager:

    with Run(store, "train_sae", config, model_id=..., layers=[17]) as run:
        ...                                   # run.dir is runs/<run_id>/
        run.finish(counts={...}, metrics={...})

An exception inside the block marks the run failed (with the error) and propagates; a
block that ends without `finish()` finishes the run with the counts and metrics given so far.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from store.core import STORE_VERSION, Store, sweep_temp_files

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("status", pa.string()),
        ("rank", pa.int32()),
        ("world_size", pa.int32()),
        ("model_id", pa.string()),
        ("model_hash", pa.string()),
        ("layers", pa.list_(pa.int32())),
        ("config", pa.string()),
        ("code_version", pa.string()),
        ("store_version", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()),
        ("counts", pa.string()),
        ("metrics", pa.string()),
        ("note", pa.string()),
        ("host", pa.string()),
        ("pid", pa.int64()),
    ]
)


def code_version() -> str:
    """The git commit of this checkout (with -dirty), else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if rev:
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "activation-store " + version("activation-store")
    except PackageNotFoundError:
        return "unknown"


def new_run_id(kind: str) -> str:
    return f"{kind}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class Run:
    """A run's record; `finish()` or `fail()` closes it (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        kind: str,
        config: dict[str, Any],
        *,
        model_id: str = "",
        model_hash: str = "",
        layers: list[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
    ):
        self.store = store
        self.run_id = run_id or new_run_id(kind)
        self._t0 = time.perf_counter()
        self.rec: dict[str, Any] = {
            "run_id": self.run_id,
            "kind": kind,
            "status": "running",
            "rank": rank,
            "world_size": world_size,
            "model_id": model_id,
            "model_hash": model_hash,
            "layers": layers or [],
            "config": json.dumps(config, sort_keys=True, default=str),
            "code_version": code_version(),
            "store_version": STORE_VERSION,
            "started_at": datetime.now(UTC),
            "finished_at": None,
            "seconds": None,
            "counts": "{}",
            "metrics": "{}",
            "note": "",
            "host": socket.gethostname(),
            "pid": os.getpid(),  # so store.verify can tell a dead run
        }
        self.closed = False
        # What killed writers left mid-write (their pid is gone): nobody will finish those files.
        sweep_temp_files(store.catalog_dir)
        sweep_temp_files(store.root, recursive=False)  # catalog.duckdb's
        self._write()
        name = "config.json" if world_size == 1 else f"config-rank{rank}.json"
        self.store.write_json(self.dir / name, {"run_id": self.run_id, "kind": kind, "config": config})

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None:
            if not self.closed:
                self.fail(exc)
        elif not self.closed:
            self.finish()
        return False

    @property
    def part(self) -> str:
        return self.run_id if self.rec["world_size"] == 1 else f"{self.run_id}-rank{self.rec['rank']}"

    def _write(self) -> None:
        self.store.write_table("runs", pa.Table.from_pylist([self.rec], schema=RUNS_SCHEMA), part=self.part)

    @property
    def dir(self) -> Path:
        return self.store.run_dir(self.run_id)

    def update(self, *, counts: dict | None = None, metrics: dict | None = None, note: str | None = None) -> None:
        if counts is not None:
            self.rec["counts"] = json.dumps(counts, sort_keys=True, default=str)
        if metrics is not None:
            self.rec["metrics"] = json.dumps(metrics, sort_keys=True, default=str)
        if note is not None:
            self.rec["note"] = note
        self._write()

    def _close(self, status: str, **kw: Any) -> None:
        self.closed = True
        self.rec["status"] = status
        self.rec["finished_at"] = datetime.now(UTC)
        self.rec["seconds"] = time.perf_counter() - self._t0
        self.update(**kw)
        self.store.sync_run(self.run_id)  # a remote store's staged run folder (store.core)
        self.store.refresh_catalog()

    def finish(self, **kw: Any) -> None:
        self._close("finished", **kw)

    def fail(self, error: BaseException) -> None:
        self._close("failed", note=f"{type(error).__name__}: {error}")


def mark_failed(store: Store, run_id: str, note: str) -> None:
    """Rewrite a run's record (every rank's) as failed with `note`: for runs whose process died."""
    from store.fs import read_parquet

    for f in store.table_files("runs"):
        t = read_parquet(f)
        if run_id not in t.column("run_id").to_pylist():
            continue
        recs = t.to_pylist()
        for r in recs:
            if r["run_id"] == run_id and r["status"] == "running":
                r["status"], r["note"] = "failed", note
        store.write_table(
            "runs",
            pa.Table.from_pylist([{k: r.get(k) for k in RUNS_SCHEMA.names} for r in recs], schema=RUNS_SCHEMA),
            part=str(f.relative_to(store.table_dir("runs")).with_suffix("").as_posix()),
        )
