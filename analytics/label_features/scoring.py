"""Detection and fuzzing scores of one explanation on a feature's held-out examples, the
deterministic explanation, and the shuffled-explanation baseline.

    detection  the scorer sees each test (activating) and control (non-activating) window as
               plain text and says whether it has the latent described
    fuzzing    the scorer sees the same windows with tokens marked << >>: a test window has
               its activating tokens marked, a control window as many random tokens (delphi's
               FuzzingScorer: n_incorrect = the mean number of marked tokens of the test
               windows, rounded up); it says whether the marks are correct

Each gives balanced accuracy, F1 and AUROC (metrics.py); `auroc` of a label is the mean of the
two AUROCs, with a bootstrap CI, and `confidence` is how far that CI clears chance. The chance
baseline scores every feature with another feature's explanation (a derangement of the
selected features' explanations), so it keeps the explanations' style and length.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analytics.label_features import metrics
from analytics.label_features.llm import Scorer
from analytics.label_features.prompts import highlight, marked, scorer_messages
from analytics.label_features.samples import Example, FeatureExamples


def fuzz_marks(ex: FeatureExamples, rng: np.random.Generator) -> list[list[bool]]:
    """Marks of test windows (their activating tokens) then of control windows (random)."""
    test = [marked(e.acts) for e in ex.test]
    n_incorrect = max(1, math.ceil(np.mean([sum(m) for m in test]))) if test else 1
    out = list(test)
    for e in ex.control:
        m = [False] * len(e.tokens)
        for i in rng.choice(len(e.tokens), size=min(n_incorrect, len(e.tokens)), replace=False):
            m[int(i)] = True
        out.append(m)
    return out


def score_explanation(
    scorer: Scorer, explanation: str, ex: FeatureExamples, *, n_boot: int, seed: int
) -> dict[str, Any]:
    """Detection and fuzzing metrics of `explanation` on the feature's test and control windows."""
    windows: list[Example] = ex.test + ex.control
    y = np.array([w.activating for w in windows], dtype=bool)
    rng = np.random.default_rng([seed, ex.feature, 1])
    marks = fuzz_marks(ex, rng)
    det = scorer.yes_no([scorer_messages("detection", explanation, "".join(w.tokens)) for w in windows])
    fuz = scorer.yes_no(
        [scorer_messages("fuzzing", explanation, highlight(w.tokens, m)) for w, m in zip(windows, marks, strict=True)]
    )
    d, f = metrics.classify(det, y), metrics.classify(fuz, y)
    lo, hi = metrics.bootstrap_auroc([(det, y), (fuz, y)], n_boot, seed + ex.feature)
    aucs = [a for a in (d.auroc, f.auroc) if np.isfinite(a)]
    auc = float(np.mean(aucs)) if aucs else float("nan")  # nan: no held-out window of one class
    return {
        "detection_bacc": d.bacc,
        "detection_f1": d.f1,
        "detection_auroc": d.auroc,
        "fuzzing_bacc": f.bacc,
        "fuzzing_f1": f.f1,
        "fuzzing_auroc": f.auroc,
        "auroc": auc,
        "auroc_low": lo,
        "auroc_high": hi,
        "confidence": metrics.confidence(lo),
        "n_pos": d.n_pos,
        "n_neg": d.n_neg,
        "detection_scores": det.tolist(),
        "fuzzing_scores": fuz.tolist(),
    }


def deterministic_explanation(
    ex: FeatureExamples, logits_up: list[str] | None, assoc: list[dict[str, Any]] | None
) -> str:
    """The baseline that needs no LLM: the commonest firing tokens of the strongest examples,
    the tokens whose logits the feature raises most (W_dec @ W_U), its strongest metadata
    association."""
    parts = ["fires on tokens " + ", ".join(repr(t) for t, _ in ex.top_tokens[:5])]
    if logits_up:
        parts.append("promotes next tokens " + ", ".join(repr(t) for t in logits_up[:5]))
    if assoc:
        a = assoc[0]
        parts.append(f"most in rows with {a['field']} = {a['level']}" if a.get("level") else f"tracks {a['field']}")
    return "; ".join(parts)


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation with no fixed point (n >= 2): feature i gets explanation perm[i]."""
    if n < 2:
        raise ValueError("the shuffled baseline needs at least 2 features")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p
