"""Benchmark (`python -m bench.feature_cards`): the feature cards of every feature of an SAE
(`python -m analytics.feature_cards`), end to end, against a naive per-feature scan of the codes.

    python -m bench.feature_cards --store /tmp/cards-store                 # its newest SAE, all features
    python -m bench.feature_cards --store S --sae NAME --repeats 2 --naive-features 64

The given store is only read: it is copied, without its hidden states and run folders
(catalog, views, SAE codes and other arrays but hidden/), to a scratch folder where each
repeat runs the card command in-process on every feature (the cards table and run folder are
removed between repeats, so each repeat computes everything) and the best time is kept.
Python's imports are not in the figure (a fresh `python -m` adds them; see docs/interpretation.md).

The naive approach is what a per-feature query loop does: for each feature, scan every
token's codes for it, sort its firing tokens and take the top K; timed on --naive-features
features and extrapolated to all of them (its firing counts and top tokens are checked
against the cards). The JSON and a bar chart go to <store>/runs/<bench id>/feature_cards.json
(or --out); the machine and its load average (before and after) are recorded with them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analytics.feature_cards.command import CardsConfig, run_cards
from analytics.feature_cards.schema import TABLE
from analytics.label_features.inputs import resolve_sae, token_codes
from bench.common import Bench, BenchOutOptions, print_table
from store.cli import LayerOptions, ProgressOptions, StoreOptions, parse_config, user_errors
from store.core import Store, StoreError
from trainers import plots


@dataclass(kw_only=True)
class BenchConfig(StoreOptions, LayerOptions, ProgressOptions, BenchOutOptions):
    """Feature cards of every feature of an SAE, timed end to end, vs a naive per-feature scan."""

    sae: str = field(default="latest", metadata={"help": "the SAE: latest or its name in the saes table"})
    repeats: int = field(default=1, metadata={"help": "card runs timed (the best is kept)"})
    naive_features: int = field(default=32, metadata={"help": "features the naive per-feature scan is timed on"})
    batch_features: int = field(default=256, metadata={"help": "the card command's --batch-features"})

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.naive_features < 0 or self.batch_features < 1:
            raise ValueError("--repeats and --batch-features must be >= 1, --naive-features >= 0")


def scratch_copy(src: Store, dst: Path) -> Store:
    """The store without hidden states and run folders (what the card command does not read)."""
    skip = {src.arrays_dir / "hidden", src.root / "runs", src.root / "scratch", src.root / "claims"}
    shutil.copytree(src.root, dst, ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
    s = Store(dst)
    s.refresh_catalog()
    return s


def naive_scan(store: Store, sae_spec: str, layer: int | None, feats: list[int], top_k: int) -> dict[str, Any]:
    """Per feature: scan all codes for it, sort its firing tokens, keep the top K (seconds, results)."""
    sae = resolve_sae(store, sae_spec, layer)
    c = token_codes(store, sae)
    t0 = time.perf_counter()
    out = {}
    for f in feats:
        hit = (c.idx == f) & (c.val > 0) & c.in_set[:, None]
        tok, slot = np.nonzero(hit)
        act = c.val[tok, slot]
        order = np.lexsort((tok, -act))
        out[f] = (len(tok), [c.text[t] for t in tok[order[:top_k]]])
    return {"seconds": time.perf_counter() - t0, "results": out, "d_sae": sae.d_sae}


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    src = Store(cfg.store)
    with Bench("feature_cards", cfg.store, cfg.out, scratch="none", beside_store=True) as bench:
        res: dict[str, Any] = bench.header(cfg)
        res["load_before"] = os.getloadavg()
        tmp = Path(tempfile.mkdtemp(prefix="bench-feature-cards-"))
        try:
            store = scratch_copy(src, tmp / "store")
            argv = ["--store", str(store.root), "--sae", cfg.sae, "--batch-features", str(cfg.batch_features)]
            argv += [f"--layer={x}" for x in cfg.layers] + ([] if cfg.progress else ["--no-progress"])
            runs = []
            for _ in range(cfg.repeats):
                shutil.rmtree(store.table_dir(TABLE), ignore_errors=True)
                t0 = time.perf_counter()
                card = run_cards(parse_config(CardsConfig, argv))
                runs.append({"seconds": time.perf_counter() - t0, "timings_s": card.summary["timings_s"]})
                shutil.rmtree(store.run_dir(card.run_id), ignore_errors=True)
            best = min(runs, key=lambda r: r["seconds"])
            cards = {
                r["feature"]: r for r in store.query(f"SELECT feature, n_firing, top_contexts FROM {TABLE}").to_pylist()
            }
            res |= {
                "sae": card.sae.name,
                "layer": card.sae.layer,
                "d_sae": card.sae.d_sae,
                "features": len(card.features),
                "n_tokens": card.summary["n_tokens"],
                "n_active_slots": card.summary["n_active_slots"],
                "runs": runs,
                "seconds": best["seconds"],
                "features_per_s": len(card.features) / best["seconds"],
            }
            sample = [int(f) for f in np.linspace(0, card.sae.d_sae - 1, cfg.naive_features).round()]
            if sample:
                top_k = CardsConfig().top_k
                naive = naive_scan(store, cfg.sae, cfg.layers[0] if cfg.layers else None, sample, top_k)
                for f, (n, toks) in naive["results"].items():  # the same firing tokens, strongest first
                    want = [x["tokens"][x["center"]] for x in cards[f]["top_contexts"]]
                    if n != cards[f]["n_firing"] or toks != want:
                        raise StoreError(f"naive scan and cards disagree on feature {f}")
                per = naive["seconds"] / len(sample)
                res["naive"] = {"features_timed": len(sample), "s_per_feature": per}
                res["naive"]["seconds_all"] = per * naive["d_sae"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        res["load_after"] = os.getloadavg()
        t = best["timings_s"]
        rows = [
            {"what": "read + sort codes", "s": t["read_and_sort_codes"]},
            {"what": "joins + W_dec, W_U", "s": t["joins_and_weights"]},
            {"what": "cards (compute + write)", "s": t["cards"]},
            {"what": "the rest (SAE check, run record, plot)", "s": res["seconds"] - sum(t.values())},
            {"what": f"card run, {res['features']} features", "s": res["seconds"]},
        ]
        if "naive" in res:
            rows.append({"what": "naive per-feature scan (extrapolated)", "s": res["naive"]["seconds_all"]})
        print_table(rows, [("what", "step", ""), ("s", "seconds", ".1f")])
        print(f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}")

        def chart(png: Path) -> Path:
            return plots.bar(
                [r["what"] for r in rows],
                [r["s"] for r in rows],
                png,
                title=f"feature cards of {res['sae']} layer {res['layer']} ({res['n_tokens']} tokens)",
                ylabel="seconds",
            )

        bench.write(res, bench.path(), chart)
        return res


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchConfig, argv, prog="python -m bench.feature_cards"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
