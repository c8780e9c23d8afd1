"""One SAE run of `python -m trainers.sae`: its config, training with checkpoints and resume,
the held-out QA metrics and gate, and the records (run folder, `runs`, `saes`).

Resume: with `--checkpoint-every N` the run writes a checkpoint every N steps and at the end
(trainers.sae.checkpoint), after a held-out evaluation (explained variance, L0, dead
features on up to `--eval-tokens` eval tokens, and KL(clean || spliced) on the `--ce-rows`
rows when that is > 0). `--resume auto` (the default) makes the same command continue the
newest unfinished `train_sae` run with the same settings that has a checkpoint and is not
being trained by a live process on this machine; `--resume RUN_ID` continues that run
(its stored settings win); `--resume never` always starts a new run. Because the token
order is a stored permutation and the checkpoint holds the whole trainer state, a resumed
run ends with the same weights, bit for bit on CPU, as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from extractors.model import check_model_hash, load_model, pick_device
from extractors.sae.load import load_sae, write_sae_record
from store.arrays import array_exists, open_array
from store.catalog.runs import Run
from store.catalog.tokens import read_layout, row_token_ids
from store.cli import LayerOptions, ModelOptions, ProgressOptions, SeedOptions, StoreOptions, config_dict
from store.core import STORE_VERSION, Store, StoreError
from store.loaders import ActivationDataset
from store.materialize import select, view_text
from trainers.resume import (
    find_runs_of_kind,
    matched_settings,
    named_run_config,
    resumable_checkpoint,
    resume_auto,
)
from trainers.sae import eval as sae_eval
from trainers.sae.checkpoint import latest_checkpoint
from trainers.sae.fit import fit_and_save
from trainers.sae.qa import qa_checks
from trainers.sae.train import count_tokens, sample_tokens, split_sql

# Fields that do not change what a run computes: a resumed run may differ in these.
NOT_MATCHED = {
    "store",
    "progress",
    "resume",
    "qa",
    "qa_max_nmse",
    "qa_max_kl",
    "qa_l0_band",
    "qa_max_dead",
    "kl_bound",
    "device",
    "compute_dtype",
    "model_cache",
}


@dataclass(kw_only=True)
class SAETrainConfig(StoreOptions, ModelOptions, LayerOptions, SeedOptions, ProgressOptions):
    """Train a sae-lens SAE on one layer's stored hidden states (or sweep layers), or evaluate an existing one.

    --layer L reads hidden/layer_L; --layers L1 L2 ... is a layer sweep: one SAE per stored layer
    with the same settings, one after another (each resumable), then a comparison table + plot in
    the sweep's run folder and the sae_sweeps table. --seed seeds the initialization and the token
    order. --model is the model of the CE/KL splice: it must be the one that produced the stored
    states (checked by hash). Stored bf16 states are widened exactly to fp32; the SAE trains in
    fp32 on --device."""

    architecture: Literal["topk", "standard"] = field(
        default="topk",
        metadata={
            "help": "topk (sae-lens TopKTrainingSAE, with its dead-latent auxiliary loss) or standard "
            "(ReLU + L1, StandardTrainingSAE)"
        },
    )
    d_sae: int | None = field(default=None, metadata={"help": "number of features; none means 4 x d_model"})
    k: int = field(default=32, metadata={"help": "active features per token for topk"})
    l1_coefficient: float = field(
        default=5.0, metadata={"help": "L1 penalty for standard (inputs are scaled to mean norm sqrt(d_model))"}
    )
    l1_warm_up_steps: int = field(default=50, metadata={"help": "steps over which the L1 penalty ramps up"})
    aux_coefficient: float = field(
        default=1 / 32,
        metadata={"help": "weight of topk's auxiliary loss on dead latents (1/32 as in Gao et al. 2024)"},
    )
    steps: int = field(default=600, metadata={"help": "training steps"})
    batch_tokens: int = field(default=1024, metadata={"help": "tokens per training step"})
    lr: float = field(
        default=1e-3,
        metadata={
            "help": "Adam learning rate (warm-up over 2 percent of the steps; decays "
            "linearly to 0 over the last --lr-decay-frac of the steps, as sae-lens does)"
        },
    )
    lr_decay_frac: float = field(default=0.3, metadata={"help": "fraction of the steps with a decaying lr"})
    dead_window: int = field(
        default=100,
        metadata={"help": "a feature silent for this many steps counts as dead (and gets topk's auxiliary loss)"},
    )
    init_batches: int = field(default=8, metadata={"help": "batches that estimate the input scale and b_dec"})
    view: str = field(
        default="content_tokens",
        metadata={"help": "view (or SQL) choosing the tokens; it must return row_id and tok_index"},
    )
    train_split: str = field(default="train_base", metadata={"help": "rows to train on"})
    eval_split: str = field(default="eval", metadata={"help": "held-out rows for the QA metrics"})
    ce_rows: int = field(
        default=32,
        metadata={
            "help": "eval rows for the CE/KL splice (0 skips it and the KL "
            "check; four full forward passes each at the end, two at each checkpoint)"
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={
            "help": "steps between checkpoints (SAE, optimizer, "
            "scheduler, step, RNG; safetensors + JSON in runs/<id>/checkpoints), each after "
            "a held-out evaluation; the best by held-out explained variance is kept; "
            "0: no checkpoints"
        },
    )
    eval_tokens: int = field(
        default=8192,
        metadata={"help": "held-out tokens of the evaluations at checkpoints (the final QA uses every eval token)"},
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "auto (continue the newest unfinished run with the same "
            "settings, if it has a checkpoint), never (always a new run), or a RUN_ID to continue"
        },
    )
    qa: Literal["off", "report", "strict"] = field(
        default="report",
        metadata={
            "help": "QA gate: report (print and record the pass/fail table), strict (also exit 1 when a check "
            "fails), off"
        },
    )
    qa_max_nmse: float = field(default=0.01, metadata={"help": "gate: held-out MSE / input variance below this"})
    qa_max_kl: float = field(
        default=0.5, metadata={"help": "gate: mean KL(clean || spliced) in nats per token below this"}
    )
    qa_l0_band: list[float] = field(
        default_factory=lambda: [50.0, 100.0],
        metadata={"help": "gate: mean L0 in [LO, HI] for non-TopK SAEs (TopK: L0 = k) (default: 50 100)"},
    )
    qa_max_dead: float = field(default=0.05, metadata={"help": "gate: fraction of dead features below this"})
    kl_bound: float = field(default=1.0, metadata={"help": "report the share of tokens whose KL exceeds this (nats)"})
    sae: str | None = field(
        default=None,
        metadata={
            "help": "evaluate this SAE instead of training one: latest "
            "(the newest SAE of --layer in the saes table), a name from that table, a local "
            "sae-lens folder, or RELEASE/SAE_ID"
        },
    )
    log_every: int = field(default=10, metadata={"help": "steps between curve points"})

    def __post_init__(self) -> None:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"--layers {' '.join(map(str, self.layers))} repeats a layer")
        if not self.layers and self.resume in ("auto", "never"):
            raise ValueError("pass --layer L (one SAE), --layers L1 L2 ... (a sweep) or --resume RUN_ID")
        for name in ("steps", "batch_tokens", "k", "dead_window", "init_batches", "log_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"--d-sae must be positive, got {self.d_sae}")
        if self.architecture == "topk" and self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"--k {self.k} exceeds --d-sae {self.d_sae}")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"--lr-decay-frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.ce_rows < 0 or self.checkpoint_every < 0:
            raise ValueError(
                f"--ce-rows and --checkpoint-every must be >= 0, got {self.ce_rows}, {self.checkpoint_every}"
            )
        if len(self.qa_l0_band) != 2 or self.qa_l0_band[0] > self.qa_l0_band[1]:
            raise ValueError(f"--qa-l0-band takes two numbers LO HI with LO <= HI, got {self.qa_l0_band}")

    @property
    def layer(self) -> int | None:
        """The layer of a one-SAE run; None for a sweep (several layers) or before --resume RUN_ID fills it."""
        return self.layers[0] if len(self.layers) == 1 else None

    @property
    def sweep(self) -> bool:
        return len(self.layers) > 1


class SAEResult(NamedTuple):
    run_id: str
    sae_path: str  # the sae-lens folder (or RELEASE/SAE_ID with --sae)
    sae_name: str
    metrics: dict[str, Any]


def hidden_array(store: Store, layer: int) -> tuple[str, dict[str, Any]]:
    name = f"hidden/layer_{layer}"
    if not array_exists(store, name):
        raise StoreError(
            f"{store.root} has no {name}; extract it first: "
            f"python -m extractors.run --layer {layer} --store {store.root}"
        )
    return name, dict(open_array(store, name).attrs)


def matched(config: dict[str, Any]) -> dict[str, Any]:
    return matched_settings(config, NOT_MATCHED)


def stored_config(config: dict[str, Any]) -> dict[str, Any]:
    """A train_sae run's stored config in today's shape: records written before the shared
    layer option (store.cli.LayerOptions) hold `layer: L` and `layers: null`."""
    if "layer" not in config:
        return config
    out = {k: v for k, v in config.items() if k != "layer"}
    out["layers"] = [config["layer"]] if config["layer"] is not None else (config.get("layers") or [])
    return out


def find_runs(store: Store, cfg: SAETrainConfig, *, finished: bool) -> list[str]:
    """train_sae runs of this store with cfg's settings (see NOT_MATCHED), newest first:
    finished ones, or unfinished ones (running or failed)."""
    return find_runs_of_kind(store, "train_sae", matched(config_dict(cfg)), finished=finished, normalize=stored_config)


def resolve_resume(store: Store, cfg: SAETrainConfig) -> tuple[SAETrainConfig, str | None, Path | None]:
    """(config, run id to continue or None, its latest checkpoint or None); see the module docstring."""
    if cfg.sae is not None or cfg.resume == "never":
        return cfg, None, None
    if cfg.resume == "auto":
        return cfg, *resume_auto(store, "train_sae", matched(config_dict(cfg)), latest_checkpoint, stored_config)
    run_id = cfg.resume
    doc = named_run_config(store, run_id, "train_sae")
    _, ckpt = resumable_checkpoint(store, run_id, latest_checkpoint, "sae")
    fields = {f.name for f in dataclasses.fields(SAETrainConfig)}
    stored = {k: v for k, v in stored_config(doc["config"]).items() if k in fields and k not in NOT_MATCHED}
    return dataclasses.replace(cfg, **stored), run_id, ckpt


def _ce_inputs(store: Store, eval_frame: Any, n_rows: int, tokenization: str):
    """Token ids of the first n eval rows (by row_id) and the view's positions in each."""
    rows = sorted(eval_frame["row_id"].unique().to_list())[:n_rows]
    layout = read_layout(store, tokenization)
    start = dict(zip(layout.row_ids, layout.tok_starts, strict=False))
    ids = row_token_ids(store, tokenization, rows)
    tok = eval_frame["tok_index"].to_numpy()
    rid = eval_frame["row_id"].to_numpy()
    pos = [np.sort(tok[rid == r] - start[r]) for r in rows]
    return [ids[r] for r in rows], pos


