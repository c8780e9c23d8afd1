"""The catalog at our users' real sizes, without a model or a GPU: ingest, tokenization, bytes, queries.

    python -m bench.catalog        # 431,000 conversations: M1 splits and full size, 10x tokens
    python -m bench.catalog --rows 3000 --test-rows 400 --replicate 2   # CPU-sized smoke run (~1 min)
    python -m bench.catalog --work ./catwork                  # keep the stores; a rerun reuses finished steps

The source is the embedded generator in scale mode (extractors.ingest.sample.generate.iter_sample:
deterministic, streamed), `--rows` conversations of which `--test-rows` form the test split
(smol-magpie-ultra has ~431k). Two stores are built from it:

* `m1`: what ingest stores for our users' first milestone, 8000 / 500 / 500 rows
  (train_base / attr_query / eval);
* `full`: every usable row stored (train_base = all train rows, attr_query + eval = the test rows).

For each: the ingest and the tokenization (the model's tokenizer only: no weights) are timed,
each in its own process so its peak RSS (ru_maxrss) is its own; the catalog's bytes; and each
shipped view's (sql/views/*.sql) latency for a count and for a 10k-token selection (the
view's lines for seeded random rows holding 10,000 tokens in all), median of --repeats.
Views whose tables only an extraction writes (array_units, sae_top_tokens,
token_gradnorm_values) are listed as not available. Then the same queries on a copy whose
`tokens` table is `--replicate` times larger: every row's token sequence repeated (copy k of a
row's tokens has token_pos + k * n_tokens and tok_index + k * n_slots), as if conversations
were that many times longer, each row's tokens kept together in its part as the tokenization
writes them; `rows` and `row_layout` stay as they are. For each store it also reports how many of
the `tokens` row groups may hold one of the selected rows by their row_id statistics: the
least the selection reads (few when clustered by row).

Prints a table, writes JSON (default bench_out/catalog.json) and a PNG of the query latencies;
while it runs, the finished stores are in catalog.partial.json and a line each is printed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench.common import Bench, BenchOutOptions, folder_bytes, print_table
from store.catalog.runs import Run
from store.cli import ProgressOptions, SeedOptions, config_dict, parse_config, user_errors
from store.core import Store, row_group_rows, write_json

M1_SIZES = {"train_base": 8000, "attr_query": 500, "eval": 500}
MODES = ("m1", "full")


@dataclass
class BenchCatalogConfig(SeedOptions, ProgressOptions, BenchOutOptions):
    """Build the catalog at full size from the embedded generator; time ingest, tokenization and views.

    --model: only its tokenizer is loaded (it counts and tokenizes); --seed seeds the selected rows."""

    rows: int = field(
        default=431_000, metadata={"help": "conversations the generated source has (smol-magpie-ultra: ~431k)"}
    )
    test_rows: int = field(
        default=21_550, metadata={"help": "of which in its test split (attr_query + eval come from it)"}
    )
    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={"help": "m1: the 8000/500/500 splits ingest stores; full: every usable row stored"},
    )
    replicate: int = field(
        default=10, metadata={"help": "also query a copy whose tokens table is this many times larger (1: skip)"}
    )
    replicate_modes: list[str] = field(
        default_factory=lambda: list(MODES), metadata={"help": "the modes whose tokens table is replicated"}
    )
    model: str = "embedded"
    unit_tokens: int = field(default=16384, metadata={"help": "token slots per unit"})
    ingest_batch_rows: int = field(default=10_000, metadata={"help": "rows per ingest write batch"})
    tokenize_batch_rows: int = field(
        default=1000, metadata={"help": "rows per tokenization batch (one tokens part each)"}
    )
    selection_tokens: int = field(default=10_000, metadata={"help": "tokens of the rows a selection query asks for"})
    repeats: int = field(
        default=3, metadata={"help": "repeats per query (the median is reported; the first is also kept)"}
    )
    work: str | None = field(
        default=None,
        metadata={
            "help": "folder for the stores (kept; a rerun reuses the steps "
            "finished there); default: a temporary folder, deleted"
        },
    )

    def __post_init__(self) -> None:
        for name in (
            "rows",
            "test_rows",
            "replicate",
            "unit_tokens",
            "ingest_batch_rows",
            "tokenize_batch_rows",
            "selection_tokens",
            "repeats",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.test_rows >= self.rows:
            raise ValueError(f"--test-rows {self.test_rows} must be below --rows {self.rows}")
        bad = [m for m in [*self.modes, *self.replicate_modes] if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
        if "m1" in self.modes and (self.rows - self.test_rows < 8000 or self.test_rows < 1000):
            raise ValueError(
                f"mode m1 needs >= 8000 train and >= 1000 test rows (got {self.rows - self.test_rows} "
                f"and {self.test_rows}); pass larger --rows/--test-rows or --modes full"
            )


def _sizes(cfg: BenchCatalogConfig, mode: str) -> dict[str, int]:
    if mode == "m1":
        return dict(M1_SIZES)
    return {
        "train_base": cfg.rows - cfg.test_rows,
        "attr_query": cfg.test_rows // 2,
        "eval": cfg.test_rows - cfg.test_rows // 2,
    }


# ---- steps, each in its own process (its peak RSS is its own) --------------------------------
def _step(kind: str, store_dir: str, cfg_d: dict, mode: str, q: Any) -> None:
    t0 = time.perf_counter()
    try:
        if kind == "ingest":
            # lazy: each step's process imports what it measures only (its peak RSS is a figure)
            from extractors.ingest import IngestConfig, run_ingest

            res = run_ingest(
                IngestConfig(
                    store=store_dir,
                    model=cfg_d["model"],
                    sample_train=cfg_d["rows"] - cfg_d["test_rows"],
                    sample_test=cfg_d["test_rows"],
                    batch_rows=cfg_d["ingest_batch_rows"],
                    **cfg_d["sizes"],
                ),
                progress=cfg_d["progress"],
            )
            info = {"sizes": res.sizes, "quarantined": res.quarantined}
        else:
            # lazy: as above
            from extractors.chat_tokens import ensure_tokenization
            from extractors.model import load_tokenizer

            tok = load_tokenizer(cfg_d["model"])
            t0 = time.perf_counter()  # the tokenizer's load is not the tokenization
            lay = ensure_tokenization(
                Store(store_dir),
                tok,
                cfg_d["model"],
                cfg_d["unit_tokens"],
                progress=cfg_d["progress"],
                batch_rows=cfg_d["tokenize_batch_rows"],
            )
            info = {"rows": len(lay.row_ids), "tokens": sum(lay.lengths), "units": lay.n_units}
        q.put(
            {
                "ok": True,
                "seconds": time.perf_counter() - t0,
                "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **info,
            }
        )
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        q.put({"ok": False, "error": f"{type(e).__name__}: {e}"})


def run_step(kind: str, store_dir: Path, cfg: BenchCatalogConfig, mode: str) -> dict:
    """Run one step in a fresh process; its result is saved beside the store, and reused."""
    done = store_dir.parent / f"{store_dir.name}.{kind}.json"
    if done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cfg_d = {**config_dict(cfg), "sizes": _sizes(cfg, mode)}
    p = ctx.Process(target=_step, args=(kind, str(store_dir), cfg_d, mode, q))
    p.start()
    res = q.get()
    p.join()
    if not res.pop("ok"):
        raise RuntimeError(f"{mode} {kind} failed: {res['error']}")
    done.write_text(json.dumps(res))
    return res


# ---- queries ------------------------------------------------------------------------------
def _timed(con: Any, sql: str, repeats: int) -> dict:
    """Run `sql` `repeats` times (all its result fetched); the first and the median time, the result."""
    times, got = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = con.sql(sql).fetchall()
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "median_s": statistics.median(times), "result": got}


def selected_rows(store_dir: Path, cfg: BenchCatalogConfig) -> tuple[list[str], int]:
    """Seeded random rows holding ~selection_tokens tokens in all, and their token count."""
    lay = Store(store_dir).query("SELECT row_id, n_tokens FROM row_layout ORDER BY row_id").to_pydict()
    order = list(range(len(lay["row_id"])))
    random.Random(cfg.seed).shuffle(order)
    picked, total = [], 0
    for i in order:
        if total >= cfg.selection_tokens:
            break
        picked.append(lay["row_id"][i])
        total += lay["n_tokens"][i]
    return picked, total


def query_views(store_dir: Path, cfg: BenchCatalogConfig, selection: tuple[list[str], int]) -> list[dict]:
    """Each shipped view: a count, and its lines for the selected rows (`selected_rows`: the
    rows and their token count)."""
    st = Store(store_dir)
    packaged = sorted(p.stem for p in st.view_files() if p.parent.name == "views" and p.parent.parent.name == "sql")
    errors = st.view_errors()
    picked, total = selection
    out = []
    con = st.connect()
    try:
        con.register("sel_rows", pa.table({"row_id": picked}))
        for v in packaged:
            body = (st.view_files()[[p.stem for p in st.view_files()].index(v)]).read_text()
            if v in errors or "MACRO" in body.upper().split("AS TABLE")[0]:
                why = errors.get(v, "a table macro over token_gradnorms (needs gradient norms)")
                out.append({"view": v, "available": False, "note": why[:160]})
                continue
            count = _timed(con, f'SELECT count(*) FROM "{v}"', cfg.repeats)
            sel = _timed(con, f'SELECT * FROM "{v}" WHERE row_id IN (SELECT row_id FROM sel_rows)', cfg.repeats)
            out.append(
                {
                    "view": v,
                    "available": True,
                    "count_s": count["median_s"],
                    "count_first_s": count["first_s"],
                    "lines": count["result"][0][0],
                    "selection_s": sel["median_s"],
                    "selection_first_s": sel["first_s"],
                    "selection_lines": len(sel["result"]),
                    "selection_rows": len(picked),
                    "selection_tokens": total,
                }
            )
    finally:
        con.close()
    return out


def replicate_tokens(src: Path, dst: Path, factor: int) -> dict:
    """A copy of the store `src` at `dst` whose tokens table is `factor` times larger (module doc).

    Each part of `tokens` becomes one part holding its rows `factor` times longer, in the
    part's own row order (a row's copies one after another, by token_pos): what the
    tokenization would write for longer conversations, row groups clustered by row as its own
    are. (An unordered copy scatters every row over all of a part's row groups, so that no
    selection can skip one: the first version of this benchmark did, see docs/scale.md.)"""
    if (dst / "catalog.duckdb").exists():
        return {"reused": True}
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "catalog").mkdir(parents=True)
    t0 = time.perf_counter()
    for d in (src / "catalog").iterdir():
        if d.name != "tokens":
            shutil.copytree(d, dst / "catalog" / d.name, copy_function=lambda a, b: Path(b).hardlink_to(a))
    s = Store(src)
    z = s.query("SELECT tokenization, n_slots FROM tokenizations").to_pylist()[0]
    files = s.table_files("tokens")
    con = duckdb.connect()
    con.execute("SET memory_limit = '2GB'")
    con.execute(f"SET temp_directory = '{dst / 'duck_tmp'}'")
    out_dir = dst / "catalog" / "tokens" / z["tokenization"]
    out_dir.mkdir(parents=True)
    for i, f in enumerate(files):
        n = con.execute(f"SELECT count(*) FROM read_parquet('{f}')").fetchone()[0]
        # file_row_number - token_pos: the file row of the row's first token (a row's tokens are
        # contiguous and in token_pos order), i.e. the row's place in the part
        con.execute(f"""COPY (
            SELECT t.tokenization, t.row_id, (t.token_pos + k.k * l.n_tokens)::INTEGER AS token_pos, t.token_id,
                   t.token_text, t.role, t.msg_index, t.is_supervised, t.rel_pos, t.char_start, t.char_end,
                   t.tok_index + k.k * {z["n_slots"]}::BIGINT AS tok_index
            FROM read_parquet('{f}', file_row_number = true) t
            JOIN read_parquet('{src}/catalog/row_layout/*.parquet') l USING (row_id)
            CROSS JOIN range({factor}) k(k)
            ORDER BY t.file_row_number - t.token_pos, k.k, t.token_pos
        ) TO '{out_dir / f"part-{i:05d}.parquet"}'
          (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_rows(n * factor)})""")
    con.close()
    shutil.rmtree(dst / "duck_tmp", ignore_errors=True)
    Store(dst).refresh_catalog()
    return {"seconds": time.perf_counter() - t0, "factor": factor}


def row_groups_hit(store_dir: Path, row_ids: list[str]) -> dict[str, int]:
    """How many of the `tokens` Parquet row groups may hold one of `row_ids` by their row_id
    statistics (min <= row_id <= max), of how many: the least a selection of those rows reads.
    Few when the tokens are clustered by row; every group when they are scrambled."""
    files = Store(store_dir).table_files("tokens")
    con = duckdb.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        listed = ", ".join(f"'{f}'" for f in files)
        hit, total = con.execute(f"""
            WITH g AS (SELECT file_name, row_group_id, stats_min_value AS lo, stats_max_value AS hi
                       FROM parquet_metadata([{listed}]) WHERE path_in_schema = 'row_id')
            SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM wanted w WHERE w.row_id BETWEEN g.lo AND g.hi)),
                   count(*)
            FROM g""").fetchone()
        return {"hit": hit, "total": total}
    finally:
        con.close()


def catalog_bytes(store_dir: Path) -> dict[str, int]:
    cat = store_dir / "catalog"
    sizes = {d.name: folder_bytes(d) for d in sorted(cat.iterdir()) if d.is_dir()}
    sizes["catalog.duckdb"] = (store_dir / "catalog.duckdb").stat().st_size
    return sizes


def _figure(path: Path, results: list[dict]) -> Path:
    # lazy: matplotlib stays out of the step processes (their peak RSS is a figure)
    from matplotlib.figure import Figure

    from trainers.plots import save_figure

    bars = [
        (f"{r['store']}: {q['view']}", q["count_s"], q["selection_s"])
        for r in results
        for q in r["queries"]
        if q["available"]
    ]
    fig = Figure(figsize=(9, 0.35 * len(bars) + 1.8))
    ax = fig.subplots()
    y = np.arange(len(bars))
    ax.barh(y - 0.2, [b[1] for b in bars], height=0.4, label="count(*)")
    ax.barh(y + 0.2, [b[2] for b in bars], height=0.4, label="10k-token selection")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="#c44e52", linestyle="--", label="1 s")
    ax.set_xlabel("seconds (median, log scale)")
    ax.set_title("view latency by store size", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _measure(cfg: BenchCatalogConfig, work: Path, out: Path) -> list[dict]:
    """Build (or reuse) each mode's store and its replicated copy, and query them; each
    finished store is saved in <out>.partial.json, so a long run's results survive a kill."""
    results: list[dict] = []

    def done(entry: dict) -> None:
        results.append(entry)
        write_json(out.with_suffix(".partial.json"), {"benchmark": "catalog", "partial": True, "results": results})
        q = {x["view"]: x for x in entry["queries"] if x["available"]}
        print(
            f"{entry['store']}: {entry['tokens']:,} tokens; "
            + "; ".join(f"{v} count {x['count_s']:.3f} s, selection {x['selection_s']:.3f} s" for v, x in q.items()),
            flush=True,
        )

    for mode in cfg.modes:
        store_dir = work / f"{mode}-{cfg.rows}"
        ingest = run_step("ingest", store_dir, cfg, mode)
        tokenize = run_step("tokenize", store_dir, cfg, mode)
        st = Store(store_dir)
        with Run(st, "bench_catalog", {"bench": True, "mode": mode, **config_dict(cfg)}) as run:
            selection = selected_rows(store_dir, cfg)  # a copy has the same rows and row_layout
            queries = query_views(store_dir, cfg, selection)
            size = catalog_bytes(store_dir)
            run.finish(counts={"rows": tokenize["rows"], "tokens": tokenize["tokens"]})
        done(
            {
                "store": mode,
                "rows": tokenize["rows"],
                "tokens": tokenize["tokens"],
                "ingest": ingest,
                "tokenize": tokenize,
                "bytes": size,
                "queries": queries,
                "selection_row_groups": row_groups_hit(store_dir, selection[0]),
            }
        )
        if cfg.replicate > 1 and mode in cfg.replicate_modes:
            rep_dir = work / f"{mode}-{cfg.rows}-x{cfg.replicate}"
            made = replicate_tokens(store_dir, rep_dir, cfg.replicate)
            done(
                {
                    "store": f"{mode} x{cfg.replicate} tokens",
                    "rows": tokenize["rows"],
                    "tokens": tokenize["tokens"] * cfg.replicate,
                    "replicate": made,
                    "bytes": catalog_bytes(rep_dir),
                    "queries": query_views(rep_dir, cfg, selection),
                    "selection_row_groups": row_groups_hit(rep_dir, selection[0]),
                }
            )
    return results


