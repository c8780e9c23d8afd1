"""Feature importance by attribution patching: which SAE features matter for a metric.

    python -m analytics.feature_importance --sae latest --layer 17 --metric completion_loss --exact 50
    python -m analytics.feature_importance --layer 17 --metric category:math --method ap ig --steps 10 --exact 50
    python -m analytics.feature_importance --layer 17 --metric probe:<name> --baseline mean

The SAE of layer L is spliced into the residual stream after block L, on the site tokens
(`--view`, default content_tokens) of the rows (`--split`, `--max-rows`), with its
reconstruction error as a node of its own (attribution.py). Each feature's effect on the
metric (inputs.py) is estimated by attribution patching (activation x gradient, one
backward) or integrated gradients (`--method ig --steps N`), and `--exact K` checks the
estimate against exact ablation of the top K features one at a time, with Spearman's rho
and a bootstrap CI (command.py). Marks et al. 2024, "Sparse feature circuits".
"""
