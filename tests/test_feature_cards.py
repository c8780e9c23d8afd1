"""analytics.feature_cards on the tiny store of tests/test_label_features.py (a random 4-layer
model's layer 2, the random tiny SAE's codes) with made-up feature_metadata_assoc,
feature_importance and attribution_scores tables: every statistic against a plain per-feature
reference read straight from the zarr arrays and the tokens table, the logit effects against
W_dec @ W_U^T from the checkpoints, the joins, resume per batch, the no-op rerun, the newest
card replacing older ones, --export-delphi and the bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import load_file
from scipy import stats

from analytics.correlations import SCHEMA as ASSOC_SCHEMA
from analytics.feature_cards import command, compute, inputs
from analytics.feature_cards.command import CardsConfig, main, run_cards
from analytics.feature_cards.schema import HIST_BINS, SCHEMA, TABLE
from analytics.feature_importance.command import SCHEMA as IMPORTANCE_SCHEMA
from analytics.label_features.command import main as label_main
from extractors.attribution.tables import SCORES_SCHEMA
from extractors.sae.format import code_array_names
from store.arrays import decode, open_array
from store.core import Store
from tests.test_label_features import code_store  # noqa: F401 (the module's store fixture)

TOP_K, CONTEXT, Q, PER_Q = 6, 3, 4, 2
ARGS = ["--top-k", str(TOP_K), "--context", str(CONTEXT), "--quantiles", str(Q), "--per-quantile", str(PER_Q),
        "--batch-features", "50", "--no-progress"]  # fmt: skip


def with_joins(src: Path, dst: Path) -> Path:
    """A copy of the code store with made-up association, importance and attribution tables."""
    shutil.copytree(src, dst)
    s = Store(dst)
    s.refresh_catalog()
    sae = s.query("SELECT sae FROM saes").column(0)[0].as_py()

    def assoc(run, feature, field, level, stat, effect, p):
        return dict(sae=sae, layer=2, feature=feature, field=field, kind="categorical", level=level, stat=stat,
                    effect=effect, p_value=p, q_value=min(1.0, 3 * p), n_pos=5, n_neg=19, mean_pos=None,
                    mean_neg=None, run_id=run)  # fmt: skip

    new, old = "feature_correlations-20261202-000000-bbbbbb", "feature_correlations-20261201-000000-aaaaaa"
    rows = [assoc(new, 7, "category", f"c{i}", "auroc", 0.5 + i / 20, p) for i, p in enumerate([0.3, 1e-4, 0.02,
            0.5, 1e-6, 0.01, 0.2])]  # fmt: skip
    rows += [assoc(new, 7, "quality", None, "spearman", -0.4, 1e-5), assoc(old, 7, "category", "old", "auroc", 1, 0)]
    rows += [assoc(new, 9, "difficulty", "hard", "mi", 0.1, 0.04)]
    s.write_table("feature_metadata_assoc", pa.Table.from_pylist(rows, schema=ASSOC_SCHEMA), part="assoc")

    def imp(run, feature, method, effect):
        return dict(sae=sae, layer=2, feature=feature, metric="completion_loss", method=method, baseline="zero",
                    effect=effect, n_rows=4, run_id=run)  # fmt: skip

    new, old = "feature_importance-20261202-000000-bbbbbb", "feature_importance-20261201-000000-aaaaaa"
    rows = [imp(new, 3, "ap", 0.5), imp(new, 3, "exact", -0.25), imp(new, 4, "ap", 0.125), imp(new, -1, "ap", 9.0)]
    rows += [imp(old, 5, "ap", 1.0)]
    s.write_table("feature_importance", pa.Table.from_pylist(rows, schema=IMPORTANCE_SCHEMA), part="imp")
    row_ids = s.query("SELECT DISTINCT row_id FROM tokens ORDER BY row_id").column(0).to_pylist()
    rank = np.random.default_rng(0).permutation(len(row_ids)) + 1

    def score(run, r, k):
        return dict(run_id=run, row_id=r, score=-float(k) if k else 0.0, rank=k, adapter=None, score_mode="mean",
                    preconditioning="none", projection_dim=16, query_split="q", pool_split="train")  # fmt: skip

    rows = [score("attribution-20261202-000000-cccccc", r, int(k)) for r, k in zip(row_ids, rank, strict=True)]
    rows += [score("attribution-20261203-000000-dddddd", r, None) for r in row_ids]  # newer, but incomplete: no ranks
    s.write_table("attribution_scores", pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), part="scores")
    s.refresh_catalog()
    return dst


@pytest.fixture(scope="module")
def cards(code_store, tmp_path_factory):  # noqa: F811
    """One card run over every feature (128, in 3 batches of 50) on a copy with joins."""
    store = with_joins(code_store, tmp_path_factory.mktemp("cards") / "store")
    res = run_cards(command.parse_config(CardsConfig, ["--store", str(store), *ARGS]))
    return store, res


def table(store: Path, where: str = "") -> dict[int, dict]:
    rows = Store(store).query(f"SELECT * FROM {TABLE} {where} ORDER BY feature").to_pylist()
    return {r["feature"]: r for r in rows}


class Reference:
    """The codes read by hand: the zarr arrays, the tokens table and the SAE's token set."""

    def __init__(self, store: Path):
        s = Store(store)
        self.sae = s.query("SELECT sae FROM saes").column(0)[0].as_py()
        idx_arr, val_arr = (open_array(s, n) for n in code_array_names(self.sae, 2))
        self.idx = np.asarray(idx_arr[:]).astype(np.int64)
        self.val = decode(np.asarray(val_arr[:]), val_arr.attrs["dtype"])
        in_set = set(s.query("SELECT tok_index FROM content_tokens").column(0).to_pylist())
        t = s.query(
            "SELECT row_id, token_pos, tok_index, token_text FROM tokens WHERE tokenization = ? ORDER BY row_id, "
            "token_pos",
            [idx_arr.attrs["tokenization"]],
        ).to_pylist()
        self.tokens = t
        self.in_set = {r["tok_index"] for r in t if r["tok_index"] in in_set}
        self.row = {}
        for r in t:
            self.row.setdefault(r["row_id"], []).append(r)

    def act(self, f: int, tok_index: int) -> float:
        if tok_index not in self.in_set:
            return 0.0
        return float(sum(v for i, v in zip(self.idx[tok_index], self.val[tok_index], strict=True) if i == f and v > 0))

    def firing(self, f: int) -> list[dict]:
        """The feature's firing token-set tokens, strongest first (ties: the lower tok_index)."""
        out = [r | {"a": self.act(f, r["tok_index"])} for r in self.tokens if r["tok_index"] in self.in_set]
        return sorted((r for r in out if r["a"] > 0), key=lambda r: (-r["a"], r["tok_index"]))

    def context(self, f: int, r: dict) -> dict:
        row = self.row[r["row_id"]]
        win = [x for x in row if abs(x["token_pos"] - r["token_pos"]) <= CONTEXT]
        return {
            "row_id": r["row_id"],
            "token_pos": r["token_pos"],
            "tokens": [x["token_text"] for x in win],
            "acts": [self.act(f, x["tok_index"]) for x in win],
            "center": [x["token_pos"] for x in win].index(r["token_pos"]),
        }


