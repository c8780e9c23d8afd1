"""analytics.label_features on a tiny store: a random 4-layer model's layer 2, the random tiny
SAE's codes, the same random model as explainer and scorer (its explanations are noise; what is
checked is the machinery): metrics against hand-written ones, the sampling rules, the
deterministic explanation, the shuffled baseline, resume from the cache, the review round trip
and the bad inputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analytics.label_features import command, metrics, review
from analytics.label_features.command import LabelConfig, main, run_labels
from analytics.label_features.inputs import resolve_sae, token_codes
from analytics.label_features.llm import Scorer, render
from analytics.label_features.samples import feature_examples, sort_firing
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as extract
from store.core import Store
from tests.conftest import ingest_small

SMALL = {"train_base": 16, "attr_query": 2, "eval": 6}
FAST = ["--context", "2", "--n-test", "4", "--n-top", "4", "--per-quantile", "1", "--n-quantiles", "2",
        "--min-firing", "6", "--max-new-tokens", "6", "--n-boot", "40", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def code_store(tiny_model, sae_dir, tmp_path_factory) -> Path:
    """Layer 2 of the tiny model and the tiny SAE's codes (read-only: tests copy it)."""
    path = tmp_path_factory.mktemp("labels") / "store"
    ingest_small(path, SMALL)
    common = dict(store=str(path), model=tiny_model, layers=[2], progress=False)
    extract(ExtractConfig(kinds=["hidden"], **common))
    extract(ExtractConfig(kinds=["sae"], sae=str(sae_dir), **common))
    return path


@pytest.fixture(scope="module")
def labelled(code_store, tiny_model, tmp_path_factory):
    """One labelling run of the top 4 features (by density), on a private copy."""
    store = tmp_path_factory.mktemp("labelled") / "store"
    shutil.copytree(code_store, store)
    argv = ["--store", str(store), "--explainer", tiny_model, "--features", "4", *FAST]
    res = run_labels(command.parse_config(LabelConfig, argv))
    return store, argv, res


def test_metrics_are_the_hand_computed_ones():
    score = np.array([2.0, 0.5, -1.0, 0.5, -0.2, -3.0, 1.0])
    y = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    s = metrics.classify(score, y)
    # decisions (score > 0): TP 2 (2.0, 0.5), FN 1, FP 2 (0.5, 1.0), TN 2
    assert s.bacc == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert s.f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    pairs = [(p, n) for p in score[y] for n in score[~y]]
    by_hand = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert s.auroc == pytest.approx(by_hand)  # 0.5 vs 0.5 is a tie
    lo, hi = metrics.bootstrap_auroc([(score, y)], 200, 0)
    assert 0 <= lo <= by_hand <= hi <= 1
    assert metrics.confidence(0.75) == pytest.approx(0.5) and metrics.confidence(0.4) == 0.0


