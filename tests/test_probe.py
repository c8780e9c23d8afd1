"""Probes read from the store (trainers.probe): real SmolLM2 activations of the embedded sample.

The needle probe trains on `real_store` (120 train_base rows, 20 eval rows, layers 6 and 17
of the real model) and must find the needle far above chance; runs are deterministic to
the bit on CPU; class_balance modes behave as documented; outputs, run record and the
scores written back are checked; bad configs fail naming the key.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from store.core import STORE_VERSION, Store, StoreError
from trainers.probes.config import ProbeConfig, load_config
from trainers.probes.probe import main, run_probe

# Small but real: 2 L2 values, 30 epochs; the embedded default trains 4 values x 60 epochs x 3 seeds.
FAST = ["--l2-grid", "0.001", "0.01", "--num-epochs", "30", "--no-progress"]


@pytest.fixture(scope="module")
def probe_store(real_store, copy_store):
    """A private writable copy of the real-model store, shared by this module's runs."""
    return copy_store(real_store)


@pytest.fixture(scope="module")
def needle_run(probe_store):
    cfg = load_config(["--store", str(probe_store), "--layers", "6", "17", "--train-seeds", "0", "1", *FAST])
    return run_probe(cfg)


def _weights(out_dir, layer, seed):
    return load_file(str(out_dir / f"probe_layer_{layer}_seed_{seed}.safetensors"))


