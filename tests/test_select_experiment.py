"""The selection experiment on a tiny random Llama: it runs end to end, its differences are the arms'
own eval losses subtracted, its CIs contain its estimates, identical arms give exactly 0, arms of
unequal budget are refused, a rerun with more seeds reuses the finished arms, and the statistics'
fast paths equal plain loops. The same store, with a small SAE's tables and a predictor fitted on
synthetic attribution, runs notebooks/attribution_selection.ipynb top to bottom."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from analytics import select_stats
from analytics.select_experiment import SelectExperimentConfig, main
from store.core import Store
from tests.conftest import ingest_small
from tests.test_notebooks import NOTEBOOKS, execute
from trainers.finetune.train import main as ft_main

SIZES = {"train_base": 30, "attr_query": 2, "eval": 6}
RUN = "attribution-synthetic"


def synthetic_attribution(store: Path, n_top: int = 4) -> None:
    """An attribution_scores part whose top n_top rows come from distinct categories that have at
    least 3 pool rows (so a matched random draw outside the top has a choice), the rest random."""
    from extractors.attribution.scores import SCORES_SCHEMA

    st = Store(store)
    pool = st.query(
        "SELECT r.row_id, r.category FROM rows r JOIN split_members s USING (row_id) "
        "WHERE s.split = 'score_pool' ORDER BY r.row_id"
    ).to_pylist()
    counts: dict[str, int] = {}
    for r in pool:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    rng = np.random.default_rng(0)
    score = {r["row_id"]: float(rng.normal()) for r in pool}
    seen: set[str] = set()
    for r in pool:
        if counts[r["category"]] >= 3 and r["category"] not in seen and len(seen) < n_top:
            seen.add(r["category"])
            score[r["row_id"]] = 10.0 + len(seen)
    ids = sorted(score, key=lambda i: (-score[i], i))
    n = len(ids)
    st.write_table(
        "attribution_scores",
        pa.table(
            {
                "run_id": [RUN] * n,
                "row_id": ids,
                "score": [score[i] for i in ids],
                "rank": list(range(1, n + 1)),
                "adapter": ["x"] * n,
                "score_mode": ["mean"] * n,
                "preconditioning": ["none"] * n,
                "projection_dim": [0] * n,
                "query_split": ["attr_query"] * n,
                "pool_split": ["score_pool"] * n,
            },
            schema=SCORES_SCHEMA,
        ),
        part=RUN,
    )
    st.refresh_catalog()


@pytest.fixture(scope="module")
def exp_store(tmp_path_factory, tiny_model):
    """30 pool rows, 6 eval rows (one math), a base adapter (1 step), synthetic attribution, and for the
    notebook an SAE on layer 2 with its tables and a predictor (all through their commands)."""
    from extractors.run import main as extract_main
    from trainers.sae.cli import main as sae_main
    from trainers.selection.predictor import main as predictor_main

    store = tmp_path_factory.mktemp("select") / "store"
    ingest_small(store, SIZES, model=tiny_model)
    common = ["--store", str(store), "--no-progress"]
    assert extract_main(["--layer", "2", "--model", tiny_model, *common]) == 0
    assert (
        sae_main(
            [
                "--layer",
                "2",
                "--model",
                tiny_model,
                "--steps",
                "20",
                "--batch-tokens",
                "256",
                "--d-sae",
                "128",
                "--k",
                "8",
                "--ce-rows",
                "0",
                "--init-batches",
                "2",
                "--log-every",
                "10",
                *common,
            ]
        )
        == 0
    )
    assert extract_main(["--layer", "2", "--kinds", "sae", "--sae", "latest", "--model", tiny_model, *common]) == 0
    assert (
        ft_main(
            [
                "--model",
                tiny_model,
                "--eval-split",
                "",
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--lora-r",
                "4",
                *common,
            ]
        )
        == 0
    )
    synthetic_attribution(store)
    assert predictor_main(["--sae", "latest", "--attribution", RUN, "--bootstrap", "200", *common]) == 0
    return store


def _args(store, model, *extra):
    return [
        "--store",
        str(store),
        "--model",
        model,
        "--selector",
        f"attribution:{RUN}",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--math-max-rows",
        "2",
        "--max-new-tokens",
        "6",
        "--n-boot",
        "400",
        "--n-perm",
        "2000",
        "--no-progress",
        *extra,
    ]


def _finetunes(store) -> int:
    return Store(store).query("SELECT count(*) FROM runs WHERE kind = 'finetune'").column(0)[0].as_py()


def _result(store, capsys, want: str = "pooled: eval loss") -> dict:
    out = capsys.readouterr().out
    assert want in out, out
    path = next(line.split()[1] for line in out.splitlines() if line.startswith("JSON "))
    return json.loads(Path(path).read_text())


def _inside(e: dict) -> bool:
    return e["ci_low"] <= e["estimate"] <= e["ci_high"] and 0 < e["p_value"] <= 1


def test_end_to_end_and_a_killed_run_reuses_the_finished_arms(exp_store, tiny_model, capsys):
    before = _finetunes(exp_store)
    assert main(_args(exp_store, tiny_model, "--k", "4", "--seeds", "2")) == 0
    res = _result(exp_store, capsys)
    assert _finetunes(exp_store) == before + 4 and res["trained_arms"] == 4 and res["reused_arms"] == 0
    st = Store(exp_store)
    rows = st.query(
        "SELECT * FROM selection_runs WHERE run_id = ? ORDER BY seed NULLS FIRST, arm", [res["run_id"]]
    ).to_pylist()
    assert [(r["seed"], r["arm"]) for r in rows] == [
        (None, "base"),
        (0, "matched_random"),
        (0, "top"),
        (1, "matched_random"),
        (1, "top"),
    ]
    assert all(r["steps"] == (0 if r["seed"] is None else 1) and r["eval_rows"] == SIZES["eval"] for r in rows)
    assert {r["n_train_rows"] for r in rows if r["seed"] is not None} == {4}
    # The arms continued the base adapter, each on its own subset, with finetune seed = the experiment seed.
    ad = {r["adapter"]: r for r in st.query("SELECT * FROM adapters").to_pylist()}
    for r in rows[1:]:
        assert (
            ad[r["adapter"]]["resumed_from"] == res["base_adapter"]
            and r["subset"] in ad[r["adapter"]]["train_rows_sql"]
        )
        assert json.loads(ad[r["adapter"]]["config"])["seed"] == r["seed"]
    top = st.query("SELECT row_id FROM subsets WHERE subset = ?", [rows[2]["subset"]]).column(0).to_pylist()
    rand = [
        st.query("SELECT row_id FROM subsets WHERE subset = ?", [r["subset"]]).column(0).to_pylist()
        for r in (rows[1], rows[3])
    ]
    assert all(not set(top) & set(x) for x in rand)  # --overlap exclude (the default)
    # Each seed's difference is exactly the two arms' eval losses (as trainers.eval_loss reports them) subtracted.
    c = res["comparisons"]["top_vs_matched_random"]
    loss = {(r["seed"], r["arm"]): r["eval_loss"] for r in rows}
    for s, e in enumerate(c["eval_loss"]["per_seed"]):
        assert e["estimate"] == pytest.approx(loss[(s, "top")] - loss[(s, "matched_random")], abs=1e-9)
        assert _inside(e)
    assert c["eval_loss"]["pooled"]["estimate"] == pytest.approx(
        np.mean([e["estimate"] for e in c["eval_loss"]["per_seed"]])
    )
    assert _inside(c["eval_loss"]["pooled"]) and c["eval_loss"]["pooled"]["n_seeds"] == 2
    assert res["base"]["eval_loss"][0] == pytest.approx(loss[(None, "base")])
    # The one math eval row was generated and checked in every arm.
    assert (
        res["downstream"] == {"metric": "math", "rows": 1, "skipped_because": None}
        and c["downstream"]["pooled"]["n_rows"] == 1
    )
    assert Path(res["plot"]).read_bytes()[:4] == b"\x89PNG"
    # A run killed before seed 1's random arm was committed: the rerun trains that arm alone.
    st.delete_part("selection_runs", f"{res['run_id']}/s1-matched_random")
    assert main(_args(exp_store, tiny_model, "--k", "4", "--seeds", "2")) == 0
    again = _result(exp_store, capsys)
    assert (again["trained_arms"], again["reused_arms"], _finetunes(exp_store)) == (1, 3, before + 5)
    assert again["comparisons"]["top_vs_matched_random"]["eval_loss"]["per_seed"][0] == c["eval_loss"]["per_seed"][0]
    assert [a["adapter"] for a in again["arms"]][:3] == [a["adapter"] for a in res["arms"]][:3]


def test_identical_arms_give_exactly_zero(exp_store, tiny_model, capsys):
    # k = the pool with --overlap allow: the matched random draw is the whole pool, the top k too.
    assert (
        main(
            _args(
                exp_store,
                tiny_model,
                "--k",
                "30",
                "--overlap",
                "allow",
                "--seeds",
                "1",
                "--no-downstream",
                "--eval-max-rows",
                "4",
            )
        )
        == 0
    )
    res = _result(exp_store, capsys)
    c = res["comparisons"]["top_vs_matched_random"]["eval_loss"]
    for e in [*c["per_seed"], c["pooled"]]:
        assert (e["estimate"], e["ci_low"], e["ci_high"], e["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert res["downstream"]["skipped_because"] == "--no-downstream"
    assert res["comparisons"]["top_vs_matched_random"]["downstream"] is None


def test_scale_ablation_and_budget_mismatch(exp_store, tiny_model, capsys):
    n = _finetunes(exp_store)
    base = _args(
        exp_store,
        tiny_model,
        "--k",
        "8",
        "--seeds",
        "1",
        "--ablation",
        "scale",
        "--no-downstream",
        "--eval-max-rows",
        "4",
    )
    no_steps = [a for i, a in enumerate(base) if a != "--max-steps" and base[i - 1] != "--max-steps"]
    assert main(no_steps) == 2  # top4 takes 2 steps of 2 rows, top8 takes 4
    err = capsys.readouterr().err
    assert "the arms would differ in budget" in err and "top4" in err and "pass --max-steps 4" in err
    assert _finetunes(exp_store) == n  # refused before anything trained
    assert main(base) == 0
    res = _result(exp_store, capsys)
    assert set(res["comparisons"]) == {"top4_vs_top8", "ranks5-8_vs_random4_from_9-"}
    st = Store(exp_store)
    ranks = {
        a["arm"]: st.query("SELECT source_rank FROM subsets WHERE subset = ? ORDER BY source_rank", [a["subset"]])
        .column(0)
        .to_pylist()
        for a in res["arms"]
    }
    assert ranks["top4"] == [1, 2, 3, 4] and ranks["top8"] == list(range(1, 9)) and ranks["ranks5-8"] == [5, 6, 7, 8]
    assert len(ranks["random4_from_9-"]) == 4 and min(ranks["random4_from_9-"]) > 8
    assert all(_inside(c["eval_loss"]["pooled"]) for c in res["comparisons"].values())
    assert _finetunes(exp_store) == n + 4


def test_bad_input_gets_one_clear_error(exp_store, tiny_model, capsys):
    for extra, msg in [
        (["--k", "100"], "larger than the pool"),
        (["--resume-adapter", "nope"], "adapters in this store: "),
        (["--eval-split", "nope"], "--eval-split 'nope' has no rows"),
        (["--selector", "attribution:nope"], "attribution run 'nope' has no rows"),
    ]:
        assert main(_args(exp_store, tiny_model, *extra)) == 2, extra
        assert msg in capsys.readouterr().err, extra
    for extra, msg in [
        (["--k", "0"], "--k must be positive"),
        (["--selector", "random"], "both arms random"),
        (["--arms", "top,nope"], "--arms 'top,nope': 'nope' is not an arm; pick from top,matched_random,bottom,full"),
        (["--arms", "top,bottom"], "it needs matched_random"),
        (["--arms", "top,matched_random,bottom", "--ablation", "scale"], "has its own arms"),
    ]:
        with pytest.raises(SystemExit):
            main(_args(exp_store, tiny_model, *extra))
        assert msg in capsys.readouterr().err, extra


def test_anchor_arms_bottom_and_full(exp_store, tiny_model, capsys, monkeypatch):
    from analytics import select_arms as sa

    planned: list[dict] = []
    train = sa.train_arm

    def spy(store, run_id, *a, **kw):  # the budget is on disk before the first arm trains
        planned.append(json.loads((Store(store.root).run_dir(run_id) / "select_experiment.json").read_text()))
        return train(store, run_id, *a, **kw)

    monkeypatch.setattr(sa, "train_arm", spy)
    argv = _args(exp_store, tiny_model, "--k", "4", "--seeds", "1", "--no-downstream", "--eval-max-rows", "4")
    assert main([*argv, "--arms", "top,matched_random,bottom,full"]) == 0
    res = _result(exp_store, capsys)
    assert planned and planned[0]["status"] == "planned" and planned[0]["budget"]["steps"] == 1
    assert planned[0]["budget"]["rows"] == {"top": 4, "matched_random": 4, "bottom": 4, "full": 30}
    assert res["budget"] == planned[0]["budget"] and res["status"] == "finished"
    assert set(res["comparisons"]) == {"bottom_vs_matched_random", "full_vs_matched_random", "top_vs_matched_random"}
    st = Store(exp_store)
    runs = st.query("SELECT arm, steps, n_train_rows FROM selection_runs WHERE run_id = ?", [res["run_id"]]).to_pylist()
    assert sorted((r["arm"], r["steps"], r["n_train_rows"]) for r in runs) == [
        ("base", 0, 0),
        ("bottom", 1, 4),
        ("full", 1, 30),
        ("matched_random", 1, 4),
        ("top", 1, 4),
    ]
    # bottom: per category of the top 4, that category's lowest-ranked pool rows (plain reference).
    sub = {a["arm"]: a["subset"] for a in res["arms"]}
    rk = st.query(
        "SELECT a.row_id, a.rank, r.category FROM attribution_scores a JOIN rows r USING (row_id) "
        "WHERE a.run_id = ? ORDER BY a.rank",
        [RUN],
    ).to_pylist()
    want = []
    for cat, n in Counter(r["category"] for r in rk[:4]).items():
        want += [r["row_id"] for r in rk[4:] if r["category"] == cat][-n:]
    got = st.query("SELECT row_id FROM subsets WHERE subset = ?", [sub["bottom"]]).column(0).to_pylist()
    assert sorted(got) == sorted(want)
    full = st.query("SELECT count(DISTINCT row_id) FROM subsets WHERE subset = ?", [sub["full"]]).column(0)[0]
    assert full.as_py() == SIZES["train_base"]
    for c in res["comparisons"].values():
        assert _inside(c["eval_loss"]["pooled"])


def _measured(store: Path, run_id: str) -> dict:
    """(seed, arm) -> what the arm measured (per-row losses and answers), from its selection_runs row's JSON."""
    st = Store(store)
    rows = st.query("SELECT seed, arm FROM selection_runs WHERE run_id = ?", [run_id]).to_pylist()
    out = {}
    for r in rows:
        arm_id = "base" if r["seed"] is None else f"s{r['seed']}-{r['arm']}"
        rec = json.loads((st.run_dir(run_id) / "arms" / f"{arm_id}.json").read_text())
        out[arm_id] = {k: rec[k] for k in ("eval_loss", "loss_sum", "n_tokens", "correct", "subset", "steps")}
    return out


