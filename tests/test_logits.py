"""The `logits` kind: top-k next-token logits + log-sum-exp against a plain full-vocabulary forward,
one pass with hidden states (same bytes as hidden alone), rerun no-op, verify clean, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from extractors.logits import logits_array_names, topk_lse
from extractors.model import load_model
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run
from store.arrays import decode
from store.catalog.tokens import read_layout, row_token_ids
from store.core import Store
from store.verify import verify
from tests.conftest import ingest_small

SMALL = {"train_base": 12, "attr_query": 2, "eval": 4}
K = 16


def _extract(store, model, **kw):
    # one batch size throughout: a row's float results may depend on its batch's padded width
    return run(ExtractConfig(store=str(store), model=model, progress=False, logits_k=K, batch_tokens=1024, **kw))


def _raw(store, name):
    return zarr.open_array(str(Store(store).array_path(name)), mode="r")[:]


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("logits_rows") / "store"
    ingest_small(path, SMALL)
    return path


@pytest.fixture(scope="module")
def logits_store(rows_store, tiny_model, tmp_path_factory):
    """logits of every row of the tiny model, alone (small batches: several per unit)."""
    dst = tmp_path_factory.mktemp("logits_only") / "store"
    shutil.copytree(rows_store, dst)
    _extract(dst, tiny_model, kinds=["logits"])
    return dst


def test_topk_and_lse_equal_a_plain_full_vocabulary_forward(logits_store, tiny_model):
    st = Store(logits_store)
    tz = st.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    lay = read_layout(st, tz)
    ids_n, val_n, lse_n = logits_array_names()
    ids, val, lse = _raw(logits_store, ids_n), decode(_raw(logits_store, val_n), "bfloat16"), _raw(logits_store, lse_n)
    assert ids.dtype == np.int32 and ids.shape[1] == K and lse.dtype == np.float32 and lse.ndim == 1
    lm = load_model(tiny_model, "cpu")
    tokens = row_token_ids(st, tz, lay.row_ids)
    checked = 0
    for i, rid in enumerate(lay.row_ids):
        with torch.no_grad():
            ref = lm.model(input_ids=torch.tensor([tokens[rid]])).logits[0].double()  # plain, unpadded, full vocab
        s, n = lay.tok_starts[i], lay.lengths[i]
        ref_val, ref_ids = torch.topk(ref, K, dim=-1)
        ref_lse = torch.logsumexp(ref, -1).numpy()
        assert np.array_equal(ids[s : s + n], ref_ids.numpy().astype(np.int32)), rid
        # bf16 keeps 8 significant bits: a relative error of at most 2^-8 per value
        np.testing.assert_allclose(val[s : s + n], ref_val.numpy(), rtol=2**-8, atol=1e-6)
        np.testing.assert_allclose(lse[s : s + n], ref_lse, rtol=1e-4)
        checked += n
    assert checked == int(sum(lay.lengths)) > 0
    # probabilities from the stored arrays: top-k exact, tail in (0, 1)
    p = np.exp(val[:checked].astype(np.float64) - lse[:checked, None])
    assert (p.sum(-1) < 1).all() and (p.sum(-1) > 0).all()
    attrs = zarr.open_array(str(st.array_path(ids_n)), mode="r").attrs
    assert attrs["k"] == K and attrs["model_hash"] == lm.model_hash and "last_position" in attrs
    meta = st.query("SELECT name, kind FROM arrays WHERE kind = 'logits' ORDER BY name").to_pylist()
    assert [m["name"] for m in meta] == sorted([ids_n, val_n, lse_n])


def test_topk_lse_helper_matches_torch():
    z = torch.randn(5, 300)
    ids, val, lse = topk_lse(z, 7)
    v, i = torch.topk(z, 7)
    assert torch.equal(ids, i.int()) and torch.equal(val, v) and torch.allclose(lse, torch.logsumexp(z, -1))


def test_hidden_and_logits_share_one_pass_with_the_same_bytes(rows_store, logits_store, tiny_model, tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    shutil.copytree(rows_store, both)
    shutil.copytree(rows_store, alone)
    res = _extract(both, tiny_model, kinds=["hidden", "logits"], layers=[1, 3])
    # the logits pass pads its batches (it has not moved to extractors.packing yet): compare with padded hidden
    _extract(alone, tiny_model, kinds=["hidden"], layers=[1, 3], pack="off")
    assert res.counts["rows"] == sum(SMALL.values())
    for L in (1, 3):
        assert np.array_equal(_raw(both, f"hidden/layer_{L}"), _raw(alone, f"hidden/layer_{L}")), L
    for name in logits_array_names():  # with or without hidden, the same bytes
        assert np.array_equal(_raw(both, name), _raw(logits_store, name)), name
    runs = Store(both).query("SELECT kind FROM runs WHERE kind LIKE 'extract%'").column(0).to_pylist()
    assert runs == ["extract_logits"]  # one pass, one run
    again = _extract(both, tiny_model, kinds=["hidden", "logits"], layers=[1, 3])
    assert again.skipped  # rerun: no-op
    problems, _ = verify(Store(both))
    assert problems == [], [p.line() for p in problems]


def test_bad_logits_k_is_refused():
    with pytest.raises(ValueError, match="--logits-k must be positive"):
        ExtractConfig(kinds=["logits"], logits_k=0)
    with pytest.raises(ValueError, match="pass --layer"):
        ExtractConfig(kinds=["hidden", "logits"])
    ExtractConfig(kinds=["logits"])  # logits alone needs no layer