def _metrics(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_needle_probe_finds_the_needle_from_real_activations(needle_run, probe_store):
    store = Store(probe_store)
    arrays = {r["name"]: r["model"] for r in store.query("SELECT name, model FROM arrays").to_pylist()}
    assert "SmolLM2-135M-Instruct" in arrays["hidden/layer_17"]  # the real model's activations
    by = needle_run.metrics["by_layer"]
    # Middle layer 17 of 30: measured 0.99+ on the 20 eval rows; chance is 0.5.
    assert by["17"]["val_auroc_mean"] > 0.95, by
    assert by["6"]["val_auroc_mean"] > 0.85, by
    sel = [r for r in needle_run.rows if r["selected"] and r["layer"] == 17]
    assert all(r["n_val_pos"] >= 20 and r["n_val"] > 3 * r["n_val_pos"] for r in sel)


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_outputs_metadata_csv_and_plot(needle_run):
    out = needle_run.out_dir
    rows = list(csv.DictReader(open(out / "probe_metrics.csv")))
    assert len(rows) == 2 * 2 * 2  # layers x seeds x l2
    for L in ("6", "17"):
        for s in ("0", "1"):
            grp = [r for r in rows if r["layer"] == L and r["seed"] == s]
            assert [r["selected"] for r in grp].count("true") == 1
            best = max(grp, key=lambda r: float(r["val_auroc"]))
            assert best["selected"] == "true"
    meta = json.loads((out / "probe_layer_17_seed_0.json").read_text())
    assert meta["selected_l2"] in (0.001, 0.01)
    assert set(meta["val_metrics"]) >= {"auroc", "auprc", "accuracy_best"}
    assert meta["train_stats"]["n_pos"] > 0 and meta["val_stats"]["n_docs"] == 20
    assert "needle_start" in meta["view_sql"] and meta["store_version"] == STORE_VERSION
    assert "negatives = up to 20 label-0 tokens per document" in meta["token_rule"]
    w = _weights(out, 17, 0)
    assert w["coef"].shape == (576,) and w["mean"].shape == (576,)
    # the raw-space weights give the same logits as the standardized ones
    x = torch.randn(4, 576) * 5
    z = (x - w["mean"]) / w["std"]
    torch.testing.assert_close(x @ w["coef_raw"] + w["bias_raw"], z @ w["coef"] + w["bias"], rtol=1e-4, atol=1e-3)
    assert (out / "probe_auroc_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_run_record_names_view_and_store_version(needle_run, probe_store):
    rec = Store(probe_store).query("SELECT * FROM runs WHERE run_id = ?", [needle_run.run_id]).to_pylist()[0]
    assert rec["kind"] == "probe" and rec["status"] == "finished"
    assert rec["store_version"] == STORE_VERSION and sorted(rec["layers"]) == [6, 17]
    config = json.loads(rec["config"])
    assert config["view"] == "needle_tokens" and "needle_end" in config["view_sql"]
    assert "view needle_tokens" in rec["note"]
    assert json.loads(rec["metrics"])["best_layer"] in (6, 17)


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_scores_back_in_the_store_and_document_monitor(needle_run, probe_store):
    from store.materialize import materialize

    store = Store(probe_store)
    top = store.query(
        "SELECT s.label, t.token_text FROM probe_token_scores s JOIN tokens t USING (row_id, token_pos) "
        "WHERE s.run_id = ? AND s.layer = 17 AND s.split = 'eval' ORDER BY s.probe_logit DESC LIMIT 20",
        [needle_run.run_id],
    ).to_pylist()
    assert sum(r["label"] for r in top) >= 18, top  # what the probe fires on: needles
    mon = needle_run.metrics["monitor"]["17"]
    assert mon["n_docs"] == 20 and mon["n_pos_docs"] >= 3
    assert mon["max_logit"]["auroc"] > 0.9 and mon["topk_mean_logit"]["auroc"] > 0.9
    docs = store.query(
        "SELECT * FROM probe_doc_scores WHERE run_id = ? AND layer = 17", [needle_run.run_id]
    ).to_pylist()
    assert len(docs) == 160 and all(d["max_logit"] >= d["topk_mean_logit"] >= d["mean_logit"] - 1e-4 for d in docs)
    # the same logits as a Zarr array over the token layout
    m = materialize(store, "SELECT * FROM needle_tokens WHERE split = 'eval'", array="probe/needle_tokens/layer_17")
    tbl = store.query(
        "SELECT row_id, token_pos, probe_logit FROM probe_token_scores WHERE run_id = ? AND layer = 17 "
        "AND split = 'eval'",
        [needle_run.run_id],
    ).to_pylist()
    want = {(r["row_id"], r["token_pos"]): r["probe_logit"] for r in tbl}
    got = dict(
        zip(zip(m.frame["row_id"].to_list(), m.frame["token_pos"].to_list(), strict=False), m.X.tolist(), strict=False)
    )
    assert got == pytest.approx(want)


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_deterministic_bit_identical_on_cpu(needle_run, probe_store, tmp_path):
    args = [
        "--store",
        str(probe_store),
        "--layers",
        "17",
        "--train-seeds",
        "0",
        "1",
        "--device",
        "cpu",
        "--no-write-scores",
        *FAST,
    ]
    a = run_probe(load_config(args + ["--output-dir", str(tmp_path / "a")]))
    b = run_probe(load_config(args + ["--output-dir", str(tmp_path / "b")]))
    assert a.run_id != b.run_id and _metrics(a.rows) == _metrics(b.rows)
    for seed in (0, 1):
        wa, wb = _weights(a.out_dir, 17, seed), _weights(b.out_dir, 17, seed)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        # a layer's fits do not depend on which other layers are in the run
        assert torch.equal(wa["coef"], _weights(needle_run.out_dir, 17, seed)["coef"])
    assert not torch.equal(_weights(a.out_dir, 17, 0)["coef"], _weights(a.out_dir, 17, 1)["coef"])


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_class_balance_modes_differ_as_documented(probe_store, tmp_path):
    args = ["--store", str(probe_store), "--layers", "17", "--train-seeds", "0", "--no-write-scores", *FAST]
    runs = {
        mode: run_probe(load_config(args + ["--class-balance", mode, "--output-dir", str(tmp_path / mode)]))
        for mode in ("weighted", "downsample")
    }
    meta = {m: json.loads((r.out_dir / "probe_layer_17_seed_0.json").read_text()) for m, r in runs.items()}
    w, d = meta["weighted"]["train_stats"], meta["downsample"]["train_stats"]
    # weighted: every sampled token, each class half of the loss; downsample: balanced counts, unweighted
    assert w["n_neg"] > 2 * w["n_pos"] and w["class_weights"]["pos"] > 1 > w["class_weights"]["neg"]
    assert w["class_weights"]["pos"] * w["n_pos"] == pytest.approx(w["class_weights"]["neg"] * w["n_neg"])
    assert d["n_pos"] == d["n_neg"] == w["n_pos"] and d["class_weights"] == {"neg": 1.0, "pos": 1.0}
    assert meta["weighted"]["val_stats"] == meta["downsample"]["val_stats"]  # same validation tokens
    assert not torch.equal(
        _weights(runs["weighted"].out_dir, 17, 0)["coef"], _weights(runs["downsample"].out_dir, 17, 0)["coef"]
    )
    assert meta["downsample"]["val_metrics"]["auroc"] > 0.9


@pytest.mark.parametrize(
    "how",
    [
        ["--view", "assistant_tokens", "--pool", "mean", "--row-label", "quality IN ('poor', 'very poor')"],
        ["--view", "row_targets_low_quality", "--pool", "last"],  # the label from a view
    ],
)
@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_row_level_metadata_probe(probe_store, how):
    cfg = load_config(
        [
            "--store",
            str(probe_store),
            "--layers",
            "17",
            "--train-seeds",
            "0",
            "--target",
            "row",
            *how,
            "--val-splits",
            "attr_query",
            "eval",
            *FAST,
            "--l2-grid",
            "0.01",
            "0.1",
            "1.0",
        ]
    )  # 120 examples in 576 dims: stronger L2
    res = run_probe(cfg)
    (row,) = [r for r in res.rows if r["selected"]]
    assert row["n_train"] == 120 and row["n_val"] == 40 and 0 < row["n_val_pos"] < 40
    # measured 0.83 (mean) and 0.85 (last) against chance 0.5: layer-17 states of the answer
    # separate poor answers from good ones
    assert res.metrics["by_layer"]["17"]["val_auroc_mean"] > 0.7, res.metrics["by_layer"]
    scores = (
        Store(probe_store)
        .query("SELECT count(*) AS n, sum(label) AS pos FROM probe_row_scores WHERE run_id = ?", [res.run_id])
        .to_pylist()[0]
    )
    assert scores["n"] == 160 and scores["pos"] == row["n_train_pos"] + row["n_val_pos"]


@pytest.mark.slow  # the real SmolLM2 model (real_store)
def test_missing_layer_says_which_extraction_to_run(real_store):
    before = Store(real_store).query("SELECT count(*) AS n FROM runs").to_pylist()[0]["n"]
    with pytest.raises(StoreError, match=r"python -m extractors\.run --layers 12 --store .*--extract-missing"):
        run_probe(load_config(["--store", str(real_store), "--layers", "6", "12", *FAST]))
    assert Store(real_store).query("SELECT count(*) AS n FROM runs").to_pylist()[0]["n"] == before


def test_extract_missing_runs_the_extractor(tiny_model, tmp_path):
    from extractors.ingest import IngestConfig, run_ingest

    store = tmp_path / "st"
    run_ingest(IngestConfig(store=str(store), model=tiny_model, train_base=24, attr_query=0, eval=12), progress=False)
    res = run_probe(
        load_config(
            [
                "--store",
                str(store),
                "--layers",
                "2",
                "--train-seeds",
                "0",
                "--extract-missing",
                "--model",
                tiny_model,
                "--no-write-scores",
                *FAST,
            ]
        )
    )
    assert Store(store).query("SELECT count(*) AS n FROM arrays WHERE name = 'hidden/layer_2'").to_pylist()[0]["n"] == 1
    assert np.isfinite(res.metrics["by_layer"]["2"]["val_auroc_mean"])


@pytest.mark.parametrize(
    "text, key",
    [
        ("l2_gird: [0.1]\n", "l2_gird"),
        ("negatives_per_doc: -1\n", "negatives_per_doc"),
        ("class_balance: oversample\n", "class_balance"),
        ("l2_grid: []\n", "l2_grid"),
        ("num_epochs: 2.5\n", "num_epochs"),
        ("train_splits: [eval]\n", "val_splits"),
        ("device: tpu\n", "device"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, capsys, text, key):
    path = tmp_path / "probe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{key}"):
        load_config(["--config", str(path)])
    assert main(["--config", str(path)]) == 2
    assert key in capsys.readouterr().err


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("num_epochs: 7\nl2_grid: [1e-3, 0.1]\nlayers_to_probe: [6, 17]\nclass_balance: downsample\n")
    cfg = load_config(["--config", str(path), "--num-epochs", "5"])
    assert (cfg.num_epochs, cfg.l2_grid, cfg.layers, cfg.class_balance) == (
        5,
        [1e-3, 0.1],
        [6, 17],
        "downsample",
    )
    shipped = load_config(["--config", str(Path(__file__).resolve().parent.parent / "configs" / "probe.yaml")])
    assert shipped.layers == [6, 12, 17, 24] and shipped.view == "needle_tokens"
    assert ProbeConfig().view == "needle_tokens"
    # the layers' older spellings: the YAML key above, --layers-to-probe, and --layer
    assert load_config(["--layers-to-probe", "6", "12"]).layers == [6, 12]
    assert load_config(["--layer", "17"]).layers == [17]
