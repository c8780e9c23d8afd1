"""The decoder's rows, tokens and batches, checked before any model loads.

Rows: the first `--max-train-rows` train_base rows by row_id and the first `--max-eval-rows` eval
rows (row_ids are content hashes: a fixed pseudo-random sample), each required to hold the SAE's
codes; rows of `--ood-category C` are taken out of both and form the OOD split (train_base rows of
C first, then eval rows of C, at most `--max-eval-rows`). So the logits the decoder needs are
exactly those of `python -m extractors.run --kinds logits --split train_base --max-rows N` plus
`--split eval --max-rows M`, and a missing one is named with that command.

Tokens: every token of a row is an input (the transformer reads whole rows); the loss and every
metric count the positions t with a next token in the row (not the last one) and t > 0 (position 0
is the attention sink, ~100x the median norm at middle layers; DESIGN.md). The target of t is the
row's token t + 1; the frozen model's distribution at t is the stored `logits/...` slot t.

Batches come from store.loaders.ActivationDataset (unit='row'): the SAE codes as a sparse COO
tensor [tokens, d_sae] straight from the codes arrays, the stored logits and (for the residual
baseline) the hidden states of the same tokens, never densified over the store.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from extractors.logits import logits_array_names
from extractors.sae.format import code_array_names
from store.arrays import array_exists, committed_set, open_array
from store.core import Store, StoreError
from store.loaders import ActivationDataset


class Splits(NamedTuple):
    train: list[str]
    eval: list[str]
    ood: list[str]


class Arrays(NamedTuple):
    codes: str  # sae/<sae>/layer_L (the loader's name for indices + values)
    hidden: str  # hidden/layer_L (the residual baseline's input)
    ids: str
    values: str
    lse: str


def arrays_for(sae_name: str, layer: int) -> Arrays:
    idx, _ = code_array_names(sae_name, layer)
    return Arrays(idx.rsplit("/", 1)[0], f"hidden/layer_{layer}", *logits_array_names())


def _split_rows(store: Store, split: str) -> list[str]:
    return (
        store.query("SELECT row_id FROM split_members WHERE split = ? ORDER BY row_id", [split]).column(0).to_pylist()
    )


def select_splits(
    store: Store, arrays: Arrays, sae_name: str, *, max_train: int, max_eval: int, ood_category: str | None
) -> Splits:
    """The train / eval / OOD rows (module docstring); every bad input is one clear error."""
    idx_name = f"{arrays.codes}/indices"
    if not array_exists(store, idx_name):
        raise StoreError(
            f"SAE {sae_name} has no stored codes ({idx_name} is not in {store.root}); extract them first: "
            f"python -m extractors.run --layer {arrays.hidden.rsplit('_', 1)[1]} --kinds sae --sae {sae_name} "
            f"--store {store.root}"
        )
    coded = committed_set(store, idx_name)
    cats = {r["row_id"]: r["category"] for r in store.query("SELECT row_id, category FROM rows").to_pylist()}
    if ood_category is not None and ood_category not in set(cats.values()):
        have = sorted({c for c in cats.values() if c is not None})
        raise ValueError(f"--ood-category {ood_category!r} is not a category of this store; categories: {have}")
    train_all = _split_rows(store, "train_base")[:max_train]
    eval_all = _split_rows(store, "eval")[:max_eval]
    for name, rows in (("train_base", train_all), ("eval", eval_all)):
        if not rows:
            raise StoreError(f"split {name} has no rows in {store.root}; ingest first (python -m extractors.dataset)")
        lack = [r for r in rows if r not in coded]
        if lack:
            n = len(rows)
            raise StoreError(
                f"{len(lack)} of the first {n} {name} rows have no codes of SAE {sae_name} in {idx_name}; extract "
                f"them: python -m extractors.run --layer {arrays.hidden.rsplit('_', 1)[1]} --kinds sae --sae "
                f"{sae_name} --split {name} --max-rows {n} --store {store.root} (or lower --max-"
                f"{'train' if name == 'train_base' else 'eval'}-rows)"
            )
    is_ood = (lambda r: cats.get(r) == ood_category) if ood_category else (lambda r: False)
    train = [r for r in train_all if not is_ood(r)]
    evals = [r for r in eval_all if not is_ood(r)]
    ood = [r for r in train_all + eval_all if is_ood(r)][:max_eval]
    if ood_category and not ood:
        raise ValueError(
            f"--ood-category {ood_category!r} has no rows among the first {len(train_all)} train_base and "
            f"{len(eval_all)} eval rows; raise --max-train-rows / --max-eval-rows or pick another category"
        )
    if not train or not evals:
        raise ValueError(f"--ood-category {ood_category!r} leaves no training or eval rows")
    return Splits(train, evals, ood)


def check_inputs(store: Store, arrays: Arrays, splits: Splits, n_train: int, n_eval: int) -> None:
    """Every selected row must hold the stored logits and the hidden states (residual baseline and
    logit lens), on the codes' tokenization."""
    rows = splits.train + splits.eval + splits.ood
    tz = open_array(store, f"{arrays.codes}/indices").attrs.get("tokenization")
    layer = arrays.hidden.rsplit("_", 1)[1]
    for name, what, kinds in (
        (arrays.ids, "stored logits", "--kinds logits"),
        (arrays.hidden, "hidden states (the residual baseline and the logit lens read them)", f"--layer {layer}"),
    ):
        have = committed_set(store, name) if array_exists(store, name) else set()
        lack = [r for r in rows if r not in have]
        if lack:
            raise StoreError(
                f"{len(lack)} of the {len(rows)} decoder rows have no {what} ({name}); extract them: python -m "
                f"extractors.run {kinds} --split train_base --max-rows {n_train} --store {store.root}, and the "
                f"same with --split eval --max-rows {n_eval}"
            )
        if open_array(store, name).attrs.get("tokenization") != tz:
            raise StoreError(f"{name} is on another tokenization than {arrays.codes}; re-extract it on {tz}")


