"""Tokenizations and their layout: where each token of each row lives in the arrays.

A store has one tokenization (rows rendered with one model's chat template and tokenizer,
identified by a hash). Its layout places every row's tokens contiguously on one token axis
shared by all arrays of that tokenization:

* rows are ordered by split (train_base, attr_query, eval, then others), then by
  (n_tokens, row_id), so rows of similar length sit together and batches barely pad;
* rows are packed greedily into units of at most `unit_tokens` slots; a unit starts at
  `unit * unit_tokens` and its tail slots are unused (never read: the `tokens` table only
  points at used slots);
* `tokens.tok_index = row_layout.tok_start + token_pos` is a token's row in every array.

Tables written here: `tokenizations` (one row per tokenization), `row_layout` (one row per
row: unit, tok_start, n_tokens) and `tokens` (one row per token; a large tokenization is
written in parts, `tokens/<tokenization>/part-NNNNN.parquet`, each holding whole rows, in the
order of the `rows` table (split, row_id) and not the layout's: row groups then cover narrow
row_id ranges, which DuckDB's min/max statistics use to skip them in a row selection).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.core import Store, StoreError

SPLIT_ORDER = ("train_base", "attr_query", "eval")

TOKENS_SCHEMA = pa.schema(
    [
        ("tokenization", pa.string()),
        ("row_id", pa.string()),
        ("token_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("role", pa.string()),
        ("msg_index", pa.int16()),
        ("is_supervised", pa.bool_()),
        ("rel_pos", pa.float32()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("tok_index", pa.int64()),
    ]
)


class Layout(NamedTuple):
    tokenization: str
    unit_tokens: int
    n_units: int
    row_ids: list[str]  # in layout order
    units: list[int]  # per row
    tok_starts: list[int]  # per row
    lengths: list[int]  # per row

    @property
    def n_slots(self) -> int:
        return self.n_units * self.unit_tokens

    def rows_of_unit(self) -> dict[int, list[int]]:
        """{unit: indices into row_ids}."""
        out: dict[int, list[int]] = {}
        for i, u in enumerate(self.units):
            out.setdefault(u, []).append(i)
        return out


def plan_layout(tokenization: str, rows: list[tuple[str, str, int]], unit_tokens: int) -> Layout:
    """Place rows given as (row_id, split, n_tokens) into units (see the module docstring)."""
    if unit_tokens <= 0:
        raise StoreError(f"unit_tokens must be positive, got {unit_tokens}")
    longest = max((n for _, _, n in rows), default=0)
    if longest > unit_tokens:
        raise StoreError(f"a row has {longest} tokens but a unit holds {unit_tokens}; pass --unit-tokens >= {longest}")
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    ordered = sorted(rows, key=lambda r: (rank.get(r[1], len(SPLIT_ORDER)), r[1], r[2], r[0]))
    row_ids, units, starts, lengths = [], [], [], []
    unit, used = 0, 0
    for row_id, _, n in ordered:
        if used + n > unit_tokens:
            unit, used = unit + 1, 0
        row_ids.append(row_id)
        units.append(unit)
        starts.append(unit * unit_tokens + used)
        lengths.append(n)
        used += n
    n_units = unit + 1 if ordered else 0
    return Layout(tokenization, unit_tokens, n_units, row_ids, units, starts, lengths)


def _indexed(layout: Layout, start_of: dict[str, int], tokens: pa.Table) -> pa.Table:
    """`tokens` (TOKENS_SCHEMA less tokenization and tok_index, whole rows) with tok_index =
    tok_start + token_pos and the tokenization filled from the layout."""
    rid = tokens.column("row_id")
    uniq = pc.unique(rid)
    starts = pa.array([start_of[r] for r in uniq.to_pylist()], pa.int64())
    tok_index = pc.add(pc.take(starts, pc.index_in(rid, value_set=uniq)), tokens.column("token_pos").cast(pa.int64()))
    tokens = tokens.append_column("tok_index", tok_index)
    tokens = tokens.append_column("tokenization", pa.array([layout.tokenization] * len(tokens), pa.string()))
    return tokens.select(TOKENS_SCHEMA.names).cast(TOKENS_SCHEMA)


def write_tokenization(store: Store, layout: Layout, tokens: pa.Table | list[Path], info: dict) -> None:
    """Write the three tables of a tokenization. `tokens` has TOKENS_SCHEMA minus tok_index and
    tokenization (they are filled from the layout here): one table, or the Parquet files of a
    streamed tokenization (whole rows each), read one at a time. One table (or one file) is
    written as `tokens/<tokenization>.parquet`; several as `tokens/<tokenization>/part-NNNNN.parquet`,
    one per file, so memory holds one part."""
    start_of = dict(zip(layout.row_ids, layout.tok_starts, strict=False))
    parts = [tokens] if isinstance(tokens, pa.Table) else tokens
    n_sup: dict[str, int] = {}
    for i, part in enumerate(parts):
        t = _indexed(layout, start_of, part if isinstance(part, pa.Table) else pq.read_table(part))
        sup = t.filter(t.column("is_supervised")).group_by("row_id").aggregate([("row_id", "count")])
        n_sup.update(zip(sup.column("row_id").to_pylist(), sup.column("row_id_count").to_pylist(), strict=False))
        store.write_table(
            "tokens", t, part=layout.tokenization if len(parts) == 1 else f"{layout.tokenization}/part-{i:05d}"
        )
        del t
    store.write_table(
        "row_layout",
        pa.table(
            {
                "tokenization": [layout.tokenization] * len(layout.row_ids),
                "row_id": layout.row_ids,
                "unit": pa.array(layout.units, pa.int32()),
                "tok_start": pa.array(layout.tok_starts, pa.int64()),
                "n_tokens": pa.array(layout.lengths, pa.int32()),
                "n_supervised": pa.array([n_sup.get(r, 0) for r in layout.row_ids], pa.int32()),
            }
        ),
        part=layout.tokenization,
    )
    store.write_rows(
        "tokenizations",
        [
            {
                **info,
                "tokenization": layout.tokenization,
                "unit_tokens": layout.unit_tokens,
                "n_units": layout.n_units,
                "n_rows": len(layout.row_ids),
                "n_tokens": sum(layout.lengths),
                "n_slots": layout.n_slots,
                "created_at": datetime.now(UTC),
            }
        ],
        part=layout.tokenization,
    )


def read_layout(store: Store, tokenization: str) -> Layout:
    t = store.query(
        "SELECT l.row_id, l.unit, l.tok_start, l.n_tokens, z.unit_tokens, z.n_units "
        "FROM row_layout l JOIN tokenizations z USING (tokenization) "
        "WHERE tokenization = ? ORDER BY l.tok_start",
        [tokenization],
    ).to_pydict()
    if not t["row_id"]:
        raise StoreError(f"tokenization {tokenization!r} is not in {store.root}")
    return Layout(
        tokenization, t["unit_tokens"][0], t["n_units"][0], t["row_id"], t["unit"], t["tok_start"], t["n_tokens"]
    )


def tokenizations(store: Store) -> list[dict]:
    if not store.has_table("tokenizations"):
        return []
    return store.query("SELECT * FROM tokenizations ORDER BY created_at").to_pylist()


def row_token_ids(store: Store, tokenization: str, row_ids: list[str]) -> dict[str, list[int]]:
    """{row_id: its token ids in order} for the given rows of one tokenization."""
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        t = con.sql(
            "SELECT row_id, list(token_id ORDER BY token_pos) AS ids FROM tokens JOIN wanted USING (row_id) "
            "WHERE tokenization = ? GROUP BY row_id",
            params=[tokenization],
        ).to_arrow_table()
    finally:
        con.close()
    return dict(zip(t.column("row_id").to_pylist(), t.column("ids").to_pylist(), strict=False))


def row_tokens(store: Store, tokenization: str, row_ids: list[str]) -> dict[str, tuple[list[int], list[bool]]]:
    """{row_id: (token ids, is_supervised flags)} in token order."""
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        t = con.sql(
            "SELECT row_id, list(token_id ORDER BY token_pos) AS ids, "
            "list(is_supervised ORDER BY token_pos) AS sup FROM tokens JOIN wanted USING (row_id) "
            "WHERE tokenization = ? GROUP BY row_id",
            params=[tokenization],
        ).to_arrow_table()
    finally:
        con.close()
    return dict(
        zip(
            t.column("row_id").to_pylist(),
            zip(t.column("ids").to_pylist(), t.column("sup").to_pylist(), strict=False),
            strict=False,
        )
    )
