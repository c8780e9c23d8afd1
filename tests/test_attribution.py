"""Attribution with bergson on a tiny random Llama + LoRA adapter: scores equal plain-autograd
gradient dot products (projection and preconditioning off), reproduce exactly with the same seed,
rank a pool row that is the query first, give every pool row a finite score, land in tables that
plain DuckDB joins with rows, and bad input gets one clear error."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extractors.pipeline import ExtractConfig, run_extraction
from extractors.run import main as extract_main
from extractors.sft_data import load_sft_rows, select_rows_by
from store.core import Store
from tests.conftest import ingest_small
from trainers.finetune.train import main as ft_main

SIZES = {"train_base": 10, "attr_query": 3, "eval": 2}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_model):
    """10 pool rows, 3 query rows, an adapter trained for a few steps (so lora_B is not zero)."""
    store = tmp_path_factory.mktemp("attr") / "store"
    ingest_small(store, SIZES, model=tiny_model)
    assert (
        ft_main(
            [
                "--store",
                str(store),
                "--model",
                tiny_model,
                "--no-progress",
                "--eval-split",
                "",
                "--batch-size",
                "5",
                "--lr",
                "1e-2",
                "--epochs",
                "2",
                "--lora-r",
                "4",
                "--target-modules",
                "q_proj",
                "v_proj",
            ]
        )
        == 0
    )
    return store


def _attr(store, model, **kw):
    return run_extraction(
        ExtractConfig(
            layers=[], kinds=["attribution"], adapter="latest", store=str(store), model=model, progress=False, **kw
        )
    )


def _scores(store, run_id):
    t = (
        Store(store)
        .query("SELECT row_id, score, rank FROM attribution_scores WHERE run_id = ? ORDER BY row_id", [run_id])
        .to_pydict()
    )
    return t["row_id"], np.array(t["score"]), np.array(t["rank"])


def _reference_grads(model_dir, adapter_dir, ids, labels):
    """Per-row gradients of the mean completion loss w.r.t. every LoRA weight, by plain autograd."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    params = [p for n, p in sorted(m.named_parameters()) if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    out = []
    for x, y in zip(ids, labels, strict=False):
        logits = m(torch.tensor([x])).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(y[1:]), ignore_index=-100)
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out).double()


def test_scores_equal_plain_autograd_gradient_dot_products(adapted, tiny_model):
    res = _attr(adapted, tiny_model, score_mode="individual", preconditioning="none", projection_dim=0)
    st = Store(adapted)
    pairs = st.query(
        "SELECT row_id, query_row_id, score FROM attribution_pairs WHERE run_id = ?", [res.run_id]
    ).to_pydict()
    from extractors.adapters import resolve_adapter
    from store.catalog.tokens import tokenizations

    tz = tokenizations(st)[0]["tokenization"]
    pool = select_rows_by(st, split="score_pool")
    query = select_rows_by(st, split="attr_query")
    P = load_sft_rows(st, tz, pool)
    Q = load_sft_rows(st, tz, query)
    folder = resolve_adapter(st, "latest").path
    ref = (
        _reference_grads(tiny_model, folder, P.input_ids, P.labels)
        @ _reference_grads(tiny_model, folder, Q.input_ids, Q.labels).T
    )
    got = np.zeros_like(ref.numpy())
    for r, q, s in zip(pairs["row_id"], pairs["query_row_id"], pairs["score"], strict=False):
        got[pool.index(r), query.index(q)] = s
    assert len(pairs["score"]) == len(pool) * len(query)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5 * np.abs(ref.numpy()).max())
    # attribution_scores holds the mean over queries for individual
    rows, score, _ = _scores(adapted, res.run_id)
    np.testing.assert_allclose(
        score, ref.numpy().mean(1)[[pool.index(r) for r in rows]], rtol=1e-4, atol=1e-5 * np.abs(ref.numpy()).max()
    )


