"""The linear datamodeling score (analytics.lds) on a tiny random Llama: the lds_runs table holds one
row per subset x source whose `predicted` is the hand-computed sum of the subset's benefits (the sign
convention per source) and whose `actual_loss` is the adapter's eval loss from eval_losses; the LDS
is Spearman(predicted, -actual) of those stored numbers, inside its CI; the statistic equals a plain
bootstrap loop and has the documented sign; a run killed mid-way resumes to the uninterrupted
result; two processes split the subsets; bad input is one error before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as sps

from analytics.lds import LdsConfig, main
from analytics.lds import scores as lds_scores
from analytics.study.report import lds_rows, lds_table
from store.core import Store
from tests.conftest import ingest_small
from tests.test_select_experiment import RUN, SIZES, synthetic_attribution
from trainers.finetune.train import main as ft_main

ROOT = Path(__file__).resolve().parents[1]
PRED = "predictor-synthetic"


def synthetic_predictor(store: Path) -> None:
    """A predictor_scores part for RUN predicting a *rank* (lower = better) for every pool row."""
    from trainers.selection.predictor import SCHEMA

    st = Store(store)
    ids = st.query("SELECT row_id FROM attribution_scores WHERE run_id = ? ORDER BY row_id", [RUN]).column(0)
    ids = ids.to_pylist()
    pred = np.random.default_rng(1).uniform(1, len(ids), size=len(ids))
    n = len(ids)
    st.write_table(
        "predictor_scores",
        pa.table(
            {
                "run": [PRED] * n,
                "row_id": ids,
                "predicted": pred.tolist(),
                "split": ["train"] * n,
                "target": ["rank"] * n,
                "sae": ["x"] * n,
                "layer": [2] * n,
                "attribution_run": [RUN] * n,
            },
            schema=SCHEMA,
        ),
        part=PRED,
    )
    st.refresh_catalog()


@pytest.fixture(scope="module")
def lds_store(tmp_path_factory, tiny_model):
    """30 pool rows with synthetic attribution and predictor scores, 6 eval rows, a base adapter (1 step)."""
    store = tmp_path_factory.mktemp("lds") / "store"
    ingest_small(store, SIZES, model=tiny_model)
    common = ["--store", str(store), "--no-progress", "--model", tiny_model]
    argv = ["--eval-split", "", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", *common]
    assert ft_main(argv) == 0
    synthetic_attribution(store)
    synthetic_predictor(store)
    return store


@pytest.fixture(scope="module")
def finished_run(lds_store, tiny_model, tmp_path_factory):
    """One uninterrupted LDS run on a copy of lds_store: (its store, its result JSON, finetunes it added)."""
    store = tmp_path_factory.mktemp("lds_whole") / "store"
    shutil.copytree(lds_store, store)
    before = _count(store, "finetune")
    assert main(_args(store, tiny_model)) == 0
    res = json.loads((Store(store).run_folder(_table_run(store)) / "lds.json").read_text())
    return store, res, _count(store, "finetune") - before


def _table_run(store) -> str:
    return Store(store).query("SELECT DISTINCT run_id FROM lds_runs").column(0)[0].as_py()


def _args(store, model, *extra):
    return [
        "--store",
        str(store),
        "--model",
        model,
        "--attribution",
        RUN,
        "--subsets",
        "3",
        "--fraction",
        "0.5",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--eval-max-rows",
        "2",
        "--n-boot",
        "300",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _count(store, kind: str) -> int:
    st = Store(store)
    if not st.has_table("runs"):
        return 0
    return st.query("SELECT count(DISTINCT run_id) FROM runs WHERE kind = ?", [kind]).column(0)[0].as_py()


def _result(capsys) -> dict:
    out = capsys.readouterr().out
    path = next(line.split()[1] for line in out.splitlines() if line.startswith("JSON "))
    return json.loads(Path(path).read_text())


def _table(store, run_id) -> list[dict]:
    return (
        Store(store)
        .query("SELECT * FROM lds_runs WHERE run_id = ? ORDER BY source, subset_index", [run_id])
        .to_pylist()
    )


def _pairs(st: Store, sql: str, params: list | None = None) -> dict:
    t = st.query(sql, params)
    return dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True))


def test_table_predictions_losses_lds_and_noop_rerun(finished_run, tiny_model, capsys):
    store, res, trained = finished_run
    assert trained == 3 and res["status"] == "finished"
    st = Store(store)
    rows = _table(store, res["run_id"])
    sources = [f"attribution:{RUN}", f"predictor:{PRED}", "random", "reward_model"]
    assert sorted({r["source"] for r in rows}) == sources and len(rows) == 3 * 4
    assert {r["n_rows"] for r in rows} == {15} and {r["seed"] for r in rows} == {0, 1, 2}
    # Hand-computed: each source's benefit per row, summed over the subset's rows (subsets table).
    attr = _pairs(st, "SELECT row_id, score FROM attribution_scores WHERE run_id = ?", [RUN])
    pred = _pairs(st, "SELECT row_id, predicted FROM predictor_scores WHERE run = ?", [PRED])
    rm = _pairs(st, "SELECT row_id, reward_model_score FROM rows")
    pool = sorted(attr)
    noise = dict(zip(pool, np.random.default_rng(0).standard_normal(len(pool)), strict=True))
    benefit = {
        f"attribution:{RUN}": attr,
        f"predictor:{PRED}": {r: -v for r, v in pred.items()},  # a predicted rank: lower = more helpful
        "reward_model": rm,
        "random": noise,
    }
    ad = {r["adapter"]: r for r in st.query("SELECT * FROM adapters").to_pylist()}
    for r in rows:
        ids = st.query("SELECT row_id FROM subsets WHERE subset = ?", [r["subset"]]).column(0).to_pylist()
        assert len(set(ids)) == 15 and set(ids) <= set(pool)
        assert r["predicted"] == pytest.approx(sum(benefit[r["source"]][i] for i in ids), rel=1e-9, abs=1e-9)
        # actual_loss = the adapter's token-weighted eval loss, from its per-row eval_losses
        t = st.query("SELECT sum(loss_sum) / sum(n_tokens) FROM eval_losses WHERE run_id = ?", [r["eval_run_id"]])
        assert r["actual_loss"] == pytest.approx(t.column(0)[0].as_py(), rel=1e-9)
        assert ad[r["adapter"]]["resumed_from"] == res["base_adapter"]
    # Subsets differ (seeded draws), and each subset's loss is the same for every source.
    subs = {r["subset_index"]: r for r in rows if r["source"] == "random"}
    assert len({r["subset"] for r in subs.values()}) == 3
    for r in rows:
        assert r["actual_loss"] == subs[r["subset_index"]]["actual_loss"]
    # LDS = Spearman(predicted, -actual) of the stored numbers, inside its CI.
    for name in sources:
        mine = [r for r in rows if r["source"] == name]
        want = sps.spearmanr([r["predicted"] for r in mine], [-r["actual_loss"] for r in mine]).statistic
        got = res["sources"][name]
        assert got["lds"] == pytest.approx(want, abs=1e-12)
        assert got["ci_low"] <= got["lds"] <= got["ci_high"] and 0 < got["p_value"] <= 1
    assert res["eval"]["rows"] == 2 and res["pool"]["rows"] == 30 and res["subset_rows"] == 15
    assert Path(res["plot"]).read_bytes()[:4] == b"\x89PNG"
    rec = st.query("SELECT status, kind FROM runs WHERE run_id = ?", [res["run_id"]]).to_pylist()
    assert rec and all(r["kind"] == "lds" for r in rec) and any(r["status"] == "finished" for r in rec)
    # A rerun of the finished run does nothing.
    n = _count(store, "finetune")
    assert main(_args(store, tiny_model)) == 0
    assert "nothing to do: lds run" in capsys.readouterr().out and _count(store, "finetune") == n


def test_study_report_shows_every_sources_lds(finished_run):
    """The study report's LDS table (analytics.study.report) carries each source's figures from the
    run's lds.json, one row per source, and says so when there is no lds step."""
    store, res, _ = finished_run
    commands = {"lds/lds": {"step": "lds", "result": res["run_id"]}}
    study = SimpleNamespace(store=Store(store), state={"commands": commands})
    rows = lds_rows(study)
    assert {r["source"] for r in rows} == set(res["sources"])
    for r in rows:
        src = res["sources"][r["source"]]
        assert (r["lds"], r["ci_low"], r["ci_high"], r["n_subsets"]) == (
            src["lds"],
            src["ci_low"],
            src["ci_high"],
            src["n_subsets"],
        )
    table = "\n".join(lds_table(rows))
    for r in rows:
        if r["lds"] is not None:
            assert f"| {r['source']} | {r['lds']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" in table
    assert lds_table([]) == ["(no lds step in this study)", ""]


