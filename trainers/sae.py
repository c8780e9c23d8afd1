"""Train (or evaluate) a sparse autoencoder on hidden states read from the store.

    python -m extractors.run --layer 17                       # once: hidden states into ./store_data
    python -m trainers.sae --layer 17                         # TopK SAE, d_sae 4*d_model, k 32
    python -m trainers.sae --layer 17 --architecture standard --l1-coefficient 5
    python -m trainers.sae --layer 17 --store /tmp/st --steps 200 --batch-tokens 1024 --ce-rows 8  # CPU-sized
    python -m trainers.sae --layer 17 --sae latest            # QA metrics of an existing SAE (or its name/folder)
    python -m trainers.sae --layer 17 --sae RELEASE/SAE_ID    # a pretrained one (needs the Hub or its cache)

Training data are the tokens of `--view` (default content_tokens: no special or template
tokens, so no attention sink) in the `--train-split` rows, read through `store` in a
shuffled order that is saved first (see trainers.sae_train). QA metrics come from the
`--eval-split` rows, which training never sees (see trainers.sae_eval): reconstruction MSE,
explained variance / FVU, mean L0, dead-feature fraction, baselines, and the model's
cross-entropy with the reconstruction spliced in at the layer versus clean, zero- and
mean-ablation.

Outputs in the store's runs/<run_id>/: `sae/` (sae-lens' own format: cfg.json +
sae_weights.safetensors; `sae_lens.SAE.load_from_disk` opens it without this package),
`token_order.npy` (the permutations), `metrics.json`, `curves.json` + `curves.png`; a
`runs` record (kind train_sae, or eval_sae with --sae) holding the config, the SQL and the
metrics; and a row in the `saes` catalog table. Then extract codes with
`python -m extractors.run --layer 17 --kinds sae --sae latest` (or the SAE's name).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from extractors.sae_load import SAELoadError, load_sae, write_sae_record
from store.arrays import array_exists, open_array
from store.cli import config_dict, parse_config, user_errors
from store.core import DEFAULT_STORE, STORE_VERSION, Store, StoreError
from store.materialize import view_text
from store.runs import Run


@dataclass
class SAETrainConfig:
    """Train a sae-lens SAE on one layer's stored hidden states, or evaluate an existing one."""

    layer: int = field(metadata={"help": "decoder layer whose stored hidden states (hidden/layer_L) to read"})
    store: str = field(default=DEFAULT_STORE, metadata={"help": "store folder"})
    architecture: Literal["topk", "standard"] = field(default="topk", metadata={
        "help": "topk (sae-lens TopKTrainingSAE, with its dead-latent auxiliary loss) or standard "
                "(ReLU + L1, StandardTrainingSAE)"})
    d_sae: int | None = field(default=None, metadata={"help": "number of features; none means 4 x d_model"})
    k: int = field(default=32, metadata={"help": "active features per token for topk"})
    l1_coefficient: float = field(default=5.0, metadata={"help": "L1 penalty for standard (inputs are scaled "
                                  "to mean norm sqrt(d_model))"})
    l1_warm_up_steps: int = field(default=50, metadata={"help": "steps over which the L1 penalty ramps up"})
    aux_coefficient: float = field(default=1 / 32, metadata={"help": "weight of topk's auxiliary loss on dead "
                                   "latents (1/32 as in Gao et al. 2024)"})
    steps: int = field(default=600, metadata={"help": "training steps"})
    batch_tokens: int = field(default=1024, metadata={"help": "tokens per training step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (warm-up over 2 percent of the steps; decays "
                      "linearly to 0 over the last --lr-decay-frac of the steps, as sae-lens does)"})
    lr_decay_frac: float = field(default=0.3, metadata={"help": "fraction of the steps with a decaying lr"})
    dead_window: int = field(default=100, metadata={"help": "a feature silent for this many steps counts as "
                             "dead (and gets topk's auxiliary loss)"})
    init_batches: int = field(default=8, metadata={"help": "batches that estimate the input scale and b_dec"})
    view: str = field(default="content_tokens", metadata={"help": "view (or SQL) choosing the tokens; it must "
                      "return row_id and tok_index"})
    train_split: str = field(default="train_base", metadata={"help": "rows to train on"})
    eval_split: str = field(default="eval", metadata={"help": "held-out rows for the QA metrics"})
    ce_rows: int = field(default=32, metadata={"help": "eval rows for the CE-loss splice (0 skips it; four "
                         "full forward passes each)"})
    sae: str | None = field(default=None, metadata={"help": "evaluate this SAE instead of training one: latest "
                            "(the newest SAE of --layer in the saes table), a name from that table, a local "
                            "sae-lens folder, or RELEASE/SAE_ID"})
    seed: int = field(default=0, metadata={"help": "seed of the initialization and of the token order"})
    model: str = field(default="embedded", metadata={"help": "model for the CE splice; must be the one that "
                       "produced the stored states (checked by hash)"})
    model_cache: str | None = field(default=None, metadata={"help": "where converted models are cached "
                                    "(default ~/.cache/activation-store)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    log_every: int = field(default=10, metadata={"help": "steps between curve points"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "k", "dead_window", "init_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"--d-sae must be positive, got {self.d_sae}")
        if self.architecture == "topk" and self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"--k {self.k} exceeds --d-sae {self.d_sae}")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"--lr-decay-frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.ce_rows < 0:
            raise ValueError(f"--ce-rows must be >= 0, got {self.ce_rows}")


