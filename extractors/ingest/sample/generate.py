"""Deterministic synthetic chat sample in the SmolTalk ``smol-magpie-ultra`` schema.

This is the project's embedded default dataset (no network).  It is built for
SmolLM2-135M-Instruct activation extraction: conversations are short, and every
metadata field is *measurable from the text*, so linear probes and SAE-feature
correlations have real signal to find.  This module assembles conversations
(preambles, needles, malformed rows); the per-category generators are in
``sample_categories`` and their word lists in ``sample_words``.

Schema
------
``generate_sample(seed, n_train, n_test, with_malformed)`` returns
``{"train": [...], "test": [...]}``; each record is a dict with exactly:

* ``messages``: list of ``{"role": "system"|"user"|"assistant", "content": str}``.
  About 25% start with a short system turn, then 1-3 user/assistant exchanges
  (mostly 3).  The last message of a clean row is always the assistant's.  User
  turns are ~8-30 words, assistant turns ~15-60 words, a whole conversation is
  typically 400-1100 characters.
* ``category`` (one of ``CATEGORIES``), ``difficulty`` (``DIFFICULTIES``),
  ``quality`` (``QUALITIES``).
* ``reward_model_score`` = ``{very poor: 0, poor: 1, average: 2, good: 3,
  excellent: 4}[quality] + gauss(0, 0.5)``, rounded to 4 decimals.
* ``conversation_tokens`` = ``round(total_chars / 4)`` over all message
  contents.  This is only an estimate; the real count is taken downstream with
  the model tokenizer.
* ``needle`` / ``needle_start`` / ``needle_end``: an off-topic trivia sentence
  and its exact char offsets inside the FINAL assistant message
  (``content[needle_start:needle_end] == needle``), or all three ``None``.
* ``answer_correct``: bool ground truth for checkable categories (math, coding,
  reasoning, data-analysis); ``None`` elsewhere.

Rules that make the metadata measurable (the final exchange is the graded one;
earlier exchanges are short, always-fine preambles on the same topic)
----------------------------------------------------------------------------
* math: chained arithmetic word problem ("Maya has 23 marbles, gets 15 more,
  then gives away 8.").  The story is one sentence of comma-separated clauses,
  one number per clause, so the true answer can be re-derived from the text.
  The assistant states "... the answer is N."  About 35% are wrong (a wrong
  operation in one step, or an arithmetic slip in the last step).
  difficulty: ``very hard`` if >= 4 operations or numbers with >= 3 digits,
  otherwise ``(ops - 1) + (digits - 1)``.
* coding: a small Python function; correct, or with one bug (off-by-one range,
  wrong operator, missing return).  difficulty = number of extra requirements
  (type hints, docstring, function name, parameter name), each honoured in the
  code.
* reasoning: ordering puzzles ("A is taller than B ..."; difficulty = people - 2),
  "which is larger: a × b or c" (1-digit very easy, 2-digit medium) and
  "what comes next" sequences (constant step < big step < ratio < growing step
  < sum-of-two); the answer is right or wrong.
* data-analysis: total / average / range / highest of 3-7 values;
  difficulty = (values - 3) + (digits - 1), capped at very hard.
* Quality for those four: correct + working + a check -> excellent, correct +
  working -> good, correct but terse -> average, wrong + working -> poor,
  wrong and terse -> very poor.
* open categories (information-seeking, creative-writing, advice-seeking,
  planning, brainstorming, role-playing): the user asks for N items with 0-4
  constraints; difficulty = number of constraints (0 very easy ... 4 very
  hard).  good = exactly N items, with the opener and one item naming the
  subject; excellent = good + a closing sentence honouring a constraint;
  average = fewer than N generic items under a generic opener (subject not
  named); poor = vague / evasive ("it depends"); very poor = off-topic.
* editing: a sentence with 1-3 injected grammar errors (+0-2 constraints;
  difficulty = errors - 1 + constraints).  excellent = fully corrected + list of
  fixes, good = fully corrected, average = one error left, poor = unchanged,
  very poor = off-topic.

Needles
-------
In ``NEEDLE_FRACTION`` of clean rows (exactly ``round(n * NEEDLE_FRACTION)`` per
split) one trivia sentence that shares no content word with the conversation is
inserted into the final assistant message at a sentence boundary (start, middle
or end).  Needles never change the labels.

Malformed rows (``with_malformed=True``)
----------------------------------------
Appended after the clean rows, so the clean counts stay ``n_train``/``n_test``.
Train gets exactly these 7, in order: (1) exact duplicate of an earlier clean
train row (one without a needle), (2) final assistant content ``""``,
(3) final assistant content whitespace only, (4) conversation ending with a
user turn, (5) a message whose content is the int ``42``, (6) a message with
no ``"content"`` key, (7) final assistant turn over 12,000 characters.  Test
gets one duplicate of an earlier test row.  Malformed rows keep valid metadata
and have needle fields ``None``.  (The duplicates need at least one clean row.)

Determinism: each split uses its own ``random.Random(f"{seed}:{split}")``
stream (no ``hash()``, global state, time or set order).  Clean conversations
are unique within and across splits (collisions are re-drawn).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator

from extractors.ingest.sample.categories import GENERATORS, Draft
from extractors.ingest.sample.words import FOLLOW_UPS, GENERIC_PRE, LEAD_INS, NEEDLES, SYSTEM_PROMPTS

CATEGORIES: tuple[str, ...] = (
    "math",
    "coding",
    "reasoning",
    "data-analysis",
    "information-seeking",
    "creative-writing",
    "advice-seeking",
    "editing",
    "planning",
    "brainstorming",
    "role-playing",
)
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
QUALITIES = ("very poor", "poor", "average", "good", "excellent")
NEEDLE_FRACTION: float = 0.25
REWARD_BASE = {"very poor": 0.0, "poor": 1.0, "average": 2.0, "good": 3.0, "excellent": 4.0}
LONG_CHARS = 14_000  # length of the over-long malformed final turn (> 12,000)


# ----------------------------------------------------------------------------- assembly
_BOUNDARY = re.compile(r"[.!?][\"')]?[ \n]+(?=[A-Z])")
_WORD = re.compile(r"[a-z]{5,}")


def _insert_needle(rng: random.Random, text: str, conv_text: str) -> tuple[str, str, int]:
    """Insert an unrelated trivia sentence at a sentence boundary; return (text, needle, start)."""
    conv_words = set(_WORD.findall(conv_text.lower()))
    pool = [n for n in NEEDLES if not set(_WORD.findall(n.lower())) & conv_words] or list(NEEDLES)
    needle = rng.choice(pool)
    fences = [m.span() for m in re.finditer(r"```.*?```", text, re.S)]
    cuts = [m.end() for m in _BOUNDARY.finditer(text) if not any(a <= m.start() < b for a, b in fences)]
    where = rng.choice(("start", "middle", "end"))
    if where == "middle" and cuts:
        b = rng.choice(cuts)
        return text[:b] + needle + " " + text[b:], needle, b
    if where == "end" or (where == "middle" and rng.random() < 0.5):
        sep = "\n" if text.endswith("```") else " "
        return text + sep + needle, needle, len(text) + 1
    return needle + " " + text, needle, 0


def _record(messages: list, category: str, draft: Draft, score: float, needle: tuple | None = None) -> dict:
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return {
        "messages": messages,
        "category": category,
        "difficulty": DIFFICULTIES[draft.difficulty],
        "quality": draft.quality,
        "reward_model_score": score,
        "conversation_tokens": round(chars / 4),
        "needle": needle[0] if needle else None,
        "needle_start": needle[1] if needle else None,
        "needle_end": needle[2] if needle else None,
        "answer_correct": draft.correct,
    }


def _conversation(rng: random.Random, category: str, with_needle: bool) -> dict:
    draft = GENERATORS[category](rng)
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_pre = rng.choices((0, 1, 2), (8, 22, 70))[0]
    for u, a in rng.sample(draft.pre + list(GENERIC_PRE), n_pre):
        if rng.random() < 0.6:
            a += " " + rng.choice(FOLLOW_UPS)
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    lead = rng.choice(LEAD_INS) + " " if n_pre and rng.random() < 0.35 else ""
    lead = lead if len(draft.user.split()) <= 30 else ""  # keep long requests under ~50 words
    messages.append({"role": "user", "content": lead + draft.user})
    answer, needle = draft.answer, None
    if with_needle:
        context = " ".join(m["content"] for m in messages) + " " + answer
        answer, text, start = _insert_needle(rng, answer, context)
        needle = (text, start, start + len(text))
    messages.append({"role": "assistant", "content": answer})
    score = round(REWARD_BASE[draft.quality] + rng.gauss(0.0, 0.5), 4)
    return _record(messages, category, draft, score, needle)


def _key(rec: dict) -> bytes:
    # A 16-byte digest, not the text: the 431k-conversation scale mode keeps one per row.
    text = json.dumps([[m["role"], m["content"]] for m in rec["messages"]])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _clean_split(rng: random.Random, n: int, seen: set) -> Iterator[dict]:
    needle_rows = set(rng.sample(range(n), round(n * NEEDLE_FRACTION)))
    order: list[str] = []
    for i in range(n):
        if not order:  # balanced blocks: every category once per block, shuffled
            order = list(CATEGORIES)
            rng.shuffle(order)
        category = order.pop()
        for _ in range(1000):
            rec = _conversation(rng, category, i in needle_rows)
            if _key(rec) not in seen:
                break
        else:  # pragma: no cover - pools are far larger than any sensible n
            raise RuntimeError("could not draw a unique conversation")
        seen.add(_key(rec))
        yield rec


def _fresh(rng: random.Random, seen: set) -> dict:
    while True:
        rec = _conversation(rng, rng.choice(CATEGORIES), False)
        if _key(rec) not in seen:
            seen.add(_key(rec))
            return rec


def _duplicate_pick(rng: random.Random, n: int) -> int | None:
    """Which clean row of a split of `n` the malformed duplicate copies: the index among its
    needle-free rows (among all rows when every row has a needle), or None for an empty split.
    Drawn first from the split's malformed RNG, so the clean rows can stream past."""
    plain = n - round(n * NEEDLE_FRACTION)
    return rng.choice(range(plain or n)) if n else None


