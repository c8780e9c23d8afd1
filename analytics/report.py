"""One self-contained HTML summary of a store, and its results at a glance in markdown.

    python -m analytics.report                       # ./store_data -> store_data/runs/<run_id>/report.html
    python -m analytics.report --store /tmp/st --title "160-row test store"
    python -m analytics.report --markdown            # the results at a glance, each with its run id
    python -m analytics.report --markdown --bench bench_out/attribution.json --into README.md

Sections (each says so when the store has nothing for it yet, with the command that fills it):
rows per split and category; runs; arrays with their on-disk sizes and committed rows; SAE
QA metrics (`saes`: explained variance, L0, CE increase, dead features); feature/metadata
correlations (significant features per field and the latest heatmap); probe AUROC by layer
(`runs` of kind probe); the latest logit-lens table; attribution score distributions (every
catalog table whose name starts with `attribution` and has a numeric `score` column).
Figures are PNGs in the report's run dir, embedded in the HTML as data URIs so the single
file can be mailed or opened anywhere. A section that fails is shown as failed, and the
command exits 1 naming it.

`--markdown` writes no report: it prints the headline figures of the store (the newest
finished probe, SAE, feature/metadata, eval-loss, predictor and selection-experiment runs),
each with the run id it came from, and of benchmark JSON files (`--bench`, each figure with
its file and bench id); `--into FILE` replaces the generated block of FILE (between
GLANCE_BEGIN and GLANCE_END) instead of printing it. The README's "Results at a glance" is
that block.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from analytics import glance
from analytics.correlations import TABLE as ASSOC_TABLE
from analytics.glance import query
from analytics.logit_lens import TABLE as LENS_TABLE
from store.catalog.runs import Run
from store.cli import StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from trainers import plots


@dataclass
class ReportConfig(StoreOptions):
    """Write a single-file HTML summary of a store (rows, runs, arrays, SAEs, probes, lens, attribution),
    or (--markdown) its results at a glance, each figure with the run id it came from."""

    title: str = field(default="", metadata={"help": "report title (default: the store path)"})
    max_runs: int = field(default=60, metadata={"help": "most recent runs listed"})
    markdown: bool = field(
        default=False,
        metadata={"help": "print the results at a glance as markdown (each figure with its run id) instead"},
    )
    bench: list[str] = field(
        default_factory=list,
        metadata={"help": "with --markdown: benchmark JSON files (bench_out/*.json) whose figures to add"},
    )
    into: str | None = field(
        default=None,
        metadata={"help": "with --markdown: replace the generated block of this file (e.g. README.md) instead"},
    )

    def __post_init__(self) -> None:
        if (self.bench or self.into) and not self.markdown:
            raise ValueError("--bench and --into go with --markdown")


_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:12.5px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td.s{text-align:left}h2{border-bottom:2px solid #ddd;margin-top:1.8em}
img{max-width:100%;border:1px solid #eee}.note{color:#777}code{background:#f5f5f5;padding:1px 4px}"""


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def html_table(frame: pl.DataFrame, max_rows: int = 60) -> str:
    if frame.is_empty():
        return '<p class="note">(empty)</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.head(max_rows).iter_rows():
        cells = "".join(f'<td class="{"s" if isinstance(v, str) else ""}">{html.escape(_fmt(v))}</td>' for v in row)
        body.append(f"<tr>{cells}</tr>")
    more = f'<p class="note">{len(frame) - max_rows} more rows not shown</p>' if len(frame) > max_rows else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def _img(path: Path | str | None) -> str:
    if not path or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<p><img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}"></p>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


