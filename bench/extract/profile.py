"""Where a benchmarked method's time goes: torch.profiler over one call, top ops by self CPU time.

    python -m bench.extract --rows 30 --threads 1 --profile --methods packed forward_windows saelens

`profiled(fn, tokens)` runs `fn()` once under `torch.profiler` (CPU, plus CUDA on a GPU) and
returns its result with an `OpProfile`: every aten op's self time and calls, the wall and
process CPU seconds of the call, and the tokens it covered. `op_table(profiles, top)` puts
several methods side by side: the union of each one's `top` ops, in ms per 1k tokens and as a
share of that method's profiled self time, so two paths over the same tokens compare op by op
(a method that is faster per token shows where: fewer calls, or the same calls cheaper).

Self CPU time is the time spent in an op itself (not its children), measured as wall time on
the calling thread: with `--threads 1` it is the op's compute; the process CPU time beside it
tells how much the machine's load stretched the wall clock (wall / CPU > 1: waiting for a core).
Python outside aten ops (hooks, the HF model's glue, Arrow writes) is `other`: the call's
wall time minus its ops' self time. The process's kernel CPU time and minor page faults over
the call (getrusage) show what no op owns: memory the allocator maps afresh and the kernel
zeroes (extractors/model.py (keep_freed_memory)). The profiler's own cost is a few microseconds per op
(~0.1-1 % of these forwards); profiled figures are for shares, the timed rounds for rates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import print_table

OTHER = "other (python, untraced)"


@dataclass
class OpProfile:
    """One profiled call: `ops` maps an op name to (self seconds, calls)."""

    tokens: int
    wall_seconds: float
    cpu_seconds: float
    ops: dict[str, tuple[float, int]] = field(default_factory=dict)
    sys_seconds: float | None = None  # of cpu_seconds, in the kernel (page faults: zeroing new pages)
    minor_faults: int | None = None

    @property
    def traced_seconds(self) -> float:
        return sum(s for s, _ in self.ops.values())

    def top(self, n: int) -> list[str]:
        """The n ops with the most self time, then `other` when the untraced rest is positive."""
        names = sorted(self.ops, key=lambda k: -self.ops[k][0])[:n]
        return names + ([OTHER] if self.other_seconds > 0 else [])

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.traced_seconds)

    def seconds(self, name: str) -> float:
        return self.other_seconds if name == OTHER else self.ops.get(name, (0.0, 0))[0]

    def calls(self, name: str) -> int | None:
        return None if name == OTHER else self.ops.get(name, (0.0, 0))[1]

    def as_dict(self, top: int) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = [
            {
                "op": k,
                "self_seconds": self.seconds(k),
                "calls": self.calls(k),
                "ms_per_1k_tokens": 1e6 * self.seconds(k) / self.tokens,
                "share": self.seconds(k) / max(self.wall_seconds, self.traced_seconds),
            }
            for k in self.top(top)
        ]
        d["ms_per_1k_tokens"] = 1e6 * self.wall_seconds / self.tokens
        d["cpu_ms_per_1k_tokens"] = 1e6 * self.cpu_seconds / self.tokens
        d["sys_ms_per_1k_tokens"] = None if self.sys_seconds is None else 1e6 * self.sys_seconds / self.tokens
        d["minor_faults_per_token"] = None if self.minor_faults is None else self.minor_faults / self.tokens
        return d


def profiled(fn: Callable[[], Any], tokens: int = 0, cuda: bool = False) -> tuple[Any, OpProfile]:
    """Run fn() once under torch.profiler; returns (fn's result, its OpProfile over `tokens`,
    which the caller may set afterwards when only the result knows them)."""
    from torch.profiler import ProfilerActivity, profile  # lazy: heavy

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    r0 = _rusage()
    c0, t0 = time.process_time(), time.perf_counter()
    with profile(activities=acts) as prof:
        out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1 = _rusage()
    ops: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep"):
            s, n = ops.get(e.key, (0.0, 0))
            ops[e.key] = (s + e.self_cpu_time_total / 1e6, n + e.count)
    sys_s, faults = (r1[0] - r0[0], r1[1] - r0[1]) if r0 and r1 else (None, None)
    return out, OpProfile(tokens, wall, cpu, ops, sys_s, faults)


def _rusage() -> tuple[float, int] | None:
    """(kernel CPU seconds, minor page faults) of this process so far; None off Unix."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_minflt


def op_table(profiles: dict[str, OpProfile], top: int = 10) -> str:
    """The methods' top ops side by side (ms per 1k tokens, share); prints and returns it."""
    names: list[str] = []
    for p in profiles.values():
        names += [k for k in p.top(top) if k not in names and k != OTHER]
    names.append(OTHER)
    first = next(iter(profiles.values()))
    names.sort(key=lambda k: (k == OTHER, -first.seconds(k)))
    rows = []
    for k in names:
        row: dict[str, Any] = {"op": k if len(k) <= 44 else k[:41] + "..."}
        for m, p in profiles.items():
            total = max(p.wall_seconds, p.traced_seconds)
            row[f"{m}_ms"] = 1e6 * p.seconds(k) / p.tokens
            row[f"{m}_share"] = p.seconds(k) / total
            row[f"{m}_calls"] = p.calls(k)
        rows.append(row)
    total_row: dict[str, Any] = {"op": "total (wall) / process CPU"}
    for m, p in profiles.items():
        total_row[f"{m}_ms"] = 1e6 * p.wall_seconds / p.tokens
        total_row[f"{m}_share"] = p.cpu_seconds / p.wall_seconds if p.wall_seconds else None
    rows.append(total_row)
    cpu_row: dict[str, Any] = {"op": "process CPU / of it in the kernel"}
    fault_row: dict[str, Any] = {"op": "minor page faults per token"}
    for m, p in profiles.items():
        cpu_row[f"{m}_ms"] = 1e6 * p.cpu_seconds / p.tokens
        cpu_row[f"{m}_share"] = p.sys_seconds / p.cpu_seconds if p.sys_seconds is not None and p.cpu_seconds else None
        fault_row[f"{m}_ms"] = p.minor_faults / p.tokens if p.minor_faults is not None else None
    rows += [cpu_row, fault_row]
    cols = [("op", "op (ms per 1k tokens, share, calls)", "")]
    for m in profiles:
        cols += [(f"{m}_ms", m, ",.1f"), (f"{m}_share", "share", ".1%"), (f"{m}_calls", "calls", ",")]
    text = print_table(rows, cols)
    print(
        "(last rows: each method's wall ms per 1k tokens and process CPU / wall; its process CPU ms per 1k "
        "tokens and the kernel's share of it; minor page faults per token)"
    )
    return text