class HeldOut:
    """The eval split's tokens, CE/KL rows and (lazily) the model, shared by the evaluations
    at checkpoints and the final QA."""

    def __init__(self, store: Store, cfg: SAETrainConfig, eval_sql: str, array: str, attrs: dict[str, Any]):
        self.store, self.cfg, self.sql, self.array, self.attrs = store, cfg, eval_sql, array, attrs
        self.frame = select(store, eval_sql, array)
        self._lm: Any = None
        self._ce: Any = None
        self._sample: torch.Tensor | None = None

    def lm(self) -> Any:
        if self._lm is None:
            cfg = self.cfg
            self._lm = load_model(
                cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None
            )
            check_model_hash(self._lm, self.attrs, self.array)
        return self._lm

    def ce_inputs(self) -> tuple[list[list[int]], list[np.ndarray]]:
        if self._ce is None:
            self._ce = _ce_inputs(self.store, self.frame, self.cfg.ce_rows, self.attrs["tokenization"])
        return self._ce

    def sample(self) -> torch.Tensor:
        if self._sample is None:
            self._sample = sample_tokens(self.store, self.sql, self.array, self.cfg.eval_tokens, seed=1)
        return self._sample

    def during_training(self, trainer: Any, step: int) -> dict[str, float]:
        """Held-out metrics of the training SAE (inputs scaled as in training; EV, L0 and dead
        features do not depend on the scale) and, with --ce-rows, the KL of its splice."""
        sae, scale = trainer.sae, trainer.activation_scaler.scaling_factor
        sae.eval()
        X = self.sample().to(sae.device)
        m = sae_eval.recon_metrics(sae, X * scale)
        out = {k: m[k] for k in ("explained_variance", "nmse", "l0", "dead_fraction", "dead_features")}
        if self.cfg.ce_rows:

            def recon(h: torch.Tensor) -> torch.Tensor:
                x = h.to(sae.dtype).to(sae.device) * scale
                return (sae.decode(sae.encode(x)) / scale).to(h.device)

            rows, pos = self.ce_inputs()
            ce = sae_eval.splice_ce(
                self.lm(),
                sae,
                self.cfg.layer,
                rows,
                pos,
                None,
                progress=False,
                variants=("clean", "sae"),
                kl_bound=self.cfg.kl_bound,
                recon=recon,
            )
            out.update({k: ce[k] for k in ("kl_mean", "kl_share_above", "ce_increase")})
        return out


