"""Seeded uniform samples of a view's tokens (or rows), drawn without sorting the selection.

`materialize(store, view, array, sample=N, seed=S)` keeps N lines of the view; in SQL the same
sample is `SELECT * FROM sample_tokens('view_name', N, seed := S)` (sql/views/sample_tokens.sql).

The method: every token gets a 64-bit key that depends only on the seed and its `tok_index`,

    key(t, S) = mix64(mix64(S) + (t + 1) * GOLDEN)   (mod 2^64)

i.e. output t + 1 of a SplitMix64 generator (Steele, Lea & Flood 2014; java.util.SplittableRandom)
seeded with mix64(S); and the sample is the N tokens with the smallest keys. numpy finds them
with `argpartition` (linear time, no sort of the selection); only the N kept keys are sorted, so
the sample comes back in key order. Guarantees:

* **reproducible**: the keys depend on the seed and tok_index alone, not on the view's row order,
  DuckDB's thread count or the file layout, so two runs, and two stores of the same tokenization
  (the same tok_index for the same token), draw the same tokens;
* **exactly N**, or every line when the selection has fewer than N (then nothing is dropped);
* **uniform without replacement**: mix64 is a bijection of 64-bit words and t -> mix64(S) + (t+1)
  * GOLDEN is injective (GOLDEN is odd), so distinct tokens have distinct keys (no ties); the N
  smallest of pseudo-random keys are a uniform N-subset, as far as SplitMix64 passes for random
  (it passes BigCrush);
* **nested**: for one seed and view, the sample of k < N is the first k lines of the sample of N;
  different seeds give unrelated samples.

A row-level view (row_id, no token columns: whole rows) samples N rows, each keyed by its first
token's tok_index (`row_layout.tok_start`), and returns all their tokens.
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finalizer (Stafford's Mix13)
_MASK = (1 << 64) - 1


def check_sample(sample: int, seed: int) -> None:
    """A sample size is a positive int, a seed an int in 0 .. 2^64 - 1 (else a clear error)."""
    if isinstance(sample, bool) or not isinstance(sample, int | np.integer) or sample <= 0:
        raise ValueError(f"sample must be a positive number of tokens (or rows), got {sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= _MASK:
        raise ValueError(f"seed must be an integer in 0 .. 2**64 - 1, got {seed!r}")


def mix64(z: int) -> int:
    """SplitMix64's finalizer on one 64-bit int (the seed's mixing)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _C1) & _MASK
    z = ((z ^ (z >> 27)) * _C2) & _MASK
    return z ^ (z >> 31)


def sample_keys(tok_index: np.ndarray, seed: int) -> np.ndarray:
    """uint64 key of each tok_index under `seed` (the SQL macro sample_key computes the same)."""
    z = np.asarray(tok_index).astype(np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        z += np.uint64(1)
        z *= np.uint64(GOLDEN)
        z += np.uint64(mix64(int(seed)))
        z ^= z >> np.uint64(30)
        z *= np.uint64(_C1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(_C2)
    z ^= z >> np.uint64(31)
    return z


def smallest(keys: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n smallest keys, in key order (ties, if any, by position); all of them
    when there are n or fewer. Linear time: only the n kept keys are sorted."""
    keep = np.argpartition(keys, n - 1)[:n] if n < len(keys) else np.arange(len(keys))
    kept = keys[keep]
    order = np.argsort(kept)  # introsort: 3x faster than a stable sort of 20k keys
    if len(kept) > 1 and not np.all(np.diff(kept[order]) > 0):  # ties (a token on several lines)
        keep.sort()
        order = np.argsort(keys[keep], kind="stable")  # ... broken by position
    return keep[order]


def draw(tok_index: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of the seeded sample of n lines keyed by `tok_index` (see the module docstring)."""
    check_sample(n, seed)
    return smallest(sample_keys(tok_index, seed), int(n))
