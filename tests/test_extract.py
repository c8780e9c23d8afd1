"""Extraction: fills the store, resumes exactly after SIGKILL, multi-layer = separate runs,
ranks split the work, matches the model's own hidden states, and refuses bad arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run
from extractors.run import main
from store.arrays import committed_rows
from store.core import Store, StoreError
from store.materialize import gather, materialize
from tests.conftest import ingest_small

SMALL = {"train_base": 24, "attr_query": 4, "eval": 4}
REPO = Path(__file__).resolve().parent.parent


def _extract(store, model, layers, **kw):
    return run(ExtractConfig(layers=layers, store=str(store), model=model, progress=False, **kw))


def _raw(store, name):
    return zarr.open_array(str(Store(store).array_path(name)), mode="r")[:]


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
    """An ingested (not yet extracted) store of 32 rows, copied by each test."""
    path = tmp_path_factory.mktemp("small") / "store"
    ingest_small(path, SMALL)
    return path


@pytest.fixture
def fresh(small_rows, copy_store):
    return copy_store(small_rows)


def test_extract_fills_every_token_and_records_the_run(fresh, tiny_model):
    res = _extract(fresh, tiny_model, [2], unit_tokens=2048)
    st = Store(fresh)
    n_tokens = st.query("SELECT count(*) FROM tokens").column(0)[0].as_py()
    assert res.tokens == n_tokens and res.rows == 32
    committed = st.query("SELECT count(DISTINCT row_id) FROM array_units WHERE array_name = 'hidden/layer_2'")
    assert committed.column(0)[0].as_py() == 32
    run_rec = st.query("SELECT * FROM runs WHERE kind = 'extract_hidden'").to_pylist()[0]
    assert run_rec["status"] == "finished" and run_rec["layers"] == [2] and run_rec["model_hash"].startswith("sha256:")
    assert '"layers": [2]' in run_rec["config"] and run_rec["code_version"]
    arr = zarr.open_array(str(st.array_path("hidden/layer_2")), mode="r")
    assert arr.attrs["dtype"] == "bfloat16" and arr.attrs["layer"] == 2 and arr.attrs["run_id"] == run_rec["run_id"]
    assert arr.attrs["tokenization"] and arr.attrs["model"]
    # every used slot holds a real vector, every unused slot is zero
    X = gather(st, "hidden/layer_2", st.query("SELECT tok_index FROM tokens").column(0).to_numpy())
    assert np.isfinite(X).all() and (np.abs(X).sum(axis=1) > 0).all()
    # the done-criterion query, in plain DuckDB on the catalog file
    import duckdb

    con = duckdb.connect(str(st.catalog_db), read_only=True)
    per_cat = con.sql(
        "SELECT r.category, count(*) FROM tokens t JOIN rows r USING (row_id) WHERE t.is_supervised GROUP BY 1"
    ).fetchall()
    assert (
        sum(n for _, n in per_cat) == st.query("SELECT count(*) FROM tokens WHERE is_supervised").column(0)[0].as_py()
    )
    assert con.sql("SELECT count(*) FROM needle_tokens").fetchall()[0][0] > 0


def test_rerun_of_finished_job_is_a_noop(fresh, tiny_model, capsys):
    _extract(fresh, tiny_model, [1], unit_tokens=2048)
    before = sorted(p.stat().st_mtime_ns for p in Store(fresh).array_path("hidden/layer_1").rglob("*") if p.is_file())
    n_runs = Store(fresh).query("SELECT count(*) FROM runs").column(0)[0].as_py()
    res = _extract(fresh, tiny_model, [1], unit_tokens=2048)
    assert res.skipped and "nothing to do" in capsys.readouterr().out
    after = sorted(p.stat().st_mtime_ns for p in Store(fresh).array_path("hidden/layer_1").rglob("*") if p.is_file())
    assert before == after
    assert Store(fresh).query("SELECT count(*) FROM runs").column(0)[0].as_py() == n_runs


def test_multi_layer_single_pass_equals_separate_runs(small_rows, copy_store, tiny_model, tmp_path):
    a = copy_store(small_rows)
    b = tmp_path / "b"
    import shutil

    shutil.copytree(small_rows, b)
    _extract(a, tiny_model, [0, 2], unit_tokens=2048)
    _extract(b, tiny_model, [0], unit_tokens=2048)
    _extract(b, tiny_model, [2], unit_tokens=2048)
    for L in (0, 2):
        assert np.array_equal(_raw(a, f"hidden/layer_{L}"), _raw(b, f"hidden/layer_{L}"))


def test_two_ranks_write_disjoint_units_equal_to_one(small_rows, copy_store, tiny_model, tmp_path):
    one = copy_store(small_rows)
    import shutil

    two = tmp_path / "two"
    shutil.copytree(small_rows, two)
    _extract(one, tiny_model, [3], unit_tokens=1024)
    _extract(two, tiny_model, [3], unit_tokens=1024, rank=0, world_size=2)
    units0 = set(committed_rows(Store(two), "hidden/layer_3"))
    assert units0 and all(u % 2 == 0 for u in units0)
    _extract(two, tiny_model, [3], unit_tokens=1024, rank=1, world_size=2)
    assert set(committed_rows(Store(two), "hidden/layer_3")) == set(committed_rows(Store(one), "hidden/layer_3"))
    assert np.array_equal(_raw(one, "hidden/layer_3"), _raw(two, "hidden/layer_3"))


def test_split_and_max_rows_select_rows(fresh, tiny_model):
    res = _extract(fresh, tiny_model, [1], split="eval", max_rows=3, unit_tokens=2048)
    assert res.rows == 3
    got = (
        Store(fresh)
        .query("SELECT DISTINCT r.split FROM array_units u JOIN rows r USING (row_id)")
        .column(0)
        .to_pylist()
    )
    assert got == ["eval"]


def test_materialize_equals_naive_per_row_reads(fresh, tiny_model):
    _extract(fresh, tiny_model, [2], unit_tokens=2048)
    st = Store(fresh)
    m = materialize(st, "assistant_tokens", "hidden/layer_2")
    arr = zarr.open_array(str(st.array_path("hidden/layer_2")), mode="r")
    naive = []
    for row_id, pos in zip(m.frame["row_id"], m.frame["token_pos"], strict=False):
        start = st.query("SELECT tok_start FROM row_layout WHERE row_id = ?", [row_id]).column(0)[0].as_py()
        naive.append(arr[start + pos])
    naive = (np.stack(naive).astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(m.X, naive)
    pooled = materialize(st, "assistant_tokens", "hidden/layer_2", pool="mean")
    first = pooled.frame["row_id"][0]
    assert np.allclose(pooled.X[0], m.X[(m.frame["row_id"] == first).to_numpy()].mean(axis=0), atol=1e-5)
    # A row-level view selects whole rows through row_layout; same as asking the tokens table.
    whole = materialize(st, "SELECT row_id, category FROM rows ORDER BY row_id DESC LIMIT 3", "hidden/layer_2")
    ids = whole.frame["row_id"].unique(maintain_order=True).to_list()
    assert len(ids) == 3 and ids == sorted(ids, reverse=True) and "category" in whole.frame.columns
    ref = materialize(
        st,
        f"SELECT row_id, token_pos, tok_index FROM tokens WHERE row_id IN {tuple(ids)} ORDER BY row_id DESC, token_pos",
        "hidden/layer_2",
    )
    assert whole.frame.select("row_id", "token_pos", "tok_index").equals(ref.frame)
    assert np.array_equal(whole.X, ref.X)
    with pytest.raises(StoreError, match="must return tok_index"):
        materialize(st, "SELECT row_id, token_pos FROM tokens LIMIT 3", "hidden/layer_2")
    with pytest.raises(StoreError, match="each row_id once"):  # a token view that forgot tok_index
        materialize(st, "SELECT row_id, token_text FROM tokens WHERE token_pos < 2", "hidden/layer_2")


def test_materialize_refuses_rows_not_extracted(fresh, tiny_model):
    _extract(fresh, tiny_model, [1], split="eval", unit_tokens=2048)
    with pytest.raises(StoreError, match=r"not in hidden/layer_1.*python -m extractors.run --layer 1"):
        materialize(Store(fresh), "assistant_tokens", "hidden/layer_1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer", "4"], "--layer 4 is out of range"),
        (["--layer", "1", "--split", "nope"], "--split 'nope' has no rows"),
    ],
)
def test_bad_arguments_give_clear_errors(fresh, tiny_model, argv, message, capsys):
    assert main([*argv, "--store", str(fresh), "--model", tiny_model, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "out of range" in message:
        assert "valid layers are 0..3" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--store", "x"], "pass --layer"),
        (["--layer", "1", "--max-rows", "0"], "--max-rows must be positive"),
        (["--layer", "1", "--kinds", "grads"], "--kinds 'grads'"),
        (["--layer", "1", "--dtype", "int8"], "invalid choice"),
        (["--layer", "1", "--unit-tokens", "-5"], "--unit-tokens must be positive, got -5"),
        (["--layer", "1", "--writers", "0"], "--writers must be positive"),
    ],
)
def test_bad_flags_exit_with_usage(argv, message, capsys, monkeypatch):
    import extractors.model as model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(model, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("module", ["extractors.run", "extractors.dataset"])
def test_help_shows_each_default_once(module, capsys):
    import importlib
    import re

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = capsys.readouterr().out
    options = [" ".join(o.split()) for o in re.split(r"\n {2}(?=-)", text)]
    assert len(options) > 5 and any("(default: ./store_data)" in o for o in options)
    assert not [o for o in options if o.lower().count("default") > 1]


def test_run_writes_its_config_beside_the_record(fresh, tiny_model):
    import json

    res = _extract(fresh, tiny_model, [1])
    cfg = json.loads((Path(fresh) / "runs" / res.run_id / "config.json").read_text())
    assert cfg["run_id"] == res.run_id and cfg["kind"] == "extract_hidden" and cfg["config"]["layers"] == [1]


def test_a_failing_run_is_recorded_failed_with_its_error(fresh, tiny_model, monkeypatch):
    import extractors.hidden as hidden

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(hidden.HiddenStates, "fill", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _extract(fresh, tiny_model, [1])
    rec = Store(fresh).query("SELECT status, note FROM runs WHERE kind = 'extract_hidden'").to_pylist()
    assert rec == [{"status": "failed", "note": "RuntimeError: disk on fire"}]


@pytest.mark.slow
def test_stored_vectors_equal_the_models_hidden_states(real_store):
    """Layer L in the store == transformers' output_hidden_states[L+1], within bf16 rounding."""
    import torch

    from extractors.model import load_model

    st = Store(real_store)
    lm = load_model("embedded")
    rows = st.query("SELECT row_id FROM rows ORDER BY row_id LIMIT 3").column(0).to_pylist()
    for row_id in rows:
        toks = st.query("SELECT token_id, tok_index FROM tokens WHERE row_id = ? ORDER BY token_pos", [row_id])
        ids = torch.tensor([toks.column("token_id").to_pylist()])
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        for L in (6, 17):
            stored = gather(st, f"hidden/layer_{L}", toks.column("tok_index").to_numpy())
            ref = hs[L + 1][0].float().numpy()
            # bf16 keeps 8 bits of mantissa: relative error <= 2^-8 per element
            assert np.allclose(stored, ref, rtol=2**-8, atol=1e-3), (row_id, L)
            assert np.abs(stored - ref).max() / np.abs(ref).max() < 0.01


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(small_rows, copy_store, tmp_path, model_cache):
    """Kill a real extraction mid-run, rerun the same command, compare with an uninterrupted run."""
    killed = copy_store(small_rows)
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(small_rows, clean)
    cmd = [
        sys.executable,
        "-m",
        "extractors.run",
        "--layers",
        "3",
        "9",
        "--unit-tokens",
        "512",
        "--batch-tokens",
        "512",
        "--no-progress",
        "--model-cache",
        str(model_cache),
    ]
    proc = subprocess.Popen(
        [*cmd, "--store", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    units_dir = killed / "catalog" / "array_units" / "hidden__layer_9"
    t0 = time.monotonic()
    while not (units_dir.is_dir() and len(list(units_dir.glob("*.parquet"))) >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() - t0 < 300, "no unit committed within 5 minutes: the extraction hangs"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    st = Store(killed)
    n_units = st.query("SELECT max(n_units) FROM tokenizations").column(0)[0].as_py()
    done_at_kill = len(committed_rows(st, "hidden/layer_9"))
    assert 2 <= done_at_kill < n_units, "the kill must land mid-extraction"
    run_status = st.query("SELECT status FROM runs").column(0).to_pylist()
    assert run_status == ["running"]
    subprocess.run([*cmd, "--store", str(killed)], cwd=REPO, check=True, capture_output=True)
    subprocess.run([*cmd, "--store", str(clean)], cwd=REPO, check=True, capture_output=True)
    for L in (3, 9):
        assert np.array_equal(_raw(killed, f"hidden/layer_{L}"), _raw(clean, f"hidden/layer_{L}"))
    assert len(committed_rows(Store(killed), "hidden/layer_9")) == n_units
    again = subprocess.run([*cmd, "--store", str(killed)], cwd=REPO, check=True, capture_output=True, text=True)
    assert "nothing to do" in again.stdout