def test_lds_sign_and_bootstrap_equal_a_plain_loop():
    loss = np.array([2.0, 1.5, 1.9, 1.2, 1.7, 2.2])
    # Higher predicted benefit <-> lower loss: LDS = +1; the reverse: -1.
    assert lds_scores.lds(-loss, loss, 200, 0)["lds"] == pytest.approx(1.0)
    assert lds_scores.lds(loss, loss, 200, 0)["lds"] == pytest.approx(-1.0)
    pred = np.array([0.3, 0.1, 0.5, 0.9, 0.2, 0.4])
    got = lds_scores.lds(pred, loss, 500, 7)
    rng = np.random.default_rng(7)
    draws = []
    for _ in range(500):
        idx = rng.integers(0, len(pred), size=len(pred))
        x, y = pred[idx], -loss[idx]
        if len(set(x)) > 1 and len(set(y)) > 1:
            draws.append(sps.spearmanr(x, y).statistic)
    assert got["lds"] == pytest.approx(sps.spearmanr(pred, -loss).statistic)
    assert got["n_boot_dropped"] == 500 - len(draws)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((np.percentile(draws, 2.5), np.percentile(draws, 97.5)))
    below, above = sum(d <= 0 for d in draws), sum(d >= 0 for d in draws)
    assert got["p_value"] == pytest.approx(min(1.0, 2 * (1 + min(below, above)) / (1 + len(draws))))


