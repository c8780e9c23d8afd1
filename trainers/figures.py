"""PNGs beside the gradient workflow's run JSON: a selector's precision-recall curve and a
steering effect by layer. Stand-alone matplotlib `Figure`s on the Agg canvas (never pyplot),
`save_figure` is also what analytics.plots uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a stand-alone Figure as PNG (Agg canvas, 110 dpi, tight box); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def pr_curve(y: np.ndarray, curves: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Precision-recall of each named score against the labels y (one line per score)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    y = np.asarray(y).astype(int)
    for name, s in curves.items():
        if y.min() == y.max():
            break
        p, r, _ = precision_recall_curve(y, s)
        ax.plot(r, p, label=f"{name} (AP {average_precision_score(y, s):.3f})")
    ax.axhline(y.mean() if len(y) else 0, color="grey", ls=":", label=f"prevalence {y.mean() if len(y) else 0:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title or "precision-recall, held-out rows")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def effect_by_layer(layers: Sequence[int], series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                    path: str | Path, ylabel: str, title: str = "") -> Path:
    """Points with 95% CI bars per layer: series name -> (estimate, ci_low, ci_high)."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(layers), dtype=float)
    width = 0.8 / max(len(series), 1)
    for k, (name, (est, lo, hi)) in enumerate(series.items()):
        est, lo, hi = (np.asarray(a, dtype=float) for a in (est, lo, hi))
        xs = x - 0.4 + width * (k + 0.5)
        ax.errorbar(xs, est, yerr=[est - lo, hi - est], fmt="o", capsize=4, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [str(L) for L in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
