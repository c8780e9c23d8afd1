"""Cooperating writers: claims are exclusive, stale ones are taken over, and two extractors
started together on one store split the units (each computed once) and the tokenization
(done once), with the result of a single run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from store import claims
from store.core import Store
from tests.conftest import ingest_small

REPO = Path(__file__).resolve().parent.parent
DEAD_PID = 2**22 + 4321  # above the default pid_max: never a live process


def _fake_claim(store: Store, scope: str, item: str, pid: int, age: float = 0.0) -> None:
    p = store.claims_dir / scope / f"{item}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "time": time.time() - age}))


def test_a_claim_is_exclusive_and_stale_claims_are_taken_over(tmp_path):
    st = Store(tmp_path / "st")
    assert claims.acquire(st, "units-x", "u000000") and claims.acquire(st, "units-x", "u000000")  # ours
    _fake_claim(st, "units-x", "u000001", os.getppid())  # a live other process
    assert not claims.acquire(st, "units-x", "u000001")
    _fake_claim(st, "units-x", "u000002", DEAD_PID)  # its process is gone
    assert claims.acquire(st, "units-x", "u000002")
    _fake_claim(st, "units-x", "u000003", os.getppid(), age=100)  # alive, but older than the timeout
    assert claims.acquire(st, "units-x", "u000003", timeout=50)
    claims.release(st, "units-x", "u000001")  # not ours: left alone
    assert claims.owner(st, "units-x", "u000001")["pid"] == os.getppid()
    claims.release_all(st, "units-x")
    assert [p.name for p in (st.claims_dir / "units-x").iterdir()] == ["u000001.json"]
    with pytest.raises(ValueError, match="bad claim name"):
        claims.acquire(st, "../x", "u1")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    path = tmp_path_factory.mktemp("claims") / "store"
    ingest_small(path, {"train_base": 24, "attr_query": 4, "eval": 4})
    return path


def _cmd(store: Path, model: str, cache: Path) -> list[str]:
    # Each unit takes >= 0.3 s, so two writers started together overlap for seconds.
    code = (
        "import sys, time; import extractors.hidden as h; f = h.HiddenStates.fill; "
        "h.HiddenStates.fill = lambda self, *a: (time.sleep(0.3), f(self, *a))[1]; "
        "from extractors.run import main; sys.exit(main(sys.argv[1:]))"
    )
    return [
        sys.executable,
        "-c",
        code,
        "--layers",
        "1",
        "3",
        "--store",
        str(store),
        "--model",
        model,
        "--unit-tokens",
        "512",
        "--no-progress",
        "--model-cache",
        str(cache),
    ]


def _arrays(store: Path) -> list[np.ndarray]:
    st = Store(store)
    return [zarr.open_array(str(st.array_path(f"hidden/layer_{L}")), mode="r")[:] for L in (1, 3)]


def test_two_extractors_on_one_store_split_the_units(ingested, copy_store, tiny_model, model_cache):
    shared, alone = copy_store(ingested), copy_store(ingested)
    procs = [
        subprocess.Popen(
            _cmd(shared, tiny_model, model_cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    from extractors.pipeline import ExtractConfig, run_extraction

    run_extraction(ExtractConfig(layers=[1, 3], store=str(alone), model=tiny_model, unit_tokens=512, progress=False))
    st = Store(shared)
    n_units = st.query("SELECT max(n_units) FROM tokenizations").column(0)[0].as_py()
    runs = st.query("SELECT counts FROM runs WHERE kind = 'extract_hidden'").column(0).to_pylist()
    units = [json.loads(c)["units"] for c in runs]
    assert sum(units) == n_units and min(units) > 0, units  # every unit computed exactly once
    assert st.query("SELECT count(*) FROM tokenizations").column(0)[0].as_py() == 1  # tokenized once
    for a, b in zip(_arrays(shared), _arrays(alone), strict=False):
        assert np.array_equal(a, b)
    assert not list(st.claims_dir.rglob("*.json"))  # both released their claims


def test_a_dead_writers_claim_is_taken_over(ingested, copy_store, tiny_model):
    import hashlib

    from extractors.pipeline import ExtractConfig, run_extraction
    from store.arrays import committed_rows

    path = copy_store(ingested)
    st = Store(path)
    scope = "units-" + hashlib.sha256("|".join(sorted(["hidden/layer_1", "hidden/layer_3"])).encode()).hexdigest()[:16]
    _fake_claim(st, scope, "u000000", DEAD_PID)
    run_extraction(ExtractConfig(layers=[1, 3], store=str(path), model=tiny_model, unit_tokens=512, progress=False))
    n_units = st.query("SELECT max(n_units) FROM tokenizations").column(0)[0].as_py()
    assert sorted(committed_rows(st, "hidden/layer_1")) == list(range(n_units))


def _attr_cmd(store: Path, model: str, cache: Path, adapter: Path) -> list[str]:
    # Each unit takes >= 0.3 s, so two workers started together overlap for seconds.
    code = (
        "import sys, time; import extractors.attribution.scores as s; f = s.score_unit; "
        "s.score_unit = lambda *a: (time.sleep(0.3), f(*a))[1]; "
        "from extractors.run import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *_attr_args(store, model, adapter), "--model-cache", str(cache)]


def _attr_args(store: Path, model: str, adapter: Path) -> list[str]:
    return [
        "--kinds",
        "attribution",
        "--adapter",
        str(adapter),
        "--max-rows",
        "8",
        "--query-max-rows",
        "2",
        "--unit-rows",
        "1",
        "--score-mode",
        "individual",
        "--store",
        str(store),
        "--model",
        model,
        "--no-progress",
    ]


def test_two_attribution_workers_share_one_run_and_a_dead_workers_unit_is_taken_over(
    ingested, copy_store, tiny_model, model_cache, tmp_path
):
    from extractors.run import main as extract_main
    from tests.test_attribution_units import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    shared, alone = copy_store(ingested), copy_store(ingested)
    procs = [
        subprocess.Popen(
            _attr_cmd(shared, tiny_model, model_cache, adapter),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    scored = [int(re.search(r"in 8 units, (\d+) scored here", o[0]).group(1)) for o in outs]
    assert sum(scored) == 8 and min(scored) > 0, scored  # every unit scored exactly once, by one of the two
    st = Store(shared)
    run_id = st.query("SELECT DISTINCT run_id FROM attribution_scores").column(0).to_pylist()
    assert len(run_id) == 1 and st.run_folder(run_id[0]).joinpath("complete.json").is_file()
    # one worker alone, after a worker that died holding unit 0's claim: it takes the unit over
    _fake_claim(Store(alone), f"attribution-{run_id[0]}", "u000000", DEAD_PID)
    assert extract_main(_attr_args(alone, tiny_model, adapter)) == 0
    for table in ("attribution_scores", "attribution_pairs"):
        a, b = (sorted((s / "catalog" / table / run_id[0]).glob("*.parquet")) for s in (shared, alone))
        assert len(a) == 8 and [p.name for p in a] == [p.name for p in b], table
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True)), table
    assert not list(st.claims_dir.rglob("*.json")) and not list(Store(alone).claims_dir.rglob("*.json"))