def test_samples_follow_the_rules(code_store):
    store = Store(code_store)
    sae = resolve_sae(store, "latest", None)
    c = token_codes(store, sae)
    firing = sort_firing(c, sae.d_sae)
    n = np.diff(firing.start)
    f = int(np.argsort(n)[len(n) // 2])  # a feature of median density
    ex = feature_examples(c, firing, f, context=3, n_top=4, n_quantiles=2, per_quantile=1, n_test=4, seed=0)

    def act(t):  # the feature's activation at token t, by hand
        return float(sum(v for i, v in zip(c.idx[t], c.val[t], strict=True) if i == f)) if c.in_set[t] else 0.0

    strongest = max(act(t) for t in range(len(c.token_id)))
    assert max(ex.explain[0].acts) == pytest.approx(strongest)  # the first explain window: the top one
    spans = []
    for e in ex.explain + ex.test + ex.control:
        row = np.searchsorted(c.row_start, e.centre, side="right") - 1
        start = max(int(c.row_start[row]), e.centre - 3)
        spans.append(set(range(start, start + len(e.tokens))))
        assert e.acts == pytest.approx([act(t) for t in range(start, start + len(e.tokens))])
    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            assert not spans[i] & spans[j]  # no window shares a token with another
    assert len(ex.test) == 4 and all(max(e.acts) > 0 for e in ex.test)
    assert len(ex.control) == 4 and all(max(e.acts) == 0 for e in ex.control)


def test_yes_no_batched_is_the_one_prompt_forward(tiny_model, tmp_path):
    from extractors.model import load_model

    lm = load_model(tiny_model, "cpu", "fp32")
    sc = Scorer(lm, tmp_path, batch_size=3)
    prompts = [[{"role": "user", "content": "x " * n}] for n in (1, 7, 3, 12)]
    got = sc.yes_no(prompts)
    for p, g in zip(prompts, got, strict=True):
        ids = lm.tokenizer(render(lm.tokenizer, p), return_tensors="pt", add_special_tokens=False)["input_ids"]
        lp = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
        ref = torch.logsumexp(lp[sc.yes], -1) - torch.logsumexp(lp[sc.no], -1)
        assert g == pytest.approx(float(ref), abs=1e-4)


def test_run_writes_three_methods_and_the_baselines(labelled):
    store, _, res = labelled
    rows = Store(store).query("SELECT * FROM feature_labels ORDER BY feature, method").to_pylist()
    feats = sorted({r["feature"] for r in rows})
    assert len(feats) == 4 and len(rows) == 12
    by = {(r["feature"], r["method"]): r for r in rows}
    llm = {f: by[f, "llm"]["explanation"] for f in feats}
    for f in feats:
        assert {m for (g, m) in by if g == f} == {"llm", "deterministic", "shuffled"}
        sh = by[f, "shuffled"]["explanation"]
        assert sh in llm.values() and (sh != llm[f] or list(llm.values()).count(sh) > 1)  # another feature's
        for m in ("llm", "deterministic", "shuffled"):
            r = by[f, m]
            assert 0 <= r["detection_bacc"] <= 1 and 0 <= r["auroc"] <= 1 and r["n_pos"] == 4 and 1 <= r["n_neg"] <= 4
            assert r["auroc_low"] <= r["auroc"] + 1e-9 and r["source"] == "auto"
    # the deterministic explanation: the commonest token texts of the strongest 50 firing tokens
    s = Store(store)
    sae = resolve_sae(s, "latest", None)
    c = token_codes(s, sae)
    f = feats[0]
    firing = [
        (float(v), t)
        for t in range(len(c.token_id))
        if c.in_set[t]
        for i, v in zip(c.idx[t], c.val[t], strict=True)
        if i == f and v > 0
    ]
    firing.sort(key=lambda x: (-x[0], x[1]))
    counts: dict[str, int] = {}
    for _, t in firing[:50]:
        counts[c.text[t]] = counts.get(c.text[t], 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert by[f, "deterministic"]["explanation"].startswith("fires on tokens " + ", ".join(repr(t) for t, _ in top))
    assert "promotes next tokens" in by[f, "deterministic"]["explanation"]  # same tokenizer: W_dec @ W_U
    assert set(res.summary) == {"llm", "deterministic", "shuffled"} and Path(res.plot).is_file()


def test_rerun_resumes_from_the_cache(labelled, monkeypatch):
    store, argv, res = labelled
    run_dir = Store(store).run_dir(res.run_id)
    (run_dir / "features" / f"{res.rows[0]['feature']}.json").unlink()  # as if killed before this feature
    calls = []
    monkeypatch.setattr(
        "transformers.generation.utils.GenerationMixin.generate", lambda *a, **k: calls.append(1) or 1 / 0
    )
    again = run_labels(command.parse_config(LabelConfig, argv))
    assert again.run_id == res.run_id and again.generated == 0 and not calls  # explanations came from the cache
    key = ["feature", "method", "explanation", "auroc"]
    assert [[r[k] for k in key] for r in again.rows] == [[r[k] for k in key] for r in res.rows]
    assert len(Store(store).query("SELECT * FROM feature_labels").to_pylist()) == 12  # the run's part, replaced


def test_review_round_trip_keeps_human_labels_above(labelled, tmp_path, capsys):
    store, argv, res = labelled
    csv_path = tmp_path / "review.csv"
    base = ["--store", str(store), "--sae", "latest"]
    assert main([*base, "--export-review", str(csv_path), "--review-below", "1.01"]) == 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert {int(r["feature"]) for r in rows} == {r["feature"] for r in res.rows}
    assert all(r["top_contexts"] and "<<" in r["top_contexts"] for r in rows)
    rows[0]["label"] = "hand label: the tiny model's feature"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=review.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert main([*base, "--import-review", str(csv_path)]) == 0
    run_labels(command.parse_config(LabelConfig, argv))  # a rerun of the automatic labels
    s = Store(store)
    cur = {r["feature"]: r for r in review.current_labels(s, resolve_sae(s, "latest", None))}
    f = int(rows[0]["feature"])
    assert cur[f]["source"] == "human" and cur[f]["explanation"] == "hand label: the tiny model's feature"
    assert all(r["source"] == "auto" for g, r in cur.items() if g != f)
    # exported again: the hand-labelled feature is no longer up for review
    assert main([*base, "--export-review", str(csv_path), "--review-below", "1.01"]) == 0
    with csv_path.open() as fh:
        assert f not in {int(r["feature"]) for r in csv.DictReader(fh)}


def test_bad_input_is_one_clear_error_and_loses_nothing(
    labelled, code_store, tiny_model, tmp_path, monkeypatch, capsys
):  # noqa: E501
    store, argv, _ = labelled
    n_before = len(Store(store).query("SELECT * FROM feature_labels").to_pylist())
    monkeypatch.setattr(command, "load", lambda *a, **k: pytest.fail("a model loaded on bad input"))
    base = ["--store", str(store), "--explainer", tiny_model, "--no-progress"]

    def err(*extra) -> str:
        assert main([*base, *extra]) == 2
        return capsys.readouterr().err

    assert "--features 500 is out of range: the SAE has features 0..127" in err("--features", "3", "500")
    assert "no such folder" in err("--explainer", str(tmp_path / "nope"), "--features", "3")
    (tmp_path / "empty").mkdir()
    assert "without config.json" in err("--explainer", str(tmp_path / "empty"))
    bad = tmp_path / "bad.csv"
    bad.write_text("feature,label,colour\n3,x,red\n")
    assert "unknown column(s) colour" in err("--import-review", str(bad))
    bad.write_text("feature,label\n3,x\n999,y\n")
    assert "feature 999 is unknown: SAE" in err("--import-review", str(bad))
    assert len(Store(store).query("SELECT * FROM feature_labels").to_pylist()) == n_before  # nothing lost or added
    # an SAE without codes: the store's layer 2 without the code arrays
    nocodes = tmp_path / "nocodes"
    shutil.copytree(code_store, nocodes)
    shutil.rmtree(next((nocodes / "arrays" / "sae").iterdir()))
    Store(nocodes).refresh_catalog()
    assert main(["--store", str(nocodes), "--explainer", tiny_model, "--features", "3"]) == 2
    assert "--kinds sae" in capsys.readouterr().err
