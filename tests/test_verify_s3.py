"""store.verify on object storage: the checks of tests/test_verify.py on the moto S3 server.

This module gets its own moto server and its own pair of stores (tests/test_s3.py's `s3` and
`pair` fixtures: the tiny model ingested and extracted into `s3://acts/store` and into a local
folder). The S3 store verifies clean, as the local one does; then the same damage is done to
a server-side copy of it and to a copy of the local store (a flipped byte in a committed
chunk, a deleted chunk, an orphan chunk, a `.partial` and a `.tmp` leftover, commits of an
array that does not exist, a dead writer's claim, a killed run): verify reports the same
problems on both (kind, array and unit, path inside the store); `--repair` and the same
extraction command then give an S3 store that verifies clean and whose chunks equal the
local reference's.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import PurePosixPath

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from store.arrays import chunk_path  # noqa: E402
from store.catalog.runs import Run  # noqa: E402
from store.core import Store  # noqa: E402
from store.verify import main, verify  # noqa: E402
from tests import test_s3  # noqa: E402

# tests/test_s3.py's fixtures, module-scoped here too: a moto server and stores of this module
s3, pair = test_s3.s3, test_s3.pair
DEAD_PID = 2**22 + 12345  # a pid that is not running


def _copy_remote(remote: Store, prefix: str) -> Store:
    """A server-side copy (CopyObject, no download) of a remote store under another prefix."""
    fs, src = remote.root.fs, remote.root.path
    keys = sorted(fs.find(src))
    fs.copy(keys, [f"{test_s3.BUCKET}/{prefix}/{k[len(src) + 1 :]}" for k in keys])
    return Store(f"s3://{test_s3.BUCKET}/{prefix}")


def _put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a no-op on object storage
    path.write_bytes(data)


def _damage(st: Store) -> None:
    """The same damage, through the Store's paths (local Path or RemotePath alike)."""
    chunk = chunk_path(st, "hidden/layer_3", 1, 2)
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x40
    chunk.write_bytes(bytes(data))  # corrupt_chunk (same size: only the CRC-32 tells)
    chunk_path(st, "hidden/layer_1", 0, 2).unlink()  # missing_chunk
    units = st.table_dir("array_units")
    (units / "hidden__layer_1" / "u000001.parquet").unlink()  # unit 1's chunk: orphan_chunk
    _put(st.array_path("hidden/layer_3") / "c" / "0" / "0.abc123.partial", b"x")  # leftover
    _put(st.catalog_dir / "rows" / ".part-0.parquet.deadbeef.tmp", b"x")  # leftover
    ghost = (units / "hidden__layer_3" / "u000000.parquet").read_bytes()
    _put(units / "hidden__layer_9" / "u000000.parquet", ghost)  # orphan_commit
    claim = {"host": socket.gethostname(), "pid": DEAD_PID, "time": time.time()}
    _put(st.claims_dir / "extract" / "u000003.json", json.dumps(claim).encode())  # leftover
    run = Run(st, "extract_hidden", {"x": 1})
    run.rec["pid"] = DEAD_PID  # a killed run: a note
    run._write()


def _report(st: Store, quick: bool = False) -> list[tuple[str, str, str]]:
    """(kind, where, path inside the store) of every problem and note, sorted."""
    problems, notes = verify(st, quick=quick)
    root = PurePosixPath(str(st.root))
    out = [(p.kind, p.where, str(PurePosixPath(p.path).relative_to(root))) for p in problems]
    return sorted(out + [(n.kind, "run", "") for n in notes])


def test_a_clean_s3_store_verifies_clean(pair, capsys):
    local, remote, _ = pair
    seconds = {}
    for name, st in (("local", local), ("S3", remote)):
        t0 = time.perf_counter()
        assert main(["--store", str(st.root)]) == 0
        seconds[name] = time.perf_counter() - t0
        assert f"0 problems in {st.root}" in capsys.readouterr().out
    assert main(["--store", str(remote.root), "--quick"]) == 0
    assert _report(remote) == _report(local) == []
    print(f"verify of the clean store: local {seconds['local']:.2f} s, S3 (moto) {seconds['S3']:.2f} s")


def test_no_store_under_a_prefix_is_one_clear_error(pair, capsys):
    assert main(["--store", f"s3://{test_s3.BUCKET}/nothing-here"]) != 0
    assert "no store at s3://" in capsys.readouterr().err


def test_damage_on_s3_is_found_as_on_local_and_repair_plus_rerun_restores_it(
    pair, copy_store, tiny_model, model_cache, capsys
):
    from extractors.run import main as extract

    local, remote, _ = pair
    st, ref = _copy_remote(remote, "damaged"), Store(copy_store(local.root))
    for s in (st, ref):
        _damage(s)
    found = _report(st)
    assert found == _report(ref)  # the same problems as the local verify on the same damage
    assert [k for k, _, _ in found] == [
        "corrupt_chunk",
        "leftover",
        "leftover",
        "leftover",
        "missing_chunk",
        "orphan_chunk",
        "orphan_commit",
        "stale_run",
    ]
    assert ("corrupt_chunk", "hidden/layer_3 unit 000001", "arrays/hidden/layer_3/c/1/0") in found
    assert ("missing_chunk", "hidden/layer_1 unit 000000", "arrays/hidden/layer_1/c/0/0") in found
    quick = [k for k, _, _ in _report(st, quick=True)]
    assert "corrupt_chunk" not in quick and "missing_chunk" in quick  # --quick: sizes, no CRC-32
    capsys.readouterr()
    assert main(["--store", str(st.root)]) == 1
    out = capsys.readouterr().out
    flipped = "corrupt_chunk: hidden/layer_3 unit 000001: CRC-32 "
    assert flipped in out and f"({st.root}/arrays/hidden/layer_3/c/1/0)" in out
    assert main(["--store", str(st.root), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "un-committed hidden/layer_3 unit 000001" in out and "marked run" in out
    assert _report(st) == []  # un-committed and cleaned: nothing inconsistent left
    assert not list((st.root / "claims").rglob("*.json"))
    ext = test_s3._extract_args(str(st.root), tiny_model, model_cache)[1]
    assert extract(ext) == 0  # the same command recomputes the un-committed units
    assert _report(st) == []
    for name in ("hidden/layer_1", "hidden/layer_3"):
        a, b = test_s3._chunks(local, name), test_s3._chunks(st, name)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), f"{name}: chunks differ from local"
