"""trainers.decoder: the top-k + tail KL against a dense softmax on a tiny vocabulary, the sparse
and transformer paths against plain references, a run end to end on a tiny model (baselines,
gate, export, table), and one clear error per bad input before any model loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as extract
from store.core import Store
from tests.conftest import ingest_small
from trainers.decoder.cli import DecoderConfig, main
from trainers.decoder.kl import dense_kl, stored_kl
from trainers.decoder.models import LinearDecoder, TransformerDecoder

SMALL = {"train_base": 24, "attr_query": 2, "eval": 8}


def _bucketed_kl(p: np.ndarray, q: np.ndarray, top: np.ndarray) -> float:
    """KL of the (k + 1)-bucket coarse-graining, spelled out for one token."""
    rest = np.setdiff1d(np.arange(len(p)), top)
    kl = sum(p[j] * np.log(p[j] / q[j]) for j in top)
    return kl + p[rest].sum() * np.log(p[rest].sum() / q[rest].sum())


@pytest.mark.parametrize("k", [40, 8, 1])
def test_topk_tail_kl_against_a_dense_softmax_on_a_tiny_vocabulary(k):
    g = torch.Generator().manual_seed(k)
    frozen = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    dec = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    val, ids = torch.topk(frozen, k)
    lse = torch.logsumexp(frozen, -1)
    est, logq = stored_kl(dec, ids, val, lse)
    dense = dense_kl(frozen, dec)
    p, q = torch.softmax(frozen, -1).numpy(), torch.softmax(dec, -1).numpy()
    for t in range(6):
        if k == 40:  # no tail: the estimator is the full KL
            assert est[t].item() == pytest.approx(dense[t].item(), abs=1e-5)
        else:  # the bucketed KL exactly, and a lower bound on the full one (data-processing inequality)
            assert est[t].item() == pytest.approx(_bucketed_kl(p[t], q[t], ids[t].numpy()), abs=1e-5)
            assert est[t].item() <= dense[t].item() + 1e-6
    assert torch.allclose(logq.exp().sum(-1), torch.ones(6, dtype=torch.float32), atol=1e-5)
    # and it trains: the gradient moves the decoder's logits towards the frozen ones
    d = dec.clone().float().requires_grad_(True)
    stored_kl(d, ids, val.float(), lse.float())[0].mean().backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_sparse_linear_and_causal_transformer_against_plain_references():
    torch.manual_seed(0)
    W, b = torch.randn(50, 16), torch.randn(16)
    dense = torch.relu(torch.randn(7, 50)) * (torch.rand(7, 50) < 0.1)
    codes = dense.to_sparse().coalesce()
    lin = LinearDecoder(W, b)
    assert torch.allclose(lin(codes, torch.tensor([7])), dense @ W + b, atol=1e-5)
    tr = TransformerDecoder(W, b, n_layers=2, d_model=8)
    lens = torch.tensor([4, 3])
    assert torch.allclose(tr(codes, lens), dense @ W + b, atol=1e-5)  # zero-initialised output: = linear
    torch.nn.init.normal_(tr.out.weight)
    y = tr(codes, lens)
    # causal: changing the last token of row 0 leaves its first three outputs (and row 1) unchanged
    dense2 = dense.clone()
    dense2[3] = torch.rand(50)
    y2 = tr(dense2.to_sparse().coalesce(), lens)
    assert torch.allclose(y[:3], y2[:3], atol=1e-5) and torch.allclose(y[4:], y2[4:], atol=1e-5)
    assert not torch.allclose(y[3], y2[3])


@pytest.fixture(scope="module")
def dec_store(tiny_model, sae_dir, tmp_path_factory):
    """Tiny model: hidden layer 2 + logits in one pass, then the tiny SAE's codes (read-only)."""
    path = tmp_path_factory.mktemp("decoder") / "store"
    ingest_small(path, SMALL)
    common = dict(store=str(path), model=tiny_model, layers=[2], progress=False)
    extract(ExtractConfig(kinds=["hidden", "logits"], **common))
    extract(ExtractConfig(kinds=["sae"], sae=str(sae_dir), **common))
    return path


def _args(store, model, sae_dir, *extra):
    return ["--store", str(store), "--model", model, "--sae", str(sae_dir), "--layer", "2", "--no-progress",
            "--max-train-rows", "20", "--max-eval-rows", "8", "--batch-rows", "4", *extra]  # fmt: skip


def _category(store) -> str:
    return Store(store).query(
        "SELECT r.category FROM rows r JOIN split_members s USING (row_id) WHERE s.split = 'train_base' "
        "GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
    ).column(0)[0].as_py()  # fmt: skip


