"""The examples a feature is explained and scored on, drawn from the stored codes as delphi's
loader draws them from its latent cache (delphi/latents/constructors.py, samplers.py).

For each feature, its firing tokens in the SAE's token set, strongest first (one sort of every
active slot for all features). An example is the window of +-`context` tokens of the
feature's row around one firing token, with the feature's activation at each window token.

    explain   the `n_top` strongest windows and `per_quantile` from each of `n_quantiles`
              equal-count activation quantiles (delphi's "mix" of top and quantile examples)
    test      `n_test` other activating windows, evenly across the quantiles, none
              overlapping an explain window (held out: the explanation never saw them)
    control   `n_test` windows around random token-set tokens where the feature is 0 on
              the whole window (delphi's "random" non-activating source)

No two windows of a feature share a token (a candidate overlapping a window already taken is
skipped, as delphi pools one example per window). Sampling is seeded per feature, so
a feature's examples do not depend on which other features are labelled.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from analytics.label_features.inputs import TokenCodes


class Example(NamedTuple):
    tokens: list[str]  # the window's token texts
    acts: list[float]  # the feature's activation at each window token
    centre: int  # the token (index into TokenCodes) the window is centred on
    quantile: int  # 0 = a top example, 1..Q the quantile (Q strongest), -1 non-activating

    @property
    def activating(self) -> bool:
        return self.quantile >= 0


class FeatureExamples(NamedTuple):
    feature: int
    n_firing: int  # firing token-set tokens
    density: float  # n_firing / token-set tokens
    explain: list[Example]
    test: list[Example]
    control: list[Example]
    top_tokens: list[tuple[str, int]]  # the most frequent firing token texts (of the strongest 50)


class Firing(NamedTuple):
    """Every active slot of the token set, sorted by (feature, -activation, token)."""

    pos: np.ndarray
    act: np.ndarray
    start: np.ndarray  # [d_sae + 1] offsets of each feature's slots
    n_tokens: int


def sort_firing(c: TokenCodes, d_sae: int) -> Firing:
    active = (c.val > 0) & c.in_set[:, None]
    feat = c.idx[active]
    act = c.val[active]
    pos = np.repeat(np.arange(len(c.token_id)), c.idx.shape[1])[active.ravel()]
    order = np.lexsort((pos, -act, feat))
    return Firing(pos[order], act[order], np.searchsorted(feat[order], np.arange(d_sae + 1)), int(c.in_set.sum()))


def window(c: TokenCodes, bounds: tuple[np.ndarray, np.ndarray], feature: int, centre: int, context: int) -> Example:
    lo = max(int(bounds[0][centre]), centre - context)
    hi = min(int(bounds[1][centre]), centre + context + 1)
    hit = (c.idx[lo:hi] == feature) & c.in_set[lo:hi, None]
    acts = (c.val[lo:hi] * hit).sum(-1)
    return Example(c.text[lo:hi], [float(a) for a in acts], centre, 0)


def quantile_of(n: int, n_quantiles: int) -> np.ndarray:
    """[n] quantile 1..Q of each firing token in strongest-first order (Q = the strongest)."""
    asc = np.arange(n)[::-1]  # rank in ascending activation order
    return (asc * n_quantiles) // max(n, 1) + 1


def feature_examples(
    c: TokenCodes,
    firing: Firing,
    feature: int,
    *,
    context: int,
    n_top: int,
    n_quantiles: int,
    per_quantile: int,
    n_test: int,
    seed: int,
) -> FeatureExamples:
    """The explain, test and control examples of one feature (see the module docstring)."""
    sl = slice(int(firing.start[feature]), int(firing.start[feature + 1]))
    pos, n = firing.pos[sl], int(firing.start[feature + 1] - firing.start[feature])
    bounds = c.row_bounds()
    rng = np.random.default_rng([seed, feature])
    taken = np.zeros(len(c.token_id), dtype=bool)  # tokens inside a chosen window

    def take(i: int, quantile: int) -> Example | None:
        p = int(pos[i])
        lo, hi = max(int(bounds[0][p]), p - context), min(int(bounds[1][p]), p + context + 1)
        if taken[lo:hi].any():
            return None
        taken[lo:hi] = True
        return window(c, bounds, feature, p, context)._replace(quantile=quantile)

    q_of = quantile_of(n, n_quantiles)
    explain: list[Example] = []
    for i in range(n):
        if len(explain) >= n_top:
            break
        if (ex := take(i, 0)) is not None:
            explain.append(ex)
    for q in range(n_quantiles, 0, -1):
        members = np.flatnonzero(q_of == q)
        got = 0
        middle_first = members[np.argsort(np.abs(np.arange(len(members)) - len(members) // 2), kind="stable")]
        for i in middle_first:
            if got >= per_quantile:
                break
            if (ex := take(int(i), q)) is not None:
                explain.append(ex)
                got += 1
    test: list[Example] = []
    per_q = -(-n_test // n_quantiles)
    for q in range(n_quantiles, 0, -1):
        members = rng.permutation(np.flatnonzero(q_of == q))
        got = 0
        for i in members:
            if got >= per_q or len(test) >= n_test:
                break
            if (ex := take(int(i), q)) is not None:
                test.append(ex)
                got += 1
    control: list[Example] = []
    candidates = np.flatnonzero(c.in_set)
    fires = np.zeros(len(c.token_id), dtype=bool)
    fires[pos] = True
    for p in rng.permutation(candidates)[: 50 * max(n_test, 1)]:
        if len(control) >= n_test:
            break
        lo, hi = max(int(bounds[0][p]), p - context), min(int(bounds[1][p]), p + context + 1)
        if fires[lo:hi].any() or taken[lo:hi].any():
            continue
        ex = window(c, bounds, feature, int(p), context)
        taken[lo:hi] = True
        control.append(ex._replace(quantile=-1))
    texts: dict[str, int] = {}
    for p in pos[:50]:
        t = c.text[int(p)]
        texts[t] = texts.get(t, 0) + 1
    top_tokens = sorted(texts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return FeatureExamples(feature, n, n / max(firing.n_tokens, 1), explain, test, control, top_tokens)