def same_context(got: dict, want: dict) -> None:
    assert {k: got[k] for k in ("row_id", "token_pos", "tokens", "center")} == {
        k: want[k] for k in ("row_id", "token_pos", "tokens", "center")
    }
    assert got["acts"] == pytest.approx(want["acts"], rel=1e-6) and got["act"] == pytest.approx(
        want["acts"][want["center"]], rel=1e-6
    )


def test_every_statistic_is_the_per_feature_reference(cards):
    store, res = cards
    got = table(store)
    ref = Reference(store)
    assert sorted(got) == list(range(128)) and res.batches == 3 and res.computed == 3
    n_tokens = len(ref.in_set)
    for f in range(128):
        card, firing = got[f], ref.firing(f)
        n = len(firing)
        assert card["n_tokens"] == n_tokens and card["n_firing"] == n
        assert card["density"] == pytest.approx(n / n_tokens)
        if not n:
            assert card["max_act"] is None and card["top_contexts"] == [] and card["hist_counts"] == []
            continue
        acts = np.array([r["a"] for r in firing])
        assert card["max_act"] == pytest.approx(acts.max(), rel=1e-6)
        assert card["mean_act"] == pytest.approx(acts.mean(), rel=1e-6)
        # top contexts: the TOP_K strongest firing tokens, strongest first
        assert len(card["top_contexts"]) == min(TOP_K, n)
        for c, r in zip(card["top_contexts"], firing, strict=False):
            same_context(c, ref.context(f, r))
        # quantiles: ascending order split into Q equal-count bins, PER_Q evenly spaced samples each
        asc = firing[::-1]
        want = []
        for q in range(Q, 0, -1):
            lo, hi = (q - 1) * n // Q, q * n // Q
            s = min(PER_Q, hi - lo)
            want += [(q, asc[lo + (2 * j + 1) * (hi - lo) // (2 * s)]) for j in reversed(range(s))]
        assert [x["quantile"] for x in card["quantiles"]] == [q for q, _ in want]
        for c, (_, r) in zip(card["quantiles"], want, strict=True):
            same_context(c, ref.context(f, r))
        # the histogram: np.histogram of the firing activations over [0, max]
        counts, edges = np.histogram(acts, bins=HIST_BINS, range=(0.0, float(acts.max())))
        assert card["hist_counts"] == counts.tolist() and card["hist_edges"] == pytest.approx(edges.tolist())
    assert len([f for f in got if got[f]["n_firing"]]) == res.summary["firing_features"]
    assert Path(res.plot).stat().st_size > 0
    assert Store(store).query(f"SELECT * FROM {TABLE}").schema.names == SCHEMA.names


def test_logit_effects_are_w_dec_times_w_u(cards, sae_dir, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _ = cards
    got = table(store)
    W_dec = torch.from_numpy(load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]).double()
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    W_U = lm.lm_head.weight.detach().double() * lm.model.norm.weight.detach().double()[None, :]
    eff = W_dec @ W_U.T
    for f in (0, 17, 127):
        top = eff[f].topk(10)
        bot = eff[f].topk(10, largest=False)
        assert got[f]["logit_top_tokens"] == [tok.decode([int(i)]) for i in top.indices]
        assert got[f]["logit_top_values"] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        assert got[f]["logit_bottom_tokens"] == [tok.decode([int(i)]) for i in bot.indices]
        assert got[f]["logit_bottom_values"] == pytest.approx(bot.values.tolist(), rel=1e-4, abs=1e-6)


def test_the_final_norm_scale_is_folded_into_w_u(cards, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, res = cards
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    g = torch.rand(lm.config.hidden_size) + 0.5
    lm.model.norm.weight.data = g.clone()
    lm.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "m")
    un = inputs.unembedding(Store(store), res.sae, str(tmp_path / "m"), "cpu", None)
    assert torch.allclose(un.W_U, lm.lm_head.weight.detach() * g[None, :])
    fid, fval, _, _ = compute.logit_effects(un.W_dec, un.W_U, np.array([3]), 5)
    assert fval[0] == pytest.approx((un.W_dec[3] @ un.W_U.T).topk(5).values.numpy())


def test_joins_take_the_newest_runs(cards):
    store, _ = cards
    got = table(store)
    a7 = got[7]["assoc"]  # the 5 smallest p-values of the newest run, smallest first
    assert [(x["field"], x["level"], x["p_value"]) for x in a7] == [
        ("category", "c4", 1e-6),
        ("quality", None, 1e-5),
        ("category", "c1", 1e-4),
        ("category", "c5", 0.01),
        ("category", "c2", 0.02),
    ]
    assert a7[0]["effect"] == pytest.approx(0.7) and a7[0]["q_value"] == pytest.approx(3e-6)
    assert [x["stat"] for x in got[9]["assoc"]] == ["mi"] and got[8]["assoc"] == []
    assert (got[3]["importance"], got[3]["importance_method"], got[3]["importance_metric"]) == (
        -0.25,
        "exact",
        "completion_loss",
    )  # exact ablation over the estimate
    assert (got[4]["importance"], got[4]["importance_method"]) == (0.125, "ap")
    assert got[5]["importance"] is None and got[5]["importance_method"] is None  # only in the older run
    # attribution: Spearman of the row-mean activation (over the row's token-set tokens) with the rank
    ref = Reference(store)
    s = Store(store)
    ranks = s.query("SELECT row_id, rank FROM attribution_scores WHERE rank IS NOT NULL").to_pylist()
    rank = {r["row_id"]: r["rank"] for r in ranks}
    rows = sorted(ref.row)
    checked = 0
    for f in range(0, 128, 7):
        in_set = {r: [t["tok_index"] for t in ref.row[r] if t["tok_index"] in ref.in_set] for r in rows}
        means = [np.mean([ref.act(f, t) for t in in_set[r]]) for r in rows]
        want = stats.spearmanr(means, [rank[r] for r in rows]).statistic
        if np.isfinite(want):
            assert got[f]["attribution_rho"] == pytest.approx(want, abs=1e-9)
            checked += 1
        else:
            assert got[f]["attribution_rho"] is None
    assert checked >= 10


def test_a_killed_run_resumes_at_its_missing_batches(cards, code_store, tmp_path, monkeypatch):  # noqa: F811
    store0, res0 = cards
    store = with_joins(code_store, tmp_path / "store")
    real = compute.batch_cards
    calls = []

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(compute, "batch_cards", dies_on_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        run_cards(command.parse_config(CardsConfig, ["--store", str(store), *ARGS]))
    parts = sorted(p.name for p in Store(store).table_files(TABLE))
    assert parts == ["b00000.parquet"]  # the first batch was committed, the second was not
    calls.clear()
    monkeypatch.setattr(compute, "batch_cards", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run_cards(command.parse_config(CardsConfig, ["--store", str(store), *ARGS]))
    assert res.run_id == res0.run_id and res.computed == 2 and len(calls) == 2
    assert table(store) == table(store0)  # identical to the uninterrupted run
    assert sorted(p.name for p in (Store(store).run_dir(res.run_id) / "batches").iterdir()) == [
        "b00000.json",
        "b00001.json",
        "b00002.json",
    ]


def test_a_finished_rerun_does_nothing(cards, monkeypatch, capsys):
    store, res = cards
    files = {p: p.stat().st_mtime_ns for p in Store(store).table_files(TABLE)}
    monkeypatch.setattr(command, "token_codes", lambda *a, **k: pytest.fail("the codes were read again"))
    monkeypatch.setattr(inputs, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["--store", str(store), *ARGS]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in Store(store).table_files(TABLE)} == files


def test_a_new_run_replaces_the_older_cards_of_its_features(cards, tmp_path):
    store0, res0 = cards
    store = tmp_path / "store"
    shutil.copytree(store0, store)
    Store(store).refresh_catalog()
    argv = ["--store", str(store), "--top-k", "2", "--features", "3", "40", "--no-progress"]
    res = run_cards(command.parse_config(CardsConfig, argv))
    assert res.features == [3, 40] and res.summary["dropped_older_cards"] == 2
    second = res.run_id
    got = table(store)
    assert sorted(got) == list(range(128))  # one card per feature
    assert {f for f, r in got.items() if r["run_id"] == res.run_id} == {3, 40}
    assert len(got[3]["top_contexts"]) == 2 and len(got[5]["top_contexts"]) == TOP_K
    # --features N: the top N by |importance| (features 3 and 4 have one in the newest run)
    res = run_cards(command.parse_config(CardsConfig, ["--store", str(store), "--features", "2", "--no-progress"]))
    assert res.features == [3, 4] and res.summary["chosen_by"] == "importance"
    assert sorted(table(store)) == list(range(128))
    # a run whose features cover all of an older run's cards removes that run's part and folder
    folder = next(p.parent for p in Store(store).table_files(TABLE) if p.parent.name == second)
    res = run_cards(command.parse_config(CardsConfig, [*argv[:-1], "--context", "1", "--no-progress"]))
    assert not folder.exists() and sorted(table(store)) == list(range(128))
    assert {f for f, r in table(store).items() if r["run_id"] == res.run_id} == {3, 40}


def test_export_delphi_is_label_features_export(code_store, tmp_path):  # noqa: F811
    base = ["--store", str(code_store), "--delphi-ctx-len", "64", "--delphi-splits", "3"]
    assert main([*base, "--export-delphi", str(tmp_path / "a")]) == 0
    assert label_main([*base, "--export-delphi", str(tmp_path / "b")]) == 0
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert a == b and len(a) == 5  # 3 split files, config.json, export.json
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)


def test_bad_input_is_one_clear_error_before_any_load(cards, code_store, tmp_path, monkeypatch, capsys):  # noqa: F811
    store, _ = cards
    monkeypatch.setattr(inputs, "load_model", lambda *a, **k: pytest.fail("a model loaded on bad input"))
    monkeypatch.setattr(command, "token_codes", lambda *a, **k: pytest.fail("codes read on bad input"))
    base = ["--store", str(store), "--no-progress"]

    def err(*extra) -> str:
        try:
            code = main([*base, *extra])
        except SystemExit as e:  # a bad option value: argparse's error, exit 2
            code = e.code
        assert code == 2
        return capsys.readouterr().err

    assert "--features 500 is out of range: the SAE has features 0..127" in err("--features", "3", "500")
    assert "--top-k must be >= 1" in err("--top-k", "0")
    assert "is not in the saes table" in err("--sae", "nope")
    assert "pass that model with --model" in err("--model", "embedded")
    nocodes = tmp_path / "nocodes"
    shutil.copytree(code_store, nocodes)
    shutil.rmtree(next((nocodes / "arrays" / "sae").iterdir()))
    Store(nocodes).refresh_catalog()
    assert main(["--store", str(nocodes), "--no-progress"]) == 2
    assert "has no codes at layer 2" in capsys.readouterr().err


def test_the_benchmark_runs_and_agrees_with_the_naive_scan(cards, tmp_path):
    from bench.feature_cards import run as bench

    store, _ = cards
    out = tmp_path / "bench.json"
    argv = ["--store", str(store), "--naive-features", "8", "--out", str(out), "--no-progress"]
    res = bench.run_bench(bench.parse_config(bench.BenchConfig, argv))
    saved = json.loads(out.read_text())
    assert saved["features"] == 128 and saved["seconds"] > 0 and saved["naive"]["features_timed"] == 8
    assert out.with_suffix(".png").stat().st_size > 0 and len(saved["load_before"]) == 3
    assert res["n_tokens"] == len(Reference(store).in_set)
