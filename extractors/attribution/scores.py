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

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from extractors.adapters import adapter_attrs
from extractors.attribution.steps import AttributionSpec, hf_dataset, read_scores, run_steps
from extractors.sft_data import SFTRows, load_sft_rows, select_rows_by
from store.catalog.runs import Run
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


def check_options(
    kinds: list[str],
    adapter: str | None,
    *,
    projection_dim: int,
    damping: float,
    subset_k: int | None,
    query_max_rows: int | None,
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
    for name, v in (("subset-k", subset_k), ("query-max-rows", query_max_rows)):
        if v is not None and v <= 0:
            raise ValueError(f"--{name} must be positive, got {v}")


def check_inputs(store: Store, spec: AttributionSpec) -> None:
    """Fail before the model loads: both splits must exist (the adapter is resolved already)."""
    select_rows_by(store, split=spec.query_split, max_rows=spec.query_max_rows, flag="--query-split")
    select_rows_by(store, split=spec.pool_split, max_rows=spec.pool_max_rows, flag="--pool-split")


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1 = highest; ties broken by position (row_id order), so ranks are reproducible."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


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


def _write_tables(
    store: Store, run_id: str, spec: AttributionSpec, rows: list[str], qrows: list[str], S: np.ndarray
) -> tuple[np.ndarray, str | None]:
    """attribution_scores (and attribution_pairs for individual, the subset for --subset-k) of one
    run from bergson's score matrix S [pool rows, columns]; returns (scores, subset name or None)."""
    score = S.mean(axis=1) if spec.score_mode == "individual" else S[:, 0]
    if not np.all(np.isfinite(score)):
        raise StoreError(
            f"bergson returned {int((~np.isfinite(score)).sum())} non-finite scores; try "
            f"--loss-reduction mean and a larger --damping"
        )
    rank = ranks_of(score)
    n = len(rows)
    if spec.score_mode == "individual":
        store.write_table(
            "attribution_pairs",
            pa.table(
                {
                    "run_id": [run_id] * (n * len(qrows)),
                    "row_id": [r for r in rows for _ in qrows],
                    "query_row_id": qrows * n,
                    "score": S.reshape(-1),
                    "rank": np.stack([ranks_of(S[:, j]) for j in range(len(qrows))], axis=1).reshape(-1),
                },
                schema=PAIRS_SCHEMA,
            ),
            part=run_id,
        )
    subset = None
    if spec.subset_k:
        subset = f"attr-top{spec.subset_k}-{run_id}"
        top = np.argsort(rank)[: spec.subset_k]
        # The name, rows and ranks `python -m trainers.subsets --from attribution:<run> --k K` writes.
        store.write_table(
            SUBSETS_TABLE,
            subset_table(
                subset,
                [rows[i] for i in top],
                rank[top],
                score[top],
                source=f"attribution:{run_id}",
                kind="top_k",
                seed=None,
                run_id=run_id,
                method=f"top {spec.subset_k} of attribution:{run_id} ({spec.score_mode}/{spec.preconditioning}/"
                f"{spec.projection_dim}), pool {spec.pool_split}",
            ),
            part=subset,
        )
    store.write_table(
        "attribution_scores",
        pa.table(
            {
                "run_id": [run_id] * n,
                "row_id": rows,
                "score": score,
                "rank": rank,
                "adapter": [spec.adapter.name] * n,
                "score_mode": [spec.score_mode] * n,
                "preconditioning": [spec.preconditioning] * n,
                "projection_dim": [spec.projection_dim] * n,
                "query_split": [spec.query_split] * n,
                "pool_split": [spec.pool_split] * n,
            },
            schema=SCORES_SCHEMA,
        ),
        part=run_id,
    )
    return score, subset


def extract_attribution(store: Store, lm: Any, layout: Any, spec: AttributionSpec) -> AttributionResult:
    """Score the pool against the query with bergson and write the tables (module docstring).
    `lm` is base + spec.adapter (extractors.adapters.use_adapter)."""
    import bergson  # lazy: bergson is optional (attribution only)

    q, p = _inputs(store, layout, spec)
    longest = max(len(x) for x in q.data.input_ids + p.data.input_ids)
    token_batch = max(spec.batch_tokens or (32768 if lm.device.type == "cuda" else 4096), longest)
    counts = {
        "pool_rows": len(p.keep),
        "query_rows": len(q.keep),
        "pool_tokens": sum(len(p.data.input_ids[i]) for i in p.keep),
        "pool_rows_without_supervised_tokens": len(p.ids) - len(p.keep),
        "query_rows_without_supervised_tokens": len(q.ids) - len(q.keep),
    }
    if counts["pool_rows_without_supervised_tokens"]:
        print(
            f"note: {counts['pool_rows_without_supervised_tokens']} pool rows have no supervised token and get "
            f"no score (counted in the run record)"
        )
    record = {
        **spec.run_config,
        **adapter_attrs(spec.adapter),
        "tokenization": layout.tokenization,
        "bergson": bergson.__version__,
        "token_batch_size": token_batch,
    }
    with Run(store, "attribution", record, model_id=lm.model_id, model_hash=lm.model_hash) as run:
        root = run.dir / "bergson"
        root.mkdir(parents=True, exist_ok=True)
        ds_q, ds_p = hf_dataset(q.data, q.keep), hf_dataset(p.data, p.keep)
        ds_q.save_to_disk(str(root / "query_data.hf"))
        ds_p.save_to_disk(str(root / "pool_data.hf"))
        steps = run_steps(lm.model, root, spec, ds_q, ds_p, token_batch, lm.device)
        rows = [p.data.row_ids[i] for i in p.keep]
        qrows = [q.data.row_ids[i] for i in q.keep]
        score, subset = _write_tables(store, run.run_id, spec, rows, qrows, read_scores(root / "scores"))
        n = len(rows)
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
        f"attribution: {n} pool rows x {len(q.keep)} query rows ({spec.score_mode} / {spec.preconditioning} / "
        f"{spec.projection_dim}) in {seconds:.1f} s ({metrics['pool_rows_per_s']:.2f} pool rows/s); run {run.run_id}"
        + (f"; subset {subset}" if subset else "")
    )
    return AttributionResult(run.run_id, n, len(q.keep), seconds, metrics["pool_rows_per_s"], steps, subset)
