"""LoRA finetune and eval loss on a tiny random Llama: labels follow is_supervised, training lowers
the loss of the rows it sees, the adapter opens with plain peft, eval_loss compares base and
adapter in one JSON and a table, and bad input gets one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.adapters import apply_adapter, resolve_adapter
from extractors.model import load_model
from extractors.sft_data import IGNORE, load_sft_rows, select_rows_by
from store.core import Store, StoreError
from tests.conftest import ingest_small
from trainers.finetune.eval_loss import main as eval_main
from trainers.finetune.train import FinetuneConfig, run_finetune
from trainers.finetune.train import main as ft_main

SIZES = {"train_base": 12, "attr_query": 3, "eval": 6}


def _ft(store, model, *extra):
    # 6 eval rows, trained on by the SQL: a few steps must lower their own loss.
    return ft_main(
        [
            "--store",
            str(store),
            "--model",
            model,
            "--no-progress",
            "--batch-size",
            "3",
            "--lr",
            "1e-2",
            "--lora-dropout",
            "0",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A store of 21 rows and an adapter trained (3 epochs) on its eval rows, evaluated on them."""
    store = tmp_path_factory.mktemp("ft") / "store"
    ingest_small(store, SIZES, model=tiny_model)
    assert (
        _ft(
            store,
            tiny_model,
            "--train-rows-sql",
            "SELECT row_id FROM split_members WHERE split = 'eval'",
            "--epochs",
            "3",
        )
        == 0
    )
    return store


def _layout(store):
    from store.catalog.tokens import read_layout, tokenizations

    return read_layout(Store(store), tokenizations(Store(store))[0]["tokenization"])


def test_labels_are_exactly_the_supervised_tokens(trained):
    st = Store(trained)
    rows = select_rows_by(st, split="all")
    data = load_sft_rows(st, _layout(trained).tokenization, rows)
    tok = st.query(
        "SELECT row_id, token_pos, token_id, role, is_supervised FROM tokens ORDER BY row_id, token_pos"
    ).to_pydict()
    by_row: dict[str, list] = {}
    for r, tid, role, sup in zip(tok["row_id"], tok["token_id"], tok["role"], tok["is_supervised"], strict=False):
        by_row.setdefault(r, []).append((tid, role, sup))
    for r, ids, labels in zip(data.row_ids, data.input_ids, data.labels, strict=False):
        assert ids == [t[0] for t in by_row[r]]
        assert labels == [t[0] if t[2] else IGNORE for t in by_row[r]]
        roles = {t[1] for t in by_row[r] if t[2]}
        assert roles <= {"assistant", "special"}, roles  # prompt/template tokens never supervised
        assert any(t[2] for t in by_row[r]) and not all(t[2] for t in by_row[r])
    # Each row's supervised span is one contiguous block ending the last assistant message.
    assert all(np.all(np.diff(np.flatnonzero(np.array(lab) != IGNORE)) == 1) for lab in data.labels)


def test_training_lowers_the_loss_of_its_rows_and_records_everything(trained):
    st = Store(trained)
    rec = st.query("SELECT * FROM adapters").to_pylist()
    assert len(rec) == 1 and rec[0]["train_rows_sql"] and rec[0]["n_train_rows"] == SIZES["eval"]
    run_dir = Path(rec[0]["path"]).parent
    m = json.loads((run_dir / "train_metrics.json").read_text())
    assert [e["epoch"] for e in m["eval"]] == [0, 1, 2, 3]
    assert m["eval"][-1]["loss"] < m["eval"][0]["loss"] - 0.05, m["eval"]
    assert len(m["train"]) == 6 and all(np.isfinite(s["loss"]) for s in m["train"])
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    run = st.query("SELECT kind, status, model_hash FROM runs WHERE run_id = ?", [rec[0]["run_id"]]).to_pylist()
    assert run == [{"kind": "finetune", "status": "finished", "model_hash": rec[0]["base_hash"]}]


def test_adapter_opens_with_plain_peft_and_matches_apply_adapter(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve_adapter(Store(trained), "latest")
    folder = ref.path
    assert resolve_adapter(Store(trained), folder) == ref  # its folder names the same registered adapter
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder).eval()
    AutoTokenizer.from_pretrained(folder)  # the tokenizer is saved beside it
    ours = apply_adapter(load_model(tiny_model, "cpu"), "latest", Store(trained))
    assert "+adapter:" in ours.model_id and ours.model_hash.startswith(load_model(tiny_model, "cpu").model_hash)
    x = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        a, b = plain(x).logits, ours.model(x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(x).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base)  # the adapter changes the model


