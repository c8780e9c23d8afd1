"""The LDS run's scatter PNG (predicted vs measured eval loss, one panel per source) and its text report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from trainers.plots import save_figure


def _ci(v: dict[str, Any]) -> str:
    if v.get("lds") is None:
        return "LDS undefined (a constant side)"
    if v.get("ci_low") is None:
        return f"LDS {v['lds']:+.3f}"
    return f"LDS {v['lds']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"


def scatter(by_source: dict[str, dict[str, Any]], base_loss: float, path: Path, title: str) -> Path:
    """One panel per source that predicts: each subset's predicted benefit (x) against its adapter's
    eval loss (y), the base adapter's loss as a line; LDS and its 95% CI in the panel's title."""
    shown = {k: v for k, v in by_source.items() if "predicted" in v}
    fig = Figure(figsize=(4.2 * len(shown), 4.0), layout="constrained")  # keeps the suptitle off the panels
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (name, v) in zip(axes, shown.items(), strict=True):
        ax.scatter(v["predicted"], v["actual_loss"], s=22)
        ax.axhline(base_loss, color="grey", ls=":", lw=0.9, label=f"base adapter {base_loss:.4f}")
        ax.set_xlabel("predicted benefit (subset sum; higher = more helpful)", fontsize=7)
        if ax is axes[0]:
            ax.set_ylabel("eval loss after the subset's finetune (nats/token)", fontsize=8)
        ax.set_title(f"{name}\n{_ci(v)}", fontsize=9)
        ax.legend(fontsize=7)
    skipped = [f"{k}: {v['skipped_because']}" for k, v in by_source.items() if "predicted" not in v]
    fig.suptitle(title + ("\nskipped: " + "; ".join(skipped) if skipped else ""), fontsize=9)
    return save_figure(fig, path)


def report(res: dict[str, Any], path: Path) -> str:
    lines = [
        f"lds run {res['run_id']}: attribution {res['attribution']}, {len(res['units']) - 1} subsets of "
        f"{res['subset_rows']} of {res['pool']['rows']} pool rows, {res['budget']['steps']} steps each (batch "
        f"{res['budget']['batch_size']}, lr {res['budget']['lr']}); base adapter eval loss "
        f"{res['base_eval_loss']:.4f} on {res['eval']['rows']} {res['eval']['split']} rows",
        "LDS = Spearman(predicted benefit, -eval loss) over subsets, 95% bootstrap CI over subsets:",
    ]
    for name, v in res["sources"].items():
        if "skipped_because" in v and "predicted" not in v:
            lines.append(f"  {name}: skipped ({v['skipped_because']})")
        else:
            p = f", p {v['p_value']:.3g}" if v.get("p_value") is not None else ""
            lines.append(f"  {name}: {_ci(v)}{p}")
    lines += [f"JSON {path}", f"PNG {res['plot']}"]
    return "\n".join(lines)
