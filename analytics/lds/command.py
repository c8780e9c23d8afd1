"""`python -m analytics.lds`: plan the subsets, train and measure each (claimed, resumable), summarize.

    python -m analytics.lds --attribution latest --subsets 20 --fraction 0.5 --max-steps 60
    python -m analytics.lds --store /tmp/st --attribution <run> --subsets 8 --fraction 0.5 --max-steps 3 \
        --batch-size 4 --eval-max-rows 16                                              # CPU-sized

Units: the base adapter's eval loss (`base`, for scale) and every subset (`subset000`, ...). Each
unit is claimed before it is computed (store.claims, scope `claims/<run_id>/`), so N processes
started with the same command split them, none computed twice, and a dead worker's unit is taken
over. A subset is committed when its `lds_runs` part `<run_id>/<unit>` is written (after its JSON
in `runs/<run_id>/subsets/`): a SIGKILL loses at most the subset in progress, whose finetune
continues from its latest checkpoint. The first process to find every unit committed writes the
summary (`lds.json`, `lds_scatter.png`, the `runs` record) under a claim; a rerun of a finished
run does nothing and loads no model.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from analytics import select_arms as sa
from analytics.lds import scores
from analytics.lds.config import NOT_IN_ID, LdsConfig
from analytics.lds.plot import report, scatter
from extractors.model import pick_device
from extractors.sft_data import select_rows_by
from store import claims
from store.catalog.runs import Run
from store.cli import config_dict, parse_config, user_errors
from store.core import Store, StoreError, write_json
from trainers.selection.subsets import SubsetSpec, resolve_source, subset_rows, write_subset

TABLE = "lds_runs"
SEED_STRIDE = 100_000  # subset i of --seed S is drawn with seed S * SEED_STRIDE + i
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("subset", pa.string()),  # the subsets-table name of the subset's rows
        ("subset_index", pa.int64()),
        ("seed", pa.int64()),  # the subset's draw seed
        ("n_rows", pa.int64()),
        ("predicted", pa.float64()),  # sum of the rows' benefits (higher = predicted more helpful)
        ("actual_loss", pa.float64()),  # the subset adapter's token-weighted eval loss
        ("source", pa.string()),  # attribution:<run>, predictor:<run>, reward_model, random
        ("adapter", pa.string()),
        ("eval_run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def check_pool(n: int, k: int, cfg: LdsConfig, run: str) -> None:
    """Enough pool rows for --subsets distinct subsets of k = round(fraction x n) rows, or one error."""
    distinct = math.comb(n, k) if 0 < k < n else (1 if n else 0)
    if 0 < k < n and distinct >= cfg.subsets:
        return
    raise StoreError(
        f"attribution run {run} scored {n} rows of --pool-split {cfg.pool_split}: --fraction {cfg.fraction} gives "
        f"subsets of {k} rows, of which {distinct} distinct ones exist, and --subsets {cfg.subsets} needs "
        f"{cfg.subsets} with 0 < k < {n}; score more pool rows (python -m extractors.run --kinds attribution "
        "--max-rows N), or pass another --fraction or fewer --subsets"
    )


def lds_id(cfg: LdsConfig, run: str, predictor_run: str | None, base: Any) -> str:
    what = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_ID}
    what.update(attribution=run, predictor=predictor_run, resume_adapter=base.name if base else None)
    return "lds-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def finished(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """unit -> record of the run's committed units: subsets with an lds_runs part and their JSON,
    the base with its JSON."""
    d = store.run_folder(run_id) / "subsets"
    out = {}
    if (d / "base.json").is_file():
        out["base"] = json.loads((d / "base.json").read_text())
    if store.has_table(TABLE):
        idx = store.query(f"SELECT DISTINCT subset_index FROM {TABLE} WHERE run_id = ?", [run_id]).column(0)
        for i in idx.to_pylist():
            path = d / f"subset{i:03d}.json"
            if path.is_file():
                out[f"subset{i:03d}"] = json.loads(path.read_text())
    return out


def commit(store: Store, run_id: str, unit: str, rec: dict[str, Any], srcs: list[scores.Source]) -> None:
    """The unit's JSON, then (a subset) its lds_runs rows, one per source that predicts: the commit."""
    write_json(store.run_dir(run_id) / "subsets" / f"{unit}.json", rec)
    if unit == "base":
        return
    now = datetime.now(UTC)
    rows = [
        {
            "run_id": run_id,
            "subset": rec["subset"],
            "subset_index": rec["subset_index"],
            "seed": rec["seed"],
            "n_rows": rec["n_rows"],
            "predicted": rec["predicted"][s.name],
            "actual_loss": rec["eval_loss"],
            "source": s.name,
            "adapter": rec["adapter"],
            "eval_run_id": rec["eval_run_id"],
            "created_at": now,
        }
        for s in srcs
        if s.benefit is not None
    ]
    store.write_table(TABLE, pa.Table.from_pylist(rows, schema=SCHEMA), part=f"{run_id}/{unit}")