def _copy(rec: dict | None) -> list[dict]:
    return [] if rec is None else [{**rec, "messages": [dict(m) for m in rec["messages"]]}]


def _with_messages(rec: dict, messages: list) -> dict:
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return {**rec, "messages": messages, "conversation_tokens": round(chars / 4)}


def _malformed_train(rng: random.Random, duplicate: dict | None, seen: set) -> list[dict]:
    out = _copy(duplicate)  # 1 exact duplicate
    for final in ("", "  \n "):  # 2 empty, 3 whitespace
        rec = _fresh(rng, seen)
        out.append(_with_messages(rec, rec["messages"][:-1] + [{"role": "assistant", "content": final}]))
    rec = _fresh(rng, seen)  # 4 ends with a user turn
    out.append(_with_messages(rec, rec["messages"][:-1]))
    rec = _fresh(rng, seen)  # 5 non-string content
    msgs = [dict(m) for m in rec["messages"]]
    msgs[-2]["content"] = 42
    out.append(_with_messages(rec, msgs))
    rec = _fresh(rng, seen)  # 6 missing "content" key
    msgs = [dict(m) for m in rec["messages"]]
    del msgs[-2]["content"]
    out.append(_with_messages(rec, msgs))
    rec = _fresh(rng, seen)  # 7 over-long final turn
    base = rec["messages"][-1]["content"]
    long = "\n\n".join([base] * (LONG_CHARS // (len(base) + 2) + 1))
    out.append(_with_messages(rec, rec["messages"][:-1] + [{"role": "assistant", "content": long}]))
    return out


def _stream_split(rng: random.Random, n: int, seen: set, pick: int | None, grab: list) -> Iterator[dict]:
    """The clean rows of a split; the needle-free row number `pick` is also appended to `grab`."""
    any_plain = n - round(n * NEEDLE_FRACTION) > 0
    k = 0
    for rec in _clean_split(rng, n, seen):
        if pick is not None and (rec["needle"] is None or not any_plain):
            if k == pick:
                grab.append(rec)
            k += 1
        yield rec


def iter_sample(
    seed: int = 0, n_train: int = 1000, n_test: int = 250, with_malformed: bool = True
) -> Iterator[tuple[str, dict]]:
    """(split, record) pairs of `generate_sample`, streamed: train's clean rows, test's clean
    rows, then train's malformed rows and test's duplicate. Memory stays at a 16-byte digest
    per conversation (the uniqueness check), whatever the size."""
    seen: set = set()
    rng_tm, rng_dm = random.Random(f"{seed}:train:malformed"), random.Random(f"{seed}:test:malformed")
    pick_train = _duplicate_pick(rng_tm, n_train) if with_malformed else None
    pick_test = _duplicate_pick(rng_dm, n_test) if with_malformed else None
    dup_train: list[dict] = []
    dup_test: list[dict] = []
    for rec in _stream_split(random.Random(f"{seed}:train"), n_train, seen, pick_train, dup_train):
        yield "train", rec
    for rec in _stream_split(random.Random(f"{seed}:test"), n_test, seen, pick_test, dup_test):
        yield "test", rec
    if with_malformed:
        for rec in _malformed_train(rng_tm, dup_train[0] if dup_train else None, seen):
            yield "train", rec
        for rec in _copy(dup_test[0] if dup_test else None):
            yield "test", rec


def generate_sample(
    seed: int = 0, n_train: int = 1000, n_test: int = 250, with_malformed: bool = True
) -> dict[str, list[dict]]:
    """Return {"train": [...], "test": [...]} (see the module docstring for the schema)."""
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for split, rec in iter_sample(seed, n_train, n_test, with_malformed):
        out[split].append(rec)
    return out
