"""Ingest: splits, quarantine reasons, determinism, schema errors, catalog round trip."""

from __future__ import annotations

import json

import duckdb
import pytest

from extractors.ingest import SPLITS, IngestConfig, IngestError, run_ingest
from extractors.ingest.sources import SchemaError, SourceError
from store.core import Store, StoreError


def _ingest(path, **kw):
    return run_ingest(IngestConfig(store=str(path), **kw), progress=False)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ingest") / "store"
    _ingest(path)
    return Store(path)


def test_embedded_splits_meet_the_spec(sample_store):
    sizes = dict(sample_store.connect().sql("SELECT split, count(*) FROM rows GROUP BY 1").fetchall())
    assert sizes == {"train_base": 600, "attr_query": 100, "eval": 100}
    con = sample_store.connect()
    # disjoint splits, attr_query/eval from the source's test split, train_base from train
    assert (
        con.sql("SELECT count(*) FROM (SELECT row_id FROM rows GROUP BY 1 HAVING count(*) > 1)").fetchall()[0][0] == 0
    )
    src = dict(con.sql("SELECT split, list(DISTINCT source_split) FROM rows GROUP BY 1").fetchall())
    assert src == {"train_base": ["train"], "attr_query": ["test"], "eval": ["test"]}
    # score_pool is the train_base rows
    pool = con.sql(
        "SELECT count(*) FROM split_members m JOIN rows r USING (row_id) "
        "WHERE m.split = 'score_pool' AND r.split = 'train_base'"
    ).fetchall()[0][0]
    assert pool == 600
    # no empty prompt or completion; every metadata column present
    assert con.sql("SELECT count(*) FROM rows WHERE trim(completion) = '' OR len(prompt) = 0").fetchall()[0][0] == 0
    cols = {r[0] for r in con.sql("DESCRIBE rows").fetchall()}
    assert {"category", "difficulty", "quality", "reward_model_score", "conversation_tokens"} <= cols
    # group_id follows the spec
    gid, cat, diff, ss, idx = con.sql(
        "SELECT group_id, category, difficulty, source_split, source_index FROM rows LIMIT 1"
    ).fetchall()[0]
    assert gid == f"{cat}::{diff}::{ss}::{idx}"


def test_stratified_by_category_and_reported(sample_store):
    m = json.loads(sample_store.query("SELECT manifest FROM manifests").column(0)[0].as_py())
    dist = m["category_distribution"]
    assert set(dist) == set(SPLITS)
    for split, want in m["split_policy"]["requested"].items():
        counts = dist[split]
        assert sum(counts.values()) == want
        assert len(counts) >= 8
        # proportional allocation: categories are near-balanced in the sample, so within +-3 of the mean
        mean = want / len(counts)
        assert max(abs(c - mean) for c in counts.values()) <= max(3, 0.2 * mean)
    assert m["split_policy"]["stratify_by"] == "category"
    assert m["dataset"]["content_hash"]
    fs = m["filter_stats"]
    assert fs["source_rows"]["train"] == 1007 and fs["after_token_cap"]["train"] == 1000


def test_default_data_quarantines_every_bad_row(sample_store):
    rows = sample_store.connect().sql("SELECT reason, count(*) FROM quarantine GROUP BY 1").fetchall()
    assert dict(rows) == {
        "duplicate_conversation": 2,
        "empty_completion": 2,
        "missing_content": 1,
        "no_final_assistant": 1,
        "non_string_content": 1,
        "over_token_cap": 1,
    }
    # the raw record is kept, so nothing is lost
    rec = sample_store.query("SELECT record FROM quarantine WHERE reason = 'no_final_assistant'").column(0)[0].as_py()
    assert json.loads(rec)["messages"][-1]["role"] == "user"


def _row(msgs, category="math", **meta):
    return {
        "messages": msgs,
        "category": category,
        "difficulty": meta.get("difficulty", "easy"),
        "quality": meta.get("quality", "good"),
        "reward_model_score": meta.get("rms", 1.0),
        "conversation_tokens": 10,
    }


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _clean(i, category="math"):
    return _row(
        [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}],
        category=category,
    )


