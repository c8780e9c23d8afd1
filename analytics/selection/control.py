"""Does a ranking find the planted rows? `python -m analytics.selection.control`.

    python -m analytics.selection.control --store /tmp/ctl                     # attribution, predictor, reward model
    python -m analytics.selection.control --store /tmp/ctl --rankings attribution:latest

On a planted positive control (`python -m extractors.dataset --control planted`, ground truth in
`rows.planted`) every ranking of `--pool-split` (trainers.selection.subsets.ranking: rank 1 = the
row the source thinks most useful) is scored against the truth:

* precision@k: the share of planted rows among the top k, with k = the number of planted pool rows
  (so a perfect ranking scores 1), beside the base rate (planted / pool: a random ranking's
  expectation);
* AUROC of the ranking for planted vs not (the probability that a random planted row ranks above a
  random unplanted one; ties count half; 0.5 = chance, < 0.5: the ranking points the wrong way),
  with a 95% percentile bootstrap CI (rows resampled, stratified by planted so both classes stay);
* for a predictor ranking also the same two figures over its held-out rows only (`split = 'test'`
  of predictor_scores): the pool includes the rows it was fitted on, where it can simply recall them.

A ranking that misses the planted rows (AUROC near 0.5) or points away from them (AUROC < 0.5) is
the pipeline failing its positive control. Output: the table printed, `control.json` in
`runs/<run_id>/` (run_id = control-<hash of the rankings' resolved runs>), a `runs` record (kind
planted_control).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from store.catalog.runs import Run
from store.cli import StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError, write_json
from trainers.selection.subsets import PREDICTOR_TABLE, ranking, resolve_source


@dataclass(kw_only=True)
class ControlConfig(StoreOptions):
    """Precision@k and AUROC of rankings against the planted control's ground truth (module docstring)."""

    rankings: str = field(
        default="attribution:latest,predictor:latest,reward_model",
        metadata={"help": "comma-separated ranking sources (trainers.selection.subsets): those absent are skipped"},
    )
    pool_split: str = field(default="score_pool", metadata={"help": "the split the rankings rank"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples of the AUROC's CI"})
    stats_seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})

    def __post_init__(self) -> None:
        if not [r for r in self.rankings.split(",") if r.strip()]:
            raise ValueError(f"--rankings {self.rankings!r} names no ranking; e.g. --rankings attribution:latest")
        if self.n_boot <= 0:
            raise ValueError(f"--n-boot must be positive, got {self.n_boot}")


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """P(score of a planted row > score of an unplanted one), ties counting half (Mann-Whitney U)."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    pos, neg = scores[truth], scores[~truth]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs planted and unplanted rows, got {len(pos)} and {len(neg)}")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    u = r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def recovery(rank: np.ndarray, truth: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, Any]:
    """precision@k (k = planted count), base rate, AUROC and its CI of a ranking (1 = best)."""
    rank, truth = np.asarray(rank), np.asarray(truth, dtype=bool)
    k = int(truth.sum())
    if k == 0 or k == len(truth):
        raise StoreError(f"the pool has {k} planted rows of {len(truth)}: the control needs both kinds")
    order = np.argsort(rank, kind="stable")
    top = order[:k]
    local = np.empty(len(rank), dtype=np.int64)  # 1..n within these rows (a held-out subset keeps global ranks)
    local[order] = np.arange(1, len(rank) + 1)
    score = -rank.astype(np.float64)  # higher = better
    pos, neg = np.flatnonzero(truth), np.flatnonzero(~truth)
    draws = [
        auroc(score[idx], truth[idx])
        for idx in (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_boot))
    ]
    return {
        "k": k,
        "pool": len(truth),
        "planted_in_top_k": int(truth[top].sum()),
        "precision_at_k": float(truth[top].mean()),
        "base_rate": float(truth.mean()),
        "auroc": auroc(score, truth),
        "auroc_ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
        "median_rank_planted": float(np.median(local[truth])),
    }


def _truth(store: Store, row_ids: list[str]) -> np.ndarray:
    if not store.has_table("rows") or "planted" not in store.query("SELECT * FROM rows LIMIT 0").schema.names:
        raise StoreError(
            f"{store.root} is not a planted control (rows has no planted column); build one with "
            "python -m extractors.dataset --control planted --store PATH"
        )
    t = store.query("SELECT row_id, planted FROM rows").to_pydict()
    m = dict(zip(t["row_id"], t["planted"], strict=True))
    return np.array([bool(m.get(r)) for r in row_ids])


def run_control(cfg: ControlConfig) -> dict[str, Any]:
    """Score every available ranking against rows.planted (module docstring)."""
    store = Store(cfg.store)
    _truth(store, [])  # a store without the column fails here, before anything else
    rng = np.random.default_rng(cfg.stats_seed)
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for src in (r.strip() for r in cfg.rankings.split(",") if r.strip()):
        try:
            resolved, run = resolve_source(store, src)
        except StoreError as e:  # a ranking this store does not have yet is reported, not fatal
            skipped[src] = str(e)
            continue
        rk = ranking(store, src, cfg.pool_split)
        ids = rk["row_id"].to_list()
        truth = _truth(store, ids)
        entry = {"source": resolved, **recovery(rk["rank"].to_numpy(), truth, cfg.n_boot, rng)}
        if resolved.startswith("predictor:"):
            held = set(
                store.query(f"SELECT row_id FROM {PREDICTOR_TABLE} WHERE run = ? AND split = 'test'", [run])
                .column(0)
                .to_pylist()
            )
            sel = np.array([r in held for r in ids])
            if 0 < truth[sel].sum() < sel.sum():
                entry["held_out"] = recovery(rk["rank"].to_numpy()[sel], truth[sel], cfg.n_boot, rng)
            else:
                entry["held_out"] = None
        out[resolved] = entry
    if not out:
        raise StoreError(f"none of --rankings {cfg.rankings} exists in {store.root}: {skipped}")
    ident = json.dumps({"rankings": sorted(out), "pool": cfg.pool_split}, sort_keys=True)
    run_id = "control-" + hashlib.sha256(ident.encode()).hexdigest()[:12]
    with Run(store, "planted_control", {**config_dict(cfg), "run_id": run_id}, run_id=run_id) as run:
        result = {"run_id": run_id, "pool_split": cfg.pool_split, "rankings": out, "skipped": skipped}
        write_json(run.dir / "control.json", result)
        run.finish(
            counts={"rankings": len(out)},
            metrics={k: {"precision_at_k": v["precision_at_k"], "auroc": v["auroc"]} for k, v in out.items()},
        )
    return result


def report(res: dict[str, Any]) -> str:
    lines = ["ranking | precision@k (k planted) | base rate | AUROC [95% CI] | median rank of planted"]
    for name, e in res["rankings"].items():
        parts = [(name, e)] + ([(f"{name} (held-out rows)", e["held_out"])] if e.get("held_out") else [])
        for label, x in parts:
            lines.append(
                f"{label} | {x['precision_at_k']:.3f} ({x['planted_in_top_k']}/{x['k']}) | {x['base_rate']:.3f} | "
                f"{x['auroc']:.3f} [{x['auroc_ci'][0]:.3f}, {x['auroc_ci'][1]:.3f}] | {x['median_rank_planted']:.1f} "
                f"of {x['pool']}"
            )
    lines += [f"skipped {k}: {v}" for k, v in res["skipped"].items()]
    return "\n".join(lines)


@user_errors(ValueError, StoreError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ControlConfig, argv, prog="python -m analytics.selection.control")
    print(report(run_control(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
