"""Every PNG the project draws, in one module below all its users (trainers, analytics, bench).

Each function draws on a stand-alone matplotlib `Figure` with the Agg canvas (never pyplot, so
a notebook's own backend is left alone), writes the PNG beside the run's JSON and returns its
path; notebooks show them with `IPython.display.Image(path)`. Trainers: a selector's
precision-recall curve, a steering effect by layer, a finetune's loss curve. Analytics: heatmap, volcano, per-layer
summary, logit lens, histograms, bars, lines. Benchmarks: `bar_chart` with hardware limits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
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


def loss_curve(steps: list[dict], evals: list[dict], path: str | Path, title: str) -> Path:
    """A finetune's train loss per optimizer step and its eval loss per epoch."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train (per step)", alpha=0.8)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def effect_by_layer(
    layers: Sequence[int],
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    ylabel: str,
    title: str = "",
) -> Path:
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


_FIELD_COLORS = {
    "category": "#1f77b4",
    "difficulty": "#ff7f0e",
    "quality": "#2ca02c",
    "reward_model_score": "#d62728",
    "conversation_tokens": "#9467bd",
}


def _color(field: str) -> str:
    return _FIELD_COLORS.get(field, "#7f7f7f")


def _neglog10(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return -np.log10(np.clip(np.nan_to_num(q, nan=1.0), 1e-300, 1.0))


def category_heatmap(
    assoc: pl.DataFrame,
    path: str | Path,
    *,
    field: str = "category",
    per_level: int = 2,
    alpha: float = 0.05,
    title: str = "",
) -> Path:
    """Features x levels of `field`: one-vs-rest AUROC of the `per_level` best features of each
    level (significant ones when there are any), diverging around 0.5."""
    a = assoc.filter((pl.col("field") == field) & (pl.col("stat") == "auroc"))
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    if a.is_empty():
        ax.text(0.5, 0.5, f"no AUROC results for {field}", ha="center", va="center")
        return save_figure(fig, path)
    sig = a.filter((pl.col("q_value") <= alpha) & (pl.col("effect") > 0.5))
    src = sig if not sig.is_empty() else a
    # Same ranking as analytics.correlations.top_features: AUROC, then q, then mean activation.
    picks = (
        src.sort(["level", "effect", "q_value", "mean_pos"], descending=[False, True, False, True])
        .group_by("level", maintain_order=True)
        .head(per_level)
    )
    feats: list[int] = []
    owner: dict[int, str] = {}
    for r in picks.iter_rows(named=True):
        if r["feature"] not in owner:
            feats.append(r["feature"])
            owner[r["feature"]] = r["level"]
    levels = sorted(a["level"].unique().to_list())
    grid = (
        a.filter(pl.col("feature").is_in(feats))
        .pivot(on="level", index="feature", values="effect")
        .join(
            pl.DataFrame({"feature": feats, "_o": range(len(feats))}, schema_overrides={"feature": a["feature"].dtype}),
            on="feature",
        )
        .sort("_o")
    )
    M = np.array(
        [[r.get(lv) if r.get(lv) is not None else np.nan for lv in levels] for r in grid.iter_rows(named=True)]
    )
    fig.set_size_inches(1.6 + 0.62 * len(levels), 1.4 + 0.3 * len(feats))
    im = ax.imshow(M, cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(levels)), levels, rotation=40, ha="right")
    ax.set_yticks(range(len(feats)), [f"f{f} ({owner[f]})" for f in feats])
    if M.size <= 400:
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                if np.isfinite(M[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{M[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if abs(M[i, j] - 0.5) > 0.3 else "black",
                    )
    fig.colorbar(im, ax=ax, label="AUROC (level vs rest)", shrink=0.8)
    note = "" if not sig.is_empty() else f" (none significant at q <= {alpha})"
    ax.set_title(f"{title}: top features per {field}{note}".strip(": "), fontsize=10)
    return save_figure(fig, path)


def volcano(assoc: pl.DataFrame, path: str | Path, *, alpha: float = 0.05, label_top: int = 6, title: str = "") -> Path:
    """Effect size vs -log10 q: one-vs-rest AUROC (left, every categorical level) and Spearman
    rho (right, ordinal and continuous fields), coloured by field."""
    fig = Figure(figsize=(12, 4.8))
    panels = [("auroc", "AUROC (level vs rest)", 0.5), ("spearman", "Spearman rho", 0.0)]
    for k, (stat, xlabel, center) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        d = assoc.filter(pl.col("stat") == stat)
        for (fld,), g in d.group_by("field", maintain_order=True):
            ax.scatter(
                g["effect"].to_numpy(),
                _neglog10(g["q_value"].to_numpy()),
                s=6,
                alpha=0.5,
                color=_color(fld),
                label=fld,
                linewidths=0,
            )
        ax.axhline(-np.log10(alpha), color="k", lw=0.8, ls="--")
        ax.axvline(center, color="k", lw=0.5)
        top = (
            d.with_columns(pl.col("q_value").fill_null(1.0).alias("_q"), (pl.col("effect") - center).abs().alias("_e"))
            .sort(["_q", "_e"], descending=[False, True])
            .head(label_top)
        )
        placed: list[tuple[float, float]] = []
        span = max(float(d["effect"].max() or 1) - float(d["effect"].min() or 0), 1e-9) if not d.is_empty() else 1.0
        ymax = float(_neglog10(d["q_value"].to_numpy()).max()) if not d.is_empty() else 1.0
        for r in top.iter_rows(named=True):
            if r["effect"] is None:
                continue
            xy = (r["effect"], _neglog10([r["q_value"]])[0])
            if any(abs(xy[0] - a) < 0.08 * span and abs(xy[1] - b) < 0.05 * max(ymax, 1e-9) for a, b in placed):
                continue  # would overprint a label already placed
            placed.append(xy)
            ax.annotate(
                f"f{r['feature']} {r['level'] or r['field']}", xy, fontsize=7, xytext=(3, 2), textcoords="offset points"
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("-log10 q (BH)")
        if not d.is_empty():
            ax.legend(fontsize=7, markerscale=2, loc="upper left")
        ax.set_title(
            f"{stat}: {len(d)} tests, {int((d['q_value'].fill_null(1) <= alpha).sum())} at q <= {alpha}", fontsize=9
        )
    fig.suptitle(f"{title} volcano".strip(), fontsize=10)
    return save_figure(fig, path)


def layer_summary(assoc: pl.DataFrame, path: str | Path, *, alpha: float = 0.05) -> Path:
    """Per (SAE, layer) in the table: features with a significant test per field (log scale),
    and per categorical field the mean over its levels of the level's best AUROC."""
    per = (
        assoc.filter(pl.col("q_value") <= alpha)
        .group_by("sae", "layer", "field")
        .agg(pl.col("feature").n_unique().alias("n"))
        .sort("layer", "field")
    )
    best = (
        assoc.filter(pl.col("stat") == "auroc")
        .group_by("sae", "layer", "field", "level")
        .agg(pl.col("effect").max())
        .group_by("sae", "layer", "field")
        .agg(pl.col("effect").mean().alias("best"))
        .sort("layer")
    )
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keys = assoc.select("sae", "layer").unique().sort("layer", "sae").rows()
    names = [f"L{layer}\n{s[:18]}" for s, layer in keys]
    fields = sorted(assoc["field"].unique().to_list())
    w = 0.8 / max(len(fields), 1)
    for j, fld in enumerate(fields):
        d = {(r["sae"], r["layer"]): r["n"] for r in per.filter(pl.col("field") == fld).iter_rows(named=True)}
        ax1.bar(
            np.arange(len(keys)) + j * w - 0.4 + w / 2, [d.get(k, 0) for k in keys], w, label=fld, color=_color(fld)
        )
        b = {(r["sae"], r["layer"]): r["best"] for r in best.filter(pl.col("field") == fld).iter_rows(named=True)}
        if b:
            ax2.plot(range(len(keys)), [b.get(k, np.nan) for k in keys], "o-", label=fld, color=_color(fld))
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(keys)), names, fontsize=7)
    ax1.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax2.legend(fontsize=7, loc="lower right")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_ylim(0, max([1] + per["n"].to_list()) * 3)
    ax1.set_ylabel(f"features with q <= {alpha}")
    ax1.set_title("significant features per field", fontsize=9)
    ax2.set_ylabel("best AUROC per level, mean over levels")
    ax2.set_ylim(0.5, 1.01)
    ax2.set_title("how well the best feature singles out each level", fontsize=9)
    return save_figure(fig, path)


def logit_lens_plot(table: pl.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Next-token accuracy and KL(final || lens) per layer."""
    t = table.sort("layer")
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    L = t["layer"].to_numpy()
    ax.plot(L, t["accuracy"].to_numpy(), "o-", color="#1f77b4", label="next-token accuracy (lens)")
    ax.plot(L, t["agreement"].to_numpy(), "s--", color="#2ca02c", label="top-1 agreement with final")
    ax.set_xlabel("layer (output of decoder block)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(L, t["kl_to_final"].to_numpy(), "^-", color="#d62728", label="KL(final || lens), nats")
    ax2.set_ylabel("KL (nats)", color="#d62728")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    ax.set_title(title or "logit lens", fontsize=10)
    return save_figure(fig, path)


def histogram(series: dict[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str, bins: int = 40) -> Path:
    """Overlaid histograms, one per named series."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    for name, v in series.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def bar(labels: Sequence[str], values: Sequence[float], path: str | Path, *, title: str, ylabel: str) -> Path:
    fig = Figure(figsize=(max(5.0, 0.45 * len(labels) + 2), 3.6))
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), values, color="#1f77b4")
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """One line with markers per named (x, y) series."""
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        ax.plot(x, y, "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def bar_chart(
    path: Path, labels: list[str], values: list[float], title: str, unit: str, limits: dict[str, float] | None = None
) -> Path:
    """Horizontal bars (one per method, value printed) with dashed lines at the hardware
    limits; a limit far beyond the bars is named in the legend instead of drawn."""

    def num(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"

    fig = Figure(figsize=(8, 0.55 * len(labels) + 2.0))  # stand-alone, never pyplot
    ax = fig.subplots()
    y = np.arange(len(labels))
    ax.barh(y, values, color="#4c72b0")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    top = max(values, default=0.0)
    for yi, v in zip(y, values, strict=False):
        ax.text(v, yi, " " + num(v), va="center", fontsize=8)
    for name, v in (limits or {}).items():
        if not v or not np.isfinite(v):
            continue
        color = "#c44e52" if "disk" in name else "#55a868"
        if v <= 3 * top:
            ax.axvline(v, linestyle="--", color=color, label=f"{name}: {num(v)}")
        else:
            ax.plot([], [], linestyle="--", color=color, label=f"{name}: {num(v)} (off scale)")
    if limits:
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14 - 0.1 / max(1, len(labels))),
            ncol=2,
            fontsize=8,
            frameon=False,
        )
    ax.set_xlim(0, 1.15 * max([top] + [v for v in (limits or {}).values() if v and np.isfinite(v) and v <= 3 * top]))
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
