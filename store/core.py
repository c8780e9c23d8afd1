"""The store: one root folder, and the only code that knows paths.

Layout under the root (every path below is built here and nowhere else):

    catalog/<table>/**/*.parquet   the catalog: Parquet, the source of truth. A table is a
                                   folder; writers add or atomically replace whole files.
    catalog.duckdb                 a DuckDB file holding one view per table and per SQL view,
                                   rebuilt atomically after writes, for the plain `duckdb` CLI
                                   (DuckDB >= 1.0 storage format; keeps working when the store
                                   is moved: see `Store.refresh_catalog`)
    arrays/<name>/                 Zarr v3 arrays, e.g. arrays/hidden/layer_17; every folder
                                   above an array is a Zarr group (see `store.groups`)
    runs/<run_id>/                 what a run leaves beside its record (checkpoints, plots, JSON)
    views/*.sql                    the store's own SQL views (user-defined; the packaged ones
                                   live in sql/views/)

Readers use `Store.connect()`, an in-memory DuckDB connection with the same views, so a
query never takes a file lock that a writer would wait on. Creating those views binds every
Parquet table (tens of ms), so a Store keeps one in-memory database with the views and hands
out cheap cursors on it, building a fresh database only when the set of tables or of SQL
view files changes (a new file of an existing table needs nothing: the views re-read their
globs at every query).

catalog.duckdb must open in the plain `duckdb` CLI wherever the store lies. DuckDB resolves a
relative path in a view against the session's working directory (or `file_search_path`, which
is not saved in the file), never against the database file, so relative paths would break
as soon as the CLI runs elsewhere. Instead its table views derive the store folder from the
session's `temp_directory`, which DuckDB sets to `<database file>.tmp` by default, and fall
back to the absolute root the file was built at (details in `Store.refresh_catalog`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from store.fs import RemotePath, filesystem, is_url, staging_root, temp_path  # noqa: F401 (temp_path: re-exported)
from store.native import sync as sync_native

STORE_VERSION = "1"
DEFAULT_STORE = "./store_data"  # every command's --store default (./store is the package)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]+$")
# A view file may instead hold one `CREATE [OR REPLACE] MACRO name(...) AS TABLE ...`: a table
# macro with parameters (e.g. sql/views/token_selection.sql), created as written.
_MACRO_RE = re.compile(r"^(\s*--[^\n]*\n)*\s*CREATE\s+(OR\s+REPLACE\s+)?MACRO\b", re.IGNORECASE)
# catalog.duckdb's storage format: the oldest that DuckDB 2.0 writes, which DuckDB >= 1.0
# reads (duckdb-cli 1.5.6, the newest on PyPI, reads storage versions 64-68; 2.0 writes 69).
CATALOG_STORAGE_VERSION = "v1.0.0"


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message says what to do."""


