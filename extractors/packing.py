"""Padding-free (packed) forward passes whose activations are exactly each row's own.

A packed batch is its rows' tokens laid end to end in one sequence `[1, N]` (N = the real
tokens, no padding), with position ids that restart at 0 for every row, so RoPE sees each
row's own positions. Everything but attention (embeddings, norms, the projections, the MLPs:
~90 % of a forward's FLOPs at these lengths) runs on the N real tokens alone.

Attention keeps each row to itself without a [N, N] block-diagonal mask: for the duration of
the pass the model's attention implementation is `packed_sdpa` (registered in transformers'
`AttentionInterface`), which gathers each layer's queries, keys and values into a
`[rows, heads, longest, head_dim]` batch (a row's tail beyond its length repeats its last
token), runs transformers' own `sdpa_attention_forward` on it with `is_causal=True` and no
mask, exactly as the padded path does, and scatters the real positions back. Under causal
attention a real query only sees keys at earlier positions of its row, all real, so the
padded tail is never read. Attention over a pack therefore costs what per-row attention
costs (the sum of the rows' causal triangles, padded to the batch's longest row), never the
square of the pack length; a dense block-diagonal mask over the pack (what transformers builds
from restarting position ids with `sdpa`, and what SAELens' windows pay without the mask) would
cost N^2 per pack and, on a CPU, more than the padding it saves. So there is no pack length to
trade off: a batch holds rows up to `batch_tokens` real tokens, a longer row a batch of its own.

The result equals each row run alone up to float rounding: the projections' matmuls see
[N, d] instead of [B*T, d] inputs and may sum in another order. The attention part is the
padded path's own call on the same rows.

`packed` (`--pack auto|on|off`): `auto` packs when the model routes attention through
transformers' attention interface with sdpa (`_supports_attention_backend` and
`_attn_implementation == "sdpa"`: Llama, Mistral, Qwen, Gemma in transformers 5), else pads.
A model that ignores the interface is caught on the first pass (the attention function never
ran), not silently wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from extractors.forward import Batch, _Stop
from extractors.model import decoder_layers

ATTN_NAME = "packed_sdpa"
PACK_MODES = ("auto", "on", "off")


@dataclass
class PackIndex:
    """Where a packed batch's tokens go for attention: `gather` [rows*width] positions in the
    packed sequence (row j, position t -> start_j + min(t, len_j - 1)), `scatter` [N] positions
    of the real tokens in that [rows*width] layout; `calls` counts the attention calls."""

    rows: int
    width: int
    gather: torch.Tensor
    scatter: torch.Tensor
    calls: int = 0


def plan_packs(lengths: list[int], order: list[int], batch_tokens: int) -> list[Batch]:
    """Greedy packed batches over rows in `order` (sorted by length): up to batch_tokens real
    tokens each (no padding is ever added); a longer row gets a batch of its own. `width` is
    the longest row, the attention's padded width."""
    batches: list[Batch] = []
    cur: list[int] = []
    total = 0
    for i in order:
        if cur and total + lengths[i] > batch_tokens:
            batches.append(Batch(cur, [lengths[j] for j in cur], max(lengths[j] for j in cur)))
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        batches.append(Batch(cur, [lengths[j] for j in cur], max(lengths[j] for j in cur)))
    return batches


def attention_cost(batches: list[Batch], packed: bool) -> dict[str, float]:
    """Per real token: the query-key pairs attention computes (causal, over the batch's padded
    width), the pairs a row alone needs, and the token slots the dense layers run on."""
    real = sum(sum(b.lengths) for b in batches)
    pairs = sum(len(b.rows) * b.width * (b.width + 1) / 2 for b in batches)
    need = sum(n * (n + 1) / 2 for b in batches for n in b.lengths)
    slots = real if packed else sum(len(b.rows) * b.width for b in batches)
    return {
        "attention_pairs_per_token": pairs / real if real else 0.0,
        "row_attention_pairs_per_token": need / real if real else 0.0,
        "dense_slots_per_token": slots / real if real else 0.0,
    }


