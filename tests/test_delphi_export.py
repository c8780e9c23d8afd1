"""`--export-delphi`: the tiny store's SAE codes in delphi's latent-cache layout, checked against
the layout delphi's LatentCache.save_splits writes (names, keys, dtypes, shapes), against the
codes read back row by row from the zarr arrays, and loaded by delphi's own LatentDataset; its
DetectionScorer then runs on two features with the tiny random model as the client."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from analytics.label_features.command import main
from extractors.sae.format import code_array_names
from store.arrays import decode, open_array
from store.catalog.tokens import row_token_ids
from store.core import Store
from tests.test_label_features import code_store  # noqa: F401 (the module's store fixture)

CTX = 64


@pytest.fixture(scope="module")
def export(code_store, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("delphi") / "run"
    argv = ["--store", str(code_store), "--export-delphi", str(out), "--delphi-ctx-len", str(CTX)]
    assert main([*argv, "--delphi-splits", "3"]) == 0
    return code_store, out


def test_layout_is_delphis(export):
    store, out = export
    meta = json.loads((out / "export.json").read_text())
    mod = out / "latents" / "layers.2"
    # delphi: boundaries torch.linspace(0, 128, 4).long() = 0, 42, 85, 128; file = first_last
    assert sorted(p.name for p in mod.glob("*.safetensors")) == sorted(
        ["0_41.safetensors", "42_84.safetensors", "85_127.safetensors"]
    )
    cfg = json.loads((mod / "config.json").read_text())
    assert cfg["cache_ctx_len"] == CTX and cfg["n_splits"] == 3 and cfg["model_name"]
    for name in meta["files"]:
        d = load_file(str(mod / name))
        assert set(d) == {"locations", "activations", "tokens"}
        assert d["locations"].dtype == np.uint16 and d["locations"].shape[1] == 3
        assert d["activations"].dtype == np.float16 and len(d["activations"]) == len(d["locations"])
        assert d["tokens"].dtype == np.int64 and d["tokens"].shape == (meta["n_sequences"], CTX)
    assert meta["n_sequences"] == -(-meta["n_tokens"] // CTX)


def test_values_are_the_stored_codes_row_by_row(export):
    store, out = export
    s = Store(store)
    meta = json.loads((out / "export.json").read_text())
    mod = out / "latents" / "layers.2"
    got: dict[tuple[int, int], float] = {}
    tokens = None
    for name in meta["files"]:
        first = int(name.split("_")[0])
        d = load_file(str(mod / name))
        tokens = d["tokens"].reshape(-1)
        for (seq, pos, lat), a in zip(d["locations"].astype(np.int64), d["activations"], strict=True):
            got[(seq * CTX + pos, lat + first)] = float(a)
    idx_arr, val_arr = (open_array(s, n) for n in code_array_names(meta["sae"], 2))
    idx_all, val_all = np.asarray(idx_arr[:]), decode(np.asarray(val_arr[:]), val_arr.attrs["dtype"])
    in_set = set(s.query("SELECT tok_index FROM content_tokens").column(0).to_pylist())
    want: dict[tuple[int, int], float] = {}
    ids = row_token_ids(s, meta["tokenization"], [r["row_id"] for r in meta["rows"]])
    by_row: dict[str, list[int]] = {}
    t = s.query(
        "SELECT row_id, tok_index FROM tokens WHERE tokenization = ? ORDER BY row_id, token_pos", [meta["tokenization"]]
    ).to_pydict()
    for rid, ti in zip(t["row_id"], t["tok_index"], strict=True):
        by_row.setdefault(rid, []).append(ti)
    for r in meta["rows"]:
        toks = by_row[r["row_id"]]
        assert len(toks) == r["length"]
        assert tokens[r["start"] : r["start"] + r["length"]].tolist() == ids[r["row_id"]]
        for j, t in enumerate(toks):
            if t not in in_set:
                continue
            for i, v in zip(idx_all[t], val_all[t], strict=True):
                if v > 0:
                    want[(r["start"] + j, int(i))] = float(np.float16(v))
    assert got.keys() == want.keys() and len(got) == meta["n_active"]
    assert all(got[k] == want[k] for k in want)


def _delphi_without_vllm():
    """delphi's `clients` and `scorers` packages import, in their __init__, every client and
    scorer: vllm (the Offline client), tiktoken (the simulation scorer). The abstract Client and
    the classifier scorers do not: register the two packages without running their __init__."""
    if importlib.util.find_spec("delphi") is None:
        pytest.fail("eai-delphi is not installed: make setup installs it (--no-deps, see the Makefile)")
    import delphi

    for sub in ("clients", "scorers"):
        if f"delphi.{sub}" not in sys.modules:
            pkg = types.ModuleType(f"delphi.{sub}")
            pkg.__path__ = [str(Path(delphi.__file__).parent / sub)]
            sys.modules[f"delphi.{sub}"] = pkg


def test_delphi_loads_the_export_and_scores_it(export, tiny_model):
    _delphi_without_vllm()
    from delphi.clients.client import Client, Response
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents.loader import LatentDataset
    from delphi.scorers.classifier.detection import DetectionScorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, out = export
    meta = json.loads((out / "export.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    feats = [5, 60]  # one in the first split file, one in the second
    ds = LatentDataset(
        out / "latents",
        SamplerConfig(n_examples_train=4, n_examples_test=4, n_quantiles=2),
        ConstructorConfig(min_examples=4, n_non_activating=4, example_ctx_len=16),
        tokenizer=tok,
        modules=["layers.2"],
        latents={"layers.2": torch.tensor(feats)},
    )
    records = sorted(ds, key=lambda r: r.latent.latent_index)
    assert [r.latent.latent_index for r in records] == feats
    n_tokens = meta["n_sequences"] * CTX
    for r in records:
        d = load_file(str(out / "latents" / "layers.2" / meta["files"][0 if r.latent.latent_index < 42 else 1]))
        first = 0 if r.latent.latent_index < 42 else 42
        n_active = int((d["locations"][:, 2].astype(int) + first == r.latent.latent_index).sum())
        assert r.per_token_frequency == pytest.approx(n_active / n_tokens)
        assert len(r.train) == 4 and len(r.test) >= 1 and len(r.not_active) == 4
        assert all(float(e.activations.max()) > 0 for e in r.train)

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    class TinyClient(Client):  # delphi's client interface, answered by a local model
        async def generate(self, prompt, **kwargs):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                g = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            return Response(tok.decode(g[0, ids["input_ids"].shape[1] :]))

    scorer = DetectionScorer(TinyClient("tiny"), n_examples_shown=2)
    for r in records:
        r.explanation = "words about planning"
        res = asyncio.run(scorer(r))
        assert len(res.score) == len(r.test) + len(r.not_active)
        assert sorted(o.activating for o in res.score) == sorted([True] * len(r.test) + [False] * len(r.not_active))
