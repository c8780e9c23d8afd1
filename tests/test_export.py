"""python -m store.export (issue 27 part 3): each layout read back by its own library (datasets'
load_from_disk; polars and DuckDB for Parquet; SAELens' ActivationsStore for its cached
activations) and compared with materialize of the same view; SAELens' own trainer trains from the
export, and straight from an ActivationStream. The tiny random model's store, a few seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from extractors.run import main as extract
from store.core import Store
from store.export.export import ExportConfig, export, main
from store.loaders import ActivationStream
from store.materialize import materialize
from tests.conftest import ingest_small

SIZES = {"train_base": 8, "attr_query": 2, "eval": 2}
H = "hidden/layer_1"
VIEW = (
    "SELECT t.row_id, t.tok_index, t.token_id, t.role, r.reward_model_score "
    "FROM tokens t JOIN rows r USING (row_id) WHERE t.role IN ('user', 'assistant') ORDER BY t.tok_index"
)


@pytest.fixture(scope="module")
def st(tiny_model, tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("export") / "store"
    ingest_small(root, SIZES, model=tiny_model)
    common = ["--store", str(root), "--model", tiny_model, "--unit-tokens", "512", "--no-progress"]
    assert extract(["--layers", "1", *common]) == 0
    return Store(root)


@pytest.fixture(scope="module")
def ref(st):
    return materialize(st, VIEW, H)


def _cfg(st, out, fmt, **kw) -> ExportConfig:
    return ExportConfig(store=str(st.root), out=str(out), view=VIEW, array=H, format=fmt, progress=False, **kw)


def test_hf_export_loads_with_datasets(st, ref, tmp_path):
    import datasets

    res = export(_cfg(st, tmp_path / "hf", "hf", batch_tokens=300))
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert res["n_tokens"] == len(ds) == len(ref.frame) > 300
    assert ds.features["hidden_layer_1"].length == 64
    assert set(ds.column_names) == {"tok_index", "row_id", "token_id", "role", "reward_model_score", "hidden_layer_1"}
    ds.set_format("numpy")
    assert np.array_equal(ds["hidden_layer_1"][:], ref.X)
    assert ds["tok_index"][:].tolist() == ref.frame["tok_index"].to_list()
    assert list(ds["row_id"][:]) == ref.frame["row_id"].to_list() and list(ds["role"][:]) == ref.frame["role"].to_list()
    info = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert info["array"] == H and info["n_tokens"] == len(ref.frame)
    run = st.query(f"SELECT kind, status FROM runs WHERE run_id = '{info['run_id']}'").to_pylist()
    assert run == [{"kind": "export", "status": "finished"}]


def test_parquet_export_reads_back_with_polars_and_duckdb(st, ref, tmp_path):
    import duckdb
    import polars as pl
    import pyarrow.parquet as pq

    out = tmp_path / "acts.parquet"
    assert main(["--store", str(st.root), "--view", VIEW, "--array", H, "--columns", "role", "--batch-tokens", "250",
                 "--no-progress", str(out)]) == 0  # fmt: skip
    f = pl.read_parquet(out)
    assert f.columns == ["tok_index", "row_id", "role", "hidden_layer_1"]
    assert f.schema["hidden_layer_1"] == pl.Array(pl.Float32, 64)
    assert np.array_equal(f["hidden_layer_1"].to_numpy(), ref.X) and f["role"].to_list() == ref.frame["role"].to_list()
    con = duckdb.connect()
    # Parquet itself has no fixed-size list: DuckDB reads a list, every one of length 64, cast to FLOAT[64]
    typ = con.sql(f"SELECT DISTINCT typeof(hidden_layer_1), len(hidden_layer_1) FROM '{out}'").fetchall()
    assert typ == [("FLOAT[]", 64)]
    assert con.sql(f"SELECT typeof(hidden_layer_1::FLOAT[64]) FROM '{out}' LIMIT 1").fetchall() == [("FLOAT[64]",)]
    got = con.sql(f"SELECT tok_index, hidden_layer_1[3] AS x3 FROM '{out}' ORDER BY tok_index").fetchnumpy()
    assert np.array_equal(got["tok_index"], ref.frame["tok_index"].to_numpy())
    assert np.array_equal(got["x3"], ref.X[:, 2])  # DuckDB arrays are 1-based
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-len(ref.frame) // 250)
    meta = json.loads(pq.read_schema(out).metadata[b"activation_store.export"])
    assert meta["array"] == H and "tokens t JOIN rows" in meta["view_sql"] and meta["run_id"].startswith("export-")


def _sae_trainer(data_provider, steps: int, batch: int):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=64, d_sae=128, k=8))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-3, lr_end=3e-4, device="cpu"
    )
    return SAETrainer(cfg, sae, data_provider)


def _mse(sae, X: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((sae.decode(sae.encode(X)) - X) ** 2).sum(-1).mean())


def test_saelens_trains_from_the_saelens_export(st, ref, tmp_path):
    """SAELens' own ActivationsStore reads the export (use_cached_activations' code path) and its
    SAETrainer.fit() trains on it: the reconstruction error falls."""
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    out = tmp_path / "cached"
    res = export(_cfg(st, out, "saelens", context_size=32, batch_tokens=100))
    n_seq = len(ref.frame) // 32
    assert (res["n_sequences"], res["n_left_out"]) == (n_seq, len(ref.frame) - 32 * n_seq)
    ds = datasets.load_from_disk(str(out)).with_format("numpy")
    hook = "blocks.1.hook_resid_post"
    assert ds.features[hook].shape == (32, 64) and len(ds) == n_seq
    assert np.array_equal(ds[hook][:].reshape(-1, 64), ref.X[: 32 * n_seq])
    assert np.array_equal(ds["token_ids"][:].reshape(-1), ref.frame["token_id"].to_numpy()[: 32 * n_seq])
    acts = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None, context_size=32, d_in=64,
        n_batches_in_buffer=4, total_training_tokens=40 * 64, store_batch_size_prompts=2, train_batch_size_tokens=64,
        prepend_bos=False, normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(out),
    )  # fmt: skip
    first = next(acts)
    assert first.shape == (64, 64)
    X = torch.from_numpy(ref.X)
    trainer = _sae_trainer(acts, steps=40, batch=64)
    before = _mse(trainer.sae, X)
    sae = trainer.fit()
    assert trainer.n_training_steps == 40
    assert _mse(sae, X) < 0.7 * before


def test_saelens_trains_straight_from_an_activation_stream(st, ref):
    """No export: SAETrainer takes any iterator of [batch, d_in] tensors."""

    def batches():
        stream = ActivationStream(st, VIEW, arrays=[H], columns=[], batch_size=64, shuffle_buffer=256, drop_last=True)
        epoch = 0
        while True:
            stream.set_epoch(epoch)
            yield from (b[H] for b in stream)
            epoch += 1

    X = torch.from_numpy(ref.X)
    trainer = _sae_trainer(batches(), steps=40, batch=64)
    before = _mse(trainer.sae, X)
    losses = [float(trainer.step(next(trainer.data_provider)).loss.detach()) for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert _mse(trainer.sae, X) < 0.7 * before


def test_bad_input_gets_one_clear_error(st, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    base = ["--store", str(st.root), "--view", VIEW, "--no-progress"]
    cases = [
        ([*base, "--array", H, str(tmp_path / "taken")], "exists; pass --overwrite"),
        ([*base, "--array", "hidden/layer_3", str(tmp_path / "a")], "'hidden/layer_3' is not in"),
        (["--store", str(st.root), "--view", "SELECT row_id, token_pos FROM tokens", "--array", H, str(tmp_path / "c")],
         "tok_index"),
        ([*base, "--array", H, "--format", "saelens", "--context-size", "100000", str(tmp_path / "d")],
         "fewer than one sequence of --context-size 100000"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / ".d.partial").exists()
    with pytest.raises(SystemExit):
        main([*base, "--array", H, "--batch-tokens", "0", str(tmp_path / "e")])
    assert "batch_tokens must be a positive int, got 0" in capsys.readouterr().err
