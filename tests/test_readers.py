"""The store read at scale without this package, on a real extracted store (tiny random model,
two layers, 512-slot units): the arrays lazily with dask (`dask.array.from_zarr`, one dask
chunk per Zarr chunk = per unit) and xarray (with dask chunks, over arrays/hidden's group
metadata), equal to `materialize`/`gather`; the catalog with polars `scan_parquet` and with
plain DuckDB over `read_parquet` globs, equal to `Store.query`. (tests/test_ecosystem.py
covers the duckdb CLI, plain zarr and eager xarray on made-up arrays.) The snippet these
tests follow is in docs/scale.md, "Reading at scale without this package"."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from store.core import Store
from store.materialize import gather, materialize

da = pytest.importorskip("dask.array")
xr = pytest.importorskip("xarray")

UNIT = 512
LAYERS = (1, 3)
# materialize refuses uncommitted rows; readers without the package filter on array_units
COMMITTED = (
    "SELECT * FROM assistant_tokens WHERE row_id IN "
    "(SELECT row_id FROM array_units WHERE array_name = 'hidden/layer_1')"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, model_cache) -> Path:
    from extractors.dataset import main as ingest
    from extractors.run import main as extract

    root = tmp_path_factory.mktemp("readers") / "store"
    assert (
        ingest(
            [
                "--store",
                str(root),
                "--model",
                tiny_model,
                "--train-base",
                "24",
                "--attr-query",
                "4",
                "--eval",
                "4",
                "--sample-train",
                "40",
                "--sample-test",
                "12",
            ]
        )
        == 0
    )
    # every row but a few: the tail unit's slots stay 0 and uncommitted rows must be filtered by readers
    assert (
        extract(
            [
                "--store",
                str(root),
                "--model",
                tiny_model,
                "--model-cache",
                str(model_cache),
                "--layers",
                *map(str, LAYERS),
                "--unit-tokens",
                str(UNIT),
                "--max-rows",
                "28",
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def bf16(x):
    """Exact bf16 (stored as its uint16 bit pattern) -> float32; numpy or dask alike."""
    return (x.astype(np.uint32) << 16).view(np.float32)


def test_dask_reads_each_unit_as_one_chunk_and_equals_materialize(store):
    st = Store(store)
    arr = da.from_zarr(str(store / "arrays" / "hidden" / "layer_1"))
    n_slots, width = arr.shape
    assert arr.chunks == ((UNIT,) * (n_slots // UNIT), (width,)) and n_slots % UNIT == 0  # a chunk is a unit
    x = bf16(arr)  # still lazy
    assert isinstance(x, da.Array) and x.dtype == np.float32
    m = materialize(st, COMMITTED, array="hidden/layer_1")
    idx = m.frame["tok_index"].to_numpy()
    assert len(idx) > 100
    assert np.array_equal(x[np.sort(idx)].compute(), gather(st, "hidden/layer_1", np.sort(idx)))
    order = np.argsort(idx, kind="stable")
    got = np.empty_like(m.X)
    got[order] = x[idx[order]].compute()  # sorted gather, then the view's order
    assert np.array_equal(got, m.X)
    # whole-array reductions run chunk by chunk (one task per unit) and match numpy's
    assert len(x.sum(axis=0).__dask_graph__()) > n_slots // UNIT
    full = gather(st, "hidden/layer_1", np.arange(n_slots))
    assert np.allclose(x.sum(axis=0).compute(), full.sum(axis=0), rtol=1e-5, atol=1e-4)


def test_xarray_with_dask_chunks_over_the_group_equals_gather(store):
    st = Store(store)
    ds = xr.open_zarr(str(store / "arrays" / "hidden"), consolidated=False)  # dask-backed by default
    assert sorted(ds.data_vars) == [f"layer_{L}" for L in LAYERS]
    for L in LAYERS:
        v = ds[f"layer_{L}"]
        assert v.dims == ("token", "feature") and v.attrs["dtype"] == "bfloat16" and v.attrs["layer"] == L
        assert v.chunks[0] == (UNIT,) * (v.sizes["token"] // UNIT)  # one chunk per unit
        idx = st.query("SELECT tok_index FROM content_tokens ORDER BY tok_index").column(0).to_numpy()
        sel = bf16(v.isel(token=idx).data)  # lazy until .compute()
        assert np.array_equal(sel.compute(), gather(st, f"hidden/layer_{L}", idx))


SQL = """SELECT r.category, r.split, count(*) AS n, sum(CASE WHEN t.is_supervised THEN 1 ELSE 0 END) AS sup
         FROM tokens t JOIN rows r USING (row_id) GROUP BY 1, 2 ORDER BY 1, 2"""


def test_polars_scan_parquet_equals_store_query(store):
    st = Store(store)
    cat = store / "catalog"
    tokens = pl.scan_parquet(cat / "tokens" / "**" / "*.parquet")
    rows = pl.scan_parquet(cat / "rows" / "**" / "*.parquet")
    got = (
        tokens.join(rows, on="row_id")
        .group_by("category", "split")
        .agg(pl.len().alias("n"), pl.col("is_supervised").sum().alias("sup"))
        .sort("category", "split")
        .collect()
    )
    want = pl.from_arrow(st.query(SQL))
    assert got["n"].sum() > 0
    assert got.select("category", "split", "n", "sup").rows() == want.rows()
    # committed rows of an array, as readers must take them: array_units
    units = pl.scan_parquet(cat / "array_units" / "**" / "*.parquet").filter(pl.col("array_name") == "hidden/layer_3")
    committed = set(units.select("row_id").collect()["row_id"])
    assert committed == set(
        st.query("SELECT row_id FROM array_units WHERE array_name = 'hidden/layer_3'").column(0).to_pylist()
    )
    assert 0 < len(committed) < len(set(rows.select("row_id").collect()["row_id"]))  # --max-rows left some out


def test_plain_duckdb_over_parquet_globs_equals_store_query(store):
    st = Store(store)
    cat = store / "catalog"
    con = duckdb.connect()  # no catalog.duckdb, no views, no package
    for t in ("tokens", "rows", "array_units"):
        con.sql(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{cat / t}/**/*.parquet', union_by_name = true)")
    assert con.sql(SQL).fetchall() == [tuple(r.values()) for r in st.query(SQL).to_pylist()]
    # the view a probe trains on, restricted to committed rows, straight from the files
    view = (Path(__file__).resolve().parent.parent / "sql" / "views" / "assistant_tokens.sql").read_text()
    q = (
        f"SELECT v.tok_index FROM ({view}) v WHERE v.row_id IN "
        f"(SELECT row_id FROM array_units WHERE array_name = 'hidden/layer_1') ORDER BY v.tok_index"
    )
    idx = con.sql(q).fetchnumpy()["tok_index"]
    m = materialize(st, COMMITTED, array="hidden/layer_1")
    assert len(idx) > 100 and np.array_equal(idx, np.sort(m.frame["tok_index"].to_numpy()))
