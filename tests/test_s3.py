"""A store on object storage: the same pipeline against a local S3-compatible server.

moto's server mode runs on 127.0.0.1 (a free port) for this module, with credentials and
the endpoint in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)
as a user would set them. The tiny random model is ingested and extracted (layers 1 and 3)
into `s3://bucket/store` and into a local folder; then: the chunk objects are byte-identical
to the local chunk files and the catalog tables equal; SQL runs through DuckDB with the
fsspec filesystem registered (no httpfs); materialize (tokens, whole rows, streaming, a random
gather) equals the local store's; a probe trains from the S3 store with the local run's
metrics and uploads its run folder; an extraction SIGKILLed after its first unit commit and
rerun ends identical to an uninterrupted run; dask, polars and DuckDB read the store without
this package. The store.fs layer itself (paths, exclusive create, byte-range gathers against a
plain reference) is checked on `memory://`, which needs no server.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from store.core import Store, StoreError  # noqa: E402
from store.materialize import gather, iter_materialize, materialize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUCKET = "acts"
INGEST = ["--train-base", "32", "--attr-query", "4", "--eval", "8", "--sample-train", "60", "--sample-test", "20"]
VOLATILE = {
    "run_id",
    "created_by_run",
    "last_run",
    "committed_at",
    "created_at",
    "updated_at",
    "quarantined_at",
    "manifest",
    "path",
    "sae_path",
    "source",
}
DRIVER = (
    "import sys\n"
    "from pathlib import Path\n"
    "import store.fs\n"
    "a = sys.argv[1:]; staging = Path(a.pop(0))\n"
    "store.fs.default_staging_dir = lambda: staging\n"
    "from extractors.dataset import main as ingest\n"
    "from extractors.run import main as extract\n"
    "i = a.index('--')\n"
    "rc = ingest(a[:i])\n"
    "sys.exit(rc or extract(a[i + 1:]))\n"
)
FAST_PROBE = ["--layers", "3", "--train-seeds", "0", "--l2-grid", "0.01", "--num-epochs", "20", "--no-progress"]


def _extract_args(root: str, model: str, cache: Path) -> tuple[list[str], list[str]]:
    return (
        ["--store", root, "--model", model, *INGEST],
        [
            "--store",
            root,
            "--model",
            model,
            "--unit-tokens",
            "512",
            "--batch-tokens",
            "512",
            "--no-progress",
            "--model-cache",
            str(cache),
            "--layers",
            "1",
            "3",
        ],
    )


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the AWS_* environment pointing at it, and a bucket;
    yields (endpoint URL, the staging folder of remote run folders)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in-process, shared by every server of this pytest process: start
    # each module (tests/test_verify_s3.py reuses this fixture) from an empty S3.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    mp = pytest.MonkeyPatch()
    import store.fs

    staging = tmp_path_factory.mktemp("s3_staging")  # run folders are staged here, never in $HOME
    mp.setattr(store.fs, "default_staging_dir", lambda: staging)
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        mp.delenv(k, raising=False)
    import s3fs

    s3fs.S3FileSystem(**store.fs.storage_options("s3")).mkdir(BUCKET)
    yield endpoint, staging
    mp.undo()
    srv.stop()


@pytest.fixture(scope="module")
def pair(s3, tiny_model, model_cache, tmp_path_factory):
    """(local Store, S3 Store, the local catalog's tables right after) after the same ingest +
    extraction of the tiny model."""
    from extractors.dataset import main as ingest
    from extractors.run import main as extract

    local = str(tmp_path_factory.mktemp("s3_local") / "store")
    for root in (local, f"s3://{BUCKET}/store"):
        ing, ext = _extract_args(root, tiny_model, model_cache)
        assert ingest(ing) == 0 and extract(ext) == 0
    return Store(local), Store(f"s3://{BUCKET}/store"), _tables(Store(local))


def _tables(st: Store) -> dict[str, list[tuple]]:
    """Every catalog table but runs, as sorted rows without volatile columns."""
    out = {}
    for t in st.tables():
        if t == "runs":
            continue
        tbl = st.query(f'SELECT * FROM "{t}"')
        cols = sorted(c for c in tbl.column_names if c not in VOLATILE)
        out[t] = sorted(map(tuple, zip(*[[repr(v) for v in tbl.column(c).to_pylist()] for c in cols], strict=False)))
    return out


def _chunks(st: Store, name: str) -> dict[str, bytes]:
    base = st.array_path(name) / "c"
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in base.rglob("*")
        if not p.name.endswith(".partial") and p.is_file()
    }


# ---- the fs layer on memory:// (no server) ---------------------------------------------
def test_memory_store_tables_paths_and_exclusive_create():
    from store.fs import RemotePath, create_exclusive, scan

    st = Store("memory://fs-layer-test")
    assert st.remote and isinstance(st.root, RemotePath) and str(st.root).startswith("memory://")
    st.write_table("things", pa.table({"x": [1, 2, 3]}))
    st.write_table("things", pa.table({"x": [4]}), part="sub/part-1")
    st.write_table("other", pa.table({"y": ["a"]}))
    assert st.tables() == ["other", "things"]
    assert [f.name for f in st.table_files("things")] == ["part-0.parquet", "part-1.parquet"]
    assert st.query("SELECT sum(x) AS s FROM things").to_pylist() == [{"s": 10}]
    assert [n for n, _ in scan(st.table_dir("things"), ".parquet")] == ["part-0.parquet"]
    st.drop_table("other")
    assert st.tables() == ["things"]
    p = st.root / "claims" / "x.json"
    assert create_exclusive(p, b"1") and not create_exclusive(p, b"2") and p.read_bytes() == b"1"
    assert st.refresh_catalog() is None and "store.sql --store memory://" in st.sql_command


def test_range_reader_equals_a_plain_reference():
    """Byte-range gathers (merged runs, gaps, duplicates, unwritten chunks, 1-D and 2-D) equal
    indexing the whole array in memory."""
    import zarr

    from store.fs import zarr_store
    from store.reads.ranges import range_reader

    st = Store("memory://ranges-test")
    rng = np.random.default_rng(0)
    for shape, chunks in [((1000, 7), (128, 7)), ((1000,), (128,))]:
        path = st.root / "arrays" / f"a{len(shape)}"
        z = zarr.create_array(
            store=zarr_store(path, read_only=False),
            shape=shape,
            chunks=chunks,
            dtype="uint16",
            compressors=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        ref = rng.integers(0, 60000, size=shape, dtype=np.uint16)
        ref[768:896] = 0  # chunk 6 is never written: reads as the fill value
        z[:768] = ref[:768]
        z[896:] = ref[896:]
        reader = range_reader(zarr.open_array(zarr_store(path, read_only=True), mode="r"))
        assert reader is not None
        for max_gap in (0, 64, 1 << 20):
            reader.max_gap = max_gap
            for idx in [
                np.sort(rng.choice(1000, 300)),
                np.arange(100, 400),
                np.array([5, 5, 5, 999]),
                np.array([], dtype=np.int64),
                np.sort(rng.choice(np.arange(760, 900), 40)),
            ]:
                assert np.array_equal(reader.read_sorted(idx), ref[idx])


def test_bad_urls_get_clear_errors(s3):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/x")
    with pytest.raises(ImportError, match="no fsspec filesystem"):
        Store("nosuchproto://x/y")


# ---- the pipeline on the S3 server ---------------------------------------------------------
def test_extraction_on_s3_equals_the_local_store(pair):
    local, remote, _ = pair
    for name in ("hidden/layer_1", "hidden/layer_3"):
        a, b = _chunks(local, name), _chunks(remote, name)
        assert a.keys() == b.keys() and len(a) >= 4
        assert all(a[k] == b[k] for k in a), f"{name}: chunk bytes differ"
    assert pair[2] == _tables(remote)
    runs = remote.query("SELECT status, kind FROM runs WHERE kind = 'extract_hidden'").to_pylist()
    assert runs == [{"status": "finished", "kind": "extract_hidden"}]
    # run folders are uploaded; nothing temporary is left on the bucket; no catalog.duckdb
    rid = remote.query("SELECT run_id FROM runs WHERE kind = 'extract_hidden'").column(0)[0].as_py()
    assert (remote.root / "runs" / rid / "config.json").exists()
    names = [p.name for p in remote.root.rglob("*")]
    assert not [n for n in names if n.endswith((".tmp", ".partial"))] and "catalog.duckdb" not in names
    assert not list((remote.root / "claims").rglob("*.json"))


def test_rerun_on_s3_is_a_noop(pair, tiny_model, model_cache, capsys):
    from extractors.run import main as extract

    _, remote, _ = pair
    assert extract(_extract_args(str(remote.root), tiny_model, model_cache)[1]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_sql_on_s3(pair, capsys):
    from store.sql import main as sql

    local, remote, _ = pair
    q = "SELECT r.split, count(*) AS n FROM tokens t JOIN rows r USING (row_id) GROUP BY 1 ORDER BY 1"
    assert remote.query(q).to_pylist() == local.query(q).to_pylist()
    assert sql(["--store", str(remote.root), "--format", "csv", q]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("attr_query,")
    assert sql(["--store", str(remote.root), "--views"]) == 0
    assert "needle_tokens" in capsys.readouterr().out


def test_materialize_on_s3_equals_local(pair):
    local, remote, _ = pair
    for view in ("assistant_tokens", "SELECT row_id, category FROM rows ORDER BY row_id"):
        a, b = materialize(local, view, "hidden/layer_3"), materialize(remote, view, "hidden/layer_3")
        assert len(a.frame) > 0 and a.frame.equals(b.frame) and np.array_equal(a.X, b.X)
    a = materialize(local, "content_tokens", "hidden/layer_1", pool="mean")
    b = materialize(remote, "content_tokens", "hidden/layer_1", pool="mean")
    assert np.array_equal(a.X, b.X)
    tok = local.query("SELECT tok_index FROM tokens").column(0).to_numpy()
    idx = np.random.default_rng(1).choice(tok, 2000)  # random, unsorted, repeats
    assert np.array_equal(gather(local, "hidden/layer_1", idx), gather(remote, "hidden/layer_1", idx))
    perm = np.random.default_rng(2).permutation(len(materialize(local, "assistant_tokens", "hidden/layer_3").frame))
    xa = np.concatenate(
        [m.X for m in iter_materialize(local, "assistant_tokens", "hidden/layer_3", batch_size=700, order=perm)]
    )
    xb = np.concatenate(
        [m.X for m in iter_materialize(remote, "assistant_tokens", "hidden/layer_3", batch_size=700, order=perm)]
    )
    assert np.array_equal(xa, xb)


def test_probe_trains_from_s3_like_from_local(pair, tmp_path):
    from trainers.probes.config import load_config
    from trainers.probes.probe import run_probe

    local, remote, _ = pair
    a = run_probe(load_config(["--store", str(local.root), *FAST_PROBE, "--output-dir", str(tmp_path / "a")]))
    b = run_probe(load_config(["--store", str(remote.root), *FAST_PROBE]))
    ka = {k: v for k, v in a.metrics["by_layer"]["3"].items() if "second" not in k}
    kb = {k: v for k, v in b.metrics["by_layer"]["3"].items() if "second" not in k}
    assert ka == kb and np.isfinite(kb["val_auroc_mean"])
    # the run folder was staged locally and uploaded when the run finished
    up = remote.root / "runs" / b.run_id
    assert (up / "probe_metrics.csv").read_bytes() == (b.out_dir / "probe_metrics.csv").read_bytes()
    assert (up / "probe_layer_3_seed_0.safetensors").exists()
    # the probe's scores came back into the S3 store like into the local one
    q = "SELECT count(*) AS n FROM probe_token_scores"
    assert remote.query(q).to_pylist() == local.query(q).to_pylist() != [{"n": 0}]


def _units_committed(st: Store) -> int:
    return sum(1 for _ in (st.root / "catalog" / "array_units").rglob("u*.parquet"))


def test_sigkill_after_first_commit_then_rerun_equals_uninterrupted(s3, pair, tiny_model, model_cache):
    """The extraction runs in a subprocess on a fresh prefix, is SIGKILLed once its first
    unit commit appears on the bucket, and the same command rerun finishes the rest."""
    local, _, tables = pair
    root = f"s3://{BUCKET}/killed"
    ing, ext = _extract_args(root, tiny_model, model_cache)
    cmd = [sys.executable, "-c", DRIVER, str(s3[1]), *ing, "--", *ext]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=os.environ.copy()
    )
    t0, killed = time.monotonic(), False
    st = None
    while proc.poll() is None:
        assert time.monotonic() - t0 < 240, "the extraction hangs"
        try:
            st = st or Store(root)
            if _units_committed(st) >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
        except StoreError:
            pass
        time.sleep(0.05)
    proc.wait()
    assert killed, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    st = Store(root)
    n_layout_units = st.query("SELECT max(unit) + 1 AS n FROM row_layout").to_pylist()[0]["n"]
    assert 1 <= _units_committed(st) < 2 * n_layout_units  # killed mid-way
    assert st.query("SELECT status FROM runs").column(0).to_pylist() == ["running"]
    from extractors.run import main as extract  # the same command again (in this process: no startup)

    assert extract(ext) == 0
    for name in ("hidden/layer_1", "hidden/layer_3"):
        a, b = _chunks(local, name), _chunks(st, name)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert _tables(st) == tables
    assert not list((st.root / "claims").rglob("*.json"))


# ---- reading the S3 store without this package ---------------------------------------------
def test_dask_polars_duckdb_read_the_s3_store(pair, s3):
    da = pytest.importorskip("dask.array")
    import duckdb
    import polars as pl
    import s3fs
    import zarr

    local, _, _ = pair
    endpoint = s3[0]
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    url = f"s3://{BUCKET}/store/arrays/hidden/layer_3"
    z = zarr.open_array(url, mode="r", storage_options=opts)
    x = da.from_zarr(z, chunks=z.chunks)  # lazy, one dask chunk per unit
    assert x.chunks[0][0] == z.chunks[0] and x.npartitions == z.nchunks
    ref = zarr.open_array(str(local.array_path("hidden/layer_3")), mode="r")[:]
    assert np.array_equal(x[100:900].compute(), ref[100:900])
    bf = (x.astype("uint32") << 16).view("float32")  # exact bf16 -> float32, still lazy
    assert np.array_equal(bf[:512].compute(), (ref[:512].astype(np.uint32) << 16).view(np.float32))

    pl_opts = {
        "aws_endpoint_url": endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
    }
    rows = pl.scan_parquet(f"s3://{BUCKET}/store/catalog/rows/**/*.parquet", storage_options=pl_opts)
    n = rows.group_by("split").len().sort("split").collect()
    want = local.query("SELECT split, count(*) AS n FROM rows GROUP BY 1").to_pylist()
    assert dict(n.rows()) == {r["split"]: r["n"] for r in want}

    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing"))
    got = con.sql(f"SELECT count(*) FROM read_parquet('s3://{BUCKET}/store/catalog/array_units/**/*.parquet')")
    assert got.fetchall()[0][0] == local.query("SELECT count(*) AS n FROM array_units").to_pylist()[0]["n"]
