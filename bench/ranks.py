"""Extraction throughput on N ranks against 1 rank, measured in one run on one machine.

    python -m bench.ranks          # random SmolLM2-135M shape, layer 17, 200 rows, 1 vs 2 ranks
    python -m bench.ranks --model random:llama-1b --layers 15 --rows 2000 --unit-tokens 65536 --ranks 1 2 4 8
    python -m bench.ranks --model TINY_FOLDER --layers 1 --rows 12 --unit-tokens 512   # CPU smoke run

(the second on a node with 8 GPUs). Every case runs the documented command,
`torchrun --nproc-per-node N -m extractors.run --layers ... --store COPY`, on its own copy of
one scratch store that is already ingested and tokenized, so each case extracts the same
rows into the same units from scratch. A random-init model (`random:<shape>`, see
bench.common) is saved once as a local folder the ranks load.

Figures per case: the extraction's wall time from the ranks' run records (first rank's
start to last rank's finish: model loading and process start-up excluded, they are
reported apart as the command's wall time), tokens/s over it, the speed-up over 1 rank, and
whether the chunk files are byte-identical to the 1-rank store's. On CPU the ranks share
the cores: `--threads` (default: all cores) is split evenly over a case's ranks through
OMP_NUM_THREADS, torchrun's own knob (it sets 1 when unset), so every case uses the same
cores; `--threads-per-rank T` gives every rank T threads instead. On a CPU the chunk bytes
depend on the thread count (the summation order of the matmuls), so only cases with equal
threads per rank must be byte-identical; the table says "no (threads differ)" otherwise.
Rounds (`--repeats`) interleave the cases; each case's fastest round is reported.
Results: a table, a JSON and a PNG bar chart (--out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RANDOM_PREFIX, Bench, BenchOutOptions, ingest_rows, load_bench_model, print_table
from extractors.chat_tokens import ensure_tokenization
from extractors.units import select_rows
from store.cli import LayerOptions, ModelOptions, ProgressOptions, StoreOptions, parse_config, user_errors
from store.core import Store
from trainers.plots import bar_chart


@dataclass
class BenchRanksConfig(StoreOptions, ModelOptions, LayerOptions, ProgressOptions, BenchOutOptions):
    """Measure `torchrun --nproc-per-node N -m extractors.run` tokens/s for several N.

    --model also takes random:smollm2-135m / random:llama-1b (random init of that shape, saved
    once as a folder the ranks load); --device is cpu, or cuda (one GPU per rank: LOCAL_RANK
    picks it). --store here is a scratch folder for the case stores (default: a temporary
    folder, deleted at the end); it must not hold a store of yours: cases are rewritten."""

    store: str | None = None
    model: str = "random:smollm2-135m"
    device: str = "cpu"
    layers: list[int] = field(default_factory=lambda: [17])
    rows: int = field(default=200, metadata={"help": "rows of the embedded sample to extract (train_base)"})
    ranks: list[int] = field(
        default_factory=lambda: [1, 2],
        metadata={"help": "numbers of ranks to compare (the first is the baseline of the speed-up)"},
    )
    unit_tokens: int = field(
        default=4096,
        metadata={
            "help": "token slots per unit (ranks split the units, so a case needs at least as many units as ranks)"
        },
    )
    batch_tokens: int | None = field(
        default=None, metadata={"help": "padded tokens per batch (default as extractors.run)"}
    )
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads of a whole case, split evenly over its ranks (default: all cores)"}
    )
    threads_per_rank: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of every rank in every case, instead of --threads split over the ranks (on a CPU "
            "the chunk bytes depend on the thread count: equal threads per rank make the cases comparable byte "
            "for byte)"
        },
    )
    repeats: int = field(default=1, metadata={"help": "rounds over all cases; each case's fastest round is reported"})
    timeout: float = field(default=1800.0, metadata={"help": "seconds one case may run before it is stopped"})

    def __post_init__(self) -> None:
        if not self.ranks or any(n <= 0 for n in self.ranks):
            raise ValueError(f"--ranks must be positive numbers of ranks, got {self.ranks}")
        if self.rows <= 0:
            raise ValueError(f"--rows must be positive, got {self.rows}")
        if self.unit_tokens <= 0:
            raise ValueError(f"--unit-tokens must be positive, got {self.unit_tokens}")
        if self.repeats <= 0:
            raise ValueError(f"--repeats must be positive, got {self.repeats}")
        if self.threads is not None and self.threads < max(self.ranks):
            raise ValueError(f"--threads {self.threads} is fewer than --ranks {max(self.ranks)}: each rank needs one")
        if self.threads_per_rank is not None and (self.threads is not None or self.threads_per_rank <= 0):
            raise ValueError(
                f"--threads-per-rank {self.threads_per_rank}: a positive number, and not together with --threads"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


def _model_folder(cfg: BenchRanksConfig, work: Path) -> tuple[str, Any]:
    """(what --model the ranks get, the tokenizer): a random-init model is saved as a folder."""
    lm = load_bench_model(cfg.model, "cpu", "fp32", cfg.model_cache)
    if not cfg.model.startswith(RANDOM_PREFIX):
        return cfg.model, lm.tokenizer
    folder = work / "model"
    if not (folder / "config.json").exists():
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    return str(folder), lm.tokenizer


def _prepare(cfg: BenchRanksConfig, work: Path) -> tuple[Path, str, int]:
    """The template store (ingested, tokenized), the --model for the ranks, and its tokens."""
    model, tok = _model_folder(cfg, work)
    template = Store(work / "template")
    ingest_rows(template, cfg.rows, cfg.model, cfg.progress)
    layout = ensure_tokenization(template, tok, model, cfg.unit_tokens, progress=cfg.progress)
    if layout.unit_tokens != cfg.unit_tokens:
        raise ValueError(
            f"{work} is tokenized with {layout.unit_tokens}-slot units, not --unit-tokens "
            f"{cfg.unit_tokens}; use another --store"
        )
    selected = set(select_rows(template, "train_base", cfg.rows))
    tokens = sum(n for r, n in zip(layout.row_ids, layout.lengths, strict=False) if r in selected)
    units = len({u for r, u in zip(layout.row_ids, layout.units, strict=False) if r in selected})
    if units < max(cfg.ranks):
        raise ValueError(
            f"{cfg.rows} rows fill {units} units of {cfg.unit_tokens} slots, fewer than --ranks "
            f"{max(cfg.ranks)}: lower --unit-tokens or raise --rows"
        )
    return template.root, model, tokens


def _case(cfg: BenchRanksConfig, template: Path, model: str, n: int, dst: Path) -> dict[str, Any]:
    """Run the N-rank command on a fresh copy of the template; figures from its run records."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(template, dst)
    Store(dst).refresh_catalog()
    threads = cfg.threads_per_rank or max(1, (cfg.threads or os.cpu_count() or 1) // n)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun) if torchrun.exists() else "torchrun",
        "--standalone",  # its rendezvous on a free local port: two benchmarks (or test workers) never collide
        "--nproc-per-node",
        str(n),
        "-m",
        "extractors.run",
        "--store",
        str(dst),
        "--model",
        model,
        "--layers",
        *map(str, cfg.layers),
        "--split",
        "train_base",
        "--max-rows",
        str(cfg.rows),
        "--unit-tokens",
        str(cfg.unit_tokens),
        "--device",
        cfg.device,
        "--compute-dtype",
        cfg.compute_dtype,
        *(["--model-cache", cfg.model_cache] if cfg.model_cache else []),
        "--no-progress",
        *(["--batch-tokens", str(cfg.batch_tokens)] if cfg.batch_tokens else []),
    ]
    load = os.getloadavg()[0]  # a busy shared machine shows here
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        timeout=cfg.timeout,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{n}-rank extraction failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    runs = (
        Store(dst)
        .query(
            "SELECT rank, started_at, finished_at, counts FROM runs WHERE kind = 'extract_hidden' "
            "AND status = 'finished' ORDER BY rank"
        )
        .to_pylist()
    )
    if len(runs) != n:
        raise RuntimeError(f"{n}-rank extraction left {len(runs)} finished run records, expected {n}")
    secs = (max(r["finished_at"] for r in runs) - min(r["started_at"] for r in runs)).total_seconds()
    tokens = sum(json.loads(r["counts"])["tokens"] for r in runs)
    return {
        "ranks": n,
        "threads_per_rank": threads,
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs if secs else 0.0,
        "command_seconds": wall,
        "load_average_1min": load,
        "rank_tokens": [json.loads(r["counts"])["tokens"] for r in runs],
    }


