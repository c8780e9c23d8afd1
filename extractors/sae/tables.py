"""Catalog tables over stored SAE codes, for SQL over features.

Built from the committed codes of one (SAE, layer) by `build_sae_tables` (run by the code
extractor once every selected row is committed; a file per (SAE, layer) in each table,
replaced atomically). Statistics cover the SAE's token set: the view it was trained on
(`store_view` in its sae-lens metadata), else `content_tokens`, i.e. the tokens inside
system/user/assistant messages, without special or template tokens (position 0 is an
attention sink whose activations would dominate every statistic). Codes themselves are
stored for every token.

* `sae_row_features(sae, layer, row_id, feature, mean_act, max_act, n_active)`: one row per
  (row, feature active somewhere in the row). `mean_act` is the feature's activation
  averaged over *all* the row's token-set tokens (inactive tokens count as 0: the
  feature_activation_mean of our users' pipeline); `max_act` its maximum; `n_active` the
  number of tokens where it fires.
* `sae_sample_stats(sae, layer, row_id, token_set, n_tokens, n_tokens_all, mean_l0, max_l0,
  n_features, mean_total_act, top_feature, recon_mse, recon_rel_error)`: one row per row;
  recon_* (mean ||x - x_hat||^2 per token, and sum ||x - x_hat||^2 / sum ||x||^2) decode the
  stored codes and need the row's stored hidden states (else null).
* `sae_feature_stats(sae, layer, feature, token_set, firing_frequency, mean_activation,
  max_activation, n_tokens_active, n_rows_active, top_categories, top_category_lift)`:
  firing_frequency = share of token-set tokens where the feature fires; mean_activation =
  mean over those tokens; top_categories = up to 3 categories with the highest lift
  (firing rate in the category / overall rate, with >= 3 firing tokens there).
* `sae_top_tokens(sae, layer, feature, rank, row_id, token_pos, tok_index, activation,
  tokenization)`: the `TOP_TOKENS` strongest tokens per feature; the view
  `sae_top_contexts` (sql/views) adds their text in context, and `top_contexts()` does the
  same with any window.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from extractors.hidden import hidden_array_name
from extractors.sae.format import code_array_names, decode_codes
from store.arrays import array_exists, array_key, committed_set, open_array
from store.core import Store
from store.materialize import gather, view_sql

TOP_TOKENS = 20
DEFAULT_TOKEN_SET = "content_tokens"
TABLES = ("sae_row_features", "sae_sample_stats", "sae_feature_stats", "sae_top_tokens")


def _part(sae_name: str, layer: int) -> str:
    return array_key(f"{sae_name}/layer_{layer}")


def token_set_of(store: Store, loaded: Any) -> str:
    view = loaded.sae.cfg.metadata.get("store_view") or DEFAULT_TOKEN_SET
    known = {p.stem for p in store.view_files()}
    return view if view in known else DEFAULT_TOKEN_SET


def _committed(store: Store, idx_name: str, val_name: str) -> set[str]:
    return committed_set(store, idx_name) & committed_set(store, val_name)


def tables_current(store: Store, sae_name: str, layer: int, idx_name: str, val_name: str) -> bool:
    """Do the tables cover exactly the rows committed in the code arrays?"""
    path = store.table_dir("sae_sample_stats") / f"{_part(sae_name, layer)}.parquet"
    if not all((store.table_dir(t) / f"{_part(sae_name, layer)}.parquet").exists() for t in TABLES):
        return False
    have = set(pq.read_table(path, columns=["row_id"]).column(0).to_pylist())
    return have == _committed(store, idx_name, val_name)


def _token_frame(store: Store, token_set: str, rows: set[str]) -> pl.DataFrame:
    """row_id, tok_index, token_pos of the token set over the given rows, in tok_index order."""
    con = store.connect()
    try:
        con.register("_rows", pa.table({"row_id": sorted(rows)}))
        t = con.sql(
            f"SELECT v.row_id, v.tok_index, v.tok_index - l.tok_start AS token_pos, r.category "
            f"FROM ({view_sql(store, token_set)}) v JOIN _rows USING (row_id) "
            f"JOIN row_layout l ON l.row_id = v.row_id JOIN rows r ON r.row_id = v.row_id "
            f"ORDER BY v.tok_index"
        ).to_arrow_table()
    finally:
        con.close()
    return pl.from_arrow(t)


def _group_reduce(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys with the sum, max and count of their values."""
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], vals[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, dtype=np.int64)
    if not len(k):
        return k, v, v, np.zeros(0, dtype=np.int64)
    return k[starts], np.add.reduceat(v, starts), np.maximum.reduceat(v, starts), np.diff(np.r_[starts, len(k)])


