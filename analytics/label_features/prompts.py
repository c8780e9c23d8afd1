"""Prompts in delphi's form: the explainer's (delphi/explainers/default: examples with the
activating tokens between << >>, each followed by its normalized activations, the explanation
on a last line after [EXPLANATION]:) and the scorers' (delphi/scorers/classifier: detection
shows a plain window, fuzzing a window with marked tokens). Our scorers ask about one example
at a time and read the answer from the next-token probabilities of Yes and No, so a small
model needs no list format and every example gets a continuous score.
"""

from __future__ import annotations

import re

from analytics.label_features.samples import Example

HIGHLIGHT = 0.3  # delphi's Explainer.threshold: a token is marked above 0.3 x the window's max
MAX_ACTS_LISTED = 10  # delphi lists at most ~10 activations per example

EXPLAIN_SYSTEM = """You are a meticulous AI researcher conducting an important investigation into patterns found in \
language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns found \
in it.
Guidelines:

You will be given a list of text examples on which special words are selected and between delimiters like <<this>>. \
If a sequence of consecutive tokens all are important, the entire sequence of tokens will be contained between \
delimiters <<just like this>>. How important each token is for the behavior is listed after each example in \
parentheses.

- Try to produce a concise final description. Simply describe the text latents that are common in the examples, and \
what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important \
tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanations short and concise.
- The last line of your response must be the formatted explanation, using [EXPLANATION]:"""

# delphi's first few-shot example (explainers/default/prompts.py EXAMPLE_1_ACTIVATIONS), one shot:
# a 135M explainer's context and patience are short.
SHOT_USER = """
Example 1:  and he was <<over the moon>> to find
Activations: ("over", 5), (" the", 6), (" moon", 9)
Example 2:  we'll be laughing <<till the cows come home>>! Pro
Activations: ("till", 5), (" the", 5), (" cows", 8), (" come", 8), (" home", 8)
Example 3:  thought Scotland was boring, but really there's more <<than meets the eye>>! I'd
Activations: ("than", 5), (" meets", 7), (" the", 6), (" eye", 8)
"""
SHOT_ASSISTANT = "[EXPLANATION]: Common idioms in text conveying positive sentiment."

SCORER_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment", and one text \
example. Answer Yes or No."""

DETECTION = """Latent explanation: {explanation}

Text example:
{text}

Does this text example contain the latent? Answer Yes or No."""

FUZZING = """Latent explanation: {explanation}

Text example (portions between << and >> are marked as representing the latent):
{text}

Is every marked portion correctly labeled as an example of the latent? Answer Yes or No."""


def marked(acts: list[float]) -> list[bool]:
    top = max(acts) if acts else 0.0
    return [a > top * HIGHLIGHT and a > 0 for a in acts]


def highlight(tokens: list[str], marks: list[bool]) -> str:
    """delphi's Explainer._highlight: runs of marked tokens between << and >>."""
    out, i = [], 0
    while i < len(tokens):
        if marks[i]:
            out.append("<<")
            while i < len(tokens) and marks[i]:
                out.append(tokens[i])
                i += 1
            out.append(">>")
        else:
            out.append(tokens[i])
            i += 1
    return "".join(out)


def explain_messages(examples: list[Example], max_act: float) -> list[dict[str, str]]:
    """delphi's DefaultExplainer prompt (activations shown, no chain of thought), one shot.
    Activations are normalized to 0..10 by the feature's maximum, as delphi's loader does."""
    lines = []
    for j, ex in enumerate(examples, 1):
        m = marked(ex.acts)
        lines.append(f"Example {j}: {highlight(ex.tokens, m)}")
        acts = [
            f'("{t}", {round(10 * a / max_act) if max_act > 0 else 0})'
            for t, a, k in zip(ex.tokens, ex.acts, m, strict=True)
            if k
        ]
        lines.append("Activations: " + ", ".join(acts[:MAX_ACTS_LISTED]))
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": SHOT_USER},
        {"role": "assistant", "content": SHOT_ASSISTANT},
        {"role": "user", "content": "\n" + "\n".join(lines) + "\n"},
    ]


def parse_explanation(text: str) -> tuple[str, bool]:
    """(explanation, parsed): the text after [EXPLANATION]:, else the first non-empty line
    (a small model often drops the tag; `parsed` says which)."""
    m = re.search(r"\[EXPLANATION\]:\s*(.*)", text, re.DOTALL)
    if m and m.group(1).strip():
        return m.group(1).strip().splitlines()[0].strip(), True
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300], False
    return "(no explanation)", False


def scorer_messages(kind: str, explanation: str, text: str) -> list[dict[str, str]]:
    body = (DETECTION if kind == "detection" else FUZZING).format(explanation=explanation, text=text)
    return [{"role": "system", "content": SCORER_SYSTEM}, {"role": "user", "content": body}]
