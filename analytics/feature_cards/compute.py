"""The statistics of a batch of feature cards, from the stored codes sorted once.

The codes of every token of the committed rows (analytics.label_features.inputs.TokenCodes:
top-k indices and values [n_tokens, k], never densified to [n_tokens, d_sae]) are sorted
once by (feature, -activation, token) over the token set's active slots
(analytics.label_features.samples.sort_firing, shared with the labeller, so both see the same
firing tokens in the same order). A feature's firing tokens, strongest first, are then one
slice of that order, and a batch of features is a handful of array operations on its slices:

    top contexts   the first `top_k` slots (ties: the earlier token first)
    quantiles      delphi's quantile examples: the firing tokens split into Q equal-count bins
                   by activation (bin Q the strongest), `per_quantile` evenly spaced samples of
                   each bin; listed from bin Q down, strongest first
    histogram      HIST_BINS equal bins from 0 to the feature's maximum (np.histogram's rule:
                   each bin half-open but the last)
    density        n_firing / token-set tokens; mean_act is the mean over the firing tokens
    logit effects  W_dec[f] @ W_U^T, top and bottom `n`: the direct path of the decoder
                   direction through the unembedding (inputs.unembedding folds the final norm's
                   scale into W_U, as TransformerLens' fold_ln does for sae_vis / Neuronpedia)

A context is the window of +-`context` tokens around the firing token, cut at its row's ends,
with the feature's activation at each window token (0 off the token set, as in the sort).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from analytics.feature_cards.schema import HIST_BINS
from analytics.label_features.inputs import TokenCodes
from analytics.label_features.samples import Firing

WINDOW_BLOCK = 4096  # contexts whose windows are gathered at once ([block, 2N+1, k] ids)


class CardOptions(NamedTuple):
    top_k: int
    context: int
    n_quantiles: int
    per_quantile: int


def quantile_picks(n: int, n_quantiles: int, per_quantile: int) -> list[tuple[int, int]]:
    """(quantile 1..Q, offset into the strongest-first order) of the samples of a feature that
    fires on n tokens: bin q spans ascending ranks [q n / Q, (q + 1) n / Q), and its s samples
    sit at the middles of s equal parts of the bin. Listed from bin Q down, strongest first."""
    out = []
    for q in range(n_quantiles - 1, -1, -1):
        lo, hi = (q * n) // n_quantiles, ((q + 1) * n) // n_quantiles  # ascending-order bounds
        m = hi - lo
        s = min(per_quantile, m)
        for j in range(s - 1, -1, -1):
            out.append((q + 1, n - 1 - (lo + ((2 * j + 1) * m) // (2 * s))))
    return out


def histograms(firing: Firing, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([F, HIST_BINS + 1] edges, [F, HIST_BINS] counts): equal bins from 0 to each feature's max
    (all zero for a feature that never fires)."""
    lo, hi = firing.start[feats], firing.start[feats + 1]
    top = np.zeros(len(feats))
    fires = hi > lo
    top[fires] = firing.act[lo[fires]]  # strongest first: the first slot is the maximum
    steps = np.arange(HIST_BINS + 1, dtype=np.float64)
    edges = steps[None, :] * (top / HIST_BINS)[:, None]  # np.linspace(0, max, HIST_BINS + 1), bit for bit
    edges[:, -1] = top
    counts = np.zeros((len(feats), HIST_BINS), dtype=np.int64)
    if not fires.any():
        return edges, counts
    f_local = np.repeat(np.arange(len(feats)), hi - lo)
    sl = np.concatenate([np.arange(x, y) for x, y in zip(lo, hi, strict=True)])
    a = firing.act[sl].astype(np.float64)
    t = top[f_local]
    bins = np.clip((a * (HIST_BINS / t)).astype(np.int64), 0, HIST_BINS - 1)

    def edge(j: np.ndarray) -> np.ndarray:
        return np.where(j == HIST_BINS, t, j * (t / HIST_BINS))

    # np.histogram's correction of the rounding at bin edges: a value below its bin's left edge
    # moves down one bin, one at or above the right edge (but the last bin's) moves up one.
    bins -= a < edge(bins)
    bins += (a >= edge(bins + 1)) & (bins != HIST_BINS - 1)
    counts[:] = np.bincount(f_local * HIST_BINS + bins, minlength=len(feats) * HIST_BINS).reshape(-1, HIST_BINS)
    return edges, counts


