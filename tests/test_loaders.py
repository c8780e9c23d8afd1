"""Training loaders (store.loaders, issue 27 part 1) against plain references: materialize
of the same view and the SAE code arrays read by hand. A real store of the tiny random model
(hidden states of layer 1 and a random TopK SAE's codes there, 512-slot units), a few seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from extractors.run import main as extract
from store.core import Store, StoreError
from store.loaders import ActivationDataset, ActivationStream
from store.materialize import gather, materialize
from tests.conftest import ingest_small
from tests.test_s3 import BUCKET, s3  # noqa: F401 (the moto server fixture)

SIZES = {"train_base": 10, "attr_query": 2, "eval": 4}
H = "hidden/layer_1"
D_SAE = 128  # conftest.sae_dir: a TopK SAE, d_in 64, d_sae 128, k 8
VIEW = (
    "SELECT t.row_id, t.tok_index, t.token_pos, t.role, t.is_supervised, r.reward_model_score "
    "FROM tokens t JOIN rows r USING (row_id) WHERE t.role IN ('user', 'assistant') ORDER BY t.tok_index"
)
SMALL = {"batch_size": 64, "shuffle_buffer": 256, "block_tokens": 96}


@pytest.fixture(scope="module")
def st(tiny_model, sae_dir, tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("loaders") / "store"
    ingest_small(root, SIZES, model=tiny_model)
    common = ["--store", str(root), "--model", tiny_model, "--unit-tokens", "512", "--no-progress"]
    assert extract(["--layers", "1", *common]) == 0
    assert extract(["--layer", "1", "--kinds", "sae", "--sae", str(sae_dir), *common]) == 0
    return Store(root)


@pytest.fixture(scope="module")
def sae(st) -> str:
    names = [r["name"] for r in st.query("SELECT name FROM arrays WHERE kind = 'sae'").to_pylist()]
    assert names, "no SAE codes extracted"
    return names[0].rsplit("/", 1)[0]


def _codes(st: Store, sae: str, tok: np.ndarray) -> np.ndarray:
    """Dense SAE activations of tokens `tok` from the stored top-k by hand (zarr + scatter)."""
    idx = gather(st, f"{sae}/indices", tok, decoded=False).astype(np.int64)
    val = gather(st, f"{sae}/values", tok)
    out = np.zeros((len(tok), D_SAE), np.float32)
    np.add.at(out, (np.arange(len(tok))[:, None], idx), val)
    return out


def _epoch(stream: ActivationStream, key: str = "tok_index") -> list[np.ndarray]:
    return [b[key].numpy() for b in stream]


def test_dataset_items_equal_materialize(st, sae):
    ref = materialize(st, VIEW, H)
    ds = ActivationDataset(st, VIEW, arrays=[H, sae], columns=["role", "is_supervised", "reward_model_score"])
    assert len(ds) == len(ref.frame) > 500
    for i in (0, 17, len(ds) - 1):
        item = ds[i]
        assert torch.equal(item[H], torch.from_numpy(ref.X[i]))
        assert item["tok_index"].item() == ref.frame["tok_index"][i] and item["row_id"] == ref.frame["row_id"][i]
        assert item["role"] == ref.frame["role"][i] and item["is_supervised"].item() == ref.frame["is_supervised"][i]
        assert item[sae].shape == (D_SAE,) and item[sae].is_sparse
    batched = ActivationDataset(st, VIEW, arrays=[H, sae], columns=["reward_model_score"], batch_size=100)
    assert len(batched) == -(-len(ref.frame) // 100)
    got = [batched[i] for i in range(len(batched))]
    assert torch.equal(torch.cat([b[H] for b in got]), torch.from_numpy(ref.X))
    assert sum((b["row_id"] for b in got), []) == ref.frame["row_id"].to_list()
    score = torch.cat([b["reward_model_score"] for b in got]).numpy()
    assert np.array_equal(score, ref.frame["reward_model_score"].to_numpy())
    dense = torch.cat([b[sae].to_dense() for b in got]).numpy()
    assert np.array_equal(dense, _codes(st, sae, ref.frame["tok_index"].to_numpy()))
    assert dense.any() and (dense != 0).sum(1).max() <= 8  # k = 8 codes per token


def test_row_unit_gives_whole_rows(st):
    view = "SELECT row_id, category FROM rows WHERE split = 'train_base' ORDER BY row_id"
    ref = materialize(st, view, H)
    ds = ActivationDataset(st, view, arrays=[H], columns=["category"], unit="row")
    rows = ref.frame["row_id"].unique(maintain_order=True).to_list()
    assert len(ds) == len(rows) == SIZES["train_base"]
    item = ds[3]
    mask = (ref.frame["row_id"] == rows[3]).to_numpy()
    assert set(item["row_id"]) == {rows[3]} and item["row_lengths"].tolist() == [mask.sum()]
    assert torch.equal(item[H], torch.from_numpy(ref.X[mask]))
    two = ActivationDataset(st, view, arrays=[H], unit="row", batch_size=4)
    assert len(two) == 3 and two[2]["row_lengths"].shape == (2,)
    assert torch.equal(torch.cat([two[i][H] for i in range(3)]), torch.from_numpy(ref.X))


def test_stream_epoch_covers_every_token_once_reproducibly(st, sae):
    ref = materialize(st, VIEW, H)
    stream = ActivationStream(st, VIEW, arrays=[H, sae], columns=["role"], seed=3, **SMALL)
    batches = list(stream)
    tok = np.concatenate([b["tok_index"].numpy() for b in batches])
    assert sorted(tok.tolist()) == sorted(ref.frame["tok_index"].to_list())  # each token exactly once
    assert all(len(b["tok_index"]) == 64 for b in batches[:-1])
    where = {t: i for i, t in enumerate(ref.frame["tok_index"].to_list())}
    rows = np.array([where[t] for t in tok])
    assert np.array_equal(torch.cat([b[H] for b in batches]).numpy(), ref.X[rows])
    assert np.array_equal(torch.cat([b[sae].to_dense() for b in batches]).numpy(), _codes(st, sae, tok))
    assert sum((b["role"] for b in batches), []) == ref.frame["role"].to_numpy()[rows].tolist()
    assert sum((b["row_id"] for b in batches), []) == ref.frame["row_id"].to_numpy()[rows].tolist()
    # shuffled, not in stored order; the same for a seed and epoch; another for another seed or epoch
    assert not np.array_equal(tok, np.sort(tok))
    assert np.array_equal(np.concatenate(_epoch(stream)), tok)
    stream.set_epoch(1)
    again = ActivationStream(st, VIEW, arrays=[H], seed=4, **SMALL)
    for other in (np.concatenate(_epoch(stream)), np.concatenate(_epoch(again))):
        assert sorted(other.tolist()) == sorted(tok.tolist()) and not np.array_equal(other, tok)
    dropped = ActivationStream(st, VIEW, arrays=[H], seed=3, drop_last=True, **SMALL)
    assert all(len(t) == 64 for t in _epoch(dropped))


def test_ranks_and_workers_shards_are_disjoint_and_cover_everything(st):
    everything = sorted(st.query(f"SELECT tok_index FROM ({VIEW})").column(0).to_pylist())
    seen = []
    for rank in range(2):
        stream = ActivationStream(st, VIEW, arrays=[H], seed=5, rank=rank, world_size=2, **SMALL)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        got = np.concatenate([b["tok_index"].numpy() for b in loader])
        assert len(got) > len(everything) // 8  # every rank gets a share
        seen.append(got)
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat.tolist())) and sorted(flat.tolist()) == everything
    # even_shards: every rank takes the same number of steps (DDP), the smallest shard's count
    counts = []
    for rank in range(2):
        stream = ActivationStream(st, VIEW, arrays=[H], seed=5, rank=rank, world_size=2, even_shards=True, **SMALL)
        counts.append(sum(1 for _ in DataLoader(stream, batch_size=None, num_workers=2)))
    per_shard = stream.shard_batches(0, 4)
    assert len(set(per_shard)) > 1 and counts == [2 * min(per_shard)] * 2


def test_state_dict_resumes_at_exactly_the_next_batch(st):
    full = _epoch(ActivationStream(st, VIEW, arrays=[H], seed=7, **SMALL))
    assert len(full) > 10
    for k in (0, 3, 7, len(full) - 1, len(full)):
        first = ActivationStream(st, VIEW, arrays=[H], seed=7, **SMALL)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        fresh = ActivationStream(st, VIEW, arrays=[H], seed=7, **SMALL)
        fresh.load_state_dict(state)
        rest = _epoch(fresh)
        assert len(rest) == len(full) - k and all(np.array_equal(a, b) for a, b in zip(rest, full[k:], strict=True))


def test_stateful_dataloader_with_two_workers_resumes_at_the_next_batch(st):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")

    def loader():
        stream = ActivationStream(st, VIEW, arrays=[H], seed=9, **SMALL)
        return sdl.StatefulDataLoader(stream, batch_size=None, num_workers=2, snapshot_every_n_steps=1)

    full = [b["tok_index"].numpy() for b in loader()]
    first = loader()
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    del it
    again = loader()
    again.load_state_dict(state)
    rest = [b["tok_index"].numpy() for b in again]
    assert len(rest) == len(full) - 5 and all(np.array_equal(a, b) for a, b in zip(rest, full[5:], strict=True))


def test_bad_input_gets_one_clear_error(st):
    with pytest.raises(StoreError, match="'hidden/layer_9' is not in .*sae/<sae>/layer_L"):
        ActivationDataset(st, VIEW, arrays=["hidden/layer_9"])
    with pytest.raises(StoreError, match="tok_index"):
        ActivationStream(st, "SELECT row_id, token_pos FROM tokens", arrays=[H])
    for kw in ({"batch_size": 0}, {"shuffle_buffer": 0}, {"block_tokens": -1}):
        name, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
            ActivationStream(st, VIEW, arrays=[H], **kw)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        ActivationDataset(st, VIEW, arrays=[H], batch_size=0)
    with pytest.raises(ValueError, match="unit must be 'token' or 'row'"):
        ActivationDataset(st, VIEW, arrays=[H], unit="rows")
    with pytest.raises(ValueError, match="rank must be in 0 .. world_size - 1.*rank=2"):
        ActivationStream(st, VIEW, arrays=[H], rank=2, world_size=2)
    state = ActivationStream(st, VIEW, arrays=[H], rank=0, world_size=2, **SMALL).state_dict()
    with pytest.raises(ValueError, match="n_shards=2, this stream 1; run with the same world size and num_workers"):
        ActivationStream(st, VIEW, arrays=[H], **SMALL).load_state_dict(state)


def test_loaders_on_s3_equal_the_local_store(st, s3):  # noqa: F811
    import s3fs

    import store.fs

    fs = s3fs.S3FileSystem(**store.fs.storage_options("s3"))
    for p in Path(st.root).rglob("*"):
        if p.is_file() and p.name != "catalog.duckdb":
            fs.put_file(str(p), f"{BUCKET}/loaders/{p.relative_to(st.root)}")
    remote = Store(f"s3://{BUCKET}/loaders")
    a = _epoch(ActivationStream(st, VIEW, arrays=[H], seed=1, **SMALL), H)
    b = _epoch(ActivationStream(remote, VIEW, arrays=[H], seed=1, **SMALL), H)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    ds = ActivationDataset(remote, VIEW, arrays=[H], batch_size=500)
    assert torch.equal(torch.cat([ds[i][H] for i in range(len(ds))]), torch.from_numpy(materialize(st, VIEW, H).X))


def test_rows_missing_from_one_array_are_named(st, sae, copy_store):
    """The second array's commit check: a unit of the SAE values dropped -> how many rows, and
    the extraction that fills them."""
    dst = Store(copy_store(st.root))
    (dst.table_dir("array_units") / f"{sae.replace('/', '__')}__values" / "u000003.parquet").unlink()
    with pytest.raises(
        StoreError, match=rf"\d+ of \d+ selected rows are not in {sae}/values.*python -m extractors.run"
    ):
        ActivationStream(dst, VIEW, arrays=[H, sae])
    ActivationStream(dst, VIEW, arrays=[H])  # the hidden states alone are all there


KILLED_LOOP = """
import json, os, sys, time
from store.loaders import ActivationStream
root, state_path, log_path, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stream = ActivationStream(root, sys.argv[5], arrays=["hidden/layer_1"], seed=11, batch_size=64, shuffle_buffer=256,
                          block_tokens=96)
