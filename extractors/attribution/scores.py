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
  (`damped_solve` in extractors.attribution.steps, equal to bergson's eigendecomposition-based
  inverse; two fp64 eigh of a 1024 x 1024 matrix per module would take minutes on a CPU).
  `pool`: the same Hessian fitted on the pool rows (one more gradient pass over the pool).
  `none`: plain dot products.
- `--projection-dim P`: bergson's `projection_dim` (per module: a gradient `[out, in]` becomes
  `R_out G R_in^T`, P x P, Rademacher, seeded by `--projection-seed` and the module name).
  0 keeps exact gradients.
- `--loss-reduction mean` (default): each row's loss is the mean over its supervised tokens
  (bergson's default `sum` makes a row's gradient, and so its score, grow with its length).

Units, resume and shared workers (the computing is in extractors.attribution.steps, the tables'
unit parts in extractors.attribution.tables, the run folder's files in
extractors.attribution.run_files). The run id is `attribution-<hash of the settings that decide
the scores>` (AttributionSpec.identity), so the same command resumes the same run, and N processes
(or torchrun ranks) started with it share it. The query side (Hessian, query gradients, their
preconditioning) is computed once, under a claim, and saved in runs/<run_id>/ as safetensors + JSON
with a checksum that is verified whenever a process reuses it. The pool is cut into units of
`--unit-rows` rows (in row_id order); each unit is claimed (store.claims: no unit twice, a dead
worker's claim is taken over), scored on its own rows alone and committed as its own Parquet part
of `attribution_scores` (and `attribution_pairs`), readable at once with rank NULL and `complete`
false. When every unit is committed one worker finalizes: ranks over the whole pool, `complete`
true, the `--subset-k` subset, bergson's scores.bin. A SIGKILL loses at most the unit in progress;
the same command finishes the rest, with final tables byte-identical to an uninterrupted run (at
the same thread count on a CPU); rerunning a complete run does nothing. A partial run is continued
only with the same execution settings (--unit-rows, --batch-tokens, --device) and rows: otherwise
one error names each difference.

Outputs: bergson's run folders under runs/<run_id>/bergson/ (`query/`, `hessian/`, each written as
`<name>.part/` and renamed when complete, `scores/` with its `config.yaml` and, once the run is
complete, the whole pool's scores.bin; the datasets given to bergson); `config.yaml` per step, which
`bergson <folder>/config.yaml` replays; the tables `attribution_scores` (run_id, row_id, score,
rank; rank 1 = highest; complete) and, for individual, `attribution_pairs` (run_id, row_id,
query_row_id, score, rank within the query, complete); with `--subset-k K` the top K rows as subset
`attr-top<K>-<run_id>` in `subsets`.
"""

from __future__ import annotations

import shutil
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from extractors.adapters import adapter_attrs
from extractors.attribution.run_files import (
    check_resume,
    is_complete,
    load_query_side,
    recorded_threads,
    save_query_side,
    settings_of,
    write_complete,
    write_settings,
)
from extractors.attribution.steps import (
    AttributionSpec,
    QuerySide,
    hf_dataset,
    lora_grads,
    query_side,
    read_scores,
    score_unit,
    write_scores_bin,
)
from extractors.attribution.tables import (
    PAIRS_SCHEMA,
    SCORES_SCHEMA,
    commit_unit,
    committed_units,
    finalize,
    ranks_of,
    read_units,
    write_subset,
)
from extractors.sft_data import SFTRows, load_sft_rows, select_rows_by
from extractors.units import UnitOptions, claimed_units
from store import claims
from store.catalog.runs import Run
from store.catalog.subsets import TABLE as SUBSETS_TABLE
from store.core import Store, StoreError, sweep_temp_files

__all__ = [  # the schemas, ranks_of and read_scores are imported from here by tests and bench
    "PAIRS_SCHEMA",
    "SCORES_SCHEMA",
    "AttributionResult",
    "AttributionSpec",
    "check_inputs",
    "check_options",
    "extract_attribution",
    "ranks_of",
    "read_scores",
]


class AttributionResult(NamedTuple):
    run_id: str
    rows: int  # pool rows of the run
    query_rows: int
    seconds: float  # this process's scoring seconds
    rows_per_s: float  # pool rows this process scored / its scoring seconds
    steps: dict[str, float]  # seconds per step: hessian and query (when the query side was computed), scores
    subset: str | None
    skipped: bool = False  # the run was complete already
    units: int = 0  # units this process scored


def check_options(
    kinds: list[str],
    adapter: str | None,
    *,
    projection_dim: int,
    damping: float,
    subset_k: int | None,
    query_max_rows: int | None,
    unit_rows: int = 64,
) -> None:
    """ExtractConfig checks for --kinds attribution (called from its __post_init__)."""
    if set(kinds) != {"attribution"}:
        raise ValueError(
            "--kinds attribution runs alone (it scores rows, not tokens); run the other kinds in a separate command"
        )
    if not adapter:
        raise ValueError(
            "--kinds attribution needs --adapter (latest, a name from the adapters table, or a "
            "peft folder): gradients are taken w.r.t. its LoRA weights; train one with "
            "python -m trainers.finetune"
        )
    if projection_dim < 0:
        raise ValueError(f"--projection-dim must be >= 0 (0 = exact gradients), got {projection_dim}")
    if damping < 0:
        raise ValueError(f"--damping must be >= 0, got {damping}")
    for name, v in (("subset-k", subset_k), ("query-max-rows", query_max_rows), ("unit-rows", unit_rows)):
        if v is not None and v <= 0:
            raise ValueError(f"--{name} must be positive, got {v}")


def check_inputs(store: Store, spec: AttributionSpec) -> None:
    """Fail before the model loads: both splits must exist (the adapter is resolved already), and a
    partial run of these settings is continued only with its own execution settings and rows."""
    query_ids = select_rows_by(store, split=spec.query_split, max_rows=spec.query_max_rows, flag="--query-split")
    pool_ids = select_rows_by(store, split=spec.pool_split, max_rows=spec.pool_max_rows, flag="--pool-split")
    check_resume(store, spec, pool_ids, query_ids)


class _Rows(NamedTuple):
    """One side of the scoring (query or pool): its rows and those with a supervised token."""

    ids: list[str]  # the split's selected rows
    data: SFTRows
    keep: list[int]  # indices of the rows with a supervised token


def _inputs(store: Store, layout: Any, spec: AttributionSpec) -> tuple[_Rows, _Rows]:
    """(query, pool) rows; an error when either side has no supervised token at all."""
    query_ids = select_rows_by(store, split=spec.query_split, max_rows=spec.query_max_rows, flag="--query-split")
    pool_ids = select_rows_by(store, split=spec.pool_split, max_rows=spec.pool_max_rows, flag="--pool-split")
    q = load_sft_rows(store, layout.tokenization, query_ids)
    p = load_sft_rows(store, layout.tokenization, pool_ids)
    q_keep = [i for i, n in enumerate(q.n_supervised) if n > 0]
    p_keep = [i for i, n in enumerate(p.n_supervised) if n > 0]
    if not q_keep:
        raise StoreError(
            f"--query-split {spec.query_split}: none of its {len(query_ids)} rows has a supervised "
            f"token, so there is no query gradient; pick a split with assistant completions"
        )
    if not p_keep:
        raise StoreError(f"--pool-split {spec.pool_split}: none of its {len(pool_ids)} rows has a supervised token")
    return _Rows(query_ids, q, q_keep), _Rows(pool_ids, p, p_keep)


def _units(p: _Rows, unit_rows: int) -> list[list[int]]:
    """The pool's units: consecutive runs of `unit_rows` scored rows (row_id order), as SFTRows indices."""
    return [p.keep[i : i + unit_rows] for i in range(0, len(p.keep), unit_rows)]


class _Unit(NamedTuple):
    unit: int  # what extractors.units.claimed_units claims


def _ensure_subset(store: Store, run_id: str, spec: AttributionSpec, n_units: int) -> str | None:
    """A complete run's `--subset-k` subset, written from its table when this command asks for a new one."""
    if not spec.subset_k:
        return None
    name = f"attr-top{spec.subset_k}-{run_id}"
    if not (store.table_dir(SUBSETS_TABLE) / f"{name}.parquet").is_file():
        parts = read_units(store, run_id, n_units)
        rows = [r for t in parts for r in t.column("row_id").to_pylist()]
        write_subset(store, run_id, spec, rows, np.concatenate([t.column("score").to_numpy() for t in parts]))
    return name


def _query_side(
    store: Store,
    lm: Any,
    run_dir: Any,
    spec: AttributionSpec,
    q: _Rows,
    p: _Rows,
    token_batch: int,
    targets: set[str],
    timeout: float,
) -> QuerySide:
    """The run's query side: loaded (checksum verified) when a process computed it already, else
    computed and saved, under a claim so that concurrent workers compute it once."""
    with claims.exclusive(store, f"attribution-{spec.run_id}", "query", timeout):
        side = load_query_side(run_dir)
        if side is None:
            root = run_dir / "bergson"
            root.mkdir(parents=True, exist_ok=True)
            ds_q, ds_p = hf_dataset(q.data, q.keep), hf_dataset(p.data, p.keep)
            for name, ds in (("query_data.hf", ds_q), ("pool_data.hf", ds_p)):
                shutil.rmtree(root / name, ignore_errors=True)  # a killed worker's half-saved copy
                ds.save_to_disk(str(root / name))
            side = query_side(lm.model, root, spec, ds_q, ds_p, token_batch, targets)
            save_query_side(run_dir, side)
    return side


def _finalize(
    store: Store, run_dir: Any, spec: AttributionSpec, n_units: int, qrows: list[str], timeout: float
) -> str | None:
    """Once every unit is committed, one worker makes the tables final (the others find it done)."""
    run_id = spec.run_id
    with claims.exclusive(store, f"attribution-{run_id}", "final", timeout):
        if is_complete(store, run_id):
            return _ensure_subset(store, run_id, spec, n_units)
        rows, S, score = finalize(store, run_id, spec, n_units, qrows)
        subset = write_subset(store, run_id, spec, rows, score) if spec.subset_k else None
        write_scores_bin(run_dir / "bergson" / "scores", S)
        write_complete(run_dir, {"run_id": run_id, "pool_rows": len(rows), "units": n_units, "subset": subset})
        return subset


def extract_attribution(
    store: Store, lm: Any, layout: Any, spec: AttributionSpec, engine: UnitOptions | None = None
) -> AttributionResult:
    """Score the pool against the query with bergson, unit by unit, and write the tables (module
    docstring). `lm` is base + spec.adapter (extractors.adapters.use_adapter); `engine` gives this
    process's rank (its share of the units is tried first), the claim timeout and progress bars."""
    import bergson  # lazy: bergson is optional (attribution only)

    engine = engine or UnitOptions()
    q, p = _inputs(store, layout, spec)
    check_resume(store, spec, p.ids, q.ids)
    run_id = spec.run_id
    rows = [p.data.row_ids[i] for i in p.keep]
    qrows = [q.data.row_ids[i] for i in q.keep]
    units = _units(p, spec.unit_rows)
    if is_complete(store, run_id):
        subset = _ensure_subset(store, run_id, spec, len(units))
        print(f"nothing to do: attribution run {run_id} is complete ({len(rows)} pool rows)")
        return AttributionResult(run_id, len(rows), len(qrows), 0.0, 0.0, {}, subset, skipped=True)
    longest = max(len(x) for x in q.data.input_ids + p.data.input_ids)
    token_batch = max(spec.requested_batch(), longest)
    counts = {
        "pool_rows": len(p.keep),
        "query_rows": len(q.keep),
        "units": len(units),
        "pool_tokens": sum(len(p.data.input_ids[i]) for i in p.keep),
        "pool_rows_without_supervised_tokens": len(p.ids) - len(p.keep),
        "query_rows_without_supervised_tokens": len(q.ids) - len(q.keep),
    }
    if counts["pool_rows_without_supervised_tokens"]:
        print(
            f"note: {counts['pool_rows_without_supervised_tokens']} pool rows have no supervised token and get "
            f"no score (counted in the run record)"
        )
    settings = settings_of(spec, p.ids, q.ids)
    record = {
        **spec.run_config,
        **adapter_attrs(spec.adapter),
        "tokenization": layout.tokenization,
        "bergson": bergson.__version__,
        "token_batch_size": token_batch,
        "run_settings": settings,
    }
    scope, timeout = f"attribution-{run_id}", engine.claim_timeout
    claims.sweep_stale(store, timeout)  # a killed worker's claims
    mine: list[int] = []
    seconds = 0.0
    with Run(
        store,
        "attribution",
        record,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        rank=engine.rank,
        world_size=engine.world_size,
        run_id=run_id,
    ) as run:
        sweep_temp_files(run.dir)  # a killed worker's half-written query side or settings
        write_settings(store, run.dir, settings, lm.model_hash)
        threads = recorded_threads(run.dir)
        if lm.device.type == "cpu" and threads != torch.get_num_threads():
            print(f"note: run {run_id} started with {threads} CPU threads (the last bits of a unit depend on them)")

        def todo() -> list[_Unit]:  # the units not committed yet, this rank's share first
            left = set(range(len(units))) - committed_units(store, run_id)
            return [_Unit(u) for u in sorted(left, key=lambda u: (u % engine.world_size != engine.rank, u))]

        try:
            with lora_grads(lm.model) as targets:
                side = _query_side(store, lm, run.dir, spec, q, p, token_batch, targets, timeout)
                work = todo()
                bar = tqdm(total=len(work), desc="attribution units", unit="unit", disable=not engine.progress)
                for w in claimed_units(store, scope, work, todo, timeout):
                    if w.unit in committed_units(store, run_id):  # committed by a worker that has ended
                        continue
                    t0 = time.perf_counter()
                    idx = units[w.unit]
                    ds = hf_dataset(p.data, idx)
                    S = score_unit(lm.model, ds, spec, side, token_batch, lm.device, targets)
                    commit_unit(store, run_id, spec, w.unit, [p.data.row_ids[i] for i in idx], qrows, S)
                    seconds += time.perf_counter() - t0
                    mine.append(w.unit)
                    bar.update(1)
                bar.close()
            subset = _finalize(store, run.dir, spec, len(units), qrows, timeout)
        finally:
            claims.release_all(store, scope, timeout)
        S = read_scores(run.dir / "bergson" / "scores")
        score = S.mean(axis=1) if spec.score_mode == "individual" else S[:, 0]
        n_mine = sum(len(units[u]) for u in mine)
        steps = {**side.steps, "scores": seconds}
        metrics = {
            "step_seconds": steps,
            "pool_rows_per_s": n_mine / seconds if seconds else 0.0,
            "units_this_process": len(mine),
            "rows_this_process": n_mine,
            "score_mean": float(score.mean()),
            "score_std": float(score.std()),
            "subset": subset,
        }
        run.finish(counts=counts, metrics=metrics)
    print(
        f"attribution: {len(rows)} pool rows x {len(qrows)} query rows ({spec.score_mode} / {spec.preconditioning} / "
        f"{spec.projection_dim}) in {len(units)} units, {len(mine)} scored here in {seconds:.1f} s "
        f"({metrics['pool_rows_per_s']:.2f} pool rows/s); run {run_id}" + (f"; subset {subset}" if subset else "")
    )
    return AttributionResult(
        run_id, len(rows), len(qrows), seconds, metrics["pool_rows_per_s"], steps, subset, units=len(mine)
    )