def evaluate(
    store: Store,
    cfg: SAETrainConfig,
    sae: Any,
    *,
    held: HeldOut,
    train_sql: str,
    mean_vec: torch.Tensor | None,
    baseline_sae: Any = None,
) -> dict[str, Any]:
    """Reconstruction metrics on all held-out tokens, baselines, and the CE/KL splice."""
    held_tokens = ActivationDataset(store, held.frame.select("row_id", "tok_index"), [held.array], columns=[])
    X_eval = torch.from_numpy(held_tokens.stack(held.array)).to(sae.device)
    out: dict[str, Any] = {"eval": sae_eval.recon_metrics(sae, X_eval)}
    n_fit = min(20000, cfg.batch_tokens * cfg.init_batches)
    fit = sample_tokens(store, train_sql, held.array, n_fit)
    if mean_vec is None:
        mean_vec = fit.mean(0)
    n_comp = max(1, round(out["eval"]["l0"]))
    out["baselines"] = {
        f"pca_{n_comp}_explained_variance": sae_eval.pca_explained_variance(fit, X_eval.cpu(), n_comp),
        "mean_explained_variance": 0.0,
    }
    if baseline_sae is not None:
        untrained = sae_eval.recon_metrics(baseline_sae, X_eval)
        out["baselines"]["untrained_sae_explained_variance"] = untrained["explained_variance"]
    if cfg.ce_rows:
        rows, pos = held.ce_inputs()
        out["ce"] = sae_eval.splice_ce(
            held.lm(), sae, cfg.layer, rows, pos, mean_vec, progress=cfg.progress, kl_bound=cfg.kl_bound
        )
    return out