def _chunks(store: Path) -> dict[str, bytes]:
    root = store / "arrays"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"}


def _rounds(cfg: BenchRanksConfig, work: Path, template: Path, model: str) -> tuple[dict, dict]:
    """Every case in interleaved rounds: ({N: its fastest round}, {N: chunks equal the first case's})."""
    best: dict[int, dict[str, Any]] = {}
    identical: dict[int, bool] = {}
    base = cfg.ranks[0]
    for rnd in range(cfg.repeats):
        for n in cfg.ranks:
            print(
                f"measuring {n} rank(s)" + (f" (round {rnd + 1}/{cfg.repeats})" if cfg.repeats > 1 else "") + " ...",
                flush=True,
            )
            r = _case(cfg, template, model, n, work / f"case_{n}")
            r["seconds_per_round"] = best.get(n, {}).get("seconds_per_round", []) + [r["seconds"]]
            if n not in best or r["seconds"] < best[n]["seconds"]:
                best[n] = r
            else:
                best[n]["seconds_per_round"] = r["seconds_per_round"]
            if rnd == 0:
                identical[n] = n == base or _chunks(work / f"case_{n}") == _chunks(work / f"case_{base}")
    return best, identical


def run_bench(cfg: BenchRanksConfig) -> dict[str, Any]:
    """Prepare once, run every case (interleaved rounds), print the table, write JSON + PNG."""
    if cfg.store and ((Path(cfg.store) / "catalog").is_dir() or (Path(cfg.store) / "arrays").is_dir()):
        raise ValueError(
            f"--store {cfg.store} is a store; bench.ranks needs a scratch folder of its own (it rewrites "
            f"the case stores inside it): pass a new folder, or none for a temporary one"
        )
    with Bench("ranks", cfg.store, cfg.out, scratch="folder") as bench:
        work = bench.folder
        template, model, tokens = _prepare(cfg, work)
        print(
            f"{cfg.rows} rows, {tokens:,} tokens in {cfg.unit_tokens}-slot units; model {cfg.model}; "
            f"layers {cfg.layers}; ranks {cfg.ranks} on {cfg.device}"
        )
        best, identical = _rounds(cfg, work, template, model)
        base = cfg.ranks[0]
        rows = []
        for n in cfg.ranks:
            r = best[n]
            r["speedup"] = r["tokens_per_s"] / best[base]["tokens_per_s"] if best[base]["tokens_per_s"] else None
            r["identical_to_first"] = identical[n]
            same_threads = r["threads_per_rank"] == best[base]["threads_per_rank"]
            # On a CPU another thread count sums in another order: bytes may differ without a fault.
            rows.append({**r, "identical": "yes" if identical[n] else "NO" if same_threads else "no (threads differ)"})
        text = print_table(
            rows,
            [
                ("ranks", "ranks", "d"),
                ("threads_per_rank", "threads/rank", "d"),
                ("tokens", "tokens", ",d"),
                ("seconds", "extract s", ".2f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("speedup", f"x {base} rank(s)", ".2f"),
                ("command_seconds", "command s", ".1f"),
                ("load_average_1min", "load", ".1f"),
                ("identical", "same chunks", ""),
            ],
        )
        result = {**bench.header(cfg), "tokens": tokens, "cases": [best[n] for n in cfg.ranks], "table": text}
        bench.write(
            result,
            bench.path(cfg.model, cfg.device),
            lambda png: bar_chart(
                png,
                [f"{n} rank(s)" for n in cfg.ranks],
                [best[n]["tokens_per_s"] for n in cfg.ranks],
                f"extractors.run under torchrun, {cfg.model}, layers {cfg.layers}, {tokens:,} tokens, {cfg.device}",
                "tokens / s",
            ),
        )
        return result


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchRanksConfig, argv, prog="python -m bench.ranks"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
