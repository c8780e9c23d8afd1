"""One generator per category of the embedded sample: the graded final exchange as a `Draft`.

Each `GENERATORS[category](rng)` draws a request, an answer of a chosen quality (right or
wrong for the checkable categories) and candidate preamble exchanges on the same topic;
the rules that make the labels measurable from the text are in `extractors.ingest.sample.generate`'s
docstring. `extractors.ingest.sample.generate` assembles drafts into conversations. The order of
every `rng` call is part of the sample's identity: reordering them changes every row.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from extractors.ingest.sample.words import (
    AVERAGE_OPEN,
    CLOSE_CON,
    CLOSE_X,
    CODE_ASK,
    CODE_EXPLAIN,
    CODE_OPEN,
    CODE_PARAMS,
    CODE_REQ,
    CODE_TASKS,
    CONCLUDE,
    DATA_ASK,
    DATA_CTX,
    DATA_STAT,
    EDIT_ASK,
    EDIT_OUT,
    EDIT_SENTENCES,
    EDIT_SWAPS,
    EVASIVE,
    MATH_ASK,
    MATH_CHECK,
    MATH_FRAGS,
    MATH_OPEN,
    MATH_Q,
    NAMES,
    OBJECTS,
    OFF_TOPIC,
    OPEN_TOPICS,
    PLACES,
    REASON_PREFIX,
    REASON_SUFFIX,
    RELATIONS,
    TERSE,
    WORK_OPEN,
)

WRONG_RATE = 0.35  # share of wrong final answers in the checkable categories


@dataclass
class Draft:
    """The graded final exchange plus candidate preamble exchanges."""

    user: str
    answer: str
    difficulty: int
    quality: str
    correct: bool | None = None
    pre: list = field(default_factory=list)


def _graded_quality(rng: random.Random) -> tuple[bool, str]:
    """Correctness and quality for the checkable categories."""
    if rng.random() >= WRONG_RATE:
        return True, rng.choices(("excellent", "good", "average"), (35, 50, 15))[0]
    return False, rng.choices(("poor", "very poor"), (65, 35))[0]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ----------------------------------------------------------------------------- math
_ALT_OP = {"+": "-×", "-": "+", "×": "+", "÷": "×-"}


def _apply(op: str, x: int, n: int) -> int | None:
    if op == "÷":
        return x // n if x % n == 0 else None
    y = x + n if op == "+" else x - n if op == "-" else x * n
    return y if y > 0 else None


def _run(start: int, ops: list, wrong_at: int = -1, wrong_op: str = "") -> list | None:
    steps, x = [], start
    for i, (op, n) in enumerate(ops):
        op = wrong_op if i == wrong_at else op
        y = _apply(op, x, n)
        if y is None:
            return None
        steps.append((x, op, n, y))
        x = y
    return steps


def _gen_math(rng: random.Random) -> Draft:
    digits = rng.choices((1, 2, 3, 4), (45, 38, 12, 5))[0]
    n_ops = rng.choices((1, 2, 3, 4), (35, 30, 23, 12))[0]
    lo, hi = (3, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
    start = x = rng.randint(lo, hi)
    ops = []
    for _ in range(n_ops):
        choices = ["+"] + (["-"] if x > 2 else []) + (["×"] if x < 50_000 else [])
        divs = [k for k in range(2, 10) if x % k == 0 and x // k >= 2]
        op = rng.choice(choices + (["÷"] if divs else []))
        if op == "+":
            n = rng.randint(2, hi)
        elif op == "-":
            n = rng.randint(1, min(x - 1, hi))
        elif op == "×":
            n = rng.randint(2, 9 if digits == 1 else 5)
        else:
            n = rng.choice(divs)
        x = _apply(op, x, n)
        ops.append((op, n))
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    clauses = [f"{name} {rng.choice(('has', 'starts with', 'collects'))} {start} {obj}"]
    for i, (op, n) in enumerate(ops):
        frag = rng.choice(MATH_FRAGS[op]).format(n=n)
        if i == n_ops - 1:
            frag = rng.choice(("then ", "and then ", "and finally ") if n_ops > 1 else ("then ", "and later ")) + frag
        clauses.append(frag)
    story = ", ".join(clauses) + "."
    user = rng.choice(MATH_ASK).format(s=story, q=rng.choice(MATH_Q).format(o=obj, nm=name))
    truth_steps = _run(start, ops)
    correct, quality = _graded_quality(rng)
    steps = truth_steps
    if not correct:
        steps = None
        if rng.random() < 0.5:
            k = rng.randrange(n_ops)
            cand = _run(start, ops, k, rng.choice(_ALT_OP[ops[k][0]]))
            if cand and cand[-1][3] != truth_steps[-1][3]:
                steps = cand
        if steps is None:  # arithmetic slip in the last step
            delta = rng.choice((-1, 1)) * rng.randint(1, 10)
            a, op, n, y = truth_steps[-1]
            delta = abs(delta) if y + delta <= 0 else delta
            steps = truth_steps[:-1] + [(a, op, n, y + delta)]
    final = steps[-1][3]
    if quality in ("average", "very poor"):
        answer = rng.choice(TERSE).format(v=final)
    else:
        conns = ["First,", "Then", "Next,", "After that,", "Then"][: n_ops - 1] + ["Finally,"]
        lines = [rng.choice(MATH_OPEN).format(o=obj), f"Start with {start} {obj}."]
        if n_ops == 1:
            conns = [""]
        lines += [f"{c} {a} {op} {n} = {y}.".strip() for c, (a, op, n, y) in zip(conns, steps, strict=False)]
        lines.append(rng.choice(CONCLUDE).format(v=final))
        if quality == "excellent":
            lines.append(rng.choice(MATH_CHECK).format(a=start))
        answer = " ".join(lines)
    w1, w2 = rng.randint(2, 20), rng.randint(2, 20)
    pre = [
        (
            "I'm practicing word problems before a quiz. Can you help me check a few?",
            "Happy to help. Send a problem and I'll write out each operation so you can follow every step.",
        ),
        (
            f"Warm-up first: what is {w1} plus {w2}?",
            f"{w1} + {w2} = {w1 + w2}, so that one is {w1 + w2}. Send the next problem when you're ready.",
        ),
        (
            f"My cousin has homework about {obj} and I want to double-check it.",
            "Sure. Share the problem and I'll lay out the arithmetic line by line so you can compare.",
        ),
        (
            "Do you show your working when you solve these?",
            "Yes. I write every operation with its running total, which makes any slip easy to spot.",
        ),
    ]
    level = 4 if n_ops >= 4 or digits >= 3 else (n_ops - 1) + (digits - 1)
    return Draft(user, answer, level, quality, correct, pre)


# ----------------------------------------------------------------------------- coding
def _gen_coding(rng: random.Random) -> Draft:
    desc, fname, kind, ptype, rtype, body, bugs, ex_in, ex_out = rng.choice(CODE_TASKS)
    param = CODE_PARAMS[kind][0]
    reqs = rng.sample(("hints", "doc", "name", "param"), rng.choices(range(5), (22, 26, 24, 16, 12))[0])
    if "name" in reqs:
        fname = rng.choice(("compute_{f}", "get_{f}", "my_{f}", "{f}_value")).format(f=fname)
    if "param" in reqs:
        param = rng.choice(CODE_PARAMS[kind][1:])
    phrases = {
        "hints": "use type hints",
        "doc": "add a docstring",
        "name": f"call it `{fname}`",
        "param": f"name the parameter `{param}`",
    }
    user = rng.choice(CODE_ASK).format(d=desc)
    if reqs:
        user += " " + rng.choice(CODE_REQ).format(r=_join([phrases[r] for r in reqs]))
    correct, quality = _graded_quality(rng)
    lines = list(body)
    if not correct:
        _, idx, repl = rng.choice(bugs)
        lines = lines[:idx] + ([repl] if repl is not None else []) + lines[idx + 1 :]
    sig = f"def {fname}({param}: {ptype}) -> {rtype}:" if "hints" in reqs else f"def {fname}({param}):"
    code = [sig] + ([f'    """Return {desc}."""'] if "doc" in reqs else [])
    code += ["    " + ln.format(p=param) for ln in lines]
    answer = rng.choice(CODE_OPEN) + "\n```python\n" + "\n".join(code) + "\n```"
    if quality in ("excellent", "good", "poor"):
        answer += "\n" + rng.choice(CODE_EXPLAIN).format(k=kind)
    if quality == "excellent":
        answer += f" For example, {fname}({ex_in}) returns {ex_out}."
    pre = [
        (
            "I'm learning Python and want to write small helper functions.",
            "Great way to practice. Tell me what the function should do and I'll write a short, readable version.",
        ),
        (
            "Do you prefer loops or built-ins for simple tasks in Python?",
            "Either works. Built-ins are shorter, while explicit loops are easier for beginners to follow.",
        ),
        (
            "Can you keep the code short? I'll paste it into a notebook.",
            "Sure. I'll keep each function to a few lines with no imports, so it drops into a notebook cell.",
        ),
        (
            f"I keep needing {desc} in my scripts.",
            "That's a common need. A tiny, well-named function saves you from rewriting the same loop.",
        ),
    ]
    return Draft(user, answer, len(reqs), quality, correct, pre)


# ----------------------------------------------------------------------------- reasoning
def _gen_reasoning(rng: random.Random) -> Draft:
    kind = rng.choice(("order", "compare", "sequence"))
    correct, quality = _graded_quality(rng)
    if kind == "order":
        k = rng.choices((3, 4, 5, 6), (35, 30, 20, 15))[0]
        people = rng.sample(NAMES, k)  # listed from most to least
        comp, top, bottom = rng.choice(RELATIONS)
        facts = [f"{a} is {comp} than {b}" for a, b in zip(people, people[1:], strict=False)]
        rng.shuffle(facts)
        want_top = rng.random() < 0.5
        q = f"{'. '.join(facts)}. Who is the {top if want_top else bottom}?"
        shown, end = list(people), 0 if want_top else k - 1
        if not correct:  # put someone else at the queried end of the ordering
            other = rng.choice([i for i in range(k) if i != end])
            shown[end], shown[other] = shown[other], shown[end]
        value = shown[end]
        work = f"Ordering everyone from {top} to {bottom} gives {', '.join(shown)}."
        level = k - 2
    elif kind == "compare":
        digits = rng.choice((1, 2))
        lo, hi = (2, 9) if digits == 1 else (11, 40)
        a, b = rng.randint(lo, hi), rng.randint(2, 9)
        c = a * b + rng.choice((-1, 1)) * rng.randint(1, max(2, a * b // 5))
        q = f"Which is larger: {a} × {b} or {c}?"
        shown = a * b if correct else (c - 1 if a * b > c else c + 1)  # a slip flips the comparison
        value = f"{a} × {b}" if shown > c else str(c)
        work = f"First, {a} × {b} = {shown}, which is {'more' if shown > c else 'less'} than {c}."
        level = 0 if digits == 1 else 2
    else:
        style = rng.choices(("step", "bigstep", "double", "grow", "fib"), (25, 20, 20, 20, 15))[0]
        s = rng.randint(1, 9)
        if style in ("step", "bigstep"):
            d = rng.randint(2, 9) if style == "step" else rng.randint(11, 30)
            seq = [s + d * i for i in range(5)]
            rule = f"each number is {d} more than the one before"
        elif style == "double":
            r = rng.choice((2, 3))
            seq = [s * r**i for i in range(5)]
            rule = f"each number is {r} times the one before"
        elif style == "grow":
            seq = [s if s != 2 else 10]  # 2, 3, 5, 8 would also fit the sum-of-two rule
            for i in range(1, 5):
                seq.append(seq[-1] + i)
            rule = "the gap grows by one each time"
        else:
            seq = [s, s + rng.randint(2, 5)]  # a first gap of 1 could read as the "grow" rule
            while len(seq) < 5:
                seq.append(seq[-1] + seq[-2])
            rule = "each number is the sum of the two before it"
        q = f"What number comes next: {', '.join(map(str, seq[:-1]))}?"
        value = seq[-1] if correct else seq[-1] + rng.choice((-1, 1)) * rng.randint(1, 5)
        work = f"The pattern is that {rule}, so it continues with {value}."
        level = ("step", "bigstep", "double", "grow", "fib").index(style)
    user = rng.choice(REASON_PREFIX) + q + rng.choice(REASON_SUFFIX)
    if quality in ("average", "very poor"):
        answer = rng.choice(TERSE).format(v=value)
    else:
        answer = rng.choice(WORK_OPEN) + " " + work + " " + rng.choice(CONCLUDE).format(v=value)
        if quality == "excellent":
            answer += " Checking each given fact against that result, nothing contradicts it."
    pre = [
        (
            "I like logic puzzles. Want to try a few with me?",
            "I'd love to. Send one over and I'll explain my reasoning before giving the answer.",
        ),
        (
            "Can you explain how you approach puzzles like these?",
            "I list the facts, put them in order, and only then read off the answer, checking it at the end.",
        ),
        (
            "My friend and I disagree about a brain teaser.",
            "Let's settle it. Share the teaser and I'll walk through it one fact at a time.",
        ),
    ]
    return Draft(user, answer, level, quality, correct, pre)


# ----------------------------------------------------------------------------- data-analysis
def _gen_data(rng: random.Random) -> Draft:
    k = rng.choices((3, 4, 5, 6, 7), (30, 25, 20, 15, 10))[0]
    digits = rng.choices((1, 2, 3), (35, 45, 20))[0]
    lo, hi = (1, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
    stat = rng.choice(tuple(DATA_STAT))
    vals = [rng.randint(lo, hi) for _ in range(k)]
    if stat == "average":  # make the mean a whole number
        vals[-1] -= sum(vals) % k
        if vals[-1] < lo:
            vals[-1] += k
    total, top, low = sum(vals), max(vals), min(vals)
    truth = {"average": total // k, "total": total, "range": top - low, "highest": top}[stat]
    correct, quality = _graded_quality(rng)
    v = truth
    if not correct:
        delta = rng.choice((-1, 1)) * rng.randint(1, 5)
        v = truth + (delta if truth + delta >= 0 else abs(delta))
    ctx = rng.choice(DATA_CTX).format(pl=rng.choice(PLACES), nm=rng.choice(NAMES))
    user = rng.choice(DATA_ASK).format(c=ctx, v=", ".join(map(str, vals)), s=DATA_STAT[stat])
    work = {
        "average": f"The {k} values add up to {v * k}, and {v * k} ÷ {k} = {v}.",
        "total": f"Adding the {k} values one by one gives {v}.",
        "range": f"The highest value is {top} and the lowest is {top - v}, so {top} - {top - v} = {v}.",
        "highest": f"Scanning the list, the largest entry is {v}.",
    }[stat]
    if quality in ("average", "very poor"):
        answer = rng.choice(TERSE).format(v=v)
    else:
        answer = f"{rng.choice(WORK_OPEN)} The list has {k} values. {work} {rng.choice(CONCLUDE).format(v=v)}"
        if quality == "excellent":
            answer += " I re-added the list a second time to confirm the figure."
    pre = [
        (
            "I'm looking at a few small numbers from a report.",
            "Happy to help. Share the values and tell me which summary you need, like a total or an average.",
        ),
        (
            "Is the average or the total more useful for a short list?",
            "It depends on the question. Totals show overall volume, while averages let you compare lists of "
            "different lengths.",
        ),
        (
            "Can you do quick calculations on lists of numbers?",
            "Yes. Paste the list and I'll show the calculation so you can check it yourself.",
        ),
    ]
    return Draft(user, answer, min(4, (k - 3) + (digits - 1)), quality, correct, pre)


# ----------------------------------------------------------------------------- open-ended
_OPEN_Q = ("excellent", "good", "average", "poor", "very poor")
_OPEN_W = (20, 30, 20, 20, 10)


def _items_text(rng: random.Random, items: list[str], as_lines: bool) -> str:
    if as_lines:
        return "\n".join(_cap(it) + ("." if i == len(items) - 1 else ",") for i, it in enumerate(items))
    if rng.random() < 0.5:
        return " " + "; ".join(f"{i + 1}) {it}" for i, it in enumerate(items)) + "."
    return "\n" + "\n".join(f"{i + 1}. {_cap(it)}." for i, it in enumerate(items))


def _fix_caps(text: str) -> str:
    """Capitalize a sentence that starts with a slot value ("Nice! a street festival ...")."""
    return _cap(re.sub(r"(?<=[.!?] )[a-z]", lambda m: m.group().upper(), text))


def _gen_open(rng: random.Random, category: str) -> Draft:
    spec = OPEN_TOPICS[category]
    x, n = spec["x"](rng), rng.choice(spec.get("n", (2, 3, 3, 4)))
    cons = rng.sample(spec["cons"], rng.choices(range(5), (20, 24, 22, 18, 16))[0])
    user = rng.choice(spec["ask"]).format(x=x, n=n)
    if cons:
        user += " Please " + _join(cons) + "."
    quality = rng.choices(_OPEN_Q, _OPEN_W)[0]
    lines = spec.get("lines", False)
    if quality in ("excellent", "good"):  # n specific items, opener names the subject
        answer = rng.choice(spec["open"]).format(x=x, n=n) + ("\n" if lines else "")
        specific = rng.choice([it for it in spec["items"] if "{x}" in it])  # one item names the subject
        items = rng.sample([it for it in spec["items"] if "{x}" not in it], n - 1) + [specific.format(x=x)]
        rng.shuffle(items)
        answer += _items_text(rng, items, lines)
        if quality == "excellent":  # plus a sentence honouring a constraint
            close = rng.choice(CLOSE_CON).format(c=rng.choice(cons)) if cons else rng.choice(CLOSE_X).format(x=x)
            answer += ("\n" if "\n" in answer else " ") + close
    elif quality == "average":  # generic: fewer items, none naming the subject
        generic = [it for it in spec["items"] if "{x}" not in it]
        k = max(1, n - rng.choice((1, 2)))
        answer = rng.choice(AVERAGE_OPEN) + ("\n" if lines else "")
        answer += _items_text(rng, rng.sample(generic, k), lines)
    elif quality == "poor":
        answer = rng.choice(EVASIVE).format(x=x)
    else:
        answer = rng.choice(OFF_TOPIC)
    pre = [(_fix_caps(u.format(x=x)), _fix_caps(a.format(x=x))) for u, a in spec["pre"]]
    return Draft(_fix_caps(user), _fix_caps(answer), min(4, len(cons)), quality, None, pre)


# ----------------------------------------------------------------------------- editing
def _gen_editing(rng: random.Random) -> Draft:
    nm, pl = rng.choice(NAMES), rng.choice(PLACES)
    clean = rng.choice(EDIT_SENTENCES).format(nm=nm, pl=pl)
    errors = []  # (description, function) in canonical application order
    for good, bad in EDIT_SWAPS:
        if re.search(rf"\b{good}\b", clean):
            errors.append((f'changed "{bad}" to "{good}"', lambda s, g=good, b=bad: re.sub(rf"\b{g}\b", b, s, count=1)))
    swapped = {w for g, _ in EDIT_SWAPS for w in g.lower().split()}
    words = [w for w in clean.split()[1:] if w.isalpha() and w.islower() and w not in swapped]
    w = rng.choice(words)
    errors.append((f'removed the repeated "{w}"', lambda s, w=w: re.sub(rf"\b{w}\b", f"{w} {w}", s, count=1)))
    errors.append(("capitalized the first word", lambda s: s[0].lower() + s[1:]))
    errors.append(("added the missing period", lambda s: s[:-1]))
    n_err = min(len(errors), rng.choices((1, 2, 3), (40, 35, 25))[0])
    chosen = sorted(rng.sample(range(len(errors)), n_err))

    def apply(idxs: list[int]) -> str:
        s = clean
        for i in idxs:
            s = errors[i][1](s)
        return s

    bad = apply(chosen)
    cons = rng.sample(
        ("keep the meaning the same", "keep a formal tone", "change as little as possible"),
        rng.choices((0, 1, 2), (45, 35, 20))[0],
    )
    user = rng.choice(EDIT_ASK).format(b=bad) + (" Please " + _join(cons) + "." if cons else "")
    quality = rng.choices(_OPEN_Q, _OPEN_W)[0]
    if quality == "average" and n_err == 1:
        quality = "good"
    if quality in ("excellent", "good"):
        answer = rng.choice(EDIT_OUT).format(s=clean)
        if quality == "excellent":
            answer += " I " + _join([errors[i][0] for i in chosen]) + "."
        else:
            answer += " That should read naturally now."
    elif quality == "average":
        answer = rng.choice(EDIT_OUT).format(s=apply([rng.choice(chosen)])) + " That should read better now."
    elif quality == "poor":
        answer = f'It looks fine to me as it is: "{bad}" I would not change much, it depends on your style.'
    else:
        answer = rng.choice(OFF_TOPIC)
    pre = [
        (
            "I'm tidying up some writing for work.",
            "Happy to help. Paste a sentence and I'll correct the grammar while keeping your meaning.",
        ),
        (
            "Grammar has never been my strong point.",
            "That's very common. Most mistakes come from a few patterns, like mixing up their and there.",
        ),
        (
            "Can you proofread short sentences?",
            "Yes. Short sentences are ideal, because every fix is easy to see and explain.",
        ),
    ]
    return Draft(user, answer, min(4, n_err - 1 + len(cons)), quality, None, pre)


GENERATORS = {
    "math": _gen_math,
    "coding": _gen_coding,
    "reasoning": _gen_reasoning,
    "data-analysis": _gen_data,
    "editing": _gen_editing,
    **{c: (lambda r, c=c: _gen_open(r, c)) for c in OPEN_TOPICS},
}
