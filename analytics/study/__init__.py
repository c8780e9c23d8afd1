"""The whole selection study as one command: `python -m analytics.study configs/study_cpu.yaml`.

ingest -> finetune (the base adapter) -> eval loss base/adapter -> attribution -> subsets -> hidden
states + SAE + codes -> predictor -> selection experiments -> LDS -> report, each step through its
own command (analytics.study.config: the YAML schema; analytics.study.runner: skip-or-run;
analytics.study.report: runs/study-<id>/study.md). See docs/selection.md, "The whole study as one
command".
"""