# ---- sections -----------------------------------------------------------------------------
def section_rows(store: Store, out: Path) -> str:
    if not store.has_table("rows"):
        return _note(f"no rows yet: python -m extractors.dataset --store {store.root}")
    f = query(store, "SELECT split, coalesce(category, '(none)') AS category, count(*) AS n FROM rows GROUP BY ALL")
    piv = f.pivot(on="split", index="category", values="n").fill_null(0).sort("category")
    piv = piv.with_columns(pl.sum_horizontal(pl.exclude("category")).alias("total"))
    tot = (
        query(store, "SELECT split, count(*) AS rows, sum(n_tokens) AS tokens FROM rows GROUP BY 1 ORDER BY 1")
        if "n_tokens" in query(store, "DESCRIBE rows")["column_name"].to_list()
        else query(store, "SELECT split, count(*) AS rows FROM rows GROUP BY 1 ORDER BY 1")
    )
    png = plots.bar(
        piv["category"].to_list(),
        piv["total"].to_list(),
        out / "rows_per_category.png",
        title="rows per category (all splits)",
        ylabel="rows",
    )
    extra = ""
    if store.has_table("quarantine"):
        qf = query(store, "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1 ORDER BY 2 DESC")
        extra = "<h3>Quarantined at ingest</h3>" + html_table(qf)
    return html_table(tot) + html_table(piv) + _img(png) + extra


def section_runs(store: Store, out: Path, max_runs: int, this_run: str = "") -> str:
    if not store.has_table("runs"):
        return _note("no runs recorded")
    f = query(
        store,
        "SELECT run_id, kind, status, layers, round(seconds, 1) AS seconds, started_at, note FROM runs "
        "WHERE run_id <> ? ORDER BY started_at DESC",
        [this_run],
    )
    by_kind = f.group_by("kind", "status").len().sort("kind", "status")
    return html_table(by_kind) + html_table(f.with_columns(pl.col("started_at").cast(pl.String)), max_runs)


def section_arrays(store: Store, out: Path) -> str:
    if not store.has_table("arrays"):
        return _note(f"no arrays yet: python -m extractors.run --layer 17 --store {store.root}")
    have = set(query(store, "DESCRIBE arrays")["column_name"].to_list())
    cols = [c for c in ("name", "kind", "layer", "dtype", "shape", "chunks", "codec", "last_run") if c in have]
    f = query(store, f"SELECT {', '.join(cols)} FROM arrays ORDER BY name")
    sizes = [_dir_size(store.array_path(n)) for n in f["name"].to_list()]
    f = f.with_columns(pl.Series("size_mb", [round(s / 2**20, 1) for s in sizes]))
    if store.has_table("array_units"):
        c = query(
            store,
            "SELECT array_name AS name, count(DISTINCT row_id) AS committed_rows, count(DISTINCT unit) AS "
            "units FROM array_units GROUP BY 1",
        )
        f = f.join(c, on="name", how="left")
    total = sum(sizes) / 2**20
    return html_table(f) + _note(f"arrays total {total:.1f} MB; catalog {_dir_size(store.catalog_dir) / 2**20:.1f} MB")


def section_saes(store: Store, out: Path) -> str:
    if not store.has_table("saes"):
        return _note(f"no SAEs yet: python -m trainers.sae --layer 17 --store {store.root}")
    f = query(
        store,
        "SELECT sae, layer, architecture, d_sae, k, explained_variance, l0, ce_increase, metrics FROM saes "
        "ORDER BY layer, sae",
    )
    dead = []
    for m in f["metrics"].to_list():
        try:
            dead.append(json.loads(m or "{}").get("eval", {}).get("dead_fraction"))
        except json.JSONDecodeError:
            dead.append(None)
    f = f.drop("metrics").with_columns(pl.Series("dead_fraction", dead, dtype=pl.Float64))
    if store.has_table("sae_feature_stats"):
        alive = query(
            store,
            "SELECT sae, layer, count(*) FILTER (WHERE firing_frequency > 0) AS features_firing "
            "FROM sae_feature_stats GROUP BY ALL",
        )
        f = f.join(alive.with_columns(pl.col("layer").cast(f["layer"].dtype)), on=["sae", "layer"], how="left")
    return html_table(f)