class _Codes(NamedTuple):
    """The committed codes of one (SAE, layer) over its token set, flattened for grouping."""

    frame: pl.DataFrame  # row_id, tok_index, token_pos, category per token, in tok_index order
    tok: np.ndarray  # tok_index per token
    idx: np.ndarray  # [n_tokens, k] feature ids (int64)
    val: np.ndarray  # [n_tokens, k] activations
    row_ids: list[str]  # the committed rows, sorted
    r_tok: np.ndarray  # row number (into row_ids) per token
    n_tok_row: np.ndarray  # token-set tokens per row
    active: np.ndarray  # [n_tokens, k] val > 0
    feat: np.ndarray  # feature id per active slot
    act: np.ndarray  # activation per active slot
    r_act: np.ndarray  # row number per active slot
    t_act: np.ndarray  # token number per active slot


def _load_codes(store: Store, idx_name: str, val_name: str, token_set: str) -> _Codes:
    rows = _committed(store, idx_name, val_name)
    f = _token_frame(store, token_set, rows)
    tok = f["tok_index"].to_numpy()
    idx = gather(store, idx_name, tok).astype(np.int64)
    val = gather(store, val_name, tok)
    row_ids = sorted(rows)
    r_of = {r: i for i, r in enumerate(row_ids)}
    r_tok = np.array([r_of[r] for r in f["row_id"].to_list()], dtype=np.int64)
    k = idx.shape[1] if idx.ndim == 2 else 0
    active = val > 0
    return _Codes(
        f,
        tok,
        idx,
        val,
        row_ids,
        r_tok,
        np.bincount(r_tok, minlength=len(row_ids)),
        active,
        idx[active],
        val[active],
        np.repeat(r_tok, k)[active.ravel()],
        np.repeat(np.arange(len(tok)), k)[active.ravel()],
    )


def build_sae_tables(store: Store, loaded: Any, layer: int, *, progress: bool = True) -> str:
    """(Re)build the four tables of one (SAE, layer) from its committed codes; returns a summary."""
    idx_name, val_name = code_array_names(loaded.name, layer)
    tokz = open_array(store, idx_name).attrs["tokenization"]
    token_set = token_set_of(store, loaded)
    c = _load_codes(store, idx_name, val_name, token_set)
    part = _part(loaded.name, layer)
    keys, s, kr, kf = _row_features(store, loaded, layer, c, part)
    sample_rows = _sample_stats(store, loaded, layer, c, (s, kr, kf), token_set, tokz)
    f_cnt = _feature_stats(store, loaded, layer, c, kf, token_set, part)
    n_top = _top_tokens(store, loaded, layer, c, tokz, part)
    # Written last: its row set is what tables_current() compares with the committed rows.
    store.write_rows("sae_sample_stats", sample_rows, part=part)
    store.refresh_catalog()
    alive = int((f_cnt > 0).sum())
    n_rows = len(c.row_ids)
    return (
        f"SAE tables for {loaded.name} layer {layer} over {token_set} ({n_rows} rows, {len(c.tok)} tokens): "
        f"sae_row_features {len(keys)} rows, sae_sample_stats {n_rows}, sae_feature_stats {loaded.d_sae} "
        f"({alive} features fire), sae_top_tokens {n_top}"
    )


