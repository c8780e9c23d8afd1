"""A tiny store for the feature browser's tests, written by hand: one `saes` row, a
`feature_cards` table in the cards' schema, and `feature_labels` rows (an automatic run with
its shuffled baseline, and one human label that must win). Token strings carry markup, quotes
and newlines, so a page that does not escape shows it. The cards' schema is the real one
(analytics.feature_cards.schema); a second, newer run holds a card of one feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from analytics.feature_cards.schema import SCHEMA as CARDS_SCHEMA
from analytics.label_features import review
from extractors.sae.load import write_sae_record
from store.core import Store

SAE, LAYER, CARDS_RUN, LABEL_RUN = "tiny-sae", 3, "feature_cards-fixture", "label_features-fixture"
NEWER_RUN, NEWER = "feature_cards-fixture2", 20  # a newer run with a card of feature 20 (a rerun under way)
NASTY = ["<script>window.__pwned=1</script>", "&amp;", '"q"', "'", "\n", "<img src=x onerror=window.__pwned=1>"]
WORDS = ["alpha", " beta", " gamma", " delta", " apple", "42", " +", " the", " and", ".", " math", " needle"]
FIELDS = [("category", "math"), ("category", "coding"), ("difficulty", "hard"), ("quality", "poor"), ("planted", None)]

DEAD = 7  # a feature that never fires: empty contexts and histogram


def _context(rng: np.random.Generator, f: int, act: float, vocab: list[str]) -> dict:
    n, centre = 9, 4
    acts = (rng.random(n) * act * 0.6).astype(np.float32)
    acts[rng.random(n) < 0.5] = 0
    acts[centre] = act
    toks = [vocab[int(i)] for i in rng.integers(0, len(vocab), n)]
    toks[centre] = vocab[f % len(vocab)]
    return {
        "row_id": f"row-{int(rng.integers(0, 50)):03d}",
        "token_pos": int(rng.integers(0, 200)),
        "act": float(act),
        "tokens": toks,
        "acts": [float(a) for a in acts],
        "center": centre,
    }


def card(rng: np.random.Generator, f: int, run_id: str = CARDS_RUN) -> dict:
    vocab = WORDS + NASTY
    n_tokens = 5000
    dead = f == DEAD
    n_firing = 0 if dead else int(rng.integers(5, 400))
    max_act = 0.0 if dead else float(np.float32(rng.uniform(1, 10)))
    top_acts = np.sort(rng.uniform(0.2, 1.0, 0 if dead else 6))[::-1] * max_act
    top_acts[:1] = max_act
    top = [_context(rng, f, float(np.float32(a)), vocab) for a in top_acts]
    quant = [{"quantile": q} | _context(rng, f, float(np.float32(max_act * q / 4)), vocab) for q in (1, 2, 3)]
    quant = [] if dead else quant
    bins = 0 if dead else 10
    edges = list(np.linspace(0, max_act, bins + 1)) if bins else []
    counts = list(rng.multinomial(n_firing, np.ones(bins) / bins)) if bins else []
    fields = [FIELDS[i] for i in sorted(rng.choice(len(FIELDS), int(rng.integers(0, 3)), replace=False))]
    assoc = [
        {
            "field": fld,
            "level": lvl,
            "stat": "auroc" if lvl else "spearman",
            "effect": float(rng.uniform(0.55, 0.95) if lvl else rng.uniform(-0.5, 0.5)),
            "p_value": float(rng.uniform(0, 1e-3)),
            "q_value": float(rng.uniform(0, 1e-2)),
        }
        for fld, lvl in fields
    ]
    return {
        "sae": SAE,
        "layer": LAYER,
        "feature": f,
        "run_id": run_id,
        "n_tokens": n_tokens,
        "n_firing": n_firing,
        "density": n_firing / n_tokens,
        "max_act": max_act,
        "mean_act": float(np.mean(top_acts)) if not dead else 0.0,
        "top_contexts": top,
        "quantiles": quant,
        "hist_edges": [float(e) for e in edges],
        "hist_counts": [int(c) for c in counts],
        "logit_top_tokens": [vocab[(f + i) % len(vocab)] for i in range(5)],
        "logit_top_values": [float(np.float32(2.0 - 0.3 * i)) for i in range(5)],
        "logit_bottom_tokens": [vocab[(f + 7 + i) % len(vocab)] for i in range(5)],
        "logit_bottom_values": [float(np.float32(-2.0 + 0.3 * i)) for i in range(5)],
        "assoc": assoc,
        "importance": None if f % 5 == 4 else float(rng.normal(0, 0.1)),
        "importance_method": "ap",
        "importance_metric": "completion_loss",
        "attribution_rho": None if f % 3 else float(rng.uniform(-0.3, 0.3)),
    }


LABELS = {3: 'mentions of <b>bold</b> & "quotes"', 5: "numbers", 12: "the word <script>"}
HUMAN = {5: "digits in arithmetic answers (hand label)"}


def label_rows() -> list[dict]:
    rows = []
    for i, (f, text) in enumerate(sorted(LABELS.items())):
        common = {"sae": SAE, "layer": LAYER, "feature": f, "source": "auto", "run_id": LABEL_RUN}
        rows.append(
            common
            | {"explanation": text, "explainer": "tiny", "method": "llm", "auroc": 0.6 + 0.1 * i, "confidence": 0.2}
            | {"detection_bacc": 0.55 + 0.1 * i, "fuzzing_bacc": 0.5, "auroc_low": 0.5, "auroc_high": 0.9}
        )
        rows.append(
            common
            | {"explanation": "shuffled: " + text, "explainer": "shuffled(tiny)", "method": "shuffled"}
            | {"auroc": 0.5, "confidence": 0.0, "detection_bacc": 0.5, "fuzzing_bacc": 0.5}
        )
    return rows


def make_store(path: Path, n_features: int = 150, seed: int = 0, with_cards: bool = True) -> tuple[Store, list[dict]]:
    """The store at `path` with an SAE of n_features features, all with cards (unless not
    with_cards) and labels; (store, cards)."""
    store = Store(path)
    write_sae_record(
        store,
        name=SAE,
        layer=LAYER,
        architecture="topk",
        d_in=64,
        d_sae=n_features,
        k=8,
        path=str(path / "no-sae-folder"),
        source="local",
        run_id="sae-fixture",
        metrics={},
    )
    rng = np.random.default_rng(seed)
    cards = [card(rng, f) for f in range(n_features)]
    if with_cards:
        store.write_table("feature_cards", pa.Table.from_pylist(cards, schema=CARDS_SCHEMA), part=CARDS_RUN)
        if n_features > NEWER:
            cards[NEWER] = card(rng, NEWER, NEWER_RUN)
            one = pa.Table.from_pylist([cards[NEWER]], schema=CARDS_SCHEMA)
            store.write_table("feature_cards", one, part=NEWER_RUN)
    store.write_table(review.TABLE, pa.Table.from_pylist(label_rows(), schema=review.SCHEMA), part=LABEL_RUN)
    human = [
        {"sae": SAE, "layer": LAYER, "feature": f, "explanation": t, "explainer": "human", "method": "human"}
        | {"source": "human", "run_id": "human-20261203-000000-000000"}
        for f, t in HUMAN.items()
    ]
    store.write_table(review.TABLE, pa.Table.from_pylist(human, schema=review.SCHEMA), part="human-fixture")
    return store, cards
