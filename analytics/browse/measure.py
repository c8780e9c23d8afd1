"""The browser's own timing of a built site (`python -m analytics.browse --measure N`).

Opens the site from file:// in Chromium (the system's, driven by playwright) in a fresh browser
context per repeat (no cache carried over) and reads what the pages measure themselves:
`performance.now()` when index.html has listed every feature (from navigation start: loading
the index script, parsing it, rendering the table), the time one search keystroke takes to
re-render the table, and the time feature.html takes to load its shard and draw the page.
Console errors and uncaught page errors are collected and returned.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def measure(site: Path, repeats: int, feature: int, search: str, chromium: str = DEFAULT_CHROMIUM) -> dict[str, Any]:
    try:
        from playwright.sync_api import sync_playwright  # lazy: only --measure drives a browser
    except ImportError as e:
        raise ValueError("--measure needs the playwright package: pip install playwright") from e

    index_ms: list[float] = []
    search_ms: list[float] = []
    page_ms: list[float] = []
    errors: list[str] = []
    shown = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
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
        "repeats": repeats,
        "index_open_ms": _stats(index_ms),
        "search": search,
        "search_ms": _stats(search_ms),
        "search_shows": shown,
        "feature": feature,
        "feature_page_ms": _stats(page_ms),
        "console_errors": errors,
        "chromium": chromium,
    }


def report(t: dict[str, Any], n_features: int) -> str:
    lines = [f"in Chromium, {t['repeats']} opens (median [min, max] ms):"]
    for name, key in (
        (f"index.html, {n_features} features listed", "index_open_ms"),
        (f"search {t['search']!r} ({t['search_shows']})", "search_ms"),
        (f"feature.html?f={t['feature']} drawn", "feature_page_ms"),
    ):
        s = t[key]
        lines.append(f"  {name:<44} {s['median']:7.0f}  [{s['min']:.0f}, {s['max']:.0f}]")
    lines.append(f"  console errors: {len(t['console_errors'])}")
    return "\n".join(lines)
