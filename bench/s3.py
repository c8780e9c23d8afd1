"""Local disk against an S3 server: extraction and reads of the same store, in one run.

    python -m bench.s3                                   # moto's S3 server on 127.0.0.1, embedded model
    python -m bench.s3 --rows 40 --n-tokens 2000 --n-rows 10 --repeats 1   # CPU-sized smoke run
    python -m bench.s3 --s3-url s3://my-bucket/bench     # a real S3 / MinIO (AWS_* credentials, AWS_ENDPOINT_URL)

Both stores get the same work, local first, then S3:

* `ingest`      the embedded sample (`--rows` train_base rows) ingested and tokenized;
* `extract`     `python -m extractors.run --layer L` (`--model`): tokens/s end to end, so the
                forward pass is in it; on 2 CPU cores it bounds both stores alike;
* `unit writes` a synthetic bf16 array (`--width` wide) written and committed unit by unit
                (`write_unit` + `commit_unit`, no model): the storage side of an extraction
                alone, in tokens/s and GB/s;
* reads of that array: `tokens` (materialize `--n-tokens` random tokens), `rows` (every token
  of `--n-rows` random whole rows), `stream` (`iter_materialize` over `--view`). Local reads
  are timed cold (page cache dropped) and warm; S3 reads have no cache on the client, so
  each call fetches from the server (byte-range reads of the chunk objects, store.reads.ranges).

Without --s3-url, moto's server mode is started on 127.0.0.1 (a free port) with throwaway
credentials, as the tests do: a local, single-process S3 over loopback HTTP, so its figures
show the protocol's cost (requests, copies), not a network's. Writes a table, JSON and a bar
chart (default bench_out/s3.json, .png).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Bench, BenchOutOptions, drop_cache, print_table
from bench.read import BenchReadConfig, _synthetic_array
from extractors.ingest import IngestConfig, run_ingest
from extractors.pipeline import ExtractConfig, run_extraction
from store.cli import LayerOptions, ModelOptions, ProgressOptions, SeedOptions, parse_config, user_errors
from store.core import Store
from store.fs import staging_root, storage_options
from store.materialize import iter_materialize, materialize
from trainers.plots import bar_chart


@dataclass
class BenchS3Config(ModelOptions, LayerOptions, SeedOptions, ProgressOptions, BenchOutOptions):
    """Measure extraction and read throughput of a local store against one on an S3 server.

    --model and --layer are the extraction case's (one layer); --seed seeds the synthetic values
    and the random selections."""

    layers: list[int] = field(default_factory=lambda: [17])
    s3_url: str | None = field(
        default=None,
        metadata={
            "help": "s3://bucket/prefix to benchmark (credentials and "
            "endpoint from AWS_* / the AWS config, as every AWS tool reads them; the prefix is "
            "deleted afterwards); default: a moto S3 server started on 127.0.0.1"
        },
    )
    rows: int = field(default=200, metadata={"help": "train_base rows of the embedded sample ingested"})
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit (chunk)"})
    width: int = field(default=576, metadata={"help": "width of the synthetic array of the write/read cases"})
    n_tokens: int = field(default=20000, metadata={"help": "random tokens per 'tokens' materialization"})
    n_rows: int = field(default=50, metadata={"help": "random whole rows per 'rows' materialization"})
    view: str = field(default="content_tokens", metadata={"help": "view streamed by the 'stream' case"})
    batch_size: int = field(default=8192, metadata={"help": "tokens per streamed batch"})
    repeats: int = field(default=3, metadata={"help": "repeats per read measurement (the median is reported)"})

    def __post_init__(self) -> None:
        for name in ("rows", "unit_tokens", "width", "n_tokens", "n_rows", "batch_size", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.s3_url is not None and not self.s3_url.startswith("s3://"):
            raise ValueError(f"--s3-url {self.s3_url!r} must be s3://bucket/prefix")
        self.one_layer("bench.s3")


class _MotoServer:
    """moto's S3 server on 127.0.0.1 and the AWS_* variables that point s3fs at it (restored
    on exit: they are the standard credentials boto reads, set here for this process only)."""

    def __enter__(self) -> str:
        try:  # lazy: optional (the dev extra), needed only without --s3-url
            from moto.server import ThreadedMotoServer
        except ImportError as e:
            raise RuntimeError(
                "bench.s3 without --s3-url needs moto's server: pip install 'moto[server]' (in the dev extra)"
            ) from e
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.srv.start()
        host, port = self.srv.get_host_and_port()
        self.saved = {
            k: os.environ.get(k)
            for k in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION",
                "AWS_PROFILE",
                "AWS_SESSION_TOKEN",
            )
        }
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import s3fs  # lazy: optional object-storage driver, only for this server

        s3fs.S3FileSystem(**storage_options("s3")).mkdir("bench")
        return f"s3://bench/store-{uuid.uuid4().hex[:8]}"

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.srv.stop()


def _median(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _measure_store(cfg: BenchS3Config, root: str, where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rec = lambda case, method, n, secs, bytes_=None, note="": out.append(  # noqa: E731
        {
            "store": where,
            "case": case,
            "method": method,
            "tokens": n,
            "seconds": secs,
            "tokens_per_s": n / secs if secs else None,
            "GBps": bytes_ / secs / 1e9 if bytes_ and secs else None,
            "note": note,
        }
    )
    tokenizer = "embedded" if cfg.model.startswith("random:") else cfg.model
    t0 = time.perf_counter()
    run_ingest(
        IngestConfig(
            store=root,
            model=tokenizer,
            train_base=cfg.rows,
            attr_query=0,
            eval=0,
            sample_train=max(1000, int(cfg.rows * 1.1) + 50),
        ),
        progress=cfg.progress,
    )
    store = Store(root)
    n_rows = store.query("SELECT count(*) AS n FROM rows").to_pylist()[0]["n"]
    rec("ingest", "ingest", n_rows, time.perf_counter() - t0, note="rows (not tokens) ingested")

    res = run_extraction(
        ExtractConfig(
            layers=cfg.layers,
            store=root,
            model=cfg.model,
            unit_tokens=cfg.unit_tokens,
            progress=cfg.progress,
            device=cfg.device,
            compute_dtype=cfg.compute_dtype,
            model_cache=cfg.model_cache,
        )
    )
    rec(
        "extract",
        f"extractors.run --layer {cfg.layers[0]}",
        res.tokens,
        res.seconds,
        note=f"{cfg.model}, tokenization + forward + write + commit",
    )

    name = "bench/synthetic"
    rcfg = BenchReadConfig(
        array=name, rows=cfg.rows, width=cfg.width, unit_tokens=cfg.unit_tokens, seed=cfg.seed, progress=cfg.progress
    )
    t0 = time.perf_counter()
    _synthetic_array(store, rcfg)
    secs = time.perf_counter() - t0
    n_units = store.query("SELECT count(DISTINCT unit) AS n FROM array_units WHERE array_name = ?", [name]).to_pylist()[
        0
    ]["n"]
    slots = n_units * cfg.unit_tokens
    rec(
        "unit writes",
        "write_unit + commit_unit",
        slots,
        secs,
        slots * cfg.width * 2,
        f"{n_units} units of {cfg.unit_tokens} x {cfg.width} bf16 (random values, no model)",
    )

    rng = np.random.default_rng(cfg.seed)
    tok = store.query("SELECT tok_index FROM tokens").column(0).to_numpy()
    pick = np.sort(rng.choice(tok, size=min(cfg.n_tokens, len(tok)), replace=False))
    toks_sql = f"SELECT row_id, tok_index FROM tokens WHERE tok_index IN ({','.join(map(str, pick))})"
    row_ids = store.query("SELECT row_id FROM rows ORDER BY row_id").column(0).to_pylist()
    chosen = [row_ids[i] for i in rng.choice(len(row_ids), size=min(cfg.n_rows, len(row_ids)), replace=False)]
    rows_sql = "SELECT row_id FROM rows WHERE row_id IN (" + ",".join(f"'{r}'" for r in chosen) + ")"
    n_stream = sum(len(m.frame) for m in iter_materialize(store, cfg.view, name, batch_size=cfg.batch_size))
    n_rows_tok = len(materialize(store, rows_sql, name).frame)

    def stream() -> None:
        for m in iter_materialize(store, cfg.view, name, batch_size=cfg.batch_size):
            m.X.sum()

    chunk_files = [p for p in store.array_path(name).rglob("*") if p.is_file()] if not store.remote else []
    cold = (lambda: drop_cache(chunk_files)) if chunk_files else None
    cases = [
        ("tokens", f"materialize {len(pick):,} random tokens", len(pick), lambda: materialize(store, toks_sql, name)),
        ("rows", f"materialize {len(chosen)} whole rows", n_rows_tok, lambda: materialize(store, rows_sql, name)),
        ("stream", f"iter_materialize {cfg.view}", n_stream, stream),
    ]
    for case, method, n, fn in cases:
        fn()  # untimed: connection, caches
        if store.remote:
            rec(case, method, n, _median(fn, cfg.repeats), n * cfg.width * 2, "every call fetches from the server")
        else:
            rec(case, method + " (cold)", n, _median(fn, cfg.repeats, cold), n * cfg.width * 2, "page cache dropped")
            rec(case, method + " (warm)", n, _median(fn, cfg.repeats), n * cfg.width * 2, "page cache warm")
    return out


def _both_stores(cfg: BenchS3Config, local: Path, server: _MotoServer | None) -> list[dict[str, Any]]:
    """Every case on a local store, then on the S3 store (deleted afterwards, with its staging)."""
    url = server.__enter__() if server is not None else cfg.s3_url.rstrip("/")
    if Store(url).has_table("manifests"):
        raise ValueError(f"--s3-url {url} already holds a store; pass an empty prefix (it is deleted afterwards)")
    results = _measure_store(cfg, str(local), "local disk")
    try:
        results += _measure_store(cfg, url, "S3 (moto, 127.0.0.1)" if server is not None else f"S3 ({url})")
    finally:
        Store(url).root.rmtree()
        shutil.rmtree(staging_root(url), ignore_errors=True)  # its run folders' local staging
        try:
            staging_root(url).parent.rmdir()  # and the staging folder, if now empty
        except OSError:
            pass
    for r in results:  # S3 speed as a fraction of local speed (same work)
        if r["store"] != "local disk":
            for suffix, key in ((" (warm)", "vs_local_warm"), (" (cold)", "vs_local_cold"), ("", "vs_local")):
                peer = next(
                    (x for x in results if x["store"] == "local disk" and x["method"] == r["method"] + suffix), None
                )
                if peer is not None and peer["seconds"] and r["seconds"]:
                    r[key] = peer["seconds"] / r["seconds"]
    return results


def run_bench(cfg: BenchS3Config) -> dict[str, Any]:
    server = _MotoServer() if cfg.s3_url is None else None
    try:
        with Bench("s3", None, cfg.out, scratch="folder") as bench:
            results = _both_stores(cfg, bench.folder / "store", server)
            print()
            text = print_table(
                results,
                [
                    ("store", "store", ""),
                    ("case", "case", ""),
                    ("method", "method", ""),
                    ("tokens", "tokens", ","),
                    ("tokens_per_s", "tok/s", ",.0f"),
                    ("GBps", "GB/s", ".3f"),
                    ("seconds", "s", ".3f"),
                    ("vs_local_warm", "vs local warm", ".2f"),
                    ("vs_local_cold", "vs local cold", ".2f"),
                    ("vs_local", "vs local", ".2f"),
                    ("note", "note", ""),
                ],
            )
            result = {
                **bench.header(cfg),
                "server": "moto (ThreadedMotoServer, 127.0.0.1)" if server is not None else cfg.s3_url,
                "results": results,
                "table": text,
            }
            shown = [r for r in results if r["tokens_per_s"] and r["case"] != "ingest"]
            bench.write(
                result,
                bench.path(),
                lambda png: bar_chart(
                    png,
                    [f"{r['store']}: {r['method']}" for r in shown],
                    [r["tokens_per_s"] for r in shown],
                    "local disk vs S3 server",
                    "tokens/s",
                ),
            )
            return result
    finally:
        if server is not None:
            server.__exit__(None, None, None)


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchS3Config, argv, prog="python -m bench.s3"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
