"""Checkpoints of an SAE training run, for exact resume: safetensors + JSON, never pickles.

A checkpoint after step s is two files in `runs/<run_id>/checkpoints/`:

* `step_<s>.safetensors`: every tensor of the state: the training SAE's `state_dict`
  (`sae.*`), Adam's per-parameter state (`optim.<i>.<key>`: step, exp_avg, exp_avg_sq),
  the trainer's firing statistics (`trainer.act_freq_scores`,
  `trainer.n_forward_passes_since_fired`, which decide dead latents and thus TopK's
  auxiliary loss) and the torch RNG states (`rng.cpu`, `rng.cuda.<i>`);
* `step_<s>.json`: every scalar: the step and sample counters, Adam's param groups, the lr
  scheduler's and the L1 coefficient schedulers' state dicts, the input scaling factor,
  the curves and held-out evaluations so far, the best evaluation, and the size of the
  tensor file, which marks the pair as complete.

Both are written atomically (temporary file, fsync, rename; see store.core), the tensors
first: a JSON file exists only beside a complete tensor file, so a run killed at any point
leaves the previous checkpoint valid. The token order needs no state of its own: it is the
stored permutation (`token_order.npy`), and the position in it is `n_training_samples`.
After each new checkpoint the older ones are deleted except the best one by held-out
explained variance, which `best.json` tags (step, file, metrics).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from store.core import StoreError, atomic_write_bytes, write_json
from trainers.resume import cpu, load_optimizer_state, optimizer_state, restore_rng, rng_tensors

FORMAT = 1
_STEP = re.compile(r"^step_(\d+)\.json$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def trainer_state(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) of a sae-lens SAETrainer: everything a later step depends on."""
    tensors = {f"sae.{k}": cpu(v) for k, v in trainer.sae.state_dict().items()}
    opt_tensors, opt_meta = optimizer_state(trainer.optimizer)
    tensors.update(opt_tensors)
    tensors["trainer.act_freq_scores"] = cpu(trainer.act_freq_scores)
    tensors["trainer.n_forward_passes_since_fired"] = cpu(trainer.n_forward_passes_since_fired)
    tensors.update(rng_tensors())
    scalars = {
        "n_training_steps": trainer.n_training_steps,
        "n_training_samples": trainer.n_training_samples,
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "started_fine_tuning": trainer.started_fine_tuning,
        "optimizer": opt_meta,
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "coefficient_schedulers": {k: s.state_dict() for k, s in trainer.coefficient_schedulers.items()},
        "scaling_factor": trainer.activation_scaler.scaling_factor,
    }
    return tensors, scalars


def save_checkpoint(run_dir: Path, trainer: Any, *, extra: dict[str, Any], keep: set[int] = frozenset()) -> Path:
    """Write the checkpoint of `trainer`'s current step (see the module docstring) and delete
    older checkpoints except the steps in `keep` (the best one). Returns the JSON path."""
    from safetensors.torch import save

    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    step = int(trainer.n_training_steps)
    tensors, scalars = trainer_state(trainer)
    blob = save(tensors, metadata={"format": str(FORMAT), "step": str(step)})
    name = f"step_{step:07d}"
    atomic_write_bytes(d / f"{name}.safetensors", blob)
    doc = {
        "format": FORMAT,
        "step": step,
        "tensors": f"{name}.safetensors",
        "tensors_bytes": len(blob),
        "trainer": scalars,
        **extra,
    }
    path = write_json(d / f"{name}.json", doc)
    for old in list_checkpoints(run_dir):
        s = int(_STEP.match(old.name).group(1))
        if s != step and s not in keep:
            old.unlink(missing_ok=True)
            (d / f"step_{s:07d}.safetensors").unlink(missing_ok=True)
    for stray in d.glob("step_*.safetensors"):  # tensors whose JSON never got written
        if not stray.with_suffix(".json").exists() and int(stray.stem[5:]) != step:
            stray.unlink(missing_ok=True)
    return path


def tag_best(run_dir: Path, step: int, metrics: dict[str, Any]) -> None:
    write_json(
        checkpoint_dir(run_dir) / "best.json", {"step": step, "checkpoint": f"step_{step:07d}.json", "metrics": metrics}
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    return sorted(p for p in d.glob("step_*.json") if _STEP.match(p.name)) if d.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (its JSON path), or None."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            doc = json.loads(p.read_text())
            if (p.parent / doc["tensors"]).stat().st_size == doc["tensors_bytes"]:
                return p
        except (OSError, ValueError, KeyError):
            continue
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise StoreError(
            f"checkpoint {path} has format {doc.get('format')}, this code reads {FORMAT}; "
            f"start a new run with --resume never"
        )
    return load_file(Path(path).parent / doc["tensors"]), doc


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """Restore a checkpoint into a freshly built trainer (same config); returns its JSON."""
    tensors, doc = read_checkpoint(path)
    sc = doc["trainer"]
    dev = trainer.sae.device
    trainer.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    load_optimizer_state(trainer.optimizer, tensors, sc["optimizer"])
    trainer.lr_scheduler.load_state_dict(sc["lr_scheduler"])
    for name, st in sc["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(st)
    trainer.n_training_steps, trainer.n_training_samples = sc["n_training_steps"], sc["n_training_samples"]
    trainer.n_frac_active_samples, trainer.started_fine_tuning = sc["n_frac_active_samples"], sc["started_fine_tuning"]
    trainer.act_freq_scores = tensors["trainer.act_freq_scores"].to(dev)
    trainer.n_forward_passes_since_fired = tensors["trainer.n_forward_passes_since_fired"].to(dev)
    trainer.activation_scaler.scaling_factor = sc["scaling_factor"]
    restore_rng(tensors)
    return doc
