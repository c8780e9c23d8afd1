"""Subsets as catalog objects: `python -m trainers.subsets --from SOURCE --k K`.

    python -m trainers.subsets --from attribution:latest --k 500            # top-500 + matched random-500
    python -m trainers.subsets --from attribution:latest --k 500 --overlap allow --seed 1
    python -m trainers.subsets --from attribution:latest --ranks 301-500    # a rank window
    python -m trainers.subsets --from attribution:latest --random-from-ranks 501- --k 200
    python -m trainers.subsets --from predictor:latest --k 500              # the SAE predictor's ranking
    python -m trainers.subsets --from reward_model --k 500 --store /tmp/st  # baselines: reward model, random
    python -m trainers.subsets --from random --k 50 --seed 3

A source ranks the rows of `--pool-split` (default score_pool), 1 = best (`ranking`):
`attribution:<run>` by its `attribution_scores.rank` (the run's scored pool rows), `predictor:<run>`
by `predictor_scores.predicted` (a predicted rank ascending, a predicted score descending),
`reward_model` by `rows.reward_model_score` descending (rows without one last), `random` by a
permutation seeded by `--seed`; ties break by row_id, `latest` is the newest run. A subset
(`SubsetSpec`) takes from that ranking:

- `top_k`: ranks 1..k;
- `matched_random_k`: k rows drawn (seeded) from the same pool with exactly top_k's category
  counts: per category (in name order), `numpy.random.default_rng(seed).choice` without
  replacement among that category's pool rows in row_id order; `--overlap exclude` (default)
  draws outside top_k, `allow` from the whole pool;
- `ranks`: a 1-based inclusive window (`301-500`; `501-` = to the last rank);
- `random_from_ranks`: k rows drawn (seeded) uniformly from a window;
- `bottom_k_matched`: the k lowest-ranked rows with exactly top_k's category counts (per category
  its last-ranked rows; `--overlap exclude` keeps them outside top_k): the selection experiment's
  `bottom` arm;
- `all`: every pool row (the experiment's `full` arm).

Each subset is one Parquet part of table `subsets` (schema in store/subsets.py), named by its
spec (`subset_name`: the same spec, `latest` resolved, gives the same name and identical rows),
its rows in source-rank order. Use one as training rows or as a view:

    python -m trainers.finetune --train-rows-sql "SELECT row_id FROM subsets WHERE subset = 'attr-top500-<run>'"
    CREATE VIEW top500 AS SELECT r.* FROM rows r JOIN subsets s USING (row_id) WHERE s.subset = '...';
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from extractors.sft_data import select_rows_by
from store.catalog.runs import Run
from store.catalog.subsets import TABLE, subset_table
from store.cli import SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError, safe_name

KINDS = ("top_k", "matched_random_k", "ranks", "random_from_ranks", "bottom_k_matched", "all")
SEEDED = ("matched_random_k", "random_from_ranks")
SOURCES = "attribution:<run>|attribution:latest|predictor:<run>|predictor:latest|reward_model|random"
PREDICTOR_TABLE = "predictor_scores"


@dataclass(frozen=True)
class SubsetSpec:
    """One subset of a source's ranking (see the module docstring)."""

    source: str  # "attribution:<run>|attribution:latest|predictor:<run>|predictor:latest|reward_model|random"
    kind: Literal["top_k", "matched_random_k", "ranks", "random_from_ranks", "bottom_k_matched", "all"]
    k: int | None = None  # top_k / matched_random_k / random_from_ranks: how many rows
    ranks: tuple[int, int | None] | None = None  # 1-based inclusive window, None end = to the last rank
    seed: int = 0  # matched_random_k / random_from_ranks / source random
    overlap: Literal["allow", "exclude"] = "exclude"  # matched_random_k / bottom_k_matched: rows of top_k too?
    pool_split: str = "score_pool"

    def __post_init__(self) -> None:
        parse_source(self.source)
        if self.kind not in KINDS:
            raise ValueError(f"subset kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.overlap not in ("allow", "exclude"):
            raise ValueError(f"overlap {self.overlap!r} must be allow or exclude")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", check_window(tuple(self.ranks)))
        needs_k = self.kind not in ("ranks", "all")
        if needs_k and self.k is None:
            raise ValueError(f"a {self.kind} subset needs k (--k N, N > 0)")
        if self.kind == "all" and self.k is not None:
            raise ValueError(f"an all subset is the whole pool; drop k={self.k}")
        if self.kind == "ranks" and self.k is not None:
            raise ValueError(
                f"a ranks subset takes its size from the window {self.ranks}; drop k={self.k} "
                f"(or use --random-from-ranks to draw k rows from it)"
            )
        if self.k is not None and (isinstance(self.k, bool) or int(self.k) != self.k or self.k <= 0):
            raise ValueError(f"k must be a positive whole number, got {self.k!r}; pass --k N with N > 0")
        wants_window = self.kind in ("ranks", "random_from_ranks")
        if wants_window and self.ranks is None:
            raise ValueError(f"a {self.kind} subset needs a rank window, e.g. ranks=(301, 500) or --ranks 301-500")
        if not wants_window and self.ranks is not None:
            raise ValueError(
                f"a {self.kind} subset takes no rank window (got {self.ranks}); use kind ranks or random_from_ranks"
            )


def parse_source(source: str) -> tuple[str, str | None]:
    """('attribution'|'predictor'|'reward_model'|'random', run or 'latest' or None)."""
    kind, _, run = source.partition(":")
    if kind in ("attribution", "predictor") and run:
        return kind, run
    if kind in ("reward_model", "random") and not run:
        return kind, None
    raise ValueError(f"subset source {source!r} is not one of {SOURCES}")


def check_window(window: tuple) -> tuple[int, int | None]:
    if len(window) != 2:
        raise ValueError(f"rank window {window!r} must be (start, end), end None = to the last rank")
    a, b = window
    if (
        not isinstance(a, (int, np.integer))
        or a < 1
        or (b is not None and (not isinstance(b, (int, np.integer)) or b < a))
    ):
        raise ValueError(
            f"rank window {window!r}: ranks are 1-based and inclusive, start >= 1 and end >= start "
            f"(or None = to the last rank), e.g. (301, 500)"
        )
    return int(a), None if b is None else int(b)


def parse_window(text: str, flag: str = "--ranks") -> tuple[int, int | None]:
    """'301-500' -> (301, 500); '501-' -> (501, None); '7' -> (7, 7)."""
    m = re.fullmatch(r"\s*(\d+)\s*(-\s*(\d*)\s*)?", text)
    if not m:
        raise ValueError(f"{flag} {text!r}: expected START-END or START- (1-based, inclusive), e.g. 301-500 or 501-")
    a = int(m.group(1))
    b = a if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
    try:
        return check_window((a, b))
    except ValueError as e:
        raise ValueError(f"{flag} {text!r}: {e}") from None


# ---- rankings ---------------------------------------------------------------------------------
def _has_column(store: Store, table: str, col: str) -> bool:
    return col in store.query(f"SELECT * FROM {table} LIMIT 0").schema.names


def _finished_only(store: Store, table: str) -> str:
    """A filter on `table` to the runs that are complete: attribution runs score the pool in units
    and are readable while partial (rank NULL, `complete` false; stores from before units have no
    such column, and every run in them is complete)."""
    units = table == "attribution_scores" and _has_column(store, table, "complete")
    return "WHERE complete IS NOT FALSE" if units else ""


def _latest_run(store: Store, table: str, col: str, what: str) -> str:
    if not store.has_table(table):
        raise StoreError(
            f"{what}:latest: {store.root} has no {table} table yet; "
            + (
                "run python -m extractors.run --kinds attribution --adapter latest"
                if what == "attribution"
                else "run python -m trainers.sae_predictor --sae latest --attribution latest"
            )
        )
    where = _finished_only(store, table)
    if where and not store.query(f"SELECT 1 FROM {table} {where} LIMIT 1").num_rows:
        raise StoreError(
            f"{what}:latest: no attribution run in {store.root} is complete yet (only partial runs, rank NULL); "
            "finish one by rerunning its command (python -m extractors.run --kinds attribution ...), "
            "which resumes it"
        )
    if store.has_table("runs"):
        sql = (
            f"SELECT t.{col} FROM (SELECT DISTINCT {col} FROM {table} {where}) t LEFT JOIN "
            f"(SELECT run_id, max(started_at) AS started_at FROM runs GROUP BY run_id) r ON r.run_id = t.{col} "
            f"ORDER BY r.started_at DESC NULLS LAST, t.{col} DESC LIMIT 1"
        )
    else:
        sql = f"SELECT max({col}) FROM {table} {where}"
    return store.query(sql).column(0)[0].as_py()


def _known_runs(store: Store, table: str, col: str) -> str:
    runs = store.query(f"SELECT DISTINCT {col} FROM {table} ORDER BY 1").column(0).to_pylist()
    return ", ".join(runs[-5:]) + (f" (and {len(runs) - 5} older)" if len(runs) > 5 else "")


def resolve_source(store: Store, source: str) -> tuple[str, str | None]:
    """(the source with `latest` resolved, its run id or None); an unknown run is an error."""
    kind, run = parse_source(source)
    if kind in ("reward_model", "random"):
        return kind, None
    table, col = ("attribution_scores", "run_id") if kind == "attribution" else (PREDICTOR_TABLE, "run")
    if run == "latest":
        run = _latest_run(store, table, col, kind)
    elif (
        not store.has_table(table) or not store.query(f"SELECT 1 FROM {table} WHERE {col} = ? LIMIT 1", [run]).num_rows
    ):
        known = _known_runs(store, table, col) if store.has_table(table) else "none"
        raise StoreError(
            f"{kind} run {run!r} has no rows in {table} of {store.root}; runs there: {known} (or use {kind}:latest)"
        )
    where = _finished_only(store, table)
    if where and store.query(f"SELECT 1 FROM {table} WHERE {col} = ? AND complete = false LIMIT 1", [run]).num_rows:
        raise StoreError(
            f"attribution run {run!r} is partial (some of its pool units are not committed, ranks are NULL): "
            "rerun the command that started it to finish it (it resumes), or use attribution:latest for the "
            "newest complete run"
        )
    if not safe_name(run):
        raise StoreError(f"{kind} run id {run!r} cannot be part of a subset name (letters, digits, _ . -)")
    return f"{kind}:{run}", run


def _pool(store: Store, pool_split: str) -> list[str]:
    return select_rows_by(store, split=pool_split, flag="--pool-split")


def _ranked(frame: pl.DataFrame, order: list[str], descending: list[bool]) -> pl.DataFrame:
    out = frame.sort(order, descending=descending, nulls_last=True)
    return out.select(
        "row_id", pl.int_range(1, out.height + 1, dtype=pl.Int64).alias("rank"), pl.col("score").cast(pl.Float64)
    )


def ranking(store: Store, source: str, pool_split: str = "score_pool", *, seed: int = 0) -> pl.DataFrame:
    """The pool rows `source` ranks: row_id, rank (1 = best, 1..n), score (the source's own value;
    null for random), in rank order. `seed` seeds the `random` source only."""
    resolved, run = resolve_source(store, source)
    kind = resolved.partition(":")[0]
    pool = _pool(store, pool_split)
    con = store.connect()
    try:
        con.register("_pool", pa.table({"row_id": pool}))
        if kind == "attribution":
            t = con.sql(
                "SELECT a.row_id, a.rank AS src_rank, a.score FROM attribution_scores a "
                "JOIN _pool USING (row_id) WHERE a.run_id = ?",
                params=[run],
            ).pl()
            out = _ranked(t, ["src_rank", "row_id"], [False, False])
        elif kind == "predictor":
            t = con.sql(
                f"SELECT p.row_id, p.predicted AS score, p.target FROM {PREDICTOR_TABLE} p "
                "JOIN _pool USING (row_id) WHERE p.run = ?",
                params=[run],
            ).pl()
            # A predicted rank is better when lower, a predicted score when higher.
            low_best = t.height > 0 and t["target"][0] == "rank"
            out = _ranked(t, ["score", "row_id"], [not low_best, False])
        elif kind == "reward_model":
            t = con.sql("SELECT r.row_id, r.reward_model_score AS score FROM rows r JOIN _pool USING (row_id)").pl()
            out = _ranked(t, ["score", "row_id"], [True, False])
        else:
            ids = sorted(pool)
            perm = np.random.default_rng(seed).permutation(len(ids))
            out = pl.DataFrame(
                {
                    "row_id": [ids[i] for i in perm],
                    "rank": np.arange(1, len(ids) + 1, dtype=np.int64),
                    "score": pl.Series([None] * len(ids), dtype=pl.Float64),
                }
            )
    finally:
        con.close()
    if out.height == 0:
        raise StoreError(
            f"{resolved} ranks none of the {len(pool)} rows of --pool-split {pool_split}; pick the "
            f"split that source scored (e.g. the attribution run's pool_split)"
        )
    return out


# ---- subsets ----------------------------------------------------------------------------------
def subset_name(store: Store, spec: SubsetSpec) -> str:
    """attr-top500-<run>, attr-matched-random500-exclude-s0-<run>, attr-ranks301-500-<run>,
    attr-random200-from-ranks501-end-s0-<run>, pred-..., rm-top500, random-s0-top500; a pool
    split other than score_pool adds -pool-<split>. The same spec (latest resolved) = the same name."""
    resolved, run = resolve_source(store, spec.source)
    kind = resolved.partition(":")[0]
    prefix = {"attribution": "attr", "predictor": "pred", "reward_model": "rm"}.get(kind) or f"random-s{spec.seed}"
    win = "" if spec.ranks is None else f"ranks{spec.ranks[0]}-{spec.ranks[1] or 'end'}"
    body = {
        "top_k": f"top{spec.k}",
        "matched_random_k": f"matched-random{spec.k}-{spec.overlap}-s{spec.seed}",
        "ranks": win,
        "random_from_ranks": f"random{spec.k}-from-{win}-s{spec.seed}",
        "bottom_k_matched": f"bottom{spec.k}-matched-{spec.overlap}",
        "all": "all",
    }[spec.kind]
    name = "-".join([prefix, body] + ([run] if run else []))
    if spec.pool_split != "score_pool":
        name += f"-pool-{spec.pool_split}"
    if not safe_name(name):
        raise StoreError(f"subset name {name!r} is not a safe name; use a pool split of letters, digits and _")
    return name


def _window(n: int, ranks: tuple[int, int | None], what: str) -> np.ndarray:
    a, b = ranks
    if a > n or (b is not None and b > n):
        raise StoreError(
            f"rank window {a}-{b or ''} is outside {what}'s ranks 1-{n}; use a window inside it "
            f"(e.g. {min(a, n)}- to go to the last rank)"
        )
    return np.arange(a - 1, n if b is None else b)


def _matched(rk: pl.DataFrame, cats: list[str | None], k: int, seed: int, overlap: str, what: str) -> np.ndarray:
    """Positions (into rk) of k rows with top-k's category counts (module docstring)."""
    want = Counter(cats[:k])
    cand = range(k, len(cats)) if overlap == "exclude" else range(len(cats))
    ids = rk["row_id"].to_list()
    by_cat: dict[str | None, list[int]] = {}
    for i in sorted(cand, key=lambda i: ids[i]):
        by_cat.setdefault(cats[i], []).append(i)
    short = [
        (c, n, len(by_cat.get(c, [])))
        for c, n in sorted(want.items(), key=lambda x: str(x[0]))
        if len(by_cat.get(c, [])) < n
    ]
    if short:
        where = f"outside the top {k}" if overlap == "exclude" else "in the pool"
        raise StoreError(
            "matched random: "
            + "; ".join(
                f"category {c!r} needs {n} rows (its count in the top {k}) but {what} has only {m} {where}"
                for c, n, m in short
            )
            + ("; use --overlap allow or a smaller --k" if overlap == "exclude" else "; use a smaller --k")
        )
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c, n in sorted(want.items(), key=lambda x: str(x[0])):
        pool = by_cat[c]
        picked += [pool[j] for j in rng.choice(len(pool), size=n, replace=False)]
    return np.sort(np.array(picked, dtype=np.int64))


def _bottom_matched(cats: list[str | None], k: int, overlap: str, what: str) -> np.ndarray:
    """Positions of the k lowest-ranked rows with top-k's category counts: per category, its
    last-ranked rows (outside the top k with overlap exclude)."""
    want = Counter(cats[:k])
    cand = range(k, len(cats)) if overlap == "exclude" else range(len(cats))
    by_cat: dict[str | None, list[int]] = {}
    for i in cand:  # rank order
        by_cat.setdefault(cats[i], []).append(i)
    picked: list[int] = []
    for c, n in sorted(want.items(), key=lambda x: str(x[0])):
        have = by_cat.get(c, [])
        if len(have) < n:
            where = f"outside the top {k}" if overlap == "exclude" else "in the pool"
            raise StoreError(
                f"bottom matched: category {c!r} needs {n} rows (its count in the top {k}) but {what} has only "
                f"{len(have)} {where}; use a smaller --k" + (" or --overlap allow" if overlap == "exclude" else "")
            )
        picked += have[len(have) - n :]
    return np.sort(np.array(picked, dtype=np.int64))


def subset_positions(store: Store, spec: SubsetSpec) -> tuple[pl.DataFrame, np.ndarray]:
    """(the source's ranking, the positions into it of the subset's rows, ascending)."""
    rk = ranking(store, spec.source, spec.pool_split, seed=spec.seed)
    n = rk.height
    what = f"{spec.source} over pool {spec.pool_split} ({n} rows)"
    if spec.kind in ("top_k", "matched_random_k", "bottom_k_matched") and spec.k > n:
        raise StoreError(
            f"k = {spec.k} is larger than the pool: {what}; use --k {n} or less"
            + (" (and at most half of it with --overlap exclude)" if spec.kind == "matched_random_k" else "")
        )
    if spec.kind == "top_k":
        return rk, np.arange(spec.k)
    if spec.kind == "all":
        return rk, np.arange(n)
    if spec.kind == "ranks":
        return rk, _window(n, spec.ranks, what)
    if spec.kind == "random_from_ranks":
        win = _window(n, spec.ranks, what)
        if spec.k > len(win):
            raise StoreError(
                f"k = {spec.k} is larger than the window {spec.ranks[0]}-{spec.ranks[1] or n} "
                f"({len(win)} rows of {what}); use --k {len(win)} or less, or a wider window"
            )
        return rk, np.sort(np.random.default_rng(spec.seed).choice(win, size=spec.k, replace=False))
    con = store.connect()
    try:
        con.register("_ids", pa.table({"row_id": rk["row_id"].to_list(), "pos": np.arange(n)}))
        cats = [
            c for (c,) in con.sql("SELECT r.category FROM _ids LEFT JOIN rows r USING (row_id) ORDER BY pos").fetchall()
        ]
    finally:
        con.close()
    if spec.kind == "bottom_k_matched":
        return rk, _bottom_matched(cats, spec.k, spec.overlap, what)
    return rk, _matched(rk, cats, spec.k, spec.seed, spec.overlap, what)


def _method(spec: SubsetSpec, resolved: str) -> str:
    win = "" if spec.ranks is None else f"ranks {spec.ranks[0]}-{spec.ranks[1] or 'end'}"
    what = {
        "top_k": f"top {spec.k}",
        "matched_random_k": f"random {spec.k} matched to the top {spec.k}'s category counts, overlap "
        f"{spec.overlap}, seed {spec.seed}",
        "ranks": win,
        "random_from_ranks": f"random {spec.k} from {win}, seed {spec.seed}",
        "bottom_k_matched": f"bottom {spec.k} matched to the top {spec.k}'s category counts (per category its "
        f"lowest-ranked rows), overlap {spec.overlap}",
        "all": "every row",
    }[spec.kind]
    return (
        f"{what} of {resolved}" + (f" (seed {spec.seed})" if resolved == "random" else "") + f", pool {spec.pool_split}"
    )


def write_subset(store: Store, spec: SubsetSpec) -> str:
    """Write the subset's rows as part `<name>` of table `subsets` (replacing it: identical rows
    for the same spec and store) and return its name."""
    name = subset_name(store, spec)
    resolved, run = resolve_source(store, spec.source)
    rk, pos = subset_positions(store, spec)
    seeded = spec.kind in SEEDED or resolved == "random"
    store.write_table(
        TABLE,
        subset_table(
            name,
            rk["row_id"].gather(pos).to_list(),
            rk["rank"].gather(pos).to_list(),
            rk["score"].gather(pos).to_list(),
            source=resolved,
            kind=spec.kind,
            seed=spec.seed if seeded else None,
            run_id=run,
            method=_method(spec, resolved),
        ),
        part=name,
    )
    return name


def subset_rows(store: Store, name: str) -> list[str]:
    """The subset's row_ids in rank order."""
    if not store.has_table(TABLE):
        raise StoreError(f"{store.root} has no subsets yet; write one with python -m trainers.subsets --from ... --k N")
    ids = store.query(f"SELECT row_id FROM {TABLE} WHERE subset = ? ORDER BY rank", [name]).column(0).to_pylist()
    if not ids:
        known = store.query(f"SELECT DISTINCT subset FROM {TABLE} ORDER BY 1").column(0).to_pylist()
        raise StoreError(
            f"subset {name!r} is not in {store.root}; subsets there: {', '.join(known[:10])}"
            + (f" (and {len(known) - 10} more)" if len(known) > 10 else "")
        )
    return ids


def train_rows_sql(name: str) -> str:
    """The `--train-rows-sql` of a subset."""
    return f"SELECT row_id FROM subsets WHERE subset = '{name}'"


# ---- command line -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class SubsetsConfig(StoreOptions, SeedOptions):
    """Write named subsets of a ranking to the `subsets` table (see the module docstring).

    With --k alone: top_k and its matched_random_k (unless --no-matched); --ranks A-B: a rank
    window; --random-from-ranks A- --k N: N rows drawn from a window. --seed seeds the random
    draws (matched random, random-from-ranks, source random)."""

    source: str = field(metadata={"help": f"the ranking: {SOURCES}", "aliases": ["--from"]})
    k: int | None = field(default=None, metadata={"help": "subset size (top-k, matched random-k, random-from-ranks)"})
    overlap: Literal["exclude", "allow"] = field(
        default="exclude",
        metadata={"help": "may matched random-k share rows with top-k? exclude: drawn from the pool minus top-k"},
    )
    matched: bool = field(default=True, metadata={"help": "with --k: also write the matched random-k subset"})
    ranks: str | None = field(
        default=None, metadata={"help": "a rank window, 1-based inclusive: 301-500, 501- (to the last rank)"}
    )
    random_from_ranks: str | None = field(
        default=None, metadata={"help": "draw --k rows (seeded) from this rank window, e.g. 501-"}
    )
    pool_split: str = field(default="score_pool", metadata={"help": "the split whose rows are ranked"})

    def __post_init__(self) -> None:
        if self.ranks and self.random_from_ranks:
            raise ValueError("--ranks and --random-from-ranks exclude each other; run the command once for each")
        if self.ranks and self.k is not None:
            raise ValueError(
                f"--ranks {self.ranks} takes its size from the window; drop --k {self.k} (or use "
                f"--random-from-ranks {self.ranks} --k {self.k})"
            )
        if not self.ranks and self.k is None:
            raise ValueError("--k N is needed (the subset size), unless --ranks A-B gives a window")
        self.specs()  # every spec error now, before the store is touched

    def specs(self) -> list[SubsetSpec]:
        common = {"source": self.source, "seed": self.seed, "pool_split": self.pool_split}
        if self.ranks:
            return [SubsetSpec(kind="ranks", ranks=parse_window(self.ranks), **common)]
        if self.random_from_ranks:
            return [
                SubsetSpec(
                    kind="random_from_ranks",
                    k=self.k,
                    ranks=parse_window(self.random_from_ranks, "--random-from-ranks"),
                    **common,
                )
            ]
        top = [SubsetSpec(kind="top_k", k=self.k, **common)]
        return top + (
            [SubsetSpec(kind="matched_random_k", k=self.k, overlap=self.overlap, **common)] if self.matched else []
        )


def write_subsets(cfg: SubsetsConfig) -> list[str]:
    store = Store(cfg.store)
    with Run(store, "subsets", config_dict(cfg)) as run:
        names = [write_subset(store, spec) for spec in cfg.specs()]
        run.finish(counts={n: len(subset_rows(store, n)) for n in names}, metrics={"subsets": names})
    for n in names:
        t = store.query(
            f"SELECT count(*) AS n, min(source_rank) AS lo, max(source_rank) AS hi FROM {TABLE} WHERE subset = ?", [n]
        ).to_pylist()[0]
        print(f'{n}: {t["n"]} rows (source ranks {t["lo"]}-{t["hi"]})\n  --train-rows-sql "{train_rows_sql(n)}"')
    return names


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SubsetsConfig, argv, prog="python -m trainers.subsets")
    write_subsets(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
