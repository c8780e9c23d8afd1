"""Attribution scores with bergson: `python -m extractors.run --kinds attribution --adapter NAME`.

    python -m extractors.run --kinds attribution --adapter latest          # mean / query / 32 / finetune_raw
    python -m extractors.run --kinds attribution --adapter latest --store /tmp/st --max-rows 64 \\
        --query-max-rows 8                                                  # CPU-sized
    python -m extractors.run --kinds attribution --adapter NAME --score-mode individual --preconditioning none \\
        --projection-dim 0 --subset-k 50

Every `--pool-split` row (default score_pool) is scored by how much its loss gradient agrees
with the gradients of the `--query-split` rows (default attr_query). Gradients are taken with
respect to the adapter's LoRA weights (lora_A and lora_B of every wrapped module) by bergson's
own collector (per-example gradients from forward/backward hooks, optionally randomly
projected), and scored by bergson's Scorer, in-process on the loaded model. bergson gets the
stored token ids and completion-only labels directly (extractors.sft_data): nothing is
rendered with a chat template, so attribution sees exactly the finetune objective.

Our users' terms, mapped onto bergson 2.5.1:
- `--score-mode mean`: the query gradients are averaged into one (bergson's query
  `aggregation mean`), then each pool row's score is `g_pool . H^-1 mean(g_query)`.
  `nearest`: bergson's `score nearest`, the max over query rows of `g_pool . H^-1 g_query`.
  `individual`: bergson's `score individual` (aggregation none): one score per (pool, query)
  pair, in `attribution_pairs`; `attribution_scores` then holds their mean over queries
  (= the `mean` score, by linearity).
- `--preconditioning query`: bergson's `autocorrelation` Hessian fitted on the query rows:
  per module, `H = (1/N) sum_n g_n g_n^T` over the N query rows' (projected) gradients, with
  their dataset labels, inverted as `damped_inverse` `(H + c mean(eig H) I)^-1` with
  `c = --damping` (0.1), applied to the query side only (bergson's one-sided mode, without unit
  normalization). bergson fits the Hessian; we apply its damped inverse with a Cholesky solve
  (`damped_solve`, equal to bergson's eigendecomposition-based inverse; two fp64 eigh of a
  1024 x 1024 matrix per module would take minutes on a CPU). `pool`: the same Hessian fitted on the pool rows (one more gradient pass over
  the pool). `none`: plain dot products.
- `--projection-dim P`: bergson's `projection_dim` (per module: a gradient `[out, in]` becomes
  `R_out G R_in^T`, P x P, Rademacher, seeded by `--projection-seed` and the module name).
  0 keeps exact gradients.
- `--loss-reduction mean` (default): each row's loss is the mean over its supervised tokens
  (bergson's default `sum` makes a row's gradient, and so its score, grow with its length).

Outputs: bergson's run folders under runs/<run_id>/bergson/ (`query/`, `hessian/`, `scores/`,
each written as `<name>.part/` and renamed when complete, plus the datasets given to bergson
and a `config.yaml` per step that `bergson <folder>/config.yaml` replays); the tables
`attribution_scores` (run_id, row_id, score, rank; rank 1 = highest) and, for individual,
`attribution_pairs` (run_id, row_id, query_row_id, score, rank within the query); with
`--subset-k K` the top K rows as subset `attr-top<K>-<run_id>` in `subsets`. Each table gets
one Parquet file per run, written whole at the end, so a killed run leaves no partial table;
rerunning the command starts a fresh run (the killed run's record stays `running`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from store.catalog.subsets import TABLE as SUBSETS_TABLE
from store.catalog.subsets import subset_table
from store.core import Store, StoreError


class AttributionResult(NamedTuple):
    run_id: str
    rows: int  # pool rows scored
    query_rows: int
    seconds: float
    rows_per_s: float  # pool rows / scoring-step seconds
    steps: dict[str, float]  # seconds per bergson step
    subset: str | None
    skipped: bool = False


SCORES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("row_id", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int64()),
        ("adapter", pa.string()),
        ("score_mode", pa.string()),
        ("preconditioning", pa.string()),
        ("projection_dim", pa.int32()),
        ("query_split", pa.string()),
        ("pool_split", pa.string()),
    ]
)
PAIRS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("row_id", pa.string()),
        ("query_row_id", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int64()),
    ]
)


def check_options(cfg: Any) -> None:
    """ExtractConfig checks for --kinds attribution (called from its __post_init__)."""
    if set(cfg.kinds) != {"attribution"}:
        raise ValueError(
            "--kinds attribution runs alone (it scores rows, not tokens); run the other kinds in a separate command"
        )
    if not cfg.adapter:
        raise ValueError(
            "--kinds attribution needs --adapter (latest, a name from the adapters table, or a "
            "peft folder): gradients are taken w.r.t. its LoRA weights; train one with "
            "python -m trainers.finetune"
        )
    if cfg.projection_dim < 0:
        raise ValueError(f"--projection-dim must be >= 0 (0 = exact gradients), got {cfg.projection_dim}")
    if cfg.damping < 0:
        raise ValueError(f"--damping must be >= 0, got {cfg.damping}")
    for name in ("subset_k", "query_max_rows"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def check_inputs(store: Store, cfg: Any) -> None:
    """Fail before the model loads: the adapter and both splits must exist."""
    from extractors.adapters import resolve_adapter
    from extractors.sft_data import select_rows_by

    resolve_adapter(store, cfg.adapter)
    select_rows_by(store, split=cfg.query_split, max_rows=cfg.query_max_rows, flag="--query-split")
    select_rows_by(store, split=cfg.pool_split, max_rows=cfg.max_rows, flag="--pool-split")


def hf_dataset(data: Any, keep: list[int]) -> Any:
    """The rows `keep` of SFTRows as the datasets.Dataset bergson reads: input_ids, labels
    (unshifted, -100 = no loss), length, and our row_id."""
    from datasets import Dataset

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


def bergson_configs(cfg: Any, run_path: Path, model_path: str, token_batch: int) -> tuple[Any, Any]:
    """(IndexConfig for a step at run_path, its GradientProcessor), from our options."""
    from bergson.config.config import DataConfig, IndexConfig
    from bergson.utils.worker_utils import processor_for

    index_cfg = IndexConfig(
        run_path=str(run_path),
        model=model_path,
        precision="auto",
        projection_dim=cfg.projection_dim,
        projection_seed=cfg.projection_seed,
        loss_reduction=cfg.loss_reduction,
        token_batch_size=token_batch,
        drop_columns=False,
        data=DataConfig(dataset=""),
    )
    return index_cfg, processor_for(index_cfg)


def _prepare(model: Any) -> tuple[set[str], list[Any]]:
    """bergson's target modules of a PeftModel (its lora_A/lora_B layers) and the LoRA weights,
    which get requires_grad so the backward pass reaches the hooks (bergson's CLI sets it on the
    input embeddings instead, which also computes the embedding matrix's gradient)."""
    from bergson.utils.worker_utils import extract_peft_target_modules

    targets = extract_peft_target_modules(model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    return targets, lora


def fwd_bwd(reduction: str) -> Any:
    """bergson's forward/backward (collector.fwd_bwd_factory for loss_fn ce) computed with logits at
    the supervised positions only: the loss, and so every gradient, is the same, but the
    vocabulary-wide head and its backward skip the prompt tokens (see trainers-side lm_loss)."""
    import warnings

    import torch
    import torch.nn.functional as F

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


def _computer(model: Any, ds: Any, index_cfg: Any, collector: Any, reduction: str) -> Any:
    from bergson.collector.collector import CollectorComputer
    from bergson.data import allocate_batches

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
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    import torch

    try:
        return base.get_decoder() is not None and isinstance(base.get_output_embeddings(), torch.nn.Linear)
    except (AttributeError, NotImplementedError):
        return False


def _collect(
    model: Any,
    ds: Any,
    index_cfg: Any,
    processor: Any,
    targets: set[str],
    *,
    scorer: Any = None,
    preprocess: Any = None,
) -> None:
    """bergson.collection.collect_gradients, with our forward/backward (see fwd_bwd)."""
    from bergson.collector.gradient_collectors import GradientCollector
    from bergson.config.config import PreprocessConfig

    processor.save(index_cfg.partial_run_path)
    collector = GradientCollector(
        model=model.base_model,
        cfg=index_cfg,
        processor=processor,
        target_modules=targets,
        data=ds,
        scorer=scorer,
        preprocess_cfg=preprocess or PreprocessConfig(),
        attention_cfgs={},
        filter_modules=index_cfg.filter_modules,
    )
    _computer(model, ds, index_cfg, collector, index_cfg.loss_reduction).run_with_collector_hooks(
        desc="gradients" + (" + scores" if scorer is not None else "")
    )


def _fit_hessian(model: Any, ds: Any, index_cfg: Any, processor: Any, targets: set[str]) -> None:
    """bergson's autocorrelation Hessian (hessian_worker's dense branch) on `ds`: per module the mean
    outer product of the rows' gradients, saved as bergson's processor (hessians.pth). Its
    eigendecompositions are skipped: bergson recomputes them when it inverts anyway, and `damped_solve`
    needs none (two fp64 eigh of a 1024 x 1024 matrix per module cost minutes on a CPU)."""
    import math

    from bergson.hessians.autocorrelation import AutocorrelationCollector

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
    import torch

    H64 = H.to(torch.float64)
    d = H64.shape[0]
    delta = damping * torch.trace(H64) / d
    L = torch.linalg.cholesky(H64 + delta.clamp_min(1e-30) * torch.eye(d, dtype=torch.float64))
    return torch.cholesky_solve(g.to(torch.float64).T, L).T.to(g.dtype)


def make_scorer(
    path: Path, n_rows: int, query_path: Path, hessian_path: str | None, mode: str, damping: float, device: Any
) -> Any:
    """bergson's Scorer over its query index, the query side preconditioned with `damped_solve`
    (what bergson.score.create_scorer does with a dense hessian_path, unit_normalize off)."""
    import torch
    from bergson.config.config import ScoreConfig
    from bergson.gradients import GradientProcessor
    from bergson.score.score import get_query_grads
    from bergson.score.score_writer import MemmapSequenceScoreWriter
    from bergson.score.scorer import Scorer

    score_cfg = ScoreConfig(query_path=str(query_path), score="nearest" if mode == "nearest" else "individual")
    grads, _ = get_query_grads(score_cfg)
    if hessian_path:
        H = GradientProcessor.load(Path(hessian_path), map_location="cpu").hessians
        grads = {m: damped_solve(H[m], g, damping) for m, g in grads.items()}
    n_scores = 1 if mode == "nearest" else len(next(iter(grads.values())))
    writer = MemmapSequenceScoreWriter(path, n_rows, n_scores, dtype=torch.float32)
    return Scorer(grads, score_cfg.modules, writer, device, torch.float32, score_mode=score_cfg.score)


def read_scores(path: Path) -> np.ndarray:
    """bergson's scores.bin as [rows, columns] float64; every cell must have been written."""
    import json

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


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1 = highest; ties broken by position (row_id order), so ranks are reproducible."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def extract_attribution(store: Store, cfg: Any, lm: Any, layout: Any) -> AttributionResult:
    """Score the pool against the query with bergson and write the tables (module docstring)."""
    from bergson.cli.commands import Build, Hessian, Score
    from bergson.config.config import HessianConfig, InversionConfig, PreprocessConfig, ScoreConfig
    from bergson.config.config_io import save_run_config

    from extractors.adapters import adapter_name, apply_adapter, resolve_adapter
    from extractors.sft_data import load_sft_rows, select_rows_by
    from store.catalog.runs import Run
    from store.cli import config_dict

    ref = resolve_adapter(store, cfg.adapter)
    if adapter_name(lm.model_id) is None:
        lm = apply_adapter(lm, cfg.adapter, store)
    query_ids = select_rows_by(store, split=cfg.query_split, max_rows=cfg.query_max_rows, flag="--query-split")
    pool_ids = select_rows_by(store, split=cfg.pool_split, max_rows=cfg.max_rows, flag="--pool-split")
    q = load_sft_rows(store, layout.tokenization, query_ids)
    p = load_sft_rows(store, layout.tokenization, pool_ids)
    q_keep = [i for i, n in enumerate(q.n_supervised) if n > 0]
    p_keep = [i for i, n in enumerate(p.n_supervised) if n > 0]
    if not q_keep:
        raise StoreError(
            f"--query-split {cfg.query_split}: none of its {len(query_ids)} rows has a supervised "
            f"token, so there is no query gradient; pick a split with assistant completions"
        )
    if not p_keep:
        raise StoreError(f"--pool-split {cfg.pool_split}: none of its {len(pool_ids)} rows has a supervised token")
    longest = max(len(x) for x in q.input_ids + p.input_ids)
    token_batch = max(cfg.batch_tokens or (32768 if lm.device.type == "cuda" else 4096), longest)
    model = lm.model
    counts = {
        "pool_rows": len(p_keep),
        "query_rows": len(q_keep),
        "pool_tokens": sum(len(p.input_ids[i]) for i in p_keep),
        "pool_rows_without_supervised_tokens": len(pool_ids) - len(p_keep),
        "query_rows_without_supervised_tokens": len(query_ids) - len(q_keep),
    }
    if counts["pool_rows_without_supervised_tokens"]:
        print(
            f"note: {counts['pool_rows_without_supervised_tokens']} pool rows have no supervised token and get "
            f"no score (counted in the run record)"
        )
    record = {
        **config_dict(cfg),
        "adapter": ref.name,
        "adapter_path": ref.path,
        "tokenization": layout.tokenization,
        "bergson": __import__("bergson").__version__,
        "token_batch_size": token_batch,
    }
    with Run(store, "attribution", record, model_id=lm.model_id, model_hash=lm.model_hash) as run:
        root = run.dir / "bergson"
        root.mkdir(parents=True, exist_ok=True)
        ds_q, ds_p = hf_dataset(q, q_keep), hf_dataset(p, p_keep)
        ds_q.save_to_disk(str(root / "query_data.hf"))
        ds_p.save_to_disk(str(root / "pool_data.hf"))
        targets, lora = _prepare(model)
        steps: dict[str, float] = {}
        try:
            aggregation = "mean" if cfg.score_mode == "mean" else "none"
            hessian_path = None
            if cfg.preconditioning != "none":
                on, ds_h = ("query", ds_q) if cfg.preconditioning == "query" else ("pool", ds_p)
                step = Step(root / "hessian")
                with step as part:
                    index_cfg, processor = bergson_configs(cfg, root / "hessian", ref.path, token_batch)
                    index_cfg.data.dataset = str(root / f"{on}_data.hf")
                    save_run_config(
                        Hessian(HessianConfig(method="autocorrelation", use_dataset_labels=True), index_cfg), part
                    )
                    _fit_hessian(model, ds_h, index_cfg, processor, targets)
                steps["hessian"], hessian_path = step.seconds, str(step.path)
            step = Step(root / "query")
            with step as part:
                index_cfg, processor = bergson_configs(cfg, root / "query", ref.path, token_batch)
                index_cfg.data.dataset = str(root / "query_data.hf")
                pre = PreprocessConfig(aggregation=aggregation)
                save_run_config(Build(index_cfg, pre), part)
                _collect(model, ds_q, index_cfg, processor, targets, preprocess=pre)
            steps["query"] = step.seconds
            step = Step(root / "scores")
            with step as part:
                index_cfg, processor = bergson_configs(cfg, root / "scores", ref.path, token_batch)
                index_cfg.data.dataset = str(root / "pool_data.hf")
                score_cfg = ScoreConfig(
                    query_path=str(root / "query"),
                    precision="fp32",
                    score="nearest" if cfg.score_mode == "nearest" else "individual",
                )
                pre = PreprocessConfig(
                    hessian_path=hessian_path, inversion_cfg=InversionConfig(damping_factor=cfg.damping)
                )
                save_run_config(Score(index_cfg=index_cfg, score_cfg=score_cfg, preprocess_cfg=pre), part)
                scorer = make_scorer(
                    part, len(ds_p), root / "query", hessian_path, cfg.score_mode, cfg.damping, lm.device
                )
                _collect(model, ds_p, index_cfg, processor, targets, scorer=scorer)
                scorer.writer.flush()
            steps["scores"] = step.seconds
        finally:
            for t in lora:
                t.requires_grad_(False)
        S = read_scores(root / "scores")
        rows = [p.row_ids[i] for i in p_keep]
        score = S.mean(axis=1) if cfg.score_mode == "individual" else S[:, 0]
        if not np.all(np.isfinite(score)):
            raise StoreError(
                f"bergson returned {int((~np.isfinite(score)).sum())} non-finite scores; try "
                f"--loss-reduction mean and a larger --damping"
            )
        rank = ranks_of(score)
        n = len(rows)
        if cfg.score_mode == "individual":
            qrows = [q.row_ids[i] for i in q_keep]
            store.write_table(
                "attribution_pairs",
                pa.table(
                    {
                        "run_id": [run.run_id] * (n * len(qrows)),
                        "row_id": [r for r in rows for _ in qrows],
                        "query_row_id": qrows * n,
                        "score": S.reshape(-1),
                        "rank": np.stack([ranks_of(S[:, j]) for j in range(len(qrows))], axis=1).reshape(-1),
                    },
                    schema=PAIRS_SCHEMA,
                ),
                part=run.run_id,
            )
        subset = None
        if cfg.subset_k:
            subset = f"attr-top{cfg.subset_k}-{run.run_id}"
            top = np.argsort(rank)[: cfg.subset_k]
            # The name, rows and ranks `python -m trainers.subsets --from attribution:<run> --k K` writes.
            store.write_table(
                SUBSETS_TABLE,
                subset_table(
                    subset,
                    [rows[i] for i in top],
                    rank[top],
                    score[top],
                    source=f"attribution:{run.run_id}",
                    kind="top_k",
                    seed=None,
                    run_id=run.run_id,
                    method=f"top {cfg.subset_k} of attribution:{run.run_id} ({cfg.score_mode}/{cfg.preconditioning}/"
                    f"{cfg.projection_dim}), pool {cfg.pool_split}",
                ),
                part=subset,
            )
        store.write_table(
            "attribution_scores",
            pa.table(
                {
                    "run_id": [run.run_id] * n,
                    "row_id": rows,
                    "score": score,
                    "rank": rank,
                    "adapter": [ref.name] * n,
                    "score_mode": [cfg.score_mode] * n,
                    "preconditioning": [cfg.preconditioning] * n,
                    "projection_dim": [cfg.projection_dim] * n,
                    "query_split": [cfg.query_split] * n,
                    "pool_split": [cfg.pool_split] * n,
                },
                schema=SCORES_SCHEMA,
            ),
            part=run.run_id,
        )
        seconds = sum(steps.values())
        metrics = {
            "step_seconds": steps,
            "pool_rows_per_s": n / steps["scores"] if steps["scores"] else 0.0,
            "score_mean": float(score.mean()),
            "score_std": float(score.std()),
            "subset": subset,
        }
        run.finish(counts=counts, metrics=metrics)
    print(
        f"attribution: {n} pool rows x {len(q_keep)} query rows ({cfg.score_mode} / {cfg.preconditioning} / "
        f"{cfg.projection_dim}) in {seconds:.1f} s ({metrics['pool_rows_per_s']:.2f} pool rows/s); run {run.run_id}"
        + (f"; subset {subset}" if subset else "")
    )
    return AttributionResult(run.run_id, n, len(q_keep), seconds, metrics["pool_rows_per_s"], steps, subset)
