"""The training half of `python -m trainers.sae`: stored activations -> a sae-lens SAE.

Data: a view picks the tokens (default `content_tokens`: no special/template tokens, so no
attention sink at position 0), restricted to one split (default train_base) and sorted by
`tok_index`, so that position i of the selection always means the same token. The order of
training is a list of permutations of range(n), one per epoch, drawn from `seed` and saved
as `token_order.npy` in the run folder *before* training; `TokenStream` walks them and reads
each batch through the training loaders (`store.loaders.ActivationDataset.take`: the same
chunk-sorted gathers as materialize). The order stays this stored full permutation, not
ActivationStream's block order, so that a run is replayed and resumed from that file alone
and earlier runs' SAEs stay what they were.
Nothing is copied or rewritten: the run can be replayed exactly from the store, the view
SQL and that file, and resumed from any step (the position is `n_training_samples`; the
rest of the state is in the checkpoint, see trainers.sae.checkpoint).

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from store.core import Store, StoreError
from store.loaders import ActivationDataset
from store.materialize import select, view_sql

CURVE_KEYS = {  # sae-lens log key -> our curve name
    "losses/overall_loss": "loss",
    "losses/mse_loss": "mse_loss",
    "losses/auxiliary_reconstruction_loss": "aux_loss",
    "losses/l1_loss": "l1_loss",
    "metrics/explained_variance": "explained_variance",
    "metrics/l0": "l0",
    "sparsity/dead_features": "dead_features",
    "details/current_learning_rate": "lr",
}


def split_sql(store: Store, view: str, split: str) -> str:
    """The view's tokens of one split, in tok_index order (a stable order for permutations)."""
    if not re.match(r"^[A-Za-z0-9_]+$", split):
        raise StoreError(f"split {split!r} must be a plain split name such as train_base or eval")
    body = view_sql(store, view)
    return (
        f"SELECT v.* FROM ({body}) v\nWHERE v.row_id IN (SELECT row_id FROM split_members "
        f"WHERE split = '{split}')\nORDER BY v.tok_index"
    )


def count_tokens(store: Store, sql: str, array: str, what: str) -> int:
    n = len(select(store, sql, array))  # also checks that every selected row is committed
    if n == 0:
        raise StoreError(f"the {what} selection is empty:\n{sql}\nCheck --view and the split flags")
    return n


def make_orders(n: int, n_epochs: int, seed: int) -> np.ndarray:
    """[n_epochs, n] permutations of range(n) (int32), epoch e from seed (seed, e)."""
    return np.stack([np.random.default_rng([seed, e]).permutation(n) for e in range(n_epochs)]).astype(np.int32)


class TokenStream:
    """Endless [batch, d] float32 tensors over the selection: global position g is token
    `orders[g // n][g % n]` of the selection, so batches run across epoch ends (every batch
    has exactly `batch` tokens) and a stream can start at any position: `start` (a resumed
    run starts at its `n_training_samples`, and sees exactly the tokens it would have seen)."""

    def __init__(self, store: Store, sql: str, array: str, orders: np.ndarray, batch: int, start: int = 0):
        self.store, self.sql, self.array, self.orders, self.batch, self.start = store, sql, array, orders, batch, start

    def __iter__(self) -> Iterator[torch.Tensor]:
        ds = ActivationDataset(self.store, self.sql, [self.array], columns=[])
        n, pos = len(ds), self.start
        if self.orders.shape[1] != n:
            raise StoreError(
                f"the token order has {self.orders.shape[1]} tokens per epoch but the selection has {n} "
                f"(the store changed since the run started); start a new run with --resume never"
            )
        while True:
            g = np.arange(pos, pos + self.batch)
            if g[-1] // n >= len(self.orders):
                raise StoreError("the token order ran out of epochs (a bug: make_orders got too few epochs)")
            yield ds.take(self.orders[g // n, g % n])[self.array]
            pos += self.batch


def build_training_sae(
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    k: int,
    l1_coefficient: float,
    l1_warm_up_steps: int,
    aux_coefficient: float,
    seed: int,
    device: str,
) -> Any:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    common = {
        "d_in": d_in,
        "d_sae": d_sae,
        "device": device,
        "dtype": "float32",
        "normalize_activations": "expected_average_only_in",
    }
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, aux_loss_coefficient=aux_coefficient, **common))
    if architecture == "standard":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, l1_warm_up_steps=l1_warm_up_steps, **common)
        )
    raise ValueError(f"--architecture {architecture!r} is not one of topk, standard")