def pack_index(lengths: list[int], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position_ids [N], gather [rows*width], scatter [N]) of one packed batch (numpy)."""
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
    t = np.minimum(np.arange(width, dtype=np.int64)[None, :], lens[:, None] - 1)
    gather = (starts[:, None] + t).reshape(-1)
    scatter = np.repeat(np.arange(len(lens), dtype=np.int64), lens) * width + pos
    return pos, gather, scatter


def packed_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_rows: PackIndex | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-row causal attention over a packed [1, heads, N, head_dim] batch (module docstring);
    without `packed_rows` (a pass that is not packed) it is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: heavy

    if packed_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    p = packed_rows
    p.calls += 1

    def rows(t: torch.Tensor) -> torch.Tensor:  # [1, h, N, D] -> [rows, h, width, D], the padded layout
        g = t[0].transpose(0, 1).index_select(0, p.gather)
        return g.view(p.rows, p.width, *g.shape[1:]).transpose(1, 2)

    kwargs.pop("is_causal", None)
    out, _ = sdpa_attention_forward(module, rows(query), rows(key), rows(value), None, dropout, scaling, True, **kwargs)
    return out.reshape(p.rows * p.width, *out.shape[2:]).index_select(0, p.scatter).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface  # lazy: heavy
    from transformers.masking_utils import AttentionMaskInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, packed_sdpa)
        # No mask: packed_sdpa keeps rows apart itself (a [N, N] mask would cost N^2 to build).
        AttentionMaskInterface.register(ATTN_NAME, lambda *a, **k: None)


def supports_packing(model: Any) -> bool:
    """Whether `--pack auto` packs this model (see the module docstring)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = getattr(base.config, "_attn_implementation", None)
    return bool(getattr(base, "_supports_attention_backend", False)) and impl in ("sdpa", ATTN_NAME)


def use_packing(model: Any, mode: str) -> bool:
    """`--pack` resolved for a model: on, off, or auto (supports_packing)."""
    if mode not in PACK_MODES:
        raise ValueError(f"--pack {mode!r} is not one of {', '.join(PACK_MODES)}")
    if mode == "on" and not supports_packing(model):
        raise ValueError(
            f"--pack on needs a model whose attention runs through transformers' sdpa interface; "
            f"{type(model).__name__} does not: use --pack auto or off"
        )
    return mode == "on" or (mode == "auto" and supports_packing(model))


class PackedForward:
    """Context manager: `run(token_ids)` runs one packed batch and returns {key: [N, d]} per
    real token, row after row, for the `layers` (block outputs) and any `modules` hooked by
    name (e.g. {"norm": final_norm} for logits). With no `modules` the pass stops after the
    deepest layer. The model's attention is `packed_sdpa` only inside the context."""

    def __init__(self, model: Any, layers: list[int], modules: dict[str, Any] | None = None):
        self.model, self.layers, self.modules = model, sorted(layers), dict(modules or {})
        self._out: dict[Any, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._configs: list[tuple[Any, Any]] = []

    def __enter__(self) -> PackedForward:
        _register()
        blocks = decoder_layers(self.model)
        deepest = self.layers[-1] if self.layers and not self.modules else None
        for L in self.layers:

            def hook(_m, _i, out, L=L):
                self._out[L] = out[0] if isinstance(out, tuple) else out
                if L == deepest:
                    raise _Stop

            self._handles.append(blocks[L].register_forward_hook(hook))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(lambda _m, _i, o, n=name: self._out.__setitem__(n, o)))
        seen: dict[int, Any] = {}
        for m in self.model.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation") and id(c) not in seen:
                seen[id(c)] = c
        self._configs = [(c, c._attn_implementation) for c in seen.values()]
        for c, _ in self._configs:
            c._attn_implementation = ATTN_NAME
        return self

    def __exit__(self, *exc: Any) -> None:
        for c, old in self._configs:
            c._attn_implementation = old
        self._configs.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(self, token_ids: list[list[int]], device: torch.device) -> dict[Any, torch.Tensor]:
        lengths = [len(t) for t in token_ids]
        width = max(lengths)
        pos, gather, scatter = pack_index(lengths, width)
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_ids])
        x, pid, g, s = (_to(torch.from_numpy(a), device).unsqueeze(0) for a in (flat, pos, gather, scatter))
        p = PackIndex(len(lengths), width, g[0], s[0])
        self._out = {}
        try:
            self.model(input_ids=x, position_ids=pid, use_cache=False, packed_rows=p, logits_to_keep=1)
        except _Stop:
            pass
        if not p.calls:
            raise RuntimeError(
                f"{type(self.model).__name__} did not run its attention through transformers' attention "
                "interface, so a packed batch would mix rows; use --pack off"
            )
        return {k: v.reshape(-1, v.shape[-1]) for k, v in self._out.items()}


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def packed_forward(
    model: Any,
    token_ids: list[list[int]],
    layers: list[int],
    *,
    batch_tokens: int,
    device: torch.device,
    modules: dict[str, Any] | None = None,
) -> Iterator[tuple[list[int], dict[Any, torch.Tensor]]]:
    """The packed forward of a unit's rows as one call: yields, batch by batch, (the indices of
    the batch's rows in `token_ids`, {layer or module name: [tokens, d]} row after row). Rows are
    batched by (length, index), so the batches depend on the rows alone (exact resume)."""
    lengths = [len(t) for t in token_ids]
    order = sorted(range(len(token_ids)), key=lambda i: (lengths[i], i))
    with PackedForward(model, layers, modules) as fwd:
        for b in plan_packs(lengths, order, batch_tokens):
            yield b.rows, fwd.run([token_ids[i] for i in b.rows], device)
