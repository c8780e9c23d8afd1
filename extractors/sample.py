"""Deterministic synthetic chat sample in the SmolTalk ``smol-magpie-ultra`` schema.

This is the project's embedded default dataset (no network).  It is built for
SmolLM2-135M-Instruct activation extraction: conversations are short, and every
metadata field is *measurable from the text*, so linear probes and SAE-feature
correlations have real signal to find.

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

import random
import re
from dataclasses import dataclass, field

CATEGORIES: tuple[str, ...] = (
    "math", "coding", "reasoning", "data-analysis", "information-seeking",
    "creative-writing", "advice-seeking", "editing", "planning", "brainstorming",
    "role-playing",
)
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
QUALITIES = ("very poor", "poor", "average", "good", "excellent")
NEEDLE_FRACTION: float = 0.25
WRONG_RATE = 0.35  # share of wrong final answers in the checkable categories
REWARD_BASE = {"very poor": 0.0, "poor": 1.0, "average": 2.0, "good": 3.0, "excellent": 4.0}
LONG_CHARS = 14_000  # length of the over-long malformed final turn (> 12,000)

NAMES = ("Maya Liam Sofia Omar Chen Ava Noah Priya Lucas Amara Diego Hana Felix "
         "Zara Mateo Ingrid Kofi Elena Ravi Nina Tomas Leila Jonas Aisha").split()
OBJECTS = ("marbles stickers apples pencils cookies coins stamps books shells cards "
           "beads tickets lemons candles buttons").split()
PLACES = ("Lisbon Kyoto Nairobi Oslo Lima Hanoi Porto Dublin Tallinn Quito Seville "
          "Krakow Auckland Montreal Marrakesh Valparaiso").split()
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly and concise AI assistant.",
    "You are a patient tutor who explains things clearly.",
    "You are a knowledgeable assistant. Keep answers brief.",
    "You are an AI assistant that answers accurately and politely.",
    "Respond helpfully and keep replies short.",
)
NEEDLES = (
    "Octopuses have three hearts and blue blood.", "A day on Venus lasts longer than its year.",
    "Honey found in ancient Egyptian tombs was still edible.", "Sea otters often hold hands while they sleep.",
    "The Great Wall of China is not visible to the naked eye from orbit.",
    "Bananas are technically berries, but strawberries are not.", "Saturn is less dense than water.",
    "Wombats produce cube-shaped droppings.",
    "Cleopatra lived closer in time to the Moon landing than to the building of the Great Pyramid.",
    "Australia is wider than the Moon.", "Flamingos get their pink color from the shrimp and algae they eat.",
    "The Eiffel Tower grows slightly taller in summer as its iron expands.",
    "A group of crows is called a murder.", "Lake Baikal holds about a fifth of the world's unfrozen fresh water.",
    "Tomatoes were once thought to be poisonous in parts of Europe.",
    "Sunlight takes about eight minutes to reach Earth.", "Koalas can sleep for up to twenty hours a day.",
    "Iceland has no native mosquitoes.", "Peanuts are legumes rather than true nuts.",
    "Jupiter's Great Red Spot is a storm larger than Earth.", "Sharks existed before trees appeared on land.",
    "The Sahara was once green and dotted with lakes.",
    "Vikings may have used sunstones to navigate on cloudy days.",
    "Cashews grow on the bottom of a fruit called the cashew apple.",
    "Penguins often court their mates with a pebble.",
    "Mars has the tallest known volcano in the solar system, Olympus Mons.",
    "The Aztecs once used cacao beans as currency.", "Canada has more lakes than the rest of the world combined.",
    "Hummingbirds are the only birds that can fly backwards.",
    "Mount Everest rises a few millimeters higher every year.",
    "Venus spins in the opposite direction to most planets.",
    "Giraffes have the same number of neck bones as humans.",
    "The Dead Sea is so salty that swimmers float with ease.",
    "Carrots were mostly purple before orange varieties spread in Europe.",
    "The Roman Colosseum could once be flooded for mock sea battles.",
)
OFF_TOPIC = (
    "Speaking of something else, a good cup of tea and a long walk fix most bad afternoons, in my experience.",
    "By the way, the best time to water a garden is early morning, because plants lose less water that way.",
    "Honestly, I would rather talk about football. Last season had some surprising results and great goals.",
    "Let me tell you about my favorite sandwich instead: crusty bread, ripe tomato, a little salt and olive oil.",
)
EVASIVE = (
    "I'm not sure, it depends. There are a lot of factors, so you could look it up or ask someone else.",
    "Hard to say, really. Everyone is different, and it depends on so many details that I'd rather not guess.",
    "That's a tricky one about {x}. It depends on your situation, so there isn't one clear answer here.",
    "It depends on many things, honestly. Some people like one approach and some like another with {x}.",
)
GENERIC_PRE = (
    ("Hi there, I have a quick question for you if you have a moment.",
     "Hi! Of course, go ahead and ask. I'll keep the answer short, clear and to the point."),
    ("Thanks for the help earlier today, it was really useful.",
     "You're welcome, I'm glad it helped. What would you like to look at next?"),
)
FOLLOW_UPS = ("Feel free to share as much detail as you like.", "Go ahead whenever you're ready.",
              "I'll keep my answers short and concrete.", "Just let me know where you'd like to start.",
              "Ask away, and tell me if anything is unclear.", "We can go one step at a time.")
LEAD_INS = ("Okay, here's my actual question.", "Great, thanks. Next one:", "Here's what I really wanted to ask.",
            "Perfect, one last thing.", "Thanks! Now for the main question.")
CONCLUDE = ("So the answer is {v}.", "That means the answer is {v}.",
            "Therefore, the answer is {v}.", "Putting it together, the answer is {v}.")
TERSE = ("I did this one in my head without writing anything down, and the answer is {v}.",
         "This one is quick, so I'll skip the details: the answer is {v}.",
         "Without writing out every step, I'm fairly confident the answer is {v}.",
         "I worked it out mentally rather than on paper, and the answer is {v}.")
WORK_OPEN = ("Let's reason it through.", "Here is how I would check it.", "Let me work it out carefully.",
             "Good question, let's look at it closely.")


@dataclass
class _Draft:
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
_MATH_FRAGS = {
    "+": ("gets {n} more", "finds {n} more", "buys {n} more", "is given {n} more", "wins {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}", "uses up {n}"),
    "×": ("ends up with {n} times as many", "swaps each one for {n} new ones",
          "multiplies the pile by {n}"),
    "÷": ("splits them into {n} equal piles and keeps one", "keeps one of {n} equal piles",
          "packs them evenly into {n} boxes and keeps one"),
}
_ALT_OP = {"+": "-×", "-": "+", "×": "+", "÷": "×-"}
_MATH_ASK = ("{s} {q}", "Can you solve this? {s} {q}", "Quick math question: {s} {q}",
             "Here's one from my homework: {s} {q}", "I'm stuck on this word problem. {s} {q}",
             "Please work this out: {s} {q}")
_MATH_Q = ("How many {o} does {nm} have now?", "How many {o} are left in the end?",
           "What is the final number of {o}?", "How many {o} does {nm} end up with?")
_MATH_OPEN = ("Let's work through it step by step.", "Sure, I'll take it one step at a time.",
              "Here is the working.", "Okay, let's follow the {o}.")
_MATH_CHECK = ("Reversing every step brings us back to {a}, so the result checks out.",
               "I double-checked each line, and the running totals are consistent.",
               "Every step gives a whole number, which is a good sign the setup is right.")


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


def _gen_math(rng: random.Random) -> _Draft:
    digits = rng.choices((1, 2, 3, 4), (45, 38, 12, 5))[0]
    n_ops = rng.choices((1, 2, 3, 4), (35, 30, 23, 12))[0]
    lo, hi = (3, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
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
        frag = rng.choice(_MATH_FRAGS[op]).format(n=n)
        if i == n_ops - 1:
            frag = rng.choice(("then ", "and then ", "and finally ") if n_ops > 1
                              else ("then ", "and later ")) + frag
        clauses.append(frag)
    story = ", ".join(clauses) + "."
    user = rng.choice(_MATH_ASK).format(s=story, q=rng.choice(_MATH_Q).format(o=obj, nm=name))
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
        lines = [rng.choice(_MATH_OPEN).format(o=obj), f"Start with {start} {obj}."]
        if n_ops == 1:
            conns = [""]
        lines += [f"{c} {a} {op} {n} = {y}.".strip() for c, (a, op, n, y) in zip(conns, steps)]
        lines.append(rng.choice(CONCLUDE).format(v=final))
        if quality == "excellent":
            lines.append(rng.choice(_MATH_CHECK).format(a=start))
        answer = " ".join(lines)
    w1, w2 = rng.randint(2, 20), rng.randint(2, 20)
    pre = [("I'm practicing word problems before a quiz. Can you help me check a few?",
            "Happy to help. Send a problem and I'll write out each operation so you can follow every step."),
           (f"Warm-up first: what is {w1} plus {w2}?",
            f"{w1} + {w2} = {w1 + w2}, so that one is {w1 + w2}. Send the next problem when you're ready."),
           (f"My cousin has homework about {obj} and I want to double-check it.",
            "Sure. Share the problem and I'll lay out the arithmetic line by line so you can compare."),
           ("Do you show your working when you solve these?",
            "Yes. I write every operation with its running total, which makes any slip easy to spot.")]
    level = 4 if n_ops >= 4 or digits >= 3 else (n_ops - 1) + (digits - 1)
    return _Draft(user, answer, level, quality, correct, pre)


# ----------------------------------------------------------------------------- coding
# (description, default name, param kind, param type, return type, body, bugs, example in, out)
_CODE_TASKS = (
    ("the sum of a list of numbers", "total", "list", "list[int]", "int",
     ("result = 0", "for x in {p}:", "    result += x", "return result"),
     (("wrong operator", 2, "    result -= x"), ("missing return", 3, None)), "[2, 3, 4]", "9"),
    ("the factorial of n", "factorial", "int", "int", "int",
     ("result = 1", "for i in range(2, {p} + 1):", "    result *= i", "return result"),
     (("off-by-one", 1, "for i in range(2, {p}):"), ("missing return", 3, None)), "5", "120"),
    ("how many even numbers a list contains", "count_evens", "list", "list[int]", "int",
     ("count = 0", "for x in {p}:", "    if x % 2 == 0:", "        count += 1", "return count"),
     (("wrong operator", 2, "    if x % 2 != 0:"), ("missing return", 4, None)), "[2, 4, 6, 7]", "3"),
    ("the largest value in a list", "largest", "list", "list[int]", "int",
     ("best = {p}[0]", "for x in {p}:", "    if x > best:", "        best = x", "return best"),
     (("wrong operator", 2, "    if x < best:"), ("missing return", 4, None)), "[3, 9, 2]", "9"),
    ("the sum of the integers from 1 to n", "sum_to", "int", "int", "int",
     ("return sum(range(1, {p} + 1))",),
     (("off-by-one", 0, "return sum(range(1, {p}))"), ("missing return", 0, "sum(range(1, {p} + 1))")),
     "4", "10"),
    ("a string reversed", "reverse", "str", "str", "str", ("return {p}[::-1]",),
     (("off-by-one", 0, "return {p}[-1:0:-1]"),), "'abc'", "'cba'"),
    ("the number of vowels in a string", "count_vowels", "str", "str", "int",
     ("return sum(1 for ch in {p}.lower() if ch in 'aeiou')",),
     (("wrong operator", 0, "return sum(1 for ch in {p}.lower() if ch not in 'aeiou')"),),
     "'banana'", "3"),
    ("the average of a list of numbers", "average", "list", "list[float]", "float",
     ("return sum({p}) / len({p})",),
     (("wrong operator", 0, "return sum({p}) * len({p})"), ("missing return", 0, "sum({p}) / len({p})")),
     "[2, 4, 9]", "5.0"),
    ("the squares of the numbers from 1 to n", "squares", "int", "int", "list[int]",
     ("return [i * i for i in range(1, {p} + 1)]",),
     (("off-by-one", 0, "return [i * i for i in range(1, {p})]"),), "3", "[1, 4, 9]"),
    ("whether a word is a palindrome", "is_palindrome", "str", "str", "bool",
     ("return {p} == {p}[::-1]",), (("wrong operator", 0, "return {p} != {p}[::-1]"),),
     "'level'", "True"),
)
_PARAMS = {"list": ("nums", "values", "items", "numbers"), "int": ("n", "k", "limit", "size"),
           "str": ("text", "s", "word", "phrase")}
_CODE_ASK = ("Write a Python function that returns {d}.", "Can you give me a Python function for {d}?",
             "I need a small Python helper that computes {d}.",
             "How would I write a function in Python that returns {d}?",
             "Show me Python code to get {d}.")
_CODE_REQ = ("Please {r}.", "Also, {r}.", "Make sure to {r}.")
_CODE_OPEN = ("Here's a simple version:", "Sure, this should do it:", "Here is one way to write it:",
              "You can use this function:")
_CODE_EXPLAIN = ("It walks through the input once and returns the result at the end.",
                 "The logic is short, so it is easy to test and reuse in other code.",
                 "It needs no imports and works on whatever {k} you pass in.",
                 "It keeps the work in one small function, which makes it easy to read.")


def _gen_coding(rng: random.Random) -> _Draft:
    desc, fname, kind, ptype, rtype, body, bugs, ex_in, ex_out = rng.choice(_CODE_TASKS)
    param = _PARAMS[kind][0]
    reqs = rng.sample(("hints", "doc", "name", "param"), rng.choices(range(5), (22, 26, 24, 16, 12))[0])
    if "name" in reqs:
        fname = rng.choice(("compute_{f}", "get_{f}", "my_{f}", "{f}_value")).format(f=fname)
    if "param" in reqs:
        param = rng.choice(_PARAMS[kind][1:])
    phrases = {"hints": "use type hints", "doc": "add a docstring", "name": f"call it `{fname}`",
               "param": f"name the parameter `{param}`"}
    user = rng.choice(_CODE_ASK).format(d=desc)
    if reqs:
        user += " " + rng.choice(_CODE_REQ).format(r=_join([phrases[r] for r in reqs]))
    correct, quality = _graded_quality(rng)
    lines = list(body)
    if not correct:
        _, idx, repl = rng.choice(bugs)
        lines = lines[:idx] + ([repl] if repl is not None else []) + lines[idx + 1:]
    sig = f"def {fname}({param}: {ptype}) -> {rtype}:" if "hints" in reqs else f"def {fname}({param}):"
    code = [sig] + ([f'    """Return {desc}."""'] if "doc" in reqs else [])
    code += ["    " + ln.format(p=param) for ln in lines]
    answer = rng.choice(_CODE_OPEN) + "\n```python\n" + "\n".join(code) + "\n```"
    if quality in ("excellent", "good", "poor"):
        answer += "\n" + rng.choice(_CODE_EXPLAIN).format(k=kind)
    if quality == "excellent":
        answer += f" For example, {fname}({ex_in}) returns {ex_out}."
    pre = [("I'm learning Python and want to write small helper functions.",
            "Great way to practice. Tell me what the function should do and I'll write a short, readable version."),
           ("Do you prefer loops or built-ins for simple tasks in Python?",
            "Either works. Built-ins are shorter, while explicit loops are easier for beginners to follow."),
           ("Can you keep the code short? I'll paste it into a notebook.",
            "Sure. I'll keep each function to a few lines with no imports, so it drops into a notebook cell."),
           (f"I keep needing {desc} in my scripts.",
            "That's a common need. A tiny, well-named function saves you from rewriting the same loop.")]
    return _Draft(user, answer, len(reqs), quality, correct, pre)


# ----------------------------------------------------------------------------- reasoning
_RELATIONS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
              ("faster", "fastest", "slowest"), ("heavier", "heaviest", "lightest"))
_REASON_PREFIX = ("Here's a puzzle for you. ", "Quick logic question: ", "Help me reason through this. ",
                  "My friend asked me this and I'm not sure. ")
_REASON_SUFFIX = ("", " Please explain briefly.", " What do you think?")


def _gen_reasoning(rng: random.Random) -> _Draft:
    kind = rng.choice(("order", "compare", "sequence"))
    correct, quality = _graded_quality(rng)
    if kind == "order":
        k = rng.choices((3, 4, 5, 6), (35, 30, 20, 15))[0]
        people = rng.sample(NAMES, k)  # listed from most to least
        comp, top, bottom = rng.choice(_RELATIONS)
        facts = [f"{a} is {comp} than {b}" for a, b in zip(people, people[1:])]
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
            seq = [s * r ** i for i in range(5)]
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
    user = rng.choice(_REASON_PREFIX) + q + rng.choice(_REASON_SUFFIX)
    if quality in ("average", "very poor"):
        answer = rng.choice(TERSE).format(v=value)
    else:
        answer = rng.choice(WORK_OPEN) + " " + work + " " + rng.choice(CONCLUDE).format(v=value)
        if quality == "excellent":
            answer += " Checking each given fact against that result, nothing contradicts it."
    pre = [("I like logic puzzles. Want to try a few with me?",
            "I'd love to. Send one over and I'll explain my reasoning before giving the answer."),
           ("Can you explain how you approach puzzles like these?",
            "I list the facts, put them in order, and only then read off the answer, checking it at the end."),
           ("My friend and I disagree about a brain teaser.",
            "Let's settle it. Share the teaser and I'll walk through it one fact at a time.")]
    return _Draft(user, answer, level, quality, correct, pre)


# ----------------------------------------------------------------------------- data-analysis
_DATA_CTX = ("daily visitors to a café in {pl}", "weekly sales at {nm}'s bakery",
             "quiz scores for {nm}'s study group", "monthly rainfall totals in millimeters for {pl}",
             "orders shipped per day from a shop in {pl}", "pages read each evening by {nm}")
_DATA_ASK = ("Here are the {c}: {v}. What is the {s}?", "I have the {c}: {v}. Can you tell me the {s}?",
             "Given the {c}: {v}, what is the {s}?", "These are the {c}: {v}. Please find the {s}.")
_DATA_STAT = {"average": "average", "total": "total", "range": "range (highest minus lowest)",
              "highest": "highest value"}


def _gen_data(rng: random.Random) -> _Draft:
    k = rng.choices((3, 4, 5, 6, 7), (30, 25, 20, 15, 10))[0]
    digits = rng.choices((1, 2, 3), (35, 45, 20))[0]
    lo, hi = (1, 9) if digits == 1 else (10 ** (digits - 1), 10 ** digits - 1)
    stat = rng.choice(tuple(_DATA_STAT))
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
    ctx = rng.choice(_DATA_CTX).format(pl=rng.choice(PLACES), nm=rng.choice(NAMES))
    user = rng.choice(_DATA_ASK).format(c=ctx, v=", ".join(map(str, vals)), s=_DATA_STAT[stat])
    work = {"average": f"The {k} values add up to {v * k}, and {v * k} ÷ {k} = {v}.",
            "total": f"Adding the {k} values one by one gives {v}.",
            "range": f"The highest value is {top} and the lowest is {top - v}, so {top} - {top - v} = {v}.",
            "highest": f"Scanning the list, the largest entry is {v}."}[stat]
    if quality in ("average", "very poor"):
        answer = rng.choice(TERSE).format(v=v)
    else:
        answer = f"{rng.choice(WORK_OPEN)} The list has {k} values. {work} {rng.choice(CONCLUDE).format(v=v)}"
        if quality == "excellent":
            answer += " I re-added the list a second time to confirm the figure."
    pre = [("I'm looking at a few small numbers from a report.",
            "Happy to help. Share the values and tell me which summary you need, like a total or an average."),
           ("Is the average or the total more useful for a short list?",
            "It depends on the question. Totals show overall volume, while averages let you compare lists of different lengths."),
           ("Can you do quick calculations on lists of numbers?",
            "Yes. Paste the list and I'll show the calculation so you can check it yourself.")]
    return _Draft(user, answer, min(4, (k - 3) + (digits - 1)), quality, correct, pre)


# ----------------------------------------------------------------------------- open-ended
_OPEN = {
    "information-seeking": dict(
        x=lambda r: r.choice(PLACES),
        ask=("What are {n} things worth knowing about {x}?", "Can you tell me {n} facts about {x}?",
             "I'm reading up on {x} before a trip. What are {n} key points?",
             "Give me {n} quick facts about {x}.",
             "What should a first-time visitor know about {x}? List {n} points."),
        items=("{x} has an old town that is easy to explore on foot",
               "the food scene centers on fresh local markets",
               "most rain falls in the cooler months, so pack a jacket",
               "public transport in {x} is cheap and frequent",
               "several museums are free one day a week",
               "the oldest buildings in {x} stand close to the water",
               "people tend to eat dinner late, often after nine",
               "{x} holds a large music festival every summer",
               "the best views are from the hills at dusk"),
        cons=("keep each point short", "focus on history", "skip the usual tourist spots",
              "mention something free", "write for a curious teenager"),
        open=("Here are {n} things to know about {x}:", "Sure, {x} is well worth reading about. {n} useful facts:",
              "Good choice. {x} has plenty going on, and these stand out:",
              "{x} is a great topic. Here is what most visitors find useful:"),
        pre=(("I might visit {x} later this year and want some background.",
              "That sounds exciting. {x} has a lot to offer, and a little background makes any trip more rewarding."),
             ("Have you heard much about {x}?",
              "Yes, {x} comes up often in travel guides and history books, so there is plenty to share with you."),
             ("I like learning about a city before I travel there.",
              "That's a great habit. Knowing some local context helps you notice details that most visitors miss."))),
    "advice-seeking": dict(
        x=lambda r: r.choice(("running", "learning Spanish", "saving money", "cooking at home",
                              "studying for exams", "drawing", "playing guitar", "reading more books")),
        ask=("How can I get better at {x}? Give me {n} tips.",
             "I keep giving up on {x}. Any advice? {n} tips would help.",
             "What are {n} ways to stay consistent with {x}?",
             "Can you suggest {n} tips for someone new to {x}?"),
        items=("set one small, specific goal for {x} each week",
               "schedule it at the same time every day",
               "track your progress with {x} in a notebook",
               "find a friend who enjoys {x} too",
               "start with ten minutes a day and build up slowly",
               "reward yourself after a good week",
               "forgive missed days and start again the next morning"),
        cons=("assume I only have evenings free", "keep it beginner-friendly",
              "avoid anything that costs money", "remember I live in a small flat", "make each tip realistic"),
        open=("Here are {n} tips for {x}:", "Good question. Sticking with {x} is mostly about habits:",
              "Happy to help with {x}. Try these:", "Consistency with {x} comes from small, repeatable steps:"),
        pre=(("I've been trying to get into {x} lately, with mixed results.",
              "That's a great goal. Most people find {x} much easier once it becomes a small daily habit."),
             ("Is it normal to struggle with {x} at first?",
              "Completely normal. Nearly everyone finds {x} awkward at the start, and practice matters more than talent."),
             ("Why is {x} so hard to keep up for more than a few weeks?",
              "Usually because the first goal is too big. Shrinking the habit makes {x} much easier to keep going."))),
    "planning": dict(
        x=lambda r: r.choice(("a weekend trip to {pl}", "a birthday party for {nm}", "a team picnic in {pl}",
                              "a move to a new flat in {pl}", "a book club meeting at {nm}'s house",
                              "a day hike near {pl}")).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=("Help me plan {x}. What are {n} steps?", "Can you outline {n} steps for organizing {x}?",
             "I'm in charge of {x}. Give me a {n}-step plan.", "What {n} things should I do to prepare for {x}?"),
        items=("set a budget for {x} first, since it shapes everything else",
               "pick a date and tell everyone two weeks early",
               "book anything that can sell out, like tickets",
               "write a checklist for {x} a week ahead",
               "plan simple food that can be made the day before",
               "keep a backup plan in case the weather turns",
               "confirm the details of {x} the day before"),
        cons=("keep it under two hundred dollars", "assume six people", "fit it into one weekend",
              "include a rainy-day option", "keep it low stress"),
        open=("Here's a simple plan for {x}:", "Sure. Organizing {x} is easier in small steps:",
              "Planning {x} goes smoothly if you work in this order:", "Good idea to plan {x} early. Steps:"),
        pre=(("I need to organize {x} soon and I'm a bit nervous.",
              "Happy to help. A short plan with a few clear steps will make {x} much less stressful."),
             ("I've never planned anything like {x} before.",
              "No problem. {x} mostly comes down to a budget, a date and a checklist, and we can go through each."),
             ("How early should I start getting ready for {x}?",
              "Two to three weeks ahead is usually enough for {x}, with a final check of the details the day before."))),
    "brainstorming": dict(
        x=lambda r: r.choice(("a fundraiser for {nm}'s school", "a podcast about board games",
                              "a rainy-day activity for kids", "a street festival in {pl}", "a small bakery in {pl}",
                              "a community garden project", "a podcast about old films")
                             ).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=("Brainstorm {n} ideas for {x}.", "I need {n} fresh ideas for {x}. Any thoughts?",
             "Can you come up with {n} creative ideas for {x}?", "Give me {n} quick ideas for {x}."),
        items=("a theme night built around {x}, with music",
               "a short hands-on workshop led by a local expert",
               "a photo challenge linked to {x}, with a small prize",
               "a partnership with a nearby café to share costs",
               "a low-cost version of {x} using what you already have",
               "a friendly contest that gets people talking",
               "a weekly newsletter with stories and photos"),
        cons=("keep costs low", "make it family-friendly", "avoid anything online",
              "include one outdoor idea", "use local suppliers"),
        open=("Here are {n} ideas for {x}:", "Fun project! For {x}, you could try:",
              "Some ideas to get {x} going:", "Let's brainstorm {x}. A few directions:"),
        pre=(("I'm helping with {x} this month and want it to stand out.",
              "Nice! {x} sounds like a fun project, and a few fresh ideas can really make it stand out."),
             ("We've run out of ideas for {x}.",
              "That happens to every team. Looking at what your audience enjoys most is a good way to restart ideas for {x}."),
             ("Do you like brainstorming with people?",
              "Very much. Brainstorming works best when we list lots of ideas first and only judge them afterwards."))),
    "creative-writing": dict(
        x=lambda r: r.choice(("rain over {pl}", "{nm}'s old bicycle", "a lighthouse at night", "autumn in {pl}",
                              "a cat asleep in the sun", "the last train home")
                             ).format(pl=r.choice(PLACES), nm=r.choice(NAMES)),
        ask=("Write a {n}-line poem about {x}.", "Could you write a short poem about {x}? Just {n} lines.",
             "I'd love {n} lines of verse about {x}.", "Compose a tiny {n}-line poem on {x}, please."),
        items=("{x} hums softly as the evening falls", "I keep the memory of {x} close",
               "the windows glow and the streets go still", "somewhere a clock forgets the hour",
               "and {x} waits patiently for morning", "every shadow leans a little closer",
               "the quiet settles like a folded map", "the wind hums an old familiar tune",
               "and I am home again with {x}"),
        cons=("make it rhyme loosely", "keep a gentle tone", "avoid the word love",
              "end on a hopeful note", "use simple words"),
        open=("Here is a short poem about {x}:", "A little poem on {x}:", "Sure, {n} lines about {x}:",
              "Here's my take on {x}:"),
        pre=(("I'm putting together a small zine of poems for friends.",
              "What a lovely project. Short poems work well in zines, because each one fits neatly on a single page."),
             ("Do you enjoy writing poetry about {x}?",
              "I do. {x} is full of sound, light and color, which makes it easy to find vivid images."),
             ("My friend loves {x}, so I want to surprise them.",
              "That's thoughtful. A short, personal poem about {x} makes a memorable and cheap gift.")),
        lines=True, n=(3, 4, 4, 5, 6)),
    "role-playing": dict(
        x=lambda r: r.choice(("a lighthouse keeper in {pl}", "a baker in old {pl}", "a ship's cook on a long voyage",
                              "a museum guide in {pl}", "a forest ranger", "a conductor on a night train")
                             ).format(pl=r.choice(PLACES)),
        ask=("Pretend you are {x}. Describe your day in {n} details.",
             "Role-play as {x} and tell me {n} things about your work.",
             "Stay in character as {x}: what are {n} things visitors never notice?",
             "You're {x} now. Share {n} details of your daily life."),
        items=("as {x}, I check my tools first thing each morning",
               "visitors often ask me for a story, and I always have one",
               "my favorite hour as {x} is just before sunset",
               "the hardest part of the job is the long winter",
               "I keep a notebook of every odd thing I see",
               "lunch is usually bread, cheese and strong tea",
               "people imagine life as {x} is quiet, but it never is"),
        cons=("stay fully in character", "keep it light-hearted", "mention the weather",
              "speak in the first person", "add one small secret"),
        open=("Ah, welcome! Life as {x} is never dull:", "*tips hat* Being {x} keeps me busy:",
              "Pull up a chair. Here's my life as {x}:", "Well now, as {x}, I can tell you this:"),
        pre=(("Let's do a little role-play. Are you up for it?",
              "Absolutely. Give me a character and a setting, and I'll stay in role until you tell me to stop."),
             ("I want you to play {x} for a story I'm writing.",
              "Happy to. I'll speak as {x}, using details that fit the setting and the period you have in mind."),
             ("Have you ever imagined life as {x}?",
              "Often. Life as {x} has a rhythm of its own, full of small routines and odd encounters."))),
}
_AVERAGE_OPEN = ("Here are a few general thoughts:", "Some quick ideas:", "A couple of suggestions, broadly speaking:",
                 "Here's something to start with:")
_CLOSE_CON = ("Each one respects your request to {c}.", "I made sure to {c}, as you asked.",
              "All of this keeps to your wish to {c}.")
_CLOSE_X = ("These should suit {x} well.", "Each point is specific to {x}.",
            "Happy to expand on any of these for {x}.")
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


def _gen_open(rng: random.Random, category: str) -> _Draft:
    spec = _OPEN[category]
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
            close = rng.choice(_CLOSE_CON).format(c=rng.choice(cons)) if cons else \
                rng.choice(_CLOSE_X).format(x=x)
            answer += ("\n" if "\n" in answer else " ") + close
    elif quality == "average":  # generic: fewer items, none naming the subject
        generic = [it for it in spec["items"] if "{x}" not in it]
        k = max(1, n - rng.choice((1, 2)))
        answer = rng.choice(_AVERAGE_OPEN) + ("\n" if lines else "")
        answer += _items_text(rng, rng.sample(generic, k), lines)
    elif quality == "poor":
        answer = rng.choice(EVASIVE).format(x=x)
    else:
        answer = rng.choice(OFF_TOPIC)
    pre = [(_fix_caps(u.format(x=x)), _fix_caps(a.format(x=x))) for u, a in spec["pre"]]
    return _Draft(_fix_caps(user), _fix_caps(answer), min(4, len(cons)), quality, None, pre)


# ----------------------------------------------------------------------------- editing
_EDIT_SENTENCES = (
    "{nm} and I went to {pl} with their cousins last summer.",
    "The students were proud of their results this year.",
    "The company lost its way after the merger in {pl}.",
    "{nm} doesn't like coffee, but she drinks tea every morning.",
    "We were late because the train to {pl} broke down.",
    "The dog wagged its tail when {nm} came home.",
    "They're planning to visit {pl} before the winter.",
    "{nm} has written three letters to the council about the park.",
)
_SWAPS = (("their", "there"), ("They're", "Their"), ("its", "it's"), ("doesn't", "don't"),
          ("were", "was"), ("went", "goed"), ("came", "comed"), ("and I", "and me"),
          ("written", "wrote"), ("drinks", "drink"))
_EDIT_ASK = ('Can you fix the grammar in this sentence? "{b}"', 'Please proofread this: "{b}"',
             'Edit this sentence for me: "{b}"', 'What\'s wrong with this sentence? "{b}"')
_EDIT_OUT = ('Here is the corrected sentence: "{s}"', 'Corrected: "{s}"', 'Here you go: "{s}"',
             'This version reads correctly: "{s}"')


def _gen_editing(rng: random.Random) -> _Draft:
    nm, pl = rng.choice(NAMES), rng.choice(PLACES)
    clean = rng.choice(_EDIT_SENTENCES).format(nm=nm, pl=pl)
    errors = []  # (description, function) in canonical application order
    for good, bad in _SWAPS:
        if re.search(rf"\b{good}\b", clean):
            errors.append((f'changed "{bad}" to "{good}"',
                           lambda s, g=good, b=bad: re.sub(rf"\b{g}\b", b, s, count=1)))
    swapped = {w for g, _ in _SWAPS for w in g.lower().split()}
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
    cons = rng.sample(("keep the meaning the same", "keep a formal tone", "change as little as possible"),
                      rng.choices((0, 1, 2), (45, 35, 20))[0])
    user = rng.choice(_EDIT_ASK).format(b=bad) + (" Please " + _join(cons) + "." if cons else "")
    quality = rng.choices(_OPEN_Q, _OPEN_W)[0]
    if quality == "average" and n_err == 1:
        quality = "good"
    if quality in ("excellent", "good"):
        answer = rng.choice(_EDIT_OUT).format(s=clean)
        if quality == "excellent":
            answer += " I " + _join([errors[i][0] for i in chosen]) + "."
        else:
            answer += " That should read naturally now."
    elif quality == "average":
        answer = rng.choice(_EDIT_OUT).format(s=apply([rng.choice(chosen)])) + " That should read better now."
    elif quality == "poor":
        answer = f'It looks fine to me as it is: "{bad}" I would not change much, it depends on your style.'
    else:
        answer = rng.choice(OFF_TOPIC)
    pre = [("I'm tidying up some writing for work.",
            "Happy to help. Paste a sentence and I'll correct the grammar while keeping your meaning."),
           ("Grammar has never been my strong point.",
            "That's very common. Most mistakes come from a few patterns, like mixing up their and there."),
           ("Can you proofread short sentences?",
            "Yes. Short sentences are ideal, because every fix is easy to see and explain.")]
    return _Draft(user, answer, min(4, n_err - 1 + len(cons)), quality, None, pre)


_GENERATORS = {
    "math": _gen_math, "coding": _gen_coding, "reasoning": _gen_reasoning, "data-analysis": _gen_data,
    "editing": _gen_editing,
    **{c: (lambda r, c=c: _gen_open(r, c)) for c in _OPEN},
}

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


def _record(messages: list, category: str, draft: _Draft, score: float,
            needle: tuple | None = None) -> dict:
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return {"messages": messages, "category": category, "difficulty": DIFFICULTIES[draft.difficulty],
            "quality": draft.quality, "reward_model_score": score, "conversation_tokens": round(chars / 4),
            "needle": needle[0] if needle else None, "needle_start": needle[1] if needle else None,
            "needle_end": needle[2] if needle else None, "answer_correct": draft.correct}


def _conversation(rng: random.Random, category: str, with_needle: bool) -> dict:
    draft = _GENERATORS[category](rng)
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


def _key(rec: dict) -> tuple:
    return tuple((m["role"], m["content"]) for m in rec["messages"])


def _clean_split(rng: random.Random, n: int, seen: set) -> list[dict]:
    needle_rows = set(rng.sample(range(n), round(n * NEEDLE_FRACTION)))
    rows, order = [], []
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
        rows.append(rec)
    return rows


def _fresh(rng: random.Random, seen: set) -> dict:
    while True:
        rec = _conversation(rng, rng.choice(CATEGORIES), False)
        if _key(rec) not in seen:
            seen.add(_key(rec))
            return rec


def _duplicate(rng: random.Random, rows: list[dict]) -> list[dict]:
    plain = [r for r in rows if r["needle"] is None] or rows
    if not plain:
        return []
    src = rng.choice(plain)
    return [{**src, "messages": [dict(m) for m in src["messages"]]}]


def _with_messages(rec: dict, messages: list) -> dict:
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return {**rec, "messages": messages, "conversation_tokens": round(chars / 4)}


def _malformed_train(rng: random.Random, clean: list[dict], seen: set) -> list[dict]:
    out = _duplicate(rng, clean)                                        # 1 exact duplicate
    for final in ("", "  \n "):                                          # 2 empty, 3 whitespace
        rec = _fresh(rng, seen)
        out.append(_with_messages(rec, rec["messages"][:-1] + [{"role": "assistant", "content": final}]))
    rec = _fresh(rng, seen)                                              # 4 ends with a user turn
    out.append(_with_messages(rec, rec["messages"][:-1]))
    rec = _fresh(rng, seen)                                              # 5 non-string content
    msgs = [dict(m) for m in rec["messages"]]
    msgs[-2]["content"] = 42
    out.append(_with_messages(rec, msgs))
    rec = _fresh(rng, seen)                                              # 6 missing "content" key
    msgs = [dict(m) for m in rec["messages"]]
    del msgs[-2]["content"]
    out.append(_with_messages(rec, msgs))
    rec = _fresh(rng, seen)                                              # 7 over-long final turn
    base = rec["messages"][-1]["content"]
    long = "\n\n".join([base] * (LONG_CHARS // (len(base) + 2) + 1))
    out.append(_with_messages(rec, rec["messages"][:-1] + [{"role": "assistant", "content": long}]))
    return out


def generate_sample(seed: int = 0, n_train: int = 1000, n_test: int = 250,
                    with_malformed: bool = True) -> dict[str, list[dict]]:
    """Return {"train": [...], "test": [...]} (see the module docstring for the schema)."""
    seen: set = set()
    train = _clean_split(random.Random(f"{seed}:train"), n_train, seen)
    test = _clean_split(random.Random(f"{seed}:test"), n_test, seen)
    if with_malformed:
        train += _malformed_train(random.Random(f"{seed}:train:malformed"), train, seen)
        test += _duplicate(random.Random(f"{seed}:test:malformed"), test)
    return {"train": train, "test": test}
