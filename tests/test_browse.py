"""The feature browser, built from a hand-written store (tests/browse_fixture.py) and opened in a
real Chromium through playwright's sync API: from file:// (no server) and through a static HTTP
server. Checked against the fixture's own values: the index lists every feature, search narrows
it to the features a plain Python filter finds, sorting orders it as Python sorts, a feature
page shows its contexts, histogram, logit and label tables, hover shows an activation, the SQL
of a number gives that number back from the store, markup in token strings stays text, and no
page logs a console error. Bad input (no cards, --out a file) is one clear error each.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from analytics.browse import command, data
from analytics.browse.command import main
from analytics.feature_cards.command import main as cards_main
from analytics.label_features.inputs import resolve_sae
from extractors.pipeline import ExtractConfig
from extractors.pipeline import run_extraction as extract
from store.core import Store
from tests import browse_fixture as fx
from tests.conftest import ingest_small

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (make setup installs it with apt-get as root: apt-get install -y chromium)",
)
SHARD = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store, cards, site folder): the fixture store and its site, built by the command line."""
    root = tmp_path_factory.mktemp("browse")
    store, cards = fx.make_store(root / "store")
    out = root / "site"
    argv = ["--store", str(store.root), "--sae", "latest", "--out", str(out), "--shard-size", str(SHARD)]
    assert main([*argv, "--no-progress"]) == 0
    return store, cards, out


