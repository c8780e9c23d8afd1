"""Logistic-regression probes in torch, deterministic, plus the metrics they are judged by.

`fit_logreg` minimises  sum_i w_i * BCE(x_i . coef + bias, y_i) / sum_i w_i  +  l2/2 * |coef|^2
(bias unpenalized) with Adam over fixed-order minibatches: the order comes from a CPU
`torch.Generator` seeded by the caller, the weights start at zero, and nothing else is
random, so the same inputs give bit-identical weights on CPU (`single_threaded` also makes
them independent of the core count; on CUDA, up to the nondeterminism of its reductions).

Features are standardized with training statistics (`standardize`); the probe keeps that
mean/std, and `raw_coef` folds them back so a probe applies to raw activations directly:
logit = x . (coef / std) + (bias - sum(coef * mean / std)).

Metrics (`binary_metrics`): AUROC, AUPRC (average precision) and the accuracy at the best
threshold on the logits (chosen on the same set, as a ceiling), via scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """On CPU, run torch with one intra-op thread, then restore the previous count.

    Probe steps are small (a [batch, d] matrix-vector product): with more threads they are
    dominated by thread hand-offs (measured 9x slower with 2 threads on a busy 2-core
    machine), and one thread makes the float sums, hence the weights, independent of the
    machine's core count."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Standardizer(NamedTuple):
    mean: np.ndarray  # [d] float32
    std: np.ndarray  # [d] float32 (floored at 1e-6: constant features stay 0)


class FitResult(NamedTuple):
    coef: torch.Tensor  # [d] in standardized feature space (float32 on CPU)
    bias: torch.Tensor  # [1]
    train_loss: float  # final epoch's mean objective
    steps: int


def standardize(X: np.ndarray) -> Standardizer:
    x = X.astype(np.float64, copy=False)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return Standardizer(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))


def to_device(X: np.ndarray, st: Standardizer, device: torch.device, feature_dtype: str) -> torch.Tensor:
    """(X - mean) / std as a tensor on `device` in `feature_dtype` (computed in float32)."""
    z = (X - st.mean) / st.std
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(device=device, dtype=_DTYPES[feature_dtype])


def compute_dtype(feature_dtype: str) -> torch.dtype:
    return torch.float64 if feature_dtype == "float64" else torch.float32


def class_weights(y: np.ndarray) -> tuple[float, float]:
    """Weights for (negatives, positives) that give each class half of the loss: n / (2 n_c)."""
    n, n_pos = len(y), int(y.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return 1.0, 1.0
    return n / (2 * n_neg), n / (2 * n_pos)


@torch.no_grad()
def fit_logreg(
    Z: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor | None,
    *,
    l2: float,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> FitResult:
    """Fit on standardized features `Z` [n, d] (on any device); `y` in {0, 1}, float.

    The gradient is written out (d/dlogit BCE = sigmoid(logit) - y), which is exact and
    skips autograd's per-step overhead: these steps are tiny, and overhead dominated."""
    device = Z.device
    cdt = torch.float64 if Z.dtype == torch.float64 else torch.float32
    n, d = Z.shape
    coef = torch.zeros(d, dtype=cdt, device=device)
    bias = torch.zeros(1, dtype=cdt, device=device)
    coef.grad, bias.grad = torch.zeros_like(coef), torch.zeros_like(bias)
    opt = torch.optim.Adam([coef, bias], lr=lr, foreach=False)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    y = y.to(cdt)
    w = torch.ones(n, dtype=cdt, device=device) if sample_weight is None else sample_weight.to(cdt)
    Zc = Z.to(cdt) if batch_size >= n else None  # full batch: convert once
    steps, last = 0, float("nan")
    for _ in range(epochs):
        perm = None if Zc is not None else torch.randperm(n, generator=gen).to(device)
        tot = torch.zeros((), dtype=cdt, device=device)
        for s in range(0, n, batch_size):
            if perm is None:
                zb, yb, wb = Zc, y, w
            else:
                idx = perm[s : s + batch_size]
                zb, yb, wb = Z[idx].to(cdt), y[idx], w[idx]
            logits = torch.addmv(bias.expand(len(yb)), zb, coef)
            wsum = wb.sum()
            # weighted mean BCE, computed stably: softplus(x) - y * x
            bce = torch.nn.functional.softplus(logits) - yb * logits
            tot += (bce * wb).sum() + 0.5 * l2 * (coef * coef).sum() * wsum
            g = (torch.sigmoid(logits) - yb) * wb / wsum
            torch.mv(zb.t(), g, out=coef.grad)
            coef.grad.add_(coef, alpha=l2)
            bias.grad.copy_(g.sum().reshape(1))
            opt.step()
            steps += 1
        last = float(tot / w.sum())
    return FitResult(coef.float().cpu(), bias.float().cpu(), last, steps)


@torch.no_grad()
def logits_of(Z: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor, batch: int = 65536) -> np.ndarray:
    """Logits of standardized features (float32 numpy)."""
    cdt = torch.float64 if Z.dtype == torch.float64 else torch.float32
    c, b = coef.to(Z.device, cdt), bias.to(Z.device, cdt)
    out = [(Z[s : s + batch].to(cdt) @ c + b).float().cpu() for s in range(0, Z.shape[0], batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def raw_coef(coef: np.ndarray, bias: float, st: Standardizer) -> tuple[np.ndarray, float]:
    """The probe on raw activations: logit = x . coef_raw + bias_raw."""
    c = coef.astype(np.float64) / st.std
    return c.astype(np.float32), float(bias - (c * st.mean).sum())


def binary_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC, accuracy at logit 0 and at the best threshold; NaN when one class is absent."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.asarray(y).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n, n_pos = len(y), int(y.sum())
    out = {
        "n": n,
        "n_pos": n_pos,
        "auroc": float("nan"),
        "auprc": float("nan"),
        "accuracy_at_0": float(((s > 0) == (y == 1)).mean()) if n else float("nan"),
        "accuracy_best": float("nan"),
        "best_threshold": float("nan"),
    }
    if n == 0 or n_pos in (0, n):
        return out
    out["auroc"] = float(roc_auc_score(y, s))
    out["auprc"] = float(average_precision_score(y, s))
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    acc = (tpr * n_pos + (1 - fpr) * (n - n_pos)) / n
    i = int(np.argmax(acc))
    out["accuracy_best"] = float(acc[i])
    out["best_threshold"] = float(thr[i]) if np.isfinite(thr[i]) else float(s.max() + 1)
    return out
