"""Tests for extractors.ingest.sample.generate: the embedded synthetic SmolTalk-style dataset.

Besides schema/determinism checks, these tests re-derive the metadata from the
text (math answers, data-analysis stats, coding behaviour, ordering puzzles,
item counts, constraint counts) to prove the labels are measurable signal.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from extractors.ingest.sample.generate import (
    CATEGORIES,
    DIFFICULTIES,
    NEEDLE_FRACTION,
    QUALITIES,
    generate_sample,
)

N_TRAIN, N_TEST = 1000, 250
KEYS = {
    "messages",
    "category",
    "difficulty",
    "quality",
    "reward_model_score",
    "conversation_tokens",
    "needle",
    "needle_start",
    "needle_end",
    "answer_correct",
}
CHECKABLE = {"math", "coding", "reasoning", "data-analysis"}
OPEN = {"information-seeking", "creative-writing", "advice-seeking", "planning", "brainstorming", "role-playing"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample():
    return generate_sample(seed=0)


@pytest.fixture(scope="module")
def clean(sample):
    return sample["train"][:N_TRAIN] + sample["test"][:N_TEST]


def _final(rec):
    return rec["messages"][-1]["content"]


def _final_user(rec):
    return rec["messages"][-2]["content"]


def _without_needle(rec):
    text = _final(rec)
    if rec["needle"] is None:
        return text
    return text[: rec["needle_start"]] + text[rec["needle_end"] :]


def _chars(rec):
    return sum(len(m["content"]) for m in rec["messages"])


def _pearson(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


# --------------------------------------------------------------------------- determinism, counts
def test_determinism_and_seed_sensitivity():
    a = generate_sample(seed=7, n_train=150, n_test=40)
    b = generate_sample(seed=7, n_train=150, n_test=40)
    c = generate_sample(seed=8, n_train=150, n_test=40)
    assert a == b
    assert a["train"] != c["train"] and a["test"] != c["test"]


def test_independent_of_pythonhashseed():
    code = (
        "import hashlib; from extractors.ingest.sample.generate import generate_sample; "
        "print(hashlib.sha256(repr(generate_sample(3, 60, 15)).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == hashlib.sha256(repr(generate_sample(3, 60, 15)).encode()).hexdigest()


def test_counts(sample):
    assert len(sample["train"]) == N_TRAIN + 7
    assert len(sample["test"]) == N_TEST + 1
    plain = generate_sample(seed=0, n_train=30, n_test=10, with_malformed=False)
    assert (len(plain["train"]), len(plain["test"])) == (30, 10)
    assert plain["train"] == generate_sample(seed=0, n_train=30, n_test=10)["train"][:30]


# --------------------------------------------------------------------------- schema and structure
def test_schema(sample):
    for rec in sample["train"] + sample["test"]:
        assert set(rec) == KEYS
        assert rec["category"] in CATEGORIES
        assert rec["difficulty"] in DIFFICULTIES and rec["quality"] in QUALITIES
        assert isinstance(rec["reward_model_score"], float)
        assert rec["reward_model_score"] == round(rec["reward_model_score"], 4)
        assert isinstance(rec["conversation_tokens"], int)
        if rec["category"] in CHECKABLE:
            assert isinstance(rec["answer_correct"], bool)
        else:
            assert rec["answer_correct"] is None
    for rec in sample["train"][:N_TRAIN] + sample["test"][:N_TEST]:
        assert rec["conversation_tokens"] == round(_chars(rec) / 4)


def test_category_coverage_and_balance(sample):
    assert len(CATEGORIES) >= 10 and len(set(CATEGORIES)) == len(CATEGORIES)
    for rows in (sample["train"][:N_TRAIN], sample["test"][:N_TEST]):
        counts = Counter(r["category"] for r in rows)
        assert set(counts) == set(CATEGORIES)
        expected = len(rows) / len(CATEGORIES)
        assert min(counts.values()) >= 0.8 * expected and max(counts.values()) <= 1.2 * expected


def test_turn_structure(clean):
    systems = 0
    exchanges = Counter()
    for rec in clean:
        msgs = rec["messages"]
        if msgs[0]["role"] == "system":
            systems += 1
            msgs = msgs[1:]
        assert len(msgs) % 2 == 0 and msgs[-1]["role"] == "assistant"
        for i, m in enumerate(msgs):
            assert set(m) == {"role", "content"}
            assert m["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(m["content"], str) and m["content"].strip()
        exchanges[len(msgs) // 2] += 1
    assert 0.18 <= systems / len(clean) <= 0.32
    assert set(exchanges) <= {1, 2, 3} and exchanges[3] > len(clean) / 2


def test_size_constraints(clean):
    totals = sorted(_chars(r) for r in clean)
    median = statistics.median(totals)
    assert 400 <= median <= 900
    assert totals[int(0.95 * len(totals))] <= 1100
    assert sum(400 <= t <= 1100 for t in totals) / len(totals) >= 0.8
    users = [len(m["content"].split()) for r in clean for m in r["messages"] if m["role"] == "user"]
    assistants = [
        len(m["content"].split())
        for r in clean
        if r["needle"] is None
        for m in r["messages"]
        if m["role"] == "assistant"
    ]
    assert 8 <= statistics.median(users) <= 30 and max(users) <= 55
    assert 15 <= statistics.median(assistants) <= 60 and max(assistants) <= 100


def test_no_duplicate_clean_conversations(clean):
    keys = [tuple((m["role"], m["content"]) for m in r["messages"]) for r in clean]
    assert len(set(keys)) == len(keys)


# --------------------------------------------------------------------------- needles
def test_needles(sample):
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows = sample[split][:n]
        with_needle = [r for r in rows if r["needle"] is not None]
        assert abs(len(with_needle) / n - NEEDLE_FRACTION) <= 0.05
        for r in rows:
            if r["needle"] is None:
                assert r["needle_start"] is None and r["needle_end"] is None
                continue
            text = _final(r)
            assert text[r["needle_start"] : r["needle_end"]] == r["needle"]
            assert r["needle_end"] - r["needle_start"] == len(r["needle"])
            before = text[: r["needle_start"]]
            assert before == "" or before[-1] in " \n"  # starts at a sentence boundary
            assert text[r["needle_end"] :] == "" or text[r["needle_end"]] in " \n"
            rest = " ".join(m["content"] for m in r["messages"][:-1]) + _without_needle(r)
            words = set(re.findall(r"[a-z]{5,}", r["needle"].lower()))
            assert not words & set(re.findall(r"[a-z]{5,}", rest.lower())), r["needle"]
    needles = {r["needle"] for r in sample["train"] if r["needle"]}
    assert len(needles) >= 30
    starts = Counter(
        "start" if r["needle_start"] == 0 else "end" if r["needle_end"] == len(_final(r)) else "middle"
        for r in sample["train"][:N_TRAIN]
        if r["needle"]
    )
    assert min(starts.values()) >= 0.15 * sum(starts.values())


# --------------------------------------------------------------------------- math
_MATH_KEYWORDS = (
    ("+", r"\bmore\b"),
    ("-", r"\b(?:away|loses|sells|uses up)\b"),
    ("×", r"\b(?:times|each one for|multiplies)\b"),
    ("÷", r"\b(?:equal|evenly|equally)\b"),
)


def _classify(text):
    ops = [op for op, pattern in _MATH_KEYWORDS if re.search(pattern, text)]
    assert len(ops) == 1, text
    return ops[0]


def _calc(op, x, n):
    if op == "÷":
        assert x % n == 0
        return x // n
    return x + n if op == "+" else x - n if op == "-" else x * n


def _parse_math(question):
    """Re-derive (start, [(op, n), ...]) from the story sentence of a word problem."""
    story = next(s for s in re.split(r"(?<=[.?!:])\s+", question) if re.search(r"\d", s))
    clauses = story.rstrip(".").split(", ")
    start = int(re.search(r"\d+", clauses[0]).group())
    ops = []
    for clause in clauses[1:]:
        nums = re.findall(r"\d+", clause)
        assert len(nums) == 1, clause
        ops.append((_classify(clause), int(nums[0])))
    return start, ops


def _stated_answer(rec):
    found = re.findall(r"answer is (\S+?)\.(?:\s|$)", _final(rec))
    assert len(found) == 1, _final(rec)
    return found[0]


def test_math_answers_recomputed(clean):
    rows = [r for r in clean if r["category"] == "math"]
    wrong = 0
    for r in rows:
        start, ops = _parse_math(_final_user(r))
        truth = start
        for op, n in ops:
            truth = _calc(op, truth, n)
        stated = int(_stated_answer(r))
        assert (stated == truth) == r["answer_correct"], (_final_user(r), _final(r))
        if r["answer_correct"]:
            assert r["quality"] in ("good", "excellent", "average")
        else:
            wrong += 1
            assert r["quality"] in ("poor", "very poor")
        steps = re.findall(r"(\d+) ([+\-×÷]) (\d+) = (\d+)", _without_needle(r))
        if r["quality"] in ("good", "excellent", "poor"):  # shows the working
            assert len(steps) == len(ops) and int(steps[-1][3]) == stated
        else:
            assert not steps
        if r["answer_correct"] and steps:
            x = start
            for (a, op, n, c), (true_op, true_n) in zip(steps, ops, strict=False):
                assert (int(a), op, int(n)) == (x, true_op, true_n)
                x = _calc(op, x, int(n))
                assert x == int(c)
    assert 0.25 <= wrong / len(rows) <= 0.45


def test_math_one_operation_problems_by_numbers(clean):
    """Simplest check: two numbers and one operation keyword in the question."""
    checked = 0
    for r in clean:
        if r["category"] != "math":
            continue
        question = _final_user(r)
        nums = [int(n) for n in re.findall(r"\d+", question)]
        if len(nums) != 2:
            continue
        a, b = nums
        truth = {"+": a + b, "-": a - b, "×": a * b, "÷": a // b}[_classify(question)]
        assert (int(_stated_answer(r)) == truth) is r["answer_correct"]
        assert r["quality"] in (("average", "good", "excellent") if r["answer_correct"] else ("poor", "very poor"))
        checked += 1
    assert checked >= 15


def test_math_difficulty_tracks_problem_size(clean):
    sizes, levels = [], []
    for r in clean:
        if r["category"] != "math":
            continue
        question = _final_user(r)
        _, ops = _parse_math(question)
        digits = max(len(n) for n in re.findall(r"\d+", question))
        level = DIFFICULTIES.index(r["difficulty"])
        sizes.append(len(ops) + digits)
        levels.append(level)
        if len(ops) == 1 and digits == 1:
            assert r["difficulty"] == "very easy"
        if len(ops) >= 4 or digits >= 3:
            assert r["difficulty"] == "very hard"
    assert _pearson(sizes, levels) > 0.7
    assert len(set(levels)) == 5


# --------------------------------------------------------------------------- other checkable categories
def test_data_analysis_recomputed(clean):
    for r in (r for r in clean if r["category"] == "data-analysis"):
        question = _final_user(r)
        values = [int(v) for v in re.search(r":\s*((?:\d+, )+\d+)", question).group(1).split(", ")]
        stat = re.search(r"\b(average|total|range|highest)\b", question).group(1)
        truth = {
            "average": sum(values) / len(values),
            "total": sum(values),
            "range": max(values) - min(values),
            "highest": max(values),
        }[stat]
        assert (int(_stated_answer(r)) == truth) is r["answer_correct"]


def test_reasoning_recomputed(clean):
    checked = 0
    for r in (r for r in clean if r["category"] == "reasoning"):
        question = _final_user(r)
        stated = re.search(r"answer is (\w+ × \w+|\w+)\.", _final(r)).group(1)
        facts = re.findall(r"(\w+) is (\w+) than (\w+)", question)
        compare = re.search(r"Which is larger: (\d+) × (\d+) or (\d+)\?", question)
        sequence = re.search(r"comes next: ((?:\d+, )+\d+)\?", question)
        if facts:
            ask = re.search(r"Who is the (\w+)\?", question).group(1)
            names = {n for a, _, b in facts for n in (a, b)}
            top = names - {b for _, _, b in facts}
            bottom = names - {a for a, _, _ in facts}
            truth = (top if ask in ("tallest", "oldest", "fastest", "heaviest") else bottom).pop()
        elif compare:
            a, b, c = map(int, compare.groups())
            truth = f"{a} × {b}" if a * b > c else str(c)
        elif sequence:
            truth = str(_next_in_sequence([int(v) for v in sequence.group(1).split(", ")]))
        else:
            continue
        assert (stated == truth) is r["answer_correct"], (question, _final(r))
        checked += 1
    assert checked >= 90


def _next_in_sequence(seq):
    """The next term under the one rule (constant step, constant ratio, growing step, sum of two) that fits."""
    gaps = [b - a for a, b in zip(seq, seq[1:], strict=False)]
    ratio = seq[1] // seq[0]
    candidates = set()
    if len(set(gaps)) == 1:
        candidates.add(seq[-1] + gaps[0])
    if ratio > 1 and all(b == a * ratio for a, b in zip(seq, seq[1:], strict=False)):
        candidates.add(seq[-1] * ratio)
    if gaps == list(range(1, len(seq))):
        candidates.add(seq[-1] + len(seq))
    if all(seq[i] == seq[i - 1] + seq[i - 2] for i in range(2, len(seq))):
        candidates.add(seq[-1] + seq[-2])
    assert len(candidates) == 1, seq
    return candidates.pop()


_CODE_REFERENCE = {
    "the sum of a list of numbers": (sum, ([2, 3, 4], [5], [-1, 7, 10])),
    "the factorial of n": (math.factorial, (4, 6)),
    "how many even numbers a list contains": (lambda xs: sum(x % 2 == 0 for x in xs), ([2, 4, 6, 7], [1, 3, 8])),
    "the largest value in a list": (max, ([3, 9, 2], [1, 5])),
    "the sum of the integers from 1 to n": (lambda n: n * (n + 1) // 2, (4, 10)),
    "a string reversed": (lambda s: s[::-1], ("abc", "level up")),
    "the number of vowels in a string": (lambda s: sum(c in "aeiou" for c in s.lower()), ("banana", "Sky")),
    "the average of a list of numbers": (lambda xs: sum(xs) / len(xs), ([2, 4, 9], [1, 1])),
    "the squares of the numbers from 1 to n": (lambda n: [i * i for i in range(1, n + 1)], (3, 5)),
    "whether a word is a palindrome": (lambda s: s == s[::-1], ("level", "python")),
}


def test_coding_snippets_behave_as_labelled(clean):
    rows = [r for r in clean if r["category"] == "coding"]
    for r in rows:
        question = _final_user(r)
        desc = next(d for d in _CODE_REFERENCE if d in question)
        ref, inputs = _CODE_REFERENCE[desc]
        code = re.search(r"```python\n(.*?)\n```", _final(r), re.S).group(1)
        namespace: dict = {}
        exec(code, namespace)  # noqa: S102 - our own generated snippet
        funcs = [v for k, v in namespace.items() if k != "__builtins__" and callable(v)]
        assert len(funcs) == 1
        ok = all(funcs[0](inp) == ref(inp) for inp in inputs)
        assert ok is r["answer_correct"], code
        assert ("type hints" in question) == ("->" in code)
        assert ("docstring" in question) == ('"""' in code)
        for name in re.findall(r"call it `(\w+)`", question):
            assert f"def {name}(" in code
        for param in re.findall(r"name the parameter `(\w+)`", question):
            assert f"({param}" in code
        requirements = sum(p in question for p in ("type hints", "docstring", "call it", "name the parameter"))
        assert DIFFICULTIES.index(r["difficulty"]) == requirements


