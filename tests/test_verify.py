"""store.verify: a clean store verifies clean; a flipped byte, a deleted chunk, a truncated
commit file, orphans and leftovers are each found, and --repair + the same extraction
command restore a byte-identical store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from extractors.pipeline import ExtractConfig, run_extraction
from store.arrays import chunk_path, committed_rows
from store.core import Store
from store.verify import main, verify
from tests.conftest import ingest_small

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("verify") / "store"
    ingest_small(path, {"train_base": 24, "attr_query": 4, "eval": 4})
    _extract(path, tiny_model)
    return path


def _extract(path: Path, model: str) -> None:
    run_extraction(ExtractConfig(layers=LAYERS, store=str(path), model=model, unit_tokens=512, progress=False))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    st = Store(path)
    return {L: zarr.open_array(str(st.array_path(f"hidden/layer_{L}")), mode="r")[:] for L in LAYERS}


def _kinds(path: Path, quick: bool = False) -> list[str]:
    return sorted(p.kind for p in verify(Store(path), quick=quick)[0])


def test_a_fresh_extraction_verifies_clean(extracted, capsys):
    assert _kinds(extracted) == []
    assert main(["--store", str(extracted)]) == 0
    assert "0 problems" in capsys.readouterr().out


def _flip_byte(st: Store) -> Path:
    chunk = chunk_path(st, "hidden/layer_3", 1, 2)
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x40
    chunk.write_bytes(bytes(data))
    return chunk


def _delete_chunk(st: Store) -> Path:
    chunk = chunk_path(st, "hidden/layer_1", 0, 2)
    chunk.unlink()
    return chunk


def _truncate_commit(st: Store) -> Path:
    f = st.table_dir("array_units") / "hidden__layer_3" / "u000002.parquet"
    f.write_bytes(f.read_bytes()[:40])
    return f


@pytest.mark.parametrize(
    "damage, kind",
    [(_flip_byte, "corrupt_chunk"), (_delete_chunk, "missing_chunk"), (_truncate_commit, "unreadable_commit")],
)
def test_damage_is_found_and_repair_plus_rerun_restores_the_store(
    extracted, copy_store, tiny_model, damage, kind, capsys
):
    path = copy_store(extracted)
    st = Store(path)
    where = damage(st)
    quick = _kinds(path, quick=True)
    assert kind in _kinds(path)
    assert (kind in quick) == (kind != "corrupt_chunk")  # --quick checks sizes, not checksums
    capsys.readouterr()
    assert main(["--store", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{kind}: " in out and str(where) in out  # one line naming the array, unit and file
    assert main(["--store", str(path), "--repair"]) == 0
    assert _kinds(path) == []  # un-committed: nothing inconsistent left
    _extract(path, tiny_model)  # the same command recomputes those units
    assert _kinds(path) == []
    for L, a in _arrays(extracted).items():
        assert np.array_equal(_arrays(path)[L], a)
    assert committed_rows(Store(path), "hidden/layer_3") == committed_rows(Store(extracted), "hidden/layer_3")


def test_orphans_and_leftovers_are_found_and_removed(extracted, copy_store):
    path = copy_store(extracted)
    st = Store(path)
    arr = st.array_path("hidden/layer_1")
    shutil.copy(chunk_path(st, "hidden/layer_1", 0, 2), arr / "c" / "0" / "0.abc123.partial")
    commit = st.table_dir("array_units") / "hidden__layer_1" / "u000001.parquet"
    commit.unlink()  # unit 1's chunk is now an orphan
    ghost = st.table_dir("array_units") / "hidden__layer_9"
    ghost.mkdir()
    shutil.copy(st.table_dir("array_units") / "hidden__layer_3" / "u000000.parquet", ghost / "u000000.parquet")
    (st.catalog_dir / "rows" / ".part-0.parquet.deadbeef.tmp").write_bytes(b"x")
    assert _kinds(path) == ["leftover", "leftover", "orphan_chunk", "orphan_commit"]
    assert main(["--store", str(path), "--repair"]) == 0
    assert _kinds(path) == [] and not ghost.exists()
    assert not (arr / "c" / "1").exists() and not list(arr.rglob("*.partial"))


def test_a_killed_run_is_a_note_and_repair_marks_it_failed(extracted, copy_store, capsys):
    path = copy_store(extracted)
    st = Store(path)
    from store.catalog.runs import Run

    run = Run(st, "extract_hidden", {"x": 1})
    run.rec["pid"] = 2**22 + 12345  # a pid that is not running
    run._write()
    problems, notes = verify(st)
    assert problems == [] and [n.where for n in notes] == [run.run_id]
    assert main(["--store", str(path), "--repair"]) == 0
    assert "marked run" in capsys.readouterr().out
    status = Store(path).query("SELECT status FROM runs WHERE run_id = ?", [run.run_id]).column(0)[0].as_py()
    assert status == "failed"


def test_disk_full_at_a_unit_fails_the_run_and_a_rerun_completes_identically(
    extracted, copy_store, tiny_model, monkeypatch, capsys
):
    """OSError(ENOSPC) while writing unit 1: that unit is not committed, the run is recorded
    failed with the error, and the same command, once space is back, finishes byte-identically."""
    import errno

    import extractors.units as units
    from extractors.run import main as extract_main

    path = copy_store(extracted)
    st = Store(path)
    for L in LAYERS:  # start from an ingested, unextracted store
        shutil.rmtree(st.array_path(f"hidden/layer_{L}"))
        shutil.rmtree(st.table_dir("array_units") / f"hidden__layer_{L}")
    real = units.write_unit

    def full_disk(store, arr, name, unit, data):
        if unit == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(store.array_path(name)))
        return real(store, arr, name, unit, data)

    monkeypatch.setattr(units, "write_unit", full_disk)
    argv = ["--layers", "1", "3", "--store", str(path), "--model", tiny_model, "--unit-tokens", "512", "--no-progress"]
    assert extract_main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err.splitlines()[-1]
    st = Store(path)
    assert 1 not in committed_rows(st, "hidden/layer_1") and 1 not in committed_rows(st, "hidden/layer_3")
    rec = st.query(
        "SELECT status, note FROM runs WHERE kind = 'extract_hidden' AND status <> 'finished' "
        "ORDER BY started_at DESC LIMIT 1"
    ).to_pylist()[0]
    assert rec["status"] == "failed" and "No space left on device" in rec["note"]
    monkeypatch.setattr(units, "write_unit", real)
    assert extract_main(argv) == 0
    assert _kinds(path) == []
    for L, a in _arrays(extracted).items():
        assert np.array_equal(_arrays(path)[L], a)