class SAEResult(NamedTuple):
    run_id: str
    sae_path: str          # the sae-lens folder (or RELEASE/SAE_ID with --sae)
    sae_name: str
    metrics: dict[str, Any]


def hidden_array(store: Store, layer: int) -> tuple[str, dict[str, Any]]:
    name = f"hidden/layer_{layer}"
    if not array_exists(store, name):
        raise StoreError(f"{store.root} has no {name}; extract it first: "
                         f"python -m extractors.run --layer {layer} --store {store.root}")
    return name, dict(open_array(store, name).attrs)


def _ce_inputs(store: Store, eval_frame: Any, n_rows: int, tokenization: str):
    """Token ids of the first n eval rows (by row_id) and the view's positions in each."""
    from store.tokens import read_layout, row_token_ids

    rows = sorted(eval_frame["row_id"].unique().to_list())[:n_rows]
    layout = read_layout(store, tokenization)
    start = dict(zip(layout.row_ids, layout.tok_starts))
    ids = row_token_ids(store, tokenization, rows)
    tok = eval_frame["tok_index"].to_numpy()
    rid = eval_frame["row_id"].to_numpy()
    pos = [np.sort(tok[rid == r] - start[r]) for r in rows]
    return [ids[r] for r in rows], pos


def evaluate(store: Store, cfg: SAETrainConfig, sae: Any, *, array: str, attrs: dict[str, Any], train_sql: str,
             eval_sql: str, mean_vec: torch.Tensor | None, baseline_sae: Any = None) -> dict[str, Any]:
    """Reconstruction metrics on held-out tokens, baselines, and the CE splice."""
    from store.materialize import materialize
    from trainers import sae_eval

    ev = materialize(store, eval_sql, array)
    X_eval = torch.from_numpy(ev.X).to(sae.device)
    out: dict[str, Any] = {"eval": sae_eval.recon_metrics(sae, X_eval)}
    n_fit = min(20000, cfg.batch_tokens * cfg.init_batches)
    fit = sample_tokens(store, train_sql, array, n_fit)
    if mean_vec is None:
        mean_vec = fit.mean(0)
    n_comp = max(1, round(out["eval"]["l0"]))
    out["baselines"] = {f"pca_{n_comp}_explained_variance": sae_eval.pca_explained_variance(fit, X_eval.cpu(), n_comp),
                        "mean_explained_variance": 0.0}
    if baseline_sae is not None:
        untrained = sae_eval.recon_metrics(baseline_sae, X_eval)
        out["baselines"]["untrained_sae_explained_variance"] = untrained["explained_variance"]
    if cfg.ce_rows:
        from extractors.model import check_model_hash, load_model

        lm = load_model(cfg.model, cfg.device, "auto", Path(cfg.model_cache) if cfg.model_cache else None)
        check_model_hash(lm, attrs, array)
        rows, pos = _ce_inputs(store, ev.frame, cfg.ce_rows, attrs["tokenization"])
        out["ce"] = sae_eval.splice_ce(lm, sae, cfg.layer, rows, pos, mean_vec, progress=cfg.progress)
    return out