def test_checkable_quality_follows_correctness(clean):
    for r in clean:
        if r["category"] in CHECKABLE:
            allowed = ("average", "good", "excellent") if r["answer_correct"] else ("poor", "very poor")
            assert r["quality"] in allowed


# --------------------------------------------------------------------------- open-ended categories
def _count_items(text, poem):
    if poem:
        lines = [ln.strip() for ln in text.split("\n")[1:]]
        return len([ln for ln in lines if ln.endswith((",", ".")) and ln[:1].isupper()])
    return len(re.findall(r"(?:^|\s)\d+[.)] ", text))


def _content_words(text):
    return set(re.findall(r"[a-z]{5,}", text.lower())) - {"please", "about", "would", "there", "these"}


def test_open_quality_is_measurable(clean):
    seen = Counter()
    overlaps = {q: [] for q in QUALITIES}
    for r in (r for r in clean if r["category"] in OPEN):
        question, answer = _final_user(r), _without_needle(r).strip()
        n = int(re.search(r"\b(\d+)\b", question).group(1))
        poem = r["category"] == "creative-writing"
        items = _count_items(answer, poem) - (r["quality"] == "excellent" and poem)
        overlap = len(_content_words(question) & _content_words(answer))
        q = r["quality"]
        seen[q] += 1
        overlaps[q].append(overlap)
        if q in ("good", "excellent"):
            assert items == n, (question, answer)
        elif q == "average":
            assert 1 <= items < n, (question, answer)
        else:
            assert items == 0
            assert ("depends" in answer) == (q == "poor")
        if q == "very poor":
            assert overlap <= 1, (question, answer)
        constraints = re.search(r"Please (.+)\.$", question)
        count = len(re.split(r", | and ", constraints.group(1))) if constraints else 0
        assert DIFFICULTIES.index(r["difficulty"]) == min(4, count)
    assert set(seen) == set(QUALITIES)
    mean = {q: statistics.fmean(v) for q, v in overlaps.items()}
    # specific answers reuse the request's words (subject, place, activity); the rest barely do
    assert mean["excellent"] > mean["good"] > mean["average"] + 1 > mean["very poor"] + 1


