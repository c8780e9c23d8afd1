"""Write the `rows` table from a second pass over the source, in bounded memory.

Step 1 of the ingest (extractors.ingest.steps) keeps a compact `Kept` per row; this pass reads
the source again, rebuilds the full row of every chosen record (`make_row`, steps.full_row)
and writes the table ordered split by split (in `splits` order), rows by row_id: the same
table the in-memory ingest wrote. (steps calls this module, so it takes the schema, the split
order and the row builder as arguments instead of importing them.)

Memory holds one batch of `batch_rows` full rows. When every chosen row fits in one batch the
table is one file (`rows/part-0.parquet`), as before; otherwise each batch goes, sorted, to a
temporary Parquet file (row groups of MERGE_ROWS rows, so that the merge holds that many rows
of each), and a k-way merge of those files writes the table as consecutive parts
(`rows/part-0-00000.parquet`, ...) whose file-name order is the row order. The extra source
columns (e.g. the embedded sample's needle offsets) get one type over all rows: pyarrow's
inference over one value of each Python type seen, which is what inferring over the whole
column gives.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store.core import Store
from store.scratch import scratch

RowBuilder = Callable[[str, str, int, dict, Any], dict]  # (split, source split, index, record, kept) -> row

# rows per row group of a spooled batch file and per read of one: the merge holds this many
# rows of each file (a reader decompresses a whole row group; with one group per file the merge
# of 431k rows held every row at once, 1.7 GB)
MERGE_ROWS = 256


def _table(rows: list[dict[str, Any]], schema: pa.Schema, extras: dict[str, pa.DataType | None]) -> pa.Table:
    """The rows as `schema` plus the extra columns (a type of None is inferred)."""
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    for k, typ in extras.items():
        table = table.append_column(k, pa.array([r.get(k) for r in rows], type=typ))
    return table


def source_split_order(source_splits: Iterable[str]) -> list[str]:
    """The order both passes read the source's splits in: train first, then by name."""
    return sorted(source_splits, key=lambda s: (s != "train", s))


def chosen_rows(
    source_splits: dict[str, Iterable[dict]], chosen: dict[str, list[Any]], make_row: RowBuilder
) -> Iterator[dict]:
    """The full row of every chosen record (a `Kept` in `chosen`), in source order, with its split."""
    by_split: dict[str, dict[int, tuple[str, Any]]] = {}
    for split, ks in chosen.items():
        for k in ks:
            by_split.setdefault(k.source_split, {})[k.source_index] = (split, k)
    for ssplit in source_split_order(source_splits):
        wanted = by_split.get(ssplit)
        if not wanted:
            continue
        for idx, rec in enumerate(source_splits[ssplit]):
            hit = wanted.get(idx)
            if hit is not None:
                yield make_row(hit[0], ssplit, idx, rec, hit[1])


def write_rows_table(
    store: Store,
    source_splits: dict[str, Iterable[dict]],
    chosen: dict[str, list[Any]],
    batch_rows: int,
    *,
    schema: pa.Schema,
    splits: tuple[str, ...],
    make_row: RowBuilder,
) -> list[str]:
    """Write `rows` (see the module docstring); returns the names of the extra columns."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")

    def order_key(r: dict[str, Any]) -> tuple[int, str]:
        return splits.index(r["split"]), r["row_id"]

    def read_sorted(path: Path) -> Iterator[tuple[tuple[int, str], dict]]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=MERGE_ROWS):
            for r in batch.to_pylist():
                yield order_key(r), r

    fixed = set(schema.names)
    samples: dict[str, dict[type, Any]] = {}  # extra column -> {python type: one value}
    with scratch(store, "ingest-rows") as tmp:
        spooled: list[Path] = []
        batch: list[dict] = []

        def spool() -> None:
            batch.sort(key=order_key)
            path = Path(tmp) / f"{len(spooled):05d}.parquet"
            pq.write_table(
                _table(batch, schema, dict.fromkeys(sorted(set().union(*batch) - fixed))),
                path,
                row_group_size=MERGE_ROWS,
            )
            spooled.append(path)
            batch.clear()

        for row in chosen_rows(source_splits, chosen, make_row):
            for k in row.keys() - fixed:
                v = row[k]
                if v is not None:
                    samples.setdefault(k, {}).setdefault(type(v), v)
                else:
                    samples.setdefault(k, {})
            batch.append(row)
            if len(batch) >= batch_rows:
                spool()
        extras = sorted(samples)
        types = {k: pa.array(list(samples[k].values())).type if samples[k] else pa.null() for k in extras}
        written: set[Path] = set()
        if not spooled:  # one batch: one file, as the in-memory ingest wrote it
            batch.sort(key=order_key)
            written.add(store.write_table("rows", _table(batch, schema, dict.fromkeys(extras))))
        else:
            if batch:
                spool()
            out: list[dict] = []
            for _, r in heapq.merge(*(read_sorted(p) for p in spooled), key=lambda kr: kr[0]):
                out.append(r)
                if len(out) >= batch_rows:
                    written.add(
                        store.write_table("rows", _table(out, schema, types), part=f"part-0-{len(written):05d}")
                    )
                    out = []
            if out:
                written.add(store.write_table("rows", _table(out, schema, types), part=f"part-0-{len(written):05d}"))
    for f in store.table_files("rows"):  # parts an earlier, unfinished ingest left
        if f not in written:
            f.unlink()
    return extras
