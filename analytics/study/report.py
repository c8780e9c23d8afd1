"""The study's report: runs/study-<id>/study.md + study.json + study.png, every figure beside the
run id it came from.

Sections: the base adapter (finetune) and its eval loss beside the base model's; each attribution
variant; every other step's runs with their recorded metrics; the selection experiments, one row
per comparison (a - b, pooled over seeds, 95% CI, bootstrap p); and the tables our users kept,
filtered from those rows: base vs top vs random at each k (the first attribution variant, overlap
excluded), scoring variants at the largest k (mean vs nearest), overlap allowed vs excluded at the
largest k, and the rank-window ablation (ranks 3k/5+1..k vs a random k-3k/5 from ranks > k); then the
linear datamodeling score of every source of the lds step (LDS, 95% CI, bootstrap p).
"""

from __future__ import annotations

import json
from typing import Any

from store.core import Store, write_json


def _fmt(e: dict[str, Any] | None) -> str:
    if not e:
        return "-"
    return f"{e['estimate']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] p={e['p_value']:.3g}"


def _eval(st: Store, run_id: str) -> tuple[float, int]:
    t = st.query(
        "SELECT sum(loss_sum) / sum(n_tokens) AS loss, count(*) AS n FROM eval_losses WHERE run_id = ?", [run_id]
    ).to_pylist()[0]
    return float(t["loss"]), int(t["n"])


def _metrics(st: Store, run_id: str) -> str:
    rows = st.query("SELECT metrics FROM runs WHERE run_id = ? AND status = 'finished'", [run_id]).to_pylist()
    if not rows:
        return ""
    m = json.loads(rows[-1]["metrics"] or "{}")
    flat = {k: v for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v:.4g}" for k, v in list(flat.items())[:6])


def experiment_rows(study: Any) -> list[dict[str, Any]]:
    """One row per (experiment, comparison), with the settings the kept tables filter on."""
    st, out = study.store, []
    variant_of = {v.get("result"): k.split("/")[1] for k, v in study.state["commands"].items() if k.startswith("attr")}
    for key, entry in study.state["commands"].items():
        if entry.get("step") != "experiment" or not entry.get("result"):
            continue
        path = st.run_dir(entry["result"]) / "select_experiment.json"
        doc = json.loads(path.read_text())
        argv = entry["argv"]
        overlap = argv[argv.index("--overlap") + 1] if "--overlap" in argv else "exclude"
        sel = doc["selector"]
        scoring = variant_of.get(sel.split(":", 1)[-1], sel)
        base = doc["base"]["eval_loss"][0]
        for name, c in doc["comparisons"].items():
            out.append(
                {
                    "experiment": key.split("/")[1],
                    "run_id": doc["run_id"],
                    "scoring": scoring,
                    "k": doc["k"],
                    "overlap": overlap,
                    "ablation": doc["ablation"],
                    "seeds": doc["seeds"],
                    "steps": doc["budget"]["steps"],
                    "comparison": name,
                    "base_loss": base,
                    "a_loss": c["eval_loss"]["a_mean"],
                    "b_loss": c["eval_loss"]["b_mean"],
                    "eval_loss": c["eval_loss"]["pooled"],
                    "downstream": (c.get("downstream") or {}).get("pooled"),
                }
            )
    return out


def lds_rows(study: Any) -> list[dict[str, Any]]:
    """One row per (lds command, source): the LDS with its CI from the run's lds.json."""
    st, out = study.store, []
    for key, entry in study.state["commands"].items():
        if entry.get("step") != "lds" or not entry.get("result"):
            continue
        path = st.run_folder(entry["result"]) / "lds.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        for source, r in doc.get("sources", {}).items():
            keep = ("lds", "ci_low", "ci_high", "p_value", "n_subsets", "skipped_because")
            out.append({"command": key, "run_id": entry["result"], "source": source, **{k: r.get(k) for k in keep}})
    return out


def lds_table(rows: list[dict[str, Any]]) -> list[str]:
    """The LDS of every source (docs/selection.md "Linear datamodeling score")."""
    if not rows:
        return ["(no lds step in this study)", ""]
    lines = ["| source | LDS [95% CI] | bootstrap p | subsets | run |", "|---|---|---|---|---|"]
    for r in rows:
        if r["lds"] is None:
            why = r["skipped_because"] or "undefined (constant predictions or losses)"
            lines.append(f"| {r['source']} | skipped: {why} | | | `{r['run_id']}` |")
            continue
        p = "" if r["p_value"] is None else f"{r['p_value']:.3f}"
        lines.append(
            f"| {r['source']} | {r['lds']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {p} | "
            f"{r['n_subsets']} | `{r['run_id']}` |"
        )
    return [*lines, ""]