@pytest.fixture(scope="module")
def real_site(tiny_model, sae_dir, tmp_path_factory):
    """(store, site): the tiny model's layer-2 codes of the tiny SAE, carded by the real
    python -m analytics.feature_cards, then the site by python -m analytics.browse."""
    root = tmp_path_factory.mktemp("browse_real")
    store = root / "store"
    ingest_small(store, {"train_base": 12, "attr_query": 2, "eval": 4})
    common = dict(store=str(store), model=tiny_model, layers=[2], progress=False)
    extract(ExtractConfig(kinds=["hidden"], **common))
    extract(ExtractConfig(kinds=["sae"], sae=str(sae_dir), **common))
    small = ["--top-k", "5", "--quantiles", "3", "--per-quantile", "2", "--context", "4", "--no-progress"]
    assert cards_main(["--store", str(store), *small]) == 0
    assert main(["--store", str(store), "--out", str(root / "site"), "--no-progress"]) == 0
    return Store(store), root / "site"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught page errors; none may occur."""
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    yield pg
    pg.close()
    assert errors == []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def near(shown: str, value: float) -> bool:
    """The page shows 4 significant digits."""
    return math.isclose(float(shown), value, rel_tol=2e-3, abs_tol=1e-12)


def test_site_files_and_shards(built):
    store, cards, out = built
    for name in ("index.html", "feature.html", "browse.css", "common.js", "index.js", "feature.js", "data/index.js"):
        assert (out / name).is_file(), name
    n_shards = -(-len(cards) // SHARD)
    assert sorted(p.name for p in (out / "features").glob("*.js")) == [f"{s:04d}.js" for s in range(n_shards)]
    # the index is one small script: the per-feature contexts are not in it
    index = (out / "data" / "index.js").read_text()
    assert "top_contexts" not in index and "row-0" not in index
    assert index.isascii()
    # each feature's newest card: the newer run's for its one feature, its run in the page data
    cards_read = data.read_cards(store, resolve_sae(store, "latest", None))
    assert cards_read.shown == [fx.NEWER_RUN, fx.CARDS_RUN]
    key = lambda c: (c["feature"], c["run_id"], c["density"], c["hist_counts"], c["assoc"])  # noqa: E731
    assert [key(r) for r in cards_read.rows] == [key(c) for c in cards]
    # contexts come back with activations rounded to 6 significant digits (smaller shards)
    for r, c in zip(cards_read.rows, cards, strict=True):
        for got, want in zip(r["top_contexts"] + r["quantiles"], c["top_contexts"] + c["quantiles"], strict=True):
            assert got["tokens"] == want["tokens"] and math.isclose(got["act"], want["act"], rel_tol=1e-5)
            assert np.allclose(got["acts"], want["acts"], rtol=1e-5, atol=0)
    assert f'"run_id":"{fx.NEWER_RUN}"' in (out / "features" / f"{fx.NEWER // SHARD:04d}.js").read_text()
    # a rebuild with bigger shards removes the stale ones
    argv = ["--store", str(store.root), "--out", str(out), "--shard-size", "100", "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "features").glob("*.js")) == ["0000.js", "0001.js"]
    assert main([*argv[:-3], "--shard-size", str(SHARD), "--no-progress"]) == 0


@needs_chromium
def test_index_lists_searches_and_sorts(built, page):
    store, cards, out = built
    page.goto((out / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]")
    ids = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    assert ids == [c["feature"] for c in cards]
    assert page.text_content("#count") == f"{len(cards)} of {len(cards)} features"
    # labels: the current one (the human label above the automatic one), as text, not markup
    assert page.text_content('tr[data-feature="3"] td.label') == fx.LABELS[3]
    assert page.text_content('tr[data-feature="5"] td.label').startswith(fx.HUMAN[5])
    assert page.eval_on_selector_all("#rows b, #rows img, #rows script", "e => e.length") == 0
    assert page.evaluate("window.__pwned") is None

    # search: metadata text, against the same filter in Python
    page.fill("#search", "category=math")
    want = [c["feature"] for c in cards if any((a["field"], a["level"]) == ("category", "math") for a in c["assoc"])]
    got = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    assert got == want and 0 < len(want) < len(cards)
    assert page.text_content("#count") == f"{len(want)} of {len(cards)} features"
    # a label word, and a token string with markup in it
    page.fill("#search", "bold")
    assert page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)") == ["3"]
    page.fill("#search", "onerror=")
    tok = fx.NASTY[5]
    want = [c["feature"] for c in cards if tok in data.top_tokens(c) or tok in c["logit_top_tokens"][:5]]
    got = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    assert got == want and want

    # a search the label text and the token strings both hold
    page.fill("#search", "<script>")
    want = [c["feature"] for c in cards if "<script>" in " ".join(data.top_tokens(c) + c["logit_top_tokens"][:5])]
    want = sorted(set(want) | {12})  # feature 12's label is "the word <script>"
    assert [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")] == want
    assert page.is_hidden("#more")

    # sort by density (largest first), then importance (|effect|, missing last)
    page.fill("#search", "")
    page.click('th[data-key="density"]')
    got = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    assert got == [c["feature"] for c in sorted(cards, key=lambda c: (-c["density"], c["feature"]))]
    page.click('th[data-key="importance"]')
    got = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    key = lambda c: (c["importance"] is None, -abs(c["importance"] or 0), c["feature"])  # noqa: E731
    assert got == [c["feature"] for c in sorted(cards, key=key)]
    page.click('th[data-key="score"]')
    got = [int(x) for x in page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.dataset.feature)")]
    assert got[:3] == [12, 3, 0]  # label AUROCs 0.8, 0.6; then no score, by id
    assert float(page.get_attribute("body", "data-render-ms")) > 0


@needs_chromium
def test_feature_page_contexts_histogram_hover_and_sql(built, page):
    store, cards, out = built
    f = 3
    c = cards[f]
    page.goto((out / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]")
    page.click(f'tr[data-feature="{f}"] a')  # the index links to the page
    page.wait_for_selector("body[data-ready]")
    assert page.url.endswith(f"feature.html?f={f}")
    assert page.text_content("#label") == fx.LABELS[f]

    # contexts: every top context, its tokens as text (newlines shown as ↵), the centre marked
    ctx = page.query_selector_all("#top .ctx")
    assert len(ctx) == len(c["top_contexts"])
    for line, want in zip(ctx, c["top_contexts"], strict=True):
        assert line.eval_on_selector(".ctx-text", "e => e.textContent") == "".join(want["tokens"]).replace("\n", "↵")
        assert line.get_attribute("data-row") == want["row_id"]
        centre = line.query_selector_all(".t")[want["center"]]
        assert "c" in centre.get_attribute("class").split()
        assert near(centre.get_attribute("data-act"), want["act"])
    assert len(page.query_selector_all("#quantiles .ctx")) == len(c["quantiles"])
    assert page.evaluate("window.__pwned") is None
    assert page.eval_on_selector_all("#page img, #page b, #page script", "e => e.length") == 0

    # histogram: one bar per bin, heights in the counts' proportions
    bars = page.query_selector_all("#histogram svg rect.bar")
    assert len(bars) == len(c["hist_counts"])
    heights = [float(b.get_attribute("height")) for b in bars]
    top = max(c["hist_counts"])
    assert all(
        math.isclose(h / max(heights), n / top, abs_tol=1e-6) for h, n in zip(heights, c["hist_counts"], strict=True)
    )

    # logit tables and the labels table (llm current, its shuffled baseline)
    assert page.eval_on_selector_all("#logits table.top .tok", "e => e.map(x => x.textContent)") == [
        t.replace("\n", "↵") for t in c["logit_top_tokens"]
    ]
    assert page.eval_on_selector_all("#labels tr", "e => e.length") == 3  # header + llm + shuffled

    # hover: the readout and the title show the token's activation
    second = page.query_selector_all("#top .ctx")[1].query_selector_all(".t")[c["top_contexts"][1]["center"]]
    second.hover()
    readout = page.text_content("#hover")
    assert f"activation {second.get_attribute('data-act')}" in readout
    assert near(readout.split("activation ")[1].split(" ")[0], c["top_contexts"][1]["act"])
    assert second.get_attribute("title") == f"activation {second.get_attribute('data-act')}"

    # every number's SQL reads that number back from the store
    checked = 0
    for el in page.query_selector_all("[data-sql]"):
        shown = el.text_content() if el.evaluate("e => e.tagName") == "SPAN" else None
        if shown in (None, "–") or not el.get_attribute("class").startswith(("num", "t")):
            continue
        shown = el.get_attribute("data-act") or shown
        (value,) = store.query(el.get_attribute("data-sql")).to_pylist()[0].values()
        assert near(shown, value), (el.get_attribute("data-sql"), shown, value)
        checked += 1
    assert checked > 40
    # the card of the newer run: its numbers, its run id in the SQL
    page.goto((out / "feature.html").as_uri() + f"?f={fx.NEWER}")
    page.wait_for_selector("body[data-ready]")
    density = page.query_selector('#stats tr[data-key="density"] .num')
    assert f"run_id = '{fx.NEWER_RUN}'" in density.get_attribute("data-sql")
    (value,) = store.query(density.get_attribute("data-sql")).to_pylist()[0].values()
    assert value == cards[fx.NEWER]["density"] and near(density.text_content(), value)
    # clicking a number shows its SQL
    page.click('#stats tr[data-key="density"] .num')
    assert page.text_content("#sql") == (
        f"SELECT density FROM feature_cards WHERE sae = '{fx.SAE}' AND layer = {fx.LAYER} "
        f"AND run_id = '{fx.NEWER_RUN}' AND feature = {fx.NEWER}"
    )


@needs_chromium
def test_dead_feature_missing_feature_and_http_server(built, page):
    store, cards, out = built
    page.goto((out / "feature.html").as_uri() + f"?f={fx.DEAD}")
    page.wait_for_selector("body[data-ready]")
    assert "does not fire" in page.text_content("#top")
    assert page.query_selector_all("#histogram rect") == []
    page.goto((out / "feature.html").as_uri() + "?f=999")
    page.wait_for_selector("#error")
    assert "is not a feature id of SAE" in page.text_content("#error")

    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        page.goto(f"{base}/index.html")
        page.wait_for_selector("body[data-ready]")
        assert len(page.query_selector_all("#rows tr")) == len(cards)
        page.goto(f"{base}/feature.html?f=40")  # a later shard, over HTTP
        page.wait_for_selector("body[data-ready]")
        assert len(page.query_selector_all("#top .ctx")) == len(cards[40]["top_contexts"])
    finally:
        server.shutdown()
        server.server_close()


@needs_chromium
def test_real_feature_cards_site(real_site, page):
    """The site of cards written by analytics.feature_cards itself (tokens of the real tokenizer)."""
    store, out = real_site
    cards = store.query(
        "SELECT feature, density, top_contexts FROM feature_cards ORDER BY density DESC, feature"
    ).to_pylist()
    page.goto((out / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]")
    ids = page.eval_on_selector_all("#rows tr", "rs => rs.map(r => Number(r.dataset.feature))")
    assert sorted(ids) == sorted(c["feature"] for c in cards) and len(ids) == 128
    page.click('th[data-key="density"]')
    ids = page.eval_on_selector_all("#rows tr", "rs => rs.map(r => Number(r.dataset.feature))")
    assert ids == [c["feature"] for c in cards]
    top = cards[0]
    page.click(f'tr[data-feature="{top["feature"]}"] a')
    page.wait_for_selector("body[data-ready]")
    ctx = page.query_selector_all("#top .ctx")
    assert len(ctx) == len(top["top_contexts"]) == 5
    for line, want in zip(ctx, top["top_contexts"], strict=True):
        assert line.eval_on_selector(".ctx-text", "e => e.textContent") == "".join(want["tokens"]).replace("\n", "↵")
    assert len(page.query_selector_all("#histogram rect.bar")) > 0
    centre = ctx[0].query_selector_all(".t")[top["top_contexts"][0]["center"]]
    centre.hover()
    assert near(page.text_content("#hover").split("activation ")[1].split(" ")[0], top["top_contexts"][0]["act"])


@needs_chromium
def test_index_draws_a_limit_then_all(built, tmp_path, page):
    store, cards, _ = built
    out = tmp_path / "site"
    assert main(["--store", str(store.root), "--out", str(out), "--index-rows", "40", "--no-progress"]) == 0
    page.goto((out / "index.html").as_uri())
    page.wait_for_selector("body[data-ready]")
    assert len(page.query_selector_all("#rows tr")) == 40
    assert page.text_content("#count") == f"{len(cards)} of {len(cards)} features"
    page.click("#more")
    assert len(page.query_selector_all("#rows tr")) == len(cards) and page.is_hidden("#more")


@needs_chromium
def test_measure_reports_the_pages_own_times(built, browser, tmp_path, capsys):
    store, cards, _ = built
    argv = ["--store", str(store.root), "--out", str(tmp_path / "site"), "--measure", "1", "--measure-feature", "3"]
    # in a thread of its own: playwright's sync API allows one driver per thread, and this
    # module's browser fixture holds this one's
    rc: list[int] = []
    worker = threading.Thread(target=lambda: rc.append(main([*argv, "--no-progress"])))
    worker.start()
    worker.join()
    assert rc == [0]
    out = capsys.readouterr().out
    assert f"index.html, {len(cards)} features listed" in out and "console errors: 0" in out
    (rec,) = store.query("SELECT metrics FROM runs WHERE kind = 'browse' ORDER BY started_at DESC LIMIT 1").to_pylist()
    timing = json.loads(rec["metrics"])["timing"]
    assert timing["feature"] == 3 and timing["console_errors"] == []
    assert 0 < timing["index_open_ms"]["min"] <= timing["index_open_ms"]["median"]


def test_bad_input_is_one_clear_error(built, tmp_path, capsys):
    store, cards, out = built

    def err(*argv) -> str:
        assert main([*argv, "--no-progress"]) == 2
        return capsys.readouterr().err

    # a store whose SAE has no cards: the error names the command that computes them
    bare, _ = fx.make_store(tmp_path / "bare", n_features=4, with_cards=False)
    msg = err("--store", str(bare.root), "--out", str(tmp_path / "s"))
    assert f"python -m analytics.feature_cards --sae {fx.SAE} --layer {fx.LAYER}" in msg
    # --out naming a file
    file = tmp_path / "site.html"
    file.write_text("x")
    with pytest.raises(SystemExit):
        main(["--store", str(store.root), "--out", str(file)])
    assert f"--out {file} is a file" in capsys.readouterr().err
    # an unknown SAE, a --cards-run that does not exist
    assert "is not in the saes table" in err("--store", str(store.root), "--sae", "nope", "--out", str(tmp_path / "s"))
    msg = err("--store", str(store.root), "--cards-run", "nope", "--out", str(tmp_path / "s"))
    assert "--cards-run 'nope' is not a feature_cards run" in msg
    with pytest.raises(SystemExit):
        main(["--store", str(store.root), "--measure", "2", "--chromium", str(tmp_path / "no-chromium")])
    assert "--chromium" in capsys.readouterr().err
    # nothing was written for the bad calls
    assert not (tmp_path / "s").exists()
    sae = resolve_sae(store, "latest", None)
    assert data.read_cards(store, sae, fx.CARDS_RUN).shown == [fx.CARDS_RUN]
    assert command.BrowseConfig(out=str(tmp_path / "s")).shard_size == 64
