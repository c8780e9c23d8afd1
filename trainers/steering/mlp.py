"""The small MLPs of the gradient workflow (token selector, layer selector): fit, save, load.

An MLP here is `Linear -> ReLU -> Dropout` per hidden size, then `Linear(-, 1)`: one logit,
trained with binary cross-entropy (`pos_weight` scales the positives' term, as in
`torch.nn.BCEWithLogitsLoss`) by AdamW over minibatches. Features are z-scored with the
training set's mean and std, which the checkpoint keeps, so a checkpoint scores raw features.

Deterministic for a seed: initialisation, dropout and the minibatch order all draw from a
forked RNG seeded with `seed`, and CPU training runs on one thread (trainers.probes.logreg
.single_threaded), so the same inputs give bit-identical weights on any core count.

Checkpoints are `<stem>.safetensors` (the layers' weights, `mean`, `std`) plus `<stem>.json`
(the architecture, `feature_keys` and whatever metadata the trainer adds); never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from store.core import StoreError, write_json
from trainers.probes.logreg import single_threaded


def build_mlp(d_in: int, hidden: list[int], dropout: float) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    d = d_in
    for h in hidden:
        layers += [torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        d = h
    layers.append(torch.nn.Linear(d, 1))
    return torch.nn.Sequential(*layers)


def z_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the columns, std floored at 1e-6 so constant features stay 0."""
    x = np.asarray(X, dtype=np.float64)
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)


class MLP(NamedTuple):
    net: torch.nn.Sequential
    mean: np.ndarray
    std: np.ndarray
    meta: dict[str, Any]

    @torch.no_grad()
    def logits(self, X: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Raw features [n, d] -> logits [n] (float32), on CPU."""
        self.net.eval()
        Z = torch.from_numpy(((np.asarray(X, np.float32) - self.mean) / self.std).astype(np.float32))
        out = [self.net(Z[s : s + batch]).squeeze(-1) for s in range(0, len(Z), batch)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def fit_mlp(
    X: np.ndarray,
    y: np.ndarray,
    *,
    hidden: list[int],
    dropout: float,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    pos_weight: float | None = None,
    sample_weight: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    progress: Any = None,
) -> tuple[MLP, list[float]]:
    """Fit on raw features X [n, d] with labels y in {0, 1}; returns the MLP and the mean loss
    of each epoch. `progress`, a tqdm bar, is advanced once per epoch."""
    mean, std = z_stats(X)
    Z = torch.from_numpy(((X - mean) / std).astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, np.float32))
    w = torch.ones(len(yt)) if sample_weight is None else torch.from_numpy(np.asarray(sample_weight, np.float32))
    if pos_weight is not None:
        w = torch.where(yt > 0.5, w * float(pos_weight), w)
    losses: list[float] = []
    with single_threaded(torch.device("cpu")), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_mlp(Z.shape[1], list(hidden), dropout)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(Z), generator=gen)
            tot = 0.0
            for s in range(0, len(Z), batch_size):
                idx = perm[s : s + batch_size]
                out = net(Z[idx]).squeeze(-1)
                loss = (
                    torch.nn.functional.binary_cross_entropy_with_logits(out, yt[idx], reduction="none") * w[idx]
                ).sum() / w[idx].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / max(len(Z), 1))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
    net.eval()
    arch = {"d_in": int(Z.shape[1]), "hidden": list(hidden), "dropout": dropout}
    return MLP(net, mean, std, {**(meta or {}), "architecture": arch}), losses


def save_mlp(mlp: MLP, stem: Path) -> tuple[Path, Path]:
    """Write <stem>.safetensors and <stem>.json; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in mlp.net.state_dict().items()}
    tensors["mean"], tensors["std"] = torch.from_numpy(mlp.mean), torch.from_numpy(mlp.std)
    st = stem.with_suffix(".safetensors")
    save_file(tensors, str(st))
    js = write_json(stem.with_suffix(".json"), mlp.meta)
    return st, js


def load_mlp(path: str | Path) -> MLP:
    """A checkpoint from `save_mlp`, given either of its two files (or their common stem)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not st.is_file() or not js.is_file():
        raise StoreError(f"checkpoint {path}: need both {st.name} and {js.name} beside each other")
    meta = json.loads(js.read_text())
    t = load_file(str(st))
    arch = meta["architecture"]
    net = build_mlp(arch["d_in"], arch["hidden"], arch["dropout"])
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
    net.eval()
    return MLP(net, t["mean"].numpy(), t["std"].numpy(), meta)
