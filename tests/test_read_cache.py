"""The read path's caches (store.native's in-memory tables, store.materialize's kept readers and
the projected streaming SELECT) must see every write: write, read, write more, read again, and
compare with plain references (DuckDB over the Parquet files, np.memmap of the chunk files)."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import zarr

from store import native
from store.arrays import chunk_path, commit_unit, create_array, decode, encode, write_unit
from store.catalog.tokens import plan_layout, write_tokenization
from store.core import Store
from store.materialize import drop_read_cache, gather, iter_materialize, materialize, reader, select

UNIT, WIDTH, A = 64, 8, "hidden/layer_0"


def _plain(store: Store, sql_over_t: str, table: str) -> list[tuple]:
    """The reference: a fresh DuckDB over the table's Parquet files, no Store involved."""
    glob = str(store.table_dir(table) / "**" / "*.parquet")
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{glob}', union_by_name = true)")
        return sorted(con.sql(sql_over_t).fetchall())
    finally:
        con.close()


def _natives(store: Store) -> set[str]:
    con = store.connect()
    try:
        return {
            r[0] for r in con.sql("SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '_native_%'").fetchall()
        }
    finally:
        con.close()


def _tokenized_store(tmp_path, n_rows: int = 12) -> tuple[Store, object, np.ndarray]:
    """Rows of 5..20 tokens, a layout of 64-slot units, the three tokenization tables, and an
    empty bf16 array over it; returns (store, layout, the float32 values it will hold)."""
    st = Store(tmp_path / "st")
    rng = np.random.default_rng(3)
    lens = {f"r{i:02d}": int(rng.integers(5, 21)) for i in range(n_rows)}
    st.write_table(
        "rows",
        pa.table(
            {
                "row_id": list(lens),
                "split": ["train_base"] * n_rows,
                "category": ["math" if i % 2 else "code" for i in range(n_rows)],
            }
        ),
    )
    layout = plan_layout("tok-test", [(r, "train_base", n) for r, n in lens.items()], UNIT)
    ids = [r for r, n in lens.items() for _ in range(n)]
    pos = [p for n in lens.values() for p in range(n)]
    role = ["assistant" if p % 3 else "user" for p in pos]
    tokens = pa.table(
        {
            "row_id": ids,
            "token_pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(pos, pa.int32()),
            "token_text": [f"t{p}" for p in pos],
            "role": role,
            "msg_index": pa.array([0] * len(ids), pa.int16()),
            "is_supervised": [r == "assistant" for r in role],
            "rel_pos": pa.array([0.0] * len(ids), pa.float32()),
            "char_start": pa.array(pos, pa.int32()),
            "char_end": pa.array(pos, pa.int32()),
        }
    )
    write_tokenization(st, layout, tokens, {"model": "test"})
    create_array(
        st, A, n_slots=layout.n_slots, width=WIDTH, chunk_slots=UNIT, dtype="bf16", attrs={"tokenization": "tok-test"}
    )
    values = rng.standard_normal((layout.n_slots, WIDTH)).astype(np.float32)
    return st, layout, values


def _write_and_commit(st: Store, layout, values: np.ndarray, unit: int) -> None:
    arr = zarr.open_array(str(st.array_path(A)), mode="r+")
    write_unit(st, arr, A, unit, encode(values[unit * UNIT : (unit + 1) * UNIT], "bf16"))
    commit_unit(st, A, unit, [layout.row_ids[i] for i in layout.rows_of_unit()[unit]], "run")


