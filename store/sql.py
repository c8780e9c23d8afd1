"""Ad-hoc SQL over a store's catalog, with every table and view registered.

    python -m store.sql "SELECT split, count(*) FROM rows GROUP BY split"
    python -m store.sql --store /data/st --format csv "SELECT * FROM needle_tokens LIMIT 100"
    python -m store.sql --format parquet --out sel.parquet "SELECT * FROM assistant_tokens"
    python -m store.sql --views        # list tables and views (and views not creatable yet)
    python -m store.sql --refresh      # rebuild catalog.duckdb, add missing Zarr group metadata

The plain DuckDB CLI works too: `duckdb store_data/catalog.duckdb`.

Read-only unless `--write`: the query runs on the store's in-memory database of views (the
catalog's Parquet files are never opened for writing), and statements other than reads
(SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, PRAGMA) are refused, so a COPY ... TO, ATTACH or
CREATE in a pasted query cannot write anywhere by accident. `--out` saves a result either way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import duckdb
import polars as pl

from store.cli import StoreOptions, parse_config, user_errors
from store.core import Store
from store.groups import write_missing_groups

_READS = {"SELECT", "EXPLAIN", "PRAGMA"}  # DESCRIBE, SHOW and SUMMARIZE parse as SELECT


@dataclass(kw_only=True)
class SqlConfig(StoreOptions):
    """Run SQL over a store's catalog (tables + sql/views) and print or save the result."""

    query: str | None = field(default=None, metadata={"help": "the SQL to run", "positional": True})
    format: Literal["table", "csv", "json", "parquet"] = field(
        default="table", metadata={"help": "output format; parquet needs --out"}
    )
    out: str | None = field(default=None, metadata={"help": "write the result to this file instead of stdout"})
    max_rows: int = field(default=40, metadata={"help": "rows shown by --format table"})
    views: bool = field(default=False, metadata={"help": "list the tables and views instead of querying"})
    write: bool = field(
        default=False,
        metadata={
            "help": "allow statements that write (CREATE, INSERT, COPY ... "
            "TO, ATTACH, SET, ...); without it only reads run"
        },
    )
    refresh: bool = field(
        default=False,
        metadata={"help": "rebuild catalog.duckdb, write any missing Zarr group metadata under arrays/, and exit"},
    )

    def __post_init__(self) -> None:
        if self.format == "parquet" and not self.out:
            raise ValueError("--format parquet needs --out FILE")
        if not (self.query or self.views or self.refresh):
            raise ValueError('pass a query, e.g. python -m store.sql "SELECT split, count(*) FROM rows GROUP BY 1"')


def run_sql(cfg: SqlConfig) -> str:
    """Execute cfg's request; returns what to print."""
    store = Store(cfg.store)
    if not store.root.exists():
        raise ValueError(f"no store at {store.root}; create one with python -m extractors.run --layer 17")
    if cfg.refresh:
        groups = write_missing_groups(store)  # stores made before arrays/ was a Zarr hierarchy
        if store.remote:
            return (
                f"{store.root} is on object storage: no catalog.duckdb to rebuild (query it with python -m "
                f"store.sql --store {store.root}); wrote Zarr group metadata for {len(groups)} folders of arrays/"
            )
        made = f"; wrote Zarr group metadata for {len(groups)} folders of arrays/" if groups else ""
        return f"rebuilt {store.refresh_catalog()}{made}"
    if cfg.views:
        con = store.connect()
        names = con.sql("SELECT table_name, table_type FROM information_schema.tables ORDER BY 1").fetchall()
        lines = [f"{n}  ({'table' if n in store.tables() else 'view'})" for n, _ in names]
        lines += [f"{n}  (not available yet: {err})" for n, err in store.view_errors().items()]
        return "\n".join(lines)
    con = store.connect()
    try:
        kinds = [s.type.name for s in con.extract_statements(cfg.query)]
    except duckdb.Error as e:
        raise ValueError(f"{e}\n(tables and views: python -m store.sql --views --store {cfg.store})") from None
    writes = [k for k in kinds if k not in _READS]
    if writes and not cfg.write:
        raise ValueError(
            f"the query has a {writes[0]} statement, which may write; store.sql only reads unless you pass --write"
        )
    try:
        rel = con.sql(cfg.query)
    except duckdb.Error as e:
        raise ValueError(f"{e}\n(tables and views: python -m store.sql --views --store {cfg.store})") from None
    if rel is None:
        return "ok"
    frame = pl.from_arrow(rel.to_arrow_table())
    if cfg.format == "parquet":
        frame.write_parquet(cfg.out)
        return f"wrote {len(frame)} rows to {cfg.out}"
    if cfg.format == "csv":
        text = frame.write_csv()
    elif cfg.format == "json":
        text = frame.write_json()
    else:
        with pl.Config(tbl_rows=cfg.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            text = str(frame)
    if cfg.out:
        with open(cfg.out, "w") as fh:
            fh.write(text)
        return f"wrote {len(frame)} rows to {cfg.out}"
    return text


@user_errors(ValueError)
def main(argv: list[str] | None = None) -> int:
    print(run_sql(parse_config(SqlConfig, argv, prog="python -m store.sql")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
