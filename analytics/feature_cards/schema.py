"""The `feature_cards` table: one row per (SAE, layer, feature), written by
`python -m analytics.feature_cards` and read by the feature browser (analytics.browse), which
imports `SCHEMA` from here so that both sides speak the same columns.

    sae, layer, feature, run_id     which card, and the run that wrote it
    n_tokens                        tokens of the SAE's token set (its training view) with codes
    n_firing, density               token-set tokens where the feature is > 0, and n_firing / n_tokens
    max_act, mean_act               its largest activation, and the mean over the firing tokens
    top_contexts                    the top-K firing tokens, strongest first, each with its window
    quantiles                       samples of each of Q equal-count activation quantiles
                                    (quantile Q = the strongest), each with its window
    hist_edges, hist_counts         HIST_BINS equal bins from 0 to max_act, over the firing tokens
    logit_top_*, logit_bottom_*     the tokens W_dec[f] raises / lowers most through the unembedding
    assoc                           the strongest metadata associations (feature_metadata_assoc)
    importance, importance_*        effect, method, metric of feature_importance (null when absent)
    attribution_rho                 Spearman's rho of the row-mean activation with the attribution
                                    rank (null when absent)

A context: `row_id`, `token_pos` (position of the firing token in its row), `act` (its
activation), `tokens` (the window's token texts, at most `--context` each side, cut at the
row's ends), `acts` (the feature's activation at each window token, 0 off the token set) and
`center` (the index of the firing token in `tokens`).
"""

from __future__ import annotations

import pyarrow as pa

TABLE = "feature_cards"
HIST_BINS = 20

CONTEXT_FIELDS = [
    ("row_id", pa.string()),
    ("token_pos", pa.int32()),
    ("act", pa.float32()),
    ("tokens", pa.list_(pa.string())),
    ("acts", pa.list_(pa.float32())),
    ("center", pa.int32()),
]
CONTEXT = pa.struct(CONTEXT_FIELDS)
QUANTILE_CONTEXT = pa.struct([("quantile", pa.int32()), *CONTEXT_FIELDS])
ASSOC = pa.struct(
    [
        ("field", pa.string()),
        ("level", pa.string()),
        ("stat", pa.string()),
        ("effect", pa.float64()),
        ("p_value", pa.float64()),
        ("q_value", pa.float64()),
    ]
)

SCHEMA = pa.schema(
    [
        ("sae", pa.string()),
        ("layer", pa.int32()),
        ("feature", pa.int32()),
        ("run_id", pa.string()),
        ("n_tokens", pa.int64()),
        ("n_firing", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float64()),
        ("mean_act", pa.float64()),
        ("top_contexts", pa.list_(CONTEXT)),
        ("quantiles", pa.list_(QUANTILE_CONTEXT)),
        ("hist_edges", pa.list_(pa.float64())),
        ("hist_counts", pa.list_(pa.int64())),
        ("logit_top_tokens", pa.list_(pa.string())),
        ("logit_top_values", pa.list_(pa.float32())),
        ("logit_bottom_tokens", pa.list_(pa.string())),
        ("logit_bottom_values", pa.list_(pa.float32())),
        ("assoc", pa.list_(ASSOC)),
        ("importance", pa.float64()),
        ("importance_method", pa.string()),
        ("importance_metric", pa.string()),
        ("attribution_rho", pa.float64()),
    ]
)
