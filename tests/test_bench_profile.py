"""`bench.extract --profile` (bench/extract/profile.py) and the CPU allocator setting it measures
(extractors/model.py (keep_freed_memory)), on a tiny model: the profile counts the ops the model really runs
(7 projections per Llama block, per forward), its per-token figures follow from its own
seconds, and keeping freed memory stops the page faults of a repeated large allocation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench.extract import run as bench_extract
from bench.extract.profile import OTHER, op_table, profiled
from extractors.model import keep_freed_memory


def test_profiled_counts_ops_and_normalises_per_token():
    a = torch.randn(64, 64)

    def work():
        for _ in range(3):
            torch.mm(a, a)
        return torch.add(a, a)

    out, p = profiled(work, tokens=500)
    assert torch.equal(out, a + a)
    assert p.calls("aten::mm") == 3 and p.calls("aten::add") == 1
    assert p.wall_seconds > 0 and p.cpu_seconds >= 0 and p.traced_seconds > 0
    d = p.as_dict(top=2)
    mm = next(o for o in d["ops"] if o["op"] == "aten::mm")
    assert mm["ms_per_1k_tokens"] == pytest.approx(1e6 * p.ops["aten::mm"][0] / 500)
    assert sum(o["share"] for o in d["ops"]) <= 1.0 + 1e-9
    assert len([o for o in d["ops"] if o["op"] != OTHER]) == 2
    text = op_table({"a": p, "b": p}, top=2)
    assert "aten::mm" in text and OTHER in text and text.count("3") >= 2


def test_bench_extract_profile_counts_the_models_projections(tiny_model, tmp_path):
    res = bench_extract.run_bench(
        bench_extract.BenchExtractConfig(
            model=tiny_model,
            layers=[1, 3],
            rows=6,
            unit_tokens=1024,
            disk_mb=8,
            saelens_context=64,
            methods=["packed", "forward_windows", "saelens"],
            threads=1,
            profile=True,
            profile_top=5,
            out=str(tmp_path / "extract.json"),
            progress=False,
        )
    )
    saved = json.loads((tmp_path / "extract.json").read_text())
    assert saved["torch_threads"] == 1 and saved["keep_freed_memory"] == keep_freed_memory()
    prof = saved["profile"]
    assert set(prof) == {"packed", "forward_windows", "saelens"}
    blocks = 4  # stops after layer 3: blocks 0..3, 7 projections (q k v o gate up down) each
    calls = {m: {o["op"]: o["calls"] for o in p["ops"]} for m, p in prof.items()}
    n_packs = res["summary"]["packed_batches"]
    assert calls["packed"]["aten::mm"] == 7 * blocks * (1 + n_packs)  # + the untimed warm-up pass
    assert calls["forward_windows"]["aten::mm"] == 7 * blocks * 2  # warm-up + one batch of windows
    assert calls["saelens"]["aten::mm"] == 7 * blocks  # one batch, no warm-up
    for m, p in prof.items():
        assert p["tokens"] == saved["methods"][m]["tokens"] > 0
        assert p["ms_per_1k_tokens"] == pytest.approx(1e6 * p["wall_seconds"] / p["tokens"])
    assert "forward_windows" in saved["profile_table"] and "aten::mm" in saved["profile_table"]


_FAULTS = """
import resource, sys
import numpy as np
from extractors.model import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "keep")
np.ones(8 << 20).sum()  # a 64 MB block, once, so both runs start alike
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(8 << 20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_repeated_large_blocks():
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = r.stdout.split()
        out[mode] = (applied == "True", int(faults))
    assert out["default"][0] is False and out["keep"][0] is True
    # glibc's default: each 64 MB block is a fresh mmap, faulted in again per pass (at least once
    # per 2 MB page where the kernel backs it with transparent huge pages, 16,384 times without)
    assert out["default"][1] >= 10 * 32
    assert out["keep"][1] < out["default"][1] / 20
