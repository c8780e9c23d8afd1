"""analytics.feature_importance on a tiny random model and a tiny sae-lens SAE, against plain references:
attribution patching vs a central finite difference, integrated gradients with one step vs attribution
patching (and IG's completeness), the exact ablations of the command vs a hand-written loop over plain
model forwards (zero and mean baselines, a loss and a probe metric), bad input before the model loads;
one slow case on the real model runs the documented three-way SQL join of docs/interpretation.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats as sps

import analytics.feature_importance.command as command
from analytics.feature_importance import attribution as attr
from analytics.feature_importance.inputs import denominator, make_batches, select_rows, tokenization_of
from extractors.chat_tokens import ensure_tokenization
from extractors.model import load_model
from extractors.sae.load import load_local
from store.core import Store
from tests.conftest import ingest_small

LAYER = 1  # of the 4-layer tiny model
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fi_store(tiny_model, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("fi") / "store"
    ingest_small(store, {"train_base": 4, "attr_query": 2, "eval": 4}, model=tiny_model)
    from transformers import AutoTokenizer

    ensure_tokenization(Store(store), AutoTokenizer.from_pretrained(tiny_model), tiny_model, 2048, progress=False)
    return store


@pytest.fixture(scope="module")
def sae(sae_dir):
    """The tiny SAE with a non-zero decoder bias and encoder bias (a fresh one has zeros)."""
    loaded = load_local(sae_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        loaded.sae.b_dec.normal_(0, 0.1)
        loaded.sae.b_enc.normal_(0, 0.1)
    return loaded.sae


@pytest.fixture(scope="module")
def lm64(tiny_model):
    """The tiny model in float64, so that finite differences are exact to ~1e-9."""
    lm = load_model(tiny_model, "cpu", "fp32")
    lm.model.double()
    return lm


def _batches(store: Path, lm, n_rows: int = 3, target: str = "supervised"):
    st = Store(store)
    tok, _ = tokenization_of(st, LAYER)
    rows = select_rows(
        st, tok, view="content_tokens", split="eval", max_rows=n_rows, category=None, supervised=target == "supervised"
    )
    b = make_batches(rows, target=target, batch_tokens=10_000, pad_id=0, device=torch.device("cpu"))
    return rows, b


def _metric_with_hook(model, batches, hook_fn) -> float:
    """Mean completion loss of the batches' rows with a plain forward, the block-LAYER output passed
    through hook_fn(h, site) at the site tokens: the hand reference. The head runs only at the
    positions that predict a supervised token (a full-vocabulary head at every position is most of
    a tiny model's time)."""
    block = model.model.layers[LAYER]
    total, n = 0.0, 0
    for b in batches:
        handle = block.register_forward_hook(
            lambda m, a, out, b=b: (
                (hook_fn(out[0], b.site), *out[1:]) if isinstance(out, tuple) else hook_fn(out, b.site)
            )
        )
        try:
            with torch.no_grad():
                hidden = model.model(input_ids=b.ids, attention_mask=b.attn).last_hidden_state
        finally:
            handle.remove()
        for r in range(len(b.ids)):
            t = [t for t in range(1, int(b.attn[r].sum())) if b.target[r, t]]  # supervised, after position 0
            lp = torch.log_softmax(model.lm_head(hidden[r, [x - 1 for x in t]]).double(), -1)
            total += float(-lp[torch.arange(len(t)), b.ids[r, t]].sum())
            n += len(t)
    return total / n


def test_attribution_patching_is_the_finite_difference(fi_store, lm64, sae):
    sae64 = type(sae)(sae.cfg)
    sae64.load_state_dict(sae.state_dict())
    sae64 = sae64.double()
    _, batches = _batches(fi_store, lm64, n_rows=2)
    metric = attr.Metric("loss", denominator(batches, "supervised"))
    clean = attr.clean_pass(lm64.model, sae64, LAYER, batches, metric, False)
    base = attr.baselines(sae64, clean, "zero")
    ap = attr.attribution_patching(lm64.model, sae64, LAYER, batches, metric, base, False)
    W = sae64.W_dec.detach()
    eps = 1e-3  # the loss's logits are float32 (extractors.gradnorm.completion_loss): ~1e-6 relative noise
    for i in np.argsort(-np.abs(ap.features))[:2]:

        def scaled(h, site, s, i=i):
            f = sae64.encode(h[site])
            out = h.clone()
            out[site] = h[site] + s * f[:, i : i + 1] * W[i]  # f_i -> (1 + s) f_i
            return out

        fd = (
            _metric_with_hook(lm64.model, batches, lambda h, site: scaled(h, site, eps))
            - _metric_with_hook(lm64.model, batches, lambda h, site: scaled(h, site, -eps))
        ) / (2 * eps)
        assert ap.features[i] == pytest.approx(fd, rel=1e-4, abs=1e-9)
        assert abs(ap.features[i]) > 1e-6  # a feature that matters

    def err_scaled(h, site, s):
        x = h[site]
        out = h.clone()
        out[site] = x + s * (x - sae64.decode(sae64.encode(x)))
        return out

    fd_err = (
        _metric_with_hook(lm64.model, batches, lambda h, site: err_scaled(h, site, eps))
        - _metric_with_hook(lm64.model, batches, lambda h, site: err_scaled(h, site, -eps))
    ) / (2 * eps)
    assert ap.err == pytest.approx(fd_err, rel=5e-4)  # the error node is large: O(eps^2) curvature
    # The spliced clean forward is the plain forward.
    assert clean.value == pytest.approx(_metric_with_hook(lm64.model, batches, lambda h, site: h), rel=1e-6)

    # Integrated gradients: one step is attribution patching; more steps come closer to completeness.
    for baseline in ("zero", "mean"):
        base = attr.baselines(sae64, clean, baseline)
        ap = attr.attribution_patching(lm64.model, sae64, LAYER, batches, metric, base, False)
        ig1 = attr.integrated_gradients(lm64.model, sae64, LAYER, batches, metric, base, 1, False)
        np.testing.assert_allclose(ig1.features, ap.features, rtol=1e-9, atol=1e-12)
        assert ig1.err == pytest.approx(ap.err, rel=1e-9)
        if baseline == "mean":
            total = attr.all_at_baseline(lm64.model, sae64, LAYER, batches, metric, base, clean)
            gaps = []
            for steps in (2, 12):
                ig = attr.integrated_gradients(lm64.model, sae64, LAYER, batches, metric, base, steps, False)
                gaps.append(abs(ig.features.sum() + ig.err - total))
            assert gaps[1] < gaps[0] and gaps[1] < 0.05 * abs(total), (gaps, total)


def _run(store: Path, tiny_model: str, sae_dir: Path, *argv: str) -> int:
    return command.main(
        [
            "--layer",
            str(LAYER),
            "--sae",
            str(sae_dir),
            "--model",
            tiny_model,
            "--store",
            str(store),
            "--max-rows",
            "3",
            "--no-progress",
            *argv,
        ]
    )


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_exact_ablation_is_the_hand_loop(fi_store, copy_store, tiny_model, sae_dir, baseline, capsys):
    store = copy_store(fi_store)
    methods = ["ap", "ig"] if baseline == "zero" else ["ap"]
    assert (
        _run(store, tiny_model, sae_dir, "--method", *methods, "--steps", "3", "--exact", "5", "--baseline", baseline)
        == 0
    )
    out = capsys.readouterr().out
    assert "Spearman" in out
    st = Store(store)
    t = pl.from_arrow(st.query("SELECT * FROM feature_importance"))
    assert set(t["method"]) == {*methods, "exact"} and set(t["baseline"]) == {baseline}
    ex = t.filter(pl.col("method") == "exact")
    assert attr.ERR in ex["feature"].to_list()

    lm = load_model(tiny_model, "cpu", "fp32")
    loaded = load_local(sae_dir)
    s = loaded.sae
    _, batches = _batches(store, lm)
    W = s.W_dec.detach()
    with torch.no_grad():
        sites = []
        for b in batches:
            h = {}
            handle = lm.model.model.layers[LAYER].register_forward_hook(
                lambda m, a, out, h=h: h.setdefault("h", out[0] if isinstance(out, tuple) else out)
            )
            lm.model(input_ids=b.ids, attention_mask=b.attn)
            handle.remove()
            sites.append(h["h"][b.site])
        X = torch.cat(sites)
        F = s.encode(X)
        mu_f = F.double().mean(0).float() if baseline == "mean" else torch.zeros(F.shape[1])
        mu_e = (X - s.decode(F)).double().mean(0).float() if baseline == "mean" else torch.zeros(X.shape[1])
        clean = _metric_with_hook(lm.model, batches, lambda h, site: h)
        for r in ex.iter_rows(named=True):
            i = r["feature"]

            def ablate(h, site, i=i):
                x = h[site]
                f = s.encode(x)
                out = h.clone()
                if i == attr.ERR:
                    out[site] = s.decode(f) + mu_e
                else:
                    out[site] = x + (mu_f[i] - f[:, i : i + 1]) * W[i]
                return out

            want = clean - _metric_with_hook(lm.model, batches, ablate)
            assert r["effect"] == pytest.approx(want, rel=2e-3, abs=2e-6), i
    # The check's Spearman is scipy's over the top 5 by |estimate| of each method.
    checks = pl.from_arrow(st.query("SELECT * FROM feature_importance_checks"))
    exact = dict(zip(ex["feature"], ex["effect"], strict=True))
    for r in checks.iter_rows(named=True):
        est = t.filter((pl.col("method") == r["method"]) & (pl.col("feature") >= 0))
        top = est.sort(pl.col("effect").abs(), descending=True).head(5)
        rho = sps.spearmanr(top["effect"], [exact[f] for f in top["feature"]]).statistic
        assert r["spearman"] == pytest.approx(rho) and r["k"] == 5
        assert r["ci_low"] <= r["spearman"] + 1e-9 and r["ci_high"] >= r["spearman"] - 1e-9
    run = json.loads(st.query("SELECT metrics FROM runs WHERE kind = 'feature_importance'").column(0)[0].as_py())
    assert set(run["checks"]) == set(methods)


def test_probe_metric_and_its_exact_ablation(fi_store, copy_store, tiny_model, sae_dir, tmp_path):
    """probe:<file> at layer 2 (one block above the SAE): the mean probe logit over the site tokens."""
    store = copy_store(fi_store)
    torch.manual_seed(3)
    coef, bias = torch.randn(64), 0.5
    p = tmp_path / "probe_layer_2_seed_0.safetensors"
    save_file({"coef_raw": coef, "bias_raw": torch.tensor([bias])}, str(p))
    p.with_suffix(".json").write_text(json.dumps({"probe": "toy", "layer": 2, "seed": 0, "array": "hidden/layer_2"}))
    assert _run(store, tiny_model, sae_dir, "--metric", f"probe:{p}", "--exact", "3") == 0
    t = pl.from_arrow(Store(store).query("SELECT * FROM feature_importance WHERE method = 'exact'"))
    lm = load_model(tiny_model, "cpu", "fp32")
    s = load_local(sae_dir).sae
    _, batches = _batches(store, lm, target="site")

    def probe_mean(i: int | None) -> float:
        tot, n = 0.0, 0
        for b in batches:
            got = {}

            def abl(m, a, out, b=b):
                h = out[0] if isinstance(out, tuple) else out
                if i is None:
                    return None
                h = h.clone()
                f = s.encode(h[b.site])
                h[b.site] = h[b.site] - f[:, i : i + 1] * s.W_dec[i] if i >= 0 else s.decode(f)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            h1 = lm.model.model.layers[LAYER].register_forward_hook(abl)
            h2 = lm.model.model.layers[2].register_forward_hook(
                lambda m, a, out, got=got: got.setdefault("h", out[0] if isinstance(out, tuple) else out)
            )
            with torch.no_grad():
                lm.model(input_ids=b.ids, attention_mask=b.attn)
            h1.remove()
            h2.remove()
            z = got["h"][b.site] @ coef + bias
            tot, n = tot + float(z.sum()), n + len(z)
        return tot / n

    clean = probe_mean(None)
    for r in t.iter_rows(named=True):
        assert r["effect"] == pytest.approx(clean - probe_mean(r["feature"]), rel=2e-3, abs=2e-6)


def test_bad_input_is_one_clear_error_before_the_model_loads(fi_store, tiny_model, sae_dir, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(command, "load_model", no_model)
    cases = {
        ("--metric", "accuracy"): "--metric 'accuracy' is not one of completion_loss, category:<name>",
        ("--metric", "category:cooking"): "no rows have category 'cooking' (categories: advice-seeking",
        ("--metric", "probe:nope"): "no finished probe run has a probe named 'nope'",
        ("--exact", "129"): "--exact 129 is more than the 128 features",
        ("--method", "saliency"): "--method 'saliency' is not one of ap, ig",
        ("--split", "nosuch"): "selects no rows in --split 'nosuch'",
    }
    for argv, msg in cases.items():
        try:
            code = _run(fi_store, tiny_model, sae_dir, *argv)
        except SystemExit as e:  # a config error: argparse's usage + one error line
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("error:") == 1, (argv, err)


def test_exact_beyond_the_live_features_of_the_rows(fi_store, copy_store, tiny_model, sae_dir, capsys):
    store = copy_store(fi_store)
    assert _run(store, tiny_model, sae_dir, "--exact", "128", "--max-rows", "1") == 2
    err = capsys.readouterr().err
    assert re.search(r"--exact 128: only \d+ features of SAE .* fire on the \d+ site tokens", err), err


def _doc_sql() -> str:
    text = (ROOT / "docs" / "interpretation.md").read_text()
    section = text.split("## Feature importance", 1)[1]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


def test_the_documented_three_way_join(fi_store, copy_store, tiny_model, sae_dir, capsys):
    """Codes + tables of the tiny SAE (extractors.run --kinds hidden sae) and its correlations
    (analytics.correlations), then the command: the docs' SQL joins the three tables."""
    from analytics.correlations import main as corr_main
    from extractors.run import main as extract_main

    store = copy_store(fi_store)
    common = ["--store", str(store), "--no-progress"]
    sae = ["--sae", str(sae_dir)]
    assert extract_main(["--layer", str(LAYER), "--kinds", "hidden", "sae", *sae, "--model", tiny_model, *common]) == 0
    assert corr_main(["--layer", str(LAYER), *sae, "--min-rows", "2", *common]) == 0
    assert _run(store, tiny_model, sae_dir, "--exact", "3") == 0
    assert "Spearman" in capsys.readouterr().out
    joined = pl.from_arrow(Store(store).query(_doc_sql()))
    assert len(joined) == 20 and joined["context"].null_count() < 20 and joined["level"].null_count() < 20
    assert joined["effect"].abs().is_sorted(descending=True)