def _sql_str(s: str) -> str:
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def row_group_rows(n_rows: int) -> int:
    """Parquet row-group size: about 8 groups per table, so DuckDB scans a table on several
    threads (it parallelises by row group; one group of a 154k-row tokens table scanned 2.2x
    slower on 2 cores), between 8,192 rows and DuckDB's own 122,880."""
    return min(122_880, max(8_192, -(-n_rows // 8)))


def file_signature(path: Path | os.DirEntry) -> tuple[int, int, int]:
    """(inode, mtime_ns, size): changes when a file is written, replaced (atomic writes make a
    new inode) or recreated; what the per-process caches of catalog files key on."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


_TMP_PID = re.compile(r"\.(\d+)-[0-9a-f]{12}(\.duckdb)?\.tmp$")


def pid_alive(pid: int) -> bool:
    """Is process `pid` of this host alive? (one we may not signal counts as alive)"""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_temp_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Delete the `.*.tmp` files in (and with `recursive`, under) `folder` that a process of
    this host left when it was killed (its pid is in the name and is gone); returns them.
    Live writers' files stay."""
    if isinstance(folder, RemotePath):
        return []  # remote writes are single PUTs: no temp files to sweep
    gone = []
    found = (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")) if folder.is_dir() else []
    for f in found:
        m = _TMP_PID.search(f.name)
        if m and not pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one (on
    object storage: one PUT, atomic per object)."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def safe_name(name: str, slashes: bool = False) -> bool:
    """Is `name` a name that stays inside its folder: [A-Za-z0-9_.-] parts (joined by '/' when
    `slashes`), none of them '.' or '..'? Array names, table parts and run ids must be."""
    parts = name.split("/") if slashes else [name]
    return bool(name) and all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts)


def write_json(path: Path, obj: Any) -> Path:
    """Write a JSON document atomically (sorted keys, indented; non-JSON values as str)."""
    path = path if isinstance(path, RemotePath) else Path(path)
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    return path


class Store:
    """A store rooted at a local folder (created on first write) or at an fsspec URL
    (`s3://bucket/prefix`, `memory://name`; `file://` is a local folder): see store.fs."""

    def __init__(self, root: str | os.PathLike):
        root_s = str(root)
        if root_s.startswith("file://"):
            root_s = root_s[len("file://") :]
        if is_url(root_s):
            fs, path = filesystem(root_s)
            self.root: Path | RemotePath = RemotePath(fs, path)
            bucket = path.split("/", 1)[0]
            if self.root.protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs") and not fs.exists(bucket):
                raise StoreError(
                    f"store {root_s!r}: bucket {bucket!r} does not exist or these credentials "
                    "cannot see it; create it (e.g. aws s3 mb s3://" + bucket + ") or check "
                    "AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL"
                )
            if self.root.is_file():
                raise StoreError(f"store path {root_s!r} is an object, not a prefix; pass another --store")
        else:
            self.root = Path(root_s).expanduser().resolve()
        if not self.remote and self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} exists and is not a folder; pass another --store")
        self._lock = threading.Lock()
        self._views_db: tuple[Any, duckdb.DuckDBPyConnection, dict[str, str]] | None = None
        self._inherited: Any = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # A Store travels to worker processes as its root; the cached database stays behind.
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self._lock = threading.Lock()
        self._views_db, self._inherited, self._pid = None, None, os.getpid()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def sql_command(self) -> str:
        """How to open this store's catalog from a shell (a remote store has no catalog.duckdb)."""
        return f"python -m store.sql --store {self.root}" if self.remote else f"duckdb {self.catalog_db}"

    @property
    def remote(self) -> bool:
        """Does the store live on object storage (a URL root) rather than a local folder?"""
        return isinstance(self.root, RemotePath)

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

    @property
    def arrays_dir(self) -> Path:
        """The root Zarr group: every folder from here down to an array is a group."""
        return self.root / "arrays"

    @property
    def claims_dir(self) -> Path:
        """Claim files of cooperating writers (store.claims); empty when no writer is working."""
        return self.root / "claims"

    def array_path(self, name: str) -> Path:
        if not safe_name(name, slashes=True):
            raise StoreError(
                f"array name {name!r} must be like 'hidden/layer_17' (letters, digits, _ . -, "
                f"parts joined by '/', no '.' or '..' part): it may not leave {self.arrays_dir}"
            )
        return self.arrays_dir / Path(*name.split("/"))

    def run_dir(self, run_id: str) -> Path:
        """A run's folder (`run_folder`), created."""
        d = self.run_folder(run_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run_folder(self, run_id: str) -> Path:
        """Where a run's folder is read: runs/<run_id>/ (not created), or for a remote store
        its local staging copy (downloaded on first use)."""
        if not safe_name(run_id):
            raise StoreError(
                f"run id {run_id!r} must be one name (letters, digits, _ . -, not '.' or '..'): "
                f"it may not leave {self.root / 'runs'}"
            )
        if self.remote:
            return self._staged_run_dir(run_id)
        return self.root / "runs" / run_id

    # A remote store's run folders are written locally (trainers save checkpoints, plots and
    # JSON with plain file APIs: torch, safetensors, matplotlib) in a staging folder, then
    # uploaded by `sync_run` (Run does it when a run finishes or fails; a long trainer may
    # call it after each checkpoint). A run folder that exists remotely but not in this machine's staging is downloaded
    # on first use, so a run can be resumed or read on another machine.
    def _staged_run_dir(self, run_id: str) -> Path:
        local = staging_root(str(self.root)) / "runs" / run_id
        if not local.is_dir():
            remote = self.root / "runs" / run_id
            for f in remote.rglob("*"):
                dest = local / Path(*f.relative_to(remote).parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
            local.mkdir(parents=True, exist_ok=True)
        return local

    def sync_run(self, run_id: str) -> int:
        """Upload a remote store's staged run folder (files new or changed since the last
        sync, each one whole object; files this process uploaded and has since deleted are
        deleted there too); returns how many it uploaded. A no-op on a local store."""
        if not self.remote:
            return 0
        local = staging_root(str(self.root)) / "runs" / run_id
        synced = getattr(self, "_synced", None)
        if synced is None:
            synced = self._synced = {}
        n = 0
        for f in sorted(local.rglob("*")) if local.is_dir() else []:
            if not f.is_file() or f.name.endswith(".tmp"):
                continue
            sig = file_signature(f)
            if synced.get(str(f)) == sig:
                continue
            (self.root / "runs" / run_id / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
            synced[str(f)] = sig
            n += 1
        for name in [k for k in synced if k.startswith(str(local) + os.sep) and not Path(k).exists()]:
            # uploaded by this process, since deleted locally (e.g. a rotated checkpoint)
            (self.root / "runs" / run_id / Path(name).relative_to(local).as_posix()).unlink(missing_ok=True)
            del synced[name]
        return n

    @property
    def views_dir(self) -> Path:
        return self.root / "views"

    # ---- tables ------------------------------------------------------------------------
    def write_table(self, table: str, data: pa.Table, part: str = "part-0") -> Path:
        """Write (or atomically replace) one Parquet file of `table`; returns its path."""
        if not safe_name(part, slashes=True):
            raise StoreError(
                f"bad table part name {part!r} (letters, digits, _ . -, parts joined by '/', no '.' or '..' part)"
            )
        path = self.table_dir(table) / f"{part}.parquet"
        if self.remote:  # one PUT: the object appears whole or not at all (see store.fs)
            buf = pa.BufferOutputStream()
            pq.write_table(data, buf, compression="zstd", row_group_size=row_group_rows(data.num_rows))
            path.write_bytes(buf.getvalue().to_pybytes())
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        pq.write_table(data, tmp, compression="zstd", row_group_size=row_group_rows(data.num_rows))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
        return path

    def write_rows(
        self, table: str, rows: list[dict[str, Any]], part: str = "part-0", schema: pa.Schema | None = None
    ) -> Path:
        return self.write_table(table, pa.Table.from_pylist(rows, schema=schema), part)

    def table_files(self, table: str) -> list[Path]:
        d = self.table_dir(table)
        return sorted(d.rglob("*.parquet")) if self.remote or d.is_dir() else []

    def has_table(self, table: str) -> bool:
        d = self.table_dir(table)
        return (self.remote or d.is_dir()) and next(d.rglob("*.parquet"), None) is not None

    def tables(self) -> list[str]:
        if self.remote:  # one listing of catalog/ instead of one per table
            return sorted(
                {
                    f.relative_to(self.catalog_dir).parts[0]
                    for f in self.catalog_dir.rglob("*.parquet")
                    if len(f.relative_to(self.catalog_dir).parts) > 1
                }
            )
        if not self.catalog_dir.is_dir():
            return []
        return sorted(p.name for p in self.catalog_dir.iterdir() if p.is_dir() and self.has_table(p.name))

    def drop_table(self, table: str) -> None:
        if self.remote:
            self.table_dir(table).rmtree()
            return
        shutil.rmtree(self.table_dir(table), ignore_errors=True)

    def delete_part(self, table: str, part: str) -> None:
        (self.table_dir(table) / f"{part}.parquet").unlink(missing_ok=True)

    # ---- SQL ---------------------------------------------------------------------------
    def _table_sql(self, table: str, root_sql: str | None = None) -> str:
        """The view of one table: its Parquet files. `root_sql`, a SQL expression for the store
        folder (ending in a slash), replaces this Store's absolute path (see `_catalog_root_sql`)."""
        if root_sql is None:
            glob = _sql_str(str(self.table_dir(table) / "**" / "*.parquet"))
        else:
            glob = f"{root_sql} || {_sql_str(str(self.table_dir(table).relative_to(self.root)) + '/**/*.parquet')}"
        return f"SELECT * FROM read_parquet({glob}, union_by_name = true)"

    def _catalog_root_sql(self) -> str:
        """The store folder as catalog.duckdb's views find it when the file is opened (see
        `refresh_catalog`): DuckDB's `temp_directory` defaults to `<database file>.tmp`, so a
        session opened on this file names its folder as it was given (relative paths included,
        which DuckDB resolves against the same working directory); otherwise (the catalog
        ATTACHed to another session, or temp_directory set) the root it was built at."""
        name = re.escape(self.catalog_db.name + ".tmp")
        tmp = "current_setting('temp_directory')"
        return (
            f"(CASE WHEN regexp_matches({tmp}, '(^|/){name}$') "
            f"THEN regexp_replace({tmp}, '{name}$', '') ELSE {_sql_str(str(self.root) + '/')} END)"
        )

    def view_files(self) -> list[Path]:
        """Packaged views (sql/views/*.sql), then the store's own (which win on a name clash)."""
        packaged = resources.files("sql").joinpath("views")
        files = {Path(str(p)).stem: Path(str(p)) for p in packaged.iterdir() if str(p).endswith(".sql")}
        if self.remote or self.views_dir.is_dir():
            files.update({p.stem: p for p in self.views_dir.glob("*.sql")})
        return [files[k] for k in sorted(files)]

    def _register(
        self, con: duckdb.DuckDBPyConnection, only: Iterable[str] | None = None, root_sql: str | None = None
    ) -> dict[str, str]:
        """Create the table views and SQL views on `con` (with `only`: just those SQL views);
        returns {view: error} for views that cannot be created yet (usually a missing table)."""
        if only is None:
            for table in self.tables():
                con.execute(f'CREATE OR REPLACE VIEW "{table}" AS {self._table_sql(table, root_sql)}')
        wanted = None if only is None else set(only)
        pending = {p.stem: p.read_text() for p in self.view_files() if wanted is None or p.stem in wanted}
        errors: dict[str, str] = {}
        # Views may depend on each other: retry until no progress.
        while pending:
            progressed = False
            for name, body in list(pending.items()):
                try:
                    con.execute(body if _MACRO_RE.match(body) else f'CREATE OR REPLACE VIEW "{name}" AS {body}')
                    del pending[name]
                    errors.pop(name, None)
                    progressed = True
                except duckdb.Error as e:
                    errors[name] = str(e).splitlines()[0]
            if not progressed:
                break
        return errors

    def _views_key(self) -> tuple:
        """What the registered views depend on: the tables present and the view files."""
        views = tuple((str(p), *file_signature(p)) for p in self.view_files())
        return tuple(self.tables()), views

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with every table and view of the store.

        It is a cursor on this Store's in-memory database of views (see the module
        docstring): close it when done; TEMP tables and `register`ed objects are private to
        it. To define views of your own, use TEMP views or a views/*.sql file of the store."""
        return self._views()[1].cursor()

    def _views(self) -> tuple[Any, duckdb.DuckDBPyConnection, dict[str, str]]:
        if self._pid != os.getpid():
            # A forked child must not use the parent's DuckDB database (or a lock a parent
            # thread held at the fork): start afresh, keeping the inherited one referenced
            # (closing it in the child can block).
            self._lock, self._inherited, self._views_db, self._pid = threading.Lock(), self._views_db, None, os.getpid()
        key = self._views_key()
        with self._lock:
            if self._views_db is None or self._views_db[0] != key:
                con = duckdb.connect(":memory:")
                if self.remote:  # DuckDB reads the Parquet through fsspec: no httpfs download
                    con.register_filesystem(self.root.fs)
                # The old database lives on while cursors opened on it are in use.
                self._views_db = (key, con, self._register(con))
                sync_native(self, con)  # the small tables as native tables (store.native)
            else:
                # A view missing a table waits for the key to change; one missing a column
                # (Binder Error) may be fixed by a new file of a table, so it is retried, and
                # when one comes back, so are the views that may stand on it.
                key, con, errors = self._views_db
                sync_native(self, con)  # first: a reloaded table may bring the missing column
                retry = [n for n, e in errors.items() if e.startswith("Binder Error")]
                if retry:
                    still = self._register(con, only=retry)
                    errors = {**{n: e for n, e in errors.items() if n not in retry}, **still}
                    if len(still) < len(retry):
                        errors = self._register(con, only=list(errors))
                    self._views_db = (key, con, errors)
            return self._views_db

    def view_errors(self) -> dict[str, str]:
        """Views that cannot be created yet, with DuckDB's reason (usually a missing table)."""
        return dict(self._views()[2])

    def query(self, sql: str, params: Iterable[Any] | None = None) -> pa.Table:
        con = self.connect()
        try:
            return con.sql(sql, params=list(params) if params is not None else None).to_arrow_table()
        finally:
            con.close()

    def refresh_catalog(self) -> Path | None:
        """Rebuild catalog.duckdb (views over the Parquet tables) atomically.

        Readers that have the old file open keep it; the next `duckdb store/catalog.duckdb`
        sees the new tables. The file is written in DuckDB's v1.0.0 storage format
        (`CATALOG_STORAGE_VERSION`), which every DuckDB from 1.0 opens: the newest `duckdb-cli`
        (1.5) refuses files in duckdb 2.0's own format.

        A moved or remounted store keeps answering without a rebuild: the table views find
        the store folder from the session (see `_catalog_root_sql`), because DuckDB resolves a
        relative path against the working directory (or `file_search_path`, a setting that is
        not saved in the file), never against the database file. That works whenever the
        file is opened directly (`duckdb path/to/catalog.duckdb`, `duckdb.connect(path)`),
        from any working directory. ATTACHed to another session, the views read the folder
        the catalog was built at: after moving the store, rebuild with
        `python -m store.sql --refresh`. Opening another store's catalog.duckdb and ATTACHing
        this one makes this one's views read the other store: ATTACH both to a plain
        `duckdb` session instead.
        """
        if self.remote or not self.tables():
            # A remote store has no catalog.duckdb: its views would need DuckDB's httpfs
            # extension and the credentials in every CLI session; `python -m store.sql
            # --store s3://...` gives the same tables and views (docs/scale.md).
            return None
        tmp = self.root / f".catalog.{os.getpid()}-{uuid.uuid4().hex[:12]}.duckdb.tmp"
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH {_sql_str(str(tmp))} AS catalog_build (STORAGE_VERSION '{CATALOG_STORAGE_VERSION}')")
            con.execute("USE catalog_build")
            self._register(con, root_sql=self._catalog_root_sql())
            con.execute("CHECKPOINT catalog_build")
            con.execute("USE memory")
            con.execute("DETACH catalog_build")
        finally:
            con.close()
        fsync_path(tmp)
        os.replace(tmp, self.catalog_db)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
        return self.catalog_db

    # ---- small JSON documents -----------------------------------------------------------
    def write_json(self, path: Path, obj: Any) -> Path:
        """`write_json` for a path that must lie inside this store (or, for a remote store, in
        its local staging of run folders: see `run_dir`)."""
        inside = [self.root] + ([staging_root(str(self.root))] if self.remote else [])
        if not any(r in path.resolve().parents for r in inside):
            raise StoreError(f"{path} is outside the store {self.root}")
        return write_json(path, obj)


def open_store(root: str | os.PathLike | Store) -> Store:
    return root if isinstance(root, Store) else Store(root)
