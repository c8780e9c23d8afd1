"""QA metrics of an SAE on held-out rows: reconstruction and the model's loss with it spliced in.

Reconstruction (on the view's tokens of the eval split, read from the store):
* `mse`: mean squared error per element; `mse_per_token`: mean of ||x - x_hat||^2;
* `explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 and `fvu` = 1 - that
  (sae-lens' definition, over the whole held-out set);
* `l0`: mean number of active features per token; `dead_fraction`: features that never fire
  on the held-out tokens;
* baselines on the same tokens: an untrained SAE of the same shape and initialization, and
  PCA with as many components as the SAE's mean L0 (the best linear code of that size).

Splice (on the first `ce_rows` eval rows): the model runs in full, and a forward hook on
decoder block L replaces the residual stream at the view's token positions (never the
special/template tokens, which the SAE was not trained on) with
  * `sae`: the SAE reconstruction, `zero`: zeros, `mean`: the training tokens' mean,
and the next-token cross-entropy over every position of those rows is compared with the
clean run: `ce_increase` = CE(sae) - CE(clean), `ce_loss_recovered` =
(CE(zero) - CE(sae)) / (CE(zero) - CE(clean)), and the same against mean ablation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from extractors.forward import pad_batch, plan_batches
from extractors.model import decoder_layers, pad_token_id


@torch.no_grad()
def encode_decode(sae: Any, X: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, per-token L0) of X through the SAE, in batches."""
    recon, l0 = [], []
    for s in range(0, len(X), batch):
        acts = sae.encode(X[s: s + batch])
        recon.append(sae.decode(acts))
        l0.append((acts > 0).sum(-1))
    return torch.cat(recon), torch.cat(l0)


@torch.no_grad()
def firing_counts(sae: Any, X: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for s in range(0, len(X), batch):
        counts += (sae.encode(X[s: s + batch]) > 0).sum(0).cpu()
    return counts


def recon_metrics(sae: Any, X: torch.Tensor) -> dict[str, float]:
    recon, l0 = encode_decode(sae, X)
    err = (X - recon).pow(2).sum(-1)
    var = (X - X.mean(0)).pow(2).sum(-1)
    ev = 1.0 - float(err.sum() / var.sum())
    fires = firing_counts(sae, X)
    return {"n_tokens": len(X), "mse": float(err.mean() / X.shape[1]), "mse_per_token": float(err.mean()),
            "explained_variance": ev, "fvu": 1.0 - ev, "l0": float(l0.float().mean()),
            "dead_fraction": float((fires == 0).float().mean()), "dead_features": int((fires == 0).sum()),
            "mean_norm": float(X.norm(dim=-1).mean())}


def pca_explained_variance(X_fit: torch.Tensor, X_eval: torch.Tensor, n_components: int) -> float:
    """Explained variance on X_eval of the top-n principal components of X_fit."""
    Xf = X_fit.double()
    mu = Xf.mean(0)
    _, vecs = torch.linalg.eigh(torch.cov((Xf - mu).T))
    V = vecs[:, -n_components:]
    Xe = X_eval.double() - mu
    err = (Xe - Xe @ V @ V.T).pow(2).sum()
    return 1.0 - float(err / (Xe - Xe.mean(0)).pow(2).sum())


class _Splice:
    """Forward hook on one decoder block: replace the residual at masked positions."""

    def __init__(self, block: Any):
        self.block, self.fn, self.mask = block, None, None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, _mod, _inp, out):
        if self.fn is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[self.mask] = self.fn(h[self.mask]).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def remove(self) -> None:
        self.handle.remove()


@torch.no_grad()
def splice_ce(lm: Any, sae: Any, layer: int, rows: list[list[int]], positions: list[np.ndarray],
              mean_vec: torch.Tensor, *, batch_tokens: int = 2048, progress: bool = True) -> dict[str, float]:
    """Next-token CE of the model on `rows` (token id lists), clean and with the residual after
    block `layer` replaced at `positions` (per row) by the SAE's reconstruction, zeros or the mean."""
    model, device = lm.model, lm.device
    pad_id = pad_token_id(lm.tokenizer)
    mean_vec = mean_vec.to(device)
    variants = {
        "clean": None,
        "sae": lambda h: sae(h.to(sae.dtype).to(sae.device)).to(h.device),
        "zero": lambda h: torch.zeros_like(h),
        "mean": lambda h: mean_vec.expand_as(h),
    }
    lengths = [len(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    batches = plan_batches(lengths, order, batch_tokens)
    totals = {k: 0.0 for k in variants}
    n_pred = 0
    splice = _Splice(decoder_layers(model)[layer])
    bar = tqdm(total=len(batches) * len(variants), desc="CE splice", unit="pass", disable=not progress)
    try:
        for b in batches:
            ids = pad_batch([rows[i] for i in b.rows], b.width, pad_id, device)
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for j, i in enumerate(b.rows):
                mask[j, torch.as_tensor(positions[i], device=device)] = True
            tgt_ok = torch.arange(b.width, device=device)[None, 1:] < torch.as_tensor(b.lengths, device=device)[:, None]
            for name, fn in variants.items():
                splice.fn, splice.mask = fn, mask
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
                totals[name] += float(ce[tgt_ok.reshape(-1)].sum())
                bar.update(1)
            n_pred += int(tgt_ok.sum())
    finally:
        splice.remove()
        bar.close()
    ce = {k: v / max(n_pred, 1) for k, v in totals.items()}

    def recovered(ref: str) -> float:
        gap = ce[ref] - ce["clean"]
        return float((ce[ref] - ce["sae"]) / gap) if gap > 0 else float("nan")

    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"], "ce_increase": ce["sae"] - ce["clean"],
            "ce_loss_recovered_vs_zero": recovered("zero"), "ce_loss_recovered_vs_mean": recovered("mean"),
            "ce_rows": len(rows), "ce_predicted_tokens": n_pred,
            "ce_spliced_tokens": int(sum(len(p) for p in positions))}
