"""Attribution's tables, one Parquet part per pool unit: readable while the run goes on, final at its end.

    commit_unit(store, run_id, spec, unit, row_ids, query_row_ids, S)   # S: [rows, score columns]
    committed_units(store, run_id)                                       # {unit, ...}
    finalize(store, run_id, spec, n_units, query_row_ids)               # ranks, complete, subset

A unit's scores are committed as `attribution_scores/<run_id>/u<unit>.parquet` (and, for
`--score-mode individual`, `attribution_pairs/<run_id>/u<unit>.parquet` first), each written to a
temp file, fsynced and renamed (store.Store.write_table): a reader sees a unit whole or not at all,
and the scores part is the unit's commit (a pairs part without one is recomputed and rewritten).
While the run is partial its rows have `rank` NULL and `complete` false: the rank of a row is
only known once every pool row is scored. `finalize` then rewrites every part with the ranks over
the whole pool and `complete` true (part by part, each atomically: during those moments a run's
rows are complete in some parts only, never duplicated), writes the `--subset-k` subset, and
returns the scores. Rewriting is deterministic, so a finalize killed halfway and run again ends
with the same bytes.

Ranks: 1 = highest, ties broken by pool order (row_id order), so they are reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from store.catalog.subsets import TABLE as SUBSETS_TABLE
from store.catalog.subsets import subset_table
from store.core import Store, StoreError
from store.fs import read_parquet

if TYPE_CHECKING:
    from extractors.attribution.steps import AttributionSpec

SCORES = "attribution_scores"
PAIRS = "attribution_pairs"

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
# What the unit parts hold: the columns above, plus whether the run was complete when written.
COMPLETE = pa.field("complete", pa.bool_())
UNIT_SCORES_SCHEMA = SCORES_SCHEMA.append(COMPLETE)
UNIT_PAIRS_SCHEMA = PAIRS_SCHEMA.append(COMPLETE)


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """1 = highest; ties broken by position (row_id order), so ranks are reproducible."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def unit_part(run_id: str, unit: int) -> str:
    return f"{run_id}/u{unit:06d}"


def committed_units(store: Store, run_id: str) -> set[int]:
    """The units of a run whose scores part exists (the unit's commit)."""
    d = store.table_dir(SCORES) / run_id
    out = set()
    for f in store.table_files(SCORES):
        if f.parent == d and f.stem.startswith("u") and f.stem[1:].isdigit():
            out.add(int(f.stem[1:]))
    return out


def _unit_score(spec: AttributionSpec, S: np.ndarray) -> np.ndarray:
    """attribution_scores' score from a unit's score matrix: the mean over queries for individual
    (a row's mean depends on its row alone), else the one column."""
    return S.mean(axis=1) if spec.score_mode == "individual" else S[:, 0]


def _scores_table(
    run_id: str, spec: AttributionSpec, rows: list[str], score: np.ndarray, rank: np.ndarray | None
) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "run_id": [run_id] * n,
            "row_id": rows,
            "score": score,
            "rank": pa.nulls(n, pa.int64()) if rank is None else rank,
            "adapter": [spec.adapter.name] * n,
            "score_mode": [spec.score_mode] * n,
            "preconditioning": [spec.preconditioning] * n,
            "projection_dim": [spec.projection_dim] * n,
            "query_split": [spec.query_split] * n,
            "pool_split": [spec.pool_split] * n,
            "complete": [rank is not None] * n,
        },
        schema=UNIT_SCORES_SCHEMA,
    )


def _pairs_table(run_id: str, rows: list[str], qrows: list[str], S: np.ndarray, rank: np.ndarray | None) -> pa.Table:
    n = len(rows) * len(qrows)
    return pa.table(
        {
            "run_id": [run_id] * n,
            "row_id": [r for r in rows for _ in qrows],
            "query_row_id": qrows * len(rows),
            "score": S.reshape(-1),
            "rank": pa.nulls(n, pa.int64()) if rank is None else rank.reshape(-1),
            "complete": [rank is not None] * n,
        },
        schema=UNIT_PAIRS_SCHEMA,
    )


def commit_unit(
    store: Store, run_id: str, spec: AttributionSpec, unit: int, rows: list[str], qrows: list[str], S: np.ndarray
) -> None:
    """Write one unit's parts (pairs first, then scores: the commit), ranks NULL until the run ends."""
    score = _unit_score(spec, S)
    if not np.all(np.isfinite(score)):
        raise StoreError(
            f"bergson returned {int((~np.isfinite(score)).sum())} non-finite scores in unit {unit}; try "
            f"--loss-reduction mean and a larger --damping"
        )
    if spec.score_mode == "individual":
        store.write_table(PAIRS, _pairs_table(run_id, rows, qrows, S, None), part=unit_part(run_id, unit))
    store.write_table(SCORES, _scores_table(run_id, spec, rows, score, None), part=unit_part(run_id, unit))


def read_units(store: Store, run_id: str, n_units: int, table: str = SCORES) -> list[pa.Table]:
    """Every unit part of a run in unit order (an error naming the first missing one)."""
    out = []
    for u in range(n_units):
        path = store.table_dir(table) / f"{unit_part(run_id, u)}.parquet"
        try:
            out.append(read_parquet(path))
        except FileNotFoundError as e:
            msg = f"attribution run {run_id}: unit {u} has no {table} part ({path}); rerun the command"
            raise StoreError(msg) from e
    return out


def write_subset(store: Store, run_id: str, spec: AttributionSpec, rows: list[str], score: np.ndarray) -> str:
    """The top `spec.subset_k` rows as subset attr-top<K>-<run_id> (what `python -m trainers.subsets
    --from attribution:<run> --k K` writes: the same name, rows and ranks)."""
    assert spec.subset_k
    rank = ranks_of(score)
    subset = f"attr-top{spec.subset_k}-{run_id}"
    top = np.argsort(rank)[: spec.subset_k]
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
    return subset


def finalize(
    store: Store, run_id: str, spec: AttributionSpec, n_units: int, qrows: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rewrite every committed unit part with the ranks over the whole pool and `complete` true;
    returns (pool row ids, score matrix [rows, columns], scores) in pool order."""
    parts = read_units(store, run_id, n_units)
    rows = [r for t in parts for r in t.column("row_id").to_pylist()]
    score = np.concatenate([t.column("score").to_numpy() for t in parts])
    rank = ranks_of(score)
    if spec.score_mode == "individual":
        pair_parts = read_units(store, run_id, n_units, PAIRS)
        S = np.concatenate([t.column("score").to_numpy().reshape(-1, len(qrows)) for t in pair_parts])
        pair_rank = np.stack([ranks_of(S[:, j]) for j in range(len(qrows))], axis=1)
    else:
        S = score[:, None]
    lo = 0
    for u, t in enumerate(parts):
        hi = lo + t.num_rows
        unit_rows = rows[lo:hi]
        if spec.score_mode == "individual":
            store.write_table(
                PAIRS, _pairs_table(run_id, unit_rows, qrows, S[lo:hi], pair_rank[lo:hi]), part=unit_part(run_id, u)
            )
        store.write_table(
            SCORES, _scores_table(run_id, spec, unit_rows, score[lo:hi], rank[lo:hi]), part=unit_part(run_id, u)
        )
        lo = hi
    return rows, S, score
