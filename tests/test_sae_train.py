"""SAE training that users can leave running: checkpoints with exact resume (a real SIGKILL),
the KL splice and the QA gate, and the layer sweep. CPU, on copies of the session's
`real_store` (real SmolLM2 layers 6 and 17), with tiny SAEs (d_sae 128-256, tens to a few
hundred steps of 128-256 tokens).

Bit-exact resume on CPU needs nothing special: training draws no random numbers after the
seeded initialization (the token order is the stored permutation) and the two runs compared
here run the same code with the same (default) torch thread count, so every reduction is
summed in the same order. The checkpoint restores the RNG state anyway, and evaluations run
inside `torch.random.fork_rng`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from store.core import Store

pytestmark = pytest.mark.slow  # the real SmolLM2 model: every test here reads real_store

ROOT = Path(__file__).resolve().parent.parent


def _cmd(store: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainers.sae",
        "--layer",
        "17",
        "--store",
        str(store),
        "--steps",
        "300",
        "--batch-tokens",
        "128",
        "--d-sae",
        "256",
        "--k",
        "8",
        "--ce-rows",
        "0",
        "--checkpoint-every",
        "25",
        "--eval-tokens",
        "512",
        "--init-batches",
        "2",
        "--log-every",
        "25",
        "--no-progress",
        "--qa",
        "off",
        *extra,
    ]


def _train_runs(store: Path) -> dict[str, str]:
    st = Store(store)
    st.refresh_catalog()
    return {
        r["run_id"]: r["status"]
        for r in st.query("SELECT run_id, status FROM runs WHERE kind = 'train_sae'").to_pylist()
    }


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "sae" / "sae_weights.safetensors")


def test_sigkill_then_same_command_resumes_bit_for_bit(real_store, copy_store, model_cache):
    store = copy_store(real_store)
    base = _cmd(store, "--model-cache", str(model_cache))
    done = subprocess.run([*base, "--resume", "never"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref_id,) = _train_runs(store)

    proc = subprocess.Popen(base, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, killed_id = time.time(), None
    try:
        while time.time() - t0 < 240 and proc.poll() is None:
            for d in (store / "runs").glob("train_sae-*"):
                if d.name != ref_id and list((d / "checkpoints").glob("step_*.json")):
                    killed_id = d.name
            if killed_id:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill: no cleanup, no finally blocks
    finally:
        proc.wait(timeout=30)
    assert killed_id and proc.returncode == -signal.SIGKILL
    assert _train_runs(store)[killed_id] == "running"  # the record stays as the kill left it
    assert not (store / "runs" / killed_id / "sae").exists()

    again = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert set(_train_runs(store)) == {ref_id, killed_id}  # it continued the killed run, no third run
    rec = json.loads((store / "runs" / killed_id / "metrics.json").read_text())
    assert 0 < rec["counts"]["resumed_from_step"] < 300
    want, got = _weights(store / "runs" / ref_id), _weights(store / "runs" / killed_id)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from the uninterrupted run"
    # The best checkpoint by held-out EV is kept and tagged, and both runs agree on it.
    best = [json.loads((store / "runs" / r / "checkpoints" / "best.json").read_text()) for r in (ref_id, killed_id)]
    assert best[0] == best[1] and (store / "runs" / killed_id / "checkpoints" / best[0]["checkpoint"]).is_file()
    evals = json.loads((store / "runs" / killed_id / "curves.json").read_text())["evals"]
    assert [e["step"] for e in evals] == list(range(25, 301, 25))


def test_kl_of_identity_splice_is_zero_and_of_zero_splice_is_large(real_store):
    from extractors.model import load_model
    from store.arrays import open_array
    from store.materialize import select
    from trainers.sae.eval import splice_ce
    from trainers.sae.run import SAETrainConfig, _ce_inputs
    from trainers.sae.train import split_sql

    store = Store(real_store)
    frame = select(store, split_sql(store, "content_tokens", "eval"), "hidden/layer_17")
    attrs = dict(open_array(store, "hidden/layer_17").attrs)
    rows, pos = _ce_inputs(store, frame, 2, attrs["tokenization"])
    lm = load_model("embedded", "cpu", "auto", None)
    out = splice_ce(lm, None, 17, rows, pos, torch.zeros(576), progress=False, recon=lambda h: h.clone())
    assert out["kl_mean"] == pytest.approx(0.0, abs=1e-6) and out["kl_share_above"] == 0.0
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["kl_zero_ablation"] > 1.0 and out["kl_tokens"] == sum(len(p) for p in pos)
    assert SAETrainConfig(layers=[17]).qa_max_kl == 0.5


def test_qa_gate_fails_untrained_and_passes_trained(real_store, copy_store, capsys, tmp_path):
    from trainers.sae.cli import main
    from trainers.sae.train import build_training_sae

    store = copy_store(real_store)
    common = [
        "--layer",
        "17",
        "--store",
        str(store),
        "--ce-rows",
        "2",
        "--no-progress",
        "--qa",
        "strict",
        "--qa-max-nmse",
        "0.6",
        "--qa-max-kl",
        "2.0",
        "--qa-max-dead",
        "0.5",
    ]
    untrained = build_training_sae(
        "topk", 576, 256, k=16, l1_coefficient=1.0, l1_warm_up_steps=0, aux_coefficient=1 / 32, seed=0, device="cpu"
    )
    untrained.save_inference_model(tmp_path / "untrained")
    assert main([*common, "--sae", str(tmp_path / "untrained")]) == 1
    out = capsys.readouterr()
    assert "| reconstruction | nmse |" in out.out and "QA FAILED" in out.out and "failed the QA gate" in out.err
    assert (
        main([*common, "--steps", "150", "--batch-tokens", "256", "--d-sae", "256", "--k", "16", "--init-batches", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "QA PASSED" in out and "KL(clean || spliced)" in out
    st = Store(store)
    rows = st.query("SELECT source, qa_passed, kl_mean, nmse, qa FROM saes ORDER BY updated_at").to_pylist()
    assert [r["qa_passed"] for r in rows] == [False, True]
    assert rows[1]["kl_mean"] < rows[0]["kl_mean"] and rows[1]["nmse"] < 0.6
    assert {c["metric"] for c in json.loads(rows[1]["qa"])["checks"]} == {"nmse", "kl_mean", "l0", "dead_fraction"}
    rec = st.query("SELECT metrics FROM runs WHERE kind = 'train_sae'").column(0)[0].as_py()
    assert json.loads(rec)["qa"]["passed"] is True
    assert main(["--resume", "no-such-run", "--store", str(store)]) == 2
    assert "--resume no-such-run: no such run" in capsys.readouterr().err


def test_sweep_writes_one_row_per_layer_and_reuses_finished_layers(real_store, copy_store, capsys):
    from trainers.sae.cli import main

    store = copy_store(real_store)
    argv = [
        "--layers",
        "6",
        "17",
        "--store",
        str(store),
        "--steps",
        "20",
        "--batch-tokens",
        "128",
        "--d-sae",
        "128",
        "--k",
        "8",
        "--ce-rows",
        "0",
        "--init-batches",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    st = Store(store)
    rows = st.query(
        "SELECT layer, sae, explained_variance, l0, best_category_auroc, reused, sweep_run_id "
        "FROM sae_sweeps ORDER BY layer"
    ).to_pylist()
    assert [r["layer"] for r in rows] == [6, 17] and not any(r["reused"] for r in rows)
    assert all(r["explained_variance"] > 0 and r["l0"] == pytest.approx(8, abs=0.5) for r in rows)
    sweep_dir = st.run_dir(rows[0]["sweep_run_id"])
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG" and "| 17 |" in (sweep_dir / "sweep.md").read_text()
    # analytics.correlations' table, when present, fills the AUROC column (read with SQL, no import)
    st.write_rows(
        "feature_metadata_assoc",
        [
            {
                "sae": rows[1]["sae"],
                "layer": 17,
                "feature": 3,
                "field": "category",
                "kind": "categorical",
                "level": "math",
                "stat": "auroc",
                "effect": 0.91,
            }
        ],
        part="fake",
    )
    st.refresh_catalog()
    n_train = st.query("SELECT count(*) FROM runs WHERE kind = 'train_sae'").column(0)[0].as_py()
    assert main(argv) == 0
    assert st.query("SELECT count(*) FROM runs WHERE kind = 'train_sae'").column(0)[0].as_py() == n_train
    again = st.query(
        "SELECT layer, reused, best_category_auroc FROM sae_sweeps WHERE sweep_run_id <> ? ORDER BY layer",
        [rows[0]["sweep_run_id"]],
    ).to_pylist()
    assert [(r["layer"], r["reused"], r["best_category_auroc"]) for r in again] == [(6, True, None), (17, True, 0.91)]
    assert "best cat. AUROC" in capsys.readouterr().out
