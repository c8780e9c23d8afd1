"""bergson's steps run in-process on a loaded PeftModel: the query side once, then the pool in units.

    with lora_grads(lm.model) as targets:
        side = query_side(lm.model, run_dir / "bergson", spec, ds_query, ds_pool, token_batch, targets)
        S = score_unit(lm.model, ds_unit, spec, side, token_batch, lm.device, targets)   # [rows, scores]

`AttributionSpec` holds what `--kinds attribution` computes, in our users' terms (their mapping
onto bergson 2.5.1 is in extractors.attribution.scores), and which of its settings name the run
(`identity`, hashed into `run_id`) or only decide how it is computed (`execution`: the unit size,
the token batch and the device decide the bytes, so a partial run continues only with the same
ones; extractors.attribution.units). The query side (the Hessian unless `--preconditioning none`,
the query index) is written as bergson's step folders (`<name>.part/` renamed to `<name>/` when
complete, with the `config.yaml` that `bergson <folder>/config.yaml` replays) and comes back as the
preconditioned query gradients the Scorer takes. A pool unit is scored by bergson's collector and
Scorer on that unit's rows alone, its batches formed within the unit (bergson's
`allocate_batches` over the unit's lengths), so its scores depend on the unit only, never on which
other units the same process scored. Gradients come from bergson's own collector, with our
forward/backward (`fwd_bwd`: logits only at the supervised positions); the query side is
preconditioned by `damped_solve`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from extractors.adapters import AdapterRef
from extractors.sft_data import SFTRows
from store.core import StoreError

if TYPE_CHECKING:
    from bergson.config.config import IndexConfig  # lazy: bergson is optional


@dataclass(frozen=True)
class AttributionSpec:
    """What `extract_attribution` (extractors.attribution.scores) computes; the options' meaning in
    bergson's terms is in that module's docstring."""

    adapter: AdapterRef  # gradients are taken w.r.t. its LoRA weights
    query_split: str = "attr_query"
    pool_split: str = "score_pool"
    query_max_rows: int | None = None
    pool_max_rows: int | None = None
    score_mode: str = "mean"  # mean | nearest | individual
    preconditioning: str = "query"  # none | query | pool
    projection_dim: int = 32
    projection_seed: int = 0
    damping: float = 0.1
    subset_k: int | None = None
    loss_reduction: str = "mean"
    batch_tokens: int | None = None  # bergson's token batch; None: 32768 on CUDA, 4096 on CPU
    unit_rows: int = 64  # pool rows per unit: the commit, resume and claim granule
    model: str = ""  # --model as given (part of the run's identity)
    device: str = "cpu"  # the device type the model runs on: cpu | cuda
    compute_dtype: str = "fp32"  # the model's compute dtype, resolved (bf16 | fp16 | fp32)
    run_config: dict[str, Any] = field(default_factory=dict)  # the command's config, for the run record

    def identity(self) -> dict[str, Any]:
        """The settings that decide what is computed: the same ones name the same run (`run_id`)."""
        return {
            "adapter": self.adapter.name,
            "model": self.model,
            "compute_dtype": self.compute_dtype,
            "query_split": self.query_split,
            "pool_split": self.pool_split,
            "query_max_rows": self.query_max_rows,
            "max_rows": self.pool_max_rows,
            "score_mode": self.score_mode,
            "preconditioning": self.preconditioning,
            "projection_dim": self.projection_dim,
            "projection_seed": self.projection_seed,
            "damping": self.damping,
            "loss_reduction": self.loss_reduction,
        }

    @property
    def run_id(self) -> str:
        """attribution-<12 hex of the identity>: the same command resumes (and shares) the same run."""
        key = json.dumps(self.identity(), sort_keys=True, default=str)
        return "attribution-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    def requested_batch(self) -> int:
        return self.batch_tokens or (32768 if self.device == "cuda" else 4096)

    def execution(self) -> dict[str, Any]:
        """The settings that decide the scores' last bits but not what they mean: a unit's batches
        (its rows, the token batch) and the device. A partial run continues only with these."""
        return {"unit_rows": self.unit_rows, "batch_tokens": self.requested_batch(), "device": self.device}


def hf_dataset(data: SFTRows, keep: list[int]) -> Any:
    """The rows `keep` of SFTRows as the datasets.Dataset bergson reads: input_ids, labels
    (unshifted, -100 = no loss), length, and our row_id."""
    from datasets import Dataset  # lazy: datasets takes seconds to import, and only attribution uses it

    return Dataset.from_dict(
        {
            "row_id": [data.row_ids[i] for i in keep],
            "input_ids": [data.input_ids[i] for i in keep],
            "labels": [data.labels[i] for i in keep],
            "length": [len(data.input_ids[i]) for i in keep],
        }
    )


class Step:
    """One bergson step's folder: written as `<path>.part/`, renamed to `<path>/` when complete."""

    def __init__(self, path: Path):
        self.path, self.part = path, Path(str(path) + ".part")

    def __enter__(self) -> Path:
        shutil.rmtree(self.part, ignore_errors=True)
        self.part.mkdir(parents=True)
        self.t0 = time.perf_counter()
        return self.part

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            shutil.move(self.part, self.path)


