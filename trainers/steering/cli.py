"""Steering vectors from the store: compute them, generate with them, measure their effect.

    python -m trainers.steering compute --layers 12 17              # good vs poor rows, selector tokens
    python -m trainers.steering compute --layers 12 17 --token-rule all --store /tmp/st   # CPU-sized
    python -m trainers.steering generate --layers 17 --alpha 4 --prompt-view "SELECT row_id FROM rows
        WHERE category = 'math' AND split = 'eval' LIMIT 4"
    python -m trainers.steering generate --layers auto --top-k 1 --alpha 4     # layers from the layer selector
    python -m trainers.steering evaluate --alpha 4                  # held-out effect, per layer, with CIs

`compute`: two row groups given as SQL predicates over `rows` (default `quality IN
('good','excellent')` vs `quality IN ('poor','very poor')`, rows of --split train_base
committed in every hidden/layer_L) and a token rule: `selector` (each row's argmax token of
the newest token selector of that layer, prompt masked; see trainers.token_selector), `all`
(every supervised token), or a view/SQL returning row_id and tok_index. Per layer the vector
is the difference of the groups' means of hidden states, each row weighted once (its
tokens averaged first): v_L = mean_pos - mean_neg, so adding it pushes towards the first
group. Stored with its provenance (groups' SQL, token rule, counts, norm) in the table
`steering_vectors` and as runs/<run_id>/steering_vectors.safetensors + steering.json, plus
one row per layer in `layer_features` (trainers.layer_selector).

`generate` / `evaluate` (trainers.steering.evaluate): a forward hook adds alpha * v_L to the
output of block L at every position.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from safetensors.torch import save_file

from store.arrays import array_exists, committed_set, open_array
from store.catalog.runs import Run
from store.cli import Command, LayerOptions, StoreOptions, config_dict, parse_config, run_command, user_errors
from store.core import STORE_VERSION, Store, StoreError, write_json
from store.materialize import gather, select, view_sql
from trainers.steering.evaluate import (
    EvaluateConfig,
    parse_generate,
    print_evaluation,
    print_generation,
    run_evaluate,
    run_generate,
)
from trainers.steering.layer_selector import write_layer_features
from trainers.steering.token_selector import TokenSelector, latest_selector, supervised_tokens
from trainers.steering.vectors import VECTORS_TABLE, Steering, load_steering, steer  # noqa: F401 - re-exported

GOOD = "quality IN ('good','excellent')"
POOR = "quality IN ('poor','very poor')"


@dataclass(kw_only=True)
class ComputeConfig(StoreOptions, LayerOptions):
    """Difference-of-means steering vectors per layer from two row groups of the store: one
    vector per layer L of --layers, each read from hidden/layer_L."""

    layers: list[int]  # required: the shared --layer / --layers
    pos_sql: str = field(default=GOOD, metadata={"help": "SQL predicate over rows: the group steered towards"})
    neg_sql: str = field(default=POOR, metadata={"help": "SQL predicate over rows: the group steered away from"})
    split: str = field(default="train_base", metadata={"help": "rows the vectors come from"})
    token_rule: str = field(
        default="selector",
        metadata={
            "help": "selector (each row's argmax token of the layer's "
            "token selector), all (every supervised token), or a view/SQL returning row_id, tok_index"
        },
    )
    selector: list[str] | None = field(
        default=None,
        metadata={
            "help": "token selector checkpoints, one per layer in --layers order (default: the newest of each layer)"
        },
    )
    max_rows: int | None = field(default=None, metadata={"help": "at most N rows per group (first by row_id)"})

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("pass --layers L1 L2 ...")
        if self.selector and len(self.selector) != len(self.layers):
            raise ValueError(
                f"--selector takes one checkpoint per layer: {len(self.layers)} layers, "
                f"{len(self.selector)} checkpoints"
            )


def group_rows(store: Store, pred: str, split: str, arrays: list[str], max_rows: int | None) -> list[str]:
    """Rows of `split` matching the predicate, committed in every one of `arrays`."""
    try:
        ids = (
            store.query(
                f"SELECT r.row_id FROM rows r JOIN split_members s USING (row_id) WHERE s.split = ? "
                f"AND ({pred}) ORDER BY r.row_id",
                [split],
            )
            .column(0)
            .to_pylist()
        )
    except Exception as e:  # noqa: BLE001 - duckdb's parser and binder errors
        raise StoreError(f"group SQL {pred!r} does not run on rows: {str(e).splitlines()[0]}") from e
    have = set.intersection(*(committed_set(store, a) for a in arrays)) if arrays else set(ids)
    ids = [r for r in ids if r in have]
    return ids[:max_rows] if max_rows is not None else ids


def rule_tokens(store: Store, rule: str, rows: list[str], layer: int, selector: TokenSelector | None) -> pl.DataFrame:
    """row_id, tok_index of the tokens the rule picks in the rows."""
    if rule == "all":
        return supervised_tokens(store, rows).select("row_id", "tok_index")
    if rule == "selector":
        return selector.pick(store, rows, k=1, array=f"hidden/layer_{layer}").select("row_id", "tok_index")
    f = select(store, view_sql(store, rule))
    missing = [c for c in ("row_id", "tok_index") if c not in f.columns]
    if missing:
        raise StoreError(
            f"--token-rule view lacks {missing}: it must return row_id and tok_index "
            f"(join the tokens table), or use --token-rule selector|all"
        )
    return f.filter(pl.col("row_id").is_in(rows)).select("row_id", "tok_index")


def row_means(store: Store, array: str, toks: pl.DataFrame) -> tuple[np.ndarray, int]:
    """The mean over rows of each row's mean hidden state (float64) and the token count."""
    X = gather(store, array, toks["tok_index"].to_numpy()).astype(np.float64)
    codes = toks["row_id"].cast(pl.Categorical).to_physical().to_numpy()
    sums = np.zeros((codes.max() + 1, X.shape[1]))
    np.add.at(sums, codes, X)
    per_row = sums / np.bincount(codes)[:, None]
    return per_row.mean(0), len(X)


