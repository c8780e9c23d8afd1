"""The training half of `python -m trainers.sae`: stored activations -> a sae-lens SAE.

Data: a view picks the tokens (default `content_tokens`: no special/template tokens, so no
attention sink at position 0), restricted to one split (default train_base) and sorted by
`tok_index`, so that position i of the selection always means the same token. The order of
training is a list of permutations of range(n), one per epoch, drawn from `seed` and saved
as `token_order.npy` in the run folder *before* training; `TokenStream` feeds them to
`store.materialize.iter_materialize(order=perm)`, which gathers each batch from the Zarr
chunks (sorted reads). Nothing is copied or rewritten: the run can be replayed exactly from
the store, the view SQL and that file.

Model: sae-lens' `TopKTrainingSAE` (default) or `StandardTrainingSAE` (ReLU + L1), driven by
`SAETrainer.step()` (its `fit()` logs only to wandb). Inputs are scaled to mean norm
sqrt(d_in) (sae-lens' "expected_average_only_in", estimated on the first batches of the
order) and b_dec starts at their mean; the scale is folded into the weights before saving,
so the saved SAE reads raw hidden states. TopK gets sae-lens' auxiliary loss for dead
latents (features silent for `dead_window` steps reconstruct the residual); the standard
SAE gets its L1 penalty with a warm-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from store.core import Store, StoreError
from store.materialize import iter_materialize, select, view_sql

CURVE_KEYS = {  # sae-lens log key -> our curve name
    "losses/overall_loss": "loss", "losses/mse_loss": "mse_loss",
    "losses/auxiliary_reconstruction_loss": "aux_loss", "losses/l1_loss": "l1_loss",
    "metrics/explained_variance": "explained_variance", "metrics/l0": "l0",
    "sparsity/dead_features": "dead_features", "details/current_learning_rate": "lr",
}


def split_sql(store: Store, view: str, split: str) -> str:
    """The view's tokens of one split, in tok_index order (a stable order for permutations)."""
    if not re.match(r"^[A-Za-z0-9_]+$", split):
        raise StoreError(f"split {split!r} must be a plain split name such as train_base or eval")
    body = view_sql(store, view)
    return (f"SELECT v.* FROM ({body}) v\nWHERE v.row_id IN (SELECT row_id FROM split_members "
            f"WHERE split = '{split}')\nORDER BY v.tok_index")


def count_tokens(store: Store, sql: str, array: str, what: str) -> int:
    n = len(select(store, sql, array))  # also checks that every selected row is committed
    if n == 0:
        raise StoreError(f"the {what} selection is empty:\n{sql}\nCheck --view and the split flags")
    return n


def make_orders(n: int, n_epochs: int, seed: int) -> np.ndarray:
    """[n_epochs, n] permutations of range(n) (int32), epoch e from seed (seed, e)."""
    return np.stack([np.random.default_rng([seed, e]).permutation(n) for e in range(n_epochs)]).astype(np.int32)


class TokenStream:
    """Endless [batch, d] float32 tensors over the selection, epoch e in order `orders[e]`;
    batches run across epoch ends so every batch has exactly `batch` tokens."""

    def __init__(self, store: Store, sql: str, array: str, orders: np.ndarray, batch: int):
        self.store, self.sql, self.array, self.orders, self.batch = store, sql, array, orders, batch
        self.epochs_started = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        rest: list[np.ndarray] = []
        have = 0
        for e in range(len(self.orders)):
            self.epochs_started = e + 1
            for m in iter_materialize(self.store, self.sql, self.array, batch_size=self.batch, order=self.orders[e],
                                      columns=[]):
                rest.append(m.X)
                have += len(m.X)
                while have >= self.batch:
                    X = np.concatenate(rest) if len(rest) > 1 else rest[0]
                    yield torch.from_numpy(np.ascontiguousarray(X[: self.batch]))
                    rest, have = [X[self.batch:]], have - self.batch
        raise StoreError("the token order ran out of epochs (a bug: make_orders got too few epochs)")


def build_training_sae(architecture: str, d_in: int, d_sae: int, *, k: int, l1_coefficient: float,
                       l1_warm_up_steps: int, aux_coefficient: float, seed: int, device: str) -> Any:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    common = {"d_in": d_in, "d_sae": d_sae, "device": device, "dtype": "float32",
              "normalize_activations": "expected_average_only_in"}
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, aux_loss_coefficient=aux_coefficient, **common))
    if architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient,
                                                             l1_warm_up_steps=l1_warm_up_steps, **common))
    raise ValueError(f"--architecture {architecture!r} is not one of topk, standard")


