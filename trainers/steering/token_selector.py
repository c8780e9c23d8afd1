"""Token selector: an MLP that learns which completion tokens carry the largest gradient norm.

    python -m extractors.run --layers 12 17                      # once: hidden states
    python -m extractors.run --layers 12 17 --kinds gradnorm     # once: gradient norms (the labels)
    python -m trainers.token_selector --layer 17                 # train, evaluate, checkpoint
    python -m trainers.token_selector --layer 17 --store /tmp/st --epochs 10 --write-scores   # CPU-sized

Data: the table macro `token_selection` (sql/views/token_selection.sql) over the stored
gradient norms: per row, the top `positives_per_sample` supervised tokens by norm are
positives and `negatives_per_positive` seeded random other supervised tokens per positive
are negatives (at most `max_tokens_per_sample` per row). Features: the token's hidden state at
the layer (hidden/layer_L, materialized from the store) and its rel_pos, z-scored with the
training statistics. Rows of `train_split` train, rows of `eval_split` evaluate (a split by
row: no row is on both sides).

Metrics on the held-out rows: token AUROC on the view's tokens; precision@1 = how often the
row's argmax token (over all its supervised tokens, prompt masked) is one of its true
top-gradient tokens, against a random supervised token (its exact expectation,
positives / supervised tokens per row) and the highest-rel_pos token; precision@k likewise.

Outputs in runs/<run_id>/: token_selector_layer_L.safetensors + .json (config, feature spec,
view SQL, store version, model hash, metrics), token_selector_layer_L_pr.png, a `runs` record
(kind token_selector); with --write-scores, every token's selector logit of the rows in
hidden/layer_L as the array selector/<name>/layer_L and the table `selector_token_scores`
(rank = rank among the row's supervised tokens). `TokenSelector.load(path).pick(store, rows)`
gives each row's argmax (and top-k) supervised token on CPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from store.arrays import array_exists, commit_unit, committed_set, create_array, open_array, record_array, write_unit
from store.catalog.runs import Run
from store.catalog.tokens import read_layout
from store.cli import LayerOptions, ProgressOptions, SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import STORE_VERSION, Store, StoreError
from store.loaders import ActivationDataset
from store.materialize import select, view_text
from trainers.plots import pr_curve
from trainers.probes.logreg import binary_metrics
from trainers.steering.mlp import MLP, fit_mlp, load_mlp, save_mlp

SCORES_TABLE = "selector_token_scores"
NEEDED = ("row_id", "tok_index", "token_pos", "label", "rel_pos", "split")


@dataclass(kw_only=True)
class TokenSelectorConfig(StoreOptions, LayerOptions, SeedOptions, ProgressOptions):
    """Train the token-selector MLP on stored hidden states, labelled by stored gradient norms.

    One layer, --layer L: features from hidden/layer_L, labels from gradnorm/layer_L. --seed seeds
    the initialisation, dropout and minibatch order."""

    layers: list[int]  # required: one layer (--layer L)
    name: str = field(default="token_selector", metadata={"help": "selector name (array selector/<name>/layer_L)"})
    positives_per_sample: int = field(
        default=1, metadata={"help": "positives per row: its top-k supervised tokens by gradient norm"}
    )
    negatives_per_positive: int = field(default=4, metadata={"help": "random other supervised tokens per positive"})
    max_tokens_per_sample: int = field(default=16, metadata={"help": "at most this many tokens per row"})
    selection_seed: int = field(default=0, metadata={"help": "seed of the negatives' draw (in the SQL macro)"})
    hidden_sizes: list[int] = field(default_factory=lambda: [128], metadata={"help": "MLP hidden layer sizes"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after each hidden layer"})
    epochs: int = field(default=30, metadata={"help": "training epochs"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=256, metadata={"help": "tokens per minibatch"})
    pos_weight: float | None = field(
        default=None,
        metadata={
            "help": "weight of the positives' BCE term "
            "(default: none, i.e. 1; e.g. 4 to balance 1 positive : 4 negatives)"
        },
    )
    train_split: str = field(default="train_base", metadata={"help": "rows that train"})
    eval_split: str = field(default="eval", metadata={"help": "held-out rows that evaluate"})
    top_k: int = field(default=3, metadata={"help": "k of precision@k"})
    write_scores: bool = field(
        default=False,
        metadata={
            "help": "score every token of the rows in hidden/layer_L "
            "into the array selector/<name>/layer_L and the table selector_token_scores"
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "where the checkpoint goes (default runs/<run_id>/ of the store)"}
    )

    def __post_init__(self) -> None:
        self.one_layer("the token selector")
        for k in (
            "positives_per_sample",
            "negatives_per_positive",
            "max_tokens_per_sample",
            "epochs",
            "batch_size",
            "top_k",
        ):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.train_split == self.eval_split:
            raise ValueError(f"--train-split and --eval-split are both {self.train_split!r}; the split is by row")

    @property
    def layer(self) -> int:
        return self.one_layer("the token selector")

    def selection_sql(self) -> str:
        return (
            f"SELECT * FROM token_selection({int(self.layer)}, positives_per_sample := "
            f"{self.positives_per_sample}, negatives_per_positive := {self.negatives_per_positive}, "
            f"max_tokens_per_sample := {self.max_tokens_per_sample}, seed := {self.selection_seed})"
        )


def features(X: np.ndarray, rel_pos: np.ndarray) -> np.ndarray:
    """hidden state ⊕ rel_pos, the selector's input."""
    return np.hstack([X, np.asarray(rel_pos, np.float32)[:, None]]).astype(np.float32, copy=False)


