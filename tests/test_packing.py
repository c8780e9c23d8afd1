"""Packed (padding-free) batches: the plan, the index arithmetic, and activations equal to each
row run alone (tiny random Llama; the real SmolLM2 in one slow case), through the extractor too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from extractors.forward import LayerCapture, pad_batch
from extractors.packing import (
    PackedForward,
    attention_cost,
    pack_index,
    packed_forward,
    plan_packs,
    supports_packing,
    use_packing,
)
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run
from store.core import Store
from tests.conftest import ingest_small


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    m.requires_grad_(False)
    return m


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=n).tolist() for n in lengths]


def _alone(model, rows, layers):
    """The reference: each row alone through transformers, output_hidden_states[L + 1] and the
    final norm's output (hidden_states[-1])."""
    out = []
    with torch.inference_mode():
        for r in rows:
            hs = model(input_ids=torch.tensor([r]), output_hidden_states=True, use_cache=False).hidden_states
            out.append({**{L: hs[L + 1][0] for L in layers}, "norm": hs[-1][0]})
    return out


def test_plan_packs_keeps_order_budget_and_gives_long_rows_their_own_batch():
    lengths = [5, 3, 9, 4, 20, 1]
    order = sorted(range(6), key=lambda i: (lengths[i], i))
    batches = plan_packs(lengths, order, 10)
    assert [i for b in batches for i in b.rows] == order  # every row once, in order
    for b in batches:
        assert b.lengths == [lengths[i] for i in b.rows] and b.width == max(b.lengths)
        assert sum(b.lengths) <= 10 or len(b.rows) == 1
    assert [b.rows for b in batches] == [[5, 1, 3], [0], [2], [4]]  # 1+3+4, then 5 (+9 > 10), 9, 20 alone


def test_pack_index_against_a_hand_written_layout():
    pos, gather, scatter = pack_index([2, 3], 3)
    assert pos.tolist() == [0, 1, 0, 1, 2]  # positions restart per row
    # row 0 = tokens 0,1 (its tail repeats token 1); row 1 = tokens 2,3,4
    assert gather.tolist() == [0, 1, 1, 2, 3, 4]
    assert scatter.tolist() == [0, 1, 3, 4, 5]  # real tokens' places in the [rows * width] layout
    cost = attention_cost(plan_packs([2, 3], [0, 1], 8), packed=True)
    assert cost["attention_pairs_per_token"] == 2 * 6 / 5 and cost["row_attention_pairs_per_token"] == (3 + 6) / 5
    assert cost["dense_slots_per_token"] == 1.0
    assert attention_cost(plan_packs([2, 3], [0, 1], 8), packed=False)["dense_slots_per_token"] == 6 / 5


def test_packed_states_equal_each_row_alone(tiny):
    """Rows of mixed lengths (one token, one longer than the batch budget, a lone-row batch) give
    each row's own states at every captured layer and at the final norm, and the padded path's."""
    rows = _rows([1, 7, 30, 12, 64, 5, 19])
    layers = [0, 2]
    ref = _alone(tiny, rows, layers)
    got: dict[int, dict] = {}
    modules = {"norm": tiny.model.norm}
    for idx, out in packed_forward(tiny, rows, layers, batch_tokens=48, device=torch.device("cpu"), modules=modules):
        offs = np.cumsum([0, *(len(rows[i]) for i in idx)])
        for j, i in enumerate(idx):
            got[i] = {k: v[offs[j] : offs[j + 1]] for k, v in out.items()}
    assert sorted(got) == list(range(len(rows)))
    for i in range(len(rows)):
        for k in (*layers, "norm"):
            torch.testing.assert_close(got[i][k], ref[i][k], rtol=1e-5, atol=1e-5)
    # a single-row batch, stopped early at the deepest layer (no modules)
    with PackedForward(tiny, [0, 2]) as fwd:
        one = fwd.run([rows[4]], torch.device("cpu"))
    torch.testing.assert_close(one[2], ref[4][2], rtol=1e-5, atol=1e-5)
    # the padded path on the same batch: the same values
    with LayerCapture(tiny, [2]) as cap:
        padded = cap.capture(pad_batch([rows[1], rows[3]], 12, 0, torch.device("cpu")))[2]
    with PackedForward(tiny, [2]) as fwd:
        packed = fwd.run([rows[1], rows[3]], torch.device("cpu"))[2]
    torch.testing.assert_close(packed, torch.cat([padded[0, :7], padded[1]]), rtol=1e-6, atol=1e-6)
    assert tiny.config._attn_implementation == "sdpa"  # restored after the packed passes