class Inputs(NamedTuple):
    """What one SAE run reads: the layer's array and the train / eval token selections."""

    array: str
    attrs: dict[str, Any]
    d_in: int
    train_sql: str
    eval_sql: str
    n_train: int
    n_eval: int


def run_inputs(store: Store, cfg: SAETrainConfig) -> Inputs:
    array, attrs = hidden_array(store, cfg.layer)
    d_in = int(attrs.get("d_model") or open_array(store, array).shape[1])
    train_sql = split_sql(store, cfg.view, cfg.train_split)
    eval_sql = split_sql(store, cfg.view, cfg.eval_split)
    n_train = count_tokens(store, train_sql, array, f"--train-split {cfg.train_split}")
    n_eval = count_tokens(store, eval_sql, array, f"--eval-split {cfg.eval_split}")
    return Inputs(array, attrs, d_in, train_sql, eval_sql, n_train, n_eval)


def load_existing(store: Store, cfg: SAETrainConfig, device: str, inp: Inputs) -> Any:
    """--sae: the SAE to evaluate, checked against the layer's array."""
    loaded = load_sae(cfg.sae, device, layer=cfg.layer, store=store)
    if loaded.d_in != inp.d_in:
        raise StoreError(f"SAE {cfg.sae} reads {loaded.d_in}-wide inputs, but {inp.array} is {inp.d_in} wide")
    if loaded.layer is not None and loaded.layer != cfg.layer:
        raise StoreError(f"SAE {cfg.sae} was trained on layer {loaded.layer}; pass --layer {loaded.layer}")
    return loaded


