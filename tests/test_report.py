"""`python -m analytics.report`: a failing section exits 1 and names itself, and `--markdown`
prints the results at a glance, each figure with the run id (or benchmark file) it came from.

The store is written by hand (runs and the few tables the figures read), so these run in
a second and need no model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from analytics import glance, report
from store.catalog.runs import Run
from store.core import Store


def _finished(st: Store, kind: str, config: dict, metrics: dict) -> str:
    run = Run(st, kind, config)
    run.finish(metrics=metrics)
    return run.run_id


@pytest.fixture
def results_store(tmp_path) -> tuple[Store, dict[str, str]]:
    """A store holding one finished run of each kind the glance reads (and an older probe run)."""
    st = Store(tmp_path / "store")
    st.write_table("rows", pa.table({"row_id": ["a", "b"], "split": ["train_base", "eval"], "category": ["x", "y"]}))
    ids = {}
    by_layer = lambda a, b: {"6": {"val_auroc_mean": a}, "12": {"val_auroc_mean": b}}  # noqa: E731
    _finished(st, "probe", {"name": "old_probe"}, {"by_layer": by_layer(0.5, 0.5)})
    ids["probe"] = _finished(st, "probe", {"name": "needle_probe"}, {"by_layer": by_layer(0.9981, 0.9996)})
    ids["sae"] = _finished(st, "train_sae", {}, {})
    st.write_rows(
        "saes",
        [
            {
                "sae": ids["sae"],
                "layer": 17,
                "architecture": "topk",
                "d_sae": 2304,
                "k": 32,
                "explained_variance": 0.913,
                "l0": 32.0,
                "run_id": ids["sae"],
            }
        ],
    )
    ids["assoc"] = _finished(st, "feature_correlations", {}, {})
    st.write_table(
        "feature_metadata_assoc",
        pa.table(
            {
                "sae": [ids["sae"]] * 3,
                "layer": [17] * 3,
                "field": ["category"] * 3,
                "level": ["math", "math", "coding"],
                "stat": ["auroc"] * 3,
                "feature": [1, 2, 3],
                "effect": [0.99, 0.7, 0.964],
                "run_id": [ids["assoc"]] * 3,
            }
        ),
    )
    rows = {"split": "eval", "rows_sql": None, "max_rows": 64}
    ids["base"] = _finished(
        st, "eval_loss", {**rows, "adapter": None}, {"mean_loss": 2.6824, "perplexity": 14.62, "num_eval_rows": 64}
    )
    _finished(  # an adapter on other rows: not paired with the base run
        st,
        "eval_loss",
        {**rows, "max_rows": 8, "adapter": "x"},
        {"mean_loss": 1.0, "perplexity": 2.7, "num_eval_rows": 8},
    )
    ids["adapter"] = _finished(
        st, "eval_loss", {**rows, "adapter": "ft1"}, {"mean_loss": 2.559, "perplexity": 12.92, "num_eval_rows": 64}
    )
    ids["predictor"] = _finished(
        st,
        "sae_predictor",
        {"layer": 17},
        {"sae": {"spearman": 0.69}, "reward_model": {"spearman": -0.07}, "metadata": {"spearman": 0.44}},
    )
    doc = st.run_dir(ids["predictor"]) / "predictor_metrics.json"
    doc.write_text(json.dumps({"metrics": {"sae": {"spearman_ci": [0.58, 0.78]}}}))
    ids["selection"] = _finished(
        st,
        "select_experiment",
        {},
        {"pooled_eval_loss_difference": {"top_minus_matched_random": [0.0049, -0.0002, 0.01, 0.045, 100, 3]}},
    )
    st.refresh_catalog()
    return st, ids


def test_markdown_names_every_figure_with_its_run_id(results_store, tmp_path, capsys):
    st, ids = results_store
    bench = tmp_path / "attribution.json"
    bench.write_text(
        json.dumps(
            {
                "benchmark": "attribution",
                "bench": "bench_attribution-20261201-120000",
                "pool_rows": 64,
                "query_rows": 16,
                "summary": {"ours_vs_bergson_cli": 8.71, "max_relative_score_difference": 3e-7},
            }
        )
    )
    assert report.main(["--markdown", "--store", str(st.root), "--bench", str(bench)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == glance.GLANCE_BEGIN and out[-1] == glance.GLANCE_END
    assert f"--markdown --store {st.root} --bench {bench}" in out[1]
    lines = {ln.split("**")[1]: ln for ln in out if ln.startswith("- **")}
    probe = lines["probe"]
    assert "`needle_probe`" in probe and "AUROC ≥ 0.998" in probe and "best 1.000 at layer 12" in probe
    assert probe.endswith(f"(run `{ids['probe']}`)")
    assert "explains 91.3% of the held-out variance" in lines["SAE"] and ids["sae"] in lines["SAE"]
    assert (
        "each of the 2 categories" in lines["SAE features vs metadata"]
        and "AUROC ≥ 0.96" in lines["SAE features vs metadata"]
    )
    assert ids["assoc"] in lines["SAE features vs metadata"]
    ft = lines["finetune"]
    assert "`ft1`" in ft and "from 2.682 to 2.559" in ft and "14.62 -> 12.92" in ft and "64 eval rows" in ft
    assert f"`{ids['base']}` (base), `{ids['adapter']}` (adapter)" in ft
    pred = lines["SAE -> attribution predictor"]
    assert "Spearman +0.69 [+0.58, +0.78]" in pred and "reward model -0.07" in pred and ids["predictor"] in pred
    sel = lines["selection experiment"]
    assert "+0.0049 [-0.0002, +0.0100]" in sel and "3 seeds" in sel and ids["selection"] in sel
    att = lines["bench.attribution"]
    assert "8.7x bergson's own CLI" in att and f"`{bench}` (`bench_attribution-20261201-120000`)" in att


def test_into_replaces_only_the_generated_block(results_store, tmp_path, capsys):
    st, ids = results_store
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{glance.GLANCE_BEGIN}\nold figures\n{glance.GLANCE_END}\nafter\n")
    assert report.main(["--markdown", "--store", str(st.root), "--into", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n" + glance.GLANCE_BEGIN) and text.endswith(
        glance.GLANCE_END + "\nafter\n"
    )
    assert "old figures" not in text and ids["probe"] in text
    readme.write_text("no block here\n")
    assert report.main(["--markdown", "--store", str(st.root), "--into", str(readme)]) == 2
    assert "has no generated block" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --bench / --into without --markdown: a usage error
        report.main(["--bench", "x.json"])


def test_markdown_of_an_empty_folder_says_so(tmp_path, capsys):
    assert report.main(["--markdown", "--store", str(tmp_path / "none")]) == 0
    assert "no store figures" in capsys.readouterr().out


def test_a_failing_section_exits_1_and_names_it(results_store, tmp_path, monkeypatch, capsys):
    st = Store(tmp_path / "rows_only")
    st.write_table("rows", pa.table({"row_id": ["a"], "split": ["eval"], "category": ["x"]}))

    def broken(store: Store, out: Path) -> str:
        raise KeyError("no such column")

    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS, ("Broken section", broken)])
    assert report.main(["--store", str(st.root)]) == 1
    out, err = capsys.readouterr()
    assert "report: " in out and Path(out.split("report: ")[1].strip()).is_file()  # the others still render
    assert "1 section(s) failed: Broken section (KeyError" in err
    monkeypatch.setattr(glance, "GLANCE", [*glance.GLANCE, lambda store: 1 / 0])
    assert report.main(["--markdown", "--store", str(results_store[0].root)]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_one_probed_layer_and_a_resolved_latest_adapter_are_named(tmp_path, capsys):
    """A probe of one layer says "at layer L"; an eval-loss run of `--adapter latest` names the
    adapter it resolved to (its eval_loss.json), not the word latest."""
    st = Store(tmp_path / "store")
    st.write_table("rows", pa.table({"row_id": ["a"], "split": ["eval"], "category": ["x"]}))
    by_layer = {"17": {"val_auroc_mean": 0.9991}}
    _finished(st, "probe", {"name": "needle_probe"}, {"by_layer": by_layer})
    rows = {"split": "eval", "rows_sql": None, "max_rows": 64}
    _finished(st, "eval_loss", {**rows, "adapter": None}, {"mean_loss": 2.7, "perplexity": 14.9, "num_eval_rows": 64})
    adapter = _finished(
        st, "eval_loss", {**rows, "adapter": "latest"}, {"mean_loss": 2.6, "perplexity": 13.5, "num_eval_rows": 64}
    )
    st.write_json(st.run_folder(adapter) / "eval_loss.json", {"adapter": "finetune-20261202-1"})
    assert report.main(["--markdown", "--store", str(st.root)]) == 0
    out = capsys.readouterr().out
    assert "AUROC ≥ 0.999 at layer 17 (run" in out and "every probed layer" not in out
    assert "the LoRA adapter `finetune-20261202-1` moves eval loss from 2.700 to 2.600" in out
