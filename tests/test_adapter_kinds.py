"""`--adapter` on every kind that runs the model: hidden states and SAE codes of base + a LoRA
adapter land beside the base arrays on the same token axis (hidden/<adapter>/layer_L,
sae/<sae>/<adapter>/layer_L/...), equal a plain peft forward, differ from the base, are not mixed
into the SAE catalog tables, and a bad adapter is refused with one error line before anything runs.
A tiny random Llama with a random LoRA adapter (made here) keeps every case a few seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from extractors.adapters import AdapterRef, write_adapter_record
from extractors.gradnorm import row_tokens
from extractors.model import resolve
from extractors.run import main
from extractors.sae.format import code_array_names, decode_codes, encode_topk
from extractors.sae.load import load_local
from store.arrays import committed_set, decode, encode
from store.catalog.tokens import read_layout, tokenizations
from store.core import Store
from store.materialize import gather
from tests.conftest import ingest_small

SIZES = {"train_base": 8, "attr_query": 2, "eval": 2}
ADAPTER = "lora-kinds"  # its name in the adapters table
LAYERS = [1, 2]  # not the last block: hidden_states[L + 1] of a plain forward is block L's output there


def _run(store: Path, tiny_model: str, *argv: str) -> int:
    return main([*argv, "--store", str(store), "--model", tiny_model, "--unit-tokens", "2048", "--no-progress"])


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory) -> Path:
    """A peft LoRA adapter on the tiny model, its B matrices non-zero (a fresh LoRA is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("lora_kinds") / "adapter"
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def adapted(tiny_model, lora, sae_dir, tmp_path_factory) -> Path:
    """Base and adapter hidden states of LAYERS and SAE codes at layer 1 over every row (read-only);
    the adapter is registered in the adapters table the way trainers.finetune registers one."""
    store = tmp_path_factory.mktemp("adapter_kinds") / "store"
    ingest_small(store, SIZES, model=tiny_model)
    src = resolve(tiny_model)
    write_adapter_record(Store(store), AdapterRef(ADAPTER, str(lora), src.model_id, src.model_hash, ""), lora_r=4)
    layers = ["--layers", *map(str, LAYERS)]
    assert _run(store, tiny_model, *layers) == 0
    # half the rows' adapter states first: the codes then come from stored states and from the model
    assert _run(store, tiny_model, *layers, "--adapter", "latest", "--max-rows", "6") == 0
    sae = ["--layer", "1", "--kinds", "sae", "--sae", str(sae_dir)]
    assert _run(store, tiny_model, *sae) == 0
    assert _run(store, tiny_model, *sae, "--adapter", ADAPTER) == 0
    assert _run(store, tiny_model, *layers, "--adapter", "latest") == 0
    return store


def _layout(st: Store):
    return read_layout(st, tokenizations(st)[0]["tokenization"])


def _tokens(layout, row: str) -> np.ndarray:
    i = layout.row_ids.index(row)
    return np.arange(layout.tok_starts[i], layout.tok_starts[i] + layout.lengths[i])


@pytest.fixture(scope="module")
def peft_model(tiny_model, lora):
    """The reference: plain peft on plain transformers, nothing of ours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(lora)).eval()


def _peft_states(model, ids: list[int]) -> dict[int, np.ndarray]:
    """Block L's output per token from a plain PeftModel forward (fp32, one unpadded row)."""
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return {L: hs[L + 1][0].numpy() for L in LAYERS}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_adapter_states_equal_a_plain_peft_forward_and_differ_from_the_base(adapted, peft_model):
    st = Store(adapted)
    layout = _layout(st)
    rows = sorted(committed_set(st, "hidden/layer_1"))
    for L in LAYERS:
        base, ours = f"hidden/layer_{L}", f"hidden/{ADAPTER}/layer_{L}"
        a = zarr.open_array(str(st.array_path(ours)), mode="r")
        assert a.shape == zarr.open_array(str(st.array_path(base)), mode="r").shape  # the same token axis
        assert a.attrs["adapter"] == ADAPTER and a.attrs["model_hash"].endswith(
            "+adapter:sha256:" + a.attrs["model_hash"].rsplit(":", 1)[-1]
        )
        assert committed_set(st, ours) == set(rows) and len(rows) == sum(SIZES.values())
    ids = row_tokens(st, layout.tokenization, rows[:3])
    for r in rows[:3]:
        want = _peft_states(peft_model, ids[r][0])
        for L in LAYERS:
            got = gather(st, f"hidden/{ADAPTER}/layer_{L}", _tokens(layout, r))
            base = gather(st, f"hidden/layer_{L}", _tokens(layout, r))
            assert _cosines(got, want[L]).min() >= 0.9999
            rel = np.linalg.norm(got - base, axis=1) / np.linalg.norm(base, axis=1)
            assert np.median(rel) > 0.05, f"layer {L}: the adapter barely changes the states"
    arrays = st.query("SELECT name, adapter FROM arrays WHERE kind = 'hidden'").to_pylist()
    assert {r["name"]: r["adapter"] for r in arrays} == {
        **{f"hidden/layer_{L}": None for L in LAYERS},
        **{f"hidden/{ADAPTER}/layer_{L}": ADAPTER for L in LAYERS},
    }
    runs = st.query("SELECT model_id FROM runs WHERE kind = 'extract_hidden' ORDER BY started_at").column(0).to_pylist()
    assert "+adapter:" not in runs[0] and all(m.endswith(f"+adapter:{ADAPTER}") for m in runs[1:])


def test_adapter_sae_codes_are_the_codes_of_the_adapter_states(adapted, tiny_model, peft_model, sae_dir, capsys):
    """Codes from stored adapter states (6 rows) and from the adapter model (the rest) both equal the
    SAE's top-k of a plain peft forward; they are not the base codes; no catalog table holds them."""
    st = Store(adapted)
    layout = _layout(st)
    sae = load_local(Path(sae_dir))
    idx_name, val_name = code_array_names(sae.name, 1, ADAPTER)
    assert idx_name == f"sae/{sae.name}/{ADAPTER}/layer_1/indices"
    base_idx, base_val = code_array_names(sae.name, 1)
    a = zarr.open_array(str(st.array_path(val_name)), mode="r")
    assert a.shape == zarr.open_array(str(st.array_path(base_val)), mode="r").shape
    assert a.attrs["adapter"] == ADAPTER and "+adapter:" in a.attrs["model_hash"]
    rows = sorted(committed_set(st, idx_name))
    assert rows == sorted(committed_set(st, base_idx)) and len(rows) == sum(SIZES.values())
    ids = row_tokens(st, layout.tokenization, rows)
    for r in rows:
        tok = _tokens(layout, r)
        X = decode(encode(_peft_states(peft_model, ids[r][0])[1], "bf16"), "bfloat16")  # as stored
        ref_idx, ref_val, _ = encode_topk(sae.sae, torch.from_numpy(X), sae.k)
        got = decode_codes(sae.sae, gather(st, idx_name, tok), gather(st, val_name, tok)).numpy()
        want = decode_codes(sae.sae, ref_idx, ref_val).numpy()
        base = decode_codes(sae.sae, gather(st, base_idx, tok), gather(st, base_val, tok)).numpy()
        assert _cosines(got, want).min() >= 0.9999
        assert np.median(np.linalg.norm(got - base, axis=1) / np.linalg.norm(base, axis=1)) > 0.05
    # the catalog tables describe the base codes only: nothing keyed by the adapter was added
    n = st.query("SELECT count(*) AS n, count(DISTINCT sae) AS saes FROM sae_sample_stats").to_pylist()
    assert n == [{"n": len(rows), "saes": 1}]
    arrays = st.query("SELECT name, adapter FROM arrays WHERE kind = 'sae' AND adapter IS NOT NULL").to_pylist()
    assert sorted(r["name"] for r in arrays) == sorted([idx_name, val_name])
    # rerun: a no-op that says why the adapter codes have no tables
    assert _run(adapted, tiny_model, "--layer", "1", "--kinds", "sae", "--sae", str(sae_dir), "--adapter", ADAPTER) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "no catalog tables for" in out


def test_one_command_runs_every_kind_on_the_adapter(adapted, copy_store, tiny_model):
    """--kinds hidden gradnorm --adapter: both kinds on base + adapter, no base array written."""
    dst = copy_store(adapted)
    st = Store(dst)
    before = set(st.query("SELECT name FROM arrays").column(0).to_pylist())
    argv = ["--layer", "3", "--kinds", "hidden", "gradnorm", "--adapter", ADAPTER, "--max-rows", "2"]
    assert _run(dst, tiny_model, *argv) == 0
    st.refresh_catalog()
    added = set(st.query("SELECT name FROM arrays").column(0).to_pylist()) - before
    assert added == {f"hidden/{ADAPTER}/layer_3", f"gradnorm/{ADAPTER}/layer_3"}
    assert st.query("SELECT DISTINCT adapter FROM token_gradnorms").column(0).to_pylist() == [ADAPTER]


@pytest.mark.parametrize(
    "adapter, message",
    [
        ("nope", "error: --adapter 'nope' is neither a name in the store's adapters table"),
        ("other-base", "error: adapter other-base was trained on someone/else"),
    ],
)
def test_a_bad_adapter_is_refused_with_one_error_line(adapted, copy_store, tiny_model, lora, adapter, message, capsys):
    dst = copy_store(adapted)
    st = Store(dst)
    write_adapter_record(st, AdapterRef("other-base", str(lora), "someone/else", "sha256:0000", ""))
    before = st.query("SELECT count(*) FROM runs").column(0).to_pylist()
    assert _run(dst, tiny_model, "--layer", "3", "--adapter", adapter) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)
    assert st.query("SELECT count(*) FROM runs").column(0).to_pylist() == before  # refused before any run started
