"""The selection experiment's summary: paired statistics of every comparison, the plot and the report.

`summarize` turns the finished arms' records (analytics.select_arms) into per-seed and pooled
differences with 95% CIs and the bootstrap's own p (analytics.select_stats), `plot` draws them
(one panel per metric), `report` prints them; analytics.select_experiment calls all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analytics import select_arms as sa
from analytics.select_stats import compare, level
from store.core import StoreError
from trainers.plots import save_figure


def _pairs(recs: list[dict[str, Any]], rows_key: str, value: str, weight: str | None) -> tuple[np.ndarray, ...]:
    """[S, n] values of each record, checked to be over the same rows; and the weights [n]."""
    rows = recs[0][rows_key]
    for r in recs:
        if r[rows_key] != rows:
            raise StoreError(
                f"arm {r['arm']} (seed {r['seed']}) was measured on other rows than arm {recs[0]['arm']}; "
                f"the experiment's eval rows changed: rerun it from scratch (another store or config)"
            )
    v = np.array([r[value] for r in recs], dtype=np.float64)
    w = np.array(recs[0][weight], dtype=np.float64) if weight else np.ones(len(rows))
    return v, w


def summarize(
    cfg: Any, recs: dict[str, dict[str, Any]], comps: list[sa.Comparison], base: dict[str, Any]
) -> dict[str, Any]:
    """Per-seed and pooled differences of every comparison, and the base adapter's figures."""
    rng = np.random.default_rng(cfg.stats_seed)
    out: dict[str, Any] = {}
    n_tok = np.array(base["n_tokens"], dtype=np.float64)
    for c in comps:
        A = [recs[f"s{s}-{c.a}"] for s in range(cfg.seeds)]
        B = [recs[f"s{s}-{c.b}"] for s in range(cfg.seeds)]
        la, w = _pairs([base, *A], "eval_row_ids", "loss_sum", "n_tokens")
        lb, _ = _pairs([base, *B], "eval_row_ids", "loss_sum", "n_tokens")
        entry: dict[str, Any] = {"a": c.a, "b": c.b, "seeds": list(range(cfg.seeds))}
        res = compare(la[1:] - lb[1:], w, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.stats_seed)
        entry["eval_loss"] = {
            "per_seed": [e.as_dict() for e in res["per_seed"]],
            "pooled": res["pooled"].as_dict(),
            "a_mean": float(np.mean([r["eval_loss"] for r in A])),
            "b_mean": float(np.mean([r["eval_loss"] for r in B])),
        }
        if base["downstream"] is not None:
            ca, w1 = _pairs([base, *A], "math_row_ids", "correct", None)
            cb, _ = _pairs([base, *B], "math_row_ids", "correct", None)
            res = compare(ca[1:] - cb[1:], w1, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.stats_seed + 1)
            entry["downstream"] = {
                "per_seed": [e.as_dict() for e in res["per_seed"]],
                "pooled": res["pooled"].as_dict(),
                "a_mean": float(ca[1:].mean()),
                "b_mean": float(cb[1:].mean()),
            }
        else:
            entry["downstream"] = None
        out[c.name] = entry
    figures = {
        "adapter": base["adapter"],
        "eval_loss": level(np.array(base["loss_sum"]), n_tok, cfg.n_boot, rng),
        "downstream": (
            level(np.array(base["correct"], dtype=float), np.ones(len(base["correct"])), cfg.n_boot, rng)
            if base["downstream"] is not None
            else None
        ),
        "downstream_reason": base["downstream_reason"],
    }
    return {"comparisons": out, "base": figures}


DOWNSTREAM = {"math": "math accuracy", "rule": "rule followed"}


