"""The stored SAE code format: array names, top-k encoding and decoding.

A token's SAE code is its top k feature activations, sorted by decreasing value, stored as
two token-major Zarr arrays over the store's layout:

    sae/<sae_name>/layer_<L>/indices   [n_slots, k] uint16 (int32 when d_sae > 65535)
    sae/<sae_name>/layer_<L>/values    [n_slots, k] in the run's --dtype (bf16 by default)

and `sae/<sae_name>/<adapter>/layer_<L>/...` for the codes of base + a LoRA adapter's states.

A slot with value 0 is empty (its index is 0), so `sum_j values[t, j] * W_dec[indices[t, j]]
+ b_dec` decodes every token. Encoding runs in fixed slices of ENCODE_SLICE tokens, so the
codes do not depend on how a run was batched. This module is a leaf (it takes only the
adapter naming rule, extractors.adapters.layer_array_name): the code extractor, the catalog
tables, the trainers and the benchmarks all read the format from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from extractors.adapters import layer_array_name

DEFAULT_K = 64  # slots per token for SAEs without their own k (ReLU, JumpReLU, ...)
ENCODE_SLICE = 4096  # tokens per SAE encode call (fixed, so results do not depend on batching)


def code_array_names(sae_name: str, layer: int, adapter: str | None = None) -> tuple[str, str]:
    """(indices array, values array) of one SAE at one layer (of base + `adapter`'s states)."""
    base = layer_array_name(f"sae/{sae_name}", layer, adapter)
    return f"{base}/indices", f"{base}/values"


def index_dtype(d_sae: int) -> str:
    """Storage dtype of the indices: uint16 while feature ids fit, else int32."""
    return "uint16" if d_sae <= 65535 else "int32"


@torch.no_grad()
def encode_topk(
    sae: Any, X: torch.Tensor, k: int, slice_tokens: int = ENCODE_SLICE
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k (indices int64, values float32, sorted by decreasing value) of the SAE's
    activations of X [n, d_in]; zero slots get index 0. Also returns how many tokens had
    more than k active features (codes truncated; always 0 for TopK SAEs with this k)."""
    idx_out = np.zeros((len(X), k), dtype=np.int64)
    val_out = np.zeros((len(X), k), dtype=np.float32)
    truncated = 0
    for s in range(0, len(X), slice_tokens):
        acts = sae.encode(X[s : s + slice_tokens].to(sae.device, sae.dtype)).float()
        top = acts.topk(k, dim=-1, sorted=True)
        vals = top.values.clamp_min(0)
        idx = torch.where(vals > 0, top.indices, torch.zeros_like(top.indices))
        truncated += int(((acts > 0).sum(-1) > k).sum())
        idx_out[s : s + len(acts)] = idx.cpu().numpy()
        val_out[s : s + len(acts)] = vals.cpu().numpy()
    return idx_out, val_out, truncated


@torch.no_grad()
def decode_codes(sae: Any, indices: np.ndarray, values: np.ndarray, slice_tokens: int = ENCODE_SLICE) -> torch.Tensor:
    """Reconstructions from stored codes through the SAE's own decoder (dense activations)."""
    out = []
    for s in range(0, len(indices), slice_tokens):
        idx = torch.as_tensor(indices[s : s + slice_tokens].astype(np.int64), device=sae.device)
        val = torch.as_tensor(values[s : s + slice_tokens], dtype=sae.dtype, device=sae.device)
        acts = torch.zeros(len(idx), sae.cfg.d_sae, dtype=sae.dtype, device=sae.device)
        acts.scatter_add_(1, idx, val)  # zero slots add 0 to feature 0
        out.append(sae.decode(acts).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_in)