def write_records(
    store: Store, run: Run, cfg: SAETrainConfig, inp: Inputs, sae: Any, source: str, counts: dict, metrics: dict
) -> None:
    """metrics.json in the run folder and the SAE's row in the `saes` table."""
    store.write_json(
        run.dir / "metrics.json",
        {
            "run_id": run.run_id,
            "config": config_dict(cfg),
            "view_sql": view_text(store, cfg.view),
            "train_sql": inp.train_sql,
            "eval_sql": inp.eval_sql,
            "counts": counts,
            "metrics": metrics,
        },
    )
    write_sae_record(
        store,
        name=metrics["sae_name"],
        layer=cfg.layer,
        architecture=metrics["architecture"],
        d_in=inp.d_in,
        d_sae=int(sae.cfg.d_sae),
        k=metrics["k"],
        path=metrics["sae_path"],
        source=source,
        run_id=run.run_id,
        metrics=metrics,
        qa=metrics.get("qa"),
    )


def run_sae(cfg: SAETrainConfig) -> SAEResult:
    """Train (or resume, or with --sae load) the SAE, evaluate it, gate it, record everything."""
    store = Store(cfg.store)
    cfg, resume_id, ckpt = resolve_resume(store, cfg)
    if cfg.layer is None:
        raise ValueError("run_sae trains one layer; pass --layer L (a sweep is trainers.sae.sweep.run_sweep)")
    inp = run_inputs(store, cfg)
    device = str(pick_device(cfg.device))
    loaded = load_existing(store, cfg, device, inp) if cfg.sae else None
    record = {
        **config_dict(cfg),
        "view_sql": view_text(store, cfg.view),
        "train_sql": inp.train_sql,
        "eval_sql": inp.eval_sql,
        "array": inp.array,
    }
    with Run(
        store,
        "eval_sae" if loaded else "train_sae",
        record,
        model_id=inp.attrs.get("model", ""),
        model_hash=inp.attrs.get("model_hash", ""),
        layers=[cfg.layer],
        run_id=resume_id,
    ) as run:
        counts: dict[str, Any] = {"train_tokens": inp.n_train, "eval_tokens": inp.n_eval}
        metrics: dict[str, Any] = {
            "store_version": STORE_VERSION,
            "layer": cfg.layer,
            "view": cfg.view,
            "array": inp.array,
        }
        held = HeldOut(store, cfg, inp.eval_sql, inp.array, inp.attrs)
        t0 = time.perf_counter()
        if loaded is None:
            sae, mean_vec, baseline = fit_and_save(
                store,
                cfg,
                run,
                inp.train_sql,
                inp.array,
                inp.d_in,
                inp.n_train,
                inp.attrs,
                device,
                counts,
                metrics,
                held=held,
                resume_from=ckpt,
            )
            metrics["train_seconds"] = time.perf_counter() - t0
            name, path, source, arch = run.run_id, str(run.dir / "sae"), "local", cfg.architecture
            k = cfg.k if cfg.architecture == "topk" else None
        else:
            sae, mean_vec, baseline = loaded.sae, None, None
            name, path, source, arch, k = loaded.name, loaded.path, loaded.source, loaded.architecture, loaded.k
        metrics.update(
            evaluate(store, cfg, sae, held=held, train_sql=inp.train_sql, mean_vec=mean_vec, baseline_sae=baseline)
        )
        metrics.update({"sae_name": name, "sae_path": path, "architecture": arch, "d_sae": int(sae.cfg.d_sae), "k": k})
        if cfg.qa != "off":
            metrics["qa"] = qa_checks(metrics, cfg, arch, k)
        write_records(store, run, cfg, inp, sae, source, counts, metrics)
        run.finish(counts=counts, metrics=metrics)
    return SAEResult(run.run_id, path, name, metrics)
