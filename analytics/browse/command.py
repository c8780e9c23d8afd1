"""`python -m analytics.browse`: the feature browser, a static site of an SAE's feature cards.

    python -m analytics.browse --sae latest --out site/
    python -m analytics.browse --sae latest --layer 17 --out site/ --shard-size 32
    python -m analytics.browse --sae latest --out site/ --measure 5      # + index/search/page times in Chromium
    (open site/index.html in a browser, or: python -m http.server -d site 8000)

Reads table `feature_cards` (python -m analytics.feature_cards; each feature's newest card unless
--cards-run names one run) and, when present, `feature_labels` (python -m analytics.label_features;
each feature's current label is the one analytics.label_features.review chooses: a human label
above automatic ones). Writes index.html (every feature: search by label / token / metadata
text, sort by density, importance or label score), feature.html?f=ID (contexts highlighted by
activation, histogram, logit effects, metadata associations, labels and scores, the SQL of each
number) and the data as script files (site.py). Leaves a `runs` record (kind browse) and its
browse.json; without --out the site goes to that run's folder, runs/<run_id>/site/.
`--measure N` then opens the site N times in Chromium and reports the times the pages measure
(measure.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from analytics.browse import data, site
from analytics.browse import measure as in_browser
from analytics.label_features.inputs import SaeRef, resolve_sae
from store.catalog.runs import Run
from store.cli import LayerOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError


@dataclass(kw_only=True)
class BrowseConfig(StoreOptions, LayerOptions, ProgressOptions):
    """A static feature browser of an SAE's feature cards and labels: index.html (search, sort)
    and one page per feature, working offline from the file system or any static server."""

    sae: str = field(default="latest", metadata={"help": "the SAE: latest (newest in the saes table) or its name"})
    layers: list[int] = field(default_factory=list, metadata={"default_help": "the SAE's layer"})
    out: str | None = field(
        default=None,
        metadata={"help": "the site's folder (created; default: the browse run's folder, runs/<run_id>/site)"},
    )
    shard_size: int = field(default=64, metadata={"help": "features per lazily loaded data file features/NNNN.js"})
    index_rows: int = field(
        default=5000, metadata={"help": "rows the index draws at once (a 'show all' button draws the rest)"}
    )
    cards_run: str = field(
        default="all",
        metadata={"help": "the feature_cards shown: all (each feature's newest card) or one run's (its run id)"},
    )
    measure: int = field(
        default=0,
        metadata={
            "help": "then open the site N times in Chromium and report the times the pages measure (index listed, "
            "a search, a feature page): 0 = do not"
        },
    )
    measure_feature: int | None = field(
        default=None, metadata={"help": "--measure: the feature page timed (default: the densest feature)"}
    )
    measure_search: str = field(default="the", metadata={"help": "--measure: the search typed into the index"})
    chromium: str = field(default=in_browser.DEFAULT_CHROMIUM, metadata={"help": "--measure: the Chromium executable"})

    def __post_init__(self) -> None:
        if len(self.layers) > 1:
            self.one_layer("browse")
        if self.shard_size < 1 or self.index_rows < 1:
            raise ValueError(f"--shard-size and --index-rows must be >= 1, got {self.shard_size}, {self.index_rows}")
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; pass a folder (it is created when missing)")
        if self.measure < 0:
            raise ValueError(f"--measure must be >= 0, got {self.measure}")
        if self.measure and not Path(self.chromium).is_file():
            raise ValueError(
                f"--measure: --chromium {self.chromium} does not exist; install it (apt-get install -y chromium) "
                "or pass --chromium PATH"
            )


class BrowseResult(NamedTuple):
    out: Path
    sae: SaeRef
    cards_runs: list[str]  # the feature_cards runs shown
    n_features: int  # features with a card (index rows)
    n_labelled: int  # of them, with a current label
    n_shards: int
    index_bytes: int
    seconds: float
    run_id: str
    timing: dict | None  # --measure: the pages' own timings in Chromium (measure.measure)


def build_site(cfg: BrowseConfig) -> BrowseResult:
    """Read the cards and labels, then write the site (see the module docstring)."""
    t0 = time.perf_counter()
    store = Store(cfg.store)
    sae = resolve_sae(store, cfg.sae, cfg.layers[0] if cfg.layers else None)
    cards = data.read_cards(store, sae, cfg.cards_run)  # no cards: the error names analytics.feature_cards
    current, every = data.read_labels(store, sae)
    with Run(store, "browse", config_dict(cfg) | {"sae_name": sae.name}, layers=[sae.layer]) as run:
        out = Path(cfg.out) if cfg.out else run.dir / "site"
        site.prepare(out)
        site.write_assets(out)
        meta = {
            "sae": sae.name,
            "layer": sae.layer,
            "d_sae": sae.d_sae,
            "token_set": sae.token_set,
            "cards_runs": cards.shown,
            "n_cards": len(cards.rows),
            "n_labelled": sum(1 for c in cards.rows if c["feature"] in current),
            "shard_size": cfg.shard_size,
            "index_rows": cfg.index_rows,
            "store": str(store.root),
            "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "browse_run": run.run_id,
        }
        index = [data.index_record(c, current.get(c["feature"])) for c in cards.rows]
        index_path = site.write_index(out, meta, data.INDEX_COLUMNS, index)
        shards: dict[int, dict[int, dict]] = {}
        for c in cards.rows:
            f = c["feature"]
            shards.setdefault(f // cfg.shard_size, {})[f] = data.page_record(c, every.get(f, []), current.get(f))
        for shard, records in tqdm(sorted(shards.items()), desc="feature pages", disable=not cfg.progress):
            site.write_shard(out, shard, records)
        secs = time.perf_counter() - t0
        timing = None
        if cfg.measure:
            f = cfg.measure_feature
            if f is None:
                f = max(cards.rows, key=lambda c: (c["density"], -c["feature"]))["feature"]
            timing = in_browser.measure(out, cfg.measure, f, cfg.measure_search, cfg.chromium)
        counts = {"features": len(index), "labelled": meta["n_labelled"], "shards": len(shards)}
        metrics = {"seconds": secs, "out": str(out), "cards_runs": cards.shown, "timing": timing}
        store.write_json(run.dir / "browse.json", {"run_id": run.run_id, "meta": meta, "metrics": metrics})
        run.finish(counts=counts, metrics=metrics)
    return BrowseResult(
        out,
        sae,
        cards.shown,
        len(index),
        meta["n_labelled"],
        len(shards),
        index_path.stat().st_size,
        secs,
        run.run_id,
        timing,
    )


def report(res: BrowseResult) -> str:
    timing = "\n" + in_browser.report(res.timing, res.n_features) if res.timing else ""
    return (
        f"SAE {res.sae.name} layer {res.sae.layer}: {res.n_features} features ({res.n_labelled} labelled) from "
        f"feature_cards run(s) {', '.join(res.cards_runs)} in {res.seconds:.1f} s; "
        f"index {res.index_bytes / 1e3:.0f} kB, {res.n_shards} page data files\n"
        f"open {res.out / 'index.html'} (or: python -m http.server -d {res.out} 8000)" + timing
    )


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BrowseConfig, argv, prog="python -m analytics.browse")
    print(report(build_site(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
