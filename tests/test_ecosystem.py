"""The store read by other tools, with made-up data: the plain `duckdb` CLI (1.x) on
catalog.duckdb, also after the store folder moves; zarr and xarray on arrays/ as a hierarchy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import zarr

from store.arrays import commit_unit, create_array, encode, write_unit
from store.core import CATALOG_STORAGE_VERSION, Store, StoreError
from store.groups import ensure_groups
from store.materialize import gather
from store.sql import main as sql_main

N_ROWS, ROW_TOKENS, UNIT = 4, 32, 64  # 4 rows of 32 tokens, 2 rows per unit: 2 units
N_SLOTS, WIDTH = N_ROWS * ROW_TOKENS, 8


def made_up_store(root: Path, layers: tuple[int, ...] = (3, 5)) -> tuple[Store, dict[str, np.ndarray]]:
    """`rows`, `row_layout` and `array_units` tables, bf16 `hidden/layer_L` arrays and one 1-D
    fp32 array, every unit written and committed; returns the store and the arrays' values
    as float32 (bf16-rounded)."""
    st = Store(root)
    ids = [f"r{i}" for i in range(N_ROWS)]
    st.write_table(
        "rows",
        pa.table(
            {
                "row_id": ids,
                "split": ["eval", "eval", "train_base", "train_base"],
                "category": ["math", "code", "math", "chat"],
                "difficulty": ["easy", "hard", "easy", "hard"],
                "quality": [1.0, 2.0, 3.0, 4.0],
                "reward_model_score": [0.1, 0.2, 0.3, 0.4],
            }
        ),
    )
    st.write_table(
        "row_layout",
        pa.table(
            {
                "row_id": ids,
                "n_tokens": [ROW_TOKENS] * N_ROWS,
                "n_supervised": [5, 6, 7, 8],
                "unit": [i * ROW_TOKENS // UNIT for i in range(N_ROWS)],
                "tok_start": pa.array([i * ROW_TOKENS for i in range(N_ROWS)], pa.int64()),
            }
        ),
    )
    rng = np.random.default_rng(0)
    values = {}
    specs = [(f"hidden/layer_{L}", WIDTH, "bf16") for L in layers] + [("scores/norm", None, "fp32")]
    for name, width, dtype in specs:
        arr = create_array(st, name, n_slots=N_SLOTS, width=width, chunk_slots=UNIT, dtype=dtype, attrs={})
        x = rng.standard_normal((N_SLOTS,) if width is None else (N_SLOTS, width)).astype(np.float32)
        raw = encode(x, dtype)
        for u in range(N_SLOTS // UNIT):
            write_unit(st, arr, name, u, raw[u * UNIT : (u + 1) * UNIT])
            commit_unit(st, name, u, ids[u * 2 : (u + 1) * 2], "run-1")
        values[name] = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else x
    st.refresh_catalog()
    return st, values


# ---- the duckdb CLI -------------------------------------------------------------------------
def duckdb_cli() -> str:
    """The `duckdb` command of this environment (the duckdb-cli package of the dev extra)."""
    found = shutil.which("duckdb", path=str(Path(sys.executable).parent))
    if found is None and (spec := importlib.util.find_spec("duckdb_cli")) is not None:
        binary = Path(spec.submodule_search_locations[0]) / "duckdb"
        found = str(binary) if binary.is_file() else None
    if found is None:
        pytest.skip("no duckdb CLI in this environment: pip install -e '.[dev]' (it brings duckdb-cli)")
    return found


def cli(db: str | Path, sql: str, cwd: Path, *args: str) -> list[list[str]]:
    """Rows of `sql` as the CLI prints them in CSV (no header), run in `cwd`; HOME is an empty
    folder, away from any ~/.duckdbrc, so the test sees DuckDB's defaults."""
    home = cwd.parent / f".home_{cwd.name}"
    home.mkdir(exist_ok=True)
    out = subprocess.run(
        [duckdb_cli(), str(db), "-csv", "-noheader", *args, "-c", sql],
        cwd=cwd,
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    return [line.split(",") for line in out.stdout.splitlines()]


def test_duckdb_cli_opens_the_catalog_tables_and_sql_views(tmp_path):
    st, _ = made_up_store(tmp_path / "st")
    version = subprocess.run([duckdb_cli(), "--version"], capture_output=True, text=True).stdout
    assert version.startswith("v1."), version  # the 1.x readers the README promises
    assert cli(st.catalog_db, "SELECT split, count(*) FROM rows GROUP BY 1 ORDER BY 1", tmp_path) == [
        ["eval", "2"],
        ["train_base", "2"],
    ]
    summary = cli(st.catalog_db, "SELECT row_id, n_tokens, len(arrays) FROM row_summary ORDER BY 1", tmp_path)
    assert summary == [[f"r{i}", str(ROW_TOKENS), "3"] for i in range(N_ROWS)]
    # an old storage format on purpose (the header's version number, after the checksum and
    # b"DUCK": 64 is v1.0.0; duckdb-cli 1.5 reads 64-68), still read by this duckdb
    head = st.catalog_db.read_bytes()[:20]
    assert head[8:12] == b"DUCK" and int.from_bytes(head[12:20], "little") == 64 and CATALOG_STORAGE_VERSION == "v1.0.0"
    con = duckdb.connect(str(st.catalog_db), read_only=True)
    assert con.sql("SELECT count(*) FROM rows").fetchall() == [(N_ROWS,)]
    con.close()


def test_the_catalog_still_answers_after_the_store_folder_moves(tmp_path):
    st, _ = made_up_store(tmp_path / "st")
    built = st.root
    moved = tmp_path / "elsewhere" / "mounted"
    moved.parent.mkdir()
    shutil.move(built, moved)
    query = "SELECT count(*), sum(n_supervised) FROM row_summary"
    want = [[str(N_ROWS), "26"]]
    # opened directly, the views find the folder the file is in: from any working directory,
    # by absolute or relative path, read-only too; no rebuild needed
    assert cli(moved / "catalog.duckdb", query, tmp_path) == want
    assert cli(Path("elsewhere/mounted/catalog.duckdb"), query, tmp_path) == want
    assert cli("catalog.duckdb", query, moved, "-readonly") == want
    (moved.parent / "work").mkdir()
    assert cli(Path("../mounted/catalog.duckdb"), query, moved.parent / "work") == want
    con = duckdb.connect(str(moved / "catalog.duckdb"), read_only=True)
    assert con.sql("SELECT count(*) FROM rows").fetchall() == [(N_ROWS,)]
    con.close()
    # ATTACHed to another session, they read the folder they were built at (gone): said so,
    # and `python -m store.sql --refresh` rebuilds them for the new place
    con = duckdb.connect()
    con.execute(f"ATTACH '{moved / 'catalog.duckdb'}' AS c (READ_ONLY)")
    with pytest.raises(duckdb.IOException, match=str(built)):
        con.sql("SELECT count(*) FROM c.rows").fetchall()
    con.close()
    assert sql_main(["--refresh", "--store", str(moved)]) == 0
    con = duckdb.connect()
    con.execute(f"ATTACH '{moved / 'catalog.duckdb'}' AS c (READ_ONLY)")
    assert con.sql("SELECT count(*) FROM c.row_summary").fetchall() == [(N_ROWS,)]
    con.close()
    assert cli(moved / "catalog.duckdb", query, tmp_path) == want


# ---- arrays/ as a Zarr hierarchy ----------------------------------------------------------------
def test_arrays_folder_is_a_zarr_hierarchy_readable_with_plain_zarr(tmp_path):
    st, values = made_up_store(tmp_path / "st")
    root = zarr.open_group(str(st.arrays_dir), mode="r")
    assert sorted(root.group_keys()) == ["hidden", "scores"]
    hidden = zarr.open_group(str(st.arrays_dir / "hidden"), mode="r")
    assert sorted(hidden.array_keys()) == ["layer_3", "layer_5"]
    assert root["hidden/layer_3"].shape == (N_SLOTS, WIDTH)
    idx = np.arange(N_SLOTS)
    for name in ("layer_3", "layer_5"):
        a = hidden[name]
        assert a.attrs["dtype"] == "bfloat16" and a.dtype == np.uint16
        assert a.metadata.dimension_names == ("token", "feature")
        decoded = (a[:].astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(decoded, gather(st, f"hidden/{name}", idx))
        assert np.array_equal(decoded, values[f"hidden/{name}"])
    norm = root["scores/norm"]
    assert norm.metadata.dimension_names == ("token",)
    assert np.array_equal(norm[:], gather(st, "scores/norm", idx))


def test_groups_are_written_once_and_never_replaced(tmp_path):
    st, _ = made_up_store(tmp_path / "st")
    g = zarr.open_group(str(st.arrays_dir / "hidden"), mode="r+")
    g.attrs["note"] = "set by a user"
    create_array(st, "hidden/layer_7", n_slots=N_SLOTS, width=WIDTH, chunk_slots=UNIT, dtype="bf16", attrs={})
    hidden = zarr.open_group(str(st.arrays_dir / "hidden"), mode="r")
    assert hidden.attrs["note"] == "set by a user"
    assert sorted(hidden.array_keys()) == ["layer_3", "layer_5", "layer_7"]  # no stale listing
    # ranks racing to create the groups of a new branch: each group is written exactly once
    name = "sae/topk_4608/layer_3"
    made: list = []
    threads = [threading.Thread(target=lambda: made.extend(ensure_groups(st, name))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == [st.arrays_dir / "sae", st.arrays_dir / "sae" / "topk_4608"]
    assert not [p for p in st.arrays_dir.rglob("*.tmp")]
    assert zarr.open_group(str(st.arrays_dir / "sae/topk_4608"), mode="r").attrs.asdict() == {}
    with pytest.raises(StoreError, match="inside the array 'hidden/layer_3'"):
        create_array(st, "hidden/layer_3/x", n_slots=N_SLOTS, width=None, chunk_slots=UNIT, dtype="fp32", attrs={})
    with pytest.raises(StoreError, match="group of arrays"):
        create_array(st, "hidden", n_slots=N_SLOTS, width=None, chunk_slots=UNIT, dtype="fp32", attrs={})


def test_refresh_upgrades_a_store_made_before_groups(tmp_path, capsys):
    st, _ = made_up_store(tmp_path / "st")
    groups = [st.arrays_dir, st.arrays_dir / "hidden", st.arrays_dir / "scores"]
    assert (
        sorted(p.parent for p in st.arrays_dir.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "group")
        == groups
    )
    for d in groups:
        (d / "zarr.json").unlink()  # what older versions left
    with pytest.raises(FileNotFoundError, match="No group found"):  # zarr's GroupNotFoundError
        zarr.open_group(str(st.arrays_dir), mode="r")
    assert sql_main(["--refresh", "--store", str(st.root)]) == 0
    assert "Zarr group metadata for 3 folders" in capsys.readouterr().out
    assert sorted(zarr.open_group(str(st.arrays_dir), mode="r").group_keys()) == ["hidden", "scores"]
    assert sql_main(["--refresh", "--store", str(st.root)]) == 0  # idempotent
    assert "Zarr group" not in capsys.readouterr().out


def test_xarray_sees_the_hidden_layers_as_one_dataset_over_token(tmp_path):
    xr = pytest.importorskip("xarray")
    st, values = made_up_store(tmp_path / "st")
    # chunks=None: loads without dask (the `xarray` extra adds dask for lazy, chunked reads)
    ds = xr.open_zarr(str(st.arrays_dir / "hidden"), consolidated=False, chunks=None)
    assert sorted(ds.data_vars) == ["layer_3", "layer_5"]
    assert dict(ds.sizes) == {"token": N_SLOTS, "feature": WIDTH}
    for name in ("layer_3", "layer_5"):
        v = ds[name]
        assert v.dims == ("token", "feature") and v.attrs["dtype"] == "bfloat16"
        assert np.array_equal((v.values.astype(np.uint32) << 16).view(np.float32), values[f"hidden/{name}"])
    # a layer added later is seen on the next open (no consolidated metadata to go stale)
    create_array(st, "hidden/layer_9", n_slots=N_SLOTS, width=WIDTH, chunk_slots=UNIT, dtype="bf16", attrs={})
    ds = xr.open_zarr(str(st.arrays_dir / "hidden"), consolidated=False, chunks=None)
    assert sorted(ds.data_vars) == ["layer_3", "layer_5", "layer_9"]