def test_every_quarantine_reason_with_hand_made_rows(tmp_path):
    bad = [
        _row("not a list"),  # malformed_messages
        _row([{"role": "user"}, {"role": "assistant", "content": "x"}]),  # missing_content
        _row([{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]),  # non_string_content
        _row([{"role": "user", "content": "hi"}]),  # no_final_assistant
        _row([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]),  # empty_completion
        _row([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n\t"}]),  # empty_completion
        _row([{"role": "system", "content": "sys"}, {"role": "assistant", "content": "x"}]),  # empty_prompt
        _row([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]),  # unknown_role
        _clean(1),  # duplicate of row 0 below
        _row([{"role": "user", "content": "long " * 50}, {"role": "assistant", "content": "word " * 3000}]),
        {**_clean(99), "category": None, "quality": None},  # null metadata: kept
    ]
    train = [_clean(i, category=["math", "coding"][i % 2]) for i in range(1, 21)] + bad
    test = [_clean(i, category=["math", "coding"][i % 2]) for i in range(100, 110)]
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "train.jsonl", train)
    _write_jsonl(src / "test.jsonl", test)
    res = _ingest(tmp_path / "st", source=str(src), train_base=21, attr_query=4, eval=4)
    assert res.quarantined == {
        "duplicate_conversation": 1,
        "empty_completion": 2,
        "empty_prompt": 1,
        "malformed_messages": 1,
        "missing_content": 1,
        "no_final_assistant": 1,
        "non_string_content": 1,
        "over_token_cap": 1,
        "unknown_role": 1,
    }
    st = Store(tmp_path / "st")
    assert st.query("SELECT count(*) FROM quarantine").column(0)[0].as_py() == 10
    nulls = st.query("SELECT count(*) FROM rows WHERE category IS NULL").column(0)[0].as_py()
    assert nulls == 1
    stats = res.manifest["filter_stats"]
    assert stats["source_rows"]["train"] == 31 and stats["after_flatten"]["train"] == 23
    assert stats["after_dedup"]["train"] == 22 and stats["after_token_cap"]["train"] == 21


def test_determinism_same_seed_same_rows_other_seed_differs(tmp_path, sample_store):
    again = _ingest(tmp_path / "a")
    other = _ingest(tmp_path / "b", seed=1)
    q = "SELECT split, row_id FROM rows ORDER BY split, row_id"
    base = sample_store.query(q).to_pylist()
    assert Store(tmp_path / "a").query(q).to_pylist() == base
    assert Store(tmp_path / "b").query(q).to_pylist() != base
    assert again.ingest_id != other.ingest_id


def test_sql_round_trip_in_plain_duckdb(sample_store):
    con = duckdb.connect(str(sample_store.catalog_db), read_only=True)
    got = dict(con.sql("SELECT category, count(*) FROM rows GROUP BY 1").fetchall())
    assert sum(got.values()) == 800 and len(got) >= 8
    assert con.sql("SELECT count(*) FROM quarantine").fetchall()[0][0] == 8


def test_wrong_schema_names_column_and_file(tmp_path):
    f = tmp_path / "train.jsonl"
    _write_jsonl(f, [{"messages": [], "category": "x"}])
    with pytest.raises(SchemaError) as e:
        _ingest(tmp_path / "st", source=str(f))
    assert "difficulty" in str(e.value) and str(f) in str(e.value)


def test_no_test_split_is_carved_and_said(tmp_path):
    f = _write_jsonl(tmp_path / "data.jsonl", [_clean(i, ["math", "coding"][i % 2]) for i in range(40)])
    res = _ingest(tmp_path / "st", source=str(f), train_base=20, attr_query=5, eval=5)
    assert res.manifest["split_policy"]["attr_query_eval_from"].startswith("carved")
    assert res.sizes == {"train_base": 20, "attr_query": 5, "eval": 5, "score_pool": 20}


def test_too_many_rows_requested_says_how_many_exist(tmp_path):
    with pytest.raises(IngestError, match=r"only 250 usable rows.*--attr-query <= 250"):
        _ingest(tmp_path / "st", attr_query=300)


def test_reingest_is_a_noop_and_a_different_one_is_refused(tmp_path):
    _ingest(tmp_path / "st", train_base=50, attr_query=10, eval=10)
    assert _ingest(tmp_path / "st", train_base=50, attr_query=10, eval=10).skipped
    with pytest.raises(StoreError, match="new --store"):
        _ingest(tmp_path / "st", train_base=60, attr_query=10, eval=10)


def test_parquet_folder_and_saved_datasets_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    train = [_clean(i, ["math", "coding"][i % 2]) for i in range(1, 31)]
    test = [_clean(i, ["math", "coding"][i % 2]) for i in range(100, 112)]
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(train), pq_dir / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(test), pq_dir / "test-00000.parquet")
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(tmp_path / "ds")
    q = "SELECT split, row_id FROM rows ORDER BY 1, 2"
    a = _ingest(tmp_path / "a", source=str(pq_dir), train_base=20, attr_query=5, eval=5)
    b = _ingest(tmp_path / "b", source=str(tmp_path / "ds"), train_base=20, attr_query=5, eval=5)
    assert a.sizes == b.sizes == {"train_base": 20, "attr_query": 5, "eval": 5, "score_pool": 20}
    assert Store(tmp_path / "a").query(q).to_pylist() == Store(tmp_path / "b").query(q).to_pylist()
    assert a.manifest["dataset"]["content_hash"] and "test-00000.parquet" in a.manifest["dataset"]["files"]["test"]


def test_dataset_cli_reports_a_bad_source_in_one_line(tmp_path, capsys):
    from extractors.dataset import main

    missing = tmp_path / "missing.parquet"
    assert main(["--source", str(missing), "--store", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


@pytest.mark.parametrize("spec", ["./no/such/file.parquet", "no/such/data.jsonl", "~/no_such_folder_xyz"])
def test_missing_local_source_says_it_does_not_exist(tmp_path, spec):
    """A path-like --source that names nothing is a missing path, not a failed Hub download."""
    with pytest.raises(SourceError) as e:
        _ingest(tmp_path / "st", source=spec)
    msg = str(e.value)
    assert spec in msg and "does not exist" in msg and "Hub" not in msg.split("Check the path")[0]
    assert "--source embedded" in msg


def test_dataset_cli_names_a_missing_source_path(tmp_path, capsys, monkeypatch):
    from extractors.dataset import main

    monkeypatch.chdir(tmp_path)
    assert main(["--source", "./no/such/file.parquet", "--store", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --source './no/such/file.parquet': no such file or folder")
    assert str(tmp_path / "no/such/file.parquet") in err and "Hugging Face Hub" not in err


def test_unreadable_lines_and_loose_types_are_quarantined_or_coerced(tmp_path):
    """Bytes that are not UTF-8, a line that is not JSON or not an object, tool/function roles,
    messages as a JSON string, numbers as text: each kept, coerced with a count, or quarantined
    with a reason (never a traceback)."""
    good = [_clean(i, category=["math", "coding"][i % 2]) for i in range(1, 21)]
    as_string = {**_clean(50), "messages": json.dumps(_clean(50)["messages"])}
    text_score = {**_clean(51), "reward_model_score": "4.5", "conversation_tokens": "12", "difficulty": 3}
    bad_score = {**_clean(52), "reward_model_score": "excellent"}
    tool = _row(
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "x"}]
    )
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps(r).encode() for r in good + [as_string, text_score, bad_score, tool]]
    lines.insert(3, b'{"messages": "broken')  # line 4: not JSON
    lines.insert(5, bytes([0xFF, 0xFE]) + b'{"messages": []}')  # line 6: not UTF-8
    lines.insert(7, b"[1, 2, 3]")  # line 8: not an object
    (src / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _write_jsonl(src / "test.jsonl", [_clean(i, category=["math", "coding"][i % 2]) for i in range(100, 110)])
    res = _ingest(tmp_path / "st", source=str(src), train_base=22, attr_query=4, eval=4)
    assert res.quarantined == {"bad_metadata": 1, "unknown_role": 1, "unreadable_record": 3}
    assert res.manifest["filter_stats"]["coerced"] == {
        "conversation_tokens_to_int": 1,
        "difficulty_to_str": 1,
        "messages_from_json_string": 1,
        "reward_model_score_to_float": 1,
    }
    st = Store(tmp_path / "st")
    q = st.query("SELECT detail FROM quarantine WHERE reason = 'unreadable_record' ORDER BY detail").column(0)
    details = q.to_pylist()
    assert any(":4: not JSON" in d for d in details)
    assert any(":6: not UTF-8" in d and "\\xff\\xfe" in d for d in details)  # the raw bytes' repr
    assert any(":8: a JSON list, not an object" in d for d in details)
    assert all(str(src / "train.jsonl") in d for d in details)
    score = st.query("SELECT reward_model_score FROM rows WHERE completion = '51 + 51 = 102.'").column(0)
    assert score.to_pylist() == [4.5]


def test_a_file_unreadable_as_a_whole_is_one_clear_error(tmp_path, capsys):
    from extractors.dataset import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    assert main(["--store", str(tmp_path / "st"), "--source", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.parquet: not a readable Parquet file" in err
    assert len(err.strip().splitlines()) == 1