def supervised_tokens(store: Store, row_ids: list[str]) -> pl.DataFrame:
    """row_id, token_pos, tok_index, rel_pos of the supervised tokens of the rows (prompt masked)."""
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        return pl.from_arrow(
            con.sql(
                "SELECT t.row_id, t.token_pos, t.tok_index, t.rel_pos FROM tokens t "
                "JOIN wanted USING (row_id) WHERE t.is_supervised "
                "ORDER BY t.tok_index"
            ).to_arrow_table()
        )
    finally:
        con.close()


class TokenSelector:
    """A trained selector (checkpoint from `save_mlp`): scores tokens of its layer's states."""

    def __init__(self, mlp: MLP):
        self.mlp, self.meta = mlp, mlp.meta
        self.layer, self.array = int(self.meta["layer"]), self.meta["array"]

    @classmethod
    def load(cls, path: str | Path) -> TokenSelector:
        mlp = load_mlp(path)
        if mlp.meta.get("kind") != "token_selector":
            raise StoreError(f"{path} is not a token selector checkpoint (python -m trainers.token_selector)")
        return cls(mlp)

    def check_array(self, store: Store, array: str) -> None:
        """Refuse hidden states of another layer or model than the selector was trained on."""
        attrs = dict(open_array(store, array).attrs)
        if attrs.get("layer") != self.layer:
            raise StoreError(
                f"token selector {self.meta['name']} was trained on layer {self.layer}, not on {array}; "
                f"train one for it: python -m trainers.token_selector --layer {attrs.get('layer')}"
            )
        if self.meta.get("model_hash") and attrs.get("model_hash") != self.meta["model_hash"]:
            raise StoreError(
                f"token selector {self.meta['name']} was trained on states of {self.meta.get('model_id')} "
                f"({self.meta['model_hash']}), but {array} holds {attrs.get('model_hash')}; "
                f"train one on this store: python -m trainers.token_selector --layer {self.layer}"
            )

    def score(self, X: np.ndarray, rel_pos: np.ndarray) -> np.ndarray:
        return self.mlp.logits(features(X, rel_pos))

    def score_supervised(self, store: Store, row_ids: list[str], array: str | None = None) -> pl.DataFrame:
        """The rows' supervised tokens with their selector logit (`score`)."""
        array = array or self.array
        self.check_array(store, array)
        frame = supervised_tokens(store, row_ids)
        missing = set(frame["row_id"].unique().to_list()) - committed_set(store, array)
        if missing:
            raise StoreError(
                f"{len(missing)} rows are not in {array} (e.g. {sorted(missing)[0]}); extract them: "
                f"python -m extractors.run --layer {self.layer} --store {store.root}"
            )
        X = _hidden(store, frame, array)
        return frame.with_columns(pl.Series("score", self.score(X, frame["rel_pos"].to_numpy())))

    def pick(self, store: Store, row_ids: list[str], k: int = 1, array: str | None = None) -> pl.DataFrame:
        """Each row's top-k supervised tokens by selector logit (rank 1 = the argmax)."""
        f = self.score_supervised(store, row_ids, array)
        return (
            f.sort(["row_id", "score", "token_pos"], descending=[False, True, False])
            .with_columns(pl.col("token_pos").cum_count().over("row_id").alias("rank"))
            .filter(pl.col("rank") <= k)
        )


