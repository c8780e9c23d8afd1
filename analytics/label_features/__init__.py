"""Automatic labels for SAE features, scored, with a chance baseline and a hand-review loop;
and an export of the SAE's codes in EleutherAI delphi's latent-cache layout.

    python -m analytics.label_features --sae latest --features 20
    python -m analytics.label_features --sae latest --explainer HuggingFaceTB/SmolLM2-360M-Instruct
    python -m analytics.label_features --sae latest --export-review review.csv
    python -m analytics.label_features --sae latest --import-review review.csv
    python -m analytics.label_features --sae latest --export-delphi /tmp/delphi-run

Each feature's examples come from the stored codes as delphi's loader draws them (samples.py):
top and quantile windows for the explainer, held-out activating and random non-activating
windows for the scorers. The explainer writes in delphi's prompt form (prompts.py) through any
Hugging Face causal LM (llm.py, outputs cached by prompt hash); a deterministic explanation
(top tokens, logit effects, metadata) needs no LLM. Detection and fuzzing scorers read the
scorer model's Yes/No next-token log-probabilities (scoring.py, metrics.py); every
explanation is also scored on other features' examples (the shuffled chance baseline).
command.py runs it all into table `feature_labels`; review.py is the CSV loop; delphi.py the
export.
"""