_EDIT_ERRORS = (
    r"\b(?:goed|comed|it's (?:way|tail)|don't like|she drink|has wrote|and me|(?:students|We) was|"
    r"there (?:cousins|results)|[Tt]heir planning)\b"
)


def test_editing_quality_is_measurable(clean):
    for r in (r for r in clean if r["category"] == "editing"):
        bad = re.search(r'"(.+)"', _final_user(r)).group(1)
        quoted = re.findall(r'"([^"]+)"', _without_needle(r))
        if r["quality"] in ("good", "excellent", "average"):
            fixed = quoted[0]
            clean_text = fixed[0].isupper() and fixed.endswith(".") and not re.search(r"\b(\w+) \1\b", fixed)
            clean_text = clean_text and not re.search(_EDIT_ERRORS, fixed)
            assert fixed != bad
            assert clean_text == (r["quality"] != "average"), (bad, fixed)
        elif r["quality"] == "poor":
            assert quoted and quoted[0] == bad


# --------------------------------------------------------------------------- reward, malformed
def test_reward_increases_with_quality(clean):
    means = [statistics.fmean(r["reward_model_score"] for r in clean if r["quality"] == q) for q in QUALITIES]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    spread = statistics.pstdev(r["reward_model_score"] - QUALITIES.index(r["quality"]) for r in clean)
    assert 0.35 <= spread <= 0.65


def test_malformed_rows(sample):
    train, test = sample["train"], sample["test"]
    extra = train[N_TRAIN:]
    dup, empty, blank, user_last, non_str, missing, long = extra
    assert dup in train[:N_TRAIN]
    assert _final(empty) == "" and empty["messages"][-1]["role"] == "assistant"
    assert _final(blank) != "" and not _final(blank).strip()
    assert user_last["messages"][-1]["role"] == "user"
    assert any(not isinstance(m.get("content", ""), str) for m in non_str["messages"])
    assert any("content" not in m for m in missing["messages"])
    assert long["messages"][-1]["role"] == "assistant" and len(_final(long)) > 12_000
    for rec in extra + test[N_TEST:]:
        assert rec["needle"] is None and rec["needle_start"] is None and rec["needle_end"] is None
        assert rec["category"] in CATEGORIES and rec["quality"] in QUALITIES
    assert len(test) == N_TEST + 1 and test[-1] in test[:N_TEST]
    keys = [tuple((m["role"], str(m.get("content"))) for m in r["messages"]) for r in extra[1:]]
    clean_keys = {tuple((m["role"], m["content"]) for m in r["messages"]) for r in train[:N_TRAIN]}
    assert not set(keys) & clean_keys