def test_two_processes_share_the_arms_and_a_dead_workers_arm_is_taken_over(exp_store, tiny_model, tmp_path, capsys):
    """Two processes started with the same command split the 5 units (base + 2 seeds x 2 arms): none
    computed twice, all computed, 4 finetunes in all; the result equals a single process's, which
    (on a copy of the store) also takes over an arm whose claim belongs to a dead process."""
    import os
    import shutil
    import subprocess
    import sys

    shared, single = tmp_path / "shared", tmp_path / "single"
    shutil.copytree(exp_store, shared)
    shutil.copytree(exp_store, single)
    before = _finetunes(shared)
    argv = _args(shared, tiny_model, "--k", "3", "--seeds", "2", "--lr", "5e-3")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "analytics.select_experiment", *argv]
    procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    units = [next(x for x in o.splitlines() if x.startswith("this process computed")) for o in outs]
    mine = [set(u.split(": ", 1)[1].split(",")) - {"none"} for u in units]
    assert not mine[0] & mine[1], units  # none computed twice (how they split depends on start-up times)
    assert mine[0] | mine[1] == {"base", "s0-top", "s0-matched_random", "s1-top", "s1-matched_random"}
    assert _finetunes(shared) == before + 4
    summary = next(Path(x.split()[1]) for o in outs for x in o.splitlines() if x.startswith("JSON "))
    res = json.loads(summary.read_text())
    # The single process, on a copy, finds s0-top claimed by a process that has died: it takes it over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim = single / "claims" / f"select-{res['run_id']}" / "u000001.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid, "time": 0}))
    assert main(_args(single, tiny_model, "--k", "3", "--seeds", "2", "--lr", "5e-3")) == 0
    ref = _result(single, capsys)
    assert ref["run_id"] == res["run_id"] and ref["trained_arms"] == res["trained_arms"] == 4
    assert _measured(shared, res["run_id"]) == _measured(single, ref["run_id"])
    assert res["comparisons"] == ref["comparisons"] and res["base"] == ref["base"]
    # A rerun of the finished experiment does nothing.
    n = _finetunes(single)
    assert main(_args(single, tiny_model, "--k", "3", "--seeds", "2", "--lr", "5e-3")) == 0
    assert "nothing to do: selection experiment" in capsys.readouterr().out and _finetunes(single) == n