def latest_selector(store: Store, layer: int) -> Path:
    """The checkpoint of the newest finished token_selector run of `layer`."""
    if not store.has_table("runs"):
        raise StoreError(f"the store {store.root} has no runs yet")
    rows = (
        store.query(
            "SELECT metrics FROM runs WHERE kind = 'token_selector' AND status = 'finished' "
            "AND list_contains(layers, ?) ORDER BY started_at DESC",
            [layer],
        )
        .column(0)
        .to_pylist()
    )
    for m in rows:
        ck = json.loads(m).get("checkpoint")
        if ck and Path(ck).is_file():
            return Path(ck)
    raise StoreError(
        f"no token selector of layer {layer} in {store.root}; train one: "
        f"python -m trainers.token_selector --layer {layer} --store {store.root}"
    )


def _hidden(store: Store, frame: pl.DataFrame, array: str) -> np.ndarray:
    """The frame's hidden states [n, d] float32, in its order, read through the training loaders."""
    return ActivationDataset(store, frame.select("row_id", "tok_index"), [array], columns=[], batch_size=65536).stack(
        array
    )


def load_data(store: Store, cfg: TokenSelectorConfig) -> tuple[pl.DataFrame, np.ndarray, str]:
    """The selection view's tokens and their features; fails with the command that fixes it."""
    hidden, grad = f"hidden/layer_{cfg.layer}", f"gradnorm/layer_{cfg.layer}"
    for name, cmd in ((hidden, ""), (grad, " --kinds gradnorm")):
        if not array_exists(store, name):
            raise StoreError(
                f"--layer {cfg.layer}: {name} is not in {store.root}; run: "
                f"python -m extractors.run --layer {cfg.layer}{cmd} --store {store.root}"
            )
    frame = select(store, cfg.selection_sql(), array=hidden)
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise StoreError(f"the token-selection view lacks columns {missing}; it must return {', '.join(NEEDED)}")
    if not len(frame):
        raise StoreError(
            f"token_selection({cfg.layer}) selects no tokens: are the gradient norms of layer "
            f"{cfg.layer} committed? python -m extractors.run --layer {cfg.layer} --kinds gradnorm"
        )
    X = _hidden(store, frame, hidden)
    return frame, features(X, frame["rel_pos"].to_numpy()), hidden


def precision_at(scored: pl.DataFrame, positives: pl.DataFrame, k: int, column: str = "score") -> float:
    """Share of the top-k tokens by `column` (per row) that are true positives, over rows."""
    top = (
        scored.sort(["row_id", column, "token_pos"], descending=[False, True, False])
        .group_by("row_id", maintain_order=True)
        .head(k)
    )
    hit = top.join(
        positives.select("row_id", "token_pos").with_columns(pl.lit(1).alias("_hit")),
        on=["row_id", "token_pos"],
        how="left",
    ).with_columns(pl.col("_hit").fill_null(0))
    return float(hit.group_by("row_id").agg(pl.col("_hit").mean())["_hit"].mean())