done = 0
if os.path.exists(state_path):
    state = json.load(open(state_path))
    stream.load_state_dict(state)
    done = state["batches"]
with open(log_path, "a") as log:
    for batch in stream:  # a training step: log the batch, checkpoint the loader every `every` batches
        log.write(json.dumps([done, batch["tok_index"].tolist()]) + "\\n")
        log.flush()
        done += 1
        if done % every == 0:
            with open(state_path + ".tmp", "w") as f:
                json.dump(stream.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(state_path + ".tmp", state_path)
        time.sleep(0.05)
"""


def test_sigkilled_training_loop_resumes_at_the_next_batch(st, tmp_path):
    """A training process that saves the stream's state_dict every 3 batches is SIGKILLed mid-epoch;
    the same command resumes from the last saved state, and the batches from there on are those of
    an uninterrupted run (the ones after the last checkpoint are redone, as a training step would be)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    full = _epoch(ActivationStream(st, VIEW, arrays=[H], seed=11, **SMALL))
    state, log = tmp_path / "state.json", tmp_path / "log.jsonl"
    cmd = [sys.executable, "-c", KILLED_LOOP, str(st.root), str(state), str(log), "3", VIEW]
    cwd = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=cwd)
    deadline = time.monotonic() + 300
    while (not log.exists() or len(log.read_text().splitlines()) < 8) and proc.poll() is None:
        assert time.monotonic() < deadline, "the training loop logged no batches"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads(state.read_text())["batches"]
    before = [json.loads(line) for line in log.read_text().splitlines()]
    assert 6 <= saved <= len(before) < len(full)  # killed mid-epoch, after at least two checkpoints
    subprocess.run(cmd, cwd=cwd, check=True, timeout=300)
    after = [json.loads(line) for line in log.read_text().splitlines()][len(before) :]
    assert [i for i, _ in after] == list(range(saved, len(full)))
    for i, tok in before + after:
        assert np.array_equal(tok, full[i]), f"batch {i} differs from the uninterrupted run's"