def _parts(store: Path, run_id: str) -> list[Path]:
    return sorted((Store(store).table_dir("lds_runs") / run_id).glob("*.parquet"))


def _losses(store: Path, run_id: str) -> dict:
    return {(r["subset"], r["source"]): (r["predicted"], r["actual_loss"]) for r in _table(store, run_id)}


def test_killed_run_resumes_to_the_uninterrupted_result(lds_store, finished_run, tiny_model, tmp_path, capsys):
    """SIGKILL after the first subset commits: the rerun computes only the missing units and its
    table and LDS equal an uninterrupted run's (on a copy of the store)."""
    killed = tmp_path / "killed"
    shutil.copytree(lds_store, killed)
    whole, ref, _ = finished_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "analytics.lds", *_args(killed, tiny_model)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not _parts(killed, ref["run_id"]) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(_parts(killed, ref["run_id"]))
    assert 1 <= n_done < 3, n_done  # killed mid-way: some subsets committed, not all
    assert main(_args(killed, tiny_model)) == 0
    out = capsys.readouterr().out
    again = json.loads(Path(next(x.split()[1] for x in out.splitlines() if x.startswith("JSON "))).read_text())
    # the base and the first n_done subsets were committed before the kill: only the others are computed
    assert again["computed_here"] == [f"subset{i:03d}" for i in range(n_done, 3)] and again["run_id"] == ref["run_id"]
    got, want = _losses(killed, ref["run_id"]), _losses(whole, ref["run_id"])
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    for name, v in ref["sources"].items():
        assert again["sources"][name]["lds"] == pytest.approx(v["lds"])


def test_two_processes_split_the_subsets(lds_store, tiny_model, tmp_path):
    shared = tmp_path / "shared"
    shutil.copytree(lds_store, shared)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "analytics.lds", *_args(shared, tiny_model, "--seed", "1")]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [next(x for x in o.splitlines() if x.startswith("this process computed")) for o in outs]
    mine = [set(x.split(": ", 1)[1].split(",")) - {"none"} for x in lines]
    assert not mine[0] & mine[1], lines  # none computed twice
    assert mine[0] | mine[1] == {"base", "subset000", "subset001", "subset002"}
    run_id = json.loads(Path(next(x.split()[1] for x in outs[0].splitlines() if x.startswith("JSON "))).read_text())
    assert len(_table(shared, run_id["run_id"])) == 12


def test_bad_input_is_one_error_before_any_model_loads(lds_store, tiny_model, tmp_path, capsys):
    n = _count(lds_store, "finetune")
    for extra, msg in [
        (["--attribution", "nope"], "attribution run 'nope' has no rows"),
        (["--predictor", "nope"], "--predictor 'nope' has no rows in predictor_scores"),
        (["--fraction", "0.01"], "gives subsets of 0 rows"),
        (["--subsets", "40", "--fraction", "0.99"], "--subsets 40 needs 40"),
        (["--eval-split", "nope"], "--eval-split 'nope' has no rows"),
    ]:
        assert main(_args(lds_store, tiny_model, *extra)) == 2, extra
        assert msg in capsys.readouterr().err, extra
    for extra, msg in [
        (["--fraction", "0"], "--fraction 0.0 must be strictly between 0 and 1"),
        (["--fraction", "1.5"], "--fraction 1.5 must be strictly between 0 and 1"),
        (["--subsets", "2"], "needs at least 3"),
    ]:
        with pytest.raises(SystemExit):
            main(_args(lds_store, tiny_model, *extra))
        assert msg in capsys.readouterr().err, extra
    assert _count(lds_store, "finetune") == n and _count(lds_store, "lds") == 0


def test_config_and_help():
    import dataclasses

    from analytics.study.config import config_class

    assert config_class("lds") is LdsConfig  # the study finds it
    names = {f.name for f in dataclasses.fields(LdsConfig)}
    assert {"attribution", "subsets", "fraction", "max_steps", "seed"} <= names
    assert LdsConfig(attribution="attribution:abc").attribution == "abc"
