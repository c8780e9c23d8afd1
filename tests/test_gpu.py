"""The CUDA path end to end (device-resident unit buffers, pinned host pool, events, two
writer threads, bf16 compute): skipped without CUDA (tests/conftest.py marks `gpu` tests).

On one GPU the staging path must not change a byte: resident staging with two writers writes
what plain host staging with one writer writes. Against the CPU path (fp32 compute) the
stored bf16 states agree to bf16 precision; bytes differ only where the two devices' kernels
round differently.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from extractors.pipeline import ExtractConfig, run_extraction
from store.core import Store
from tests.conftest import ingest_small

pytestmark = pytest.mark.gpu

SIZES = {"train_base": 24, "attr_query": 4, "eval": 4}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "store"
    ingest_small(path, SIZES)
    return path


def _run(src, copy_store, model, **kw):
    store = copy_store(src)
    run_extraction(ExtractConfig(layers=[1, 3], store=str(store), model=model, unit_tokens=1024, progress=False, **kw))
    return {L: zarr.open_array(str(Store(store).array_path(f"hidden/layer_{L}")), mode="r")[:] for L in (1, 3)}


def test_cuda_staging_writes_the_bytes_of_host_staging(ingested, copy_store, tiny_model):
    resident = _run(ingested, copy_store, tiny_model, device="cuda", resident=True, writers=2)
    host = _run(ingested, copy_store, tiny_model, device="cuda", resident=False, writers=1)
    for L in (1, 3):
        assert resident[L].any() and np.array_equal(resident[L], host[L])


def test_cuda_bf16_states_match_the_cpu_path(ingested, copy_store, tiny_model):
    gpu = _run(ingested, copy_store, tiny_model, device="cuda", compute_dtype="fp32")
    cpu = _run(ingested, copy_store, tiny_model, device="cpu")
    for L in (1, 3):
        a = (gpu[L].astype(np.uint32) << 16).view(np.float32)
        b = (cpu[L].astype(np.uint32) << 16).view(np.float32)
        assert np.mean(gpu[L] == cpu[L]) > 0.9  # most bf16 values are bit-identical
        assert np.allclose(a, b, rtol=2**-7, atol=1e-3)