def evaluate(
    sel: TokenSelector, store: Store, frame: pl.DataFrame, Xf: np.ndarray, ev: np.ndarray, k: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Held-out metrics (see the module docstring); returns them and the eval tokens' logits."""
    y = frame["label"].to_numpy()[ev]
    logits = sel.mlp.logits(Xf[ev])
    rows = sorted(set(frame.filter(pl.Series(ev))["row_id"].to_list()))
    pos = frame.filter(pl.Series(ev) & (pl.col("label") == 1))
    scored = sel.score_supervised(store, rows, array=f"hidden/layer_{sel.layer}")
    n_sup = scored.group_by("row_id").len()
    n_pos = pos.group_by("row_id").len().rename({"len": "n_pos"})
    chance = n_sup.join(n_pos, on="row_id", how="left").with_columns(pl.col("n_pos").fill_null(0))
    out = {
        "auroc": binary_metrics(y, logits)["auroc"],
        "auroc_rel_pos": binary_metrics(y, frame["rel_pos"].to_numpy()[ev])["auroc"],
        "n_eval_rows": len(rows),
        "n_eval_tokens": int(ev.sum()),
    }
    for kk in sorted({1, k}):
        out[f"precision_at_{kk}"] = precision_at(scored, pos, kk)
        out[f"precision_at_{kk}_highest_rel_pos"] = precision_at(scored, pos, kk, "rel_pos")
        # k random supervised tokens: each is a positive with chance n_pos / n_supervised
        out[f"precision_at_{kk}_random"] = float((chance["n_pos"] / chance["len"]).mean())
    return out, logits


def write_selector_scores(store: Store, sel: TokenSelector, name: str, run_id: str) -> tuple[str, int]:
    """Every token of the rows in hidden/layer_L: logits into selector/<name>/layer_L and the
    table selector_token_scores. Returns (array name, tokens)."""
    hidden = f"hidden/layer_{sel.layer}"
    src = open_array(store, hidden)
    layout = read_layout(store, src.attrs["tokenization"])
    rows = sorted(committed_set(store, hidden))
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": rows}))
        f = pl.from_arrow(
            con.sql(
                "SELECT row_id, token_pos, tok_index, rel_pos, is_supervised FROM tokens "
                "JOIN wanted USING (row_id) ORDER BY tok_index"
            ).to_arrow_table()
        )
    finally:
        con.close()
    tok, logits = f["tok_index"].to_numpy(), np.zeros(0, np.float32)
    if len(f):
        ds = ActivationDataset(store, f.select("row_id", "tok_index"), [hidden], columns=[], batch_size=65536)
        rel = f["rel_pos"].to_numpy()
        logits = np.concatenate(
            [sel.score(ds[i][hidden].numpy(), rel[i * 65536 : (i + 1) * 65536]) for i in range(len(ds))]
        )
    f = f.with_columns(pl.Series("score", logits, dtype=pl.Float32))
    ranks = (
        f.filter(pl.col("is_supervised"))
        .sort(["row_id", "score", "token_pos"], descending=[False, True, False])
        .with_columns(pl.col("token_pos").cum_count().over("row_id").cast(pl.Int32).alias("rank"))
        .select("row_id", "token_pos", "rank")
    )
    f = f.join(ranks, on=["row_id", "token_pos"], how="left").sort("tok_index")
    aname = f"selector/{name}/layer_{sel.layer}"
    arr = create_array(
        store,
        aname,
        n_slots=layout.n_slots,
        width=None,
        chunk_slots=layout.unit_tokens,
        dtype="fp32",
        attrs={
            "tokenization": layout.tokenization,
            "model": src.attrs.get("model"),
            "model_hash": src.attrs.get("model_hash"),
            "layer": sel.layer,
            "run_id": run_id,
            "kind": "selector",
            "selector": name,
            "source_array": hidden,
            "value": "token selector logit (all tokens; pick among is_supervised ones)",
        },
    )
    unit_of = tok // layout.unit_tokens
    for u in np.unique(unit_of):
        m = unit_of == u
        buf = np.zeros(layout.unit_tokens, np.float32)
        buf[tok[m] - u * layout.unit_tokens] = logits[m]
        write_unit(store, arr, aname, int(u), buf)
        commit_unit(store, aname, int(u), sorted(set(f["row_id"].filter(pl.Series(m)).to_list())), run_id)
    record_array(store, aname, arr, kind="selector", layer=sel.layer, run_id=run_id, extra={"selector": name})
    n = len(f)
    store.write_table(
        SCORES_TABLE,
        pa.table(
            {
                "run_id": pa.array([run_id] * n, pa.string()),
                "selector": pa.array([name] * n, pa.string()),
                "layer": pa.array([sel.layer] * n, pa.int32()),
                "row_id": f["row_id"].to_arrow(),
                "token_pos": f["token_pos"].cast(pl.Int32).to_arrow(),
                "tok_index": f["tok_index"].to_arrow(),
                "is_supervised": f["is_supervised"].to_arrow(),
                "score": f["score"].to_arrow(),
                "rank": f["rank"].to_arrow(),
            }
        ),
        part=f"{name}/layer_{sel.layer}",
    )
    return aname, n


def train_token_selector(cfg: TokenSelectorConfig) -> dict[str, Any]:
    """Train, evaluate, checkpoint (and optionally write scores); returns the run's metrics."""
    store = Store(cfg.store)
    frame, Xf, hidden = load_data(store, cfg)
    split = frame["split"].to_numpy()
    tr, ev = split == cfg.train_split, split == cfg.eval_split
    for what, m, s in (("--train-split", tr, cfg.train_split), ("--eval-split", ev, cfg.eval_split)):
        if not m.any() or len(set(frame["label"].to_numpy()[m])) < 2:
            raise StoreError(
                f"{what} {s!r} has no labelled tokens of both classes in token_selection({cfg.layer}); "
                f"compute gradient norms for its rows: python -m extractors.run --layer {cfg.layer} "
                f"--kinds gradnorm --split {s} --store {store.root}"
            )
    attrs = dict(open_array(store, hidden).attrs)
    sql = cfg.selection_sql()
    with Run(
        store,
        "token_selector",
        {**config_dict(cfg), "view_sql": sql},
        model_id=attrs.get("model", ""),
        model_hash=attrs.get("model_hash", ""),
        layers=[cfg.layer],
    ) as run:
        meta = {
            "kind": "token_selector",
            "name": cfg.name,
            "layer": cfg.layer,
            "array": hidden,
            "feature_keys": [f"{hidden}[{i}]" for i in range(Xf.shape[1] - 1)] + ["rel_pos"],
            "feature_spec": {
                "hidden": hidden,
                "d_model": Xf.shape[1] - 1,
                "extra": ["rel_pos"],
                "token_rule": "supervised tokens (prompt masked); argmax = the selected token",
            },
            "config": config_dict(cfg),
            "view_sql": sql,
            "macro_sql": view_text(store, "token_selection"),
            "store": str(store.root),
            "store_version": STORE_VERSION,
            "run_id": run.run_id,
            "model_id": attrs.get("model", ""),
            "model_hash": attrs.get("model_hash", ""),
            "tokenization": attrs.get("tokenization", ""),
        }
        y = frame["label"].to_numpy().astype(np.float32)
        bar = tqdm(total=cfg.epochs, desc=f"token selector layer {cfg.layer}", disable=not cfg.progress)
        mlp, losses = fit_mlp(
            Xf[tr],
            y[tr],
            hidden=cfg.hidden_sizes,
            dropout=cfg.dropout,
            epochs=cfg.epochs,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            pos_weight=cfg.pos_weight,
            meta=meta,
            progress=bar,
        )
        bar.close()
        sel = TokenSelector(mlp)
        metrics, logits = evaluate(sel, store, frame, Xf, ev, cfg.top_k)
        metrics.update(
            {
                "train_auroc": binary_metrics(y[tr], mlp.logits(Xf[tr]))["auroc"],
                "n_train_tokens": int(tr.sum()),
                "n_train_rows": int(frame.filter(pl.Series(tr))["row_id"].n_unique()),
                "final_train_loss": losses[-1],
                "train_loss_by_epoch": losses,
            }
        )
        mlp.meta["metrics"] = metrics
        out = Path(cfg.output_dir) if cfg.output_dir else run.dir
        stem = out / f"token_selector_layer_{cfg.layer}"
        st_path, js_path = save_mlp(mlp, stem)
        png = pr_curve(
            y[ev],
            {"selector": logits, "rel_pos": frame["rel_pos"].to_numpy()[ev]},
            stem.with_name(stem.name + "_pr.png"),
            f"token selector, layer {cfg.layer}, {cfg.eval_split} rows",
        )
        result = {**metrics, "checkpoint": str(js_path), "weights": str(st_path), "plot": str(png)}
        if cfg.write_scores:
            result["scores_array"], result["scores_tokens"] = write_selector_scores(store, sel, cfg.name, run.run_id)
        run.finish(counts={"train_tokens": int(tr.sum()), "eval_tokens": int(ev.sum())}, metrics=result)
    return {**result, "run_id": run.run_id}


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TokenSelectorConfig, argv, prog="python -m trainers.token_selector")
    m = train_token_selector(cfg)
    k = cfg.top_k
    print(
        f"token selector layer {cfg.layer}: {m['n_train_tokens']} train tokens ({m['n_train_rows']} rows); "
        f"held-out {cfg.eval_split}: {m['n_eval_rows']} rows, AUROC {m['auroc']:.3f} (rel_pos alone "
        f"{m['auroc_rel_pos']:.3f})"
    )
    print(
        f"precision@1 {m['precision_at_1']:.3f} vs random token {m['precision_at_1_random']:.3f}, highest rel_pos "
        f"{m['precision_at_1_highest_rel_pos']:.3f}; precision@{k} {m[f'precision_at_{k}']:.3f} vs random "
        f"{m[f'precision_at_{k}_random']:.3f}"
    )
    print(f"checkpoint {m['checkpoint']} (+ .safetensors); plot {m['plot']}; run {m['run_id']}")
    if cfg.write_scores:
        print(f"scores: array {m['scores_array']}, table {SCORES_TABLE} ({m['scores_tokens']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
