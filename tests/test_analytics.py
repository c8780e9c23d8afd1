"""analytics: association statistics against scipy/sklearn, BH, the correlations entry point on a
hand-made store, and on the real 160-row store with a small SAE (math separation, logit lens, report).

The real-model cases share one store: a copy of `real_store` with a small TopK SAE trained by
`trainers.sae` on layer 17 and its codes + tables from `extractors.run --kinds sae`, built once per
session by the `analytics_store` fixture of tests/conftest.py (test_notebooks.py reuses it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from scipy import stats as sps
from sklearn.metrics import mutual_info_score, roc_auc_score

from analytics import stats
from analytics.correlations import TABLE, CorrelationConfig, associate, main, resolve_sae, run_correlations
from store.core import Store, StoreError

# ---- the statistics on hand-made data --------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    """40 rows x 6 features with heavy ties at 0 (sparse features), a planted signal in column 2,
    a constant column 5, and a binary label."""
    rng = np.random.default_rng(7)
    n = 40
    X = np.where(rng.random((n, 6)) < 0.5, 0.0, rng.gamma(2.0, 1.0, (n, 6)).round(1))
    y = np.zeros(n, dtype=bool)
    y[rng.permutation(n)[:13]] = True
    X[:, 2] += 1.5 * y
    X[:, 5] = 0.0
    return X, y


def test_rank_columns_matches_scipy(toy):
    X, _ = toy
    r = stats.rank_columns(X)
    np.testing.assert_array_equal(r.avg.T, sps.rankdata(X, axis=0))
    lo, hi = sps.rankdata(X, method="min", axis=0), sps.rankdata(X, method="max", axis=0)
    t = hi - lo + 1
    np.testing.assert_array_equal(r.tie_term, (t * t - 1).sum(axis=0))  # = sum over groups of t^3 - t


def test_auroc_and_mann_whitney_match_sklearn_and_scipy(toy):
    X, y = toy
    auc, p = stats.auroc_mwu(X, y)
    for j in range(5):
        assert auc[j] == pytest.approx(roc_auc_score(y, X[:, j]), abs=1e-12)
        ref = sps.mannwhitneyu(X[y, j], X[~y, j], method="asymptotic", alternative="two-sided")
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-10)
    assert auc[2] > 0.8 and p[2] < 1e-3  # the planted feature
    assert (auc[5], p[5]) == (0.5, 1.0)  # constant column: no evidence
    # Many levels at once give the same numbers as one at a time.
    Y = np.stack([y, ~y, np.arange(len(y)) % 3 == 0], axis=1)
    auc2, p2 = stats.auroc_mwu(X, Y)
    assert auc2.shape == (6, 3)
    np.testing.assert_allclose(auc2[:, 0], auc)
    np.testing.assert_allclose(auc2[:, 1], 1 - auc)
    np.testing.assert_allclose(p2[:, 1], p)
    assert np.isnan(stats.auroc_mwu(X, np.zeros(len(y), bool))[0]).all()  # no positives


def test_spearman_matches_scipy(toy):
    X, _ = toy
    y = np.random.default_rng(1).integers(0, 5, len(X)).astype(float)  # ordinal with ties
    y[:10] += X[:10, 1]
    rho, p = stats.spearman(X, y)
    for j in range(5):
        ref = sps.spearmanr(X[:, j], y)
        assert rho[j] == pytest.approx(ref.statistic, abs=1e-12)
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-9)
    assert np.isnan(rho[5])


def test_discretize_bins_firing_values_by_rank():
    x = np.array([0, 1, 2, 3, 4, 5, 6, 0, 0, 3.0])[:, None]
    # 7 firing values ranked 1..7 (the two 3s share rank 3.5) into 3 equal-frequency bins.
    assert stats.discretize(x, 4).ravel().tolist() == [0, 1, 1, 2, 3, 3, 3, 0, 0, 2]
    assert stats.discretize(x, 2).ravel().tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 1]
    with pytest.raises(ValueError, match="n_bins"):
        stats.discretize(x, 1)


def test_mutual_info_matches_sklearn_and_g_test(toy):
    X, y = toy
    codes = stats.discretize(X, 4)
    mi, p = stats.mutual_info(codes, y, 4)
    for j in range(5):
        assert mi[j] == pytest.approx(mutual_info_score(y, codes[:, j]) / np.log(2), abs=1e-12)
        table = np.array([[np.sum((codes[:, j] == b) & (y == c)) for c in (False, True)] for b in range(4)])
        table = table[table.sum(1) > 0]
        ref = sps.chi2_contingency(table, correction=False, lambda_="log-likelihood")
        assert p[j] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (mi[5], p[5]) == (0.0, 1.0)


def test_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted 0.005 0.01 0.03 0.04 0.5 -> p*m/rank = .025 .025 .05 .05 .5 -> running min from the top
    np.testing.assert_allclose(stats.bh_qvalues(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    # The step-up minimum matters: 0.9*4/4 stays, 0.021*4/3 = 0.028 pulls the two below it down.
    np.testing.assert_allclose(stats.bh_qvalues(np.array([0.01, 0.02, 0.021, 0.9])), [0.028, 0.028, 0.028, 0.9])
    q = stats.bh_qvalues(np.array([0.2, np.nan, 0.01]))  # NaN: not a test, stays NaN
    assert np.isnan(q[1]) and q[0] == pytest.approx(0.2) and q[2] == pytest.approx(0.02)
    assert stats.bh_qvalues(np.array([1.0, 1.0])).tolist() == [1.0, 1.0]
    rng = np.random.default_rng(3)
    pp = rng.random(200) ** 3
    if hasattr(sps, "false_discovery_control"):
        np.testing.assert_allclose(stats.bh_qvalues(pp), sps.false_discovery_control(pp, method="bh"))
    with pytest.raises(ValueError):
        stats.bh_qvalues(np.array([1.5]))


def test_associate_is_tidy_and_matches_per_feature_reference():
    rng = np.random.default_rng(11)
    n = 60
    meta = pl.DataFrame(
        {
            "row_id": [f"r{i:03d}" for i in range(n)],
            "category": rng.choice(["math", "coding", "editing"], n).tolist(),
            "quality": rng.choice(["poor", "average", "good", "excellent"], n).tolist(),
            "reward_model_score": rng.normal(2, 1, n).tolist(),
        }
    ).with_columns(pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("quality")).alias("quality"))
    X = np.where(rng.random((n, 4)) < 0.6, 0.0, rng.gamma(2, 1, (n, 4)))
    X[:, 0] = np.where(meta["category"].to_numpy() == "math", 2.0 + rng.random(n), 0.0)
    out = associate(
        X,
        np.array([10, 11, 12, 13]),
        meta,
        categorical=["category", "quality"],
        ordinal=["quality"],
        continuous=["reward_model_score"],
        mi_bins=4,
    )
    assert set(out.columns) >= {
        "feature",
        "field",
        "kind",
        "level",
        "stat",
        "effect",
        "p_value",
        "q_value",
        "n_pos",
        "n_neg",
        "mean_pos",
        "mean_neg",
    }
    # 3 category + 4 quality levels, x (auroc, mi), + 2 spearman fields, per feature
    assert len(out) == 4 * ((3 + 4) * 2 + 2)
    r = out.filter((pl.col("feature") == 10) & (pl.col("level") == "math") & (pl.col("stat") == "auroc")).row(
        0, named=True
    )
    assert r["effect"] == 1.0 and r["n_pos"] + r["n_neg"] == n and r["mean_neg"] == 0.0
    is_math = meta["category"].to_numpy() == "math"
    for f in range(4):
        got = out.filter((pl.col("feature") == 10 + f) & (pl.col("level") == "coding") & (pl.col("stat") == "auroc"))
        assert got["effect"][0] == pytest.approx(roc_auc_score(meta["category"].to_numpy() == "coding", X[:, f]))
    # Null quality: that row is left out of the quality tests only.
    qrow = out.filter((pl.col("field") == "quality") & (pl.col("stat") == "spearman") & (pl.col("feature") == 11))
    assert qrow["n_pos"][0] == n - 1
    keep = meta["quality"].is_not_null().to_numpy()
    order = {"poor": 1, "average": 2, "good": 3, "excellent": 4}
    yq = np.array([order[q] for q in meta["quality"].drop_nulls()])
    assert qrow["effect"][0] == pytest.approx(sps.spearmanr(X[keep, 1], yq).statistic)
    # BH within each (field, stat) family.
    fam = out.filter((pl.col("field") == "category") & (pl.col("stat") == "mi"))
    np.testing.assert_allclose(fam["q_value"].to_numpy(), stats.bh_qvalues(fam["p_value"].to_numpy()))
    assert is_math.sum() == r["n_pos"]


# ---- the entry point on a hand-made store ----------------------------------------------------


def _handmade_store(root: Path) -> Store:
    """rows + sae_sample_stats + sae_row_features written by hand: 30 rows, feature 7 fires only
    (and always) in math rows, feature 3 everywhere, feature 99 in 2 rows only (under --min-rows)."""
    st = Store(root)
    cats = ["math", "coding", "editing"] * 10
    quals = ["poor", "average", "good", "excellent", "very poor"] * 6
    diffs = ["easy", "medium", "hard"] * 10
    ids = [f"r{i:03d}" for i in range(30)]
    st.write_table(
        "rows",
        pa.table(
            {
                "row_id": ids,
                "split": ["train_base"] * 24 + ["eval"] * 6,
                "category": cats,
                "difficulty": diffs,
                "quality": quals,
                "reward_model_score": [float(i % 5) for i in range(30)],
                "conversation_tokens": [100 + i for i in range(30)],
            }
        ),
    )
    st.write_table("split_members", pa.table({"split": ["train_base"] * 24 + ["eval"] * 6, "row_id": ids}))
    st.write_table(
        "sae_sample_stats",
        pa.table({"sae": ["toy"] * 30, "layer": pa.array([17] * 30, pa.int32()), "row_id": ids, "n_tokens": [50] * 30}),
    )
    recs = []
    for i, (rid, c) in enumerate(zip(ids, cats, strict=False)):
        if c == "math":
            recs.append(("toy", 17, rid, 7, 3.0 + i / 100, 5.0, 4))
        recs.append(("toy", 17, rid, 3, 1.0 + (i % 7) / 10, 2.0, 10))
        if i < 2:
            recs.append(("toy", 17, rid, 99, 1.0, 1.0, 1))
    cols = list(zip(*recs, strict=False))
    st.write_table(
        "sae_row_features",
        pa.table(
            {
                "sae": cols[0],
                "layer": pa.array(cols[1], pa.int32()),
                "row_id": cols[2],
                "feature": pa.array(cols[3], pa.int32()),
                "mean_act": pa.array(cols[4], pa.float32()),
                "max_act": pa.array(cols[5], pa.float32()),
                "n_active": pa.array(cols[6], pa.int32()),
            }
        ),
        part="toy__layer_17",
    )
    st.refresh_catalog()
    return st


def test_correlations_cli_on_handmade_store(tmp_path, capsys):
    st = _handmade_store(tmp_path / "st")
    assert main(["--layer", "17", "--store", str(st.root), "--contexts", "0"]) == 0
    out = capsys.readouterr().out
    assert "math" in out and "feature      7" in out
    # Queryable by SQL: the planted feature separates math perfectly, and nothing else does.
    res = st.query(
        f"SELECT feature, effect, q_value, n_pos, n_neg FROM {TABLE} WHERE field = 'category' "
        f"AND level = 'math' AND stat = 'auroc' ORDER BY effect DESC"
    ).to_pylist()
    assert res[0]["feature"] == 7 and res[0]["effect"] == 1.0 and res[0]["q_value"] < 1e-3
    assert (res[0]["n_pos"], res[0]["n_neg"]) == (10, 20)
    assert {r["feature"] for r in res} == {3, 7}  # 99 fires in 2 rows < --min-rows 3
    run = st.query("SELECT run_id, status, counts FROM runs WHERE kind = 'feature_correlations'").to_pylist()[0]
    assert run["status"] == "finished" and json.loads(run["counts"])["features_tested"] == 2
    d = st.run_dir(run["run_id"])
    for name in ("heatmap.png", "volcano.png", "layers.png"):
        assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["metrics"]["best_auroc"]["category=math"]["feature"] == 7
    assert "feature **7**" in (d / "top_features.md").read_text()
    # A rerun replaces the (SAE, layer) file instead of piling up duplicates; --split restricts rows.
    run_correlations(CorrelationConfig(layers=[17], store=str(st.root), split="train_base", progress=False))
    n = st.query(
        f"SELECT max(n_pos + n_neg) AS n, count(DISTINCT run_id) AS runs FROM {TABLE} WHERE stat = 'auroc'"
    ).to_pylist()[0]
    assert n == {"n": 24, "runs": 1}


def test_correlations_errors_are_actionable(tmp_path, capsys):
    empty = Store(tmp_path / "empty")
    empty.write_table("rows", pa.table({"row_id": ["a"]}))
    with pytest.raises(StoreError, match="extractors.run --layer 17 --kinds sae"):
        resolve_sae(empty, None, 17)
    st = _handmade_store(tmp_path / "st")
    with pytest.raises(StoreError, match="available: toy"):
        resolve_sae(st, "nope", 17)
    assert resolve_sae(st, "toy", 17) == "toy"
    with pytest.raises(StoreError, match="--sae latest: no SAE with row features at layer 17"):
        resolve_sae(st, "latest", 17)  # the hand-made store has row features but no saes row
    with pytest.raises(StoreError, match="no SAE has row features at layer 6"):
        resolve_sae(st, None, 6)
    with pytest.raises(ValueError, match="no known level order"):
        CorrelationConfig(layers=[17], ordinal=["category"])
    assert main(["--layer", "17", "--store", str(st.root), "--continuous", "no_such_field"]) == 2
    assert "no column 'no_such_field'" in capsys.readouterr().err


# ---- the real store with a small SAE ---------------------------------------------------------


@pytest.mark.slow
def test_a_trained_sae_feature_separates_math_rows(analytics_store, copy_store):
    st = Store(copy_store(analytics_store))
    sae_path = st.query("SELECT path FROM saes WHERE layer = 17").column(0)[0].as_py()
    res = run_correlations(CorrelationConfig(layers=[17], store=str(st.root), sae=sae_path, progress=False))
    best = (
        res.assoc.filter((pl.col("field") == "category") & (pl.col("level") == "math") & (pl.col("stat") == "auroc"))
        .sort("effect", descending=True)
        .row(0, named=True)
    )
    print(f"\nbest math feature {best['feature']}: AUROC {best['effect']:.3f}, q {best['q_value']:.2g}")
    assert best["effect"] >= 0.95 and best["q_value"] <= 1e-3
    # The sae column is the SAE helper's store name, and the top features carry token contexts.
    assert res.sae == st.query("SELECT sae FROM saes").column(0)[0].as_py()
    math_top = res.top.filter(pl.col("level") == "math")
    assert len(math_top) and all("[[" in c for c in math_top["contexts"][0])
    top_cats = (
        st.query("SELECT category FROM sae_top_contexts WHERE feature = ? AND rank <= 10", [best["feature"]])
        .column(0)
        .to_pylist()
    )
    assert top_cats.count("math") >= 7
    # quality and difficulty get their own families, queryable together with category.
    fams = st.query(f"SELECT DISTINCT field || '/' || stat AS f FROM {TABLE}").column(0).to_pylist()
    assert {"quality/spearman", "difficulty/spearman", "quality/auroc", "category/mi"} <= set(fams)


@pytest.mark.slow
def test_logit_lens_matches_a_direct_computation(analytics_store, copy_store):
    import torch

    from analytics.logit_lens import LogitLensConfig, final_norm_and_head, run_logit_lens, select_tokens
    from extractors.model import load_model
    from store.arrays import open_array
    from store.catalog.tokens import row_token_ids

    st = Store(copy_store(analytics_store))
    res = run_logit_lens(LogitLensConfig(store=str(st.root), layers=[6, 17], max_tokens=1, progress=False))
    t = {r["layer"]: r for r in res.table.iter_rows(named=True)}
    assert sorted(t) == [6, 17, 29] and res.final_source == "model forward"
    assert t[29]["kl_to_final"] == 0.0 and t[29]["agreement"] == 1.0
    # Reference: transformers' own hidden states of the same row (hidden_states[L + 1] = block L).
    tokz = open_array(st, "hidden/layer_17").attrs["tokenization"]
    frame = select_tokens(st, "content_tokens", "eval", tokz, 1)
    assert frame["row_id"].n_unique() == 1 and t[6]["n_tokens"] == len(frame)
    lm = load_model()
    ids = row_token_ids(st, tokz, [frame["row_id"][0]])[frame["row_id"][0]]
    norm, head = final_norm_and_head(lm.model)
    pos = torch.tensor(frame["token_pos"].to_numpy())
    y = torch.tensor(frame["next_token_id"].to_numpy())
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        lp_f = torch.log_softmax(out.logits[0, pos].float(), -1)
        assert t[29]["accuracy"] == pytest.approx(float((lp_f.argmax(-1) == y).float().mean()))
        for L in (6, 17):
            lp = torch.log_softmax(head(norm(out.hidden_states[L + 1][0, pos])).float(), -1)
            kl = float((lp_f.exp() * (lp_f - lp)).sum(-1).mean())
            assert t[L]["kl_to_final"] == pytest.approx(kl, rel=0.05)  # stored states are bf16
            assert abs(t[L]["accuracy"] - float((lp.argmax(-1) == y).float().mean())) <= 0.05
    lens = st.query("SELECT layer, accuracy FROM logit_lens ORDER BY layer").to_pylist()
    assert [r["layer"] for r in lens] == [6, 17, 29] and lens[-1]["accuracy"] > lens[0]["accuracy"]
    assert Path(res.plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_report_is_one_html_file_with_every_section(analytics_store, copy_store, tmp_path):
    from analytics.report import SECTIONS, ReportConfig, write_report

    st = Store(copy_store(analytics_store))
    run_correlations(CorrelationConfig(layers=[17], store=str(st.root), progress=False, contexts=0))
    st.write_table(
        "attribution_scores",
        pa.table({"run_id": ["a"] * 50, "row_id": [f"r{i}" for i in range(50)], "score": np.linspace(-1, 1, 50)}),
    )
    from store.catalog.runs import Run

    Run(st, "probe", {"name": "needle_probe"}, layers=[6, 17]).finish(
        metrics={
            "by_layer": {
                "6": {"val_auroc_mean": 0.71, "val_auroc_std": 0.01},
                "17": {"val_auroc_mean": 0.93, "val_auroc_std": 0.02},
            }
        }
    )
    path = write_report(ReportConfig(store=str(st.root)))
    page = path.read_text()
    assert "needle_probe" in page and "0.93" in page
    for name, _ in SECTIONS:
        assert f"<h2>{name}</h2>" in page.replace("&amp;", "&")
    assert "section failed" not in page
    sae = st.query("SELECT sae FROM saes").column(0)[0].as_py()
    assert sae in page and "math" in page and "attribution_scores" in page
    assert page.count("data:image/png;base64,") >= 6  # rows, heatmap, volcano, layers, probes, scores
    assert "no logit lens yet: python -m analytics.logit_lens" in page
    # A store without SAEs or results still reports, with the commands that fill the gaps.
    bare = write_report(ReportConfig(store=str(_handmade_store(tmp_path / "bare").root))).read_text()
    assert "no SAEs yet: python -m trainers.sae" in bare and "section failed" not in bare
