"""Logit-lens baseline per layer from stored hidden states: `python -m analytics.logit_lens`.

    python -m analytics.logit_lens                          # every stored hidden layer, eval split
    python -m analytics.logit_lens --layers 6 17 --split eval --max-tokens 2048
    python -m extractors.run --layers 6 12 17 24 29         # store the last block too: no forward at all

For every selected layer L, the stored residual stream after block L (`hidden/layer_L`) goes
through the model's final norm and unembedding (nostalgebraist's logit lens), and is
compared with the model's own next-token distribution at the same positions:

* `accuracy`: top-1 of the lens equals the next token of the row (tokens.token_id at
  token_pos + 1);
* `agreement`: top-1 of the lens equals the final distribution's top-1;
* `kl_to_final`: KL(final || lens) in nats, averaged over tokens;
* `ce`: cross-entropy (nats) of the actual next token under the lens.

The final distribution is the model's output. When the store holds the last block
(`hidden/layer_{n_layers-1}`) for the selected rows, it is computed from those stored
states (no forward pass at all; the row's `source` says so). Otherwise the selected rows
are run through the model once, whole (one forward per batch of rows, CPU-cheap with the
default cap), and only the logits at the selected positions are kept. A row for the final
layer (`layer = n_layers - 1`, KL 0 by definition) is added so the curve ends at the
model's own accuracy.

Tokens: the `--view` tokens (default content_tokens: message text, no special/template
tokens) of the `--split` rows that have a next token, taking whole rows in row_id order
until `--max-tokens` is reached. Output: the catalog table `logit_lens` (one Parquet file
per run), a `runs` record (kind logit_lens), and `logit_lens.json` + `logit_lens.png` in
the run dir.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from extractors.logits import final_norm_and_head
from extractors.model import check_model_hash, load_model
from store.arrays import committed_set, open_array, stored_layers
from store.catalog.runs import Run
from store.catalog.tokens import row_token_ids
from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    StoreOptions,
    config_dict,
    parse_config,
    user_errors,
)
from store.core import Store, StoreError
from store.materialize import gather, view_sql
from trainers import plots

TABLE = "logit_lens"


@dataclass(kw_only=True)
class LogitLensConfig(StoreOptions, LayerOptions, ModelOptions, ProgressOptions):
    """Next-token accuracy and KL to the final layer through the final norm + unembedding, per layer.
    --model is the model that produced the stored states (checked by hash)."""

    layers: list[int] = field(
        default_factory=list, metadata={"default_help": "every hidden/layer_L array in the store"}
    )
    split: str = field(default="eval", metadata={"help": "rows to evaluate (a split name)"})
    view: str = field(
        default="content_tokens",
        metadata={"help": "view (or SQL) choosing the tokens; it must return row_id, token_pos and tok_index"},
    )
    max_tokens: int = field(default=2048, metadata={"help": "cap on tokens (whole rows in row_id order)"})
    batch_tokens: int = field(
        default=512, metadata={"help": "tokens per unembedding batch (memory: batch x vocab floats)"}
    )

    def __post_init__(self) -> None:
        self.check_device()
        if self.max_tokens <= 0 or self.batch_tokens <= 0:
            raise ValueError(
                f"--max-tokens and --batch-tokens must be positive, got {self.max_tokens}, {self.batch_tokens}"
            )


class LensResult(NamedTuple):
    run_id: str
    table: pl.DataFrame
    final_source: str
    plot: str


def select_tokens(store: Store, view: str, split: str, tokenization: str, max_tokens: int) -> pl.DataFrame:
    """row_id, token_pos, tok_index, next_token_id of the view's tokens in the split's rows,
    whole rows in row_id order up to max_tokens (at least one row)."""

    sql = (
        f"SELECT v.row_id, v.token_pos, v.tok_index, n.token_id AS next_token_id FROM ({view_sql(store, view)}) v "
        "JOIN tokens n ON n.tokenization = $tok AND n.row_id = v.row_id AND n.token_pos = v.token_pos + 1 "
        "WHERE v.row_id IN (SELECT row_id FROM split_members WHERE split = $split) ORDER BY v.row_id, v.token_pos"
    )
    con = store.connect()
    try:
        f = pl.from_arrow(con.sql(sql, params={"tok": tokenization, "split": split}).to_arrow_table())
    finally:
        con.close()
    if f.is_empty():
        raise StoreError(f"no {view} tokens with a next token in split {split!r}; check --split and --view")
    per_row = f.group_by("row_id", maintain_order=True).len()
    cum = np.cumsum(per_row["len"].to_numpy())
    n_rows = max(1, int(np.searchsorted(cum, max_tokens, side="right")))
    return f.filter(pl.col("row_id").is_in(per_row["row_id"][:n_rows].implode()))


@torch.no_grad()
def _forward_logprobs(lm: Any, ids: dict[str, list[int]], frame: pl.DataFrame) -> torch.Tensor:
    """The model's own next-token log-probs [n, vocab] at the frame's positions (one forward per row)."""
    out = []
    for (rid,), g in frame.group_by("row_id", maintain_order=True):
        x = torch.tensor([ids[rid]], device=lm.device)
        logits = lm.model(input_ids=x).logits[0].float()
        out.append(torch.log_softmax(logits[torch.tensor(g["token_pos"].to_numpy(), device=lm.device)], -1))
    return torch.cat(out)


def run_logit_lens(cfg: LogitLensConfig) -> LensResult:
    """Lens statistics per stored layer (see the module docstring)."""
    store = Store(cfg.store)
    have = stored_layers(store)
    if not have:
        raise StoreError(
            f"{store.root} has no hidden-state arrays; extract some first: python -m extractors.run "
            f"--layer 17 --store {store.root}"
        )
    layers = sorted(cfg.layers) if cfg.layers else sorted(have)
    missing = [L for L in layers if L not in have]
    if missing:
        raise StoreError(
            f"layer {missing[0]} is not stored (stored: {sorted(have)}); extract it: python -m "
            f"extractors.run --layer {missing[0]} --store {store.root}"
        )
    attrs = dict(open_array(store, have[layers[0]]).attrs)
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    check_model_hash(lm, attrs, have[layers[0]])
    n_layers = int(lm.model.config.num_hidden_layers)
    norm, head = final_norm_and_head(lm.model)
    frame = select_tokens(store, cfg.view, cfg.split, attrs["tokenization"], cfg.max_tokens)
    rows = frame["row_id"].unique(maintain_order=True).to_list()
    last = n_layers - 1
    done = committed_set(store, have[last]) if last in have else set()
    final_src = f"stored {have[last]}" if last in have and set(rows) <= done else "model forward"
    for L in layers:
        got = committed_set(store, have[L])
        if not set(rows) <= got:
            raise StoreError(
                f"{len(set(rows) - got)} selected rows are not in {have[L]}; extract them: python -m "
                f"extractors.run --layer {L} --split {cfg.split} --store {store.root}"
            )
    with Run(
        store,
        "logit_lens",
        {**config_dict(cfg), "layers": layers, "final_source": final_src},
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=layers,
    ) as run:
        t0 = time.perf_counter()
        ids = row_token_ids(store, attrs["tokenization"], rows) if final_src == "model forward" else {}
        tok = frame["tok_index"].to_numpy()
        nxt = torch.tensor(frame["next_token_id"].to_numpy(), device=lm.device)
        acc = {L: np.zeros(4) for L in layers}  # correct, agree, kl sum, ce sum
        fin = np.zeros(2)  # correct, ce sum
        dt = next(lm.model.parameters()).dtype

        def lens(X: np.ndarray) -> torch.Tensor:
            h = torch.from_numpy(X).to(lm.device, dt)
            return torch.log_softmax(head(norm(h)).float(), -1)

        # Row-aligned batches: a forward pass needs whole rows.
        starts = np.flatnonzero(np.r_[True, frame["row_id"].to_numpy()[1:] != frame["row_id"].to_numpy()[:-1]])
        bounds, s = [], 0
        for e in list(starts[1:]) + [len(frame)]:
            if e - s >= cfg.batch_tokens:
                bounds.append((s, e))
                s = e
        if s < len(frame):
            bounds.append((s, len(frame)))
        with torch.no_grad():
            for s, e in tqdm(bounds, desc="logit lens", unit="batch", disable=not cfg.progress):
                y = nxt[s:e]
                if final_src == "model forward":
                    lp_f = _forward_logprobs(lm, ids, frame[s:e])
                else:
                    lp_f = lens(gather(store, have[last], tok[s:e]))
                top_f = lp_f.argmax(-1)
                fin += [float((top_f == y).sum()), float(-lp_f.gather(1, y[:, None]).sum())]
                p_f = lp_f.exp()
                for L in layers:
                    lp = (
                        lp_f if (L == last and final_src != "model forward") else lens(gather(store, have[L], tok[s:e]))
                    )
                    top = lp.argmax(-1)
                    kl = (p_f * (lp_f - lp)).sum(-1)
                    acc[L] += [
                        float((top == y).sum()),
                        float((top == top_f).sum()),
                        float(kl.sum()),
                        float(-lp.gather(1, y[:, None]).sum()),
                    ]
        n = len(frame)
        recs = [
            {
                "layer": L,
                "source": f"lens on stored {have[L]}",
                "accuracy": a[0] / n,
                "agreement": a[1] / n,
                "kl_to_final": a[2] / n,
                "ce": a[3] / n,
            }
            for L, a in acc.items()
        ]
        if last not in acc:
            recs.append(
                {
                    "layer": last,
                    "source": f"final ({final_src})",
                    "accuracy": fin[0] / n,
                    "agreement": 1.0,
                    "kl_to_final": 0.0,
                    "ce": fin[1] / n,
                }
            )
        table = (
            pl.DataFrame(recs)
            .with_columns(
                pl.col("layer").cast(pl.Int32),
                pl.lit(n, pl.Int64).alias("n_tokens"),
                pl.lit(len(rows), pl.Int64).alias("n_rows"),
                pl.lit(cfg.split).alias("split"),
                pl.lit(cfg.view).alias("view"),
                pl.lit(run.run_id).alias("run_id"),
            )
            .sort("layer")
        )
        store.write_table(TABLE, table.to_arrow(), part=run.run_id)
        png = plots.logit_lens_plot(
            table,
            run.dir / "logit_lens.png",
            title=f"logit lens, {lm.model_id.split(' ')[0]}: {n} {cfg.view} tokens of {len(rows)} {cfg.split} rows",
        )
        secs = time.perf_counter() - t0
        store.write_json(
            run.dir / "logit_lens.json",
            {"run_id": run.run_id, "config": config_dict(cfg), "final_source": final_src, "table": table.to_dicts()},
        )
        run.finish(
            counts={"tokens": n, "rows": len(rows)},
            metrics={
                "seconds": secs,
                "final_source": final_src,
                "by_layer": {
                    str(r["layer"]): {k: r[k] for k in ("accuracy", "agreement", "kl_to_final", "ce")}
                    for r in table.to_dicts()
                },
            },
        )
    return LensResult(run.run_id, table, final_src, str(png))


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(LogitLensConfig, argv, prog="python -m analytics.logit_lens")
    res = run_logit_lens(cfg)
    t = res.table
    print(
        f"logit lens over {t['n_tokens'][0]} {cfg.view} tokens of {t['n_rows'][0]} {cfg.split} rows "
        f"(final distribution: {res.final_source})"
    )
    print(f"{'layer':>5}  {'accuracy':>8}  {'agree':>6}  {'KL(final||lens)':>15}  {'CE':>7}")
    for r in t.iter_rows(named=True):
        print(
            f"{r['layer']:>5}  {r['accuracy']:>8.3f}  {r['agreement']:>6.3f}  "
            f"{r['kl_to_final']:>15.3f}  {r['ce']:>7.3f}"
        )
    print(f"table {TABLE} (run {res.run_id}); plot {res.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
