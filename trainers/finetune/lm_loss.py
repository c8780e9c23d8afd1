"""Completion-only language-model loss on stored rows, per row, for finetuning and eval loss.

The logits at position t-1 predict labels[t] (unshifted labels, as in extractors.sft_data);
positions labelled -100 (prompt, template, special tokens, padding) carry no loss. Only the
supervised positions go through the output head: the decoder's last hidden states are
gathered at those positions before `lm_head`, which skips the vocabulary-wide matmul (49k
columns for SmolLM2) at every prompt token. The result is the same cross-entropy a full
`model(input_ids, labels=...)` computes; models whose head does more than a linear layer
(logit soft-capping, scaled logits) take the full-logits path.

    loss_sum, n = row_losses(model, ids, labels, device=dev, pad_id=0)   # per-row sums, counts
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from extractors.sft_data import IGNORE


def pad_right(seqs: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output head) of a causal LM (a peft model is unwrapped), or None when the head
    is not a plain linear map of the last hidden state."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    try:
        dec, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if dec is None or not isinstance(head, torch.nn.Linear):
        return None
    return dec, head


def row_losses(
    model: Any, input_ids: list[list[int]], labels: list[list[int]], *, device: torch.device, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy per row [B] in float32, supervised tokens per row [B]); differentiable."""
    x = pad_right(input_ids, pad_id, device)
    y = pad_right(labels, IGNORE, device)
    attn = pad_right([[1] * len(s) for s in input_ids], 0, device)
    target = y[:, 1:]
    mask = target != IGNORE
    rows = torch.arange(len(input_ids), device=device).unsqueeze(1).expand_as(target)[mask]
    split = _split_head(model)
    if split is not None:
        dec, head = split
        h = dec(input_ids=x, attention_mask=attn).last_hidden_state[:, :-1]
        logits = head(h[mask])
    else:
        logits = model(input_ids=x, attention_mask=attn).logits[:, :-1][mask]
    ce = F.cross_entropy(logits.float(), target[mask], reduction="none")
    loss_sum = torch.zeros(len(input_ids), device=device, dtype=torch.float32).index_add(0, rows, ce)
    return loss_sum, mask.sum(1)


def batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive groups of `batch_size` indices of `order`."""
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def eval_rows(
    model: Any,
    input_ids: list[list[int]],
    labels: list[list[int]],
    *,
    device: torch.device,
    pad_id: int,
    batch_tokens: int = 8192,
    progress: bool = False,
    desc: str = "eval loss",
) -> tuple[list[float], list[int]]:
    """(summed loss, supervised tokens) per row, in eval mode, in length-sorted batches of at most
    `batch_tokens` padded tokens."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    sums, counts = [0.0] * len(input_ids), [0] * len(input_ids)
    bar = tqdm(total=len(order), desc=desc, unit="row", disable=not progress)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and len(input_ids[order[j]]) * (j - i + 1) <= batch_tokens:
            j += 1
        idx = order[i:j]
        s, n = row_losses(model, [input_ids[k] for k in idx], [labels[k] for k in idx], device=device, pad_id=pad_id)
        for k, sv, nv in zip(idx, s.tolist(), n.tolist(), strict=False):
            sums[k], counts[k] = sv, int(nv)
        bar.update(len(idx))
        i = j
    bar.close()
    model.train(was_training)
    return sums, counts
