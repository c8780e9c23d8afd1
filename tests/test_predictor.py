"""The SAE -> attribution predictor (trainers.sae_predictor) on real stores holding synthetic
tables (rows, sae_row_features, sae_sample_stats, attribution_scores, saes, arrays written as
Parquet parts): a planted signal (attribution rank a monotone function of one feature's mean
activation) is recovered with Spearman > 0.9, shuffled labels give ~0, the grouped split never
puts a group on both sides, every row with SAE features gets a prediction (with or without
attribution), the sparse design equals a dense hand-built reference, --apply-to scores a store
of the same model and SAE and refuses a mismatched one, and bad input gets one clear error."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from extractors.attribution.scores import SCORES_SCHEMA, ranks_of
from extractors.ingest.sample.generate import DIFFICULTIES, QUALITIES
from extractors.sae.load import write_sae_record
from store.core import Store, StoreError
from trainers.selection.predictor import (
    PredictorConfig,
    apply_predictor,
    design_matrix,
    fit_design,
    fit_predictor,
    load_predictor,
    main,
    predict,
    split_rows,
)
from trainers.selection.predictor_data import STATS, load_rows
from trainers.selection.subsets import SubsetSpec, ranking, subset_rows, write_subset

N, LABELLED, SAE, LAYER, D_SAE, SIGNAL = 300, 240, "sae-test", 3, 100, 7
CATS = ["coding", "math", "editing", "reasoning"]


def make_store(root, seed: int = 0, model_hash: str = "sha256:model-a", n: int = N) -> Store:
    """n rows (3 per group_id, 4 categories); SAE feature SIGNAL's mean_act a ~ U(0.1, 2) in every row
    plus sparse noise features; attribution (run attr-planted) on the first LABELLED rows: rank by a."""
    st = Store(root)
    rng = np.random.default_rng(seed)
    ids = [f"r{i:04d}" for i in range(n)]
    q = rng.integers(0, 5, n)
    st.write_table(
        "rows",
        pa.table(
            {
                "row_id": ids,
                "split": ["train_base"] * n,
                "group_id": [f"g{i // 3}" for i in range(n)],
                "category": [CATS[i % 4] for i in range(n)],
                "difficulty": [DIFFICULTIES[i % 5] for i in range(n)],
                "quality": [QUALITIES[v] for v in q],
                "reward_model_score": q.astype(float) + rng.normal(0, 0.3, n),
            }
        ),
    )
    st.write_table("split_members", pa.table({"split": ["score_pool"] * n, "row_id": ids}))
    a = rng.uniform(0.1, 2.0, n)
    r_i, f_i, v = [], [], []
    for i in range(n):
        noise = np.flatnonzero(rng.random(D_SAE) < 0.1)
        for f in sorted(set(noise.tolist()) | {SIGNAL}):
            r_i.append(ids[i]), f_i.append(f), v.append(a[i] if f == SIGNAL else rng.uniform(0, 1))
    m = len(r_i)
    st.write_table(
        "sae_row_features",
        pa.table(
            {
                "sae": [SAE] * m,
                "layer": pa.array([LAYER] * m, pa.int32()),
                "row_id": r_i,
                "feature": pa.array(f_i, pa.int32()),
                "mean_act": pa.array(v, pa.float32()),
                "max_act": pa.array(v, pa.float32()),
                "n_active": pa.array([1] * m, pa.int32()),
            }
        ),
        part=f"{SAE}__layer_{LAYER}",
    )
    nt = rng.integers(20, 200, n)
    st.write_table(
        "sae_sample_stats",
        pa.table(
            {
                "sae": [SAE] * n,
                "layer": pa.array([LAYER] * n, pa.int32()),
                "row_id": ids,
                "token_set": ["content_tokens"] * n,
                "n_tokens": nt,
                "n_tokens_all": nt + 10,
                "mean_l0": rng.uniform(5, 16, n),
                "max_l0": rng.integers(10, 17, n),
                "n_features": rng.integers(5, 40, n),
                "mean_total_act": rng.uniform(1, 5, n),
                "top_feature": rng.integers(0, D_SAE, n),
                "recon_mse": pa.array([None] * n, pa.float64()),
                "recon_rel_error": pa.array([None] * n, pa.float64()),
            }
        ),
        part=f"{SAE}__layer_{LAYER}",
    )
    write_sae_record(
        st,
        name=SAE,
        layer=LAYER,
        architecture="topk",
        d_in=64,
        d_sae=D_SAE,
        k=16,
        path=str(st.root / "nowhere"),
        source="local",
        run_id="train_sae-x",
        metrics={},
    )
    st.write_rows(
        "arrays",
        [
            {
                "name": f"sae/{SAE}/layer_{LAYER}/indices",
                "kind": "sae",
                "layer": LAYER,
                "model": "tiny",
                "model_hash": model_hash,
            }
        ],
        part="sae_indices",
    )
    write_attribution(st, "attr-planted", ids[:LABELLED], a[:LABELLED])
    st.a = dict(zip(ids, a, strict=False))
    return st


def write_attribution(st: Store, run: str, rows: list[str], score: np.ndarray) -> None:
    n = len(rows)
    st.write_table(
        "attribution_scores",
        pa.table(
            {
                "run_id": [run] * n,
                "row_id": rows,
                "score": score,
                "rank": ranks_of(np.asarray(score)),
                "adapter": ["a"] * n,
                "score_mode": ["mean"] * n,
                "preconditioning": ["query"] * n,
                "projection_dim": [32] * n,
                "query_split": ["attr_query"] * n,
                "pool_split": ["score_pool"] * n,
            },
            schema=SCORES_SCHEMA,
        ),
        part=run,
    )


def _cfg(st, **kw):
    return PredictorConfig(
        **{
            "sae": "latest",
            "attribution": "attr-planted",
            "store": str(st.root),
            "progress": False,
            "bootstrap": 300,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    st = make_store(tmp_path_factory.mktemp("pred") / "store")
    return st, fit_predictor(_cfg(st))


def test_planted_signal_is_recovered(planted):
    st, doc = planted
    m = doc["metrics"]["sae"]
    assert m["spearman"] > 0.9 and m["kendall"] > 0.7 and m["spearman_ci"][0] > 0.8
    assert m["top_k_overlap"] > m["top_k_random"]
    assert doc["top_features"]["toward_top"][0]["feature"] == SIGNAL  # higher activation -> better rank
    assert doc["rows"] == {
        "with_sae_features": N,
        "labelled": LABELLED,
        "train": doc["rows"]["train"],
        "test": LABELLED - doc["rows"]["train"],
    }
    for b in ("reward_model", "metadata"):  # the baselines were fitted too; they carry no planted signal
        assert abs(doc["metrics"][b]["spearman"]) < 0.35 and doc["metrics"][b]["alpha"] > 0
    assert doc["differences"]["sae_minus_reward_model"]["ci"][0] > 0
    d = st.root / "runs" / doc["run_id"]
    for f in ("predictor.safetensors", "predictor.json", "predictor_metrics.json", "predictor_scatter.png"):
        assert (d / f).is_file(), f
    info = json.loads((d / "predictor.json").read_text())
    assert info["alpha"] == m["alpha"] and info["store_version"] and "sae_row_features" in info["view_sql"]["features"]
    assert info["sae_identity"]["model_hash"] == "sha256:model-a" and len(info["feature_ids"]) == D_SAE


def test_every_row_with_sae_features_is_predicted_and_splits_hold_whole_groups(planted):
    st, doc = planted
    t = st.query(
        "SELECT p.row_id, p.split, p.predicted, r.group_id FROM predictor_scores p JOIN rows r "
        "USING (row_id) WHERE p.run = ? ORDER BY row_id",
        [doc["run_id"]],
    ).to_pydict()
    assert len(t["row_id"]) == N
    split = dict(zip(t["row_id"], t["split"], strict=False))
    assert all(split[f"r{i:04d}"] == "unlabelled" for i in range(LABELLED, N))  # no attribution, still scored
    assert {split[f"r{i:04d}"] for i in range(LABELLED)} == {"train", "test"}
    by_group: dict[str, set] = {}
    for g, s in zip(t["group_id"], t["split"], strict=False):
        if s != "unlabelled":
            by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())
    # the saved checkpoint reproduces the table's predictions (what --apply-to runs)
    d, coef, b, _ = load_predictor(st.root / "runs" / doc["run_id"])
    np.testing.assert_allclose(
        predict(load_rows(st, SAE, LAYER, feature_ids=d.feature_ids), d, coef, b), t["predicted"], rtol=1e-10, atol=1e-8
    )
    # and the unlabelled rows' predictions follow the planted feature as well
    un = [i for i, s in enumerate(t["split"]) if s == "unlabelled"]
    from scipy.stats import spearmanr

    assert spearmanr([t["predicted"][i] for i in un], [-st.a[t["row_id"][i]] for i in un]).statistic > 0.9
    # subsets rank by it: a predicted rank, lowest first
    want = sorted(t["row_id"], key=lambda r: (t["predicted"][t["row_id"].index(r)], r))
    assert ranking(st, f"predictor:{doc['run_id']}")["row_id"].to_list() == want
    assert subset_rows(st, write_subset(st, SubsetSpec(f"predictor:{doc['run_id']}", "top_k", k=10))) == want[:10]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_shares_a_group_and_stratified_keeps_category_shares(planted, seed):
    st, _ = planted
    rows = load_rows(st, SAE, LAYER)
    lab = np.arange(LABELLED)
    tr, te = split_rows(rows, lab, "group", 0.25, seed)
    g = np.array(rows.meta["group_id"].to_list())
    assert not set(g[tr]) & set(g[te]) and len(tr) + len(te) == LABELLED and 0.2 < len(te) / LABELLED < 0.3
    tr, te = split_rows(rows, lab, "stratified", 0.25, seed)
    c = np.array(rows.meta["category"].to_list())
    assert {k: int((c[te] == k).sum()) for k in CATS} == {k: 15 for k in CATS}


def test_shuffled_labels_give_no_signal(planted):
    st, _ = planted
    ids = [f"r{i:04d}" for i in range(LABELLED)]
    a = np.array([st.a[r] for r in ids])
    write_attribution(st, "attr-shuffled", ids, np.random.default_rng(5).permutation(a))
    doc = fit_predictor(_cfg(st, attribution="attr-shuffled"))
    m = doc["metrics"]["sae"]
    assert abs(m["spearman"]) < 0.3 and m["spearman_ci"][0] < 0 < m["spearman_ci"][1]


def test_sparse_design_and_ridge_match_a_dense_reference(planted):
    from sklearn.linear_model import Ridge

    from trainers.selection.predictor import ridge

    st, _ = planted
    rows = load_rows(st, SAE, LAYER)
    tr = np.arange(0, LABELLED, 2)
    d = fit_design(rows, tr)
    X = design_matrix(rows, d)
    # reference: dense features by hand from the table, z-scored stats (null -> mean), RMS-scaled features
    t = st.query("SELECT row_id, feature, mean_act FROM sae_row_features").to_pydict()
    F = np.zeros((N, D_SAE))
    for r, f, v in zip(t["row_id"], t["feature"], t["mean_act"], strict=False):
        F[int(r[1:]), f] = v
    S = rows.stats.copy()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # the all-null recon_* columns
        mu, sd = np.nanmean(S[tr], 0), np.nanstd(S[tr], 0)
    mu, sd = np.where(np.isnan(mu), 0, mu), np.where(np.isnan(sd) | (sd == 0), 1, sd)
    Z = np.nan_to_num((S - mu) / sd)
    rms = np.sqrt((F[tr] ** 2).mean(0))
    ref = np.hstack([Z, F / np.where(rms > 0, rms, 1)])
    assert X.shape == (N, len(STATS) + D_SAE) and X.format == "csr"
    np.testing.assert_allclose(X.toarray(), ref, rtol=1e-6, atol=1e-9)
    y = np.arange(len(tr), dtype=float)
    fast = ridge(3.0).fit(X[tr], y)  # sparse: conjugate gradients
    dense = Ridge(alpha=3.0, solver="cholesky").fit(ref[tr], y)  # dense, exact
    np.testing.assert_allclose(
        predict(rows, d, fast.coef_, float(fast.intercept_)), dense.predict(ref), rtol=1e-5, atol=1e-5
    )


def test_apply_to_scores_a_store_of_the_same_sae_and_refuses_others(planted, tmp_path, capsys):
    st, doc = planted
    same = make_store(tmp_path / "same", seed=9, n=60)
    assert apply_predictor(st, doc["run_id"], same, progress=False) == 60
    t = same.query(
        "SELECT row_id, predicted, split FROM predictor_scores WHERE run = ? ORDER BY row_id", [doc["run_id"]]
    ).to_pydict()
    assert set(t["split"]) == {"unlabelled"} and len(t["row_id"]) == 60
    from scipy.stats import spearmanr

    assert spearmanr(t["predicted"], [-same.a[r] for r in t["row_id"]]).statistic > 0.9
    assert ranking(same, f"predictor:{doc['run_id']}").height == 60
    other = make_store(tmp_path / "other", seed=9, n=30, model_hash="sha256:model-b")
    with pytest.raises(
        StoreError,
        match=r"model_hash: predictor 'sha256:model-a' vs .* 'sha256:model-b'.*compute that "
        r"store's codes with the same model and SAE",
    ):
        apply_predictor(st, doc["run_id"], other, progress=False)
    bare = Store(tmp_path / "bare")
    bare.write_table("rows", pa.table({"row_id": ["x"]}))
    assert main(["--predictor", "latest", "--apply-to", str(bare.root), "--store", str(st.root), "--no-progress"]) == 2
    assert f"reads SAE {SAE} layer {LAYER}, which that store has no tables of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--attribution", "nope"], "attribution run 'nope' has no rows in attribution_scores"),
        (["--sae", "other-sae"], "--sae 'other-sae' has no SAE tables"),
        (["--test-size", "1.5"], "--test-size must be between 0 and 1"),
        (["--predictor", "latest"], "needs --apply-to"),
        (["--attribution", "attr-few"], "only 5 rows have both SAE features"),
    ],
)
def test_bad_input_gets_one_clear_error(planted, argv, msg, capsys):
    st, _ = planted
    if "attr-few" in argv:
        write_attribution(st, "attr-few", [f"r{i:04d}" for i in range(5)], np.arange(5.0))
    try:
        rc = main(["--store", str(st.root), "--no-progress"] + argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_on_real_sae_tables_of_smollm2(analytics_store, copy_store, tmp_path):
    """The tables build_sae_tables writes for the real model: a target planted on one of its stats
    columns (rank by mean_total_act) is recovered; the identity carries the real model hash and the
    SAE's weights hash, so --apply-to a copy of the store passes the check."""
    st = Store(copy_store(analytics_store))
    t = st.query("SELECT row_id, mean_total_act FROM sae_sample_stats ORDER BY row_id").to_pydict()
    write_attribution(st, "attr-real", t["row_id"], np.asarray(t["mean_total_act"]))
    doc = fit_predictor(_cfg(st, attribution="attr-real", bootstrap=200))
    assert doc["metrics"]["sae"]["spearman"] > 0.9
    info = json.loads((st.root / "runs" / doc["run_id"] / "predictor.json").read_text())
    assert info["sae_identity"]["model_hash"] and info["sae_identity"]["weights_sha256"]
    assert st.query("SELECT count(*) FROM predictor_scores WHERE run = ?", [doc["run_id"]]).column(0)[0].as_py() == len(
        t["row_id"]
    )
    other = Store(copy_store(analytics_store))
    assert apply_predictor(st, doc["run_id"], other, progress=False) == len(t["row_id"])
