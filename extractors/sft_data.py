"""Supervised rows from the store: stored token ids and their completion-only labels.

Finetuning, eval loss and attribution all read the same thing: each row's stored chat-template
token ids (the `tokens` table, our users' "finetune_raw" tokenization; nothing is re-rendered)
and its labels, which are the token id where `tokens.is_supervised` is true and -100 elsewhere
(prompt, template and special tokens are masked). Labels are unshifted, the Hugging Face
convention that bergson also uses: the logits at position t-1 predict labels[t].

    rows = select_rows_by(store, split="train_base")             # or sql="SELECT row_id FROM ..."
    data = load_sft_rows(store, layout.tokenization, rows, max_length=2048, on_long="error")
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from store.catalog.tokens import row_tokens
from store.core import Store, StoreError

IGNORE = -100  # the label of a position without loss (torch's cross_entropy ignore_index)


class SFTRows(NamedTuple):
    row_ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]  # token id where supervised, else IGNORE (unshifted)
    n_truncated: int  # rows cut to max_length
    n_long: int  # rows longer than max_length (truncated or not)

    @property
    def n_supervised(self) -> list[int]:
        """Predicted (supervised) tokens per row; position 0 is never predicted."""
        return [sum(1 for y in lab[1:] if y != IGNORE) for lab in self.labels]

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def splits(store: Store) -> list[str]:
    if not store.has_table("split_members"):
        return []
    return store.query("SELECT DISTINCT split FROM split_members ORDER BY 1").column(0).to_pylist()


def select_rows_by(
    store: Store,
    *,
    split: str | None = None,
    sql: str | None = None,
    max_rows: int | None = None,
    flag: str = "--split",
) -> list[str]:
    """Row ids of a split (`all`: every row) or of any SQL returning a `row_id` column, sorted by
    row_id (a content hash: `max_rows` keeps a fixed pseudo-random sample)."""
    if not store.has_table("rows"):
        raise StoreError(f"{store.root} has no rows; ingest first: python -m extractors.dataset --store {store.root}")
    if sql:
        try:
            t = store.query(f"SELECT DISTINCT CAST(row_id AS VARCHAR) AS row_id FROM ({sql}) ORDER BY 1")
        except Exception as e:  # duckdb errors (binder, parser, catalog) name the problem
            raise StoreError(
                f"the SQL given ({sql!r}) failed: {str(e).splitlines()[0]}; it must be a SELECT "
                f"returning a row_id column"
            ) from e
        ids = t.column(0).to_pylist()
        known = set(store.query("SELECT row_id FROM rows").column(0).to_pylist())
        missing = [r for r in ids if r not in known]
        if missing:
            raise StoreError(
                f"the SQL given returns {len(missing)} row_id(s) not ingested in {store.root} "
                f"(e.g. {missing[0]!r}); select row_ids from the rows table"
            )
        what = "the SQL given"
    elif split == "all":
        ids = store.query("SELECT row_id FROM rows ORDER BY row_id").column(0).to_pylist()
        what = "--split all"
    else:
        ids = (
            store.query("SELECT row_id FROM split_members WHERE split = ? ORDER BY row_id", [split])
            .column(0)
            .to_pylist()
        )
        what = f"{flag} {split}"
        if not ids:
            raise StoreError(
                f"{flag} {split!r} has no rows in {store.root}; splits in this store: "
                f"{', '.join(splits(store)) or 'none (ingest first)'}, or all"
            )
    if not ids:
        raise StoreError(f"{what} selects no rows; check the query against the rows table")
    return ids[:max_rows] if max_rows is not None else ids


def load_sft_rows(
    store: Store,
    tokenization: str,
    row_ids: list[str],
    *,
    max_length: int | None = None,
    on_long: Literal["error", "truncate"] = "error",
    flag: str = "--max-length",
) -> SFTRows:
    """Token ids and labels of `row_ids` (in that order) from the stored tokenization."""
    got = row_tokens(store, tokenization, row_ids)
    missing = [r for r in row_ids if r not in got]
    if missing:
        raise StoreError(
            f"{len(missing)} selected row(s) have no tokens in tokenization {tokenization} "
            f"(e.g. {missing[0]!r}, maybe quarantined); select rows that were ingested and tokenized"
        )
    long_rows = [r for r in row_ids if max_length is not None and len(got[r][0]) > max_length]
    if long_rows and on_long == "error":
        longest = max(len(got[r][0]) for r in long_rows)
        raise StoreError(
            f"{len(long_rows)} row(s) are longer than {flag} {max_length} (longest {longest} tokens, "
            f"e.g. {long_rows[0]!r}); pass {flag} {longest}, or --on-long truncate to cut them"
        )
    ids_out, labels = [], []
    for r in row_ids:
        ids, sup = got[r]
        if max_length is not None:
            ids, sup = ids[:max_length], sup[:max_length]
        ids_out.append(list(ids))
        labels.append([i if s else IGNORE for i, s in zip(ids, sup, strict=False)])
    return SFTRows(list(row_ids), ids_out, labels, len(long_rows) if on_long == "truncate" else 0, len(long_rows))
