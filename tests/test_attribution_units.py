"""Attribution in units (extractors.attribution.scores, tables, run_files) on a tiny random Llama with
a LoRA adapter folder: a run that dies after its first unit leaves that unit readable (rank NULL,
complete false) and its query side saved with a checksum; the same command finishes only the
missing units, ending byte-identical to an uninterrupted run; a complete run is not recomputed; a
partial run is refused with other execution settings (each named) and a damaged query side is
refused by its checksum. (SIGKILLs: tests/test_crash.py; two workers on one run: tests/test_claims.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import extractors.attribution.scores as scores_mod
from extractors.attribution.tables import ranks_of
from extractors.pipeline import ExtractConfig, run_extraction
from extractors.run import main as extract_main
from store.core import Store
from tests.conftest import ingest_small

SIZES = {"train_base": 10, "attr_query": 2, "eval": 2}
UNIT_ROWS = 4  # 10 pool rows -> units of 4, 4, 2


def make_adapter(model_dir: str, out: Path) -> Path:
    """A peft LoRA folder on q_proj/v_proj of model_dir, seeded, with lora_B nonzero (so both LoRA
    matrices get gradients): what --adapter PATH takes, named by its weights' hash."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("attr_units")
    ingest_small(root / "store", SIZES, model=tiny_model)
    return root / "store", make_adapter(tiny_model, root / "adapter")


def _cfg(store: Path, model: str, adapter: Path, **kw) -> ExtractConfig:
    opts = {"unit_rows": UNIT_ROWS, "preconditioning": "none", "score_mode": "individual", **kw}
    return ExtractConfig(
        layers=[], kinds=["attribution"], adapter=str(adapter), store=str(store), model=model, progress=False, **opts
    )


def _parts(store: Path, table: str, run_id: str) -> dict[str, bytes]:
    d = Store(store).table_dir(table) / run_id
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.parquet"))}


def test_a_run_that_dies_resumes_its_missing_units_to_the_same_bytes(base, copy_store, tiny_model, monkeypatch, capsys):
    store, adapter = copy_store(base[0]), base[1]
    real_commit, commits = scores_mod.commit_unit, []

    def dies_after_one(*a, **kw):
        if commits:
            raise RuntimeError("killed")
        commits.append(a[3])
        return real_commit(*a, **kw)

    monkeypatch.setattr(scores_mod, "commit_unit", dies_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        run_extraction(_cfg(store, tiny_model, adapter))
    monkeypatch.undo()
    st = Store(store)
    run_id = st.query("SELECT run_id FROM runs WHERE kind = 'attribution'").column(0)[0].as_py()
    partial = st.query("SELECT row_id, rank, complete FROM attribution_scores WHERE run_id = ?", [run_id]).to_pylist()
    assert len(partial) == UNIT_ROWS and all(r["rank"] is None and r["complete"] is False for r in partial)
    pairs = st.query("SELECT count(*) AS n, bool_or(complete) AS c FROM attribution_pairs").to_pylist()[0]
    assert pairs == {"n": UNIT_ROWS * SIZES["attr_query"], "c": False}
    run_dir = st.run_folder(run_id)
    assert (run_dir / "query_side.safetensors").is_file() and (run_dir / "query_side.json").is_file()

    # other execution settings over the partial run: one error naming the setting, before the model loads
    damaged = copy_store(store)
    argv = ["--kinds", "attribution", "--adapter", str(adapter), "--model", tiny_model, "--no-progress"]
    argv += ["--preconditioning", "none", "--score-mode", "individual"]
    capsys.readouterr()
    rc = extract_main([*argv, "--store", str(damaged), "--unit-rows", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and f"attribution run {run_id} is partial" in err and "--unit-rows 4 there, 3 here" in err, err
    # a damaged query side is refused by its checksum, not silently reused or recomputed
    f = Store(damaged).run_folder(run_id) / "query_side.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="does not match the checksum"):
        run_extraction(_cfg(damaged, tiny_model, adapter))

    resumed = run_extraction(_cfg(store, tiny_model, adapter))
    assert resumed.run_id == run_id and resumed.units == 2  # only the two missing units
    clean = copy_store(base[0])
    whole = run_extraction(_cfg(clean, tiny_model, adapter))
    assert whole.run_id == run_id and whole.units == 3
    for table in ("attribution_scores", "attribution_pairs"):
        a, b = _parts(store, table, run_id), _parts(clean, table, run_id)
        assert list(a) == ["u000000.parquet", "u000001.parquet", "u000002.parquet"] and a == b, table
    t = (
        Store(store)
        .query(
            "SELECT row_id, score, rank, complete FROM attribution_scores WHERE run_id = ? ORDER BY row_id", [run_id]
        )
        .to_pydict()
    )
    assert all(t["complete"]) and len(t["row_id"]) == SIZES["train_base"]
    assert np.array_equal(t["rank"], ranks_of(np.array(t["score"])))  # ranks over the whole pool
    # individual: attribution_scores holds the mean over the query rows of attribution_pairs
    p = (
        Store(store)
        .query(
            "SELECT row_id, avg(score) AS s FROM attribution_pairs WHERE run_id = ? GROUP BY row_id ORDER BY row_id",
            [run_id],
        )
        .to_pydict()
    )
    np.testing.assert_allclose(p["s"], t["score"], rtol=1e-12)
    again = run_extraction(_cfg(store, tiny_model, adapter))
    assert again.skipped and again.run_id == run_id
    assert _parts(store, "attribution_scores", run_id) == _parts(clean, "attribution_scores", run_id)
    status = Store(store).query("SELECT status FROM runs WHERE run_id = ?", [run_id]).column(0).to_pylist()
    assert status == ["finished"]


def test_a_setting_that_decides_the_scores_names_another_run(base, copy_store, tiny_model):
    store, adapter = copy_store(base[0]), base[1]
    a = run_extraction(_cfg(store, tiny_model, adapter, score_mode="mean"))
    b = run_extraction(_cfg(store, tiny_model, adapter, score_mode="mean", projection_seed=1))
    assert a.run_id != b.run_id and not b.skipped and a.units == b.units == 3
    st = Store(store)
    for r in (a, b):
        n = st.query("SELECT count(*) FROM attribution_scores WHERE run_id = ? AND complete", [r.run_id])
        assert n.column(0)[0].as_py() == SIZES["train_base"]
    s = pq.read_table(st.table_dir("attribution_scores") / a.run_id).column("score").to_numpy()
    assert np.all(np.isfinite(s)) and np.std(s) > 0
