"""Comparing two stores in tests: their catalog tables, order-independently."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pyarrow.parquet as pq


def catalog_rows(store: Path, volatile: Collection[str]) -> dict[str, list[tuple]]:
    """Every catalog table but runs, as sorted rows without the `volatile` columns (run ids,
    times: what legitimately differs between two runs of the same work)."""
    out = {}
    for d in sorted((store / "catalog").iterdir()):
        if d.name == "runs" or not d.is_dir():
            continue
        rows = []
        for f in sorted(d.rglob("*.parquet")):
            t = pq.read_table(f)
            keep = [c for c in t.column_names if c not in volatile]
            rows += [
                tuple(json.dumps(r[c], sort_keys=True, default=str) for c in keep) for r in t.select(keep).to_pylist()
            ]
        out[d.name] = sorted(rows)
    return out
