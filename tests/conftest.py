"""Shared fixtures: a tiny random-init model for fast tests, and the real-model stores.

`real_store` runs the real SmolLM2-135M-Instruct over a small slice of the embedded sample
once per session (train_base 120, attr_query 20, eval 20 rows; layers 6 and 17 in one
pass, ~30k tokens, ~45 s on 2 CPU cores); `analytics_store` adds a small TopK SAE on layer
17 with its codes and tables. Tests must treat both as read-only: a test that writes copies
one first (`copy_store`). Converted models go to a temporary cache shared by the session
(`model_cache`), never into $HOME.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REAL_SIZES = {"train_base": 120, "attr_query": 20, "eval": 20}
REAL_LAYERS = [6, 17]


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The model cache of this test session (a temporary folder): every load that does not name
    a cache uses it, and subprocesses get it as --model-cache."""
    import extractors.model as model

    d = tmp_path_factory.mktemp("model_cache")
    mp = pytest.MonkeyPatch()
    mp.setattr(model, "default_cache_dir", lambda: d)
    yield d
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 4-layer, 64-wide random Llama with the real SmolLM2 tokenizer, as a local folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from extractors.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve("embedded").path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def ingest_small(store: Path, sizes: dict[str, int], model: str = "embedded") -> None:
    from extractors.ingest import IngestConfig, run_ingest

    run_ingest(IngestConfig(store=str(store), model=model, **sizes), progress=False)


@pytest.fixture(scope="session")
def sae_dir(tmp_path_factory) -> Path:
    """A random-init TopK SAE for tiny_model's 64-wide residual stream (sae-lens format)."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_sae") / "sae"
    TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8)).save_model(str(d))
    return d


@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> Path:
    """The real model's layers 6 and 17 over 160 rows of the embedded sample (read-only)."""
    from extractors.pipeline import ExtractConfig
    from extractors.pipeline import run_extraction as run

    store = tmp_path_factory.mktemp("real") / "store"
    ingest_small(store, REAL_SIZES)
    run(ExtractConfig(layers=REAL_LAYERS, store=str(store), progress=False))
    return store


@pytest.fixture(scope="session")
def copy_store(tmp_path_factory):
    """copy_store(src) -> a private copy of a store that a test (or a module's fixture) may write to."""

    def _copy(src: Path) -> Path:
        dst = tmp_path_factory.mktemp("store_copy") / "store"
        shutil.copytree(src, dst)
        from store.core import Store

        Store(dst).refresh_catalog()
        return dst

    return _copy


@pytest.fixture(scope="session")
def analytics_store(real_store, tmp_path_factory) -> Path:
    """A copy of real_store with a small TopK SAE on layer 17 (python -m trainers.sae) and its
    codes and tables (python -m extractors.run --kinds sae --sae latest), read-only."""
    from extractors.run import main as extract_main
    from store.core import Store
    from trainers.sae.cli import main as sae_main

    dst = tmp_path_factory.mktemp("analytics") / "sae_store"
    shutil.copytree(real_store, dst)
    Store(dst).refresh_catalog()
    # Through the documented command lines (in-process).
    assert (
        sae_main(
            [
                "--layer",
                "17",
                "--store",
                str(dst),
                "--steps",
                "40",
                "--batch-tokens",
                "512",
                "--d-sae",
                "768",
                "--k",
                "16",
                "--ce-rows",
                "0",
                "--init-batches",
                "2",
                "--log-every",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        extract_main(["--layer", "17", "--kinds", "sae", "--sae", "latest", "--store", str(dst), "--no-progress"]) == 0
    )
    return dst