def test_help_documents_every_option(capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(SelectExperimentConfig):
        assert "--" + f.name.replace("_", "-") in out and f.metadata.get("help"), f.name


def test_statistics_equal_plain_loops():
    rng = np.random.default_rng(5)
    S, n, B = 3, 17, 300
    delta, w = rng.normal(size=(S, n)), rng.integers(1, 9, n).astype(float)
    # Crossed paired bootstrap: the same draws as the vectorised version, in a loop.
    lo, hi = select_stats.bootstrap_ci(delta, w, B, np.random.default_rng(1))
    r = np.random.default_rng(1)
    rows, seeds = r.integers(0, n, (B, n)), r.integers(0, S, (B, S))
    ref = [np.mean([delta[s, rows[b]].sum() / w[rows[b]].sum() for s in seeds[b]]) for b in range(B)]
    assert (lo, hi) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)))
    # Sign flips: the same signs, in a loop.
    p = select_stats.sign_flip_p(delta, w, 1000, np.random.default_rng(2))
    signs = np.random.default_rng(2).choice(np.array([-1.0, 1.0]), size=(1000, n))
    a = [delta[:, i].sum() / (S * w.sum()) for i in range(n)]
    t = abs(sum(a))
    assert (
        p == (1 + sum(abs(sum(sg * ai for sg, ai in zip(row, a, strict=False))) >= t - 1e-12 for row in signs)) / 1001
    )
    # The point estimate is the mean over seeds of each seed's weighted difference.
    assert select_stats.point(delta, w) == pytest.approx(np.mean([(d.sum()) / w.sum() for d in delta]))
    # A clear shift is detected, no shift is not: p small vs p = 1 for exact zeros.
    shifted = select_stats.compare(np.abs(delta) + 0.5, w, n_boot=200, n_perm=2000)["pooled"]
    assert shifted.p_value < 0.01 and shifted.ci_low > 0
    zero = select_stats.compare(np.zeros((S, n)), w, n_boot=200, n_perm=200)["pooled"]
    assert (zero.estimate, zero.ci_low, zero.ci_high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)
    # One verdict: the p is the bootstrap's own, from the same replicates as the CI (a plain loop).
    draws = select_stats.bootstrap_draws(delta + 0.1, w, B, np.random.default_rng(4))
    below, above = sum(d <= 0 for d in draws), sum(d >= 0 for d in draws)
    assert select_stats.bootstrap_p(draws) == pytest.approx(min(1.0, 2 * (1 + min(below, above)) / (B + 1)))
    # ... so p < 0.05 exactly when the 95% CI excludes 0, over a range of shifts (the rows-only
    # sign-flip p is kept beside it as p_sign_flip_rows).
    for shift in np.linspace(0.0, 1.2, 13):
        e = select_stats.compare(delta + shift, w, n_boot=2000, n_perm=500, seed=7)["pooled"]
        assert (e.p_value < 0.05) == (e.ci_low > 0 or e.ci_high < 0), shift
        assert 0 < e.p_sign_flip_rows <= 1


def test_notebook_runs_on_the_store(exp_store, tiny_model, capsys):
    import nbformat

    committed = nbformat.read(NOTEBOOKS / "attribution_selection.ipynb", as_version=4)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in committed.cells if c.cell_type == "code"
    )  # committed without outputs
    # The 2-seed experiment (its arms reused when the first test trained them).
    n = _finetunes(exp_store)
    assert main(_args(exp_store, tiny_model, "--k", "4", "--seeds", "2")) == 0
    res = _result(exp_store, capsys)
    # A finished experiment after the first test (nothing to do), or all 4 arms trained when alone.
    assert _finetunes(exp_store) in (n, n + 4) and res["status"] == "finished"
    nb = execute("attribution_selection.ipynb", {"STORE": str(exp_store), "EXPERIMENT": res["run_id"]})
    text = "\n".join(
        o.get("text", "") + "".join(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
        for c in nb.cells
        for o in c.get("outputs", [])
    )
    assert f"attribution run {RUN}" in text and "Spearman (held-out)" in text and "toward top" in text
    assert "[[" in text  # SAE feature contexts from sae_top_contexts
    assert "pooled top - matched_random: eval loss" in text and res["run_id"] in text
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 3
