"""Gradient norms: equal plain autograd on the real model (two layers, one pass), fill the store
on the unit engine (1-D float32 arrays, values table, token_gradnorms view), resume exactly
after SIGKILL, never touch parameter gradients, and refuse bad arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from extractors.gradnorm import VALUES_TABLE, reference_grad_norms, row_tokens, token_grad_norms
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as run
from extractors.run import main
from store.arrays import committed_set
from store.catalog.tokens import read_layout
from store.core import Store
from store.materialize import gather
from tests.conftest import ingest_small

SMALL = {"train_base": 16, "attr_query": 4, "eval": 4}
REPO = Path(__file__).resolve().parent.parent


def _gradnorm(store, model, layers, **kw):
    return run(ExtractConfig(layers=layers, store=str(store), model=model, kinds=["gradnorm"], progress=False, **kw))


def _raw(store, name):
    return zarr.open_array(str(Store(store).array_path(name)), mode="r")[:]


def _row_values(st: Store, name: str, row_id: str) -> np.ndarray:
    tz = st.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    lay = read_layout(st, tz)
    i = lay.row_ids.index(row_id)
    return gather(st, name, np.arange(lay.tok_starts[i], lay.tok_starts[i] + lay.lengths[i]))


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("gn_small") / "store"
    ingest_small(path, SMALL)
    return path


@pytest.fixture(scope="module")
def tiny_store(small_rows, tiny_model, tmp_path_factory):
    """Gradient norms of layers 1 and 3 of the tiny model over every row (read-only)."""
    dst = tmp_path_factory.mktemp("gn_tiny") / "store"
    shutil.copytree(small_rows, dst)
    _gradnorm(dst, tiny_model, [1, 3], unit_tokens=2048)
    return dst


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_stored_norms_equal_plain_autograd_on_the_real_model(real_store, copy_store):
    """Layers 17 and 24 from one partial backward (batched, padded) = full-model autograd per row."""
    from extractors.model import load_model

    st_path = copy_store(real_store)
    _gradnorm(st_path, "embedded", [17, 24], max_rows=3, batch_tokens=1024)
    st = Store(st_path)
    rows = sorted(committed_set(st, "gradnorm/layer_17"))
    assert len(rows) == 3 and committed_set(st, "gradnorm/layer_24") == set(rows)
    tz = st.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    toks = row_tokens(st, tz, rows)
    lm = load_model("embedded", "cpu")
    for r in rows:
        ids, sup = toks[r]
        ref = reference_grad_norms(lm.model, torch.tensor([ids]), torch.tensor([sup]), [17, 24])
        for L in (17, 24):
            got, want = _row_values(st, f"gradnorm/layer_{L}", r), ref[L][0].numpy()
            assert got.dtype == np.float32 and want.max() > 0.01
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * want.max())
    arr = zarr.open_array(str(st.array_path("gradnorm/layer_17")), mode="r")
    assert arr.ndim == 1 and arr.attrs["kind"] == "gradnorm" and arr.attrs["loss_reduction"] == "sum"


def test_fills_arrays_values_table_and_view(tiny_store):
    st = Store(tiny_store)
    n_tokens = st.query("SELECT count(*) FROM tokens").column(0)[0].as_py()
    for L in (1, 3):
        name = f"gradnorm/layer_{L}"
        arr = zarr.open_array(str(st.array_path(name)), mode="r")
        assert arr.dtype == np.float32 and arr.ndim == 1 and arr.attrs["layer"] == L
        assert len(committed_set(st, name)) == 24
    rec = st.query("SELECT * FROM runs WHERE kind = 'extract_gradnorm'").to_pylist()
    assert len(rec) == 1 and rec[0]["status"] == "finished" and rec[0]["layers"] == [1, 3]
    assert '"rows_without_supervised_tokens": 0' in rec[0]["counts"]
    v = st.query(
        "SELECT g.tok_index, g.grad_norm, g.layer, g.is_supervised, g.role, g.category "
        "FROM token_gradnorms g ORDER BY layer, tok_index"
    ).to_pydict()
    assert len(v["tok_index"]) == 2 * n_tokens
    for L in (1, 3):
        m = np.asarray(v["layer"]) == L
        tok = np.asarray(v["tok_index"])[m]
        np.testing.assert_array_equal(np.asarray(v["grad_norm"], np.float32)[m], gather(st, f"gradnorm/layer_{L}", tok))
    # Tokens after the last supervised one feed no supervised prediction: exactly 0.
    last = st.query(
        "SELECT g.grad_norm FROM token_gradnorms g JOIN (SELECT row_id, max(token_pos) AS p FROM tokens "
        "WHERE is_supervised GROUP BY 1) s ON s.row_id = g.row_id AND g.token_pos >= s.p"
    ).column(0)
    assert max(last.to_pylist()) == 0.0
    sup = st.query("SELECT min(grad_norm) FROM token_gradnorms WHERE is_supervised AND token_pos < 5").column(0)
    assert st.query(f"SELECT count(*) FROM {VALUES_TABLE}").column(0)[0].as_py() == 2 * n_tokens and sup is not None


def test_rerun_is_a_noop_and_resync_follows_new_commits(tiny_store, copy_store, tiny_model, capsys):
    dst = copy_store(tiny_store)
    res = _gradnorm(dst, tiny_model, [1, 3], unit_tokens=2048)
    assert res.skipped and "nothing to do" in capsys.readouterr().out


def test_rows_view_mean_reduction_and_one_pass(small_rows, copy_store, tiny_model):
    """--rows-view keeps the view's rows; mean = sum / supervised count; layer 3 alone equals layer 3
    computed together with layer 1 (the single backward is exact)."""
    dst = copy_store(small_rows)
    view = "SELECT row_id FROM rows WHERE split = 'eval'"
    _gradnorm(dst, tiny_model, [1, 3], unit_tokens=2048, rows_view=view, loss_reduction="mean")
    st = Store(dst)
    want = set(st.query(view).column(0).to_pylist())
    assert committed_set(st, "gradnorm/layer_1") == want
    from extractors.model import load_model

    lm = load_model(tiny_model, "cpu")
    tz = st.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    toks = row_tokens(st, tz, sorted(want))
    for r in sorted(want)[:2]:
        ids, sup = toks[r]
        x, s = torch.tensor([ids]), torch.tensor([sup])
        both = token_grad_norms(lm.model, x, s, [1, 3], "sum")
        alone = token_grad_norms(lm.model, x, s, [3], "sum")
        torch.testing.assert_close(both[3], alone[3], rtol=1e-5, atol=1e-7)
        n_pred = int(s[0, 1:].sum())
        np.testing.assert_allclose(
            _row_values(st, "gradnorm/layer_1", r), both[1][0].numpy() / n_pred, rtol=1e-4, atol=1e-7
        )
    assert all(p.grad is None for p in lm.model.parameters())
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_rows_without_supervised_tokens_get_zero(tiny_model):
    from extractors.model import load_model

    lm = load_model(tiny_model, "cpu")
    x = torch.randint(5, 100, (2, 12))
    sup = torch.zeros(2, 12, dtype=torch.bool)
    sup[1, 0] = True  # a supervised token at position 0 has nothing before it to predict it
    out = token_grad_norms(lm.model, x, sup, [0, 2])
    assert all(float(v.abs().max()) == 0.0 for v in out.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layers", "9", "--kinds", "gradnorm"], "--layer 9 is out of range"),
        (["--layers", "1", "--kinds", "gradnorm", "--rows-view", "SELECT split FROM rows"], "returns no row_id column"),
        (["--layers", "1", "--kinds", "gradnorm", "--rows-view", "SELECT row_id FROM rows WHERE 1 = 0"], "keeps none"),
    ],
)
def test_bad_arguments_give_one_error_line(small_rows, copy_store, tiny_model, argv, message, capsys):
    dst = copy_store(small_rows)
    assert main([*argv, "--store", str(dst), "--model", tiny_model, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.fixture(scope="module")
def lora_folder(tiny_model, tmp_path_factory) -> Path:
    """A real peft LoRA adapter on the tiny model, its B matrices made non-zero (fresh LoRA is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(d)
    return d


def test_adapter_norms_live_beside_the_base(tiny_store, copy_store, tiny_model, lora_folder, capsys):
    from peft import PeftModel

    from extractors.adapters import read_folder
    from extractors.model import load_model

    dst = copy_store(tiny_store)
    _gradnorm(dst, tiny_model, [1, 3], unit_tokens=2048, adapter=str(lora_folder), max_rows=3)
    st = Store(dst)
    name = read_folder(lora_folder).name
    arr = zarr.open_array(str(st.array_path(f"gradnorm/{name}/layer_3")), mode="r")
    assert arr.attrs["adapter"] == name and "+adapter:" in arr.attrs["model_hash"]
    rows = sorted(committed_set(st, f"gradnorm/{name}/layer_3"))
    assert len(rows) == 3
    tz = st.query("SELECT tokenization FROM tokenizations").column(0)[0].as_py()
    ids, sup = row_tokens(st, tz, rows[:1])[rows[0]]
    peft_model = PeftModel.from_pretrained(load_model(tiny_model, "cpu").model, str(lora_folder)).eval()
    peft_model.requires_grad_(False)
    want = reference_grad_norms(peft_model, torch.tensor([ids]), torch.tensor([sup]), [3])[3][0].numpy()
    got = _row_values(st, f"gradnorm/{name}/layer_3", rows[0])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * want.max())
    base = _row_values(st, "gradnorm/layer_3", rows[0])
    assert np.abs(base - got).max() > 1e-3 * want.max()  # the adapter changes the norms
    n = st.query("SELECT count(*) FROM token_gradnorms WHERE adapter = ? AND layer = 3", [name]).column(0)[0].as_py()
    assert n == st.query("SELECT count(*) FROM tokens WHERE row_id IN (SELECT unnest(?))", [rows]).column(0)[0].as_py()
    k = st.query(f"SELECT count(*) FROM token_selection(3, sel_adapter := '{name}')").column(0)[0].as_py()
    assert k > 0
    # an adapter recorded on another base model is refused with one error line
    (lora_folder / "store_adapter.json").write_text(
        json.dumps({"adapter": "other-base", "base_model": "someone/else", "base_hash": "sha256:0000", "run_id": ""})
    )
    try:
        assert (
            main(
                [
                    "--layers",
                    "1",
                    "--kinds",
                    "gradnorm",
                    "--adapter",
                    str(lora_folder),
                    "--store",
                    str(dst),
                    "--model",
                    tiny_model,
                    "--no-progress",
                ]
            )
            == 2
        )
    finally:
        (lora_folder / "store_adapter.json").unlink()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: adapter other-base was trained on someone/else")


def test_bench_gradnorm_measures_every_method(tiny_model, tmp_path):
    from bench.gradnorm import BenchGradnormConfig, run_bench

    res = run_bench(BenchGradnormConfig(model=tiny_model, layers=[1, 3], rows=4, out=str(tmp_path / "g.json")))
    assert set(res["methods"]) == {"forward", "hand", "extract", "reference"}
    assert res["summary"]["max_relative_difference_hand_vs_reference"] < 1e-4
    assert res["summary"]["extract_over_hand"] > 0 and (tmp_path / "g.png").is_file()
