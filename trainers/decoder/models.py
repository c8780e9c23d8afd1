"""The decoders: SAE features (sparse) or residual vectors -> next-token logits through the frozen
model's final norm and unembedding.

Every decoder maps its input to a d_model vector z and reads it out with the frozen model's own
final norm and unembedding (logits = W_U norm(z), the logit lens' read-out), so what is learned is
the map into the residual stream, not a second copy of the 49,152 x 576 unembedding:

* `linear` (SAE codes): z = codes @ W + b with W [d_sae, d_model], initialised at the SAE's own
  decoder (W_dec, b_dec): at step 0 the decoder is the logit lens of the SAE's reconstruction. The
  codes stay a sparse COO tensor: one sparse-dense matmul per batch, never a dense [B, d_sae].
* `transformer` (SAE codes): the same linear path plus a small causal transformer over the row's
  feature vectors (input projection d_sae -> d_model_dec as a sparse matmul, n_layers pre-norm
  blocks, output projection to d_model, zero-initialised so step 0 equals `linear`).
* `residual` (baseline): z = h @ A + c on the raw residual stream h of the same layer and tokens,
  A initialised at the identity: at step 0 it is exactly the logit lens at that layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FrozenReadout(nn.Module):
    """logits = head(norm(z)) with the frozen model's modules (no gradients to their weights)."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head  # not registered as trainable: requires_grad is off
        for p in [*norm.parameters(), *head.parameters()]:
            p.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dt = self.head.weight.dtype
        return self.head(self.norm(z.to(dt))).float()


class LinearDecoder(nn.Module):
    arch = "linear"

    def __init__(self, W_dec: torch.Tensor, b_dec: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(W_dec.detach().float().clone())
        self.b = nn.Parameter(b_dec.detach().float().clone())

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(codes, self.W) + self.b

    def forward(self, codes: torch.Tensor, row_lengths: torch.Tensor) -> torch.Tensor:
        return self.embed(codes)


def pad_rows(x: torch.Tensor, row_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat [n, d] tokens -> right-padded [R, T, d] and the flat positions' mask [R, T]."""
    lens = row_lengths.tolist()
    T = max(lens)
    mask = torch.arange(T)[None, :] < row_lengths[:, None]
    out = x.new_zeros(len(lens), T, x.shape[-1])
    out[mask] = x
    return out, mask


class TransformerDecoder(LinearDecoder):
    arch = "transformer"

    def __init__(self, W_dec: torch.Tensor, b_dec: torch.Tensor, n_layers: int, d_model: int, n_heads: int = 4):
        super().__init__(W_dec, b_dec)
        d_sae, d_out = W_dec.shape
        self.W_in = nn.Parameter(torch.randn(d_sae, d_model) / d_sae**0.5)
        block = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, codes: torch.Tensor, row_lengths: torch.Tensor) -> torch.Tensor:
        x, mask = pad_rows(torch.sparse.mm(codes, self.W_in), row_lengths)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        y = self.blocks(x, mask=causal, is_causal=True)  # right padding: real tokens never see it
        return self.embed(codes) + self.out(self.out_norm(y[mask]))


class ResidualLinear(nn.Module):
    arch = "residual"

    def __init__(self, d_model: int):
        super().__init__()
        self.A = nn.Parameter(torch.eye(d_model))
        self.c = nn.Parameter(torch.zeros(d_model))

    def forward(self, h: torch.Tensor, row_lengths: torch.Tensor) -> torch.Tensor:
        return h @ self.A + self.c


def build_decoder(arch: str, sae: Any, n_layers: int, d_model: int) -> LinearDecoder:
    W_dec, b_dec = sae.W_dec.detach().cpu(), sae.b_dec.detach().cpu()
    if arch == "linear":
        return LinearDecoder(W_dec, b_dec)
    return TransformerDecoder(W_dec, b_dec, n_layers, d_model)