def _table(rows: list[dict[str, Any]], title: str, note: str) -> list[str]:
    if not rows:
        return [f"### {title}", "", f"(no experiment of this kind in the study: {note})", ""]
    lines = [
        f"### {title}",
        "",
        note,
        "",
        "| experiment | scoring | k | overlap | comparison | base loss | a loss | b loss | a - b eval loss "
        "[95% CI] p | a - b downstream | seeds x steps | run id |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['scoring']} | {r['k']} | {r['overlap']} | {r['comparison']} | "
            f"{r['base_loss']:.4f} | {r['a_loss']:.4f} | {r['b_loss']:.4f} | {_fmt(r['eval_loss'])} | "
            f"{_fmt(r['downstream'])} | {r['seeds']} x {r['steps']} | `{r['run_id']}` |"
        )
    return [*lines, ""]


def kept_tables(study: Any, rows: list[dict[str, Any]]) -> list[str]:
    first = next(iter(study.cfg.attribution), None)
    plain = [r for r in rows if r["ablation"] == "none" and r["comparison"] == "top_vs_matched_random"]
    kmax = max((r["k"] for r in plain), default=None)
    lines = _table(
        [r for r in plain if r["scoring"] == first and r["overlap"] == "exclude"],
        "Base vs top vs random",
        "Top-k vs a category-matched random k at each k (a = top, b = matched random; base = the base adapter).",
    )
    lines += _table(
        [r for r in plain if r["k"] == kmax and r["overlap"] == "exclude"],
        "Mean vs nearest scoring",
        f"The same comparison at k {kmax} for each attribution scoring variant.",
    )
    lines += _table(
        [r for r in plain if r["k"] == kmax and r["scoring"] == first],
        "Overlap allowed vs excluded",
        f"At k {kmax}: may the random arm share rows with the top k (allow) or not (exclude)?",
    )
    lines += _table(
        [r for r in rows if r["ablation"] == "scale"],
        "Rank window vs random from lower ranks",
        "--ablation scale at k: top 3k/5 vs top k, and ranks 3k/5+1..k vs a random k-3k/5 from ranks > k "
        "(k 500: top 300 vs top 500, ranks 301-500 vs a random 200 from ranks 501+).",
    )
    return lines


def _plot(rows: list[dict[str, Any]], path: Any) -> Any:
    from matplotlib.figure import Figure

    from trainers.plots import save_figure

    fig = Figure(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(rows):
        e = r["eval_loss"]
        ax.errorbar(e["estimate"], i, xerr=[[e["estimate"] - e["ci_low"]], [e["ci_high"] - e["estimate"]]], fmt="o")
    ax.set_yticks(range(len(rows)), [f"{r['experiment']}: {r['comparison']}" for r in rows], fontsize=7)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("a - b eval loss, pooled over seeds, 95% CI (negative: a better)")
    return save_figure(fig, path)


def write_report(study: Any) -> dict[str, Any]:
    st = Store(study.cfg.store)
    study.store = st
    cmds = study.state["commands"]
    lines = [
        f"# Study {study.cfg.name} ({study.id})",
        "",
        f"Store `{study.cfg.store}`, model `{study.cfg.model}`. Every figure is followed by the run id it came "
        "from; each step's exact command is in `state.json`.",
        "",
        "## Steps",
        "",
        "| step | run ids | seconds | recorded metrics |",
        "|---|---|---|---|",
    ]
    evals = {}
    for key, e in cmds.items():
        if e.get("status") != "finished":
            continue
        ids = e["runs"] or ([e["result"]] if e.get("result") else [])
        lines.append(
            f"| {key} | {', '.join(f'`{r}`' for r in ids) or '(result existed)'} | {e['seconds']} | "
            f"{'; '.join(m for m in (_metrics(st, r) for r in ids) if m)} |"
        )
        if e["step"] == "eval_loss":
            for r in e["runs"]:
                if e["kinds"].get(r) == "eval_loss":
                    evals[key] = (r, *_eval(st, r))
    lines += ["", "## Eval loss, base model vs the base adapter", ""]
    for key, (r, loss, n) in evals.items():
        lines.append(f"- {key}: token-weighted eval loss {loss:.4f} over {n} rows (`{r}`)")
    if "finetune/finetune" in cmds:
        lines.append(f"- base adapter: `{cmds['finetune/finetune'].get('result')}`")
    rows = experiment_rows(study)
    lines += ["", "## Selection experiments", ""]
    lines += kept_tables(study, rows)
    lds = lds_rows(study)
    lines += ["## Linear datamodeling score", "", *lds_table(lds)]
    doc = {
        "study_id": study.id,
        "name": study.cfg.name,
        "store": study.cfg.store,
        "commands": cmds,
        "eval_loss": {k: {"run_id": r, "loss": loss, "rows": n} for k, (r, loss, n) in evals.items()},
        "experiments": rows,
        "lds": lds,
    }
    if rows:
        png = _plot(rows, study.dir / "study.png")
        lines += [f"![differences]({png.name})", ""]
        doc["plot"] = str(png)
    (study.dir / "study.md").write_text("\n".join(lines) + "\n")
    write_json(study.dir / "study.json", doc)
    return doc
