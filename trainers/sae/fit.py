"""The training step of one `python -m trainers.sae` run: token order, training (with
checkpoints, held-out evaluations and resume), the saved SAE, its best checkpoint, curves.

Outputs in runs/<run_id>/: `token_order.npy` (written before training; a resumed run checks
it against a fresh draw), `sae/` (sae-lens format, the final weights), `sae_best/` (the
best checkpoint by held-out explained variance, when that is not the final step),
`checkpoints/` (see trainers.sae.checkpoint), `curves.json` and `curves.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from store.cli import config_dict
from store.core import Store, StoreError
from store.materialize import view_text
from trainers.resume import claim
from trainers.sae.checkpoint import checkpoint_dir, read_checkpoint, save_checkpoint, tag_best
from trainers.sae.train import (
    Hooks,
    init_from_sample,
    make_orders,
    plot_curves,
    sae_from_config,
    sample_tokens,
    train,
)


def _set_metadata(
    tsae: Any, cfg: Any, run: Any, attrs: dict[str, Any], train_sql: str, store: Store, step: int
) -> None:
    meta = tsae.cfg.metadata
    meta.model_name, meta.hook_name = attrs.get("model"), f"blocks.{cfg.layer}.hook_resid_post"
    meta.store_layer, meta.store_view, meta.store_sae_name = cfg.layer, cfg.view, run.run_id
    meta.store_model_hash, meta.store_tokenization = attrs.get("model_hash"), attrs.get("tokenization")
    meta.store_run_id, meta.store_train_sql = run.run_id, train_sql
    meta.store_view_sql = view_text(store, cfg.view)
    meta.store_step = step


def _orders(run_dir: Path, n_train: int, n_epochs: int, seed: int, resuming: bool) -> np.ndarray:
    orders = make_orders(n_train, n_epochs, seed)
    path = run_dir / "token_order.npy"
    if resuming and path.is_file():
        saved = np.load(path, allow_pickle=False)
        if not np.array_equal(saved, orders):
            raise StoreError(
                f"{path} differs from the order this run's settings draw (the training selection "
                f"changed?); start a new run with --resume never"
            )
        return saved
    np.save(path, orders, allow_pickle=False)
    return orders


def _hooks(cfg: Any, run: Any, held: Any) -> Any:
    if not cfg.checkpoint_every:
        return None

    def checkpoint(trainer: Any, step: int, curves: list, evals: list) -> None:
        best = max(evals, key=lambda e: e["explained_variance"]) if evals else None
        save_checkpoint(
            run.dir,
            trainer,
            keep={best["step"]} if best else set(),
            extra={"curves": curves, "evals": evals, "best": best, "config": config_dict(cfg)},
        )
        if best is not None:
            tag_best(run.dir, best["step"], best)
        run.store.sync_run(run.run_id)  # a remote store gets each checkpoint (store.core)

    return Hooks(cfg.checkpoint_every, held.during_training, checkpoint)


def _export_best(
    store: Store,
    cfg: Any,
    run: Any,
    attrs: dict[str, Any],
    train_sql: str,
    d_in: int,
    device: str,
    best: dict[str, Any],
) -> str:
    """The best checkpoint as a sae-lens folder (input scale folded in): runs/<id>/sae_best."""
    tensors, doc = read_checkpoint(checkpoint_dir(run.dir) / f"step_{best['step']:07d}.json")
    tsae = sae_from_config(cfg, d_in, device)
    tsae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    tsae.fold_activation_norm_scaling_factor(doc["trainer"]["scaling_factor"])
    _set_metadata(tsae, cfg, run, attrs, train_sql, store, best["step"])
    tsae.save_inference_model(run.dir / "sae_best")
    return str(run.dir / "sae_best")


def fit_and_save(
    store: Store,
    cfg: Any,
    run: Any,
    train_sql: str,
    array: str,
    d_in: int,
    n_train: int,
    attrs: dict[str, Any],
    device: str,
    counts: dict[str, Any],
    metrics: dict[str, Any],
    *,
    held: Any,
    resume_from: Path | None = None,
):
    """Save the order, train (from `resume_from` when given), save the SAE in sae-lens format
    with our metadata, plot. Returns (the saved SAE reloaded, the training mean, the untrained
    baseline SAE)."""
    from sae_lens import SAE  # lazy: sae_lens is heavy

    claim(run.dir)
    n_epochs = -(-(cfg.steps * cfg.batch_tokens) // n_train) + 1
    orders = _orders(run.dir, n_train, n_epochs, cfg.seed, resume_from is not None)
    res = train(
        store,
        sql=train_sql,
        array=array,
        d_in=d_in,
        cfg=cfg,
        orders=orders,
        device=device,
        resume_from=resume_from,
        hooks=_hooks(cfg, run, held),
    )
    tsae, trainer, curves, evals = res.sae, res.trainer, res.curves, res.evals
    _set_metadata(tsae, cfg, run, attrs, train_sql, store, cfg.steps)
    tsae.save_inference_model(run.dir / "sae")
    sae = SAE.load_from_disk(run.dir / "sae", device=device)  # evaluate exactly what was saved
    sae.eval()
    if evals:
        best = max(evals, key=lambda e: e["explained_variance"])
        path = (
            str(run.dir / "sae")
            if best["step"] == cfg.steps
            else _export_best(store, cfg, run, attrs, train_sql, d_in, device, best)
        )
        metrics["best_checkpoint"] = {**best, "path": path}
        metrics["evals"] = evals
    # The untrained baseline: same seed and initialization rule, no steps.
    base = sae_from_config(cfg, d_in, device)
    s, _ = init_from_sample(base, sample_tokens(store, train_sql, array, cfg.batch_tokens).to(device))
    base.fold_activation_norm_scaling_factor(s)
    base.eval()
    counts.update(
        {
            "steps": cfg.steps,
            "train_tokens_seen": trainer.n_training_samples,
            "epochs": n_epochs,
            "d_sae": int(sae.cfg.d_sae),
            "resumed_from_step": res.resumed_from,
        }
    )
    metrics["resumed_from_step"] = res.resumed_from
    last = curves[-1]
    metrics["train_final"] = {k: last[k] for k in last if k not in ("step", "tokens")}
    metrics["dead_fraction_train_window"] = float(trainer.dead_neurons.float().mean())
    store.write_json(run.dir / "curves.json", {"run_id": run.run_id, "curves": curves, "evals": evals})
    (run.dir / "curves.png").write_bytes(
        plot_curves(
            curves,
            f"{cfg.architecture} SAE, layer {cfg.layer}, d_sae {sae.cfg.d_sae}"
            + (f", k {cfg.k}" if cfg.architecture == "topk" else f", l1 {cfg.l1_coefficient}"),
            evals,
        )
    )
    return sae, res.mean, base
