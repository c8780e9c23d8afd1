"""Benchmark of the feature cards: `python -m bench.feature_cards` (bench.feature_cards.run).

A folder of its own, as bench/ holds its dozen modules already (tests/test_architecture.py).
"""

from bench.feature_cards.run import main

__all__ = ["main"]
