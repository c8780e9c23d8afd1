"""Benchmark: our attribution (extractors.attribution.scores) vs bergson's own command line, same work.

    python -m bench.attribution                                     # embedded model, 32 pool x 8 query rows
    python -m bench.attribution --pool-rows 16 --query-rows 4       # CPU-sized (~3 min on 2 cores)
    python -m bench.attribution --model /path/to/model --store /tmp/st   # another model / a given store

On a scratch store (or `--store`, which needs an ingested store with train_base/attr_query rows)
it trains a LoRA adapter for `--finetune-steps` steps (python -m trainers.finetune), then runs

* ours: `python -m extractors.run --kinds attribution --adapter <it>` in-process (model loaded
  once; bergson's collector and scorer on the loaded PeftModel; each step's config.yaml saved);
* bergson: `python -m bergson <step>/config.yaml` for each of our steps (hessian, query build,
  score), with the run paths moved to a folder of its own: the same model, adapter, datasets
  (stored token ids + labels), projection, seeds and options, through bergson's CLI, which
  loads the model for each step.

Both are timed end to end (ours: the extraction command in-process after ingest; bergson: the
sum of its three processes) and per step, and the two score files are compared (max relative
difference). The summary ratio is pool rows/s of ours over bergson's (target >= 0.9). Prints a
table and writes JSON to bench_out/attribution.json (with --store: <store>/runs/<bench id>/,
or --out).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import Bench, BenchOutOptions, ScratchOptions, print_table
from extractors.attribution.scores import read_scores
from extractors.ingest import IngestConfig, run_ingest
from extractors.pipeline import ExtractConfig, run_extraction
from store.cli import ModelOptions, ProgressOptions, StoreOptions, parse_config, user_errors
from store.core import Store, StoreError
from trainers.finetune.train import FinetuneConfig, run_finetune


@dataclass
class BenchAttributionConfig(StoreOptions, ModelOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Attribution rows/s: ours (in-process bergson) vs bergson's command line on the same work.

    --store: an ingested store with train_base / attr_query rows (default: a scratch store with
    the embedded sample, deleted afterwards); with it, the JSON goes to its runs/<bench id>/."""

    store: str | None = None
    progress: bool = False
    pool_rows: int = field(default=32, metadata={"help": "pool rows scored (first N of score_pool by row_id)"})
    query_rows: int = field(default=8, metadata={"help": "query rows (first N of attr_query by row_id)"})
    score_mode: str = field(default="mean", metadata={"help": "mean, nearest or individual"})
    preconditioning: str = field(default="query", metadata={"help": "none, query or pool"})
    projection_dim: int = field(default=32, metadata={"help": "bergson projection_dim"})
    finetune_steps: int = field(default=2, metadata={"help": "optimizer steps of the adapter trained first"})

    def __post_init__(self) -> None:
        for name in ("pool_rows", "query_rows", "finetune_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def _prepare(cfg: BenchAttributionConfig, store: Store) -> str:
    """Ingest (a scratch store) and train the adapter; returns its name."""
    if not store.has_table("manifests"):
        run_ingest(
            IngestConfig(
                store=str(store.root), model=cfg.model, train_base=cfg.pool_rows, attr_query=cfg.query_rows, eval=2
            ),
            progress=cfg.progress,
        )
    res = run_finetune(
        FinetuneConfig(
            store=str(store.root),
            model=cfg.model,
            max_rows=8,
            batch_size=4,
            max_steps=cfg.finetune_steps,
            epochs=cfg.finetune_steps,
            eval_split="",
            device=cfg.device,
            compute_dtype=cfg.compute_dtype,
            model_cache=cfg.model_cache,
            progress=cfg.progress,
        )
    )
    return res.adapter


def bergson_cli(ours: Path, dest: Path, steps: list[str]) -> dict[str, float]:
    """Replay our steps' config.yaml through `python -m bergson`, with run paths moved into `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for data in ("query_data.hf", "pool_data.hf"):  # the same datasets (their paths share a prefix with query/)
        (dest / data).symlink_to(ours / data, target_is_directory=True)
    seconds = {}
    for step in steps:
        text = (ours / step / "config.yaml").read_text()
        for other in steps:  # run paths, query_path, hessian_path: ours -> dest
            text = text.replace(str(ours / other), str(dest / other))
        cfg_path = dest / f"{step}.yaml"
        cfg_path.write_text(text)
        yaml.safe_load(text)  # a well-formed file, or fail here
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bergson", str(cfg_path)], capture_output=True, text=True)
        seconds[step] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise StoreError(f"bergson's CLI failed on {cfg_path}: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def _ours(cfg: BenchAttributionConfig, store: Store, adapter: str) -> tuple[Any, float]:
    """`python -m extractors.run --kinds attribution --adapter <it>` in-process; (result, seconds)."""
    t0 = time.perf_counter()
    res = run_extraction(
        ExtractConfig(
            layers=[],
            kinds=["attribution"],
            adapter=adapter,
            store=str(store.root),
            model=cfg.model,
            max_rows=cfg.pool_rows,
            query_max_rows=cfg.query_rows,
            score_mode=cfg.score_mode,
            preconditioning=cfg.preconditioning,
            projection_dim=cfg.projection_dim,
            device=cfg.device,
            compute_dtype=cfg.compute_dtype,
            model_cache=cfg.model_cache,
            progress=cfg.progress,
        )
    )
    return res, time.perf_counter() - t0


def run_bench(cfg: BenchAttributionConfig) -> dict[str, Any]:
    with Bench("attribution", cfg.store, cfg.out, keep=cfg.keep_store, beside_store=True) as bench:
        store = bench.store
        adapter = _prepare(cfg, store)
        res, ours_total = _ours(cfg, store, adapter)
        ours_dir = store.root / "runs" / res.run_id / "bergson"
        steps = [s for s in ("hessian", "query", "scores") if s in res.steps]
        cli_dir = store.run_dir(bench.id) / "bergson_cli"
        cli = bergson_cli(ours_dir, cli_dir, steps)
        a, b = read_scores(ours_dir / "scores"), read_scores(cli_dir / "scores")
        diff = float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))
        cli_total = sum(cli.values())
        n = res.rows
        rows = [
            {
                "method": "ours (extractors.run --kinds attribution)",
                "seconds": ours_total,
                "score_s": res.steps["scores"],
                "rows_per_s": n / ours_total,
            },
            {
                "method": "bergson CLI (python -m bergson <step>/config.yaml)",
                "seconds": cli_total,
                "score_s": cli["scores"],
                "rows_per_s": n / cli_total,
            },
        ]
        table = print_table(
            rows,
            [
                ("method", "method", ""),
                ("seconds", "total s", ".1f"),
                ("score_s", "score step s", ".1f"),
                ("rows_per_s", "pool rows/s", ".3f"),
            ],
        )
        summary = {
            "ours_vs_bergson_cli": rows[0]["rows_per_s"] / rows[1]["rows_per_s"],
            "score_step_ours_vs_cli": cli["scores"] / res.steps["scores"],
            "max_relative_score_difference": diff,
        }
        print(
            f"ours / bergson CLI: {summary['ours_vs_bergson_cli']:.2f}x pool rows/s (score step alone "
            f"{summary['score_step_ours_vs_cli']:.2f}x); scores agree to {diff:.1e} (relative)"
        )
        out = {
            **bench.header(cfg),
            "bench": bench.id,
            "pool_rows": n,
            "query_rows": res.query_rows,
            "ours": {"total_seconds": ours_total, "steps": res.steps, "run_id": res.run_id},
            "bergson_cli": {"total_seconds": cli_total, "steps": cli},
            "summary": summary,
            "table": table,
            "date": datetime.now(UTC).isoformat(),
        }
        bench.write(out, bench.path())
        return out


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchAttributionConfig, argv, prog="python -m bench.attribution"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
