"""Benchmark: the feature browser (`python -m analytics.browse`), built from a store and opened in
Chromium, timed inside the browser.

    python -m bench.browse --store /tmp/browse-store                   # its newest SAE
    python -m bench.browse --store S --sae NAME --repeats 5 --feature 12

Builds the site into a temporary folder (the build is timed; it leaves a `browse` run record in
the store), then opens it from file:// in a fresh browser context per repeat (no cache carried
over) and reads what the pages measure themselves: `performance.now()` when index.html has
listed every feature (from navigation start: loading the index script, parsing it, rendering
the table), the time one search keystroke takes to re-render the table, and the time
feature.html takes to load its shard and draw the page. Chromium is the system's
/usr/bin/chromium (`make setup` installs it), driven by playwright. The JSON goes to
bench_out/browse.json (or --out) with the machine and its load average before and after.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analytics.browse.command import BrowseConfig, build_site
from bench.common import Bench, BenchOutOptions, print_table
from store.cli import LayerOptions, StoreOptions, parse_config, user_errors
from store.core import StoreError

CHROMIUM = Path("/usr/bin/chromium")


@dataclass(kw_only=True)
class BenchConfig(StoreOptions, LayerOptions, BenchOutOptions):
    """The feature browser of an SAE: site build time, and index / search / feature-page times
    measured in Chromium."""

    sae: str = field(default="latest", metadata={"help": "the SAE: latest or its name in the saes table"})
    repeats: int = field(default=5, metadata={"help": "page opens timed (each in a fresh browser context)"})
    feature: int | None = field(default=None, metadata={"help": "the feature page timed (default: the densest)"})
    search: str = field(default="the", metadata={"help": "the search typed into the index (its re-render is timed)"})

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if not CHROMIUM.exists():
            raise ValueError(f"{CHROMIUM} is missing: install it (apt-get install -y chromium, or make setup as root)")


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(site: Path, repeats: int, feature: int, search: str) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright  # lazy: only the benchmark drives a browser

    index_ms, search_ms, page_ms, errors = [], [], [], []
    shown = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        for _ in range(repeats):
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((site / "index.html").as_uri())
            page.wait_for_selector("body[data-ready]")
            index_ms.append(float(page.get_attribute("body", "data-render-ms")))
            ms = page.evaluate(
                """q => { const s = document.getElementById('search'); const t0 = performance.now();
                s.value = q; s.dispatchEvent(new Event('input')); return performance.now() - t0; }""",
                search,
            )
            search_ms.append(ms)
            shown = page.text_content("#count")
            page.goto((site / "feature.html").as_uri() + f"?f={feature}")
            page.wait_for_selector("body[data-ready]")
            page_ms.append(float(page.get_attribute("body", "data-render-ms")))
            ctx.close()
        browser.close()
    return {
        "index_open_ms": _stats(index_ms),
        "search_ms": _stats(search_ms),
        "feature_page_ms": _stats(page_ms),
        "search_shows": shown,
        "console_errors": errors,
        "chromium": str(CHROMIUM),
    }


def run(cfg: BenchConfig) -> dict[str, Any]:
    with Bench("browse", cfg.store, cfg.out, scratch="none") as bench:
        res = bench.header(cfg)
        res["load_before"] = os.getloadavg()
        tmp = Path(tempfile.mkdtemp(prefix="bench-browse-"))
        try:
            t0 = time.perf_counter()
            built = build_site(
                BrowseConfig(store=cfg.store, sae=cfg.sae, layers=cfg.layers, out=str(tmp / "site"), progress=False)
            )
            res["build_s"] = time.perf_counter() - t0
            feature = cfg.feature
            if feature is None:
                from analytics.browse import data

                rows = data.read_cards(bench.store, built.sae).rows
                feature = max(rows, key=lambda c: (c["density"], -c["feature"]))["feature"]
            res |= {
                "sae": built.sae.name,
                "layer": built.sae.layer,
                "features": built.n_features,
                "labelled": built.n_labelled,
                "index_bytes": built.index_bytes,
                "shards": built.n_shards,
                "shard_bytes_max": max(p.stat().st_size for p in (built.out / "features").glob("*.js")),
                "feature": feature,
            }
            res |= measure(built.out, cfg.repeats, feature, cfg.search)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        res["load_after"] = os.getloadavg()
        rows = [
            {"what": "site build (in-process)", "ms": res["build_s"] * 1e3, "lo": None, "hi": None},
            *[
                {"what": name, "ms": res[key]["median"], "lo": res[key]["min"], "hi": res[key]["max"]}
                for name, key in (
                    (f"index.html, {res['features']} features listed", "index_open_ms"),
                    (f"search {cfg.search!r} ({res['search_shows']})", "search_ms"),
                    (f"feature.html?f={feature} drawn", "feature_page_ms"),
                )
            ],
        ]
        cols = [("what", "step", ""), ("ms", "median ms", ".0f"), ("lo", "min", ".0f"), ("hi", "max", ".0f")]
        print_table(rows, cols)
        print(
            f"index {res['index_bytes'] / 1e3:.0f} kB, {res['shards']} shards (largest "
            f"{res['shard_bytes_max'] / 1e6:.2f} MB); console errors: {len(res['console_errors'])}; "
            f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}"
        )
        bench.write(res, bench.path())
    return res


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    run(parse_config(BenchConfig, argv, prog="python -m bench.browse"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
