"""What the SAE -> attribution predictor reads: per-row SAE features, metadata, attribution labels.

* `resolve_sae(store, spec, layer)`: `latest` or a name -> (sae, layer), from the `saes` table
  (newest first) or, for tables written without one, `sae_sample_stats`.
* `load_rows(store, sae, layer, feature_ids=None)`: every row with SAE features as `SAERows`:
  the `sae_sample_stats` columns `STATS` (dense, NaN where null) and each feature's
  `mean_act` from `sae_row_features` as a scipy CSR matrix (rows x features; never densified;
  with `feature_ids` the columns are exactly those ids, others dropped), plus the rows'
  metadata (group_id, category, difficulty, quality, reward_model_score).
* `attribution_labels(store, run)`: {row_id: (rank, score)} of an attribution run.
* `sae_identity(store, sae, layer)`: what must agree before a predictor scores another store:
  the SAE's name, layer, shape, architecture, k, the sha256 of its weights file (where the
  `saes` row's folder exists) and the hash of the model its codes were computed with (the
  `arrays` row of `sae/<sae>/layer_L/indices`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

from store.core import Store, StoreError

STATS = (
    "n_tokens",
    "n_tokens_all",
    "mean_l0",
    "max_l0",
    "n_features",
    "mean_total_act",
    "recon_mse",
    "recon_rel_error",
)
META = ("group_id", "category", "difficulty", "quality", "reward_model_score")
IDENTITY_KEYS = ("sae", "layer", "d_in", "d_sae", "architecture", "k", "weights_sha256", "model_hash")


class SAERows(NamedTuple):
    row_ids: list[str]  # sorted
    stats: np.ndarray  # [n, len(STATS)] float64, NaN = null
    features: sp.csr_matrix  # [n, len(feature_ids)] float64: mean_act
    feature_ids: np.ndarray  # int64, ascending
    meta: pl.DataFrame  # row_id + META, aligned with row_ids


def features_sql(sae: str, layer: int) -> str:
    return f"SELECT row_id, feature, mean_act FROM sae_row_features WHERE sae = '{sae}' AND layer = {int(layer)}"


def stats_sql(sae: str, layer: int) -> str:
    return f"SELECT row_id, {', '.join(STATS)} FROM sae_sample_stats WHERE sae = '{sae}' AND layer = {int(layer)}"


def _pairs(store: Store) -> list[tuple[str, int]]:
    if not store.has_table("sae_sample_stats"):
        return []
    return [
        (r["sae"], r["layer"])
        for r in store.query("SELECT DISTINCT sae, layer FROM sae_sample_stats ORDER BY 1, 2").to_pylist()
    ]


def _have(store: Store) -> str:
    pairs = _pairs(store)
    return ", ".join(f"{s} (layer {L})" for s, L in pairs) if pairs else "none"


def resolve_sae(store: Store, spec: str, layer: int | None = None) -> tuple[str, int]:
    """(sae name, layer) whose tables the predictor reads (module docstring)."""
    pairs = _pairs(store)
    fix = (
        f"compute them with python -m extractors.run --store {store.root} --layer {layer or 'L'} --kinds sae "
        f"--sae NAME (SAEs with tables here: {_have(store)})"
    )
    if not pairs:
        raise StoreError(f"{store.root} has no SAE tables (sae_sample_stats); {fix}")
    ok = [p for p in pairs if layer is None or p[1] == layer]
    if spec == "latest":
        order: list[tuple[str, int]] = []
        if store.has_table("saes"):
            order = [
                (r["sae"], r["layer"])
                for r in store.query("SELECT sae, layer FROM saes ORDER BY updated_at DESC, sae").to_pylist()
            ]
        newest = [p for p in order if p in ok] or sorted(ok, reverse=True)
        if not newest:
            raise StoreError(f"--sae latest: no SAE tables at layer {layer} in {store.root}; {fix}")
        if layer is None and len({p[1] for p in ok}) > 1 and not order:
            raise StoreError(f"--sae latest is ambiguous across layers ({_have(store)}); pass --layer")
        return newest[0]
    named = [p for p in ok if p[0] == spec]
    if not named:
        raise StoreError(
            f"--sae {spec!r}"
            + (f" --layer {layer}" if layer is not None else "")
            + f" has no SAE tables in {store.root}; {fix}"
        )
    if len(named) > 1:
        raise StoreError(f"SAE {spec} has tables at layers {[p[1] for p in named]}; pass --layer")
    return named[0]


def load_rows(store: Store, sae: str, layer: int, feature_ids: np.ndarray | None = None) -> SAERows:
    """Every row with SAE features of (sae, layer) (module docstring)."""
    con = store.connect()
    try:
        st = con.sql(stats_sql(sae, layer) + " ORDER BY row_id").pl()
        if st.height == 0:
            raise StoreError(
                f"SAE {sae} layer {layer} has no rows in sae_sample_stats of {store.root}; "
                f"SAEs with tables here: {_have(store)}"
            )
        con.register("_ids", pa.table({"row_id": st["row_id"].to_list(), "i": np.arange(st.height)}))
        f = con.sql(
            f"SELECT i, feature, mean_act FROM ({features_sql(sae, layer)}) JOIN _ids USING (row_id)"
        ).fetchnumpy()
        meta = con.sql(
            f"SELECT _ids.row_id, {', '.join('r.' + c for c in META)} FROM _ids LEFT JOIN rows r "
            f"USING (row_id) ORDER BY i"
        ).pl()
    finally:
        con.close()
    rows_i, feat, val = (np.asarray(f[k]) for k in ("i", "feature", "mean_act"))
    if feature_ids is None:
        feature_ids = np.unique(feat).astype(np.int64)
        keep = np.ones(len(feat), dtype=bool)
    else:
        feature_ids = np.asarray(feature_ids, dtype=np.int64)
        pos = np.searchsorted(feature_ids, feat)
        keep = (pos < len(feature_ids)) & (feature_ids[np.minimum(pos, len(feature_ids) - 1)] == feat)
    cols = np.searchsorted(feature_ids, feat[keep])
    X = sp.csr_matrix((val[keep].astype(np.float64), (rows_i[keep], cols)), shape=(st.height, len(feature_ids)))
    stats = (
        np.column_stack([st[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in STATS])
        if st.height
        else np.zeros((0, len(STATS)))
    )
    return SAERows(st["row_id"].to_list(), stats, X, feature_ids, meta)


def attribution_labels(store: Store, run: str) -> dict[str, tuple[int, float]]:
    t = store.query("SELECT row_id, rank, score FROM attribution_scores WHERE run_id = ?", [run]).to_pydict()
    return {r: (k, s) for r, k, s in zip(t["row_id"], t["rank"], t["score"], strict=False)}


def _weights_sha(store: Store, row: dict[str, Any]) -> str | None:
    for p in (Path(str(row.get("path") or "")), store.root / "runs" / str(row.get("run_id")) / "sae"):
        w = p / "sae_weights.safetensors"
        if str(p) and w.is_file():
            h = hashlib.sha256()
            with open(w, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            return h.hexdigest()
    return None


def sae_identity(store: Store, sae: str, layer: int) -> dict[str, Any]:
    """The SAE and model behind (sae, layer)'s tables (module docstring); None = unknown."""
    out: dict[str, Any] = dict.fromkeys(IDENTITY_KEYS)
    out.update(sae=sae, layer=int(layer))
    if store.has_table("saes"):
        rec = store.query(
            "SELECT * FROM saes WHERE sae = ? AND layer = ? ORDER BY updated_at DESC LIMIT 1", [sae, layer]
        ).to_pylist()
        if rec:
            r = rec[0]
            out.update(
                d_in=r.get("d_in"),
                d_sae=r.get("d_sae"),
                architecture=r.get("architecture"),
                k=r.get("k"),
                weights_sha256=_weights_sha(store, r),
            )
    if store.has_table("arrays"):
        a = (
            store.query("SELECT model_hash FROM arrays WHERE name = ?", [f"sae/{sae}/layer_{layer}/indices"])
            .column(0)
            .to_pylist()
        )
        out["model_hash"] = a[0] if a else None
    return out


def check_identity(want: dict[str, Any], got: dict[str, Any], other: Store, predictor: str) -> None:
    """Refuse another store whose SAE or model is not the predictor's (both named, and the fix)."""
    if got["model_hash"] is None:
        raise StoreError(
            f"--apply-to {other.root}: cannot tell which model computed its SAE codes (no arrays row "
            f"for sae/{got['sae']}/layer_{got['layer']}/indices); compute them with python -m "
            f"extractors.run --store {other.root} --layer {got['layer']} --kinds sae --sae <the SAE folder>"
        )
    bad = [k for k in IDENTITY_KEYS if want.get(k) is not None and got.get(k) is not None and want[k] != got[k]]
    if want.get("model_hash") is None or bad:
        what = "; ".join(
            f"{k}: predictor {want.get(k)!r} vs {other.root} {got.get(k)!r}" for k in (bad or ["model_hash"])
        )
        raise StoreError(
            f"--apply-to {other.root}: its SAE codes are not those predictor {predictor} was fitted on "
            f"({what}); compute that store's codes with the same model and SAE (python -m extractors.run "
            f"--store {other.root} --layer {want['layer']} --kinds sae --sae <folder of SAE {want['sae']}>), "
            f"or fit a predictor on its own attribution run"
        )
