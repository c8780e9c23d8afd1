"""Resuming a training run, shared by SAE training (trainers.sae) and the LoRA finetune
(trainers.finetune): which run to continue, whether a live process still trains it, and the
state every checkpoint holds beside the model (the optimizer's, the RNGs') as tensors + JSON.

A run continues only with the settings it was started with: `matched_settings` drops the fields that
do not change what a run computes (store, progress, device, ...), `find_runs_of_kind` lists a kind's
runs whose stored settings equal a command's, and `differences` names the settings that keep
a named run from being continued. `resume_auto` is `--resume auto`'s choice; `named_run_config`
and `resumable_checkpoint` give `--resume RUN_ID`'s refusals (no such run, another kind,
finished, no checkpoint). Optimizer and RNG states split into tensors (for safetensors) and
plain values (for JSON), so no checkpoint is ever a pickle.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from store.core import Store, StoreError, write_json


def matched_settings(config: dict[str, Any], ignore: set[str]) -> dict[str, Any]:
    """The settings of `config` that decide what a run computes (all but `ignore`)."""
    return {k: v for k, v in config.items() if k not in ignore}


def differences(want: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The keys of `want` whose value `stored` does not share, in `want`'s order."""
    return [k for k in want if stored.get(k) != want[k]]


def find_runs_of_kind(
    store: Store,
    kind: str,
    want: dict[str, Any],
    *,
    finished: bool,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: c,
) -> list[str]:
    """Runs of `kind` whose stored config (after `normalize`) agrees with `want` on every key of
    `want`, newest first: finished ones, or unfinished ones (running, failed or killed)."""
    if not store.has_table("runs"):
        return []
    op = "=" if finished else "<>"
    rows = store.query(
        f"SELECT run_id, config FROM runs WHERE kind = ? AND status {op} 'finished' ORDER BY started_at DESC", [kind]
    ).to_pylist()
    return [r["run_id"] for r in rows if not differences(want, normalize(json.loads(r["config"])))]


def resume_auto(
    store: Store,
    kind: str,
    want: dict[str, Any],
    latest: Callable[[Path], Path | None],
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: c,
) -> tuple[str | None, Path | None]:
    """`--resume auto`: (run id, latest checkpoint) of the newest unfinished `kind` run with these
    settings that has a checkpoint and no live trainer on this host, else (None, None)."""
    for run_id in find_runs_of_kind(store, kind, want, finished=False, normalize=normalize):
        d = store.run_folder(run_id)
        ckpt = latest(d)
        if ckpt is not None and not claimed_elsewhere(d):
            return run_id, ckpt
    return None, None


def named_run_config(store: Store, run_id: str, kind: str) -> dict[str, Any]:
    """`--resume RUN_ID`: the run's stored config.json, or an error if there is no such `kind` run."""
    path = store.run_folder(run_id) / "config.json"
    if not path.is_file():
        raise StoreError(
            f"--resume {run_id}: no such run in {store.root} (no {path}); pass a {kind} run id "
            f"(python -m store.sql \"SELECT run_id, status FROM runs WHERE kind = '{kind}'\"), or --resume never"
        )
    doc = json.loads(path.read_text())
    if doc.get("kind") != kind:
        raise StoreError(f"--resume {run_id} is a {doc.get('kind')} run; only {kind} runs resume here")
    return doc


def resumable_checkpoint(
    store: Store, run_id: str, latest: Callable[[Path], Path | None], product: str
) -> tuple[Path, Path]:
    """`--resume RUN_ID`: (its run folder, its latest checkpoint by `latest`), or an error when
    the run finished (its result is `product` in the run folder) or has no complete checkpoint."""
    d = store.run_folder(run_id)
    status = store.query("SELECT status FROM runs WHERE run_id = ?", [run_id]).column(0).to_pylist()
    if status and status[0] == "finished":
        raise StoreError(f"--resume {run_id}: that run already finished; its result is {d / product}")
    ckpt = latest(d)
    if ckpt is None:
        raise StoreError(
            f"--resume {run_id}: the run has no complete checkpoint in {d / 'checkpoints'} (it ran without "
            f"--checkpoint-every, or was killed before the first); rerun with --resume never"
        )
    if claimed_elsewhere(d):
        raise StoreError(f"--resume {run_id}: a live process on this machine still trains it ({d / 'owner.json'})")
    return d, ckpt


def claim(run_dir: Path) -> None:
    """Mark this process as the run's trainer (read by `claimed_elsewhere`)."""
    write_json(Path(run_dir) / "owner.json", {"host": socket.gethostname(), "pid": os.getpid()})


def claimed_elsewhere(run_dir: Path) -> bool:
    """Is another live process on this host training this run? (a killed one is not)"""
    try:
        owner = json.loads((Path(run_dir) / "owner.json").read_text())
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname() or owner.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


def cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) of an optimizer's state_dict: per-parameter tensors as
    `optim.<i>.<key>` (Adam: step, exp_avg, exp_avg_sq), the rest (param groups, non-tensor
    state) as JSON-able values; `load_optimizer_state` puts them back."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{key}"] = cpu(v)
            else:
                scalars.setdefault(str(i), {})[key] = v
    ids = sorted(int(i) for i in sd["state"])
    return tensors, {"param_groups": sd["param_groups"], "state_scalars": scalars, "state_ids": ids}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what `optimizer_state` split (an optimizer built over the same parameters)."""
    state: dict[int, dict[str, Any]] = {i: {} for i in meta["state_ids"]}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state[int(i)][key] = v
    for i, kv in meta["state_scalars"].items():
        state[int(i)].update(kv)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's RNG states: `rng.cpu`, and `rng.cuda.<i>` once CUDA is in use (never initialized here)."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set torch's RNG states from `rng_tensors`' output (CUDA's only where CUDA is present)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