def _memmap_reference(st: Store, layout, idx: np.ndarray) -> np.ndarray:
    """Rows `idx` read straight from the chunk files with np.memmap (0 where unwritten)."""
    out = np.zeros((len(idx), WIDTH), np.float32)
    for i, t in enumerate(idx):
        path = chunk_path(st, A, int(t) // UNIT, 2)
        if path.exists():
            mm = np.memmap(path, dtype=np.uint16, mode="r", shape=(UNIT, WIDTH))
            out[i] = decode(np.asarray(mm[int(t) % UNIT])[None], "bfloat16")[0]
    return out


def test_native_tables_follow_every_kind_of_change(tmp_path, monkeypatch):
    st, layout, values = _tokenized_store(tmp_path)
    _write_and_commit(st, layout, values, 0)
    assert {"_native_array_units", "_native_rows", "_native_row_layout", "_native_tokens"} <= _natives(st)
    q = "SELECT unit, row_id FROM array_units"
    assert sorted(map(tuple, st.query(q).to_pandas().itertuples(index=False))) == _plain(
        st, "SELECT unit, row_id FROM t", "array_units"
    )
    for unit in range(1, layout.n_units):  # new commit files, one at a time
        _write_and_commit(st, layout, values, unit)
        got = st.query("SELECT count(*) AS n, count(DISTINCT unit) AS u FROM array_units").to_pylist()[0]
        assert got == {
            "n": len(layout.row_ids[: sum(len(v) for u, v in layout.rows_of_unit().items() if u <= unit)]),
            "u": unit + 1,
        }
    commit_unit(st, A, 0, ["r-extra"], "run-2")  # a replaced commit file
    assert "r-extra" in st.query("SELECT row_id FROM array_units").column(0).to_pylist()
    st.write_table("rows", pa.table({"row_id": ["late"], "split": ["eval"], "score": [1.5]}), part="part-1")
    assert st.query("SELECT row_id, score FROM rows WHERE score IS NOT NULL").to_pylist() == [
        {"row_id": "late", "score": 1.5}
    ]  # a new part with a new column
    st.delete_part("rows", "part-1")  # a deleted part
    assert st.query("SELECT count(*) FROM rows").column(0)[0].as_py() == len(layout.row_ids)
    assert _plain(st, "SELECT row_id FROM t", "rows") == sorted(
        (r,) for r in st.query("SELECT row_id FROM rows").column(0).to_pylist()
    )
    # Over the size limit a table is a Parquet view again, with the same answers.
    monkeypatch.setattr(native, "MAX_BYTES", 0)
    st.write_table("array_units", st.query("SELECT * FROM array_units WHERE false"), part="empty")
    assert "_native_array_units" not in _natives(st) and "_native_tokens" in _natives(st)
    assert sorted(map(tuple, st.query(q).to_pandas().itertuples(index=False))) == _plain(
        st, "SELECT unit, row_id FROM t", "array_units"
    )


def test_kept_readers_see_new_units_and_rewritten_chunks(tmp_path):
    st, layout, values = _tokenized_store(tmp_path)
    idx = np.random.default_rng(0).permutation(layout.n_slots)[:100]
    assert np.array_equal(gather(st, A, idx), np.zeros((100, WIDTH), np.float32))  # nothing written yet
    kept = reader(st, A)
    _write_and_commit(st, layout, values, 0)
    assert reader(st, A) is kept
    assert np.array_equal(gather(st, A, idx), _memmap_reference(st, layout, idx))  # a chunk mapped as absent
    for unit in range(1, layout.n_units):
        _write_and_commit(st, layout, values, unit)
    assert np.array_equal(gather(st, A, idx), decode(encode(values[idx], "bf16"), "bfloat16"))
    values2 = values[::-1].copy()  # a rewritten chunk
    _write_and_commit(st, layout, values2, 1)
    got = gather(st, A, idx)
    assert np.array_equal(got, _memmap_reference(st, layout, idx))
    assert not np.array_equal(got, decode(encode(values[idx], "bf16"), "bfloat16"))
    sorted_idx = np.sort(idx)  # the run-copy path too
    assert np.array_equal(
        gather(st, A, np.arange(UNIT, 2 * UNIT)), _memmap_reference(st, layout, np.arange(UNIT, 2 * UNIT))
    )
    assert np.array_equal(gather(st, A, sorted_idx), _memmap_reference(st, layout, sorted_idx))
    # A recreated array (new zarr.json) gets a new reader.
    import shutil

    shutil.rmtree(st.array_path(A))
    create_array(
        st,
        A,
        n_slots=layout.n_slots + UNIT,
        width=WIDTH,
        chunk_slots=UNIT,
        dtype="bf16",
        attrs={"tokenization": "tok-test"},
    )
    assert reader(st, A) is not kept and reader(st, A).arr.shape[0] == layout.n_slots + UNIT
    assert np.array_equal(gather(st, A, idx), np.zeros((100, WIDTH), np.float32))
    drop_read_cache()
    assert reader(st, A) is not kept


def test_materialize_write_read_write_read_matches_plain_references(tmp_path):
    st, layout, values = _tokenized_store(tmp_path, n_rows=30)
    assert layout.n_units >= 4
    _write_and_commit(st, layout, values, 0)
    first = set(layout.row_ids[i] for i in layout.rows_of_unit()[0])
    tok_view = (
        "SELECT row_id, token_pos, tok_index FROM tokens WHERE row_id IN (SELECT row_id FROM array_units) "
        "ORDER BY hash(tok_index) LIMIT 40"
    )
    row_view = "SELECT row_id, category FROM rows WHERE row_id IN (SELECT row_id FROM array_units) ORDER BY row_id"
    for round_ in range(3):
        for view in (tok_view, row_view):
            m = materialize(st, view, A)
            assert set(m.frame["row_id"]) <= first and len(m.X) > 0
            assert np.array_equal(m.X, _memmap_reference(st, layout, m.frame["tok_index"].to_numpy()))
            if view is row_view:  # every token of every committed row, from row_layout
                want = _plain(st, "SELECT row_id, n_tokens FROM t", "row_layout")
                assert len(m.X) == sum(n for r, n in want if r in first)
                assert set(m.frame["row_id"]) == first
        for unit in range(1 + round_, min(2 + round_, layout.n_units)):  # write more, read again
            _write_and_commit(st, layout, values, unit)
            first |= set(layout.row_ids[i] for i in layout.rows_of_unit()[unit])
    with pytest.raises(Exception, match="not in hidden/layer_0"):
        materialize(st, "tokens", A)  # the last units are still missing
    for unit in range(layout.n_units):
        _write_and_commit(st, layout, values, unit)
    m = materialize(st, "SELECT row_id, tok_index FROM tokens ORDER BY tok_index", A)
    assert np.array_equal(m.X, decode(encode(values[m.frame["tok_index"].to_numpy()], "bf16"), "bfloat16"))


def test_streaming_projection_keeps_the_views_rows_and_order(tmp_path):
    st, layout, values = _tokenized_store(tmp_path, n_rows=20)
    for unit in range(layout.n_units):
        _write_and_commit(st, layout, values, unit)
    view = (
        "SELECT t.*, r.category FROM tokens t JOIN rows r USING (row_id) WHERE role = 'assistant' "
        "ORDER BY hash(tok_index)"
    )
    full = select(st, view, A)
    lean = select(st, view, A, columns=[])
    assert lean.columns == ["row_id", "token_pos", "tok_index"]
    assert lean.equals(full.select(lean.columns))
    perm = np.random.default_rng(1).permutation(len(full))
    for cols in (None, [], ["category"]):
        batches = list(iter_materialize(st, view, A, batch_size=7, order=perm, columns=cols))
        X = np.concatenate([b.X for b in batches])
        frame = batches[0].frame.vstack(batches[1].frame) if len(batches) > 1 else batches[0].frame
        assert np.array_equal(X, decode(encode(values[full["tok_index"].to_numpy()[perm]], "bf16"), "bfloat16"))
        assert frame["tok_index"].to_list() == full["tok_index"].to_numpy()[perm][: len(frame)].tolist()
        assert set(batches[0].frame.columns) == (
            {"row_id", "tok_index"} | set(cols) if cols is not None else set(full.columns)
        )
    rows = list(iter_materialize(st, "SELECT row_id FROM rows ORDER BY row_id", A, columns=["token_pos"]))
    assert sum(len(b.X) for b in rows) == sum(layout.lengths)
    with pytest.raises(ValueError, match=r"columns \['nope'\] are not in the view; it has \[.*'category'"):
        next(iter_materialize(st, view, A, columns=["nope"]))
    with pytest.raises(Exception, match="must return row_id"):
        next(iter_materialize(st, "SELECT tok_index FROM tokens", A, columns=[]))


def test_native_tables_of_a_store_on_object_storage_follow_new_objects():
    """The same on an fsspec store (memory://, as s3:// lists): one listing of the catalog."""
    import uuid

    st = Store(f"memory://native-{uuid.uuid4().hex[:8]}")
    st.write_table("rows", pa.table({"row_id": ["a", "b"], "split": ["eval", "eval"]}))
    commit = pa.table({"array_name": [A], "unit": pa.array([0], pa.int32()), "row_id": ["a"]})
    st.write_table("array_units", commit, part="hidden__layer_0/u000000")
    assert st.query("SELECT row_id FROM array_units").column(0).to_pylist() == ["a"]
    assert {"_native_rows", "_native_array_units"} <= _natives(st)
    st.write_table("array_units", commit.set_column(2, "row_id", pa.array(["b"])), part="hidden__layer_0/u000001")
    assert sorted(st.query("SELECT row_id FROM array_units").column(0).to_pylist()) == ["a", "b"]
    st.write_table("array_units", commit.set_column(2, "row_id", pa.array(["c"])), part="hidden__layer_0/u000000")
    assert sorted(st.query("SELECT row_id FROM array_units").column(0).to_pylist()) == ["b", "c"]
