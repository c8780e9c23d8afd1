"""Hidden states in the store: the array kind behind `python -m extractors.run --layer 17`.

Arrays `hidden/layer_L` ([n_slots, d_model], bf16 by default) over the store's layout, or
`hidden/<adapter>/layer_L` for states of base + a LoRA adapter (`--adapter`, extractors.adapters),
filled by the unit engine (extractors.units): each unit's rows run through the model in
length-sorted batches formed from that unit alone, with one forward pass for all requested
layers that stops after the deepest. By default (`--pack auto`) the batches are packed, without
padding, each row's positions and attention its own (extractors.packing.PackedForward); with
`--pack off`, or a model whose attention transformers cannot swap, right-padded
(extractors.forward.LayerCapture). Both give each row's own states (docs/extraction.md).

Per batch there is no per-token Python and no host synchronisation: the real tokens' flat
positions and their unit slots are computed with numpy, each layer's output is gathered
(`index_select`), cast to the storage dtype and scattered into the unit buffer
(`index_copy_`) where the model runs. Both staging paths give the same bytes as
`store.arrays.encode` of the masked outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from extractors.adapters import AdapterRef, adapter_attrs, layer_array_name
from extractors.forward import Batch, LayerCapture, pad_batch, padding_fraction, plan_batches, validate_layers
from extractors.model import decoder_layers, pad_token_id
from extractors.packing import PackedForward, attention_cost, plan_packs, use_packing
from extractors.units import ArrayKind, ArraySpec, UnitOptions, UnitWork, extract_units
from store.catalog.tokens import Layout, row_token_ids
from store.core import Store


class ExtractResult(NamedTuple):
    run_id: str | None
    rows: int
    tokens: int
    seconds: float
    tokens_per_s: float
    forward_tokens_per_s: float
    padding: float
    skipped: bool


def hidden_array_name(layer: int, adapter: str | None = None) -> str:
    """hidden/layer_L, or hidden/<adapter>/layer_L for states of a finetuned adapter."""
    return layer_array_name("hidden", layer, adapter)


@dataclass
class HiddenSpec:
    """What `extract_hidden` computes: these layers' states, stored in `dtype`; with `adapter`, of
    base + that adapter (the LoadedModel given must be wrapped already: extractors.adapters)."""

    layers: list[int]
    dtype: str  # storage dtype: bf16 | fp16 | fp32
    adapter: AdapterRef | None = None
    pack: str = "auto"  # auto | on | off: packed (padding-free) batches, extractors.packing


def unit_batches(layout: Layout, rows: list[int], batch_tokens: int) -> list[Batch]:
    """The batches of one unit's rows: sorted by (length, row_id), packed greedily up to
    batch_tokens padded tokens. A function of the unit's rows alone, so a resumed run
    recomputes a unit with the very batches an uninterrupted run used."""
    order = sorted(rows, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
    return plan_batches(layout.lengths, order, batch_tokens)


def unit_packs(layout: Layout, rows: list[int], batch_tokens: int) -> list[Batch]:
    """The packed batches of one unit's rows: sorted by (length, row_id), up to batch_tokens real
    tokens each (extractors.packing.plan_packs). Like unit_batches, a function of the unit alone."""
    order = sorted(rows, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
    return plan_packs(layout.lengths, order, batch_tokens)


def packed_slots(layout: Layout, b: Batch, lo: int) -> np.ndarray:
    """The unit-buffer slots of a packed batch's tokens, in pack order (row after row)."""
    lens = np.asarray(b.lengths, dtype=np.int64)
    starts = np.asarray([layout.tok_starts[i] - lo for i in b.rows], dtype=np.int64)
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)