def test_a_given_frame_take_and_stack_equal_materialize(st, sae):
    """The trainers' path: a selection they sampled themselves (a polars frame), batches of any
    positions (`take`) and one array stacked; every array's commits are checked for the frame."""
    ref = materialize(st, VIEW, H)
    picked = ref.frame.select("row_id", "tok_index")[::3]
    ds = ActivationDataset(st, picked, arrays=[H], columns=[], batch_size=50)
    assert len(ds) == -(-len(picked) // 50) and list(ds[0]) == [H, "tok_index", "row_id"]
    assert np.array_equal(ds.stack(H), ref.X[::3])
    assert np.array_equal(ActivationDataset(st, picked, arrays=[H]).stack(H), ref.X[::3])
    pos = np.array([5, 0, 5, len(picked) - 1])
    got = ds.take(pos)
    assert np.array_equal(got[H].numpy(), ref.X[::3][pos]) and got["row_id"] == [picked["row_id"][int(i)] for i in pos]
    rows = ActivationDataset(st, picked, arrays=[H], unit="row", batch_size=3)
    assert torch.equal(torch.cat([rows[i][H] for i in range(len(rows))]), torch.from_numpy(ref.X[::3]))
    with pytest.raises(IndexError, match="positions must be in 0"):
        ds.take(np.array([len(picked)]))
    with pytest.raises(ValueError, match="stack\\(\\) takes one of the dataset's dense arrays"):
        ActivationDataset(st, picked, arrays=[H, sae]).stack(sae)
    with pytest.raises(StoreError, match="the frame must return row_id and tok_index"):
        ActivationDataset(st, picked.select("row_id"), arrays=[H])