def bergson_configs(spec: AttributionSpec, run_path: Path, token_batch: int) -> tuple[IndexConfig, Any]:
    """(IndexConfig for a step at run_path, its GradientProcessor), from our options."""
    from bergson.config.config import DataConfig, IndexConfig  # lazy: bergson is optional (attribution only)
    from bergson.utils.worker_utils import processor_for  # lazy: bergson is optional

    index_cfg = IndexConfig(
        run_path=str(run_path),
        model=spec.adapter.path,
        precision="auto",
        projection_dim=spec.projection_dim,
        projection_seed=spec.projection_seed,
        loss_reduction=spec.loss_reduction,
        token_batch_size=token_batch,
        drop_columns=False,
        data=DataConfig(dataset=""),
    )
    return index_cfg, processor_for(index_cfg)


@contextmanager
def lora_grads(model: Any) -> Iterator[set[str]]:
    """bergson's target modules of a PeftModel (its lora_A/lora_B layers), with requires_grad on the
    LoRA weights for the block so the backward pass reaches the hooks (bergson's CLI sets it on the
    input embeddings instead, which also computes the embedding matrix's gradient)."""
    from bergson.utils.worker_utils import extract_peft_target_modules  # lazy: bergson is optional

    targets = extract_peft_target_modules(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    try:
        yield targets
    finally:
        for p in lora:
            p.requires_grad_(False)


def fwd_bwd(reduction: str) -> Any:
    """bergson's forward/backward (collector.fwd_bwd_factory for loss_fn ce) computed with logits at
    the supervised positions only: the loss, and so every gradient, is the same, but the
    vocabulary-wide head and its backward skip the prompt tokens (see trainers-side lm_loss)."""

    def run(model: Any, x: Any, y: Any, batch: dict) -> Any:
        base = model.get_base_model()
        h = base.get_decoder()(input_ids=x).last_hidden_state[:, :-1]
        target = y[:, 1:]
        mask = target != -100
        rows = torch.arange(len(x), device=x.device).unsqueeze(1).expand_as(target)[mask]
        ce = F.cross_entropy(base.get_output_embeddings()(h[mask]).float(), target[mask], reduction="none")
        losses = torch.zeros(len(x), device=x.device, dtype=torch.float32).index_add(0, rows, ce)
        if reduction == "mean":
            losses = losses / mask.sum(1).clamp_min(1)
        with warnings.catch_warnings():  # the LoRA weights, not the hooked inputs, require grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        model.zero_grad()
        return losses

    return run


def _computer(model: Any, ds: Any, index_cfg: IndexConfig, collector: Any, reduction: str) -> Any:
    from bergson.collector.collector import CollectorComputer  # lazy: bergson is optional
    from bergson.data import allocate_batches  # lazy: bergson is optional

    computer = CollectorComputer(
        model=model,
        data=ds,
        collector=collector,
        cfg=index_cfg,
        batches=allocate_batches(ds["length"][:], index_cfg.token_batch_size),
    )
    if _split_head_ok(model):
        computer.forward_backward = fwd_bwd(reduction)
    return computer


def _split_head_ok(model: Any) -> bool:
    base = model.get_base_model()
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    try:
        return base.get_decoder() is not None and isinstance(base.get_output_embeddings(), torch.nn.Linear)
    except (AttributeError, NotImplementedError):
        return False


def _collect(
    model: Any, ds: Any, index_cfg: IndexConfig, processor: Any, targets: set[str], *, preprocess: Any = None
) -> None:
    """bergson.collection.collect_gradients (the query index), with our forward/backward (see fwd_bwd)."""
    from bergson.collector.gradient_collectors import GradientCollector  # lazy: bergson is optional
    from bergson.config.config import PreprocessConfig  # lazy: bergson is optional

    processor.save(index_cfg.partial_run_path)
    collector = GradientCollector(
        model=model.base_model,
        cfg=index_cfg,
        processor=processor,
        target_modules=targets,
        data=ds,
        preprocess_cfg=preprocess or PreprocessConfig(),
        attention_cfgs={},
        filter_modules=index_cfg.filter_modules,
    )
    _computer(model, ds, index_cfg, collector, index_cfg.loss_reduction).run_with_collector_hooks(desc="gradients")


def _fit_hessian(model: Any, ds: Any, index_cfg: IndexConfig, processor: Any, targets: set[str]) -> None:
    """bergson's autocorrelation Hessian (hessian_worker's dense branch) on `ds`: per module the mean
    outer product of the rows' gradients, saved as bergson's processor (hessians.pth). Its
    eigendecompositions are skipped: bergson recomputes them when it inverts anyway, and `damped_solve`
    needs none (two fp64 eigh of a 1024 x 1024 matrix per module cost minutes on a CPU)."""
    from bergson.hessians.autocorrelation import AutocorrelationCollector  # lazy: bergson is optional

    class Gram(AutocorrelationCollector):
        def teardown(self) -> None:
            n = self.num_rows(self.data)
            self.processor.hessians = {k: (h / n).cpu() for k, h in self.processor.hessians.items()}
            assert set(self.processor.hessians) == set(self.shapes()) and all(
                h.shape[0] == math.prod(self.shapes()[k]) for k, h in self.processor.hessians.items()
            )
            self.processor.save(Path(self.path))

    collector = Gram(
        model=model.base_model,
        data=ds,
        path=str(index_cfg.partial_run_path),
        processor=processor,
        target_modules=targets,
        attention_cfgs={},
        filter_modules=None,
    )
    _computer(model, ds, index_cfg, collector, index_cfg.loss_reduction).run_with_collector_hooks(
        desc="autocorrelation Hessian"
    )


def damped_solve(H: Any, g: Any, damping: float) -> Any:
    """`g @ (H + c mean(eig H) I)^-1` for a p.s.d. H: bergson's dense `damped_inverse` (power -1),
    by a Cholesky solve in fp64 instead of an eigendecomposition (mean eigenvalue = trace / d)."""
    H64 = H.to(torch.float64)
    d = H64.shape[0]
    delta = damping * torch.trace(H64) / d
    L = torch.linalg.cholesky(H64 + delta.clamp_min(1e-30) * torch.eye(d, dtype=torch.float64))
    return torch.cholesky_solve(g.to(torch.float64).T, L).T.to(g.dtype)


class QuerySide(NamedTuple):
    """What scoring a pool unit needs from the query side, computed once per run."""

    grads: dict[str, torch.Tensor]  # module -> [query gradients, dim] float32, preconditioned
    modules: list[str]  # bergson's module order (the order scores are summed in)
    steps: dict[str, float]  # seconds of the steps that computed it (hessian, query)


def preconditioned_grads(query_path: Path, hessian_path: Path | None, damping: float) -> QuerySide:
    """The query index's gradients, the query side preconditioned with `damped_solve` (what
    bergson.score.create_scorer does with a dense hessian_path, unit_normalize off), as the float32
    tensors bergson's Scorer computes with."""
    from bergson.config.config import ScoreConfig  # lazy: bergson is optional
    from bergson.gradients import GradientProcessor  # lazy: bergson is optional
    from bergson.score.score import get_query_grads  # lazy: bergson is optional

    score_cfg = ScoreConfig(query_path=str(query_path))
    grads, _ = get_query_grads(score_cfg)
    if hessian_path is not None:
        H = GradientProcessor.load(hessian_path, map_location="cpu").hessians
        grads = {m: damped_solve(H[m], g, damping) for m, g in grads.items()}
    grads = {m: g.to(torch.float32).contiguous() for m, g in grads.items()}
    return QuerySide(grads, list(score_cfg.modules), {})


def _score_config(spec: AttributionSpec, root: Path, token_batch: int, hessian_path: str | None) -> Any:
    """bergson's Score command for the whole pool (its config.yaml replays our scores with its CLI)."""
    from bergson.cli.commands import Score  # lazy: bergson is optional
    from bergson.config.config import InversionConfig, PreprocessConfig, ScoreConfig  # lazy: bergson is optional

    index_cfg, _ = bergson_configs(spec, root / "scores", token_batch)
    index_cfg.data.dataset = str(root / "pool_data.hf")
    score_cfg = ScoreConfig(
        query_path=str(root / "query"),
        precision="fp32",
        score="nearest" if spec.score_mode == "nearest" else "individual",
    )
    pre = PreprocessConfig(hessian_path=hessian_path, inversion_cfg=InversionConfig(damping_factor=spec.damping))
    return Score(index_cfg=index_cfg, score_cfg=score_cfg, preprocess_cfg=pre)


def query_side(
    model: Any, root: Path, spec: AttributionSpec, ds_q: Any, ds_p: Any, token_batch: int, targets: set[str]
) -> QuerySide:
    """bergson's hessian (unless --preconditioning none) and query steps under `root`, each with its
    replayable config.yaml (and `scores/config.yaml` for the pool), then the preconditioned query
    gradients. `root` holds query_data.hf and pool_data.hf."""
    from bergson.cli.commands import Build, Hessian  # lazy: bergson is optional
    from bergson.config.config import HessianConfig, PreprocessConfig  # lazy: bergson is optional
    from bergson.config.config_io import save_run_config  # lazy: bergson is optional

    steps: dict[str, float] = {}
    aggregation = "mean" if spec.score_mode == "mean" else "none"
    hessian_path = None
    if spec.preconditioning != "none":
        on, ds_h = ("query", ds_q) if spec.preconditioning == "query" else ("pool", ds_p)
        step = Step(root / "hessian")
        with step as part:
            index_cfg, processor = bergson_configs(spec, root / "hessian", token_batch)
            index_cfg.data.dataset = str(root / f"{on}_data.hf")
            save_run_config(Hessian(HessianConfig(method="autocorrelation", use_dataset_labels=True), index_cfg), part)
            _fit_hessian(model, ds_h, index_cfg, processor, targets)
        steps["hessian"], hessian_path = step.seconds, step.path
    step = Step(root / "query")
    with step as part:
        index_cfg, processor = bergson_configs(spec, root / "query", token_batch)
        index_cfg.data.dataset = str(root / "query_data.hf")
        pre = PreprocessConfig(aggregation=aggregation)
        save_run_config(Build(index_cfg, pre), part)
        _collect(model, ds_q, index_cfg, processor, targets, preprocess=pre)
    steps["query"] = step.seconds
    shutil.rmtree(root / "scores", ignore_errors=True)  # a killed earlier run's; written whole at the end
    (root / "scores").mkdir(parents=True)
    save_run_config(
        _score_config(spec, root, token_batch, str(hessian_path) if hessian_path else None), root / "scores"
    )
    side = preconditioned_grads(root / "query", hessian_path, spec.damping)
    return side._replace(steps=steps)


def score_unit(
    model: Any, ds: Any, spec: AttributionSpec, side: QuerySide, token_batch: int, device: Any, targets: set[str]
) -> np.ndarray:
    """One pool unit's scores `[rows of ds, score columns]` (float32 values as float64): bergson's
    collector and Scorer over `ds` alone, batched within it. Nothing is kept on disk (bergson's
    loop drops a counter file in its run folder: a temporary one here); the run's scores step
    folder gets the whole pool's scores.bin when the run completes."""
    from bergson.collector.gradient_collectors import GradientCollector  # lazy: bergson is optional
    from bergson.config.config import PreprocessConfig  # lazy: bergson is optional
    from bergson.score.score_writer import InMemorySequenceScoreWriter  # lazy: bergson is optional
    from bergson.score.scorer import Scorer  # lazy: bergson is optional

    class UnitCollector(GradientCollector):
        def teardown(self) -> None:  # bergson saves data.hf and the processor here: a unit keeps neither
            pass

    scratch = tempfile.TemporaryDirectory(prefix="attribution-unit-")
    index_cfg, processor = bergson_configs(spec, Path(scratch.name) / "unit", token_batch)
    index_cfg.partial_run_path.mkdir(parents=True)
    mode = "nearest" if spec.score_mode == "nearest" else "individual"
    n_scores = 1 if mode == "nearest" else len(next(iter(side.grads.values())))
    writer = InMemorySequenceScoreWriter(len(ds), n_scores, dtype=torch.float32)
    scorer = Scorer(side.grads, side.modules, writer, device, torch.float32, score_mode=mode)
    collector = UnitCollector(
        model=model.base_model,
        cfg=index_cfg,
        processor=processor,
        target_modules=targets,
        data=ds,
        scorer=scorer,
        preprocess_cfg=PreprocessConfig(),
        attention_cfgs={},
        filter_modules=index_cfg.filter_modules,
    )
    with scratch:
        _computer(model, ds, index_cfg, collector, spec.loss_reduction).run_with_collector_hooks(desc="unit scores")
    return writer.scores.numpy().astype(np.float64)


def read_scores(path: Path) -> np.ndarray:
    """bergson's scores.bin as [rows, columns] float64; every cell must have been written."""
    info = json.loads((path / "info.json").read_text())
    mm = np.memmap(
        path / "scores.bin",
        dtype=np.dtype({k: info["dtype"][k] for k in info["dtype"]}),
        mode="r",
        shape=(info["num_rows"],),
    )
    cols = [np.asarray(mm[f"score_{i}"], dtype=np.float64) for i in range(info["num_scores"])]
    if not all(np.all(mm[f"written_{i}"]) for i in range(info["num_scores"])):
        raise StoreError(f"bergson left unwritten scores in {path}; rerun the command")
    return np.stack(cols, axis=1)


def write_scores_bin(path: Path, S: np.ndarray) -> None:
    """The whole pool's scores as bergson's scores step writes them (scores.bin + info.json in
    `path`, read back by `read_scores`), so its folder looks like bergson's own output."""
    from bergson.score.score_writer import save_sequence_scores  # lazy: bergson is optional

    save_sequence_scores(path, S.astype(np.float32), dtype=torch.float32)