def token_index(layout: Layout, b: Batch, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) for a batch: flat positions of its real tokens in the padded [B*T] batch,
    and their slots in the unit buffer (row after row). Vectorized: no per-token Python."""
    lens = np.asarray(b.lengths, dtype=np.int64)
    n = int(lens.sum())
    first = np.repeat(np.cumsum(lens) - lens, lens)  # index of each token's row start
    pos = np.arange(n, dtype=np.int64) - first  # token position within its row
    rows = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    starts = np.asarray([layout.tok_starts[i] - lo for i in b.rows], dtype=np.int64)
    return rows * b.width + pos, starts[rows] + pos


def to_storage(h: torch.Tensor, dtype: str) -> torch.Tensor:
    """Same bits as store.arrays.encode(tensor, dtype), computed where the tensor lives."""
    if dtype == "bf16":
        return h.to(torch.bfloat16).view(torch.int16)
    return h.to({"fp16": torch.float16, "fp32": torch.float32}[dtype])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host (pinned source on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class HiddenStates(ArrayKind):
    """The array kind: forward passes that capture the requested layers."""

    run_kind = "extract_hidden"

    def __init__(
        self,
        store: Store,
        lm: Any,
        layout: Layout,
        layers: list[int],
        dtype: str,
        batch_tokens: int,
        adapter: AdapterRef | None = None,
        pack: str = "auto",
    ):
        self.lm, self.layout, self.layers, self.dtype, self.batch_tokens = lm, layout, layers, dtype, batch_tokens
        self.adapter = adapter
        self.packed = use_packing(lm.model, pack)
        self.names = [hidden_array_name(L, adapter.name if adapter else None) for L in layers]
        self.desc = f"extract {','.join(map(str, layers))}"
        self.store = store
        self.batches: list[Batch] = []
        self.fwd_s, self.events = 0.0, []

    def specs(self, run_id: str) -> list[ArraySpec]:
        lm, d_model = self.lm, self.lm.model.config.hidden_size
        attrs = {
            "model": lm.model_id,
            "model_hash": lm.model_hash,
            "tokenization": self.layout.tokenization,
            "run_id": run_id,
            "kind": "hidden",
            "d_model": d_model,
            "layer_convention": "output of decoder block L (0-based) = transformers hidden_states[L+1]",
        }
        extra = None
        if self.adapter is not None:  # base arrays keep their attributes exactly as before adapters existed
            attrs.update(adapter_attrs(self.adapter))
            extra = {"adapter": self.adapter.name}
        return [
            ArraySpec(n, d_model, self.dtype, {**attrs, "layer": L}, "hidden", L, extra)
            for L, n in zip(self.layers, self.names, strict=False)
        ]

    def plan(self, work: list[UnitWork]) -> None:
        self.ids = row_token_ids(
            self.store, self.layout.tokenization, [self.layout.row_ids[i] for w in work for i in w.rows]
        )

    def __enter__(self) -> HiddenStates:
        self._cap = (PackedForward if self.packed else LayerCapture)(self.lm.model, self.layers).__enter__()
        self._inference = torch.inference_mode()
        self._inference.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inference.__exit__(*exc)
        self._cap.__exit__(*exc)

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        layout, dev = self.layout, self.lm.device
        cuda = dev.type == "cuda"
        pad_id = pad_token_id(self.lm.tokenizer)
        batches = (unit_packs if self.packed else unit_batches)(layout, work.rows, self.batch_tokens)
        self.batches += batches
        for b in batches:
            if self.packed:
                src, dst = None, to_device(torch.from_numpy(packed_slots(layout, b, lo)), dev)
            else:
                x = pad_batch([self.ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, dev)
                src, dst = (to_device(torch.from_numpy(a), dev) for a in token_index(layout, b, lo))
            if cuda:
                self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                self.events[-1][0].record()
            else:
                tf = time.perf_counter()
            if self.packed:
                out = self._cap.run([self.ids[layout.row_ids[i]] for i in b.rows], dev)
            else:
                out = self._cap.capture(x)
            if cuda:
                self.events[-1][1].record()
            else:
                self.fwd_s += time.perf_counter() - tf
            for L, n in zip(self.layers, self.names, strict=False):
                h = out[L].reshape(-1, out[L].shape[-1])
                h = h if src is None else h.index_select(0, src)
                stage[n].index_copy_(0, dst, to_storage(h, self.dtype))
            tick(sum(b.lengths))

    def forward_seconds(self) -> float:
        if self.events:  # all recorded work is done: the writer waited on every unit
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        return self.fwd_s

    def counts(self) -> dict[str, Any]:
        cost = attention_cost(self.batches, self.packed)
        return {
            "batches": len(self.batches),
            "packed": self.packed,
            "padding_fraction": 0.0 if self.packed else round(padding_fraction(self.batches), 4),
            **{k: round(v, 2) for k, v in cost.items()},
        }

    def metrics(self, seconds: float) -> dict[str, Any]:
        fwd = self.forward_seconds()
        tokens = sum(sum(b.lengths) for b in self.batches)
        return {"forward_seconds": fwd, "forward_tokens_per_s": tokens / fwd if fwd else 0.0}


def extract_hidden(
    store: Store,
    lm: Any,
    layout: Layout,
    selected: list[str],
    spec: HiddenSpec,
    *,
    batch_tokens: int,
    run_config: dict,
    rank: int = 0,
    world_size: int = 1,
    writers: int | None = None,
    resident: bool | None = None,
    claim_timeout: float = 3600.0,
    progress: bool = True,
) -> ExtractResult:
    """Fill hidden/[<adapter>/]layer_L for the selected rows (see the module docstring)."""
    layers = validate_layers(spec.layers, len(decoder_layers(lm.model)), lm.model_id)
    kind = HiddenStates(store, lm, layout, layers, spec.dtype, batch_tokens, spec.adapter, spec.pack)
    res = extract_units(
        store,
        layout,
        selected,
        kind,
        run_config=run_config,
        device=lm.device,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=layers,
        engine=UnitOptions(rank, world_size, writers, resident, claim_timeout, progress),
    )
    if res.skipped:
        return ExtractResult(None, 0, 0, 0.0, 0.0, 0.0, 0.0, True)
    m = res.metrics
    return ExtractResult(
        res.run_id,
        res.rows,
        res.tokens,
        res.seconds,
        m["tokens_per_s"],
        m["forward_tokens_per_s"],
        res.counts["padding_fraction"],
        False,
    )
