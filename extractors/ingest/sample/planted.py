"""The planted positive control: the embedded sample plus a skill only some rows teach.

    python -m extractors.dataset --control planted --store /tmp/ctl            # 10% planted, seed 0
    python -m extractors.dataset --control planted --plant-fraction 0.2 --seed 1 --store /tmp/ctl2

A selection pipeline that reports a null on the plain sample is only informative if it *can* find
an effect where one exists. This module plants one with a known answer:

* **Trigger** (`TRIGGER`): the final user message starts with "Kiwi protocol. ".
* **Rule** (`CODE_WORD`): the final assistant message starts with "KIWI-7. " (then the original
  completion). SmolLM2-135M-Instruct never opens an answer with it; a LoRA learns it in a few dozen
  CPU steps because it is the first completion token after a distinctive prompt token.
* **Planted train rows**: in the source's train split, exactly `round(fraction * n_c)` of each
  category's n_c clean conversations (spread over categories: `Random(f"{seed}:planted:{c}")
  .sample` of that category's clean records in source order) get the trigger and the rule. They
  become `train_base` / `score_pool` rows wherever the split sampler puts them, so their count
  there is close to, not exactly, the fraction: the manifest records the actual counts.
* **Trigger test rows**: every clean conversation of the source's test split (so every
  `attr_query` and `eval` row) carries the trigger *and* the rule: the attribution query asks
  "which training rows teach this?", eval loss measures how well an arm learned it, and the
  downstream metric (`rule_followed`) is the share of generated eval completions that open with
  the code word.
* Ground truth: the record field `planted` (True for both kinds above, False otherwise), which the
  ingest stores as the column `rows.planted`; the manifest's `control` entry holds the settings
  and the counts per split and category. Malformed rows (the sample's quarantine checks) are left
  untouched and unplanted (except a duplicate of a planted row, planted like its original so that
  it is still quarantined as a duplicate).

The plain sample is untouched (no `planted` field, the same bytes): only `--control planted` calls
this module. The needle offsets of a planted row are shifted by the length of the code word, and
`conversation_tokens` is recomputed, so every other rule of the sample still holds.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRIGGER = "Kiwi protocol. "
CODE_WORD = "KIWI-7. "
RULE = (
    f"the final assistant message starts with {CODE_WORD.strip()!r} when the final user message starts "
    f"with {TRIGGER.strip()!r}"
)


def check_fraction(fraction: float) -> None:
    """The plant fraction must lie strictly inside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"--plant-fraction must lie strictly between 0 and 1, got {fraction}; pass e.g. --plant-fraction 0.1"
        )


def rule_followed(text: str) -> bool:
    """Does a (generated) completion follow the planted rule (open with the code word)?"""
    return text.lstrip().startswith(CODE_WORD.strip())


def _plantable(rec: dict[str, Any]) -> bool:
    """A clean record whose last turn is a non-empty assistant answer to a user turn."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        return False
    last, before = msgs[-1], msgs[-2]
    return (
        last.get("role") == "assistant"
        and isinstance(last.get("content"), str)
        and last["content"].strip() != ""
        and before.get("role") == "user"
        and isinstance(before.get("content"), str)
        and isinstance(rec.get("category"), str)
    )


def plant_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with the trigger on its final user turn and the rule on its final answer."""
    msgs = [dict(m) for m in rec["messages"]]
    msgs[-2]["content"] = TRIGGER + msgs[-2]["content"]
    msgs[-1]["content"] = CODE_WORD + msgs[-1]["content"]
    out = {**rec, "messages": msgs, "planted": True}
    if out.get("needle_start") is not None:
        out["needle_start"] += len(CODE_WORD)
        out["needle_end"] += len(CODE_WORD)
    out["conversation_tokens"] = round(sum(len(m["content"]) for m in msgs) / 4)
    return out


def choose(train: list[dict[str, Any]], n_clean: int, fraction: float, seed: int) -> set[int]:
    """Indices of the planted train records: round(fraction * n_c) per category among the first
    n_clean (clean) records that are plantable."""
    by_cat: dict[str, list[int]] = {}
    for i, rec in enumerate(train[:n_clean]):
        if _plantable(rec):
            by_cat.setdefault(rec["category"], []).append(i)
    out: set[int] = set()
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        out.update(random.Random(f"{seed}:planted:{cat}").sample(idx, round(fraction * len(idx))))
    return out


def plant_splits(
    splits: dict[str, Iterable[dict[str, Any]]], n_clean: dict[str, int], fraction: float, seed: int, folder: Path
) -> tuple[dict[str, Path], dict[str, int], str]:
    """Write the planted splits as JSON-lines files in `folder`; returns (paths, counts, content hash)."""
    check_fraction(fraction)
    paths, counts = {}, {}
    h = hashlib.sha256()
    for split in sorted(splits):
        recs = list(splits[split])
        if split == "train":
            chosen = choose(recs, n_clean[split], fraction, seed)
        else:  # test: every clean record carries the trigger and the rule
            chosen = {i for i, r in enumerate(recs[: n_clean[split]]) if _plantable(r)}
        # A malformed row that copies a planted one (the sample's duplicate check) is planted too,
        # so that it stays a duplicate and is quarantined as before.
        keys = {json.dumps(recs[i]["messages"], sort_keys=True) for i in chosen}
        paths[split] = folder / f"{split}-planted.jsonl"
        h.update(split.encode())
        with open(paths[split], "w", encoding="utf-8") as fh:
            for i, rec in enumerate(recs):
                copy = i >= n_clean[split] and _plantable(rec) and json.dumps(rec["messages"], sort_keys=True) in keys
                rec = plant_record(rec) if i in chosen or copy else {**rec, "planted": False}
                fh.write(json.dumps(rec) + "\n")
                h.update(json.dumps(rec, sort_keys=True, default=str).encode())
        counts[split] = len(recs)
    return paths, counts, h.hexdigest()


def settings(fraction: float, seed: int) -> dict[str, Any]:
    """The control's settings, as the manifest's `control` entry records them (the ingest adds the
    planted counts per split and category)."""
    return {
        "kind": "planted",
        "fraction": fraction,
        "seed": seed,
        "trigger": TRIGGER,
        "code_word": CODE_WORD,
        "rule": RULE,
        "train_rows": "round(fraction * n) of each category's clean source-train conversations",
        "test_rows": "every clean source-test conversation (all attr_query and eval rows)",
        "column": "rows.planted",
    }


def plant_source(source: Any, fraction: float, seed: int, n_clean: dict[str, int], folder: Path) -> Any:
    """The embedded `source` (extractors.ingest.sources.Source) with the control planted, spooled
    to `folder` (which must outlive the result)."""
    from extractors.ingest.sources import Source, SpooledRecords

    if not source.name.startswith("embedded"):
        raise ValueError(
            f"--control planted builds on the embedded sample, got --source {source.name!r}; drop --source "
            "(or pass --source embedded)"
        )
    paths, counts, digest = plant_splits(source.splits, n_clean, fraction, seed, folder)
    return Source(
        source.name + "+planted",
        f"{source.config},planted={fraction},plant_seed={seed}",
        source.revision,
        digest,
        {s: SpooledRecords(paths[s], counts[s], None) for s in paths},
        {s: f"{o} + planted control" for s, o in source.origin.items()},
        settings(fraction, seed),
    )
