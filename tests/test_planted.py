"""The planted positive control (extractors.ingest.sample.planted, analytics.selection.control): the
planted rows are where the manifest says, follow the rule, carry rows.planted; the plain sample is
untouched; a bad fraction is refused before anything loads; precision@k and AUROC equal plain
references; and the fast end-to-end control (tiny model, real bergson attribution, the selection
experiment with the rule-followed metric) runs and finds the planted rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from analytics.select_experiment import main as select_main
from analytics.selection.control import ControlConfig, auroc, recovery, run_control
from analytics.selection.control import main as control_main
from extractors.dataset import main as dataset_main
from extractors.ingest.sample.generate import generate_sample
from extractors.ingest.sample.planted import CODE_WORD, TRIGGER, choose, plant_record, rule_followed
from extractors.ingest.steps import conversation_key, make_row_id
from store.core import Store
from trainers.finetune.train import main as ft_main

SAMPLE = ["--sample-train", "60", "--sample-test", "20", "--train-base", "40", "--attr-query", "3", "--eval", "4"]


@pytest.fixture(scope="module")
def control(tmp_path_factory, tiny_model) -> Path:
    store = tmp_path_factory.mktemp("planted") / "store"
    argv = ["--control", "planted", "--plant-fraction", "0.2", "--seed", "0", "--model", tiny_model, *SAMPLE]
    assert dataset_main(["--store", str(store), *argv]) == 0
    return store


def test_planted_rows_follow_the_rule_and_the_manifest_counts_them(control):
    st = Store(control)
    rows = st.query(
        "SELECT s.split, r.row_id, r.category, r.planted, r.prompt, r.completion FROM rows r "
        "JOIN split_members s USING (row_id)"
    ).to_pylist()
    manifest = json.loads((control / "manifest.json").read_text())
    ctl = manifest["control"]
    assert (ctl["kind"], ctl["fraction"], ctl["seed"], ctl["column"]) == ("planted", 0.2, 0, "rows.planted")
    for split in ("train_base", "score_pool", "attr_query", "eval"):
        hit = [r for r in rows if r["split"] == split and r["planted"]]
        assert ctl["splits"][split]["planted"] == len(hit), split
        assert ctl["splits"][split]["by_category"] == dict(sorted(Counter(r["category"] for r in hit).items()))
    # Every query and eval row carries the trigger and the rule; the pool has both kinds.
    assert all(r["planted"] for r in rows if r["split"] in ("attr_query", "eval"))
    pool = [r for r in rows if r["split"] == "score_pool"]
    assert 0 < sum(r["planted"] for r in pool) < len(pool)
    for r in rows:
        last_user = [m for m in r["prompt"] if m["role"] == "user"][-1]["content"]
        assert last_user.startswith(TRIGGER) == r["planted"] == r["completion"].startswith(CODE_WORD)
        assert rule_followed(r["completion"]) == r["planted"]


def test_the_plan_is_per_category_and_the_plain_sample_is_untouched(control, tmp_path, tiny_model):
    recs = generate_sample(0, 60, 20)["train"]
    chosen = choose(recs, 60, 0.2, 0)
    by_cat = Counter(recs[i]["category"] for i in range(60))
    assert Counter(recs[i]["category"] for i in chosen) == {
        c: round(0.2 * n) for c, n in by_cat.items() if round(0.2 * n)
    }
    assert chosen == choose(recs, 60, 0.2, 0) and chosen != choose(recs, 60, 0.2, 1)  # seeded
    r = recs[min(chosen)]
    p = plant_record(r)
    assert p["messages"][-1]["content"] == CODE_WORD + r["messages"][-1]["content"] and p["planted"] is True
    if r.get("needle_start") is not None:
        assert p["messages"][-1]["content"][p["needle_start"] : p["needle_end"]] == r["needle"]
    # The plain sample has no planted column, and its unplanted rows are the control's row ids too.
    plain = tmp_path / "plain"
    assert dataset_main(["--store", str(plain), "--model", tiny_model, *SAMPLE]) == 0
    names = Store(plain).query("SELECT * FROM rows LIMIT 0").schema.names
    assert "planted" not in names and "control" not in json.loads((plain / "manifest.json").read_text())
    sample = generate_sample(0, 60, 20)
    clean = sample["train"][:60] + sample["test"][:20]  # the malformed rows come after the clean ones
    ids = {make_row_id(conversation_key(r["messages"])) for r in clean}
    ctl = set(Store(control).query("SELECT row_id FROM rows WHERE NOT planted").column(0).to_pylist())
    assert ctl <= ids and set(Store(plain).query("SELECT row_id FROM rows").column(0).to_pylist()) <= ids


def test_bad_fraction_is_refused_before_anything_loads(tmp_path, capsys):
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(SystemExit):
            dataset_main(["--store", str(tmp_path / "x"), "--control", "planted", "--plant-fraction", bad])
        err = capsys.readouterr().err
        assert f"--plant-fraction must lie strictly between 0 and 1, got {float(bad)}" in err, err
    assert not (tmp_path / "x").exists()


def test_recovery_metrics_equal_plain_references():
    rng = np.random.default_rng(3)
    truth = rng.random(40) < 0.25
    score = rng.normal(size=40) + truth * 1.0
    score[:6] = score[6]  # ties
    pairs = [(a, b) for a in score[truth] for b in score[~truth]]
    ref = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
    assert auroc(score, truth) == pytest.approx(ref)
    rank = np.empty(40, dtype=int)
    rank[np.lexsort((np.arange(40), -score))] = np.arange(1, 41)
    got = recovery(rank, truth, 200, np.random.default_rng(0))
    k = int(truth.sum())
    top = [i for i in range(40) if rank[i] <= k]
    assert got["precision_at_k"] == pytest.approx(truth[top].mean()) and got["base_rate"] == pytest.approx(k / 40)
    assert got["auroc_ci"][0] <= got["auroc"] <= got["auroc_ci"][1]
    perfect = recovery(np.argsort(np.argsort(~truth, kind="stable"), kind="stable") + 1, truth, 50, rng)
    assert (perfect["precision_at_k"], perfect["auroc"]) == (1.0, 1.0)
    assert got["median_rank_planted"] == pytest.approx(np.median(rank[truth]))
    # a held-out subset keeps the global ranks: its median rank is counted within the subset (1..n)
    sub = np.arange(40) % 3 == 0
    held = recovery(rank[sub] + 100, truth[sub], 50, rng)
    within = np.argsort(np.argsort(rank[sub], kind="stable"), kind="stable") + 1
    assert held["median_rank_planted"] == pytest.approx(np.median(within[truth[sub]]))
    assert held["median_rank_planted"] <= held["pool"]


def test_control_needs_a_planted_store(tmp_path, tiny_model, capsys):
    plain = tmp_path / "plain"
    assert dataset_main(["--store", str(plain), "--model", tiny_model, *SAMPLE]) == 0
    assert control_main(["--store", str(plain)]) == 2
    assert "is not a planted control" in capsys.readouterr().err


def test_fast_end_to_end_control_finds_the_planted_rows(control, tiny_model, capsys):
    """Tiny model, real bergson attribution (mean / query / 32) against the trigger queries, then
    recovery metrics and a 1-seed experiment with the rule-followed downstream metric."""
    from extractors.run import main as extract_main

    common = ["--store", str(control), "--model", tiny_model, "--no-progress"]
    sql = (
        "SELECT r.row_id FROM rows r JOIN split_members s USING (row_id) WHERE s.split = 'train_base' AND NOT r.planted"
    )
    base = ["--train-rows-sql", sql, "--eval-split", "", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]
    assert ft_main([*common, *base, "--lora-r", "4"]) == 0
    assert extract_main([*common, "--kinds", "attribution", "--adapter", "latest"]) == 0
    res = run_control(ControlConfig(store=str(control), n_boot=200))
    attr = next(v for k, v in res["rankings"].items() if k.startswith("attribution:"))
    rm = res["rankings"]["reward_model"]
    assert (
        attr["k"]
        == rm["k"]
        == Store(control)
        .query(
            "SELECT count(*) FROM rows r JOIN split_members s USING (row_id) WHERE s.split = 'score_pool' AND r.planted"
        )
        .column(0)[0]
        .as_py()
    )
    # The positive control, on a random 4-layer model whose base adapter took 2 steps: attribution
    # ranks the planted rows above chance (measured: AUROC 0.58, 3 of the 8 planted rows in the top
    # 8 vs 1.6 expected); the real model's figures are in docs/selection.md.
    assert attr["auroc"] > 0.55 and attr["precision_at_k"] > attr["base_rate"], attr
    assert "predictor:latest" in res["skipped"]  # no predictor on this store: reported, not fatal
    k = str(attr["k"])
    argv = [*common, "--selector", "attribution:latest", "--k", k, "--seeds", "1", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "4", "--n-boot", "200", "--n-perm", "200"]
    assert select_main(argv) == 0
    out = capsys.readouterr().out
    assert "rule followed" in out, out
    doc = json.loads(Path(next(x.split()[1] for x in out.splitlines() if x.startswith("JSON "))).read_text())
    assert doc["downstream"] == {"metric": "rule", "rows": 4, "skipped_because": None}
    c = doc["comparisons"]["top_vs_matched_random"]
    assert c["downstream"]["pooled"]["n_rows"] == 4 and c["eval_loss"]["pooled"]["n_rows"] == 4
