"""Native in-memory copies of the small catalog tables: the fixed cost of every read.

A Store's views (store.core) read Parquet at every query, so a new file of a table shows at
once. Every materialization joins small tables (the commit table `array_units`, `rows`,
`row_layout`, `tokenizations`, `arrays`, and on small stores `tokens`), and scanning their
Parquet files was most of a call's fixed cost: the benchmark's 50-row view over `array_units`
(10 commit files) took 8-14 ms from Parquet and 1.3 ms from a native table; `content_tokens`'
row_id + tok_index, 44 ms and 27 ms (2 busy cores, 2026-12-01). So `sync` keeps each of them
as a native DuckDB table in the Store's in-memory database, loaded once and reloaded when its
files change: the table's files are listed at every `Store.connect()` (one directory scan per
table folder; on object storage one listing of the catalog) with their signature (inode,
mtime, size; an object's ETag and size), and any added, replaced or deleted file reloads that
table from exactly the files listed. The listing comes before the read, so a file written
while a table loads makes the next call reload it again: a copy may be newer than its
signature, never older.

A table of more than `MAX_FILES` files or more Parquet bytes than its limit (`MAX_BYTES`;
`TABLE_MAX_BYTES` for `tokens`) stays a Parquet view: the catalog of 431k conversations has a
`rows` table of hundreds of MB and a `tokens` table of ~100 M lines, and `array_units` grows a
file per unit. The catalog.duckdb file for the plain `duckdb` CLI is built from views alone
(`Store.refresh_catalog`).
"""

from __future__ import annotations

import os
from typing import Any

import duckdb

NATIVE_TABLES = ("array_units", "arrays", "row_layout", "rows", "tokenizations", "tokens")
MAX_FILES = 4096
MAX_BYTES = 32 << 20
# `tokens` holds a line per token, and its Parquet compresses ~10x (token text, repeated
# row ids): 8 MB is about 0.8 M tokens, ~100 MB in memory.
TABLE_MAX_BYTES = {"tokens": 8 << 20}


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _walk(folder: str, out: list[tuple[str, int, int, int]]) -> None:
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    _walk(e.path, out)
                elif e.name.endswith(".parquet") and not e.name.startswith("."):
                    s = e.stat()
                    out.append((e.path, s.st_ino, s.st_mtime_ns, s.st_size))
    except FileNotFoundError:
        pass


def listing(store: Any) -> dict[str, tuple[tuple, ...]]:
    """{table: ((path, signature...), ...)} of the Parquet files of each table in NATIVE_TABLES
    that has any (sorted by path)."""
    found: dict[str, list] = {t: [] for t in NATIVE_TABLES}
    if getattr(store, "remote", False):
        fs, base = store.root.fs, store.catalog_dir.path
        try:
            infos = fs.find(base, detail=True)
        except FileNotFoundError:
            infos = {}
        proto = store.root.protocol
        for name, info in infos.items():
            rel = name[len(base) :].lstrip("/").split("/")
            if len(rel) > 1 and rel[0] in found and name.endswith(".parquet") and info.get("type", "file") == "file":
                tag = info.get("ETag") or info.get("etag") or info.get("md5")
                when = info.get("LastModified") or info.get("mtime") or info.get("created")
                # No tag and no time: nothing tells a replaced object apart, so it always reloads.
                sig = hash((str(tag), str(when))) if tag or when else object()
                found[rel[0]].append((f"{proto}://{name}", sig, 0, int(info.get("size") or 0)))
    else:
        for t in NATIVE_TABLES:
            _walk(str(store.table_dir(t)), found[t])
    return {t: tuple(sorted(v)) for t, v in found.items() if v}


def sync(store: Any, con: duckdb.DuckDBPyConnection) -> dict[str, bool]:
    """Make the small tables native in `con` (the Store's database of views), reloading any
    whose files changed since the last call on that database; returns {table: native}.
    Callers hold the Store's lock."""
    state = getattr(store, "_native_state", None)
    if state is None or state[0] is not con:
        state = store._native_state = (con, {}, set())
    loaded: dict[str, tuple] = state[1]
    native: set[str] = state[2]
    now = listing(store)
    for table in sorted(set(loaded) | set(now)):
        files = now.get(table, ())
        if loaded.get(table) == files:
            continue
        hidden = f'"_native_{table}"'
        small = 0 < len(files) <= MAX_FILES and sum(f[3] for f in files) <= TABLE_MAX_BYTES.get(table, MAX_BYTES)
        try:
            if small:
                con.execute(
                    f"CREATE OR REPLACE TABLE {hidden} AS SELECT * FROM "
                    f"read_parquet({_sql_list([f[0] for f in files])}, union_by_name = true)"
                )
                con.execute(f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM {hidden}')
                loaded[table] = files
                native.add(table)
                continue
        except duckdb.Error:
            pass  # a file went away while loading: the Parquet view now, a reload next call
        # Too big, gone, or failed: the plain Parquet view (as store.core registers it).
        if files:
            con.execute(f'CREATE OR REPLACE VIEW "{table}" AS {store._table_sql(table)}')
        con.execute(f"DROP TABLE IF EXISTS {hidden}")
        native.discard(table)
        if small:
            loaded.pop(table, None)
        else:
            loaded[table] = files
    return {t: t in native for t in now}
