"""Render each conversation once with the model's chat template and label every token.

The token ids are the "finetune_raw" tokens that extraction, finetuning and attribution
reuse. Each token gets:

* `role`: the message role (`system`/`user`/`assistant`) when its text lies inside that
  message's content; `special` for the tokenizer's special tokens (`<|im_start|>`...);
  `template` for the rest the template adds (role headers, newlines, a default system
  prompt the template inserts).
* `msg_index`: the message whose rendered block holds the token (a block runs from the end
  of the previous message's rendering to the end of this one's).
* `char_start`/`char_end`: offsets inside that message's content (-1 outside content), so
  spans stored as content offsets (e.g. a needle) map onto tokens exactly.
* `is_supervised`: the tokens of the final assistant message's content plus the special
  token that closes it: what supervised finetuning trains on.
* `rel_pos`: token_pos / (n_tokens - 1), the relative position in the sequence.

`ensure_tokenization` gives a store its tokenization (and layout, store.catalog.tokens) on first use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from store import claims
from store.catalog.tokens import plan_layout, read_layout, tokenizations, write_tokenization
from store.core import StoreError
from store.scratch import scratch


class TemplateMismatch(ValueError):
    """The rendered template does not contain a message's content verbatim."""


def tokenizer_hash(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(str(getattr(tok, "chat_template", "") or "").encode())
    return h.hexdigest()[:16]


def render(tok: Any, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False)


def tokenize_conversation(tok: Any, messages: list[dict]) -> dict[str, list]:
    """Token ids and per-token labels of one conversation (see the module docstring)."""
    full = render(tok, messages)
    blocks: list[int] = []  # end offset of each message's rendered block
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for k, msg in enumerate(messages):
        rendered = render(tok, messages[: k + 1])
        if not full.startswith(rendered):
            raise TemplateMismatch("the chat template does not render conversations prefix by prefix")
        delta = rendered[prev_end:]
        # The content follows the role header, so the last occurrence in this block is it.
        pos = delta.rfind(msg["content"])
        if pos < 0:
            raise TemplateMismatch(f"message {k} ({msg['role']}) is not rendered verbatim by the chat template")
        spans.append((prev_end + pos, prev_end + pos + len(msg["content"])))
        prev_end = len(rendered)
        blocks.append(prev_end)

    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids)
    n = len(ids)
    last = len(messages) - 1
    out: dict[str, list] = {
        k: []
        for k in (
            "token_pos",
            "token_id",
            "token_text",
            "role",
            "msg_index",
            "is_supervised",
            "rel_pos",
            "char_start",
            "char_end",
        )
    }
    block = 0
    closed_final = False
    for i, (tid, (s, e)) in enumerate(zip(ids, offsets, strict=False)):
        while block < last and s >= blocks[block]:
            block += 1
        c0, c1 = spans[block]
        inside = tid not in special and s < c1 and e > c0 and c1 > c0
        if inside:
            role = messages[block]["role"]
            cs, ce = max(s, c0) - c0, min(e, c1) - c0
        else:
            role = "special" if tid in special else "template"
            cs = ce = -1
        sup = block == last and messages[last]["role"] == "assistant" and inside
        if block == last and tid in special and s >= c1 and not closed_final and messages[last]["role"] == "assistant":
            sup, closed_final = True, True
        out["token_pos"].append(i)
        out["token_id"].append(int(tid))
        out["token_text"].append(full[s:e])
        out["role"].append(role)
        out["msg_index"].append(block)
        out["is_supervised"].append(sup)
        out["rel_pos"].append(i / (n - 1) if n > 1 else 0.0)
        out["char_start"].append(cs)
        out["char_end"].append(ce)
    return out


