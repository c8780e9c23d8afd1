"""Ingest: a source's conversations become the store's `rows`, with splits and a manifest.

`ingest()` runs these steps in order, each a function here (every rejected row is kept in
`quarantine` with its reason; none is dropped):

1. `flatten_and_quarantine`: loose types are repaired and counted, unreadable lines and
   unusable metadata quarantined (`unreadable_record`, `bad_metadata`: see
   extractors.ingest.records); prompt = every turn before the final assistant turn,
   completion = that turn; reasons `malformed_messages`, `unknown_role`, `missing_content`,
   `non_string_content`, `no_final_assistant`, `empty_completion`, `empty_prompt`; then
   `duplicate_conversation`: exact repeats of an earlier conversation (first kept); then
   `over_token_cap`: the rendered conversation has more than `max_conversation_tokens`
   tokens of the model's tokenizer (rows are never truncated);
2. `assign_splits` (the four splits of our users' first milestone, "M1"): `train_base`
   sampled from the source's train split,
   `attr_query` and `eval` from its test split (disjoint), each stratified by category with
   a deterministic per-category order (row_ids sorted, then shuffled with a seeded RNG per
   split and category); `score_pool` = the train_base rows. With no test split, one is
   carved deterministically from train (stratified) and the manifest says so;
3. `build_manifest`, then `write_ingest`: rows (streamed in batches from a second pass over
   the source: `extractors.ingest.rows_writer`), split members, quarantine, and last the
   manifest, whose presence marks a complete ingest.

Rows with null metadata are kept. `row_id` is a content hash of the messages, so it is
stable across re-ingests; `group_id = category::difficulty::source_split::row_local_index`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
from tqdm.auto import tqdm

from extractors.chat_tokens import count_tokens
from extractors.ingest.records import coerce
from extractors.ingest.rows_writer import source_split_order, write_rows_table
from extractors.ingest.sources import METADATA_COLUMNS, Source
from store.core import Store, StoreError

SPLITS = ("train_base", "attr_query", "eval")
ROLES = ("system", "user", "assistant")
_MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ROWS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("source_split", pa.string()),
        ("source_index", pa.int64()),
        ("group_id", pa.string()),
        ("prompt", _MSG),
        ("completion", pa.string()),
        ("messages", _MSG),
        ("n_turns", pa.int32()),
        ("category", pa.string()),
        ("difficulty", pa.string()),
        ("quality", pa.string()),
        ("reward_model_score", pa.float64()),
        ("conversation_tokens", pa.int64()),
        ("n_tokens", pa.int32()),
    ]
)
EMBEDDED_SIZES = {"train_base": 600, "attr_query": 100, "eval": 100}
SMOLTALK_SIZES = {"train_base": 8000, "attr_query": 500, "eval": 500}


class IngestError(ValueError):
    """The ingest cannot satisfy what was asked; the message says what the source can give."""


@dataclass
class Quarantined:
    source_split: str
    source_index: int
    reason: str
    detail: str
    record: dict[str, Any] = field(repr=False)


@dataclass
class IngestResult:
    ingest_id: str
    sizes: dict[str, int]
    quarantined: dict[str, int]
    manifest: dict[str, Any]
    skipped: bool = False


class Kept(NamedTuple):
    """A row that passed step 1, as compact as split assignment needs (the full row is
    rebuilt from the source when it is written: see extractors.ingest.rows_writer)."""

    row_id: str
    category: str | None
    source_split: str
    source_index: int
    n_tokens: int
    planted: bool = False  # the planted control's ground truth (extractors.ingest.sample.planted)


class Flattened(NamedTuple):
    """What `flatten_and_quarantine` keeps and rejects."""

    kept: dict[str, list[Kept]]  # source split -> kept rows, in source order
    quarantine: list[Quarantined]
    stats: dict[str, Any]  # the manifest's filter_stats


class Assigned(NamedTuple):
    """What `assign_splits` chose."""

    chosen: dict[str, list[Kept]]  # split -> rows
    test_note: str  # where attr_query and eval came from, for the manifest


def conversation_key(messages: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def make_row_id(key: str) -> str:
    """The row id of the conversation whose `conversation_key` is `key`."""
    return "r" + hashlib.sha256(key.encode()).hexdigest()[:16]


def flatten(rec: dict[str, Any]) -> tuple[str, str] | dict[str, Any]:
    """The flattened row, or (reason, detail) when the record must be quarantined."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return "malformed_messages", "messages must be a non-empty list of {role, content}"
    for i, m in enumerate(msgs):
        if "content" not in m or m["content"] is None:
            return "missing_content", f"message {i} has no content"
        if not isinstance(m["content"], str):
            return "non_string_content", f"message {i} content is {type(m['content']).__name__}, not str"
        if m.get("role") not in ROLES:
            return "unknown_role", f"message {i} role is {m.get('role')!r}, not one of {ROLES}"
    if msgs[-1]["role"] != "assistant":
        return "no_final_assistant", f"the last turn is {msgs[-1]['role']!r}"
    if not msgs[-1]["content"].strip():
        return "empty_completion", "the final assistant turn is empty or whitespace"
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs[:-1]):
        return "empty_prompt", "no non-empty user turn before the final assistant turn"
    messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return {
        "messages": messages,
        "prompt": messages[:-1],
        "completion": messages[-1]["content"],
        "n_turns": len(messages),
    }


