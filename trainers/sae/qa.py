"""The QA gate of `python -m trainers.sae`: pass/fail checks on an SAE's held-out metrics.

Our users' acceptance criteria (their RL-decoder notes), each threshold a config field:

| check | metric (trainers.sae.eval) | default |
|---|---|---|
| reconstruction | `nmse`: MSE / input variance (= FVU) on held-out tokens | < 0.01 |
| model behaviour | `kl_mean`: KL(clean || spliced), nats per spliced token | < 0.5 |
| sparsity | mean L0: = k for TopK (within 0.5), in [50, 100] otherwise | |
| capacity | `dead_fraction`: features that never fire on held-out tokens | < 0.05 |

A check whose metric was not computed (KL with `--ce-rows 0`) is `skipped` and does not
fail the gate. `--qa report` prints the table and records it (run record, metrics.json,
the `saes` table); `--qa strict` does the same and then exits with status 1 when a check
failed; `--qa off` skips it.
"""

from __future__ import annotations

from typing import Any


def qa_checks(metrics: dict[str, Any], cfg: Any, architecture: str, k: int | None) -> dict[str, Any]:
    """{"mode", "passed", "checks": [{check, metric, value, threshold, status}]} for `metrics`."""
    e, ce = metrics.get("eval", {}), metrics.get("ce", {})
    lo, hi = cfg.qa_l0_band
    checks = [
        ("reconstruction", "nmse", e.get("nmse"), f"< {cfg.qa_max_nmse:g}", lambda v: v < cfg.qa_max_nmse),
        ("model behaviour", "kl_mean", ce.get("kl_mean"), f"< {cfg.qa_max_kl:g} nats", lambda v: v < cfg.qa_max_kl),
    ]
    if architecture == "topk" and k:
        checks.append(("sparsity", "l0", e.get("l0"), f"= k = {k} (within 0.5)", lambda v: abs(v - k) <= 0.5))
    else:
        checks.append(("sparsity", "l0", e.get("l0"), f"in [{lo:g}, {hi:g}]", lambda v: lo <= v <= hi))
    checks.append(
        ("capacity", "dead_fraction", e.get("dead_fraction"), f"< {cfg.qa_max_dead:g}", lambda v: v < cfg.qa_max_dead)
    )
    rows = []
    for check, metric, value, threshold, ok in checks:
        status = "skipped" if value is None else "pass" if ok(float(value)) else "fail"
        rows.append({"check": check, "metric": metric, "value": value, "threshold": threshold, "status": status})
    return {"mode": cfg.qa, "passed": all(r["status"] != "fail" for r in rows), "checks": rows}


def qa_table(qa: dict[str, Any]) -> str:
    """The gate as a fixed-width table (also valid Markdown)."""
    lines = ["| check | metric | value | threshold | result |", "|---|---|---|---|---|"]
    for r in qa["checks"]:
        v = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"| {r['check']} | {r['metric']} | {v} | {r['threshold']} | {r['status'].upper()} |")
    lines.append(f"QA {'PASSED' if qa['passed'] else 'FAILED'}")
    return "\n".join(lines)