def test_default_setup_is_finite_complete_and_in_duckdb(adapted, tiny_model):
    a = _attr(adapted, tiny_model, subset_k=3)  # mean / query / 32 / loss mean: the defaults
    ra, sa, ka = _scores(adapted, a.run_id)
    b = _attr(adapted, tiny_model)  # the same settings name the same run: complete, nothing recomputed
    assert b.skipped and b.run_id == a.run_id and a.run_id.startswith("attribution-")
    rb, sb, kb = _scores(adapted, b.run_id)
    assert ra == rb == select_rows_by(Store(adapted), split="score_pool")  # every pool row has a score
    assert np.all(np.isfinite(sa)) and np.array_equal(sa, sb) and np.array_equal(ka, kb)
    assert sorted(ka) == list(range(1, len(ra) + 1))
    complete = Store(adapted).query("SELECT bool_and(complete) FROM attribution_scores WHERE run_id = ?", [a.run_id])
    assert complete.column(0)[0].as_py() is True
    st = Store(adapted)
    cfg = st.query("SELECT config, status FROM runs WHERE run_id = ?", [a.run_id]).to_pylist()[0]
    assert cfg["status"] == "finished" and '"preconditioning": "query"' in cfg["config"]
    assert '"projection_seed": 0' in cfg["config"]
    folder = st.root / "runs" / a.run_id / "bergson"
    assert {p.name for p in folder.iterdir()} >= {"hessian", "query", "scores", "query_data.hf", "pool_data.hf"}
    assert not list(folder.glob("*.part"))
    from extractors.attribution.scores import read_scores  # bergson's scores.bin of the whole pool, pool order

    np.testing.assert_array_equal(read_scores(folder / "scores")[:, 0], sa)
    sub = st.query("SELECT row_id FROM subsets WHERE subset = ? ORDER BY rank", [a.subset]).column(0).to_pylist()
    assert sub == [ra[i] for i in np.argsort(ka)[:3]]
    cols = "row_id, rank, source_rank, score, source, kind, seed, run_id"
    written = st.query(f"SELECT {cols} FROM subsets WHERE subset = ? ORDER BY rank", [a.subset]).to_pylist()
    assert [r["source_rank"] for r in written] == [1, 2, 3] and written[0]["source"] == f"attribution:{a.run_id}"
    from trainers.selection.subsets import SubsetSpec, write_subset  # the subsets command writes the same subset

    assert write_subset(st, SubsetSpec(f"attribution:{a.run_id}", "top_k", k=3)) == a.subset
    assert st.query(f"SELECT {cols} FROM subsets WHERE subset = ? ORDER BY rank", [a.subset]).to_pylist() == written
    con = duckdb.connect(str(st.catalog_db), read_only=True)  # plain DuckDB on the catalog file
    top = con.sql(
        "SELECT s.rank, s.score, r.category FROM attribution_scores s JOIN rows r USING (row_id) "
        f"WHERE s.run_id = '{a.run_id}' ORDER BY s.rank LIMIT 10"
    ).fetchall()
    con.close()
    assert [t[0] for t in top] == list(range(1, len(ra) + 1)) and all(t[2] for t in top)


def test_a_pool_row_that_is_the_query_ranks_first(adapted, tiny_model):
    pool = select_rows_by(Store(adapted), split="score_pool")
    res = _attr(adapted, tiny_model, query_split="score_pool", query_max_rows=1)  # mean / query / 32
    rows, _, rank = _scores(adapted, res.run_id)
    assert rank[rows.index(pool[0])] == 1


def test_bad_input_gets_one_clear_error(adapted, tiny_model, capsys):
    base = ["--kinds", "attribution", "--store", str(adapted), "--model", tiny_model, "--no-progress"]
    for extra, msg in [
        ([], "--kinds attribution needs --adapter"),
        (["--adapter", "nope"], "adapters in this store: "),
        (["--adapter", "latest", "--query-split", "none"], "--query-split 'none' has no rows"),
        (["--adapter", "latest", "--pool-split", "eval2"], "--pool-split 'eval2' has no rows"),
        (["--adapter", "latest", "--projection-dim", "-1"], "--projection-dim must be >= 0"),
        (["--adapter", "latest", "--kinds", "attribution", "hidden", "--layer", "1"], "runs alone"),
    ]:
        try:
            rc = extract_main(base + extra)
        except SystemExit as e:  # argparse's error exit for a bad option value
            rc = e.code
        assert rc == 2, extra
        assert msg in capsys.readouterr().err, extra


def test_query_preconditioning_is_bergsons_damped_inverse():
    from bergson.hessians.inversion import invert_psd_matrix

    from extractors.attribution.steps import damped_solve

    torch.manual_seed(0)
    G = torch.randn(5, 64, dtype=torch.float64)  # 5 query rows: a rank-5 Gram, as in practice
    H, g = G.T @ G / 5, torch.randn(3, 64, dtype=torch.float64)
    want = g @ invert_psd_matrix(H, "damped_inverse", 0.1, -1.0)
    torch.testing.assert_close(damped_solve(H, g, 0.1), want, rtol=1e-9, atol=1e-12)


def test_bench_attribution_replays_our_steps_with_bergsons_cli(tiny_model, tmp_path):
    from bench.attribution import BenchAttributionConfig, run_bench

    out = run_bench(
        BenchAttributionConfig(
            model=tiny_model,
            pool_rows=4,
            query_rows=2,
            preconditioning="none",
            finetune_steps=1,
            out=str(tmp_path / "attr.json"),
        )
    )
    s = out["summary"]
    assert s["ours_vs_bergson_cli"] > 0 and s["max_relative_score_difference"] < 1e-4  # the same scores
    assert set(out["bergson_cli"]["steps"]) == {"query", "scores"} and (tmp_path / "attr.json").is_file()
