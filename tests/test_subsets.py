"""Subsets (trainers.subsets) on a real store (ingested with the tiny model's tokenizer) with a
synthetic attribution run: sizes, matched random's category counts, disjointness under exclude,
seeds, rank windows and random-from-ranks against plain references, the reward-model and random
rankings, idempotent rewrites, --train-rows-sql through trainers.finetune, and one clear error
per bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractors.attribution.scores import SCORES_SCHEMA, ranks_of
from extractors.attribution.tables import UNIT_SCORES_SCHEMA
from extractors.sft_data import select_rows_by
from store.core import Store, StoreError
from tests.conftest import ingest_small
from trainers.selection.subsets import (
    SubsetSpec,
    main,
    parse_window,
    ranking,
    resolve_source,
    subset_name,
    subset_rows,
    train_rows_sql,
    write_subset,
)

OLD, NEW = "attribution-20261201-090000-aaaaaa", "attribution-20261201-100000-bbbbbb"


def _attribution_part(st: Store, run_id: str, seed: int, rows: list[str]) -> dict[str, float]:
    score = np.random.default_rng(seed).normal(size=len(rows))
    rank = ranks_of(score)
    n = len(rows)
    st.write_table(
        "attribution_scores",
        pa.table(
            {
                "run_id": [run_id] * n,
                "row_id": rows,
                "score": score,
                "rank": rank,
                "adapter": ["a"] * n,
                "score_mode": ["mean"] * n,
                "preconditioning": ["query"] * n,
                "projection_dim": [32] * n,
                "query_split": ["attr_query"] * n,
                "pool_split": ["score_pool"] * n,
            },
            schema=SCORES_SCHEMA,
        ),
        part=run_id,
    )
    return dict(zip(rows, score, strict=False))


@pytest.fixture(scope="module")
def st(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("subsets") / "store"
    ingest_small(root, {"train_base": 120, "attr_query": 4, "eval": 4}, model=tiny_model)
    s = Store(root)
    pool = select_rows_by(s, split="score_pool")
    _attribution_part(s, OLD, 1, pool)
    s.scores = _attribution_part(s, NEW, 2, pool)  # the newest run: what attribution:latest resolves to
    s.pool = pool
    t = s.query("SELECT row_id, category FROM rows").to_pydict()
    s.cats = dict(zip(t["row_id"], t["category"], strict=False))
    return s


def _ref_order(scores: dict[str, float]) -> list[str]:
    """The plain reference: highest score first, ties by row_id."""
    return sorted(scores, key=lambda r: (-scores[r], r))


def _cats(st, ids):
    return Counter(st.cats[r] for r in ids)


def test_top_k_and_ranking_follow_the_scores(st):
    ref = _ref_order(st.scores)
    rk = ranking(st, "attribution:latest")
    assert rk["row_id"].to_list() == ref and rk["rank"].to_list() == list(range(1, len(ref) + 1))
    name = write_subset(st, SubsetSpec("attribution:latest", "top_k", k=25))
    assert name == f"attr-top25-{NEW}" == subset_name(st, SubsetSpec(f"attribution:{NEW}", "top_k", k=25))
    assert subset_rows(st, name) == ref[:25]
    t = st.query("SELECT * FROM subsets WHERE subset = ? ORDER BY rank", [name]).to_pylist()
    assert [r["source_rank"] for r in t] == list(range(1, 26)) and {r["source"] for r in t} == {f"attribution:{NEW}"}
    assert [r["score"] for r in t] == [st.scores[r] for r in ref[:25]] and {r["seed"] for r in t} == {None}
    old = ranking(st, f"attribution:{OLD}")["row_id"].to_list()
    assert old != ref and sorted(old) == sorted(ref)


@pytest.mark.parametrize("overlap", ["exclude", "allow"])
def test_matched_random_has_top_ks_category_counts(st, overlap):
    k = 30
    top = subset_rows(st, write_subset(st, SubsetSpec("attribution:latest", "top_k", k=k)))
    spec = SubsetSpec("attribution:latest", "matched_random_k", k=k, seed=0, overlap=overlap)
    name = write_subset(st, spec)
    rnd = subset_rows(st, name)
    assert len(rnd) == len(set(rnd)) == k and set(rnd) <= set(st.pool)
    assert _cats(st, rnd) == _cats(st, top)
    if overlap == "exclude":
        assert not set(rnd) & set(top)
    # seeds reproduce (the same rows, byte for byte the same table), and differ across seeds
    first = pq.read_table(st.table_dir("subsets") / f"{name}.parquet")
    assert write_subset(st, spec) == name
    assert pq.read_table(st.table_dir("subsets") / f"{name}.parquet").equals(first)
    other = subset_rows(
        st, write_subset(st, SubsetSpec("attribution:latest", "matched_random_k", k=k, seed=1, overlap=overlap))
    )
    assert other != rnd and _cats(st, other) == _cats(st, top)
    # rank order = source-rank order
    src = st.query("SELECT source_rank FROM subsets WHERE subset = ? ORDER BY rank", [name]).column(0).to_pylist()
    assert src == sorted(src)


def test_matched_random_against_a_plain_reference(st):
    """The documented draw: per category in name order, rng.choice among its rows (row_id order)."""
    k = 20
    ref = _ref_order(st.scores)
    top, rest = ref[:k], sorted(ref[k:])
    rng = np.random.default_rng(7)
    want = []
    for c, n in sorted(_cats(st, top).items()):
        cand = [r for r in rest if st.cats[r] == c]
        want += [cand[j] for j in rng.choice(len(cand), size=n, replace=False)]
    got = subset_rows(st, write_subset(st, SubsetSpec("attribution:latest", "matched_random_k", k=k, seed=7)))
    assert got == sorted(want, key=ref.index)


def test_rank_windows_and_random_from_ranks(st):
    ref = _ref_order(st.scores)
    n = len(ref)
    name = write_subset(st, SubsetSpec("attribution:latest", "ranks", ranks=(11, 30)))
    assert name == f"attr-ranks11-30-{NEW}" and subset_rows(st, name) == ref[10:30]
    assert subset_rows(st, write_subset(st, SubsetSpec("attribution:latest", "ranks", ranks=(101, None)))) == ref[100:]
    spec = SubsetSpec("attribution:latest", "random_from_ranks", k=8, ranks=(51, None), seed=3)
    got = subset_rows(st, write_subset(st, spec))
    pos = np.sort(np.random.default_rng(3).choice(np.arange(50, n), size=8, replace=False))
    assert got == [ref[i] for i in pos] and len(set(got)) == 8 and set(got) <= set(ref[50:])
    assert got != subset_rows(
        st, write_subset(st, SubsetSpec("attribution:latest", "random_from_ranks", k=8, ranks=(51, None), seed=4))
    )
    assert parse_window("301-500") == (301, 500) and parse_window("501-") == (501, None) and parse_window("7") == (7, 7)


def test_reward_model_and_random_sources(st):
    t = st.query(
        "SELECT row_id, reward_model_score FROM rows WHERE row_id IN (SELECT row_id FROM split_members "
        "WHERE split = 'score_pool')"
    ).to_pydict()
    rm = dict(zip(t["row_id"], t["reward_model_score"], strict=False))
    assert ranking(st, "reward_model")["row_id"].to_list() == _ref_order(rm)
    name = write_subset(st, SubsetSpec("reward_model", "top_k", k=10))
    assert name == "rm-top10" and subset_rows(st, name) == _ref_order(rm)[:10]
    a, b = ranking(st, "random", seed=0), ranking(st, "random", seed=1)
    perm = np.random.default_rng(0).permutation(len(st.pool))
    assert a["row_id"].to_list() == [sorted(st.pool)[i] for i in perm] != b["row_id"].to_list()
    assert a["row_id"].to_list() == ranking(st, "random", seed=0)["row_id"].to_list()
    assert write_subset(st, SubsetSpec("random", "top_k", k=5, seed=2)) == "random-s2-top5"


def test_cli_writes_top_and_matched_and_finetune_trains_on_the_subset(st, tiny_model, capsys):
    from trainers.finetune.train import main as ft_main

    assert main(["--from", "attribution:latest", "--k", "6", "--store", str(st.root)]) == 0
    out = capsys.readouterr().out
    top, rnd = f"attr-top6-{NEW}", f"attr-matched-random6-exclude-s0-{NEW}"
    assert top in out and rnd in out and train_rows_sql(top) in out
    for name in (top, rnd):  # the SQL finetune takes returns exactly the subset's rows
        assert select_rows_by(st, sql=train_rows_sql(name)) == sorted(subset_rows(st, name))
    rec = st.query("SELECT status, metrics FROM runs WHERE kind = 'subsets' ORDER BY started_at DESC LIMIT 1")
    assert rec.column(0)[0].as_py() == "finished" and top in rec.column(1)[0].as_py()
    assert (
        ft_main(
            [
                "--store",
                str(st.root),
                "--model",
                tiny_model,
                "--no-progress",
                "--eval-split",
                "",
                "--train-rows-sql",
                train_rows_sql(top),
                "--max-steps",
                "1",
                "--batch-size",
                "6",
                "--lora-r",
                "2",
                "--target-modules",
                "q_proj",
            ]
        )
        == 0
    )
    ad = st.query("SELECT n_train_rows, train_rows_sql FROM adapters ORDER BY adapter DESC LIMIT 1").to_pylist()[0]
    assert ad == {"n_train_rows": 6, "train_rows_sql": train_rows_sql(top)}


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--from", "attribution:latest", "--k", "0"], "k must be a positive whole number"),
        (["--from", "attribution:latest", "--k", "-3"], "k must be a positive whole number"),
        (["--from", "attribution:latest", "--k", "121"], "k = 121 is larger than the pool"),
        (["--from", "attribution:nope", "--k", "5"], "attribution run 'nope' has no rows in attribution_scores"),
        (["--from", "predictor:latest", "--k", "5"], "no predictor_scores table yet"),
        (["--from", "bogus", "--k", "5"], "subset source 'bogus' is not one of"),
        (["--from", "attribution:latest", "--ranks", "100-130"], "rank window 100-130 is outside"),
        (["--from", "attribution:latest", "--ranks", "30-20"], "end >= start"),
        (["--from", "attribution:latest", "--ranks", "x"], "expected START-END or START-"),
        (["--from", "attribution:latest", "--ranks", "1-5", "--k", "3"], "drop --k 3"),
        (["--from", "attribution:latest"], "--k N is needed"),
        (["--from", "attribution:latest", "--random-from-ranks", "111-", "--k", "20"], "larger than the window"),
        (["--from", "attribution:latest", "--k", "70"], "use --overlap allow or a smaller --k"),
        (["--from", "attribution:latest", "--k", "5", "--pool-split", "nosuch"], "--pool-split 'nosuch' has no rows"),
    ],
)
def test_bad_input_gets_one_clear_error(st, argv, msg, capsys):
    try:
        rc = main(argv + ["--store", str(st.root)])
    except SystemExit as e:  # argparse's exit for a value the config rejects
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err, err


def test_a_category_short_of_rows_names_category_counts_and_fix(st):
    with pytest.raises(
        StoreError,
        match=r"category '[^']+' needs \d+ rows \(its count in the top 70\) but .* has "
        r"only \d+ outside the top 70; use --overlap allow or a smaller --k",
    ):
        write_subset(st, SubsetSpec("attribution:latest", "matched_random_k", k=70))
    assert (
        len(
            subset_rows(
                st, write_subset(st, SubsetSpec("attribution:latest", "matched_random_k", k=70, overlap="allow"))
            )
        )
        == 70
    )
    with pytest.raises(StoreError, match="subset 'nope' is not in"):
        subset_rows(st, "nope")


def test_a_partial_attribution_run_is_not_latest_and_is_refused_by_name(st):
    """An attribution run still scoring its pool in units has committed rows with rank NULL and
    `complete` false: `attribution:latest` passes over it, naming it is refused with the fix."""
    partial = "attribution-20261201-110000-cccccc"  # newer than NEW by id; no runs record
    rows = st.pool[:10]
    part = _scores_table_partial(partial, rows)
    st.write_table("attribution_scores", part, part=f"{partial}/u000000")
    try:
        assert resolve_source(st, "attribution:latest") == (f"attribution:{NEW}", NEW)
        with pytest.raises(StoreError, match=f"attribution run '{partial}' is partial"):
            resolve_source(st, f"attribution:{partial}")
    finally:
        for f in st.table_files("attribution_scores"):
            if f.parent.name == partial:
                f.unlink()


def _scores_table_partial(run_id: str, rows: list[str]) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "run_id": [run_id] * n,
            "row_id": rows,
            "score": np.zeros(n),
            "rank": pa.nulls(n, pa.int64()),
            "adapter": ["a"] * n,
            "score_mode": ["mean"] * n,
            "preconditioning": ["query"] * n,
            "projection_dim": [32] * n,
            "query_split": ["attr_query"] * n,
            "pool_split": ["score_pool"] * n,
            "complete": [False] * n,
        },
        schema=UNIT_SCORES_SCHEMA,
    )