def tokenize_rows(tok: Any, row_ids: list[str], messages: list[list[dict]]) -> pa.Table:
    """Tokenize many rows into one table (columns of `store.catalog.tokens.TOKENS_SCHEMA` less
    tokenization and tok_index)."""
    cols: dict[str, list] = {}
    rids: list[str] = []
    for rid, msgs in zip(row_ids, messages, strict=False):
        t = tokenize_conversation(tok, msgs)
        rids.extend([rid] * len(t["token_pos"]))
        for k, v in t.items():
            cols.setdefault(k, []).extend(v)
    return pa.table(
        {
            "row_id": pa.array(rids, pa.string()),
            "token_pos": pa.array(cols.get("token_pos", []), pa.int32()),
            "token_id": pa.array(cols.get("token_id", []), pa.int32()),
            "token_text": pa.array(cols.get("token_text", []), pa.string()),
            "role": pa.array(cols.get("role", []), pa.string()),
            "msg_index": pa.array(cols.get("msg_index", []), pa.int16()),
            "is_supervised": pa.array(cols.get("is_supervised", []), pa.bool_()),
            "rel_pos": pa.array(cols.get("rel_pos", []), pa.float32()),
            "char_start": pa.array(cols.get("char_start", []), pa.int32()),
            "char_end": pa.array(cols.get("char_end", []), pa.int32()),
        }
    )


def count_tokens(tok: Any, messages: list[dict]) -> int:
    return len(tok(render(tok, messages), add_special_tokens=False)["input_ids"])


def ensure_tokenization(
    store: Any, tok: Any, model_id: str, unit_tokens: int, rank: int = 0, progress: bool = True, batch_rows: int = 1000
) -> Any:
    """The store's tokenization (a store.catalog.tokens.Layout) for this tokenizer, created on first
    use by rank 0 (other ranks wait for it), `batch_rows` rows at a time. A store holds one
    tokenization."""

    from extractors.units import wait_for  # lazy: extractors.units loads torch and zarr, which ingest never needs

    ingest_id = store.query("SELECT ingest_id FROM manifests").column(0)[0].as_py()
    tz = "tok-" + hashlib.sha256(f"{tokenizer_hash(tok)}:{ingest_id}".encode()).hexdigest()[:12]

    def existing() -> Any:
        have = tokenizations(store)
        if any(t["tokenization"] == tz for t in have):
            return read_layout(store, tz)
        if have:
            raise StoreError(
                f"{store.root} is tokenized for {have[0]['model']} ({have[0]['tokenization']}); "
                f"{model_id} tokenizes differently. Use another --store for this model."
            )
        return None

    if (layout := existing()) is not None:
        return layout
    if rank != 0:
        wait_for(lambda: any(t["tokenization"] == tz for t in tokenizations(store)), f"tokenization {tz}")
        return read_layout(store, tz)
    with claims.exclusive(store, "setup", "tokenize"):  # another writer's tokenization: wait for it
        if (layout := existing()) is not None:
            return layout
        return _tokenize(store, tok, model_id, unit_tokens, tz, ingest_id, progress, batch_rows)


def _tokenize(
    store: Any,
    tok: Any,
    model_id: str,
    unit_tokens: int,
    tz: str,
    ingest_id: str,
    progress: bool,
    batch_rows: int = 1000,
) -> Any:
    """Tokenize every row in batches of `batch_rows`, streamed: each batch's tokens go to a
    temporary Parquet file, the layout is planned from the per-row counts (the running sum
    needs nothing else), then each file gets its tok_index and becomes one part of `tokens`
    (store.catalog.tokens.write_tokenization). Memory holds one batch plus ~100 bytes per row."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    planned: list[tuple[str, str, int]] = []
    con = store.connect()
    with scratch(store, "tokenize") as tmp:
        parts: list[Path] = []
        try:
            n_rows = con.sql("SELECT count(*) FROM rows").fetchall()[0][0]
            reader = con.sql("SELECT row_id, split, messages FROM rows").fetch_record_batch(batch_rows)
            with tqdm(total=n_rows, desc="tokenize", unit="row", disable=not progress) as bar:
                for batch in reader:
                    ids, splits = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                    table = tokenize_rows(tok, ids, batch.column(2).to_pylist())
                    counts = dict.fromkeys(ids, 0)
                    for r, c in zip(*table.group_by("row_id").aggregate([("row_id", "count")]).columns, strict=False):
                        counts[r.as_py()] = c.as_py()
                    planned.extend((r, sp, counts[r]) for r, sp in zip(ids, splits, strict=False))
                    parts.append(Path(tmp) / f"{len(parts):05d}.parquet")
                    pq.write_table(table, parts[-1])
                    bar.update(len(ids))
        finally:
            con.close()
        layout = plan_layout(tz, planned, unit_tokens)
        del planned
        write_tokenization(
            store, layout, parts, {"model": model_id, "tokenizer_hash": tokenizer_hash(tok), "ingest_id": ingest_id}
        )
    store.refresh_catalog()
    return layout
