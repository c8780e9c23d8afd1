"""Checkpoints of a LoRA finetune, for exact resume: safetensors + JSON, never pickles.

A checkpoint after optimizer step s is one folder, `runs/<run_id>/checkpoints/step_<s>/`:

* `adapter_model.safetensors` + `adapter_config.json`: the LoRA weights in peft's format
  (`PeftModel.from_pretrained(base, folder)` opens a checkpoint as it opens the final adapter);
* `state.safetensors`: AdamW's per-parameter state (`optim.<i>.step|exp_avg|exp_avg_sq`), the
  torch RNG states (`rng.cpu`, `rng.cuda.<i>`: LoRA dropout draws from them) and the current
  epoch's shuffled row order (`data.order`);
* `state.json`: everything else: the step, the data-order position (epoch, optimizer steps done
  in that epoch's order, whether its eval already ran), numpy's row-order generator state,
  AdamW's param groups, the learning-rate schedule (a pure function of the step: linear
  warm-up, then linear decay), the train/eval logs so far, the eval loss this checkpoint's
  weights had (checkpoints written right after an epoch's eval) and a hash of the training
  rows (a resume over other rows is refused).

A checkpoint is written into a temporary folder (`.step_<s>.<pid>.tmp`), every file fsynced,
then renamed into place and the parent fsynced: a `step_*` folder is always complete, and a run
killed at any moment leaves the previous checkpoint valid. Then older checkpoints are deleted
except the best by eval loss, which `best.json` names; temporary folders of dead writers go too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from store.cli import config_dict
from store.core import Store, StoreError, fsync_path, pid_alive, write_json
from trainers.resume import (
    differences,
    load_optimizer_state,
    matched_settings,
    named_run_config,
    optimizer_state,
    restore_rng,
    resumable_checkpoint,
    resume_auto,
    rng_tensors,
)

FORMAT = 1
_STEP = re.compile(r"^step_(\d+)$")
_TMP = re.compile(r"^\.step_\d+\.(\d+)\.tmp$")

# Fields that do not change what a finetune computes: a resumed run may differ in these.
NOT_MATCHED = {"store", "progress", "resume", "checkpoint_every", "device", "model_cache"}


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rows_hash(row_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(row_ids).encode()).hexdigest()[:16]


class Plan(NamedTuple):
    """Where and how often a finetune checkpoints, and where it resumes from."""

    run_dir: Path
    every: int | None  # optimizer steps between checkpoints; None: none
    resume_from: Path | None  # a checkpoint folder
    rows: str  # rows_hash of the training and eval rows
    sync: Callable[[], object] = lambda: None  # after each checkpoint: a remote store uploads the run folder


class Written(NamedTuple):
    path: Path
    bytes: int
    seconds: float


def _fsync_tree(folder: Path) -> int:
    n = 0
    for f in folder.iterdir():
        fsync_path(f)
        n += f.stat().st_size
    fsync_path(folder)
    return n


def _eval_loss(path: Path) -> float | None:
    try:
        return json.loads((path / "state.json").read_text()).get("eval_loss")
    except (OSError, ValueError):
        return None


def save_checkpoint(run_dir: Path, model: Any, opt: torch.optim.Optimizer, order: list[int], doc: dict) -> Written:
    """Write the checkpoint of step `doc['step']` (see the module docstring); `doc` is the JSON
    part (position, logs, eval_loss, ...). Keeps it and the best by eval loss, deletes the rest."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(doc['step']):07d}"
    tmp = d / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(get_peft_model_state_dict(model), tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(tmp))
    tensors, opt_meta = optimizer_state(opt)
    tensors.update(rng_tensors())
    tensors["data.order"] = torch.tensor(order, dtype=torch.int64)
    save_file(tensors, tmp / "state.safetensors", metadata={"format": str(FORMAT), "step": str(doc["step"])})
    (tmp / "state.json").write_text(
        json.dumps({"format": FORMAT, **doc, "optimizer": opt_meta}, indent=2, sort_keys=True, default=str)
    )
    size = _fsync_tree(tmp)
    final = d / name
    if final.exists():  # a rerun writing the same step again (after a resume from an older one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(d)
    kept = {final.name}
    scored = [(loss, p.name) for p in list_checkpoints(run_dir) if (loss := _eval_loss(p)) is not None]
    if scored:
        loss, best = min(scored)
        kept.add(best)
        write_json(d / "best.json", {"checkpoint": best, "step": int(best[5:]), "eval_loss": loss})
    for p in d.iterdir():
        m = _TMP.match(p.name)
        if (_STEP.match(p.name) and p.name not in kept) or (m and not pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
    return Written(final, size, time.perf_counter() - t0)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run (oldest first)."""
    d = checkpoint_dir(run_dir)
    found = [p for p in d.iterdir() if _STEP.match(p.name) and (p / "state.json").is_file()] if d.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: Any, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], list[int]]:
    """Restore the adapter weights, AdamW's state and torch's RNG from a checkpoint into a model
    and optimizer built with the run's settings; returns (its state.json, the epoch's row order)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    doc = json.loads((path / "state.json").read_text())
    if doc.get("format") != FORMAT:
        raise StoreError(
            f"checkpoint {path} has format {doc.get('format')}, this code reads {FORMAT}; "
            f"start a new run with --resume never"
        )
    res = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    if getattr(res, "unexpected_keys", None):
        raise StoreError(f"checkpoint {path} holds weights this adapter lacks: {res.unexpected_keys[:3]}")
    tensors = load_file(path / "state.safetensors")
    load_optimizer_state(opt, tensors, doc["optimizer"])
    restore_rng(tensors)
    return doc, [int(i) for i in tensors["data.order"].tolist()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_resume(store: Store, cfg: Any) -> tuple[str | None, Path | None]:
    """(run id to continue or None, its latest checkpoint or None) for a FinetuneConfig's
    `--resume auto|RUN_ID|never` (docs/attribution.md, Finetune)."""
    if cfg.resume == "never":
        return None, None
    want = matched_settings(config_dict(cfg), NOT_MATCHED)
    if cfg.resume == "auto":
        return resume_auto(store, "finetune", want, latest_checkpoint)
    run_id = cfg.resume
    stored = named_run_config(store, run_id, "finetune")["config"]
    diff = differences(want, stored)
    if diff:
        shown = "; ".join(f"{_flag(k)} {stored.get(k)!r} there, {want[k]!r} here" for k in diff)
        raise StoreError(
            f"--resume {run_id}: that run has other settings ({shown}); rerun with the run's settings "
            f"(its config.json: {store.run_folder(run_id) / 'config.json'}), or --resume never to start a new run"
        )
    _, ckpt_path = resumable_checkpoint(store, run_id, latest_checkpoint, "adapter")
    return run_id, ckpt_path


def finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None