def _scalar_extras(rec: dict[str, Any]) -> dict[str, Any]:
    known = {"messages", *METADATA_COLUMNS}
    return {k: v for k, v in rec.items() if k not in known and (v is None or isinstance(v, (str, int, float, bool)))}


def stratified_take(rows: list[Kept], n: int, seed: int, label: str) -> list[Kept]:
    """n rows, proportional to category counts (largest remainder), in a seeded order."""
    by_cat: dict[str, list[Kept]] = {}
    for r in rows:
        by_cat.setdefault(r.category if r.category is not None else "", []).append(r)
    total = len(rows)
    quota = {c: n * len(v) // total for c, v in by_cat.items()}
    rest = n - sum(quota.values())
    order = sorted(by_cat, key=lambda c: (-(n * len(by_cat[c]) % total), c))
    for c in order[:rest]:
        quota[c] += 1
    out = []
    for c in sorted(by_cat):
        members = sorted(by_cat[c], key=lambda r: r.row_id)
        random.Random(f"{seed}:{label}:{c}").shuffle(members)
        out.extend(members[: quota[c]])
    return out


def _sizes_for(source: Source, requested: dict[str, int | None]) -> dict[str, int]:
    base = EMBEDDED_SIZES if source.name.startswith("embedded") else SMOLTALK_SIZES
    return {s: requested.get(s) if requested.get(s) is not None else base[s] for s in SPLITS}


def ingest_id_for(
    source: Source, want: dict[str, int], *, seed: int, max_conversation_tokens: int, tokenizer_id: str
) -> str:
    """The ingest's identity: a hash of the source content and every setting that shapes the rows."""
    ident = json.dumps(
        {
            "source": source.name,
            "config": source.config,
            "hash": source.content_hash,
            "seed": seed,
            "sizes": want,
            "cap": max_conversation_tokens,
            "tokenizer": tokenizer_id,
        },
        sort_keys=True,
    )
    return "ingest-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def existing_ingest(store: Store, ingest_id: str) -> IngestResult | None:
    """The earlier result when `store` already holds this ingest; raise if it holds another one."""
    if not store.has_table("manifests"):
        return None
    have = store.query("SELECT ingest_id, manifest FROM manifests").to_pylist()
    if have and have[0]["ingest_id"] == ingest_id:
        m = json.loads(have[0]["manifest"])
        return IngestResult(ingest_id, m["split_policy"]["sizes"], m["filter_stats"]["quarantined"], m, True)
    if have:
        raise StoreError(
            f"{store.root} already holds rows of {have[0]['ingest_id']} from another source or "
            f"split config; ingest into a new --store (this one is {ingest_id})"
        )
    return None


def conversation_digest(key: str) -> bytes:
    """16 bytes standing for a `conversation_key` in the repeat check (kept per row)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def flatten_and_quarantine(
    source_splits: dict[str, Iterable[dict]], tokenizer: Any, *, max_conversation_tokens: int, progress: bool = True
) -> Flattened:
    """Step 1: flatten every record, quarantining malformed ones, repeats and those over the token cap.

    Splits are visited train first, then the others by name, so the first copy of a repeated
    conversation is the one kept. The records stream past: what stays per row is a `Kept`
    and a 16-byte digest; quarantined records are kept whole (for the quarantine table)."""
    stats: dict[str, Any] = {"source_rows": {s: len(v) for s, v in source_splits.items()}}
    quarantine: list[Quarantined] = []
    seen: set[bytes] = set()
    kept: dict[str, list[Kept]] = {}
    after_flatten: Counter = Counter()
    after_dedup: Counter = Counter()
    after_cap: Counter = Counter()
    split_order = source_split_order(source_splits)
    total = sum(len(source_splits[s]) for s in split_order)
    bar = tqdm(total=total, desc="ingest", unit="row", disable=not progress)
    coerced: Counter = Counter()
    for ssplit in split_order:
        for idx, rec in enumerate(source_splits[ssplit]):
            bar.update(1)
            rec, fixed, bad = coerce(rec)
            coerced.update(fixed)
            flat = bad if bad is not None else flatten(rec)
            if isinstance(flat, tuple):
                quarantine.append(Quarantined(ssplit, idx, flat[0], flat[1], rec))
                continue
            after_flatten[ssplit] += 1
            ckey = conversation_key(flat["messages"])  # serialised once: the digest and the row id
            key = conversation_digest(ckey)
            if key in seen:
                quarantine.append(
                    Quarantined(ssplit, idx, "duplicate_conversation", f"same messages as row {make_row_id(ckey)}", rec)
                )
                continue
            seen.add(key)
            after_dedup[ssplit] += 1
            n_tok = count_tokens(tokenizer, flat["messages"])
            if n_tok > max_conversation_tokens:
                quarantine.append(
                    Quarantined(
                        ssplit,
                        idx,
                        "over_token_cap",
                        f"{n_tok} tokens > max_conversation_tokens {max_conversation_tokens}",
                        rec,
                    )
                )
                continue
            after_cap[ssplit] += 1
            kept.setdefault(ssplit, []).append(
                Kept(make_row_id(ckey), rec.get("category"), ssplit, idx, n_tok, rec.get("planted") is True)
            )
    bar.close()
    stats.update(
        coerced=dict(sorted(coerced.items())),
        after_flatten=dict(after_flatten),
        after_dedup=dict(after_dedup),
        after_token_cap=dict(after_cap),
        quarantined=dict(sorted(Counter(q.reason for q in quarantine).items())),
        quarantined_by_split={
            s: dict(Counter(q.reason for q in quarantine if q.source_split == s)) for s in split_order
        },
    )
    return Flattened(kept, quarantine, stats)


def assign_splits(kept: dict[str, list[dict]], want: dict[str, int], *, seed: int, source_has_test: bool) -> Assigned:
    """Step 2: sample train_base from train and disjoint attr_query, eval from test (see module doc).

    Without a test split in the source, attr_query + eval rows are first carved from train.
    Raises IngestError when a split asks for more rows than its pool has."""
    train = kept.get("train", [])
    test_note = "source test split"
    if not source_has_test:
        carved = want["attr_query"] + want["eval"]
        if len(train) < carved:
            raise IngestError(
                f"the source has no test split and only {len(train)} usable train rows; "
                f"cannot carve {carved} rows for attr_query + eval"
            )
        test = stratified_take(train, carved, seed, "carve_test")
        taken = {r.row_id for r in test}
        train = [r for r in train if r.row_id not in taken]
        test_note = f"carved: {carved} rows sampled from train, stratified by category (seed {seed})"
    else:
        test = kept.get("test", [])

    def take(pool: list[dict], split: str, where: str) -> list[dict]:
        if want[split] > len(pool):
            raise IngestError(
                f"{split}: {want[split]} rows requested but the source's {where} split has only "
                f"{len(pool)} usable rows after quarantine; pass --{split.replace('_', '-')} <= {len(pool)}"
            )
        return stratified_take(pool, want[split], seed, split)

    chosen = {"train_base": take(train, "train_base", "train")}
    chosen["attr_query"] = take(test, "attr_query", "test")
    used = {r.row_id for r in chosen["attr_query"]}
    chosen["eval"] = take([r for r in test if r.row_id not in used], "eval", "test (after attr_query)")
    check_splits(chosen)
    return Assigned(chosen, test_note)


def check_splits(chosen: dict[str, list[Kept]]) -> None:
    """The split rules of our users' first milestone ("M1"), enforced: raise, never warn.
    (Each row's own rules, a prompt, a completion and the metadata, are checked as it is
    written: `check_row`.)"""
    ids = {s: {r.row_id for r in v} for s, v in chosen.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = ids[a] & ids[b]
            if both:
                raise IngestError(f"splits {a} and {b} share {len(both)} row_ids, e.g. {sorted(both)[0]}")


def check_row(split: str, r: dict[str, Any]) -> None:
    if not r["completion"].strip() or not r["prompt"]:
        raise IngestError(f"{split}: row {r['row_id']} has an empty prompt or completion")
    missing = [c for c in METADATA_COLUMNS if c not in r]
    if missing:
        raise IngestError(f"{split}: row {r['row_id']} lacks metadata column(s) {missing}")


def _checked_row(split: str, ssplit: str, idx: int, rec: dict[str, Any], k: Kept) -> dict[str, Any]:
    row = {**full_row(ssplit, idx, rec, k), "split": split}
    check_row(split, row)
    return row


def full_row(ssplit: str, idx: int, rec: dict[str, Any], k: Kept) -> dict[str, Any]:
    """The `rows` row of a kept record (flattened again: the same result as in step 1)."""
    rec = coerce(rec)[0]
    flat = flatten(rec)
    meta = {c: rec.get(c) for c in METADATA_COLUMNS}
    return {
        "row_id": k.row_id,
        "source_split": ssplit,
        "source_index": idx,
        "group_id": f"{meta['category']}::{meta['difficulty']}::{ssplit}::{idx}",
        **flat,
        **meta,
        "n_tokens": k.n_tokens,
        **_scalar_extras(rec),
    }


def build_manifest(
    ingest_id: str,
    source: Source,
    *,
    tokenizer_id: str,
    max_conversation_tokens: int,
    seed: int,
    want: dict[str, int],
    assigned: Assigned,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The manifest: where the rows came from, how they were filtered and split, and the result
    (its `extra_columns` are filled in when the rows are written)."""
    chosen = assigned.chosen
    return {
        "ingest_id": ingest_id,
        "created_at": datetime.now(UTC).isoformat(),
        "dataset": {
            "source": source.name,
            "config": source.config,
            "revision": source.revision,
            "content_hash": source.content_hash,
            "files": source.origin,
        },
        "tokenizer": tokenizer_id,
        "max_conversation_tokens": max_conversation_tokens,
        "split_policy": {
            "seed": seed,
            "stratify_by": "category",
            "requested": want,
            "sizes": {s: len(chosen[s]) for s in SPLITS} | {"score_pool": len(chosen["train_base"])},
            "train_base_from": "source train split",
            "attr_query_eval_from": assigned.test_note,
            "score_pool": "the train_base rows",
            "order": "per category: row_ids sorted, then shuffled with Random(f'{seed}:{split}:{category}')",
        },
        "filter_stats": stats,
        "category_distribution": {s: dict(sorted(Counter(str(r.category) for r in chosen[s]).items())) for s in SPLITS},
        "extra_columns": [],
    } | ({"control": _control(source.control, chosen)} if source.control else {})


def _control(control: dict[str, Any], chosen: dict[str, list[Kept]]) -> dict[str, Any]:
    """The manifest's `control` entry: the source's settings and the planted rows per split."""
    per_split = {}
    for split in (*SPLITS, "score_pool"):
        hit = [r for r in chosen["train_base" if split == "score_pool" else split] if r.planted]
        per_split[split] = {
            "rows": len(chosen["train_base" if split == "score_pool" else split]),
            "planted": len(hit),
            "by_category": dict(sorted(Counter(str(r.category) for r in hit).items())),
        }
    return {**control, "splits": per_split}


def write_ingest(
    store: Store,
    source_splits: dict[str, Iterable[dict]],
    chosen: dict[str, list[Kept]],
    quarantine: list[Quarantined],
    manifest: dict,
    ingest_id: str,
    batch_rows: int,
) -> list[str]:
    """Step 3: write rows (streamed from the source: extractors.ingest.rows_writer), split_members
    and quarantine, then the manifest (which marks completion). Returns the extra columns."""
    now = datetime.now(UTC)
    extras = write_rows_table(
        store, source_splits, chosen, batch_rows, schema=ROWS_SCHEMA, splits=SPLITS, make_row=_checked_row
    )
    manifest["extra_columns"] = extras
    store.write_table(
        "split_members",
        pa.table(
            {
                "split": [s for s in (*SPLITS, "score_pool") for _ in chosen["train_base" if s == "score_pool" else s]],
                "row_id": [
                    r.row_id for s in (*SPLITS, "score_pool") for r in chosen["train_base" if s == "score_pool" else s]
                ],
            }
        ),
    )
    store.write_table(
        "quarantine",
        pa.table(
            {
                "ingest_id": pa.array([ingest_id] * len(quarantine), pa.string()),
                "source_split": pa.array([q.source_split for q in quarantine], pa.string()),
                "source_index": pa.array([q.source_index for q in quarantine], pa.int64()),
                "reason": pa.array([q.reason for q in quarantine], pa.string()),
                "detail": pa.array([q.detail for q in quarantine], pa.string()),
                "record": pa.array(
                    [json.dumps(q.record, ensure_ascii=False, default=str) for q in quarantine], pa.string()
                ),
                "quarantined_at": pa.array([now] * len(quarantine), pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    # The manifest goes last: its presence marks a complete ingest.
    store.write_rows(
        "manifests",
        [
            {
                "ingest_id": ingest_id,
                "created_at": now,
                "dataset": manifest["dataset"]["source"],
                "config": manifest["dataset"]["config"],
                "revision": manifest["dataset"]["revision"],
                "content_hash": manifest["dataset"]["content_hash"],
                "manifest": json.dumps(manifest, default=str),
            }
        ],
    )
    store.write_json(store.root / "manifest.json", manifest)
    store.refresh_catalog()


def ingest(
    store: Store,
    source: Source,
    tokenizer: Any,
    *,
    tokenizer_id: str,
    seed: int = 0,
    sizes: dict[str, int | None] | None = None,
    max_conversation_tokens: int = 2000,
    progress: bool = True,
    batch_rows: int = 10_000,
) -> IngestResult:
    """Flatten, quarantine, split and write rows + manifest into `store` (see module doc).

    The source is read twice, record by record (once to filter and split, once to write the
    chosen rows in batches of `batch_rows`), so memory holds one batch plus ~100 bytes per
    source row, whatever the size. A store that already holds this very ingest is left as it
    is (`skipped=True`)."""
    want = _sizes_for(source, sizes or {})
    if any(v < 0 for v in want.values()):
        raise IngestError(f"split sizes must be >= 0, got {want}")
    ingest_id = ingest_id_for(
        source, want, seed=seed, max_conversation_tokens=max_conversation_tokens, tokenizer_id=tokenizer_id
    )
    done = existing_ingest(store, ingest_id)
    if done is not None:
        return done
    flat = flatten_and_quarantine(
        dict(source.splits), tokenizer, max_conversation_tokens=max_conversation_tokens, progress=progress
    )
    assigned = assign_splits(flat.kept, want, seed=seed, source_has_test="test" in source.splits)
    manifest = build_manifest(
        ingest_id,
        source,
        tokenizer_id=tokenizer_id,
        max_conversation_tokens=max_conversation_tokens,
        seed=seed,
        want=want,
        assigned=assigned,
        stats=flat.stats,
    )
    write_ingest(store, dict(source.splits), assigned.chosen, flat.quarantine, manifest, ingest_id, batch_rows)
    return IngestResult(ingest_id, manifest["split_policy"]["sizes"], flat.stats["quarantined"], manifest)