@torch.no_grad()
def sae_from_config(cfg: Any, d_in: int, device: str) -> Any:
    """A fresh seeded training SAE with a run config's architecture and coefficients (d_sae
    defaults to 4 x d_in): the one place training, the baseline and the best export build it."""
    return build_training_sae(
        cfg.architecture,
        d_in,
        cfg.d_sae or 4 * d_in,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        l1_warm_up_steps=cfg.l1_warm_up_steps,
        aux_coefficient=cfg.aux_coefficient,
        seed=cfg.seed,
        device=device,
    )


def init_from_sample(sae: Any, sample: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Scaling factor sqrt(d_in)/mean norm (sae-lens' rule) and b_dec = the scaled mean."""
    scale = float(sae.cfg.d_in**0.5 / sample.norm(dim=-1).mean())
    sae.b_dec.data.copy_((sample * scale).mean(0).to(sae.b_dec.dtype))
    return scale, sample.mean(0)


class Hooks(NamedTuple):
    """What train_loop calls besides stepping, every `checkpoint_every` steps and at the end:
    `evaluate(trainer, step) -> held-out metrics`, then `checkpoint(trainer, step, curves, evals)`."""

    checkpoint_every: int
    evaluate: Callable[[Any, int], dict[str, float]] | None  # (trainer, step)
    checkpoint: Callable[[Any, int, list, list], None] | None  # (trainer, step, curves, evals)


def train_loop(
    trainer: Any,
    stream: Iterator[torch.Tensor],
    steps: int,
    *,
    log_every: int,
    progress: bool,
    start: int = 0,
    curves: list[dict[str, float]] | None = None,
    evals: list[dict[str, float]] | None = None,
    hooks: Hooks | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Steps `start`..`steps` of `SAETrainer.step`, logging sae-lens' own step metrics every
    log_every; with hooks, held-out evaluations and checkpoints. Returns (curves, evals)."""
    curves, evals = list(curves or []), list(evals or [])
    bar = tqdm(total=steps, initial=start, desc="train SAE", unit="step", disable=not progress)
    post: dict[str, Any] = {}
    for step in range(start, steps):
        trainer.maybe_reset_sparsity()
        out = trainer.step(next(stream))
        trainer.n_training_steps += 1
        if step % log_every == 0 or step == steps - 1:
            log = trainer.build_train_step_log_dict(out, trainer.n_training_samples)
            row = {"step": step + 1, "tokens": trainer.n_training_samples}
            row.update({CURVE_KEYS[k]: float(v) for k, v in log.items() if k in CURVE_KEYS})
            curves.append(row)
            post.update(ev=f"{row['explained_variance']:.3f}", l0=f"{row['l0']:.1f}", dead=int(row["dead_features"]))
        every = hooks.checkpoint_every if hooks else 0
        if every and ((step + 1) % every == 0 or step + 1 == steps):
            if hooks.evaluate is not None:
                with torch.random.fork_rng(devices=[]):  # evaluations never move the training RNG
                    ev = {"step": step + 1, **hooks.evaluate(trainer, step + 1)}
                evals.append(ev)
                post["heldout_ev"] = f"{ev['explained_variance']:.3f}"
                if "kl_mean" in ev:
                    post["kl"] = f"{ev['kl_mean']:.3f}"
            if hooks.checkpoint is not None:
                hooks.checkpoint(trainer, step + 1, curves, evals)
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    bar.close()
    return curves, evals


def build_trainer(cfg: Any, d_in: int, device: str) -> Any:
    """The training SAE (seeded) and its sae-lens trainer, before any data is seen."""
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    sae = sae_from_config(cfg, d_in, device)
    decay = int(cfg.steps * cfg.lr_decay_frac)
    tcfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_tokens,
        train_batch_size_samples=cfg.batch_tokens,
        lr=cfg.lr,
        lr_end=cfg.lr * 0.1,
        lr_warm_up_steps=int(cfg.steps * 0.02),
        lr_decay_steps=decay,
        device=device,
        dead_feature_window=cfg.dead_window,
        feature_sampling_window=cfg.dead_window,
        n_batches_for_norm_estimate=cfg.init_batches,
    )
    return SAETrainer(tcfg, sae, iter(()))


def train(
    store: Store,
    *,
    sql: str,
    array: str,
    d_in: int,
    cfg: Any,
    orders: np.ndarray,
    device: str,
    resume_from: Path | None = None,
    hooks: Hooks | None = None,
) -> TrainResult:
    """Build the SAE and its sae-lens trainer, initialize from the first batches (or restore a
    checkpoint), train, fold the input scale into the weights."""
    from trainers.sae.checkpoint import load_checkpoint

    trainer = build_trainer(cfg, d_in, device)
    sae = trainer.sae
    init_stream = iter(TokenStream(store, sql, array, orders[:1], cfg.batch_tokens))
    n_init = min(cfg.init_batches, max(1, orders.shape[1] // cfg.batch_tokens))
    sample = torch.cat([next(init_stream) for _ in range(n_init)])
    scale, mean = init_from_sample(sae, sample.to(device))
    trainer.activation_scaler.scaling_factor = scale
    curves: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    start = 0
    if resume_from is not None:
        doc = load_checkpoint(resume_from, trainer)
        start, curves, evals = doc["step"], doc["curves"], doc["evals"]
    stream = iter(TokenStream(store, sql, array, orders, cfg.batch_tokens, start=trainer.n_training_samples))
    curves, evals = train_loop(
        trainer,
        stream,
        cfg.steps,
        log_every=cfg.log_every,
        progress=cfg.progress,
        start=start,
        curves=curves,
        evals=evals,
        hooks=hooks,
    )
    # What fit() does at its end: fold the input scale into the weights, record L0/dead.
    sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    return TrainResult(trainer, sae, curves, evals, mean.cpu(), start)


class TrainResult(NamedTuple):
    trainer: Any
    sae: Any  # the training SAE, input scale folded in
    curves: list[dict[str, float]]  # training-batch metrics every log_every steps
    evals: list[dict[str, float]]  # held-out evaluations (with checkpoints)
    mean: torch.Tensor  # mean of the initialization sample, raw units
    resumed_from: int  # 0, or the checkpoint's step


def plot_curves(curves: list[dict[str, float]], title: str, evals: list[dict[str, float]] | None = None) -> bytes:
    """PNG bytes: explained variance, losses, L0, dead features against steps (training
    batches as lines, held-out evaluations as points), and the held-out KL(clean || spliced)."""
    import io

    from matplotlib.figure import Figure

    evals = evals or []
    steps = [c["step"] for c in curves]
    fig = Figure(figsize=(14, 7))  # stand-alone: a notebook's pyplot backend is left alone
    axes = fig.subplots(2, 3)
    panels = [
        ("explained_variance", "explained variance", False, "explained_variance"),
        ("mse_loss", "loss (scaled units)", True, None),
        ("l0", "mean L0", False, "l0"),
        (
            "dead_features",
            "dead features (train: silent for --dead-window steps;\nheld-out: never fire)",
            False,
            "dead_features",
        ),
        (None, "KL(clean || spliced), nats/token, held-out", False, "kl_mean"),
    ]
    for ax, (key, label, log, ekey) in zip(axes.flat, panels, strict=False):
        if key is not None:
            ax.plot(steps, [c.get(key, np.nan) for c in curves], label="train batch")
        if key == "mse_loss":
            for extra in ("aux_loss", "l1_loss"):
                if any(extra in c for c in curves):
                    ax.plot(steps, [c.get(extra, np.nan) for c in curves], label=extra)
        pts = [(e["step"], e[ekey]) for e in evals if ekey and e.get(ekey) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=False), "o-", label="held-out")
        elif key is None:
            ax.text(
                0.5,
                0.5,
                "no KL: run with --ce-rows > 0\nand --checkpoint-every",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if log:
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def sample_tokens(store: Store, sql: str, array: str, n: int, seed: int = 0) -> torch.Tensor:
    """n tokens of the selection drawn without replacement (all of them when it has fewer)."""
    ds = ActivationDataset(store, sql, [array], columns=[])
    pick = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))])
    return ds.take(pick)[array]
