"""A LoRA finetune that users can leave running: checkpoints with exact resume after a real
SIGKILL, and one clear error for each bad --checkpoint-every / --resume. CPU, the tiny random
Llama of tests/conftest.py (12 training rows, 3 epochs of 6 optimizer steps, LoRA dropout on,
so the resumed run must restore torch's RNG as well as the weights, AdamW and the row order).

The reference runs without --checkpoint-every: writing checkpoints must not change the result
either. Both processes run the same code with the same (default) torch thread count, so every
reduction sums in the same order and the weights can be compared bit for bit.
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
from tests.conftest import ingest_small
from trainers.finetune.train import main as ft_main

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"train_base": 12, "attr_query": 3, "eval": 6}


def _args(store: Path, model: str, *extra: str) -> list[str]:
    fixed = "--no-progress --batch-size 2 --epochs 3 --eval-max-rows 4 --lr 1e-2 --lora-dropout 0.1".split()
    return ["--store", str(store), "--model", model, *fixed, *extra]


def _runs(store: Path) -> dict[str, str]:
    st = Store(store)
    st.refresh_catalog()
    return {
        r["run_id"]: r["status"]
        for r in st.query("SELECT run_id, status FROM runs WHERE kind = 'finetune'").to_pylist()
    }


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    st = tmp_path_factory.mktemp("ft_resume") / "store"
    ingest_small(st, SIZES, model=tiny_model)
    return st


def test_sigkill_then_same_command_resumes_bit_for_bit(store, tiny_model, model_cache):
    base = [sys.executable, "-m", "trainers.finetune", *_args(store, tiny_model, "--model-cache", str(model_cache))]
    done = subprocess.run([*base, "--resume", "never"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref_id,) = _runs(store)

    cmd = [*base, "--checkpoint-every", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, killed_id = time.time(), None
    try:
        while time.time() - t0 < 240 and proc.poll() is None:
            for d in (store / "runs").glob("finetune-*"):
                if d.name != ref_id and list((d / "checkpoints").glob("step_*")):
                    killed_id = d.name
            if killed_id:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill: no cleanup, no finally blocks
    finally:
        proc.wait(timeout=30)
    assert killed_id and proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert _runs(store)[killed_id] == "running"  # the record stays as the kill left it
    assert not (store / "runs" / killed_id / "adapter").exists()

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert _runs(store) == {ref_id: "finished", killed_id: "finished"}  # it continued the killed run
    want, got = _adapter(store / "runs" / ref_id), _adapter(store / "runs" / killed_id)
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed adapter differs from the uninterrupted run"
    ref, res = (json.loads((store / "runs" / r / "train_metrics.json").read_text()) for r in (ref_id, killed_id))
    assert 0 < res["metrics"]["resumed_from_step"] < 18 and res["metrics"]["steps"] == 18
    assert [e["loss"] for e in res["eval"]] == [e["loss"] for e in ref["eval"]] and len(ref["eval"]) == 4
    assert [s["loss"] for s in res["train"]] == [s["loss"] for s in ref["train"]]
    # The latest and the best checkpoint by eval loss are kept (here the same: the final one).
    ck = store / "runs" / killed_id / "checkpoints"
    best = json.loads((ck / "best.json").read_text())
    assert best["eval_loss"] == min(e["loss"] for e in res["eval"][1:])
    assert sorted(p.name for p in ck.iterdir()) == sorted({"best.json", best["checkpoint"], "step_0000018"})


def test_bad_checkpoint_and_resume_input_gets_one_clear_error(store, tiny_model, capsys):
    with pytest.raises(SystemExit) as e:
        ft_main(_args(store, tiny_model, "--checkpoint-every", "0"))
    assert e.value.code == 2
    assert "--checkpoint-every must be a positive number of optimizer steps, got 0" in capsys.readouterr().err

    assert ft_main(_args(store, tiny_model, "--resume", "finetune-nope")) == 2
    err = capsys.readouterr().err
    assert "--resume finetune-nope: no such run" in err and "--resume never" in err

    # A run of this store with other settings: the refusal names each setting that differs.
    before = set(_runs(store))
    assert ft_main(_args(store, tiny_model, "--max-rows", "4", "--resume", "never")) == 0
    (other,) = set(_runs(store)) - before
    capsys.readouterr()
    assert ft_main(_args(store, tiny_model, "--lr", "0.5", "--resume", other)) == 2
    err = capsys.readouterr().err
    assert f"--resume {other}: that run has other settings" in err
    assert "--lr 0.01 there, 0.5 here" in err and "--max-rows 4 there, None here" in err
    assert err.count("error:") == 1