def test_eval_loss_base_vs_adapter_in_one_json_and_table(trained, tiny_model, capsys):
    args = ["--store", str(trained), "--model", tiny_model, "--split", "eval", "--no-progress"]
    assert eval_main(args) == 0
    assert eval_main([*args, "--adapter", "latest"]) == 0
    st = Store(trained)
    doc = json.loads((st.root / "runs" / "eval_loss-eval" / "eval_loss_compare.json").read_text())
    for e in (doc["base"], doc["adapter"]):
        for k in ("mean_loss", "perplexity", "supervised_token_count", "num_eval_rows", "model_id", "model_hash"):
            assert e[k] is not None, k
        assert e["supervised_token_count"] > 0 and e["num_eval_rows"] == SIZES["eval"]
        assert e["perplexity"] == pytest.approx(np.exp(e["mean_loss"]))
    assert doc["delta_loss"] < 0 and doc["delta_ppl"] < 0
    assert doc["delta_loss"] == pytest.approx(doc["adapter"]["mean_loss"] - doc["base"]["mean_loss"])
    t = st.query(
        "SELECT adapter, sum(n_tokens) AS n, sum(loss_sum) / sum(n_tokens) AS loss, count(*) AS rows "
        "FROM eval_losses GROUP BY adapter ORDER BY adapter NULLS FIRST"
    ).to_pylist()
    assert [r["rows"] for r in t] == [SIZES["eval"]] * 2 and t[0]["adapter"] is None
    assert t[0]["loss"] == pytest.approx(doc["base"]["mean_loss"]) and t[1]["loss"] == pytest.approx(
        doc["adapter"]["mean_loss"]
    )
    assert "delta_loss" in capsys.readouterr().out


def test_resume_continues_an_adapter_and_truncation_is_counted(trained, tiny_model, copy_store):
    store = copy_store(trained)
    first = select_rows_by(Store(store), split="train_base", max_rows=3)
    cut = min(len(x) for x in load_sft_rows(Store(store), _layout(store).tokenization, first).input_ids) - 2
    res = run_finetune(
        FinetuneConfig(
            store=str(store),
            model=tiny_model,
            resume_adapter="latest",
            max_rows=3,
            eval_split="",
            batch_size=3,
            max_length=cut,
            on_long="truncate",
            progress=False,
        )
    )
    rows = {r["adapter"]: r for r in Store(store).query("SELECT * FROM adapters").to_pylist()}
    assert rows[res.adapter]["resumed_from"] in rows and res.metrics["steps"] == 1
    counts = json.loads(
        Store(store).query("SELECT counts FROM runs WHERE run_id = ?", [res.run_id]).column(0)[0].as_py()
    )
    assert counts["truncated_rows"] == 3


def test_bad_input_gets_one_clear_error(trained, tiny_model, tmp_path, capsys):
    assert _ft(trained, tiny_model, "--max-length", "10", "--max-rows", "2") == 2
    assert "longer than --max-length 10" in capsys.readouterr().err
    assert _ft(trained, tiny_model, "--split", "nope") == 2
    assert "--split 'nope' has no rows" in capsys.readouterr().err
    assert _ft(trained, tiny_model, "--resume-adapter", "nope") == 2
    assert "adapters in this store: " in capsys.readouterr().err
    assert _ft(trained, tiny_model, "--train-rows-sql", "SELECT 'x' AS row_id") == 2
    assert "not ingested" in capsys.readouterr().err
    assert (
        eval_main(
            [
                "--store",
                str(trained),
                "--model",
                tiny_model,
                "--split",
                "attr_query",
                "--rows-sql",
                "SELECT row_id FROM rows WHERE false",
            ]
        )
        == 2
    )
    assert "selects no rows" in capsys.readouterr().err
    # An adapter trained on another base model (another hash) is refused, naming both.
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.nn.init.normal_(m.lm_head.weight)
    m.save_pretrained(other)
    for f in Path(tiny_model).iterdir():
        if not (other / f.name).exists():
            (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(StoreError, match=r"was trained on .*but the loaded model is .*pass --model"):
        apply_adapter(load_model(str(other), "cpu"), "latest", Store(trained))


def test_help_documents_every_option(capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        ft_main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(FinetuneConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert f.metadata.get("help")


def test_bench_finetune_runs_both_loops(tiny_model, tmp_path):
    from bench.finetune import BenchFinetuneConfig, run_bench

    out = run_bench(BenchFinetuneConfig(model=tiny_model, rows=4, batch_size=2, out=str(tmp_path / "ft.json")))
    saved = json.loads((tmp_path / "ft.json").read_text())
    assert saved["summary"]["ours_vs_trainer"] == pytest.approx(out["summary"]["ours_vs_trainer"])
    assert out["summary"]["ours_vs_trainer"] > 0
    assert saved["ours"]["steps"] == saved["trainer"]["steps"] == 2 and saved["tokens"] > 0