def grad_summary(store: Store, layer: int, toks: pl.DataFrame) -> tuple[float | None, float | None]:
    """(mean, max) stored gradient norm of the tokens whose rows gradnorm/layer_L holds (None
    when it holds none of them)."""
    name = f"gradnorm/layer_{layer}"
    if not array_exists(store, name):
        return None, None
    toks = toks.filter(pl.col("row_id").is_in(sorted(committed_set(store, name))))
    if not len(toks):
        return None, None
    g = gather(store, name, toks["tok_index"].to_numpy())
    return float(g.mean()), float(g.max())


def layer_selectors(store: Store, cfg: ComputeConfig) -> dict[int, TokenSelector | None]:
    """With --token-rule selector, each layer's token selector (checked against its array)."""
    selectors: dict[int, TokenSelector | None] = {L: None for L in cfg.layers}
    if cfg.token_rule == "selector":
        for i, L in enumerate(cfg.layers):
            sel = TokenSelector.load(cfg.selector[i] if cfg.selector else latest_selector(store, L))
            sel.check_array(store, f"hidden/layer_{L}")
            selectors[L] = sel
    return selectors


def compute_steering(cfg: ComputeConfig) -> Steering:
    """Vectors, stats and records for every layer of cfg (see the module docstring)."""
    store = Store(cfg.store)
    arrays = [f"hidden/layer_{L}" for L in cfg.layers]
    for a in arrays:
        if not array_exists(store, a):
            raise StoreError(
                f"--layers: {a} is not in {store.root}; extract it: python -m extractors.run "
                f"--layer {a.rsplit('_', 1)[1]} --store {store.root}"
            )
    selectors = layer_selectors(store, cfg)
    pos = group_rows(store, cfg.pos_sql, cfg.split, arrays, cfg.max_rows)
    neg = group_rows(store, cfg.neg_sql, cfg.split, arrays, cfg.max_rows)
    for what, g, pred in (("--pos-sql", pos, cfg.pos_sql), ("--neg-sql", neg, cfg.neg_sql)):
        if not g:
            raise StoreError(
                f"{what} {pred!r} selects no {cfg.split} rows that are in {', '.join(arrays)}; "
                f"extract more rows or change the predicate"
            )
    if set(pos) & set(neg):
        raise StoreError(
            f"the groups overlap in {len(set(pos) & set(neg))} rows; make --pos-sql and --neg-sql disjoint"
        )
    attrs = dict(open_array(store, arrays[0]).attrs)
    n_sup = supervised_tokens(store, pos + neg).height
    with Run(
        store,
        "steering_compute",
        config_dict(cfg),
        model_id=attrs.get("model", ""),
        model_hash=attrs.get("model_hash", ""),
        layers=list(cfg.layers),
    ) as run:
        vectors, rows, tensors = {}, [], {}
        for L, a in zip(cfg.layers, arrays, strict=False):
            tp = rule_tokens(store, cfg.token_rule, pos, L, selectors[L])
            tn = rule_tokens(store, cfg.token_rule, neg, L, selectors[L])
            if not len(tp) or not len(tn):
                raise StoreError(f"--token-rule {cfg.token_rule!r} picks no tokens of one group at layer {L}")
            mp, n_tp = row_means(store, a, tp)
            mn, n_tn = row_means(store, a, tn)
            v = (mp - mn).astype(np.float32)
            both = pl.concat([tp, tn])
            h_norm = float(np.linalg.norm(gather(store, a, both["tok_index"].to_numpy()), axis=1).mean())
            g_mean, g_max = grad_summary(store, L, both)
            sel = selectors[L]
            vectors[L] = torch.from_numpy(v)
            tensors[f"layer_{L}"] = vectors[L]
            rows.append(
                {
                    "run_id": run.run_id,
                    "layer": L,
                    "d_model": len(v),
                    "norm": float(np.linalg.norm(v)),
                    "vector": v.tolist(),
                    "mean_hidden_norm": h_norm,
                    "n_pos_rows": len(tp["row_id"].unique()),
                    "n_neg_rows": len(tn["row_id"].unique()),
                    "n_pos_tokens": n_tp,
                    "n_neg_tokens": n_tn,
                    "selected_share": (n_tp + n_tn) / max(n_sup, 1),
                    "grad_norm_mean": g_mean,
                    "grad_norm_max": g_max,
                    "selector": str(sel.meta.get("run_id")) if sel else None,
                    "selector_auroc": sel.meta.get("metrics", {}).get("auroc") if sel else None,
                    "pos_sql": cfg.pos_sql,
                    "neg_sql": cfg.neg_sql,
                    "split": cfg.split,
                    "token_rule": cfg.token_rule,
                    "array": a,
                    "model_id": attrs.get("model", ""),
                    "model_hash": attrs.get("model_hash", ""),
                    "created_at": datetime.now(UTC),
                }
            )
        store.write_table(VECTORS_TABLE, pa.Table.from_pylist(rows), part=run.run_id)
        save_file(tensors, str(run.dir / "steering_vectors.safetensors"))
        meta = {
            "run_id": run.run_id,
            "layers": list(cfg.layers),
            "config": config_dict(cfg),
            "store_version": STORE_VERSION,
            "model_id": attrs.get("model", ""),
            "model_hash": attrs.get("model_hash", ""),
            "tokenization": attrs.get("tokenization", ""),
            "per_layer": [{k: v for k, v in r.items() if k != "vector"} for r in rows],
            "vector": "mean over pos rows of row-mean hidden state - same over neg rows; added as alpha * v",
        }
        write_json(run.dir / "steering.json", meta)
        write_layer_features(store, run.run_id, rows)
        run.finish(
            counts={"pos_rows": len(pos), "neg_rows": len(neg)},
            metrics={"norms": {str(r["layer"]): r["norm"] for r in rows}},
        )
    return Steering(run.run_id, vectors, meta)


