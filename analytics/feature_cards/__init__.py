"""Feature cards: per SAE feature, its top and quantile contexts, activation histogram, density,
logit effects, metadata associations, importance and attribution correlation, computed in one
pass over the stored codes (no per-feature query, no model run) into table `feature_cards`.

    python -m analytics.feature_cards --sae latest
    python -m analytics.feature_cards --sae latest --layer 17 --top-k 20 --context 8 --features 3 17 40
    python -m analytics.feature_cards --sae latest --export-delphi /tmp/delphi-run

schema.py is the table's pyarrow schema (the feature browser imports it); inputs.py reads what
a card joins from the rest of the store; compute.py computes a batch of cards from the codes
sorted once; command.py is the resumable run (one table part and one JSON per batch).
"""
