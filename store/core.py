"""The store: one root folder, and the only code that knows paths.

Layout under the root (every path below is built here and nowhere else):

    catalog/<table>/**/*.parquet   the catalog: Parquet, the source of truth. A table is a
                                   folder; writers add or atomically replace whole files.
    catalog.duckdb                 a DuckDB file holding one view per table and per SQL view,
                                   rebuilt atomically after writes, for the plain `duckdb` CLI
    arrays/<name>/                 Zarr v3 arrays, e.g. arrays/hidden/layer_17
    runs/<run_id>/                 what a run leaves beside its record (checkpoints, plots, JSON)
    views/*.sql                    the store's own SQL views (user-defined; the packaged ones
                                   live in sql/views/)

Readers use `Store.connect()`, an in-memory DuckDB connection with the same views, so a
query never takes a file lock that a writer would wait on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

STORE_VERSION = "1"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message says what to do."""


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class Store:
    """A store rooted at a local folder (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        root_s = str(root)
        if "://" in root_s:
            raise StoreError(
                f"store path {root_s!r} is a URL; this version supports local folders only "
                "(mount the bucket, or use a local path)"
            )
        self.root = Path(root_s).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} exists and is not a folder; pass another --store")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------
    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    @property
    def catalog_db(self) -> Path:
        return self.root / "catalog.duckdb"

    def table_dir(self, table: str) -> Path:
        if not _NAME_RE.match(table):
            raise StoreError(f"table name {table!r} must be lower_snake_case")
        return self.catalog_dir / table

    def array_path(self, name: str) -> Path:
        parts = name.split("/")
        if not name or any(not re.match(r"^[A-Za-z0-9_.-]+$", p) for p in parts):
            raise StoreError(f"array name {name!r} must be like 'hidden/layer_17'")
        return self.root / "arrays" / Path(*parts)

    def run_dir(self, run_id: str) -> Path:
        d = self.root / "runs" / run_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def views_dir(self) -> Path:
        return self.root / "views"

    # ---- tables ------------------------------------------------------------------------
    def write_table(self, table: str, data: pa.Table, part: str = "part-0") -> Path:
        """Write (or atomically replace) one Parquet file of `table`; returns its path."""
        if not re.match(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", part):
            raise StoreError(f"bad table part name {part!r}")
        path = self.table_dir(table) / f"{part}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(data, tmp, compression="zstd")
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
        return path

    def write_rows(self, table: str, rows: list[dict[str, Any]], part: str = "part-0",
                   schema: pa.Schema | None = None) -> Path:
        return self.write_table(table, pa.Table.from_pylist(rows, schema=schema), part)

    def table_files(self, table: str) -> list[Path]:
        d = self.table_dir(table)
        return sorted(d.rglob("*.parquet")) if d.is_dir() else []

    def has_table(self, table: str) -> bool:
        return bool(self.table_files(table))

    def tables(self) -> list[str]:
        if not self.catalog_dir.is_dir():
            return []
        return sorted(p.name for p in self.catalog_dir.iterdir() if p.is_dir() and self.has_table(p.name))

    def drop_table(self, table: str) -> None:
        shutil.rmtree(self.table_dir(table), ignore_errors=True)

    def delete_part(self, table: str, part: str) -> None:
        (self.table_dir(table) / f"{part}.parquet").unlink(missing_ok=True)

    # ---- SQL ---------------------------------------------------------------------------
    def _table_sql(self, table: str) -> str:
        glob = str(self.table_dir(table) / "**" / "*.parquet").replace("'", "''")
        return f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"

    def view_files(self) -> list[Path]:
        """Packaged views (sql/views/*.sql), then the store's own (which win on a name clash)."""
        packaged = resources.files("sql").joinpath("views")
        files = {Path(str(p)).stem: Path(str(p)) for p in packaged.iterdir() if str(p).endswith(".sql")}
        if self.views_dir.is_dir():
            files.update({p.stem: p for p in self.views_dir.glob("*.sql")})
        return [files[k] for k in sorted(files)]

    def _register(self, con: duckdb.DuckDBPyConnection) -> dict[str, str]:
        """Create the table views and SQL views on `con`; returns {view: error} for views
        whose tables are not in the store yet."""
        for table in self.tables():
            con.execute(f'CREATE OR REPLACE VIEW "{table}" AS {self._table_sql(table)}')
        pending = {p.stem: p.read_text() for p in self.view_files()}
        errors: dict[str, str] = {}
        # Views may depend on each other: retry until no progress.
        while pending:
            progressed = False
            for name, body in list(pending.items()):
                try:
                    con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {body}')
                    del pending[name]
                    errors.pop(name, None)
                    progressed = True
                except duckdb.Error as e:
                    errors[name] = str(e).splitlines()[0]
            if not progressed:
                break
        return errors

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table and view of the store."""
        con = duckdb.connect(":memory:")
        self._register(con)
        return con

    def view_errors(self) -> dict[str, str]:
        """Views that cannot be created yet, with DuckDB's reason (usually a missing table)."""
        con = duckdb.connect(":memory:")
        try:
            return self._register(con)
        finally:
            con.close()

    def query(self, sql: str, params: Iterable[Any] | None = None) -> pa.Table:
        con = self.connect()
        try:
            return con.sql(sql, params=list(params) if params is not None else None).to_arrow_table()
        finally:
            con.close()

    def refresh_catalog(self) -> Path | None:
        """Rebuild catalog.duckdb (views over the Parquet tables) atomically.

        Readers that have the old file open keep it; the next `duckdb store/catalog.duckdb`
        sees the new tables. Paths inside are absolute: a moved store refreshes on its next
        write, or with `python -m store.sql --refresh`.
        """
        if not self.tables():
            return None
        tmp = self.root / f".catalog.{uuid.uuid4().hex}.duckdb.tmp"
        con = duckdb.connect(str(tmp))
        try:
            self._register(con)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        fsync_path(tmp)
        os.replace(tmp, self.catalog_db)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
        return self.catalog_db

    # ---- small JSON documents -----------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> Path:
        if self.root not in path.resolve().parents:
            raise StoreError(f"{path} is outside the store {self.root}")
        atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
        return path


def open_store(root: str | os.PathLike | Store) -> Store:
    return root if isinstance(root, Store) else Store(root)