@user_errors(ValueError, StoreError)
def compute_main(argv: list[str] | None = None) -> int:
    s = compute_steering(parse_config(ComputeConfig, argv, prog="python -m trainers.steering compute"))
    for r in s.meta["per_layer"]:
        print(
            f"layer {r['layer']}: |v| {r['norm']:.2f} (mean |h| {r['mean_hidden_norm']:.1f}); rows "
            f"{r['n_pos_rows']} vs {r['n_neg_rows']}, tokens {r['n_pos_tokens']} vs {r['n_neg_tokens']}"
        )
    print(f"steering run {s.run_id}: table {VECTORS_TABLE}, runs/{s.run_id}/steering_vectors.safetensors")
    return 0


@user_errors(ValueError, StoreError)
def generate_main(argv: list[str] | None = None) -> int:
    print_generation(run_generate(parse_generate(argv, prog="python -m trainers.steering generate")))
    return 0


@user_errors(ValueError, StoreError)
def evaluate_main(argv: list[str] | None = None) -> int:
    print_evaluation(run_evaluate(parse_config(EvaluateConfig, argv, prog="python -m trainers.steering evaluate")))
    return 0


SUBCOMMANDS = (
    Command(
        "compute",
        "difference-of-means vectors per layer",
        "trainers.steering",
        ("compute",),
        "trainers.steering.cli:compute_main",
    ),
    Command(
        "generate",
        "generate with a vector added at chosen layers",
        "trainers.steering",
        ("generate",),
        "trainers.steering.cli:generate_main",
    ),
    Command(
        "evaluate",
        "held-out effect of each layer's vector: log-probs and math correctness, 95% CIs",
        "trainers.steering",
        ("evaluate",),
        "trainers.steering.cli:evaluate_main",
    ),
)


def main(argv: list[str] | None = None) -> int:
    return run_command(SUBCOMMANDS, argv, prog="python -m trainers.steering")


if __name__ == "__main__":
    sys.exit(main())
