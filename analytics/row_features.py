"""The stored SAE row features that analytics.correlations tests: which SAE (`--sae`), the
per-row feature matrix with the rows' metadata, and the top-activating contexts of features.

Read from the SAE code extractor's tables (`sae_row_features`, `sae_top_tokens` through the
view `sae_top_contexts`) and `rows`; nothing is computed from the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from extractors.sae.load import SAELoadError, load_local, registered, sanitize
from store.core import Store, StoreError


class RowMatrix(NamedTuple):
    X: np.ndarray  # [n_rows, n_features] float32 feature values (0 = never fired in the row)
    features: np.ndarray  # [n_features] feature ids (those that fire in >= 1 row)
    meta: pl.DataFrame  # row_id + metadata columns, row i describes X[i]


def resolve_sae(store: Store, spec: str | None, layer: int) -> str:
    """The `sae` column value of the SAE named by `spec` (see --sae), checked to have row features."""
    if not store.has_table("sae_row_features"):
        raise StoreError(
            f"{store.root} has no sae_row_features table; extract SAE codes first: python -m "
            f"extractors.run --layer {layer} --kinds sae --sae <sae folder> --store {store.root}"
        )
    have = (
        store.query("SELECT DISTINCT sae FROM sae_row_features WHERE layer = ? ORDER BY 1", [layer])
        .column(0)
        .to_pylist()
    )
    if spec is None:
        if len(have) == 1:
            return have[0]
        if not have:
            raise StoreError(
                f"no SAE has row features at layer {layer} in {store.root}; extract codes with "
                f"python -m extractors.run --layer {layer} --kinds sae --sae <sae folder>"
            )
        raise StoreError(f"several SAEs have row features at layer {layer}: {', '.join(have)}; pick one with --sae")
    if spec in have:
        return spec

    if spec == "latest":
        newest = [r["sae"] for r in registered(store, layer) if r["sae"] in have]
        if not newest:
            raise StoreError(
                f"--sae latest: no SAE with row features at layer {layer} (available: {', '.join(have) or 'none'})"
            )
        return newest[0]

    p = Path(spec).expanduser()
    try:
        name = load_local(p.resolve()).name if p.is_dir() else sanitize(spec)
    except SAELoadError as e:
        raise StoreError(str(e)) from e
    if name not in have:
        raise StoreError(
            f"SAE {spec!r} (store name {name!r}) has no row features at layer {layer} "
            f"(available: {', '.join(have) or 'none'}); extract them: python -m extractors.run "
            f"--layer {layer} --kinds sae --sae {spec} --store {store.root}"
        )
    return name


def load_row_matrix(
    store: Store, sae: str, layer: int, *, value: str = "mean_act", split: str = "all", fields: list[str] | None = None
) -> RowMatrix:
    """Dense [rows x features] values of one SAE layer plus the rows' metadata.

    Rows are those of `sae_sample_stats` for the SAE (every row whose codes were summarised,
    including rows where no feature fires), else the rows present in `sae_row_features`."""
    if value not in ("mean_act", "max_act", "n_active"):
        raise ValueError(f"value must be mean_act, max_act or n_active, got {value!r}")
    fields = fields or sorted({"category", "difficulty", "quality", "reward_model_score", "conversation_tokens"})
    pop_src = "sae_sample_stats" if store.has_table("sae_sample_stats") else "sae_row_features"
    where, params = "p.sae = $sae AND p.layer = $layer", {"sae": sae, "layer": layer}
    if split != "all":
        where += " AND p.row_id IN (SELECT row_id FROM split_members WHERE split = $split)"
        params["split"] = split
    con = store.connect()
    try:
        cols = {c[0] for c in con.sql("DESCRIBE rows").fetchall()}
        missing = [f for f in fields if f not in cols]
        if missing:
            raise StoreError(f"rows has no column {missing[0]!r} (columns: {', '.join(sorted(cols))})")
        con.execute(
            f"CREATE TEMP TABLE _pop AS SELECT row_id, (row_number() OVER (ORDER BY row_id) - 1)::INT AS i "
            f"FROM (SELECT DISTINCT p.row_id FROM {pop_src} p WHERE {where})",
            params,
        )
        n = con.sql("SELECT count(*) FROM _pop").fetchall()[0][0]
        if n == 0:
            raise StoreError(
                f"SAE {sae!r} layer {layer} has no rows"
                + (f" in split {split!r}" if split != "all" else "")
                + f" in {pop_src}"
            )
        long = con.sql(
            f"SELECT _pop.i, f.feature, f.{value}::DOUBLE AS v FROM sae_row_features f "
            f"JOIN _pop USING (row_id) WHERE f.sae = $sae AND f.layer = $layer",
            params={"sae": sae, "layer": layer},
        ).fetchnumpy()
        sel = ", ".join(f'r."{f}"' for f in fields)
        meta = pl.from_arrow(
            con.sql(f"SELECT _pop.row_id, {sel} FROM _pop JOIN rows r USING (row_id) ORDER BY _pop.i").to_arrow_table()
        )
    finally:
        con.close()
    if len(meta) != n:
        raise StoreError(f"{n - len(meta)} rows of SAE {sae!r} are missing from the rows table")
    features, col = np.unique(long["feature"], return_inverse=True)
    X = np.zeros((n, len(features)), dtype=np.float32)  # 8k rows x 16k features = 0.5 GB
    X[long["i"], col] = long["v"]
    return RowMatrix(X, features.astype(np.int64), meta)


# ---- statistics -----------------------------------------------------------------------------
def attach_contexts(store: Store, top: pl.DataFrame, sae: str, layer: int, n: int) -> pl.DataFrame:
    """Add `contexts`: each feature's n top-activating tokens in context ('before[[token]]after',
    newlines shown as \\n) from the view `sae_top_contexts` over `sae_top_tokens` (filled by
    the SAE code extractor), in one query; null when the store has no top tokens."""
    none = top.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("contexts"))
    if n == 0 or top.is_empty() or not store.has_table("sae_top_tokens") or "sae_top_contexts" in store.view_errors():
        return none
    con = store.connect()
    try:
        con.register("_feat", pa.table({"feature": pa.array(sorted(set(top["feature"].to_list())), pa.int32())}))
        ctx = pl.from_arrow(
            con.sql(
                "SELECT feature, list(replace(context, chr(10), '\\n') ORDER BY rank) AS contexts "
                "FROM sae_top_contexts "
                "WHERE sae = $sae AND layer = $layer AND rank <= $n AND feature IN (SELECT feature FROM _feat) "
                "GROUP BY feature",
                params={"sae": sae, "layer": layer, "n": n},
            ).to_arrow_table()
        )
    finally:
        con.close()
    return top.join(ctx.with_columns(pl.col("feature").cast(top["feature"].dtype)), on="feature", how="left")