def _print_tables(results: list[dict]) -> tuple[str, str]:
    """The stores table and the queries table, printed; returns both texts."""
    lines = [
        {
            "store": r["store"],
            "rows": r["rows"],
            "tokens": r["tokens"],
            "catalog_MB": sum(r["bytes"].values()) / 1e6,
            "tokens_MB": r["bytes"].get("tokens", 0) / 1e6,
            "ingest_s": r.get("ingest", {}).get("seconds"),
            "ingest_rss": r.get("ingest", {}).get("peak_rss_MB"),
            "tok_s": r.get("tokenize", {}).get("seconds"),
            "tok_rss": r.get("tokenize", {}).get("peak_rss_MB"),
            "rg": "{hit} / {total}".format(**r["selection_row_groups"]),
        }
        for r in results
    ]
    print()
    text = print_table(
        lines,
        [
            ("store", "store", ""),
            ("rows", "rows", ","),
            ("tokens", "tokens", ","),
            ("ingest_s", "ingest s", ".1f"),
            ("ingest_rss", "ingest peak RSS MB", ",.0f"),
            ("tok_s", "tokenize s", ".1f"),
            ("tok_rss", "tokenize peak RSS MB", ",.0f"),
            ("catalog_MB", "catalog MB", ",.1f"),
            ("tokens_MB", "tokens MB", ",.1f"),
            ("rg", "selection's row groups", ""),
        ],
    )
    qlines = [
        {
            "store": r["store"],
            "view": q["view"],
            "lines": q.get("lines"),
            "count_s": q.get("count_s"),
            "sel_s": q.get("selection_s"),
            "sel_lines": q.get("selection_lines"),
            "note": "" if q["available"] else "not available: " + q["note"][:70],
        }
        for r in results
        for q in r["queries"]
    ]
    print()
    qtext = print_table(
        qlines,
        [
            ("store", "store", ""),
            ("view", "view", ""),
            ("lines", "lines", ","),
            ("count_s", "count s", ".3f"),
            ("sel_s", "10k-token selection s", ".3f"),
            ("sel_lines", "selected lines", ","),
            ("note", "note", ""),
        ],
    )
    return text, qtext


def run_bench(cfg: BenchCatalogConfig) -> dict:
    with Bench("catalog", cfg.work, cfg.out, scratch="folder") as bench:
        bench.folder.mkdir(parents=True, exist_ok=True)
        out = bench.path()
        out.parent.mkdir(parents=True, exist_ok=True)
        results = _measure(cfg, bench.folder, out)
        text, qtext = _print_tables(results)
        result = {**bench.header(cfg), "results": results, "table": text, "query_table": qtext}
        bench.write(result, out, lambda png: _figure(png, results))
        out.with_suffix(".partial.json").unlink(missing_ok=True)
        return result


@user_errors(ValueError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchCatalogConfig, argv, prog="python -m bench.catalog"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
