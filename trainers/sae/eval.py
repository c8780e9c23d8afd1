"""QA metrics of an SAE on held-out rows: reconstruction and the model's loss with it spliced in.

Reconstruction (on the view's tokens of the eval split, read from the store):
* `mse`: mean squared error per element; `mse_per_token`: mean of ||x - x_hat||^2;
* `explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 and `fvu` = 1 - that
  (sae-lens' definition, over the whole held-out set);
* `nmse`: the MSE normalized by the input variance, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
  (the same number as `fvu`; the QA gate's name for it);
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
Beside CE, the KL divergence KL(clean || spliced) = sum_v p_clean(v) (log p_clean(v) - log
p_spliced(v)) of the next-token distributions, in nats per token, at the spliced positions
(the tokens whose residual was replaced; the others before them are untouched, and CE
already covers every position): `kl_mean`, `kl_share_above` (share of those tokens with KL
above `kl_bound`), `kl_max`, and the same mean for zero and mean ablation as a scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        acts = sae.encode(X[s : s + batch])
        recon.append(sae.decode(acts))
        l0.append((acts > 0).sum(-1))
    return torch.cat(recon), torch.cat(l0)


@torch.no_grad()
def firing_counts(sae: Any, X: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for s in range(0, len(X), batch):
        counts += (sae.encode(X[s : s + batch]) > 0).sum(0).cpu()
    return counts


def recon_metrics(sae: Any, X: torch.Tensor) -> dict[str, float]:
    recon, l0 = encode_decode(sae, X)
    err = (X - recon).pow(2).sum(-1)
    var = (X - X.mean(0)).pow(2).sum(-1)
    ev = 1.0 - float(err.sum() / var.sum())
    fires = firing_counts(sae, X)
    return {
        "n_tokens": len(X),
        "mse": float(err.mean() / X.shape[1]),
        "mse_per_token": float(err.mean()),
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "nmse": float(err.sum() / var.sum()),
        "l0": float(l0.float().mean()),
        "dead_fraction": float((fires == 0).float().mean()),
        "dead_features": int((fires == 0).sum()),
        "mean_norm": float(X.norm(dim=-1).mean()),
    }


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


VARIANTS = ("clean", "sae", "zero", "mean")


@torch.no_grad()
def splice_ce(
    lm: Any,
    sae: Any,
    layer: int,
    rows: list[list[int]],
    positions: list[np.ndarray],
    mean_vec: torch.Tensor | None,
    *,
    batch_tokens: int = 1024,
    progress: bool = True,
    variants: Sequence[str] = VARIANTS,
    kl_bound: float = 1.0,
    recon: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Next-token CE of the model on `rows` (token id lists), clean and with the residual after
    block `layer` replaced at `positions` (per row) by the SAE's reconstruction (or `recon(h)`),
    zeros or the mean; and KL(clean || spliced) per spliced token (see the module docstring).
    `variants` picks the passes (training-time evaluations run only clean and sae)."""
    model, device = lm.model, lm.device
    pad_id = pad_token_id(lm.tokenizer)
    fns: dict[str, Any] = {
        "clean": None,
        "sae": recon or (lambda h: sae(h.to(sae.dtype).to(sae.device)).to(h.device)),
        "zero": lambda h: torch.zeros_like(h),
        "mean": lambda h: mean_vec.to(h.device).expand_as(h),
    }
    unknown = [v for v in variants if v not in fns]
    if unknown or "clean" not in variants:
        raise ValueError(f"variants must include clean and be among {VARIANTS}, got {list(variants)}")
    variants = ["clean", *[v for v in VARIANTS if v in variants and v != "clean"]]  # clean first: KL needs it
    lengths = [len(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    batches = plan_batches(lengths, order, batch_tokens)
    totals = {k: 0.0 for k in variants}
    kl_sum = {k: 0.0 for k in variants if k != "clean"}
    kl_above, kl_max = 0, 0.0
    n_pred = n_kl = 0
    splice = _Splice(decoder_layers(model)[layer])
    bar = tqdm(total=len(batches) * len(variants), desc="CE/KL splice", unit="pass", disable=not progress)
    try:
        for b in batches:
            ids = pad_batch([rows[i] for i in b.rows], b.width, pad_id, device)
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for j, i in enumerate(b.rows):
                mask[j, torch.as_tensor(positions[i], device=device, dtype=torch.long)] = True
            tgt_ok = torch.arange(b.width, device=device)[None, 1:] < torch.as_tensor(b.lengths, device=device)[:, None]
            clean_logp = None
            for name in variants:
                splice.fn, splice.mask = fns[name], mask
                logp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
                nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                totals[name] += float(nll[tgt_ok].sum())
                if name == "clean":
                    clean_logp = logp
                else:  # KL(clean || spliced) = sum_v p_clean (log p_clean - log p_spliced)
                    kl = F.kl_div(logp[mask], clean_logp[mask], log_target=True, reduction="none").sum(-1)
                    kl_sum[name] += float(kl.sum())
                    if name == "sae":
                        kl_above += int((kl > kl_bound).sum())
                        kl_max = max(kl_max, float(kl.max()) if len(kl) else 0.0)
                del logp
                bar.update(1)
            n_pred += int(tgt_ok.sum())
            n_kl += int(mask.sum())
    finally:
        splice.remove()
        bar.close()
    ce = {k: v / max(n_pred, 1) for k, v in totals.items()}

    def recovered(ref: str) -> float:
        if ref not in ce:
            return float("nan")
        gap = ce[ref] - ce["clean"]
        return float((ce[ref] - ce["sae"]) / gap) if gap > 0 else float("nan")

    out = {
        "ce_clean": ce["clean"],
        "ce_rows": len(rows),
        "ce_predicted_tokens": n_pred,
        "ce_spliced_tokens": int(sum(len(p) for p in positions)),
        "kl_tokens": n_kl,
        "kl_bound": kl_bound,
    }
    if "sae" in ce:
        out.update(
            {
                "ce_sae": ce["sae"],
                "ce_increase": ce["sae"] - ce["clean"],
                "kl_mean": kl_sum["sae"] / max(n_kl, 1),
                "kl_share_above": kl_above / max(n_kl, 1),
                "kl_max": kl_max,
            }
        )
    for name, key in (("zero", "zero_ablation"), ("mean", "mean_ablation")):
        if name in ce:
            out[f"ce_{key}"] = ce[name]
            out[f"kl_{key}"] = kl_sum[name] / max(n_kl, 1)
            if "sae" in ce:
                out[f"ce_loss_recovered_vs_{name}"] = recovered(name)
    return out