def sample_tokens(store: Store, sql: str, array: str, n: int, seed: int = 0) -> torch.Tensor:
    """n tokens of the selection drawn without replacement (all of them when it has fewer)."""
    from store.materialize import gather, select

    tok = select(store, sql, array)["tok_index"].to_numpy()
    pick = np.sort(np.random.default_rng(seed).permutation(len(tok))[: min(n, len(tok))])
    return torch.from_numpy(gather(store, array, tok[pick]))


def run_sae(cfg: SAETrainConfig) -> SAEResult:
    """Train (or, with --sae, load) the SAE, evaluate it, and record everything; see the docstring."""
    from extractors.model import pick_device
    from trainers.sae_train import count_tokens, split_sql

    store = Store(cfg.store)
    array, attrs = hidden_array(store, cfg.layer)
    d_in = int(attrs.get("d_model") or open_width(store, array))
    train_sql = split_sql(store, cfg.view, cfg.train_split)
    eval_sql = split_sql(store, cfg.view, cfg.eval_split)
    n_train = count_tokens(store, train_sql, array, f"--train-split {cfg.train_split}")
    n_eval = count_tokens(store, eval_sql, array, f"--eval-split {cfg.eval_split}")
    device = str(pick_device(cfg.device))
    loaded = load_sae(cfg.sae, device, layer=cfg.layer, store=store) if cfg.sae else None
    if loaded is not None and loaded.d_in != d_in:
        raise StoreError(f"SAE {cfg.sae} reads {loaded.d_in}-wide inputs, but {array} is {d_in} wide")
    if loaded is not None and loaded.layer is not None and loaded.layer != cfg.layer:
        raise StoreError(f"SAE {cfg.sae} was trained on layer {loaded.layer}; pass --layer {loaded.layer}")
    kind = "eval_sae" if loaded else "train_sae"
    with Run(store, kind, {**config_dict(cfg), "view_sql": view_text(store, cfg.view), "train_sql": train_sql,
                           "eval_sql": eval_sql, "array": array},
             model_id=attrs.get("model", ""), model_hash=attrs.get("model_hash", ""), layers=[cfg.layer]) as run:
        counts: dict[str, Any] = {"train_tokens": n_train, "eval_tokens": n_eval}
        metrics: dict[str, Any] = {"store_version": STORE_VERSION, "layer": cfg.layer, "view": cfg.view, "array": array}
        t0 = time.perf_counter()
        if loaded is None:
            sae, mean_vec, baseline = _train(store, cfg, run, train_sql, array, d_in, n_train, attrs, device,
                                             counts, metrics)
            metrics["train_seconds"] = time.perf_counter() - t0
            name, path, source, arch, k = run.run_id, str(run.dir / "sae"), "local", cfg.architecture, \
                (cfg.k if cfg.architecture == "topk" else None)
        else:
            sae, mean_vec, baseline = loaded.sae, None, None
            name, path, source, arch, k = loaded.name, loaded.path, loaded.source, loaded.architecture, loaded.k
        metrics.update(evaluate(store, cfg, sae, array=array, attrs=attrs, train_sql=train_sql, eval_sql=eval_sql,
                                mean_vec=mean_vec, baseline_sae=baseline))
        metrics.update({"sae_name": name, "sae_path": path, "architecture": arch, "d_sae": int(sae.cfg.d_sae), "k": k})
        store.write_json(run.dir / "metrics.json", {"run_id": run.run_id, "config": config_dict(cfg),
                                                    "view_sql": view_text(store, cfg.view),
                                                    "train_sql": train_sql, "eval_sql": eval_sql,
                                                    "counts": counts, "metrics": metrics})
        write_sae_record(store, name=name, layer=cfg.layer, architecture=arch, d_in=d_in, d_sae=int(sae.cfg.d_sae),
                         k=k, path=path, source=source, run_id=run.run_id, metrics=metrics)
        run.finish(counts=counts, metrics=metrics)
    return SAEResult(run.run_id, path, name, metrics)


def open_width(store: Store, array: str) -> int:
    return int(open_array(store, array).shape[1])


