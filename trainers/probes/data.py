"""The probe's examples: which tokens (or rows) train and validate, with their labels.

`load_probe_data(store, cfg)` runs the view once, joined to `split_members` so every row
(document) is a training or a validation document by its dataset split, never both. The
sampling rule, which each probe's JSON records as its `token_rule`:

* token target: positives = every label-1 token of the document; negatives = up to
  `negatives_per_doc` label-0 tokens per document, chosen by the smallest keys of a
  `numpy.random.default_rng(seed)` stream over the view's tokens in (row_id, token_pos)
  order. Training samples use each train seed; validation uses seed 0 for every seed and
  layer, so all probes are judged on the same tokens.
* row target: one example per row: the mean (or last, by token_pos) of the row's view
  tokens; label from `row_label` (SQL over `rows`) or the max of the view's `label`.
* then `class_balance: downsample` drops majority-class training examples (seeded) to the
  minority count, and `max_train_tokens` / `max_val_tokens` take a seeded uniform subsample.

Example indices are kept sorted, so the data order, and with it the fit, is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from store.core import Store
from store.loaders import ActivationDataset
from store.materialize import view_sql
from trainers.probes.config import ProbeConfig


@dataclass
class ProbeData:
    target: str
    frame: pl.DataFrame  # one line per candidate example: row_id, split, role (+ token cols)
    y: np.ndarray  # [n] int64 labels of the candidates
    doc: np.ndarray  # [n] row_id of each candidate
    train: dict[int, np.ndarray]  # seed -> sorted candidate indices used for training
    val: np.ndarray  # sorted candidate indices used for validation
    n_docs: dict[str, int]
    sql: str  # the query that produced `frame`
    token_rule: str
    tokens: pl.DataFrame | None = None  # row target: the view's tokens (ex, token_pos, tok_index)
    pool: str = "mean"

    def features(self, store: Store, array: str, idx: np.ndarray, block_tokens: int = 65536) -> np.ndarray:
        """float32 [len(idx), d] for sorted candidate indices `idx`, read through the training
        loaders (store.loaders.ActivationDataset over the chosen tokens, `block_tokens` at a time)."""
        if self.target == "token":
            picked = self.frame.select("row_id", "tok_index")[idx]
            return ActivationDataset(store, picked, [array], columns=[], batch_size=block_tokens).stack(array)
        toks = self.tokens.filter(pl.col("ex").is_in(idx.tolist()))  # sorted by (ex, token_pos)
        if not len(toks):
            return np.zeros((0, 0), np.float32)
        toks = toks.with_columns(pl.Series("row_id", self.frame["row_id"].to_numpy()[toks["ex"].to_numpy()]))
        per_row = max(1, block_tokens * toks["ex"].n_unique() // len(toks))  # whole rows, ~block_tokens tokens
        ds = ActivationDataset(
            store, toks.select("row_id", "tok_index"), [array], columns=[], unit="row", batch_size=per_row
        )
        out = []
        for i in range(len(ds)):
            b = ds[i]
            X, n = b[array].numpy(), b["row_lengths"].numpy()
            ends = np.cumsum(n)
            if self.pool == "last":
                out.append(X[ends - 1])
            else:
                sums = np.add.reduceat(X.astype(np.float64), ends - n, axis=0)
                out.append((sums / n[:, None]).astype(np.float32))
        return np.concatenate(out)


def _query(store: Store, cfg: ProbeConfig) -> tuple[str, pl.DataFrame]:
    splits = sorted(set(cfg.train_splits) | set(cfg.val_splits))
    con = store.connect()
    try:
        try:
            body = view_sql(store, cfg.view)
            cols = [c[0] for c in con.sql(f"SELECT * FROM ({body}) LIMIT 0").description]
        except duckdb.Error as e:
            raise ValueError(f"view: {cfg.view!r} does not run: {str(e).splitlines()[0]}") from None
        for need in ("row_id", "tok_index"):
            if need not in cols:
                raise ValueError(f"view: {cfg.view!r} must return {need} (join the tokens table)")
        has_label = "label" in cols
        if cfg.target == "token" and not has_label:
            raise ValueError(
                f"view: {cfg.view!r} returns no `label` column; a token probe needs 0/1 labels "
                "(e.g. view: needle_tokens), or use target: row with row_label"
            )
        if cfg.target == "row" and cfg.row_label is None and not has_label:
            raise ValueError(
                f"row_label: needed, as view {cfg.view!r} has no `label` column (e.g. row_label: \"category = 'math'\")"
            )
        pos = "v.token_pos" if "token_pos" in cols else "v.tok_index"
        label = "CAST(v.label AS INTEGER)" if has_label else "NULL::INTEGER"
        row_join = ""
        if cfg.target == "row" and cfg.row_label is not None:
            label = "rl.row_label"
            row_join = (
                f"JOIN (SELECT row_id, CAST(({cfg.row_label}) AS INTEGER) AS row_label FROM rows) rl USING (row_id) "
            )
        split_list = ", ".join("'" + s.replace("'", "''") + "'" for s in splits)
        sql = (
            f"WITH v AS ({body}) SELECT v.row_id, {pos} AS token_pos, v.tok_index, {label} AS label, "
            f"m.split AS probe_split FROM v JOIN split_members m USING (row_id) {row_join}"
            f"WHERE m.split IN ({split_list}) ORDER BY v.row_id, token_pos, v.tok_index"
        )
        try:
            frame = pl.from_arrow(con.sql(sql).to_arrow_table())
        except duckdb.Error as e:
            key = "row_label" if cfg.row_label is not None else "view"
            raise ValueError(f"{key}: the query failed: {str(e).splitlines()[0]}") from None
        return sql, frame
    finally:
        con.close()


def _roles(cfg: ProbeConfig, frame: pl.DataFrame) -> pl.DataFrame:
    """Add `role` (train/val), apply the document caps; fail on a row in both roles."""
    frame = frame.with_columns(
        pl.when(pl.col("probe_split").is_in(cfg.train_splits))
        .then(pl.lit("train"))
        .otherwise(pl.lit("val"))
        .alias("role")
    )
    both = frame.group_by("row_id").agg(pl.col("role").n_unique().alias("k")).filter(pl.col("k") > 1)
    if len(both):
        raise ValueError(
            f"val_splits: {len(both)} rows (e.g. {both['row_id'][0]}) are in a training split "
            f"{cfg.train_splits} and a validation split {cfg.val_splits}"
        )
    frame = frame.unique(subset=["row_id", "token_pos", "tok_index"], keep="first", maintain_order=True)
    for role, cap in (("train", cfg.max_train_docs), ("val", cfg.max_val_docs)):
        if cap is not None:
            docs = frame.filter(pl.col("role") == role)["row_id"].unique().sort()
            drop = docs[cap:]
            frame = frame.filter(~pl.col("row_id").is_in(drop.to_list()))
    return frame.sort("row_id", "token_pos", "tok_index")


def _negatives(frame: pl.DataFrame, seed: int, k: int | None, role: str) -> np.ndarray:
    """Sorted indices: every positive of `role` docs plus up to k sampled negatives per doc."""
    keys = np.random.default_rng(seed).random(len(frame))
    f = frame.select("row_id", "label", "role").with_row_index("i").with_columns(pl.Series("key", keys))
    f = f.filter(pl.col("role") == role)
    if k is not None:
        rank = pl.col("key").rank("ordinal").over("row_id", "label")
        f = f.filter((pl.col("label") == 1) | (rank <= k))
    return np.sort(f["i"].to_numpy().astype(np.int64))


def _balance_and_cap(idx: np.ndarray, y: np.ndarray, seed: int, downsample: bool, cap: int | None) -> np.ndarray:
    if downsample:
        pos, neg = idx[y[idx] == 1], idx[y[idx] == 0]
        rng = np.random.default_rng([seed, 1])
        if len(neg) > len(pos):
            neg = rng.choice(neg, size=len(pos), replace=False)
        elif len(pos) > len(neg):
            pos = rng.choice(pos, size=len(neg), replace=False)
        idx = np.sort(np.concatenate([pos, neg]))
    if cap is not None and len(idx) > cap:
        idx = np.sort(np.random.default_rng([seed, 2]).choice(idx, size=cap, replace=False))
    return idx


def _check_classes(y: np.ndarray, what: str, key: str, splits: list[str]) -> None:
    n_pos = int(y.sum())
    if len(y) == 0 or n_pos in (0, len(y)):
        raise ValueError(
            f"{key}: the {what} examples from splits {splits} have {n_pos} positives of {len(y)}; "
            "a probe needs both classes (check the view's labels, the splits and the caps)"
        )


def load_probe_data(store: Store, cfg: ProbeConfig) -> ProbeData:
    sql, frame = _query(store, cfg)
    if not len(frame):
        raise ValueError(f"view: {cfg.view!r} selects no tokens in splits {cfg.train_splits + cfg.val_splits}")
    frame = _roles(cfg, frame)
    if frame["label"].null_count() and cfg.target == "token":
        raise ValueError(f"view: {cfg.view!r} has NULL labels")
    tokens = None
    if cfg.target == "row":
        rows = frame.group_by("row_id", maintain_order=True).agg(
            pl.col("probe_split").first(), pl.col("role").first(), pl.col("label").max()
        )
        dropped = rows["label"].null_count()
        rows = rows.filter(pl.col("label").is_not_null()).with_row_index("ex")
        tokens = (
            frame.join(rows.select("row_id", "ex"), on="row_id")
            .select("ex", "token_pos", "tok_index")
            .sort("ex", "token_pos", "tok_index")
        )
        frame = rows.select("row_id", pl.col("probe_split").alias("split"), "role", "label")
        rule = (
            f"row target: {cfg.pool} of each row's tokens in view {cfg.view!r}; label "
            f"{cfg.row_label or 'max(view label)'}; {dropped} rows with a NULL label dropped"
        )
    else:
        frame = frame.rename({"probe_split": "split"})
        rule = (
            f"token target: positives = all label-1 tokens of view {cfg.view!r}; negatives = up to "
            f"{cfg.negatives_per_doc or 'all'} label-0 tokens per document, sampled with the train seed "
            f"(validation: seed 0)"
        )
    y = frame["label"].to_numpy().astype(np.int64)
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(
            f"{'row_label' if cfg.row_label else 'view'}: labels must be 0/1, got "
            f"{sorted(set(np.unique(y).tolist()))[:5]}"
        )
    k = cfg.negatives_per_doc if cfg.target == "token" else None
    val = _negatives(frame, 0, k, "val")
    val = _balance_and_cap(val, y, 0, False, cfg.max_val_tokens)
    train = {}
    for seed in cfg.train_seeds:
        idx = _negatives(frame, seed, k, "train")
        train[seed] = _balance_and_cap(idx, y, seed, cfg.class_balance == "downsample", cfg.max_train_tokens)
        _check_classes(y[train[seed]], "training", "train_splits", cfg.train_splits)
    _check_classes(y[val], "validation", "val_splits", cfg.val_splits)
    rule += f"; class_balance {cfg.class_balance}; documents split by {cfg.train_splits} / {cfg.val_splits}"
    n_docs = {r: frame.filter(pl.col("role") == r)["row_id"].n_unique() for r in ("train", "val")}
    return ProbeData(cfg.target, frame, y, frame["row_id"].to_numpy(), train, val, n_docs, sql, rule, tokens, cfg.pool)
