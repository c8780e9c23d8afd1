"""The whole study as one command (analytics.study) on a tiny random Llama: a config of every step but
LDS runs end to end through the steps' own commands and writes study.md with each figure's run id;
a rerun runs no command (read from the study's state); a bad key, an unknown step and a budget that
differs between experiments are each one error before any model loads; the shipped configs are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from analytics.study.command import main
from analytics.study.config import STEPS, load
from store.core import Store

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = {"sample_train": 40, "sample_test": 12, "train_base": 20, "attr_query": 2, "eval": 4}


def tiny_config(store: Path, model: str) -> dict:
    return {
        "name": "tiny",
        "store": str(store),
        "model": model,
        "device": "cpu",
        "progress": False,
        "steps": [s for s in STEPS if s != "lds"],
        "ingest": SAMPLE,
        "finetune": {"eval_split": "", "max_steps": 1, "batch_size": 4, "lr": 1e-2, "lora_r": 4},
        "eval_loss": {"base": {"split": "eval"}, "adapter": {"split": "eval", "adapter": "finetune"}},
        "attribution": {
            "mean": {"adapter": "finetune", "score_mode": "mean", "preconditioning": "none", "projection_dim": 8}
        },
        "subsets": {"source": "attribution:mean", "k": 4, "overlap": "allow"},
        "hidden": {"layers": [2]},
        "sae": {"layers": [2], "steps": 10, "batch_tokens": 256, "d_sae": 64, "k": 4, "ce_rows": 0},
        "codes": {"layers": [2], "sae": "latest"},
        "predictor": {"sae": "latest", "attribution": "mean", "bootstrap": 50},
        "experiment": {
            "budget": {"seeds": 1, "max_steps": 1, "batch_size": 2, "lr": 1e-2},
            "runs": {
                "k4": {
                    "selector": "attribution:mean",
                    "k": 4,
                    "overlap": "allow",
                    "max_new_tokens": 4,
                    "n_boot": 100,
                    "n_perm": 100,
                },
            },
        },
    }


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("study")
    path = _write(d / "study.yaml", tiny_config(d / "store", tiny_model))
    assert main([path]) == 0
    return path, load(path)


def test_the_study_runs_end_to_end_and_reports_every_figure_with_its_run(study):
    path, cfg = study
    st = Store(cfg.store)
    sdir = st.run_dir(cfg.study_id())
    state = json.loads((sdir / "state.json").read_text())
    keys = state["last_invocation"]["ran"][:-1]
    assert set(keys) == set(state["commands"]) and keys == [
        "ingest/ingest",
        "finetune/finetune",
        "eval_loss/base",
        "eval_loss/adapter",
        "attribution/mean",
        "subsets/subsets",
        "hidden/hidden",
        "sae/sae",
        "codes/codes",
        "predictor/predictor",
        "experiment/k4",
    ]
    assert state["last_invocation"]["ran"][-1] == "report/report"
    cmds = state["commands"]
    adapter = cmds["finetune/finetune"]["result"]
    assert adapter in st.query("SELECT adapter FROM adapters").column(0).to_pylist()
    # References became the earlier steps' results: the adapter and the attribution run's id.
    attr = cmds["attribution/mean"]["result"]
    assert cmds["attribution/mean"]["argv"][cmds["attribution/mean"]["argv"].index("--adapter") + 1] == adapter
    assert f"attribution:{attr}" in cmds["experiment/k4"]["argv"]
    assert st.query("SELECT count(*) FROM attribution_scores WHERE run_id = ?", [attr]).column(0)[0].as_py() > 0
    exp = cmds["experiment/k4"]["result"]
    res = json.loads((st.run_dir(exp) / "select_experiment.json").read_text())
    md = (sdir / "study.md").read_text()
    c = res["comparisons"]["top_vs_matched_random"]["eval_loss"]["pooled"]
    assert f"{c['estimate']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" in md and f"`{exp}`" in md
    doc = json.loads((sdir / "study.json").read_text())
    ev = doc["eval_loss"]["eval_loss/base"]
    loss = st.query("SELECT sum(loss_sum) / sum(n_tokens) FROM eval_losses WHERE run_id = ?", [ev["run_id"]]).column(0)[
        0
    ]
    assert ev["loss"] == pytest.approx(loss.as_py()) and f"{ev['loss']:.4f} over 4 rows (`{ev['run_id']}`)" in md
    assert (sdir / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_runs_no_step(study, capsys):
    path, cfg = study
    n_runs = Store(cfg.store).query("SELECT count(*) FROM runs").column(0)[0].as_py()
    assert main([path]) == 0
    state = json.loads((Store(cfg.store).run_dir(cfg.study_id()) / "state.json").read_text())
    assert state["last_invocation"]["ran"] == []
    assert len(state["last_invocation"]["skipped"]) == len(state["commands"]) + 1  # + the report
    assert Store(cfg.store).query("SELECT count(*) FROM runs").column(0)[0].as_py() == n_runs


@pytest.mark.parametrize(
    "edit, msg",
    [
        (lambda c: c.update(stepz=[]), "unknown key 'stepz'; a study config knows "),
        (lambda c: c.update(steps=["ingest", "finetun"]), "unknown step 'finetun'; the steps are ingest, finetune"),
        (lambda c: c["finetune"].update(epochz=2), "step finetune (finetune) has no key 'epochz'"),
        (
            lambda c: c["experiment"]["runs"]["k4"].update(max_steps=3),
            "experiment 'k4' sets its own max_steps (3): a budget that differs between arms",
        ),
        (lambda c: c["sae"].update(model="x"), "step sae sets 'model'; set it once, at the top"),
    ],
)
def test_bad_config_is_one_error_before_any_model_loads(tmp_path, capsys, edit, msg):
    cfg = tiny_config(tmp_path / "store", "/nonexistent-model")
    edit(cfg)
    assert main([_write(tmp_path / "bad.yaml", cfg)]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing ran


@pytest.mark.parametrize("name", ["study_cpu", "study_control", "study_gpu"])
def test_shipped_configs_are_valid(name, capsys):
    assert main([str(ROOT / "configs" / f"{name}.yaml"), "--check"]) == 0
    assert "valid study config" in capsys.readouterr().out


def test_the_kept_tables_pick_their_experiments(tmp_path):
    """The four tables our users kept, filtered from made-up experiment results: k 30 and 50 (mean,
    exclude), mean vs nearest at 50, overlap allowed vs excluded at 50, and the rank-window ablation."""
    from types import SimpleNamespace

    from analytics.study.config import StudyConfig
    from analytics.study.report import experiment_rows, kept_tables

    st = Store(tmp_path / "store")
    e = {"estimate": -0.01, "ci_low": -0.02, "ci_high": 0.0, "p_value": 0.04}
    cmp = {"eval_loss": {"a_mean": 2.0, "b_mean": 2.01, "pooled": e}, "downstream": None}
    attr = {"mean": "attribution-m", "nearest": "attribution-n"}
    runs = {
        "k30": ("mean", 30, "exclude", "none"),
        "k50": ("mean", 50, "exclude", "none"),
        "nearest_k50": ("nearest", 50, "exclude", "none"),
        "allow_k50": ("mean", 50, "allow", "none"),
        "ranks_k50": ("mean", 50, "exclude", "scale"),
    }
    commands = {f"attribution/{k}": {"step": "attribution", "result": v} for k, v in attr.items()}
    for name, (scoring, k, overlap, ablation) in runs.items():
        run_id = f"select-{name}"
        comps = (
            {"top30_vs_top50": cmp, "ranks31-50_vs_random20_from_51-": cmp}
            if ablation == "scale"
            else {"top_vs_matched_random": cmp}
        )
        doc = {
            "run_id": run_id,
            "selector": f"attribution:{attr[scoring]}",
            "k": k,
            "ablation": ablation,
            "seeds": 2,
            "budget": {"steps": 8},
            "base": {"eval_loss": [2.1]},
            "comparisons": comps,
        }
        st.run_dir(run_id).mkdir(parents=True, exist_ok=True)  # run_dir may create it
        (st.run_dir(run_id) / "select_experiment.json").write_text(json.dumps(doc))
        argv = ["--no-progress", "--k", str(k), "--overlap", overlap]
        commands[f"experiment/{name}"] = {"step": "experiment", "result": run_id, "argv": argv}
    cfg = StudyConfig(attribution={"mean": {}, "nearest": {}})
    study = SimpleNamespace(store=st, cfg=cfg, state={"commands": commands})
    rows = experiment_rows(study)
    assert len(rows) == 6 and {r["scoring"] for r in rows} == {"mean", "nearest"}
    md = "\n".join(kept_tables(study, rows))
    names = {}
    for table in md.split("### ")[1:]:
        lines = table.splitlines()
        names[lines[0]] = {r.split(" | ")[0][2:] for r in lines if r.startswith("| ") and "run id" not in r}
    assert names["Base vs top vs random"] == {"k30", "k50"}
    assert names["Mean vs nearest scoring"] == {"k50", "nearest_k50"}
    assert names["Overlap allowed vs excluded"] == {"k50", "allow_k50"}
    assert names["Rank window vs random from lower ranks"] == {"ranks_k50"}
    assert "-0.0100 [-0.0200, +0.0000] p=0.04" in md and "`select-ranks_k50`" in md