def _stored(store: Store, run_id: str, units: list[str]) -> dict[str, Any] | None:
    path = store.run_folder(run_id) / "lds.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("status") == "finished" and doc.get("units") == units else None


def summarize(store: Store, run_id: str, srcs: list[scores.Source], cfg: LdsConfig) -> dict[str, Any]:
    """Per source: the subsets' (predicted, actual) pairs from lds_runs and the LDS with its CI."""
    t = store.query(
        f"SELECT source, subset_index, predicted, actual_loss FROM {TABLE} WHERE run_id = ? ORDER BY subset_index",
        [run_id],
    ).to_pylist()
    out: dict[str, Any] = {}
    for s in srcs:
        if s.benefit is None:
            out[s.name] = {"skipped_because": s.skipped_because}
            continue
        mine = [r for r in t if r["source"] == s.name]
        pred = np.array([r["predicted"] for r in mine])
        actual = np.array([r["actual_loss"] for r in mine])
        out[s.name] = {
            **scores.lds(pred, actual, cfg.n_boot, cfg.stats_seed),
            "sign": s.sign,
            "predicted": pred.tolist(),
            "actual_loss": actual.tolist(),
        }
    return out


def run_lds(cfg: LdsConfig) -> dict[str, Any]:
    """Plan, compute the missing units (claimed: N processes share them), summarize (module docstring)."""

    store = Store(cfg.store)
    if cfg.local_rank is not None and cfg.device in ("auto", "cuda"):
        cfg.device = str(pick_device(cfg.device, cfg.local_rank))  # one GPU per rank of a node
    # Every check before any model loads: the eval rows, the attribution run, the pool, the predictor, the base.
    select_rows_by(store, split=cfg.eval_split, max_rows=cfg.eval_max_rows, flag="--eval-split")
    resolved, run = resolve_source(store, f"attribution:{cfg.attribution}")
    pool = scores.pool_of(store, run, cfg.pool_split)
    n, k = pool.height, round(cfg.fraction * pool.height)
    check_pool(n, k, cfg, run)
    predictor_run, why_not = scores.resolve_predictor(store, cfg.predictor, run)
    base = sa.resolve_base(store, cfg.resume_adapter)
    base_spec = sa.spec_of(store, base)
    run_id = lds_id(cfg, run, predictor_run, base)
    names = [f"subset{i:03d}" for i in range(cfg.subsets)]
    units = ["base", *names]
    done = finished(store, run_id)
    stored = _stored(store, run_id, units)
    if stored is not None and all(u in done for u in units):
        print(f"nothing to do: lds run {run_id} is finished ({cfg.subsets} subsets)")
        return stored
    seeds = {u: cfg.seed * SEED_STRIDE + i for i, u in enumerate(names)}
    specs = {
        u: SubsetSpec(resolved, "random_from_ranks", k=k, ranks=(1, None), seed=seeds[u], pool_split=cfg.pool_split)
        for u in names
    }
    subsets = {u: write_subset(store, specs[u]) for u in names}  # cheap and deterministic
    rows = {u: subset_rows(store, subsets[u]) for u in names}
    budget = cfg.budget()
    steps = sa.check_budget({u: len(rows[u]) for u in names}, budget)
    srcs = scores.sources(store, pool, run, predictor_run, why_not, cfg.seed)
    run_dir = store.run_dir(run_id)
    measure = sa.Measure(
        store,
        cfg.model,
        cfg.eval_split,
        cfg.eval_max_rows,
        [],
        {},
        {},
        "not measured by analytics.lds",
        1,
        1,
        cfg.max_length,
        cfg.on_long,
        cfg.device,
        cfg.compute_dtype,
        cfg.model_cache,
        cfg.progress,
        run_dir / "subsets",
    )
    plan = {
        "run_id": run_id,
        "status": "planned",
        "attribution": run,
        "predictor": predictor_run,
        "base_adapter": base.name if base else None,
        "pool": {"split": cfg.pool_split, "rows": n},
        "subset_rows": k,
        "units": units,
        "budget": {
            "steps": steps,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps,
            "finetune_seed": cfg.seed,
        },
        "sources": [{"source": s.name, "sign": s.sign, "skipped_because": s.skipped_because} for s in srcs],
    }
    write_json(run_dir / "lds.json", plan)  # before the first finetune; replaced by the result

    def compute(unit: str) -> dict[str, Any]:
        if unit == "base":
            return {"unit": "base", "adapter": base.name if base else None, **measure.eval_loss(base_spec, "base")}
        arm = sa.Arm(unit, cfg.seed, specs[unit])  # the finetune seed is --seed for every subset
        trained = sa.train_arm(store, run_id, arm, subsets[unit], len(rows[unit]), base, budget, cfg, steps)
        return {
            "unit": unit,
            "subset": subsets[unit],
            "subset_index": names.index(unit),
            "seed": seeds[unit],
            "n_rows": len(rows[unit]),
            "row_ids": rows[unit],
            "predicted": {s.name: scores.predicted(s, rows[unit]) for s in srcs if s.benefit is not None},
            **trained,
            **measure.eval_loss(trained["adapter"], unit),
        }

    scope, timeout = run_id, cfg.claim_timeout

    mine = sa.share_units(
        store,
        scope,
        units,
        lambda: finished(store, run_id),
        lambda u: commit(store, run_id, u, compute(u), srcs),
        rank=cfg.rank,
        world_size=cfg.world_size,
        timeout=timeout,
        desc="lds subsets",
        progress=cfg.progress,
    )
    with claims.exclusive(store, scope, "summary", timeout):
        stored = _stored(store, run_id, units)
        if stored is not None:
            return stored
        done = finished(store, run_id)
        missing = [u for u in units if u not in done]
        if missing:
            raise StoreError(f"lds run {run_id}: units {missing} are not committed; rerun the same command")
        by_source = summarize(store, run_id, srcs, cfg)
        title = f"{resolved}: {cfg.subsets} subsets of {k} of {n} pool rows, {steps} steps each"
        png = scatter(by_source, done["base"]["eval_loss"], run_dir / "lds_scatter.png", title)
        result = {
            **plan,
            "status": "finished",
            "sources": by_source,
            "base_eval_loss": done["base"]["eval_loss"],
            "eval": {"split": cfg.eval_split, "rows": len(done["base"]["eval_row_ids"])},
            "subsets": [{k_: done[u][k_] for k_ in ("subset", "seed", "adapter", "eval_loss")} for u in names],
            "computed_here": mine,
            "plot": str(png),
            "methods": scores.__doc__,
        }
        with Run(
            store,
            "lds",
            {**config_dict(cfg), "run_id": run_id, "attribution_resolved": run, "predictor_resolved": predictor_run},
            model_id=base.base_model if base else cfg.model,
            model_hash=base.base_hash if base else "",
            run_id=run_id,
        ) as rec:
            write_json(rec.dir / "lds.json", result)
            rec.finish(
                counts={"subsets": cfg.subsets, "subset_rows": k, "pool_rows": n, "eval_rows": result["eval"]["rows"]},
                metrics={name: v.get("lds") for name, v in by_source.items()},
            )
    return result


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    cfg = parse_config(LdsConfig, argv, prog="python -m analytics.lds")
    res = run_lds(cfg)
    print(report(res, Path(Store(cfg.store).run_folder(res["run_id"])) / "lds.json"))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