def section_correlations(store: Store, out: Path) -> str:
    if not store.has_table(ASSOC_TABLE):
        return _note(
            f"no feature/metadata associations yet: python -m analytics.correlations --layer 17 --store {store.root}"
        )
    sig = query(
        store,
        f"SELECT sae, layer, field, stat, count(DISTINCT feature) FILTER (WHERE q_value <= 0.05) AS "
        f"features_q05, max(abs(effect)) AS max_abs_effect, count(*) AS tests FROM {ASSOC_TABLE} GROUP BY ALL "
        f"ORDER BY layer, sae, field, stat",
    )
    best = query(
        store,
        f"SELECT sae, layer, level AS category, arg_max(feature, effect) AS feature, max(effect) AS auroc "
        f"FROM {ASSOC_TABLE} WHERE field = 'category' AND stat = 'auroc' GROUP BY ALL ORDER BY layer, category",
    )
    body = html_table(sig) + "<h3>Best one-vs-rest AUROC per category</h3>" + html_table(best)
    runs = query(
        store,
        "SELECT run_id FROM runs WHERE kind = 'feature_correlations' AND status = 'finished' "
        "ORDER BY started_at DESC LIMIT 1",
    )
    if len(runs):
        d = store.run_dir(runs["run_id"][0])
        body += _img(d / "heatmap.png") + _img(d / "volcano.png") + _img(d / "layers.png")
    return body


def section_probes(store: Store, out: Path) -> str:
    if not store.has_table("runs"):
        return _note("no runs")
    f = query(
        store,
        "SELECT run_id, config, metrics FROM runs WHERE kind = 'probe' AND status = 'finished' ORDER BY started_at",
    )
    recs = []
    for r in f.iter_rows(named=True):
        cfg, m = json.loads(r["config"] or "{}"), json.loads(r["metrics"] or "{}")
        for L, d in (m.get("by_layer") or {}).items():
            recs.append(
                {
                    "probe": cfg.get("name", r["run_id"]),
                    "run_id": r["run_id"],
                    "layer": int(L),
                    "val_auroc": d.get("val_auroc_mean"),
                    "std": d.get("val_auroc_std"),
                }
            )
    if not recs:
        return _note(f"no probe runs yet: python -m trainers.probe --store {store.root} ...")
    t = pl.DataFrame(recs).sort("probe", "layer")
    wide = t.pivot(on="layer", index="probe", values="val_auroc", aggregate_function="last")
    fig = plots.lines(
        {p: (g["layer"].to_list(), g["val_auroc"].to_list()) for (p,), g in t.group_by("probe", maintain_order=True)},
        out / "probe_auroc.png",
        title="probe validation AUROC by layer",
        xlabel="layer",
        ylabel="AUROC",
    )
    return html_table(wide) + _img(fig)


def section_lens(store: Store, out: Path) -> str:
    if not store.has_table(LENS_TABLE):
        return _note(f"no logit lens yet: python -m analytics.logit_lens --store {store.root}")
    last = query(store, f"SELECT l.* FROM {LENS_TABLE} l JOIN runs r USING (run_id) ORDER BY r.started_at DESC")
    rid = last["run_id"][0]
    t = last.filter(pl.col("run_id") == rid).sort("layer")
    return html_table(
        t.select("layer", "source", "accuracy", "agreement", "kl_to_final", "ce", "n_tokens", "split")
    ) + _img(store.run_dir(rid) / "logit_lens.png")