def _row_features(
    store: Store, loaded: Any, layer: int, c: _Codes, part: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sae_row_features: one row per (row, feature) group; returns (group keys, their activation
    sums, row numbers, features) for the other tables."""
    d_sae = loaded.d_sae
    keys, s, mx, cnt = _group_reduce(c.r_act * d_sae + c.feat, c.act)
    kr, kf = keys // d_sae, keys % d_sae
    store.write_table(
        "sae_row_features",
        pa.table(
            {
                "sae": pa.array([loaded.name] * len(keys), pa.string()),
                "layer": pa.array(np.full(len(keys), layer), pa.int32()),
                "row_id": pa.array(np.asarray(c.row_ids, dtype=object)[kr] if len(keys) else [], pa.string()),
                "feature": pa.array(kf, pa.int32()),
                "mean_act": pa.array((s / np.maximum(c.n_tok_row[kr], 1)).astype(np.float32)),
                "max_act": pa.array(mx.astype(np.float32)),
                "n_active": pa.array(cnt, pa.int32()),
            }
        ),
        part=part,
    )
    return keys, s, kr, kf


def _sample_stats(
    store: Store,
    loaded: Any,
    layer: int,
    c: _Codes,
    groups: tuple[np.ndarray, np.ndarray, np.ndarray],
    token_set: str,
    tokz: str,
) -> list[dict[str, Any]]:
    """The rows of sae_sample_stats (written last by build_sae_tables)."""
    s, kr, kf = groups
    n_rows, n_tok_row = len(c.row_ids), c.n_tok_row
    l0 = c.active.sum(1)
    sum_l0 = np.bincount(c.r_tok, weights=l0, minlength=n_rows)
    max_l0 = np.zeros(n_rows, dtype=np.int64)
    np.maximum.at(max_l0, c.r_tok, l0)
    tot = np.bincount(c.r_act, weights=c.act, minlength=n_rows)
    n_feat = np.bincount(kr, minlength=n_rows)
    top_feature = np.full(n_rows, -1, dtype=np.int64)
    if len(kr):
        best = np.lexsort((-s, kr))  # per row, highest mean first
        first = best[np.r_[True, kr[best][1:] != kr[best][:-1]]]
        top_feature[kr[first]] = kf[first]
    mse, rel = _recon_errors(store, loaded, layer, c.frame, c.tok, c.idx, c.val, c.r_tok, n_rows)
    lay = store.query("SELECT row_id, n_tokens FROM row_layout WHERE tokenization = ?", [tokz]).to_pydict()
    lengths = dict(zip(lay["row_id"], lay["n_tokens"], strict=False))
    return [
        {
            "sae": loaded.name,
            "layer": layer,
            "row_id": r,
            "token_set": token_set,
            "n_tokens": int(n_tok_row[i]),
            "n_tokens_all": int(lengths.get(r, 0)),
            "mean_l0": float(sum_l0[i] / n_tok_row[i]) if n_tok_row[i] else None,
            "max_l0": int(max_l0[i]),
            "n_features": int(n_feat[i]),
            "mean_total_act": float(tot[i] / n_tok_row[i]) if n_tok_row[i] else None,
            "top_feature": int(top_feature[i]) if top_feature[i] >= 0 else None,
            "recon_mse": mse[i],
            "recon_rel_error": rel[i],
        }
        for i, r in enumerate(c.row_ids)
    ]


def _feature_stats(
    store: Store, loaded: Any, layer: int, c: _Codes, kf: np.ndarray, token_set: str, part: str
) -> np.ndarray:
    """sae_feature_stats: one row per feature; returns the features' firing counts."""
    d_sae, feat, act = loaded.d_sae, c.feat, c.act
    n_tokens = len(c.tok)
    f_cnt = np.bincount(feat, minlength=d_sae)
    f_sum = np.bincount(feat, weights=act, minlength=d_sae)
    f_max = np.zeros(d_sae, dtype=np.float32)
    np.maximum.at(f_max, feat, act)
    f_rows = np.bincount(kf, minlength=d_sae)
    cats = c.frame["category"].fill_null("(none)").to_numpy().astype(str)
    cat_names, cat_of_tok = np.unique(cats, return_inverse=True)
    n_cat = len(cat_names)
    cat_tokens = np.bincount(cat_of_tok, minlength=n_cat)
    fc = np.bincount(feat * n_cat + cat_of_tok[c.t_act], minlength=d_sae * n_cat).reshape(d_sae, n_cat)
    rate = f_cnt / max(n_tokens, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = (fc / np.maximum(cat_tokens, 1)[None, :]) / rate[:, None]
    lift[(fc < 3) | ~np.isfinite(lift)] = -np.inf
    top_c = np.argsort(-lift, axis=1)[:, :3]
    tc, tl = [], []
    for j in range(d_sae):
        ok = [k for k in top_c[j] if np.isfinite(lift[j, k])]
        tc.append([str(cat_names[k]) for k in ok])
        tl.append([round(float(lift[j, k]), 3) for k in ok])
    store.write_table(
        "sae_feature_stats",
        pa.table(
            {
                "sae": pa.array([loaded.name] * d_sae, pa.string()),
                "layer": pa.array(np.full(d_sae, layer), pa.int32()),
                "feature": pa.array(np.arange(d_sae), pa.int32()),
                "token_set": pa.array([token_set] * d_sae, pa.string()),
                "firing_frequency": pa.array(rate),
                "mean_activation": pa.array(np.where(f_cnt > 0, f_sum / np.maximum(f_cnt, 1), np.nan), mask=f_cnt == 0),
                "max_activation": pa.array(f_max),
                "n_tokens_active": pa.array(f_cnt, pa.int64()),
                "n_rows_active": pa.array(f_rows, pa.int64()),
                "top_categories": pa.array(tc, pa.list_(pa.string())),
                "top_category_lift": pa.array(tl, pa.list_(pa.float64())),
            }
        ),
        part=part,
    )
    return f_cnt


def _top_tokens(store: Store, loaded: Any, layer: int, c: _Codes, tokz: str, part: str) -> int:
    """sae_top_tokens: the TOP_TOKENS strongest tokens per feature; returns its row count."""
    feat, act = c.feat, c.act
    order = np.lexsort((-act, feat))
    fo = feat[order]
    starts = np.flatnonzero(np.r_[True, fo[1:] != fo[:-1]]) if len(fo) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(fo)) - np.repeat(starts, np.diff(np.r_[starts, len(fo)]))
    keep = order[rank < TOP_TOKENS]
    rk = rank[rank < TOP_TOKENS]
    tt = c.t_act[keep]
    store.write_table(
        "sae_top_tokens",
        pa.table(
            {
                "sae": pa.array([loaded.name] * len(keep), pa.string()),
                "layer": pa.array(np.full(len(keep), layer), pa.int32()),
                "feature": pa.array(feat[keep], pa.int32()),
                "rank": pa.array(rk + 1, pa.int32()),
                "row_id": pa.array(c.frame["row_id"].to_numpy()[tt] if len(tt) else [], pa.string()),
                "token_pos": pa.array(c.frame["token_pos"].to_numpy()[tt], pa.int32()),
                "tok_index": pa.array(c.tok[tt], pa.int64()),
                "activation": pa.array(act[keep], pa.float32()),
                "tokenization": pa.array([tokz] * len(keep), pa.string()),
            }
        ),
        part=part,
    )
    return len(keep)


def _recon_errors(store, loaded, layer, f, tok, idx, val, r_tok, n_rows):
    """Per row: mean ||x - x_hat||^2 and sum ||x - x_hat||^2 / sum ||x||^2 (None without stored states)."""
    name = hidden_array_name(layer)
    none = [None] * n_rows
    if not array_exists(store, name):
        return none, none
    have = committed_set(store, name)
    ok = np.array([r in have for r in f["row_id"].to_list()], dtype=bool)
    if not ok.any():
        return none, none
    X = gather(store, name, tok[ok])
    err = np.empty(len(X), dtype=np.float64)
    for s in range(0, len(X), 8192):
        rec = decode_codes(loaded.sae, idx[ok][s : s + 8192], val[ok][s : s + 8192]).numpy()
        err[s : s + 8192] = ((X[s : s + 8192] - rec) ** 2).sum(1)
    rr = r_tok[ok]
    e_sum = np.bincount(rr, weights=err, minlength=n_rows)
    x_sum = np.bincount(rr, weights=(X.astype(np.float64) ** 2).sum(1), minlength=n_rows)
    cnt = np.bincount(rr, minlength=n_rows)
    mse = [float(e_sum[i] / cnt[i]) if cnt[i] else None for i in range(n_rows)]
    rel = [float(e_sum[i] / x_sum[i]) if cnt[i] and x_sum[i] > 0 else None for i in range(n_rows)]
    return mse, rel


def top_contexts(
    store: Store,
    feature: int,
    *,
    sae: str | None = None,
    layer: int | None = None,
    n: int = 10,
    before: int = 12,
    after: int = 4,
) -> pl.DataFrame:
    """A feature's top-activating tokens with their text in context (`context` marks the
    token as [[token]]); from sae_top_tokens, so n <= TOP_TOKENS. With one SAE in the store
    `sae` and `layer` may be left out."""
    where, params = ["s.feature = ?"], [int(feature)]
    if sae is not None:
        where.append("s.sae = ?")
        params.append(sae)
    if layer is not None:
        where.append("s.layer = ?")
        params.append(int(layer))
    saes = store.query(
        f"SELECT DISTINCT s.sae, s.layer FROM sae_top_tokens s WHERE {' AND '.join(where[1:]) or 'true'}", params[1:]
    ).to_pylist()
    if len(saes) > 1:
        raise ValueError(f"several SAEs hold features: {saes}; pass sae= and layer=")
    sql = f"""
        SELECT s.sae, s.layer, s.feature, s.rank, s.activation, s.row_id, s.token_pos, r.category, r.split,
               t.token_text AS token,
               coalesce((SELECT string_agg(c.token_text, '' ORDER BY c.token_pos) FROM tokens c
                         WHERE c.tokenization = s.tokenization AND c.row_id = s.row_id
                           AND c.token_pos BETWEEN s.token_pos - {int(before)} AND s.token_pos - 1), '') AS before,
               coalesce((SELECT string_agg(c.token_text, '' ORDER BY c.token_pos) FROM tokens c
                         WHERE c.tokenization = s.tokenization AND c.row_id = s.row_id
                           AND c.token_pos BETWEEN s.token_pos + 1 AND s.token_pos + {int(after)}), '') AS after
        FROM sae_top_tokens s
        JOIN tokens t ON t.tokenization = s.tokenization AND t.row_id = s.row_id AND t.token_pos = s.token_pos
        JOIN rows r ON r.row_id = s.row_id
        WHERE {" AND ".join(where)}
        ORDER BY s.rank LIMIT {int(n)}"""
    frame = pl.from_arrow(store.query(sql, params))
    return frame.with_columns((pl.col("before") + "[[" + pl.col("token") + "]]" + pl.col("after")).alias("context"))