@torch.no_grad()
def init_from_sample(sae: Any, sample: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Scaling factor sqrt(d_in)/mean norm (sae-lens' rule) and b_dec = the scaled mean."""
    scale = float(sae.cfg.d_in ** 0.5 / sample.norm(dim=-1).mean())
    sae.b_dec.data.copy_((sample * scale).mean(0).to(sae.b_dec.dtype))
    return scale, sample.mean(0)


def train_loop(trainer: Any, stream: Iterator[torch.Tensor], steps: int, *, log_every: int,
               progress: bool) -> list[dict[str, float]]:
    """`steps` calls of `SAETrainer.step`, logging sae-lens' own step metrics every log_every."""
    curves: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc="train SAE", unit="step", disable=not progress)
    for step in range(steps):
        trainer.maybe_reset_sparsity()
        out = trainer.step(next(stream))
        trainer.n_training_steps += 1
        if step % log_every == 0 or step == steps - 1:
            log = trainer.build_train_step_log_dict(out, trainer.n_training_samples)
            row = {"step": step + 1, "tokens": trainer.n_training_samples}
            row.update({CURVE_KEYS[k]: float(v) for k, v in log.items() if k in CURVE_KEYS})
            curves.append(row)
            bar.set_postfix(ev=f"{row['explained_variance']:.3f}", l0=f"{row['l0']:.1f}",
                            dead=int(row["dead_features"]))
        bar.update(1)
    bar.close()
    return curves


def train(store: Store, *, sql: str, array: str, d_in: int, cfg: Any, orders: np.ndarray,
          device: str) -> tuple[Any, Any, list[dict[str, float]], torch.Tensor]:
    """Build the SAE and its sae-lens trainer, initialize from the first batches, train.

    Returns (trainer, training SAE with the input scale folded in, curves, mean of the
    initialization sample in raw units)."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    d_sae = cfg.d_sae or 4 * d_in
    sae = build_training_sae(cfg.architecture, d_in, d_sae, k=cfg.k, l1_coefficient=cfg.l1_coefficient,
                             l1_warm_up_steps=cfg.l1_warm_up_steps, aux_coefficient=cfg.aux_coefficient,
                             seed=cfg.seed, device=device)
    decay = int(cfg.steps * cfg.lr_decay_frac)
    tcfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_tokens, train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.lr, lr_end=cfg.lr * 0.1, lr_warm_up_steps=int(cfg.steps * 0.02), lr_decay_steps=decay,
        device=device, dead_feature_window=cfg.dead_window, feature_sampling_window=cfg.dead_window,
        n_batches_for_norm_estimate=cfg.init_batches)
    init_stream = iter(TokenStream(store, sql, array, orders[:1], cfg.batch_tokens))
    n_init = min(cfg.init_batches, max(1, orders.shape[1] // cfg.batch_tokens))
    sample = torch.cat([next(init_stream) for _ in range(n_init)])
    trainer = SAETrainer(tcfg, sae, iter(()))
    scale, mean = init_from_sample(sae, sample.to(device))
    trainer.activation_scaler.scaling_factor = scale
    stream = iter(TokenStream(store, sql, array, orders, cfg.batch_tokens))
    curves = train_loop(trainer, stream, cfg.steps, log_every=cfg.log_every, progress=cfg.progress)
    # What fit() does at its end: fold the input scale into the weights, record L0/dead.
    sae.fold_activation_norm_scaling_factor(scale)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    return trainer, sae, curves, mean.cpu()


def plot_curves(curves: list[dict[str, float]], title: str) -> bytes:
    """PNG bytes: explained variance, losses, L0 and dead features against steps."""
    import io

    from matplotlib.figure import Figure

    steps = [c["step"] for c in curves]
    fig = Figure(figsize=(10, 7))           # stand-alone: a notebook's pyplot backend is left alone
    axes = fig.subplots(2, 2)
    panels = [("explained_variance", "explained variance (train batch)", False),
              ("mse_loss", "loss (scaled units)", True), ("l0", "mean L0", False),
              ("dead_features", "dead features", False)]
    for ax, (key, label, log) in zip(axes.flat, panels):
        ax.plot(steps, [c.get(key, np.nan) for c in curves], label=key)
        if key == "mse_loss":
            for extra in ("aux_loss", "l1_loss"):
                if any(extra in c for c in curves):
                    ax.plot(steps, [c.get(extra, np.nan) for c in curves], label=extra)
            ax.legend()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
