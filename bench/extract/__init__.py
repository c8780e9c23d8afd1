"""Extraction benchmark: `python -m bench.extract` (bench.extract.run), its op profile in
bench.extract.profile (`--profile`).

A folder of its own, as bench/ holds its dozen modules already (tests/test_architecture.py).
"""

from bench.extract.run import BenchExtractConfig, main, run_bench

__all__ = ["BenchExtractConfig", "main", "run_bench"]
