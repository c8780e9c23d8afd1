"""Checking answers to the embedded sample's math word problems.

A problem's story is one sentence "NAME has N OBJ, gets 5 more, gives away 3, then splits
them into 2 equal piles and keeps one." (extractors.ingest.sample.words.MATH_FRAGS): the
start number, then one clause per operation with one number, so the true answer can be
recomputed from the question alone. A generated answer counts as its last "answer is N"
(the sample's own phrasing), else the last integer it contains.
"""

from __future__ import annotations

import re

_OPS = (
    ("+", r"\bmore\b"),
    ("-", r"\b(?:away|loses|sells|uses up)\b"),
    ("×", r"\b(?:times|each one for|multiplies)\b"),
    ("÷", r"\b(?:equal|evenly|equally)\b"),
)


def _apply(op: str, x: int, n: int) -> int | None:
    if op == "÷":
        return x // n if n and x % n == 0 else None
    return x + n if op == "+" else x - n if op == "-" else x * n


def true_answer(question: str) -> int | None:
    """The answer recomputed from the question's story, or None when it does not parse."""
    story = next((s for s in re.split(r"(?<=[.?!:])\s+", question) if re.search(r"\d", s)), None)
    if story is None:
        return None
    clauses = story.rstrip(".").split(", ")
    m = re.search(r"\d+", clauses[0])
    if m is None:
        return None
    x: int | None = int(m.group())
    for clause in clauses[1:]:
        nums = re.findall(r"\d+", clause)
        ops = [op for op, pat in _OPS if re.search(pat, clause)]
        if len(nums) != 1 or len(ops) != 1 or x is None:
            return None
        x = _apply(ops[0], x, int(nums[0]))
    return x


def stated_answer(text: str) -> int | None:
    """The number a completion gives as its answer (None when it gives none)."""
    found = re.findall(r"answer is\s*\**\s*(-?\d[\d,]*)", text)
    if not found:
        found = re.findall(r"-?\d[\d,]*", text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None
