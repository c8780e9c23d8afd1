"""`python -m analytics.browse`: the feature browser, a static site of an SAE's feature cards.

    python -m analytics.browse --sae latest --out site/
    python -m analytics.browse --sae latest --layer 17 --out site/ --shard-size 32
    (open site/index.html in a browser, or: python -m http.server -d site 8000)

Reads table `feature_cards` (python -m analytics.feature_cards; each feature's newest card unless
--cards-run names one run) and, when present, `feature_labels` (python -m analytics.label_features;
each feature's current label is the one analytics.label_features.review chooses: a human label
above automatic ones). Writes index.html (every feature: search by label / token / metadata
text, sort by density, importance or label score), feature.html?f=ID (contexts highlighted by
activation, histogram, logit effects, metadata associations, labels and scores, the SQL of each
number) and the data as script files (site.py). Leaves a `runs` record (kind browse); without
--out the site goes to that run's folder, runs/<run_id>/site/.
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
    cards_run: str = field(
        default="all",
        metadata={"help": "the feature_cards shown: all (each feature's newest card) or one run's (its run id)"},
    )

    def __post_init__(self) -> None:
        if len(self.layers) > 1:
            self.one_layer("browse")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; pass a folder (it is created when missing)")


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
        counts = {"features": len(index), "labelled": meta["n_labelled"], "shards": len(shards)}
        run.finish(counts=counts, metrics={"seconds": secs, "out": str(out), "cards_runs": cards.shown})
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
    )


def report(res: BrowseResult) -> str:
    return (
        f"SAE {res.sae.name} layer {res.sae.layer}: {res.n_features} features ({res.n_labelled} labelled) from "
        f"feature_cards run(s) {', '.join(res.cards_runs)} in {res.seconds:.1f} s; "
        f"index {res.index_bytes / 1e3:.0f} kB, {res.n_shards} page data files\n"
        f"open {res.out / 'index.html'} (or: python -m http.server -d {res.out} 8000)"
    )


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BrowseConfig, argv, prog="python -m analytics.browse")
    print(report(build_site(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