def plot(summary: dict[str, Any], path: Path, title: str, metric: str = "math") -> Path:
    """Per-seed differences with their 95% CIs and the pooled one, one panel per metric."""
    from matplotlib.figure import Figure

    comps = summary["comparisons"]
    metrics = [m for m in ("eval_loss", "downstream") if any(c[m] for c in comps.values())]
    fig = Figure(figsize=(6.2 * len(metrics), 4.3))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = {
        "eval_loss": "eval loss difference a - b (nats/token; < 0: a better)",
        "downstream": f"{DOWNSTREAM[metric]} difference a - b (> 0: a better)",
    }
    for ax, m in zip(axes, metrics, strict=False):
        width = 0.7 / max(1, len(comps))
        for j, (_name, c) in enumerate(comps.items()):
            pts = c[m]["per_seed"] + [c[m]["pooled"]]
            x = np.arange(len(pts), dtype=float)
            x[-1] += 0.5
            x += -0.35 + width * (j + 0.5)
            est = np.array([p["estimate"] for p in pts])
            lo, hi = np.array([p["ci_low"] for p in pts]), np.array([p["ci_high"] for p in pts])
            bars = ax.errorbar(
                x[:-1],
                est[:-1],
                yerr=[est[:-1] - lo[:-1], hi[:-1] - est[:-1]],
                fmt="o",
                capsize=3,
                label=f"{c['a']} - {c['b']} (pooled p {c[m]['pooled']['p_value']:.3g})",
            )
            ax.errorbar(
                x[-1:],
                est[-1:],
                yerr=[est[-1:] - lo[-1:], hi[-1:] - est[-1:]],
                fmt="D",
                ms=8,
                capsize=5,
                color=bars[0].get_color(),
            )
        n_seeds = len(next(iter(comps.values()))["seeds"])
        ax.set_xticks(list(range(n_seeds)) + [n_seeds + 0.5], [f"seed {s}" for s in range(n_seeds)] + ["pooled"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel(labels[m])
        b = summary["base"][m]
        what = "eval loss" if m == "eval_loss" else DOWNSTREAM[metric]
        ax.set_title(f"{title}\nbase adapter's {what}: {b[0]:.4f} [{b[1]:.4f}, {b[2]:.4f}]" if b else title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _fmt(e: dict[str, Any], pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
    return f"{f(e['estimate'])} [{f(e['ci_low'])}, {f(e['ci_high'])}] p={e['p_value']:.3g}"


def report(res: dict[str, Any]) -> str:
    b = res["base"]
    what = DOWNSTREAM[res["downstream"].get("metric", "math")]
    head = (
        f"selection experiment {res['run_id']}: {res['selector']}, k {res['k']}, {res['seeds']} seeds, "
        f"{res['budget']['steps']} steps per arm (batch {res['budget']['batch_size']}, lr {res['budget']['lr']}); "
        f"{res['trained_arms']} arms trained, {res['reused_arms']} reused"
    )
    scale = f"base adapter {b['adapter']}: eval loss {b['eval_loss'][0]:.4f} over {res['eval']['rows']} rows" + (
        f", {what} {b['downstream'][0]:.3f} over {res['downstream']['rows']} rows"
        if b["downstream"]
        else f"; downstream skipped: {b['downstream_reason']}"
    )
    lines = [head, scale]
    for c in res["comparisons"].values():
        lines.append(f"{c['a']} - {c['b']} (estimate [95% CI] p):")
        for s, e in zip(c["seeds"], c["eval_loss"]["per_seed"], strict=False):
            d = c["downstream"]["per_seed"][s] if c["downstream"] else None
            lines.append(f"  seed {s}: eval loss {_fmt(e)}" + (f"; {what} {_fmt(d, True)}" if d else ""))
        d = c["downstream"]["pooled"] if c["downstream"] else None
        lines.append(
            f"  pooled: eval loss {_fmt(c['eval_loss']['pooled'])}" + (f"; {what} {_fmt(d, True)}" if d else "")
        )
    lines += [
        f"JSON {Path(res['plot']).with_suffix('.json')}",
        f"plot {res['plot']}",
        f"table {sa.TABLE} (SELECT * FROM {sa.TABLE} WHERE run_id = '{res['run_id']}')",
    ]
    return "\n".join(lines)


def result_doc(
    cfg: Any,
    run_id: str,
    resolved: str,
    base: Any,
    budget: dict[str, Any],
    done: dict[str, dict[str, Any]],
    arms: list[sa.Arm],
    subsets: dict[str, str],
    sizes: dict[str, int],
    prior: set[str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The experiment's result document (select_experiment.json) from its committed arms; `prior`
    are the arms committed before this invocation started (reported as reused)."""
    reused = sorted(a for a in prior if a in subsets)
    return {
        "run_id": run_id,
        "selector": resolved,
        "k": cfg.k,
        "seeds": cfg.seeds,
        "ablation": cfg.ablation,
        "base_adapter": base.name if base else None,
        "status": "finished",
        "budget": budget,
        "eval": {
            "split": cfg.eval_split,
            "rows": len(done["base"]["eval_row_ids"]),
            "supervised_tokens": int(sum(done["base"]["n_tokens"])),
        },
        "arms": [
            {
                "arm": a.name,
                "seed": a.seed,
                "subset": subsets[a.arm_id],
                "n_train_rows": sizes[a.arm_id],
                "adapter": done[a.arm_id]["adapter"],
                "eval_loss": done[a.arm_id]["eval_loss"],
                "downstream": done[a.arm_id]["downstream"],
                "reused": a.arm_id in reused,
            }
            for a in arms
        ],
        "reused_arms": len(reused),
        "trained_arms": len(arms) - len(reused),
        **summary,
        "method": {
            "difference": "a - b; eval loss token-weighted (negative: a better), downstream "
            "accuracy (positive: a better)",
            "ci": f"95% percentile bootstrap, {cfg.n_boot} resamples, paired by eval row; pooled: "
            f"seeds and rows resampled independently (crossed), seed {cfg.stats_seed}",
            "p_value": f"primary: the bootstrap's own two-sided p from the same {cfg.n_boot} replicates "
            "as the CI (rows, and pooled also seeds, resampled): p < 0.05 exactly when the 95% CI excludes 0",
            "p_sign_flip_rows": f"secondary: two-sided sign-flip permutation test on per-row differences "
            f"pooled over seeds ({cfg.n_perm} permutations); rows only, conditional on these seeds' arms",
        },
    }
