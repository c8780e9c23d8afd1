"""The streamed ingest and tokenization (issue 18, full-size catalog) write exactly what the
in-memory implementation wrote, in parts of at most one batch.

The reference digests below were taken from the in-memory implementation (before streaming)
on the embedded default (800 stored rows, the embedded tokenizer, 16,384-token units): each is
the sha256 of a table's rows as sorted JSON lines (order-independent; timestamps left out).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import pyarrow.parquet as pq
import pytest

from extractors.ingest.sample.generate import generate_sample, iter_sample
from store.core import Store, StoreError
from store.scratch import scratch

REFERENCE = {
    "rows": ("a812d5e6e13593d22c834a52f3eae52b14f0cb42b428ac1d08a2d817296216b2", 800),
    "split_members": ("8850d17fba1ad72d45ef71b0b0db6e0ee2ad3fca2e08c636a7ba20a1d9ca0c42", 1400),
    "quarantine": ("0bbd2c91fd770fa45ab9217e9a60b23467a104c2d116173df50bc84392f8f107", 8),
    "tokens": ("168701360ebd5deb70623d8408f6f24987a74329770537ea1228658d1cd5bacb", 154483),
    "row_layout": ("7e02c5ec212c98a25325051a6da47f68fed27b7457d329a631c9eef508f90974", 800),
    "tokenizations": ("53076cf6aa571469e96e2e7c7ef9188cf287f09f85bbabe612b0f8c4b07a9325", 1),
}
# sha256(json.dumps(generate_sample(*args), sort_keys=True))[:16] of the list-building generator.
SAMPLE_REFERENCE = {
    (0, 1000, 250): "da89c675aef98249",
    (1, 5, 0): "81b174f4eb6d311e",
    (2, 0, 3): "db479a354e8cbc86",
    (3, 4, 4): "0076646450e5a28f",
    (4, 1, 1): "905f0bc73547fec9",
    (5, 2, 2): "d838a9f9841748af",
}


def _digest(st, table: str) -> tuple[str, int]:
    rows = [
        json.dumps(
            {k: v for k, v in r.items() if k not in ("created_at", "quarantined_at")}, sort_keys=True, default=str
        )
        for r in st.query(f"SELECT * FROM {table}").to_pylist()
    ]
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest(), len(rows)


@pytest.mark.parametrize("args", sorted(SAMPLE_REFERENCE))
def test_streamed_sample_equals_the_list_building_one(args):
    got = generate_sample(*args)
    assert hashlib.sha256(json.dumps(got, sort_keys=True).encode()).hexdigest()[:16] == SAMPLE_REFERENCE[args]
    streamed = list(iter_sample(*args))
    assert [r for s, r in streamed if s == "train"] == got["train"]
    assert [r for s, r in streamed if s == "test"] == got["test"]


def _build(root, ingest_batch: int, tokenize_batch: int, **sizes):
    from extractors.chat_tokens import ensure_tokenization
    from extractors.ingest import IngestConfig, run_ingest
    from extractors.model import load_tokenizer
    from store.core import Store

    run_ingest(IngestConfig(store=str(root), batch_rows=ingest_batch, **sizes), progress=False)
    st = Store(root)
    layout = ensure_tokenization(
        st, load_tokenizer("embedded"), "embedded", 16384, progress=False, batch_rows=tokenize_batch
    )
    return st, layout


def test_streamed_tables_equal_the_in_memory_reference(tmp_path):
    """The embedded default in many small batches gives the reference tables; each Parquet part
    holds at most one batch (so memory never held more); the parts' file-name order is the row
    order of the one-file table."""
    from extractors.ingest.steps import SPLITS

    st, layout = _build(tmp_path / "store", 97, 50)
    for table, want in REFERENCE.items():
        assert _digest(st, table) == want, table
    rows_parts, token_parts = st.table_files("rows"), st.table_files("tokens")
    assert len(rows_parts) == math.ceil(800 / 97)
    assert all(pq.read_metadata(p).num_rows <= 97 for p in rows_parts)
    assert len(token_parts) == math.ceil(800 / 50)
    for p in token_parts:
        assert len(set(pq.read_table(p, columns=["row_id"]).column(0).to_pylist())) <= 50
    ids = st.query("SELECT split, row_id FROM rows").to_pylist()
    assert ids == sorted(ids, key=lambda r: (SPLITS.index(r["split"]), r["row_id"]))
    # row_layout's offsets are the running sum of the layout plan
    lay = st.query("SELECT tok_start FROM row_layout ORDER BY tok_start").column(0).to_pylist()
    assert lay == layout.tok_starts and sum(layout.lengths) == REFERENCE["tokens"][1]


def test_one_batch_and_many_batches_write_the_same_tables(tmp_path):
    """One batch keeps the one-file layout of before (rows/part-0, tokens/<tokenization>)."""
    sizes = {"sample_train": 60, "sample_test": 20, "train_base": 40, "attr_query": 6, "eval": 6}
    one, lay1 = _build(tmp_path / "one", 10_000, 1000, **sizes)
    many, lay2 = _build(tmp_path / "many", 7, 5, **sizes)
    assert [p.name for p in one.table_files("rows")] == ["part-0.parquet"]
    assert [p.name for p in one.table_files("tokens")] == [f"{lay1.tokenization}.parquet"]
    assert len(many.table_files("rows")) == 8 and len(many.table_files("tokens")) == 11
    assert lay1 == lay2
    for table in ("rows", "split_members", "quarantine", "tokens", "row_layout", "tokenizations"):
        assert _digest(one, table) == _digest(many, table), table


def test_streaming_batch_sizes_are_checked(tmp_path):
    from extractors.ingest import IngestConfig
    from extractors.ingest.rows_writer import write_rows_table

    with pytest.raises(ValueError, match="--batch-rows must be positive, got 0"):
        IngestConfig(store=str(tmp_path), batch_rows=0)
    with pytest.raises(ValueError, match="batch_rows must be positive, got -1"):
        write_rows_table(None, {}, {}, -1, schema=None, splits=(), make_row=None)


def test_spill_files_live_in_the_store_scratch_and_a_killed_process_leaves_none(tmp_path):
    import subprocess
    import sys

    store = Store(tmp_path / "st")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a pid that has exited
    left = store.root / "scratch" / f"tokenize-{dead_pid}-{'a' * 12}"
    live = store.root / "scratch" / f"tokenize-{os.getppid()}-{'b' * 12}"
    for d in (left, live):
        d.mkdir(parents=True)
        (d / "00000.parquet").write_bytes(b"x")
    with scratch(store, "ingest-rows") as folder:
        assert folder.parent == store.root / "scratch" and folder.is_dir()
        assert not left.exists() and live.exists()  # only the dead process's folder goes
        (folder / "spill").write_bytes(b"y")
    assert not folder.exists()
    with pytest.raises(StoreError, match="scratch purpose"):
        with scratch(store, "../x"):
            pass