def _train(store: Store, cfg: SAETrainConfig, run: Any, train_sql: str, array: str, d_in: int, n_train: int,
           attrs: dict[str, Any], device: str, counts: dict[str, Any], metrics: dict[str, Any]):
    """Save the order, train, save the SAE in sae-lens format with our metadata, plot.
    Returns (the saved SAE reloaded, the training mean, the untrained baseline SAE)."""
    from sae_lens import SAE

    from trainers.sae_train import build_training_sae, init_from_sample, make_orders, plot_curves, train

    n_epochs = -(-(cfg.steps * cfg.batch_tokens) // n_train) + 1
    orders = make_orders(n_train, n_epochs, cfg.seed)
    np.save(run.dir / "token_order.npy", orders, allow_pickle=False)
    trainer, tsae, curves, mean_vec = train(store, sql=train_sql, array=array, d_in=d_in, cfg=cfg,
                                            orders=orders, device=device)
    meta = tsae.cfg.metadata
    meta.model_name, meta.hook_name = attrs.get("model"), f"blocks.{cfg.layer}.hook_resid_post"
    meta.store_layer, meta.store_view, meta.store_sae_name = cfg.layer, cfg.view, run.run_id
    meta.store_model_hash, meta.store_tokenization = attrs.get("model_hash"), attrs.get("tokenization")
    meta.store_run_id, meta.store_train_sql = run.run_id, train_sql
    meta.store_view_sql = view_text(store, cfg.view)
    tsae.save_inference_model(run.dir / "sae")
    sae = SAE.load_from_disk(run.dir / "sae", device=device)   # evaluate exactly what was saved
    sae.eval()
    # The untrained baseline: same seed and initialization rule, no steps.
    base = build_training_sae(cfg.architecture, d_in, cfg.d_sae or 4 * d_in, k=cfg.k,
                              l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps,
                              aux_coefficient=cfg.aux_coefficient, seed=cfg.seed, device=device)
    s, _ = init_from_sample(base, sample_tokens(store, train_sql, array, cfg.batch_tokens).to(device))
    base.fold_activation_norm_scaling_factor(s)
    base.eval()
    counts.update({"steps": cfg.steps, "train_tokens_seen": trainer.n_training_samples, "epochs": n_epochs,
                   "d_sae": int(sae.cfg.d_sae)})
    last = curves[-1]
    metrics["train_final"] = {k: last[k] for k in last if k not in ("step", "tokens")}
    metrics["dead_fraction_train_window"] = float(trainer.dead_neurons.float().mean())
    store.write_json(run.dir / "curves.json", {"run_id": run.run_id, "curves": curves})
    (run.dir / "curves.png").write_bytes(plot_curves(
        curves, f"{cfg.architecture} SAE, layer {cfg.layer}, d_sae {sae.cfg.d_sae}"
                + (f", k {cfg.k}" if cfg.architecture == "topk" else f", l1 {cfg.l1_coefficient}")))
    return sae, mean_vec, base


def report(res: SAEResult) -> str:
    m = res.metrics
    e, b, ce = m["eval"], m["baselines"], m.get("ce")
    lines = [f"SAE {res.sae_name} ({m['architecture']}, d_sae {m['d_sae']}"
             + (f", k {m['k']}" if m.get("k") else "") + f"): {res.sae_path}",
             (f"held-out ({e['n_tokens']} tokens): explained variance {e['explained_variance']:.3f} (FVU "
              f"{e['fvu']:.3f}), MSE {e['mse']:.4g}/element, L0 {e['l0']:.1f}, dead {e['dead_fraction']:.1%}"),
             "baselines: " + ", ".join(f"{k.replace('_explained_variance', '')} EV {v:.3f}" for k, v in b.items())]
    if ce:
        lines.append(f"CE ({ce['ce_rows']} rows, {ce['ce_predicted_tokens']} predictions): clean {ce['ce_clean']:.4f}, "
                     f"SAE {ce['ce_sae']:.4f} (+{ce['ce_increase']:.4f}), zero-ablation {ce['ce_zero_ablation']:.4f}, "
                     f"mean-ablation {ce['ce_mean_ablation']:.4f}; loss recovered "
                     f"{ce['ce_loss_recovered_vs_zero']:.1%} "
                     f"vs zero, {ce['ce_loss_recovered_vs_mean']:.1%} vs mean")
    lines.append(f"run {res.run_id}; next: python -m extractors.run --layer {m['layer']} --kinds sae "
                 f"--sae {res.sae_name}")
    return "\n".join(lines)


@user_errors(ValueError, StoreError, SAELoadError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    res = run_sae(parse_config(SAETrainConfig, argv, prog="python -m trainers.sae"))
    print(report(res))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
