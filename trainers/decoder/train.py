"""Training and evaluation of a decoder and its baselines over the same batches.

One pass over the training rows per epoch, in a seeded order of row batches: the SAE-feature
decoder and the residual-stream baseline (trainers.decoder.models) each take one AdamW step on the
same batch, with loss = CE(true next token) + kl_weight * KL_k(frozen || decoder)
(trainers.decoder.kl). Before training (epoch 0) and after each epoch both are evaluated on the
eval and OOD rows; the logit lens (the frozen read-out of the raw residual stream, untrained) and
the frozen model itself (from its stored top-k: KL 0, agreement 1) are evaluated once.

Metrics per (model, split), over the kept positions (trainers.decoder.data): `ce` (nats/token of
the true next token), `kl` (mean KL_k, nats/token), `kl_above_gate` (share of tokens whose KL_k
exceeds --max-kl), `accuracy` (top-1 = true next token), `agreement` (top-1 = the frozen model's
top-1). The frozen model's CE is exact where the true token is among its stored top k and the
bound -log(tail mass) elsewhere (a lower bound on that token's CE); `target_outside_topk` says
how often.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from trainers.decoder.data import Arrays, Batch, to_batch
from trainers.decoder.kl import frozen_buckets, stored_kl
from trainers.decoder.models import FrozenReadout

METRICS = ("ce", "kl", "kl_above_gate", "accuracy", "agreement")


class Fitted(NamedTuple):
    curves: list[dict[str, Any]]  # one record per (epoch, model, split)
    fixed: list[dict[str, Any]]  # logit lens and frozen model, per split
    best: dict[str, Any] | None  # {"epoch", "state", "metrics"} of the best passing decoder epoch
    seconds: dict[str, float]
    train_tokens: int


class Acc:
    """Sums of the per-token metrics of one (model, split)."""

    def __init__(self, max_kl: float):
        self.max_kl, self.s, self.n, self.outside = max_kl, np.zeros(5), 0, 0

    def add(self, logq: torch.Tensor, kl: torch.Tensor, b: Batch) -> None:
        top = logq.argmax(-1)
        ce = -logq.gather(1, b.target[:, None])[:, 0]
        self.s += [
            float(ce.sum()),
            float(kl.sum()),
            float((kl > self.max_kl).sum()),
            float((top == b.target).sum()),
            float((top == b.ids[:, 0]).sum()),
        ]
        self.n += len(kl)

    def result(self) -> dict[str, float]:
        out = {m: float(v / max(self.n, 1)) for m, v in zip(METRICS, self.s, strict=True)}
        return {**out, "n_tokens": self.n}


def _readout_kl(readout: FrozenReadout, z: torch.Tensor, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    kl, logq = stored_kl(readout(z), b.ids, b.values, b.lse)
    return kl, logq


def decoder_z(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    """The decoder's (or residual baseline's) d_model vectors at the kept positions."""
    x = b.hidden if model.arch == "residual" else b.codes
    return model(x, b.row_lengths)[b.keep]


def loss_of(model: torch.nn.Module, readout: FrozenReadout, b: Batch, kl_weight: float) -> torch.Tensor:
    kl, logq = _readout_kl(readout, decoder_z(model, b), b)
    ce = -logq.gather(1, b.target[:, None])[:, 0]
    return ce.mean() + kl_weight * kl.mean()


@torch.no_grad()
def evaluate(models: dict[str, Any], readout: FrozenReadout, batches: list[Batch], max_kl: float) -> dict[str, dict]:
    accs = {name: Acc(max_kl) for name in models}
    for b in batches:
        for name, m in models.items():
            kl, logq = _readout_kl(readout, m(b), b)
            accs[name].add(logq, kl, b)
    return {name: a.result() for name, a in accs.items()}


def frozen_metrics(batches: list[Batch], max_kl: float) -> dict[str, float]:
    """The frozen model from its stored top k (module docstring)."""
    s, n, outside = np.zeros(5), 0, 0
    for b in batches:
        logp_k, logp_t = frozen_buckets(b.values, b.lse)
        hit = b.ids == b.target[:, None]
        inside = hit.any(-1)
        ce = torch.where(inside, -(logp_k * hit).sum(-1), -logp_t)
        s += [float(ce.sum()), 0.0, 0.0, float((b.ids[:, 0] == b.target).sum()), float(len(ce))]
        n += len(ce)
        outside += int((~inside).sum())
    out = {m: float(v / max(n, 1)) for m, v in zip(METRICS, s, strict=True)}
    return {**out, "n_tokens": n, "target_outside_topk": outside / max(n, 1)}


def fit(
    decoder: torch.nn.Module,
    residual: torch.nn.Module,
    readout: FrozenReadout,
    train_ds: Any,
    eval_sets: dict[str, list[Batch]],
    arrays: Arrays,
    *,
    epochs: int,
    lr: float,
    kl_weight: float,
    max_kl: float,
    seed: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Fitted:
    """Train both, evaluate each epoch, keep the best decoder epoch that passes the gate."""
    models = {"decoder": decoder, "residual": residual}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for k, m in models.items()}
    fixed = []
    for split, batches in eval_sets.items():
        lens = evaluate({"logit_lens": lambda b: b.hidden[b.keep]}, readout, batches, max_kl)["logit_lens"]
        fixed += [
            {"model": "logit_lens", "split": split, **lens},
            {"model": "frozen", "split": split, **frozen_metrics(batches, max_kl)},
        ]
    curves: list[dict[str, Any]] = []
    secs = {"train": 0.0, "eval": 0.0}
    best: dict[str, Any] | None = None
    rng = np.random.default_rng(seed)
    train_tokens = 0

    def run_eval(epoch: int) -> None:
        nonlocal best
        t0 = time.perf_counter()
        fns = {k: (lambda b, m=m: decoder_z(m, b)) for k, m in models.items()}
        for m in models.values():
            m.eval()
        for split, batches in eval_sets.items():
            for name, r in evaluate(fns, readout, batches, max_kl).items():
                curves.append({"epoch": epoch, "model": name, "split": split, **r})
        secs["eval"] += time.perf_counter() - t0
        ev = next(c for c in curves if c["epoch"] == epoch and c["model"] == "decoder" and c["split"] == "eval")
        passes = ev["kl"] <= max_kl
        log(
            f"epoch {epoch}: decoder eval CE {ev['ce']:.3f}, KL {ev['kl']:.3f} nats/token "
            f"({'passes' if passes else 'above'} the gate {max_kl}), accuracy {ev['accuracy']:.3f}"
        )
        if epoch > 0 and passes and (best is None or ev["kl"] < best["metrics"]["kl"]):
            best = {"epoch": epoch, "state": copy.deepcopy(decoder.state_dict()), "metrics": ev}

    run_eval(0)
    for epoch in range(1, epochs + 1):
        for m in models.values():
            m.train()
        order = rng.permutation(len(train_ds))
        t0 = time.perf_counter()
        for i in tqdm(order, desc=f"decoder epoch {epoch}", unit="batch", disable=not progress):
            b = to_batch(train_ds[int(i)], arrays)
            train_tokens += len(b.target)
            for k, m in models.items():
                opts[k].zero_grad(set_to_none=True)
                loss_of(m, readout, b, kl_weight).backward()
                opts[k].step()
        secs["train"] += time.perf_counter() - t0
        run_eval(epoch)
    return Fitted(curves, fixed, best, secs, train_tokens)