def windows(c: TokenCodes, bounds: tuple[np.ndarray, np.ndarray], pos: np.ndarray, feats: np.ndarray, context: int):
    """([m] first token, [m] one past the last, [m, 2N+1] activation of feature feats[i] at each
    window token, 0 past the window's ends) of the m contexts centred on tokens `pos`."""
    lo = np.maximum(bounds[0][pos], pos - context)
    hi = np.minimum(bounds[1][pos], pos + context + 1)
    acts = np.zeros((len(pos), 2 * context + 1), dtype=np.float32)
    off = np.arange(-context, context + 1)
    for s in range(0, len(pos), WINDOW_BLOCK):
        p, f = pos[s : s + WINDOW_BLOCK], feats[s : s + WINDOW_BLOCK]
        win = p[:, None] + off[None, :]
        ok = (win >= lo[s : s + WINDOW_BLOCK, None]) & (win < hi[s : s + WINDOW_BLOCK, None])
        safe = np.where(ok, win, 0)
        hit = (c.idx[safe] == f[:, None, None]) & (ok & c.in_set[safe])[:, :, None]
        acts[s : s + WINDOW_BLOCK] = (c.val[safe] * hit).sum(-1)
    return lo, hi, acts


def contexts(c: TokenCodes, bounds, pos: np.ndarray, feats: np.ndarray, context: int) -> list[dict[str, Any]]:
    """The context structs (schema.CONTEXT) of the windows around tokens `pos`."""
    lo, hi, acts = windows(c, bounds, pos, feats, context)
    row_of = np.searchsorted(c.row_start, pos, side="right") - 1
    out = []
    for i, p in enumerate(pos.tolist()):
        a, b = int(lo[i]), int(hi[i])
        start = a - (p - context)  # where the row-cut window starts in the full one
        out.append(
            {
                "row_id": c.row_ids[row_of[i]],
                "token_pos": int(c.token_pos[p]),
                "act": float(acts[i, context]),
                "tokens": c.text[a:b],
                "acts": acts[i, start : start + b - a].tolist(),
                "center": p - a,
            }
        )
    return out


def batch_cards(c: TokenCodes, firing: Firing, feats: np.ndarray, opt: CardOptions) -> list[dict[str, Any]]:
    """The codes-only columns of the cards of `feats` (schema.SCHEMA: n_tokens .. hist_counts)."""
    bounds = c.row_bounds()
    lo, hi = firing.start[feats], firing.start[feats + 1]
    picks: list[tuple[int, int, int, int]] = []  # (card, quantile (0 = top), slot, feature)
    for i, (f, a, b) in enumerate(zip(feats.tolist(), lo.tolist(), hi.tolist(), strict=True)):
        n = b - a
        picks += [(i, 0, a + j, f) for j in range(min(opt.top_k, n))]
        picks += [(i, q, a + off, f) for q, off in quantile_picks(n, opt.n_quantiles, opt.per_quantile)]
    cards: list[dict[str, Any]] = [{"top_contexts": [], "quantiles": []} for _ in feats]
    if picks:
        p = np.array(picks, dtype=np.int64)
        ctx = contexts(c, bounds, firing.pos[p[:, 2]], p[:, 3], opt.context)
        for (i, q, _, _), x in zip(picks, ctx, strict=True):
            if q == 0:
                cards[i]["top_contexts"].append(x)
            else:
                cards[i]["quantiles"].append({"quantile": q} | x)
    edges, counts = histograms(firing, feats)
    for i in range(len(feats)):
        n = int(hi[i] - lo[i])
        acts = firing.act[lo[i] : hi[i]]
        cards[i] |= {
            "feature": int(feats[i]),
            "n_tokens": firing.n_tokens,
            "n_firing": n,
            "density": n / max(firing.n_tokens, 1),
            "max_act": float(acts[0]) if n else None,
            "mean_act": float(acts.astype(np.float64).mean()) if n else None,
            "hist_edges": edges[i].tolist() if n else [],
            "hist_counts": counts[i].tolist() if n else [],
        }
    return cards


def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, feats: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """(top ids, top values, bottom ids, bottom values) [F, n] of W_dec[feats] @ W_U^T."""
    with torch.no_grad():
        eff = W_dec[torch.as_tensor(feats)].to(W_U) @ W_U.T
        top = eff.topk(n, dim=-1)
        bot = eff.topk(n, dim=-1, largest=False)
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), bot.indices.cpu().numpy(), bot.values.cpu().numpy()
