"""CPU forwards without page-fault churn: keep freed memory in the process (glibc's malloc).

A CPU forward allocates and frees the same large activations every layer ([tokens, d_ff] fp32
is 50 MB at 8,192 tokens for SmolLM2). glibc serves blocks above its mmap threshold (at most
32 MB in its dynamic mode) with a fresh `mmap` and returns them with `munmap`, and trims the
heap's free top beyond its trim threshold: so every layer's buffers come back as new pages,
and the kernel faults and zeroes them again. Measured on the embedded SmolLM2 (2026-12-03, 1
thread, 11,785 tokens in 8,192-token packed batches): ~150 minor page faults per token, 15 %
of the forward's CPU time in the kernel; with the thresholds below, ~0 faults and 17-20 % less
CPU time per token (docs/performance.md, "Packed batches"). SAELens, PyTorch and transformers
pay the same on CPU; CUDA has its own caching allocator and is unaffected.

`keep_freed_memory()` raises both thresholds (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so
large blocks come from the heap and freed ones are reused by the next layer instead of being
returned to the kernel. Effect: the process keeps its peak heap (about one forward's
activations) resident until it exits. It is what `MALLOC_MMAP_THRESHOLD_` /
`MALLOC_TRIM_THRESHOLD_` do, set in code where a CPU model is loaded (`extractors.model.
load_model`), not through the environment. The first call decides for the process (later
calls return that decision): `keep_freed_memory(False)` first keeps glibc's defaults, which is
how `bench.extract --malloc default` measures the difference. A no-op where the C library has
no `mallopt` (macOS, musl), returning False. Stored values are unaffected (only where memory
comes from changes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap (glibc refusing that: its 32 MiB maximum)
DYNAMIC_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top instead of trimming it

_applied: bool | None = None


def keep_freed_memory(enable: bool = True) -> bool:
    """Raise glibc's mmap and trim thresholds once per process (module docstring); whether applied."""
    global _applied
    if _applied is None:
        _applied = False
        if enable and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX) == 1
            _applied = bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied
