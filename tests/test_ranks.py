"""Ranks in CI: extraction on N CPU ranks writes the store a single process writes.

One command extracts all three unit-engine kinds of layer 2 of a tiny random model
(`--kinds hidden sae gradnorm`: hidden states, then the codes of a tiny TopK SAE, then
per-token gradient norms) over a small ingested store (40 rows, ~7.4k tokens, 512-slot
units: 19 units). The reference is that command run by one process.

* `torchrun --nproc-per-node 2 -m extractors.run ...` (the documented command; rank 0
  tokenizes, each rank computes the units `unit % 2 == rank` of every kind) must equal
  the 1-rank store: every chunk file byte-identical, every `zarr.json` identical but for
  the run id in an array's attributes, every catalog table row-identical
  order-independently without the VOLATILE columns below, and the runs table holding one
  finished record per rank and kind whose counts add up to the 1-rank run's.
* a chain of runs with ranks SIGKILLed right after their first new unit commit of one
  kind, each rerun with a different number of ranks: 3 ranks (rank 1 killed in its hidden
  states, rank 2 in its SAE codes), then 2 (rank 1 killed in its gradient norms), then 1
  to finish, must end equal to the 1-rank store too, with no claims or
  `*.partial` files left and `python -m store.verify` clean. Those ranks are plain
  processes with RANK/WORLD_SIZE set, which is all torchrun gives them: the pipeline needs
  no process group (ranks coordinate through the store: claims and commits).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from store.core import Store
from store.verify import verify
from tests.store_compare import catalog_rows

REPO = Path(__file__).resolve().parent.parent
INGEST = ["--train-base", "32", "--attr-query", "4", "--eval", "4", "--sample-train", "60", "--sample-test", "16"]
UNIT_ARGS = ["--unit-tokens", "512", "--batch-tokens", "512", "--no-progress"]
# Columns that legitimately differ between a 1-rank and an N-rank store, and nothing else:
# run ids (each rank has its own run record) and the wall-clock times of commits/records.
RUN_ID_COLUMNS = {"run_id", "created_by_run", "last_run"}
TIME_COLUMNS = {"committed_at", "created_at", "updated_at"}
VOLATILE = RUN_ID_COLUMNS | TIME_COLUMNS
# The runs table is compared separately: one row per rank and kind (with its host, pid, times).
KINDS = {"hidden": "extract_hidden", "sae": "extract_sae", "gradnorm": "extract_gradnorm"}  # kind -> run kind
# The chain: (ranks of the run, {rank to kill: the kind in which it is killed}); then 1 rank finishes.
CHAIN = [(3, {1: "hidden", 2: "sae"}), (2, {1: "gradnorm"})]
TIMEOUT = 240


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_model) -> Path:
    """A store with the small sample ingested (not yet tokenized): copied for every run."""
    from extractors.dataset import main as ingest

    root = tmp_path_factory.mktemp("ranks") / "ingested"
    assert ingest(["--store", str(root), "--model", tiny_model, *INGEST]) == 0
    return root


def _fresh(ingested: Path, dst: Path) -> Path:
    shutil.copytree(ingested, dst)
    Store(dst).refresh_catalog()
    return dst


def _args(store: Path, model: str, cache: Path, sae_dir: Path) -> list[str]:
    return [
        "--store",
        str(store),
        "--model",
        model,
        "--model-cache",
        str(cache),
        *UNIT_ARGS,
        "--layers",
        "2",
        "--kinds",
        "hidden",
        "sae",
        "gradnorm",
        "--sae",
        str(sae_dir),
    ]


@pytest.fixture(scope="module")
def reference(ingested, tmp_path_factory, tiny_model, model_cache, sae_dir) -> Path:
    """The 1-rank store (in this process)."""
    from extractors.run import main as extract

    st = _fresh(ingested, tmp_path_factory.mktemp("ranks_ref") / "store")
    assert extract(_args(st, tiny_model, model_cache, sae_dir)) == 0
    assert {c.split("/")[0].split("__")[0] for c in _commits(st)} == {"hidden", "sae", "gradnorm"}
    return st


def _launch(args: list[str], rank: int, world_size: int) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
    return subprocess.Popen(
        [sys.executable, "-m", "extractors.run", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_ok(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            _, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
        assert p.returncode == 0, err.decode()[-3000:]


def _commits(store: Path) -> set[str]:
    """`<array key>/u<unit>` of every unit commit file (catalog/array_units/<array key>/u*.parquet)."""
    d = store / "catalog" / "array_units"
    return {f"{f.parent.name}/{f.stem}" for f in d.glob("*/u*.parquet")} if d.is_dir() else set()


def _unit(commit: str) -> int:
    return int(commit.rsplit("/u", 1)[1])


def _chunk_files(store: Path) -> dict[str, bytes]:
    """Every file under arrays/ but the metadata (zarr.json), by relative path: the chunks."""
    root = store / "arrays"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def _metadata(store: Path) -> dict[str, dict]:
    """Every zarr.json under arrays/ (groups and arrays), without the run id in an array's
    attributes (it names the run record of the rank that created the array)."""
    out = {}
    for p in sorted((store / "arrays").rglob("zarr.json")):
        meta = json.loads(p.read_text())
        meta.get("attributes", {}).pop("run_id", None)
        out[str(p.relative_to(store / "arrays"))] = meta
    return out


def _tables(store: Path) -> dict[str, list[tuple]]:
    return catalog_rows(store, VOLATILE)


def _runs(store: Path) -> list[dict]:
    return (
        Store(store)
        .query(
            "SELECT kind, rank, world_size, status, counts FROM runs WHERE kind LIKE 'extract_%' ORDER BY started_at"
        )
        .to_pylist()
    )


def assert_same_store(ref: Path, other: Path) -> None:
    a, b = _chunk_files(ref), _chunk_files(other)
    assert sorted(a) == sorted(b) and a
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} of {len(a)} chunk files differ, e.g. {differ[:3]}"
    assert _metadata(ref) == _metadata(other)
    ta, tb = _tables(ref), _tables(other)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], name
    assert not list(other.rglob("*.partial")) and not list(other.rglob(".*.tmp"))
    claims_dir = other / "claims"
    assert not (claims_dir.is_dir() and list(claims_dir.rglob("*.json")))
    problems, _ = verify(Store(other))
    assert problems == [], [p.line() for p in problems]


def test_torchrun_two_ranks_write_the_one_rank_store(reference, ingested, tmp_path, tiny_model, model_cache, sae_dir):
    st = _fresh(ingested, tmp_path / "two")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "extractors.run",
            *_args(st, tiny_model, model_cache, sae_dir),
        ],
        cwd=REPO,
        # torchrun sets OMP_NUM_THREADS=1 unless it is set; the CPU backward of the gradient norms
        # sums in a thread-count-dependent order, so the ranks get the reference's thread count.
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert_same_store(reference, st)
    one, two = _runs(reference), _runs(st)
    for kind in KINDS.values():
        mine1 = [r for r in one if r["kind"] == kind]
        mine2 = [r for r in two if r["kind"] == kind]
        assert [(r["rank"], r["world_size"], r["status"]) for r in mine1] == [(0, 1, "finished")], kind
        assert sorted((r["rank"], r["world_size"], r["status"]) for r in mine2) == [
            (0, 2, "finished"),
            (1, 2, "finished"),
        ], kind
        c1, c2 = json.loads(mine1[0]["counts"]), [json.loads(r["counts"]) for r in mine2]
        for key in ("rows", "tokens", "units"):
            assert sum(c[key] for c in c2) == c1[key], (kind, key)
        assert all(c["units"] > 0 for c in c2), kind  # both ranks did work


def test_ranks_killed_in_each_kind_then_rerun_with_other_n(
    reference, ingested, tmp_path, tiny_model, model_cache, sae_dir
):
    st = _fresh(ingested, tmp_path / "killed")
    args = _args(st, tiny_model, model_cache, sae_dir)
    want = _commits(reference)
    for n, victims in CHAIN:
        before = _commits(st)
        procs = [_launch(args, r, n) for r in range(n)]

        def hit(rank: int, kind: str, n: int = n, before: set[str] = before) -> bool:  # new commit, rank's unit
            return any(c.startswith(kind + "__") and _unit(c) % n == rank for c in _commits(st) - before)

        t0, left = time.monotonic(), dict(victims)
        while left:
            for rank, kind in list(left.items()):
                assert procs[rank].poll() is None, f"rank {rank} of {n} finished before it could be killed in {kind}"
                if hit(rank, kind):
                    os.killpg(procs[rank].pid, signal.SIGKILL)
                    procs[rank].wait()
                    del left[rank]
            assert time.monotonic() - t0 < TIMEOUT, f"ranks {sorted(left)} of {n} never committed"
            time.sleep(0.002)
        _wait_ok([p for r, p in enumerate(procs) if r not in victims])  # the others finish their own units
        missing = want - _commits(st)
        assert _commits(st) <= want and {_unit(c) % n for c in missing} <= set(victims), (n, victims)
        for rank, kind in victims.items():
            assert any(c.startswith(kind + "__") and _unit(c) % n == rank for c in missing), (
                f"the kill of rank {rank} in {kind} left nothing to resume"
            )
    from extractors.run import main as extract

    assert extract(args) == 0  # 1 rank finishes the rest
    assert _commits(st) == want
    assert_same_store(reference, st)
    runs = _runs(st)
    killed = [(r["world_size"], r["kind"]) for r in runs if r["status"] == "running"]
    assert sorted(killed) == sorted((n, KINDS[k]) for n, v in CHAIN for k in v.values())  # stays 'running'
    assert all(r["status"] in ("finished", "running") for r in runs)


def test_each_rank_of_a_node_takes_its_own_gpu():
    """Under torchrun, --device auto/cuda maps LOCAL_RANK to a GPU (never every rank on cuda:0);
    an explicit cuda:N is kept. (The mapping alone: this machine has no GPU.)"""
    from extractors.model import rank_cuda_device
    from extractors.pipeline import ExtractConfig

    assert [rank_cuda_device("auto", r, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert rank_cuda_device("cuda", 5, 4) == "cuda:1"  # more ranks than GPUs: shared round-robin
    assert rank_cuda_device("cuda:2", 0, 4) == "cuda:2"
    assert rank_cuda_device("auto", None, 4) == "cuda" and rank_cuda_device("cuda", None, 4) == "cuda"
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCAL_RANK", "3")
    try:
        assert ExtractConfig(layers=[1]).local_rank == 3
        assert ExtractConfig(layers=[1], local_rank=0).local_rank == 0
    finally:
        mp.undo()
