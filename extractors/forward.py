"""One forward pass that captures several layers' residual stream and stops early.

Layer convention: `--layer L` is the output of decoder block L (0-based), i.e. the residual
stream after block L. For L < n_layers - 1 this equals transformers'
`output_hidden_states[L + 1]`; for the last block, `hidden_states[-1]` has the final norm
applied and ours does not. Forward hooks on the requested blocks copy their outputs; the
hook of the deepest one raises `_Stop`, so the blocks above it never run.

Batches are right-padded and run without an attention mask: under causal attention a real
token only attends to earlier positions, which are all real, so its values do not depend
on the padding (and SDPA keeps its fast causal path). Padded positions are discarded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from extractors.model import decoder_layers


class _Stop(Exception):
    pass


class Batch(NamedTuple):
    rows: list[int]  # indices into the caller's row list
    lengths: list[int]
    width: int  # padded length


def plan_batches(lengths: list[int], order: list[int], batch_tokens: int) -> list[Batch]:
    """Greedy batches over rows in `order` (already sorted by length) whose padded size
    (rows x longest) stays within batch_tokens; a longer row gets a batch of its own."""
    batches: list[Batch] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and w * (len(cur) + 1) > batch_tokens:
            batches.append(Batch(cur, [lengths[j] for j in cur], width))
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(Batch(cur, [lengths[j] for j in cur], width))
    return batches


def padding_fraction(batches: list[Batch]) -> float:
    padded = sum(b.width * len(b.rows) for b in batches)
    real = sum(sum(b.lengths) for b in batches)
    return 1.0 - real / padded if padded else 0.0


def validate_layers(layers: list[int], n_layers: int, model_id: str) -> list[int]:
    bad = [L for L in layers if not 0 <= L < n_layers]
    if bad:
        raise ValueError(
            f"--layer {bad[0]} is out of range: {model_id} has {n_layers} decoder layers, "
            f"valid layers are 0..{n_layers - 1}"
        )
    if not layers:
        raise ValueError("no layer requested; pass --layer L or --layers L1 L2 ...")
    return sorted(set(layers))


class LayerCapture:
    """Context manager: `capture(input_ids)` -> {layer: [B, T, d] tensor}."""

    def __init__(self, model: Any, layers: list[int]):
        self.model = model
        self.layers = sorted(layers)
        self.blocks = decoder_layers(model)
        self._out: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        deepest = self.layers[-1]
        for L in self.layers:

            def hook(_mod, _inp, out, L=L):
                self._out[L] = out[0] if isinstance(out, tuple) else out
                if L == deepest:
                    raise _Stop

            self._handles.append(self.blocks[L].register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.inference_mode()
    def capture(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        self._out = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        return self._out


def pad_batch(token_ids: list[list[int]], width: int, pad_id: int, device: torch.device) -> torch.Tensor:
    out = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    if device.type == "cuda":
        # A copy from pageable memory waits for the GPU to drain; from pinned memory it is queued.
        out = out.pin_memory()
    return out.to(device, non_blocking=True)
