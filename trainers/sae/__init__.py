"""Sparse autoencoders on stored hidden states: training (`train`, `fit`, `run`), checkpoints,
held-out QA (`eval`, `qa`), layer sweeps; the command is `python -m trainers.sae` (`cli`)."""
