"""The gradient workflow after the norms: the token-selection macro, the token selector, steering
vectors (compute / generate / evaluate), layer features and the layer selector. A tiny random
Llama keeps it fast; what matters here is the contract, not the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run
from store.core import Store, StoreError
from tests.conftest import ingest_small
from trainers.steering.cli import ComputeConfig, compute_steering, rule_tokens, steer
from trainers.steering.layer_selector import (
    FEATURE_KEYS,
    SCHEMA,
    LayerSelector,
    LayerSelectorConfig,
    run_features,
    top_k_layers,
    train_layer_selector,
)
from trainers.steering.token_selector import (
    TokenSelector,
    TokenSelectorConfig,
    train_token_selector,
)
from trainers.steering.token_selector import (
    main as selector_main,
)

SIZES = {"train_base": 48, "attr_query": 4, "eval": 16}


@pytest.fixture(scope="module")
def sel_store(tiny_model, tmp_path_factory):
    """Hidden states of layers 1 and 2 and gradient norms of layer 2 (tiny model), read-only."""
    path = tmp_path_factory.mktemp("sel") / "store"
    ingest_small(path, SIZES)
    run(ExtractConfig(layers=[1, 2], store=str(path), model=tiny_model, unit_tokens=4096, progress=False))
    run(
        ExtractConfig(
            layers=[2], store=str(path), model=tiny_model, kinds=["gradnorm"], unit_tokens=4096, progress=False
        )
    )
    return path


@pytest.fixture(scope="module")
def trained(sel_store, tmp_path_factory):
    """A writable copy with a layer-2 token selector (scores written) and a steering run."""
    dst = tmp_path_factory.mktemp("sel_w") / "store"
    shutil.copytree(sel_store, dst)
    Store(dst).refresh_catalog()
    m = train_token_selector(
        TokenSelectorConfig(layers=[2], store=str(dst), epochs=15, write_scores=True, progress=False)
    )
    return dst, m


def _sel(store, **kw):
    args = ", ".join(f"{k} := {v}" for k, v in kw.items())
    return pl.from_arrow(Store(store).query(f"SELECT * FROM token_selection(2{', ' + args if args else ''})"))


def test_selection_macro_positives_are_top_k_and_negatives_seeded(sel_store):
    st = Store(sel_store)
    norms = pl.from_arrow(
        st.query("SELECT row_id, token_pos, grad_norm FROM token_gradnorms WHERE layer = 2 AND is_supervised")
    )
    a = _sel(sel_store, positives_per_sample=2, negatives_per_positive=3, max_tokens_per_sample=7, seed=1)
    assert set(a.columns) >= {"row_id", "tok_index", "layer", "label", "grad_norm", "rel_pos", "split", "category"}
    for rid, g in norms.group_by("row_id"):
        top = set(g.sort(["grad_norm", "token_pos"], descending=[True, False])["token_pos"][:2].to_list())
        mine = a.filter(pl.col("row_id") == rid[0])
        pos = set(mine.filter(pl.col("label") == 1)["token_pos"].to_list())
        neg = set(mine.filter(pl.col("label") == 0)["token_pos"].to_list())
        assert pos == top and not (pos & neg)
        assert len(neg) == min(3 * len(pos), 7 - len(pos), len(g) - len(pos)) and len(mine) <= 7
    again = _sel(sel_store, positives_per_sample=2, negatives_per_positive=3, max_tokens_per_sample=7, seed=1)
    other = _sel(sel_store, positives_per_sample=2, negatives_per_positive=3, max_tokens_per_sample=7, seed=2)
    assert a.equals(again)
    negs = lambda f: set(map(tuple, f.filter(pl.col("label") == 0).select("row_id", "token_pos").rows()))  # noqa: E731
    assert negs(a) != negs(other)
    assert a.filter(pl.col("label") == 1).equals(other.filter(pl.col("label") == 1))


def test_selector_beats_random_is_deterministic_and_round_trips(trained, tmp_path):
    dst, m = trained
    assert m["precision_at_1"] > m["precision_at_1_random"], m
    assert m["auroc"] > 0.6 and m["n_eval_rows"] == 16
    assert Path(m["plot"]).is_file() and Path(m["weights"]).is_file()
    again = train_token_selector(
        TokenSelectorConfig(layers=[2], store=str(dst), epochs=15, progress=False, output_dir=str(tmp_path))
    )
    a = TokenSelector.load(m["checkpoint"])
    b = TokenSelector.load(again["checkpoint"])
    for (k, va), vb in zip(a.mlp.net.state_dict().items(), b.mlp.net.state_dict().values(), strict=False):
        assert torch.equal(va, vb), k
    meta = json.loads(Path(m["checkpoint"]).read_text())
    assert meta["layer"] == 2 and "token_selection(2" in meta["view_sql"] and meta["store_version"]
    assert meta["feature_keys"][-1] == "rel_pos" and meta["metrics"]["precision_at_1"] == m["precision_at_1"]
    st = Store(dst)
    rows = st.query("SELECT row_id FROM split_members WHERE split = 'eval' ORDER BY 1 LIMIT 3").column(0).to_pylist()
    pick = a.pick(st, rows, k=2)
    sup = st.query("SELECT row_id, token_pos FROM tokens WHERE is_supervised").to_pylist()
    assert set(map(tuple, pick.select("row_id", "token_pos").rows())) <= {(r["row_id"], r["token_pos"]) for r in sup}
    assert pick.group_by("row_id").len()["len"].to_list() == [2, 2, 2]
    # the written scores: rank 1 of the table = the argmax pick; the array holds the same logits
    top = pl.from_arrow(st.query("SELECT row_id, token_pos, score FROM selector_token_scores WHERE rank = 1"))
    first = pick.filter(pl.col("rank") == 1).join(top, on="row_id")
    assert (first["token_pos"] == first["token_pos_right"]).all()
    from store.materialize import gather

    tok = st.query("SELECT tok_index, score FROM selector_token_scores ORDER BY tok_index LIMIT 50").to_pydict()
    np.testing.assert_array_equal(
        gather(st, "selector/token_selector/layer_2", np.array(tok["tok_index"])), np.array(tok["score"], np.float32)
    )


def test_selector_refuses_another_layer_and_missing_norms(trained, capsys):
    dst, m = trained
    sel = TokenSelector.load(m["checkpoint"])
    with pytest.raises(StoreError, match="trained on layer 2, not on hidden/layer_1"):
        sel.check_array(Store(dst), "hidden/layer_1")
    with pytest.raises(StoreError, match="trained on layer 2"):
        compute_steering(ComputeConfig(layers=[1], store=str(dst), selector=[m["checkpoint"]]))
    assert selector_main(["--layer", "1", "--store", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "gradnorm/layer_1 is not in" in err and "--kinds gradnorm" in err


def test_token_rule_view_needs_tok_index(trained):
    dst, _ = trained
    with pytest.raises(StoreError, match="must return row_id and tok_index"):
        rule_tokens(Store(dst), "SELECT row_id FROM rows", ["x"], 2, None)


def test_steering_changes_logits_only_with_alpha(trained, tiny_model):
    from extractors.model import load_model

    dst, _ = trained
    s = compute_steering(ComputeConfig(layers=[2], store=str(dst), token_rule="all"))
    lm = load_model(tiny_model, "cpu")
    x = torch.randint(5, 500, (1, 16))
    with torch.inference_mode():
        base = lm.model(input_ids=x).logits[0, -1]
        with steer(lm.model, s.vectors, 0.0):
            zero = lm.model(input_ids=x).logits[0, -1]
        with steer(lm.model, s.vectors, 4.0):
            moved = lm.model(input_ids=x).logits[0, -1]
        after = lm.model(input_ids=x).logits[0, -1]
    assert torch.equal(base, zero) and torch.equal(base, after)
    assert (moved - base).abs().max() > 1e-3 * base.abs().max()
    st = Store(dst)
    row = st.query("SELECT * FROM steering_vectors WHERE run_id = ?", [s.run_id]).to_pylist()[0]
    assert row["token_rule"] == "all" and abs(row["norm"] - float(s.vectors[2].norm())) < 1e-3
    assert row["pos_sql"].startswith("quality IN") and row["n_pos_rows"] > 0 and row["n_neg_rows"] > 0


def test_compute_evaluate_layer_features_and_auto_generate(trained, tiny_model):
    from trainers.steering.evaluate import EvaluateConfig, GenerateConfig, run_evaluate, run_generate

    dst, _ = trained
    st = Store(dst)
    s = compute_steering(ComputeConfig(layers=[1, 2], store=str(dst), token_rule="all"))
    feats = run_features(st, s.run_id)
    assert feats["layer"].to_list() == [1, 2] and feats["effect"].null_count() == 2
    assert feats.filter(pl.col("layer") == 2)["grad_norm_mean"][0] > 0  # layer 2 has stored norms
    res = run_evaluate(
        EvaluateConfig(
            store=str(dst),
            steering=s.run_id,
            model=tiny_model,
            max_rows=4,
            math_rows=3,
            max_new_tokens=3,
            n_boot=50,
            batch_size=4,
            splits=["eval", "attr_query"],
            progress=False,
        )
    )
    for key in ("steered@1", "steered@2", "control@1", "control@2"):
        e = res["per_layer"][key]["effect"]
        assert e[1] <= e[0] <= e[2]
    assert all(Path(p).is_file() for p in res["plots"])
    feats = run_features(st, s.run_id)
    assert feats["best"].sum() == 1 and feats["effect"].null_count() == 0
    assert st.query("SELECT count(*) FROM steering_effects WHERE run_id = ?", [res["run_id"]]).column(0)[0].as_py() > 0
    # a second evaluated run, so leave-one-run-out has something to hold out
    s2 = compute_steering(
        ComputeConfig(
            layers=[1, 2],
            store=str(dst),
            token_rule="all",
            pos_sql="reward_model_score > 3",
            neg_sql="reward_model_score < 2",
        )
    )
    run_evaluate(
        EvaluateConfig(
            store=str(dst),
            steering=s2.run_id,
            model=tiny_model,
            max_rows=4,
            math_rows=0,
            n_boot=20,
            splits=["eval", "attr_query"],
            control=False,
            progress=False,
        )
    )
    m = train_layer_selector(LayerSelectorConfig(store=str(dst), epochs=50, progress=False))
    assert m["n_runs"] == 2 and len(m["loro"]) == 2
    gen = run_generate(
        GenerateConfig(
            store=str(dst), steering=s.run_id, layers=["auto"], top_k=1, model=tiny_model, max_new_tokens=3, alpha=4.0
        )
    )
    assert len(gen["layers"]) == 1 and gen["layers"][0] in (1, 2) and len(gen["generations"]) > 0


def _fake_features(n_runs: int, layers: list[int], seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    recs = []
    for r in range(n_runs):
        best = layers[rng.integers(len(layers))]
        for L in layers:
            rec = {k: float(rng.normal()) for k in FEATURE_KEYS}
            rec.update(
                run_id=f"run{r}",
                layer=L,
                norm=5.0 + 10.0 * (L == best) + float(rng.normal()),
                n_pos_rows=10,
                n_neg_rows=12,
                n_pos_tokens=10,
                n_neg_tokens=12,
                probe_auroc=None,
                effect=float(L == best),
                best=int(L == best),
            )
            recs.append(rec)
    return pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in recs], schema=SCHEMA)


def test_layer_selector_learns_and_top_k_layers(tmp_path):
    st = Store(tmp_path / "store")
    st.write_table("layer_features", _fake_features(5, [3, 7, 11, 15]), part="fake")
    m = train_layer_selector(LayerSelectorConfig(store=str(st.root), epochs=150, progress=False))
    assert m["n_runs"] == 5 and m["loro_top1_accuracy"] > m["loro_chance"]
    sel = LayerSelector.load(m["checkpoint"])
    meta = json.loads(Path(m["checkpoint"]).read_text())
    assert meta["feature_keys"] == FEATURE_KEYS and len(meta["impute"]) == len(FEATURE_KEYS)
    feats = pl.from_arrow(_fake_features(1, [3, 7, 11, 15], seed=9))
    for k in (1, 2, 4):
        top = top_k_layers(feats, k, sel)
        assert len(top) == k == len(set(top)) and set(top) <= {3, 7, 11, 15}
    assert top_k_layers(feats, 1, sel) == [int(feats.sort("norm")["layer"][-1])]
    again = LayerSelector.load(m["weights"])
    np.testing.assert_array_equal(again.scores(feats), sel.scores(feats))
    with pytest.raises(StoreError, match="--top-k 5 must be in 1..4"):
        top_k_layers(feats, 5, sel)
