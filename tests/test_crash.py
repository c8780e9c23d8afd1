"""Seeded SIGKILLs over every array kind: a chain of kills on one store ends identical to an
uninterrupted run.

One process runs the documented commands (`python -m extractors.dataset` then
`python -m extractors.run --kinds hidden sae logits gradnorm`: hidden states and logits
from one forward pass, then SAE codes, then gradient norms) on a tiny random model; it is SIGKILLed
at 8 seeded moments: the ingest, the tokenization, then for each kind in turn a seeded
chunk write or unit commit of that kind (so every kind is hit), and two more anywhere (each
rerun starts from what the last left), then run to the end. The store must equal an
uninterrupted run's: arrays byte-identical, catalog tables row-identical (order-independent,
without timestamps and run ids), no leftovers (`*.partial`, temp files, claims), and
`python -m store.verify` clean. (One chain over all kinds costs one set of process starts;
one chain per kind cost CI ~3 minutes more for the same phases.)

Attribution (per-row scores, no arrays) has its own chain of 7 kills: the ingest, the
tokenization, bergson's query side, seeded unit commits and the finalization; its final
tables' Parquet files must be byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from store.core import Store
from store.verify import verify
from tests.store_compare import catalog_rows

REPO = Path(__file__).resolve().parent.parent
KILLS = 7  # attribution: ingest, tokenize, query side, 3 unit commits, finalization
UNIT_KINDS = ("hidden", "logits", "sae", "gradnorm")  # the order they run in (extractors.pipeline)
EXTRA_KILLS = 2  # after one kill per kind, two more at seeded kinds and moments
INGEST = ["--train-base", "32", "--attr-query", "4", "--eval", "4", "--sample-train", "60", "--sample-test", "16"]
VOLATILE = {
    "run_id",
    "created_by_run",
    "last_run",
    "committed_at",
    "created_at",
    "updated_at",
    "quarantined_at",
    "manifest",
    "path",
    "sae_path",
}
DRIVER = (
    "import sys\n"
    "from extractors.dataset import main as ingest\n"
    "from extractors.run import main as extract\n"
    "a = sys.argv[1:]; i = a.index('--')\n"
    "rc = ingest(a[:i])\n"
    "sys.exit(rc or extract(a[i + 1:]))\n"
)


def _kind_args(sae_dir: Path) -> list[str]:
    # Every kind, always: a kind whose module moved fails here (it used to be skipped silently).
    return ["--layers", "2", "--kinds", *UNIT_KINDS, "--sae", str(sae_dir), "--logits-k", "8"]


def _cmd(store: Path, model: str, cache: Path, kind_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-c",
        DRIVER,
        "--store",
        str(store),
        "--model",
        model,
        *INGEST,
        "--",
        "--store",
        str(store),
        "--model",
        model,
        "--unit-tokens",
        "512",
        "--batch-tokens",
        "512",
        "--no-progress",
        "--model-cache",
        str(cache),
        *kind_args,
    ]


def _run_in_process(cmd: list[str]) -> None:
    """What the driver does, in this process (the same functions, without a startup)."""
    from extractors.dataset import main as ingest
    from extractors.run import main as extract

    args = cmd[3:]
    i = args.index("--")
    assert ingest(args[:i]) == 0 and extract(args[i + 1 :]) == 0


def _count(root: Path, sub: str, pattern: str) -> int:
    d = root / sub
    return sum(1 for _ in d.rglob(pattern)) if d.is_dir() else 0


def _trigger(store: Path, phase: str, rng: random.Random):
    """A function that is true once the chosen moment of the chain has come: `ingest`,
    `tokenize`, or `write:KIND` / `commit:KIND` (a seeded number of that kind's chunk files
    or unit commits past the count now)."""
    if phase == "ingest":
        return lambda: (store / "catalog" / "rows").is_dir()
    if phase == "tokenize":
        return lambda: (store / "catalog" / "tokens").is_dir()
    what, kind = phase.split(":")
    sub, pattern = (f"arrays/{kind}", "c/*") if what == "write" else ("catalog/array_units", f"{kind}__*/*.parquet")
    target = _count(store, sub, pattern) + rng.randint(1, 3)
    return lambda: _count(store, sub, pattern) >= target


def _phases(rng: random.Random) -> list[str]:
    """ingest, tokenize, then a seeded write or commit of each kind in the order the kinds run,
    with EXTRA_KILLS more among the first three."""
    kinds = sorted([*UNIT_KINDS, *rng.choices(UNIT_KINDS[:3], k=EXTRA_KILLS)], key=UNIT_KINDS.index)
    return ["ingest", "tokenize", *(f"{rng.choice(['write', 'commit'])}:{k}" for k in kinds)]


def _kill_chain(store: Path, cmd: list[str], phases: list[str], rng: random.Random) -> list[str]:
    """SIGKILL cmd at each phase in turn (rerunning it after each); returns the phases hit."""
    hits: list[str] = []
    for phase in phases:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        fire, t0 = _trigger(store, phase, rng), time.monotonic()
        while proc.poll() is None and not fire():
            assert time.monotonic() - t0 < 300, "the chain hangs"
            time.sleep(0.002)
        assert proc.poll() is None, f"{phase}: the run ended before the kill ({proc.stderr.read().decode()[-2000:]})"
        time.sleep(rng.uniform(0.0, 0.02))  # land anywhere between two events
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hits.append(phase)
    return hits


def _tables(store: Path) -> dict[str, list[tuple]]:
    return catalog_rows(store, VOLATILE)


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = store / "arrays"
    return {
        str(p.parent.relative_to(root)): zarr.open_array(str(p.parent), mode="r")[:]
        for p in root.rglob("zarr.json")
        if json.loads(p.read_text()).get("node_type") == "array"
    }


@pytest.mark.slow  # ~80 s on 2 cores
def test_seeded_kills_end_identical_to_an_uninterrupted_run(tmp_path, tiny_model, model_cache, sae_dir):
    args = _kind_args(sae_dir)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run_in_process(_cmd(clean, tiny_model, model_cache, args))  # the uninterrupted reference
    rng = random.Random(1)
    phases = _phases(rng)
    hits = _kill_chain(killed, _cmd(killed, tiny_model, model_cache, args), phases, rng)
    assert hits == phases and len(hits) == 2 + len(UNIT_KINDS) + EXTRA_KILLS, hits
    subprocess.run(_cmd(killed, tiny_model, model_cache, args), cwd=REPO, check=True, capture_output=True)
    a, b = _arrays(clean), _arrays(killed)
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert _tables(clean) == _tables(killed)
    assert not list(killed.rglob("*.partial")) and not list(killed.rglob(".*.tmp"))
    assert not list((killed / "claims").rglob("*.json")) if (killed / "claims").is_dir() else True
    problems, _ = verify(Store(killed))
    assert problems == [], [p.line() for p in problems]


# ---- attribution: the pool scored in units (extractors.attribution), on a LoRA adapter folder ----
ATTR_ROWS = 12  # pool rows, one per unit: room for the seeded commit kills
ATTR_ARGS = ["--kinds", "attribution", "--max-rows", str(ATTR_ROWS), "--query-max-rows", "2", "--unit-rows", "1"]
ATTR_ARGS += ["--score-mode", "individual", "--subset-k", "3"]  # both tables, the subset; query preconditioning
ATTR_PHASES = ["ingest", "tokenize", "query", "commit", "commit", "commit", "final"]  # KILLS of them


def _attr_trigger(store: Path, phase: str, rng: random.Random):
    units = lambda: _count(store, "catalog/attribution_scores", "u*.parquet")  # noqa: E731
    if phase == "query":  # bergson's Hessian or query step in progress
        return lambda: next(store.glob("runs/attribution-*/bergson/*.part"), None) is not None
    if phase == "final":  # every unit committed: the ranks and the subset are being written
        return lambda: units() >= ATTR_ROWS
    if phase == "commit":
        target = units() + rng.randint(1, 3)
        return lambda: units() >= target
    return _trigger(store, phase, rng)


@pytest.mark.slow  # ~60 s on 2 cores
def test_seeded_kills_of_attribution_end_identical_to_an_uninterrupted_run(tmp_path, tiny_model, model_cache):
    from tests.test_attribution_units import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "adapter")  # named by its weights: the same in both stores
    args = [*ATTR_ARGS, "--adapter", str(adapter)]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _run_in_process(_cmd(clean, tiny_model, model_cache, args))
    cmd, rng, hits = _cmd(killed, tiny_model, model_cache, args), random.Random(5), []
    for phase in ATTR_PHASES:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        fire, t0 = _attr_trigger(killed, phase, rng), time.monotonic()
        while proc.poll() is None and not fire():
            assert time.monotonic() - t0 < 300, "the chain hangs"
            time.sleep(0.002)
        assert proc.poll() is None, f"{phase}: the run ended before the kill ({proc.stderr.read().decode()[-2000:]})"
        time.sleep(rng.uniform(0.0, 0.02))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hits.append(phase)
    assert len(hits) == KILLS
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert _tables(clean) == _tables(killed) and _tables(clean)["attribution_pairs"]
    for table in ("attribution_scores", "attribution_pairs", "subsets"):
        a, b = (sorted((s / "catalog" / table).rglob("*.parquet")) for s in (clean, killed))
        assert [p.relative_to(clean) for p in a] == [p.relative_to(killed) for p in b] and a, table
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True)), table  # byte-identical
    assert Store(killed).query("SELECT bool_and(complete) FROM attribution_scores").column(0)[0].as_py()
    assert not list(killed.rglob("*.partial")) and not list(killed.rglob(".*.tmp"))
    assert not list((killed / "claims").rglob("*.json"))
    problems, _ = verify(Store(killed))
    assert problems == [], [p.line() for p in problems]