def section_attribution(store: Store, out: Path) -> str:
    parts = []
    for t in store.tables():
        if not t.startswith("attribution"):
            continue
        cols = query(store, f'DESCRIBE "{t}"')
        types = dict(zip(cols["column_name"].to_list(), cols["column_type"].to_list(), strict=False))
        if "score" not in types or not any(k in types["score"] for k in ("DOUBLE", "FLOAT", "INT", "DECIMAL")):
            continue
        by = "run_id" if "run_id" in types else None
        f = query(store, f'SELECT {by + " AS g, " if by else ""}score::DOUBLE AS score FROM "{t}"')
        series = (
            {str(g): gg["score"].to_numpy() for (g,), gg in f.group_by("g", maintain_order=True)}
            if by
            else {t: f["score"].to_numpy()}
        )
        desc = f.group_by("g" if by else pl.lit(t).alias("g")).agg(
            pl.len().alias("n"),
            pl.col("score").mean().alias("mean"),
            pl.col("score").std().alias("std"),
            pl.col("score").min().alias("min"),
            pl.col("score").median().alias("median"),
            pl.col("score").max().alias("max"),
        )
        png = plots.histogram(series, out / f"{t}_scores.png", title=f"{t}: score distribution", xlabel="score")
        parts.append(f"<h3>{html.escape(t)}</h3>" + html_table(desc) + _img(png))
    return "".join(parts) or _note(
        "no attribution scores in this store (no catalog table attribution* with a numeric score column)"
    )


SECTIONS: list[tuple[str, Callable[..., str]]] = [
    ("Rows per split and category", section_rows),
    ("Runs", section_runs),
    ("Arrays and sizes", section_arrays),
    ("SAE QA metrics", section_saes),
    ("Feature / metadata correlations", section_correlations),
    ("Probe AUROC by layer", section_probes),
    ("Logit lens", section_lens),
    ("Attribution score distribution", section_attribution),
]


class Report(NamedTuple):
    path: Path
    failed: dict[str, str]  # section name -> its error


def build_report(cfg: ReportConfig) -> Report:
    """Write report.html in a new run dir of the store; returns its path and the failed sections."""
    store = Store(cfg.store)
    if not store.root.is_dir() or not store.tables():
        raise StoreError(
            f"{store.root} is not a store (no catalog tables); create one with python -m "
            f"extractors.run --layer 17 --store {store.root}"
        )
    with Run(store, "report", config_dict(cfg)) as run:
        out = run.dir
        title = cfg.title or f"Store {store.root}"
        body = [
            f"<h1>{html.escape(title)}</h1>",
            _note(
                f"generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} by python -m analytics.report; "
                f"catalog tables: {', '.join(store.tables())}"
            ),
        ]
        failed = {}
        for name, fn in SECTIONS:
            args = (store, out, cfg.max_runs, run.run_id) if fn is section_runs else (store, out)
            try:
                content = fn(*args)
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others; exit 1 names it
                failed[name] = f"{type(e).__name__}: {e}"
                content = _note(f"section failed: {type(e).__name__}: {e}")
            body.append(f"<h2>{html.escape(name)}</h2>{content}")
        path = out / "report.html"
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
        )
        run.finish(
            counts={"sections": len(SECTIONS), "failed_sections": len(failed)},
            metrics={"report": str(path), "failed": failed},
        )
    return Report(path, failed)


def write_report(cfg: ReportConfig) -> Path:
    """Write report.html in a new run dir of the store; returns its path."""
    return build_report(cfg).path


def _say_failed(failed: dict[str, str]) -> int:
    if not failed:
        return 0
    print(
        f"error: {len(failed)} section(s) failed: " + "; ".join(f"{k} ({v})" for k, v in failed.items()),
        file=sys.stderr,
    )
    return 1


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ReportConfig, argv, prog="python -m analytics.report")
    if not cfg.markdown:
        report = build_report(cfg)
        print(f"report: {report.path}")
        return _say_failed(report.failed)
    block, failed = glance.glance_markdown(cfg.store, cfg.bench)
    if cfg.into:
        target = Path(cfg.into)
        target.write_text(glance.replace_block(target.read_text(), block, cfg.into))
        print(f"wrote the generated block of {target}")
    else:
        print(block)
    return _say_failed(failed)


if __name__ == "__main__":
    sys.exit(main())
