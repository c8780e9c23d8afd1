"""An attribution run's own files in runs/<run_id>/: its settings, its query side, its completion.

    settings.json            what the run computes and how (identity + execution settings, the
                             pool and query rows' hashes, the model hash), written when it starts
    query_side.safetensors   the preconditioned query gradients, one tensor per module (float32)
    query_side.json          their sha256, module order, shapes and the seconds they took: the
                             query side's commit, written after the tensors
    complete.json            written last, when every unit is committed and the tables are final

The run id is derived from the identity settings (extractors.attribution.steps.AttributionSpec),
so the same command finds the same run. `check_resume` refuses to continue a partial run with
other execution settings (unit size, token batch, device) or over other rows, naming each; a
complete run is never recomputed. The query side is verified against its checksum whenever it
is reused; a mismatch is an error naming the file (never silently recomputed over units that
were scored with the old one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from extractors.attribution.steps import QuerySide
from extractors.attribution.tables import committed_units
from store.core import Store, StoreError, atomic_write_bytes

if TYPE_CHECKING:
    from extractors.attribution.steps import AttributionSpec

SETTINGS, QUERY_TENSORS, QUERY_META, COMPLETE = (
    "settings.json",
    "query_side.safetensors",
    "query_side.json",
    "complete.json",
)
FLAGS = {"unit_rows": "--unit-rows", "batch_tokens": "--batch-tokens", "device": "--device"}


def rows_hash(row_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(row_ids).encode()).hexdigest()


def settings_of(spec: AttributionSpec, pool_ids: list[str], query_ids: list[str]) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "identity": spec.identity(),
        "execution": spec.execution(),
        "pool_rows": len(pool_ids),
        "pool_rows_hash": rows_hash(pool_ids),
        "query_rows": len(query_ids),
        "query_rows_hash": rows_hash(query_ids),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def is_complete(store: Store, run_id: str) -> bool:
    return (store.run_folder(run_id) / COMPLETE).is_file()


def check_resume(store: Store, spec: AttributionSpec, pool_ids: list[str], query_ids: list[str]) -> None:
    """A ValueError naming every setting in which this command differs from the partial run it
    would continue (nothing for a new run or a complete one)."""
    run_id = spec.run_id
    stored = _read_json(store.run_folder(run_id) / SETTINGS)
    if stored is None or is_complete(store, run_id):
        return
    want = settings_of(spec, pool_ids, query_ids)
    diffs = [
        f"{FLAGS[k]} {stored['execution'].get(k)} there, {v} here"
        for k, v in want["execution"].items()
        if stored["execution"].get(k) != v
    ]
    for side, split in (("pool", spec.pool_split), ("query", spec.query_split)):
        if stored[f"{side}_rows_hash"] != want[f"{side}_rows_hash"]:
            diffs.append(
                f"the {side} rows ({split}): {stored[f'{side}_rows']} rows there, "
                f"{want[f'{side}_rows']} other rows here"
            )
    if diffs:
        n = len(committed_units(store, run_id))
        raise ValueError(
            f"attribution run {run_id} is partial ({n} units committed) and this command differs from it: "
            f"{'; '.join(diffs)}. Rerun with the run's settings to finish it (a unit's scores depend on them), "
            f"or change a setting that names the run (e.g. --projection-seed) to start another, or delete "
            f"{store.run_folder(run_id)} and {store.table_dir('attribution_scores') / run_id} to start it over"
        )


def write_settings(store: Store, run_dir: Path, settings: dict[str, Any], model_hash: str) -> None:
    """settings.json when the run starts; a resumed run checks the model is the one it started with."""
    stored = _read_json(run_dir / SETTINGS)
    if stored is not None:
        if stored.get("model_hash") != model_hash:
            raise StoreError(
                f"attribution run {settings['run_id']} was started on a model with hash {stored.get('model_hash')}; "
                f"this --model has hash {model_hash}: pass the same model, or delete {run_dir} to start over"
            )
        return
    store.write_json(run_dir / SETTINGS, {**settings, "model_hash": model_hash, "threads": torch.get_num_threads()})


def recorded_threads(run_dir: Path) -> int | None:
    stored = _read_json(run_dir / SETTINGS)
    return None if stored is None else stored.get("threads")


def save_query_side(run_dir: Path, side: QuerySide) -> None:
    """The tensors (fsynced, renamed into place), then their JSON with the checksum: the commit."""
    data = save_tensors(side.grads)
    atomic_write_bytes(run_dir / QUERY_TENSORS, data)
    meta = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "modules": side.modules,
        "shapes": {m: list(g.shape) for m, g in side.grads.items()},
        "dtype": "float32",
        "step_seconds": side.steps,
    }
    atomic_write_bytes(run_dir / QUERY_META, json.dumps(meta, indent=2, sort_keys=True).encode())


def load_query_side(run_dir: Path) -> QuerySide | None:
    """The saved query side, verified against its checksum; None when it was never committed."""
    meta = _read_json(run_dir / QUERY_META)
    if meta is None:
        return None
    path = run_dir / QUERY_TENSORS
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != meta["sha256"]:
        raise StoreError(
            f"{path} does not match the checksum in {run_dir / QUERY_META} (sha256 {got[:16]}... vs "
            f"{meta['sha256'][:16]}...): the file is damaged. Delete {run_dir} and the run's parts in "
            f"catalog/attribution_scores/ to recompute the run"
        )
    grads = load_tensors(data)
    return QuerySide({m: grads[m] for m in meta["modules"]}, list(meta["modules"]), dict(meta["step_seconds"]))


def write_complete(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / COMPLETE, json.dumps(summary, indent=2, sort_keys=True).encode())
