"""The `subsets` table: named sets of rows, one Parquet part per subset (part name = subset name).

Written by `trainers.subsets` (top-k, matched random-k, rank windows, random-from-ranks from an
attribution run, a predictor run, the reward model or a seeded permutation) and by the
attribution extractor's `--subset-k K`; both build their rows with `subset_table`, so the table
has one schema:

    subset       the name (what `--train-rows-sql "SELECT row_id FROM subsets WHERE subset = '...'"` takes)
    row_id
    rank         the row's position in the subset, 1..n (`ORDER BY rank` = the subset's order)
    source_rank  the row's rank in the source's ranking (1 = best)
    score        the source's score of the row (attribution score, predicted value, reward-model
                 score; null for the `random` source)
    source       attribution:<run> | predictor:<run> | reward_model | random (resolved, never `latest`)
    kind         top_k | matched_random_k | ranks | random_from_ranks
    seed         the seed of a random draw (null where nothing is random)
    run_id       the run the ranking came from (attribution or predictor run; null otherwise)
    method       a human-readable description (k, window, overlap, pool split)

It lives in `store` because writers at two levels of the one-way imports use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

TABLE = "subsets"
SUBSETS_SCHEMA = pa.schema(
    [
        ("subset", pa.string()),
        ("row_id", pa.string()),
        ("rank", pa.int64()),
        ("source_rank", pa.int64()),
        ("score", pa.float64()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("seed", pa.int64()),
        ("run_id", pa.string()),
        ("method", pa.string()),
    ]
)


def subset_table(
    name: str,
    row_ids: Sequence[str],
    source_ranks: Sequence[int],
    scores: Sequence[float | None],
    *,
    source: str,
    kind: str,
    seed: int | None,
    run_id: str | None,
    method: str,
) -> pa.Table:
    """The rows of subset `name`, in subset order (rank 1..n follows `row_ids`' order)."""
    n = len(row_ids)
    if not (len(source_ranks) == len(scores) == n):
        raise ValueError(f"subset {name}: {n} row ids, {len(source_ranks)} ranks, {len(scores)} scores")
    return pa.table(
        {
            "subset": [name] * n,
            "row_id": list(row_ids),
            "rank": list(range(1, n + 1)),
            "source_rank": [int(r) for r in source_ranks],
            "score": [None if s is None else float(s) for s in scores],
            "source": [source] * n,
            "kind": [kind] * n,
            "seed": [seed] * n,
            "run_id": [run_id] * n,
            "method": [method] * n,
        },
        schema=SUBSETS_SCHEMA,
    )