def test_decoder_run_end_to_end(dec_store, tiny_model, sae_dir, tmp_path, capsys):
    store = tmp_path / "st"
    shutil.copytree(dec_store, store)
    cat = _category(store)
    assert main(_args(store, tiny_model, sae_dir, "--epochs", "2", "--max-kl", "1000", "--ood-category", cat)) == 0
    out = capsys.readouterr().out
    assert "passed; best epoch" in out
    st = Store(store)
    t = st.query("SELECT * FROM decoders ORDER BY split, model").to_pylist()
    assert {(r["split"], r["model"]) for r in t} == {
        (s, m) for s in ("eval", "ood") for m in ("decoder", "residual", "logit_lens", "frozen")
    }
    by = {(r["split"], r["model"]): r for r in t}
    for s in ("eval", "ood"):
        assert by[(s, "frozen")]["kl"] == 0 and by[(s, "frozen")]["agreement"] == 1
        assert by[(s, "decoder")]["passes_gate"] and by[(s, "decoder")]["n_tokens"] > 0
        assert by[(s, "decoder")]["n_tokens"] == by[(s, "logit_lens")]["n_tokens"]
    run_id = t[0]["run_id"]
    curves = json.loads((st.run_dir(run_id) / "curves.json").read_text())
    c0 = {(c["model"], c["split"]): c for c in curves["curves"] if c["epoch"] == 0}
    lens = {f["split"]: f for f in curves["fixed"] if f["model"] == "logit_lens"}
    for s in ("eval", "ood"):  # the residual baseline starts at the identity: exactly the logit lens
        assert c0[("residual", s)]["kl"] == pytest.approx(lens[s]["kl"], rel=1e-5)
    assert sorted({c["epoch"] for c in curves["curves"]}) == [0, 1, 2]
    meta = json.loads((st.run_dir(run_id) / "decoder_best.json").read_text())
    assert meta["sae_identity"]["d_sae"] == 128 and meta["store_version"] and "row_id IN" in meta["view_sql"]["train"]
    from safetensors.torch import load_file

    w = load_file(st.run_dir(run_id) / "decoder_best.safetensors")
    assert w["W"].shape == (128, 64)
    assert (st.run_dir(run_id) / "curves.png").stat().st_size > 0
    # OOD rows are the category's and never trained on
    rec = json.loads(st.query("SELECT config FROM runs WHERE run_id = ?", [run_id]).column(0)[0].as_py())
    cats = st.query(f"SELECT DISTINCT r.category FROM ({rec['train_sql']}) t JOIN rows r USING (row_id)")
    cats = cats.column(0).to_pylist()
    assert cat not in cats


def test_strict_gate_that_never_passes_exits_1(dec_store, tiny_model, sae_dir, tmp_path, capsys):
    store = tmp_path / "st"
    shutil.copytree(dec_store, store)
    assert main(_args(store, tiny_model, sae_dir, "--epochs", "1", "--max-kl", "1e-9", "--gate", "strict")) == 1
    assert "no epoch passed; nothing exported" in capsys.readouterr().out
    run_id = Store(store).query("SELECT run_id FROM decoders").column(0)[0].as_py()
    assert not (Store(store).run_dir(run_id) / "decoder_best.json").exists()


def test_bad_inputs_fail_before_the_model_loads(dec_store, tiny_model, sae_dir, tmp_path, capsys):
    bogus = str(tmp_path / "no-such-model")  # any error below comes before a model load
    assert main(_args(dec_store, bogus, sae_dir, "--ood-category", "no-such-cat")) == 2
    assert "--ood-category 'no-such-cat' is not a category" in capsys.readouterr().err
    # logits missing for the rows
    nolog = tmp_path / "nolog"
    shutil.copytree(dec_store, nolog)
    shutil.rmtree(Store(nolog).array_path("logits"))
    for p in (Store(nolog).catalog_dir / "array_units").glob("*"):
        if "logits" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    Store(nolog).refresh_catalog()
    assert main(_args(nolog, bogus, sae_dir)) == 2
    assert "have no stored logits" in capsys.readouterr().err
    # an SAE without stored codes
    nocodes = tmp_path / "nocodes"
    ingest_small(nocodes, SMALL)
    assert main(_args(nocodes, bogus, sae_dir)) == 2
    assert "has no stored codes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="takes one layer"):
        DecoderConfig(layers=[1, 2])


def test_bf16_rounded_top_k_above_one_is_renormalized():
    from trainers.decoder.kl import frozen_buckets

    values = torch.tensor([[0.0625, -5.0, -6.0]])  # exp sums past 1 with lse 0: a bf16-rounded top-1
    logp, tail = frozen_buckets(values, torch.zeros(1))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6) and tail.exp().item() < 1e-9
    logp, tail = frozen_buckets(torch.tensor([[-1.0, -2.0]]), torch.zeros(1))  # below 1: untouched
    assert torch.allclose(logp, torch.tensor([[-1.0, -2.0]])) and tail.exp().item() == pytest.approx(
        1 - np.exp(-1) - np.exp(-2), abs=1e-6
    )
