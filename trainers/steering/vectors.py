"""Steering vectors as stored by `python -m trainers.steering compute`, and the hook that adds them.

    from trainers.steering.vectors import load_steering, steer
    s = load_steering(Store("store_data"), "latest")            # or a compute run id
    with steer(model, {17: s.vectors[17]}, alpha=4.0):           # alpha * v_17 added to block 17's output
        model.generate(...)

A compute run leaves runs/<run_id>/steering_vectors.safetensors (one float32 tensor
`layer_L` per layer), steering.json (provenance: the groups' SQL, token rule, counts, norms)
and its rows in the table `steering_vectors`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file

from extractors.model import decoder_layers
from store.core import Store, StoreError

VECTORS_TABLE = "steering_vectors"


class Steering(NamedTuple):
    run_id: str
    vectors: dict[int, torch.Tensor]  # layer -> [d_model] float32
    meta: dict[str, Any]


def load_steering(store: Store, run: str = "latest") -> Steering:
    """A compute run's vectors: `latest` or a run id."""
    if run == "latest":
        if not store.has_table(VECTORS_TABLE):
            raise StoreError(
                f"no steering vectors in {store.root}; compute some: python -m trainers.steering "
                f"compute --layers 17 --store {store.root}"
            )
        run = store.query(f"SELECT run_id FROM {VECTORS_TABLE} ORDER BY created_at DESC LIMIT 1").column(0)[0].as_py()
    path = store.run_folder(run) / "steering_vectors.safetensors"
    if not path.is_file():
        raise StoreError(
            f"steering run {run!r} has no {path.name} in {store.root}; pass a run id from the "
            f"{VECTORS_TABLE} table or latest"
        )
    t = load_file(str(path))
    meta = json.loads((path.parent / "steering.json").read_text())
    return Steering(run, {int(k.split("_")[1]): v for k, v in t.items()}, meta)


@contextmanager
def steer(model: Any, vectors: dict[int, torch.Tensor], alpha: float) -> Iterator[None]:
    """Add alpha * v_L to the output of block L (every position) while inside the block."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = decoder_layers(base)
    handles = []
    for L, v in vectors.items():
        if not 0 <= L < len(blocks):
            raise StoreError(f"steering layer {L} is out of range: the model has layers 0..{len(blocks) - 1}")
        p = next(base.parameters())
        add = (alpha * v).to(device=p.device, dtype=p.dtype)

        def hook(_m, _i, out, add=add):
            if isinstance(out, tuple):
                return (out[0] + add, *out[1:])
            return out + add

        handles.append(blocks[L].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