def rows_sql(tokenization: str, rows: list[str]) -> str:
    ids = ", ".join("'" + r.replace("'", "''") + "'" for r in sorted(rows))
    return (
        "SELECT t.row_id, t.tok_index, t.token_pos, t.token_id FROM tokens t "
        f"WHERE t.tokenization = '{tokenization}' AND t.row_id IN ({ids}) ORDER BY t.row_id, t.token_pos"
    )


def dataset(store: Store, arrays: Arrays, tokenization: str, rows: list[str], rows_per_batch: int) -> ActivationDataset:
    names = [arrays.codes, arrays.hidden, arrays.ids, arrays.values, arrays.lse]
    return ActivationDataset(
        store, rows_sql(tokenization, rows), names, columns=["token_pos", "token_id"], unit="row",
        batch_size=rows_per_batch,
    )  # fmt: skip


class Batch(NamedTuple):
    codes: torch.Tensor  # sparse COO [n, d_sae]
    hidden: torch.Tensor  # [n, d_model]
    row_lengths: torch.Tensor  # [R]
    keep: torch.Tensor  # [n] bool: has a next token in the row and token_pos > 0
    target: torch.Tensor  # [m] next token ids at the kept positions
    ids: torch.Tensor  # [m, k] frozen top-k ids at the kept positions
    values: torch.Tensor  # [m, k]
    lse: torch.Tensor  # [m]


def to_batch(b: dict[str, Any], arrays: Arrays) -> Batch:
    lens = b["row_lengths"]
    tok = b["token_id"].long()
    pos = b["token_pos"].long()
    last = torch.cumsum(lens, 0) - 1
    has_next = torch.ones(len(tok), dtype=torch.bool)
    has_next[last] = False
    nxt = torch.roll(tok, -1)
    keep = has_next & (pos > 0)
    return Batch(
        b[arrays.codes],
        b[arrays.hidden],
        lens,
        keep,
        nxt[keep],
        b[arrays.ids][keep].long(),
        b[arrays.values][keep],
        b[arrays.lse][keep],
    )