def test_pack_modes_and_models_that_cannot_pack(tiny):
    assert supports_packing(tiny) and use_packing(tiny, "auto") and not use_packing(tiny, "off")
    with pytest.raises(ValueError, match="--pack 'sometimes'"):
        use_packing(tiny, "sometimes")
    old = tiny.config._attn_implementation
    tiny.config._attn_implementation = "eager"
    try:
        assert not use_packing(tiny, "auto")
        with pytest.raises(ValueError, match="--pack on needs"):
            use_packing(tiny, "on")
    finally:
        tiny.config._attn_implementation = old


def test_extractor_packed_equals_padded_and_reruns_byte_identical(tiny_model, tmp_path):
    """--pack on and --pack off store the same states within bf16 rounding (one unit in the last
    place at most); two packed runs store identical bytes; the run records the packing."""
    base = tmp_path / "rows"
    ingest_small(base, {"train_base": 16, "attr_query": 2, "eval": 2})
    import shutil

    arrays = {}
    for name, pack in (("on", "on"), ("on2", "on"), ("off", "off")):
        shutil.copytree(base, tmp_path / name)
        res = run(
            ExtractConfig(
                layers=[1, 3],
                store=str(tmp_path / name),
                model=tiny_model,
                progress=False,
                pack=pack,
                unit_tokens=1024,
                batch_tokens=300,
            )
        )
        assert res.padding == 0.0 if pack == "on" else res.padding > 0
        st = Store(tmp_path / name)
        arrays[name] = {L: zarr.open_array(str(st.array_path(f"hidden/layer_{L}")), mode="r")[:] for L in (1, 3)}
        cfg = st.query("SELECT config, counts FROM runs").to_pylist()[0]
        assert f'"pack": "{pack}"' in cfg["config"] and f'"packed": {str(pack == "on").lower()}' in cfg["counts"]
    for L in (1, 3):
        assert np.array_equal(arrays["on"][L], arrays["on2"][L])
        a, b = arrays["on"][L].view(np.int16).astype(np.int32), arrays["off"][L].view(np.int16).astype(np.int32)
        assert np.abs(a - b).max() <= 1  # bf16 bit patterns: equal or adjacent


@pytest.mark.slow
def test_real_model_packed_equals_each_row_alone():
    """SmolLM2-135M (fp32 compute, as on CPU): packed layer-6/17 states of 5 rows (one of them cut
    to a single token) equal output_hidden_states of each row alone within bf16 rounding."""
    from extractors.model import load_model

    lm = load_model("embedded")
    tok = lm.tokenizer
    texts = ["The capital of France is Paris.", "2 + 2 = 4, and 3 * 7 = 21.", "Hello", "A " * 40, "x"]
    rows = [tok(t)["input_ids"] for t in texts]
    layers = [6, 17]
    ref = _alone(lm.model, rows, layers)
    with PackedForward(lm.model, layers) as fwd:
        out = fwd.run(rows, lm.device)
    o = 0
    for i, r in enumerate(rows):
        for L in layers:
            got, want = out[L][o : o + len(r)].float(), ref[i][L].float()
            # within bf16 rounding: |diff| <= 2^-8 relative to each element, plus a small floor
            assert torch.all((got - want).abs() <= 2**-8 * want.abs() + 1e-3), (i, L)
        o += len(r)


def test_sae_codes_through_the_packed_path_match_the_stored_states(tiny_model, sae_dir, tmp_path):
    """Codes computed from fresh packed states (--kinds sae alone) are byte-identical to codes of the
    stored packed hidden states (--kinds hidden sae); with --pack off they agree up to rounding."""
    import shutil

    base = tmp_path / "rows"
    ingest_small(base, {"train_base": 12, "attr_query": 2, "eval": 2})
    codes = {}
    for name, kinds, pack in (("stored", ["hidden", "sae"], "on"), ("fresh", ["sae"], "on"), ("off", ["sae"], "off")):
        shutil.copytree(base, tmp_path / name)
        cfg = ExtractConfig(
            layers=[2], kinds=kinds, sae=str(sae_dir), store=str(tmp_path / name), model=tiny_model, progress=False
        )
        cfg.pack = pack
        run(cfg)
        st = Store(tmp_path / name)
        names = st.query("SELECT name FROM arrays WHERE kind = 'sae' ORDER BY name").column(0).to_pylist()
        codes[name] = [zarr.open_array(str(st.array_path(n)), mode="r")[:] for n in names]
        counts = st.query("SELECT counts FROM runs WHERE kind = 'extract_sae'").column(0)[0].as_py()
        assert ('"tokens_from_store": 0' in counts) == (name != "stored")
    for a, b in zip(codes["stored"], codes["fresh"], strict=True):
        assert np.array_equal(a, b)
    idx_on, idx_off = codes["fresh"][0], codes["off"][0]
    assert np.mean(idx_on == idx_off) > 0.97  # rounding can swap near-tied features
