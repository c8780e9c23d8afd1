"""A layer sweep: `python -m trainers.sae --layers 10 12 14 16 17` trains one SAE per stored
layer with the same settings, one after another, and compares them.

Each layer is an ordinary `train_sae` run (trainers.sae.run), so each is resumable: a sweep
rerun after a kill reuses the layers whose run with these settings finished (their
metrics.json) and continues the interrupted one from its last checkpoint (`--resume auto`,
with `--checkpoint-every`). The sweep itself is a `sae_sweep` run whose folder gets
`sweep.json`, `sweep.md` (the comparison table) and `sweep.png`; the same rows go to the
catalog table `sae_sweeps` (one Parquet part per sweep run): layer, SAE, held-out explained
variance, KL(clean || spliced), CE loss recovered, L0, dead fraction, QA result, and the best
`category` AUROC of any feature, read with SQL from `feature_metadata_assoc` where
`python -m analytics.correlations` has run for that SAE (else empty; rerun the sweep
command after it to fill it in: finished layers are reused, not retrained).
"""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from store.catalog.runs import Run
from store.cli import config_dict
from store.core import Store, StoreError
from trainers.sae.qa import qa_checks
from trainers.sae.run import SAEResult, SAETrainConfig, find_runs, hidden_array, run_sae

TABLE = "sae_sweeps"
COLUMNS = [
    ("explained_variance", "EV"),
    ("kl_mean", "KL nats"),
    ("ce_loss_recovered", "CE recovered"),
    ("l0", "L0"),
    ("dead_fraction", "dead"),
    ("best_category_auroc", "best cat. AUROC"),
]


class SweepResult(NamedTuple):
    run_id: str
    rows: list[dict[str, Any]]
    table: str  # the comparison table (Markdown)
    passed: bool  # every layer passed the QA gate (or the gate is off)


def best_category_auroc(store: Store, sae: str, layer: int) -> tuple[float | None, str | None]:
    """The highest one-vs-rest AUROC of a feature for a `category` level, if analytics.correlations ran."""
    if not store.has_table("feature_metadata_assoc"):
        return None, None
    rows = store.query(
        "SELECT effect, level, feature FROM feature_metadata_assoc WHERE sae = ? AND layer = ? "
        "AND stat = 'auroc' AND field = 'category' ORDER BY effect DESC LIMIT 1",
        [sae, layer],
    ).to_pylist()
    if not rows:
        return None, None
    return float(rows[0]["effect"]), f"{rows[0]['level']} (feature {rows[0]['feature']})"


def _row(store: Store, sweep_id: str, layer: int, res: SAEResult, reused: bool) -> dict[str, Any]:
    m = res.metrics
    e, ce, qa = m.get("eval", {}), m.get("ce", {}), m.get("qa")
    auroc, what = best_category_auroc(store, res.sae_name, layer)
    return {
        "sweep_run_id": sweep_id,
        "layer": layer,
        "sae": res.sae_name,
        "sae_run_id": res.run_id,
        "explained_variance": e.get("explained_variance"),
        "nmse": e.get("nmse"),
        "kl_mean": ce.get("kl_mean"),
        "kl_share_above": ce.get("kl_share_above"),
        "ce_increase": ce.get("ce_increase"),
        "ce_loss_recovered": ce.get("ce_loss_recovered_vs_zero"),
        "l0": e.get("l0"),
        "dead_fraction": e.get("dead_fraction"),
        "qa_passed": qa["passed"] if qa else None,
        "best_category_auroc": auroc,
        "best_category_auroc_of": what,
        "reused": reused,
        "created_at": datetime.now(UTC),
    }


def _finished(store: Store, cfg: SAETrainConfig) -> SAEResult | None:
    for run_id in find_runs(store, cfg, finished=True):
        path = store.run_dir(run_id) / "metrics.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            m = doc["metrics"]
            if cfg.qa != "off" and m.get("qa", {}).get("mode") != cfg.qa:
                m["qa"] = qa_checks(m, cfg, m["architecture"], m.get("k"))
            return SAEResult(run_id, m["sae_path"], m["sae_name"], m)
    return None


def table_md(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, key: str) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "n/a"
        return (
            f"{v:.1%}" if key in ("dead_fraction", "ce_loss_recovered") else f"{v:.3f}" if key != "l0" else f"{v:.1f}"
        )

    head = "| layer | " + " | ".join(label for _, label in COLUMNS) + " | QA | SAE |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        qa = "n/a" if r["qa_passed"] is None else "pass" if r["qa_passed"] else "fail"
        lines.append(f"| {r['layer']} | " + " | ".join(f(r[k], k) for k, _ in COLUMNS) + f" | {qa} | {r['sae']} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes: one panel per compared metric against the layer."""
    from matplotlib.figure import Figure  # lazy: matplotlib only when a sweep ends

    fig = Figure(figsize=(13, 6.5))  # stand-alone Figure, never pyplot
    axes = fig.subplots(2, 3)
    layers = [r["layer"] for r in rows]
    for ax, (key, label) in zip(axes.flat, COLUMNS, strict=False):
        ys = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(layers, ys, "o-")
        if all(np.isnan(ys)):
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def run_sweep(cfg: SAETrainConfig) -> SweepResult:
    """Train (or reuse, or resume) one SAE per layer of cfg.layers, then compare them."""
    if cfg.resume not in ("auto", "never"):
        raise ValueError(
            f"--resume {cfg.resume} names one run; a sweep resumes each layer by itself: rerun the "
            f"same --layers command (with --resume auto)"
        )
    if cfg.sae is not None:
        raise ValueError("--sae evaluates one SAE; pass one --layer with it, not --layers")
    store = Store(cfg.store)
    missing = []
    for layer in cfg.layers:
        try:
            hidden_array(store, layer)
        except StoreError:
            missing.append(layer)
    if missing:
        raise StoreError(
            f"{store.root} has no hidden states for layer(s) {missing}; extract them first: "
            f"python -m extractors.run --layers {' '.join(map(str, missing))} --store {store.root}"
        )
    rows: list[dict[str, Any]] = []
    with Run(store, "sae_sweep", config_dict(cfg), layers=list(cfg.layers)) as run:
        for layer in cfg.layers:
            lcfg = dataclasses.replace(cfg, layers=[layer])
            prev = _finished(store, lcfg) if cfg.resume == "auto" else None
            res = prev or run_sae(lcfg)
            rows.append(_row(store, run.run_id, layer, res, reused=prev is not None))
            print(
                f"layer {layer}: {'reused' if prev else 'trained'} {res.run_id}, EV "
                f"{res.metrics['eval']['explained_variance']:.3f}",
                flush=True,
            )
        table = table_md(rows)
        store.write_json(run.dir / "sweep.json", {"run_id": run.run_id, "config": config_dict(cfg), "rows": rows})
        (run.dir / "sweep.md").write_text(table + "\n")
        (run.dir / "sweep.png").write_bytes(plot_sweep(rows, f"SAE layer sweep {run.run_id}"))
        store.write_rows(TABLE, rows, part=run.run_id)
        passed = all(r["qa_passed"] is not False for r in rows)
        run.finish(
            counts={"layers": len(rows), "reused": sum(r["reused"] for r in rows)},
            metrics={"rows": rows, "qa_passed": passed},
        )
    return SweepResult(run.run_id, rows, table, passed)
