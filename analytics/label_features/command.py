"""`python -m analytics.label_features`: the config, the labelling run, its table, plot and JSON.

    python -m analytics.label_features --sae latest --features 20
    python -m analytics.label_features --sae latest --explainer HuggingFaceTB/SmolLM2-360M-Instruct --features 3 17 40
    python -m analytics.label_features --sae latest --export-review review.csv
    python -m analytics.label_features --sae latest --import-review review.csv
    python -m analytics.label_features --sae latest --export-delphi /tmp/delphi-run

Writes table `feature_labels` (one row per feature and method: `llm` = the explainer's
explanation, `deterministic` = the baseline that needs no LLM, `shuffled` = another feature's
LLM explanation, the chance baseline; human labels come from --import-review), a `runs` record
(kind label_features) and, in the run dir, `label_features.json`, `label_scores.png`, one
`features/<f>.json` per finished feature and the explainer cache `explanations/`. The run id is
the hash of what is computed (SAE, explainer, features, sampling, seed), so a rerun of the same
command resumes: finished features are read back and cached explanations are not generated
again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from analytics.label_features import delphi, review, scoring
from analytics.label_features.inputs import SaeRef, parse_features, resolve_sae, token_codes
from analytics.label_features.llm import Scorer, check_loadable, load
from analytics.label_features.prompts import explain_messages, highlight, marked, parse_explanation
from analytics.label_features.samples import FeatureExamples, feature_examples, sort_firing
from store.catalog.runs import Run
from store.cli import LayerOptions, ModelOptions, ProgressOptions, SeedOptions, StoreOptions, parse_config, user_errors
from store.core import Store, StoreError
from trainers import plots

METHODS = ("llm", "deterministic", "shuffled")


@dataclass(kw_only=True)
class LabelConfig(delphi.DelphiOptions, StoreOptions, LayerOptions, ModelOptions, SeedOptions, ProgressOptions):
    """Label SAE features: explanations from their top and quantile contexts (an LLM in delphi's
    prompt form, and a deterministic baseline), scored by detection and fuzzing on held-out
    windows against a shuffled-explanation chance baseline; a hand-review loop; a delphi export."""

    model: str = field(default="embedded", metadata={"aliases": ["--explainer"]})
    layers: list[int] = field(default_factory=list, metadata={"default_help": "the SAE's layer"})
    sae: str = field(default="latest", metadata={"help": "the SAE: latest (newest in the saes table) or its name"})
    features: list[str] = field(
        default_factory=lambda: ["20"],
        metadata={
            "help": "N (the top N features by importance when feature_importance has the SAE, else by density) "
            "or feature ids (3 17 40; one id as 7,)"
        },
    )
    context: int = field(default=8, metadata={"help": "tokens each side of a window's centre token"})
    n_top: int = field(default=10, metadata={"help": "top-activation windows shown to the explainer"})
    n_quantiles: int = field(default=5, metadata={"help": "activation quantiles the examples are drawn from"})
    per_quantile: int = field(default=2, metadata={"help": "explainer windows from each quantile"})
    n_test: int = field(
        default=10, metadata={"help": "held-out activating windows scored, and as many non-activating ones"}
    )
    min_firing: int = field(default=20, metadata={"help": "skip features firing on fewer token-set tokens"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens the explainer may generate"})
    batch_size: int = field(default=8, metadata={"help": "scorer prompts per forward"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of each AUROC CI"})
    export_review: str | None = field(
        default=None, metadata={"help": "write the low-confidence labels with their contexts to this CSV, then stop"}
    )
    import_review: str | None = field(
        default=None, metadata={"help": "store the CSV's hand labels (source human, kept above automatic ones)"}
    )
    review_below: float = field(default=0.5, metadata={"help": "--export-review takes labels of confidence below this"})

    def __post_init__(self) -> None:
        self.check_device()
        modes = [m for m in ("export_review", "import_review", "export_delphi") if getattr(self, m)]
        if len(modes) > 1:
            raise ValueError(f"pass one of --{' / --'.join(m.replace('_', '-') for m in modes)}, not several")
        if len(self.layers) > 1:
            self.one_layer("label_features")
        for name in ("n_top", "n_quantiles", "n_test", "max_new_tokens", "batch_size", "min_firing"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.context < 0 or self.per_quantile < 0 or self.n_boot < 0:
            raise ValueError("--context, --per-quantile and --n-boot must be >= 0")
        parse_features(self.features, 1 << 30)  # the form; the range is checked against the SAE

    def run_key(self, sae: SaeRef) -> str:
        """The hash of what is computed: the same command resumes the same run."""
        keys = ("model", "features", "context", "n_top", "n_quantiles", "per_quantile", "n_test", "min_firing")
        what = {k: getattr(self, k) for k in keys} | {"max_new_tokens": self.max_new_tokens, "seed": self.seed}
        what |= {"sae": sae.name, "layer": sae.layer, "n_boot": self.n_boot}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


class LabelResult(NamedTuple):
    run_id: str
    sae: SaeRef
    rows: list[dict[str, Any]]  # the rows written to feature_labels
    summary: dict[str, dict[str, float]]  # per method: mean scores and CIs over features
    skipped: list[int]  # features firing on fewer than --min-firing tokens
    generated: int  # explainer calls that missed the cache
    seconds: float
    plot: str | None


def importance_order(store: Store, sae: SaeRef) -> dict[int, float]:
    """|effect| per feature of the newest feature_importance run of the SAE (exact > ig > ap)."""
    if not store.has_table("feature_importance"):
        return {}
    rows = store.query(
        "SELECT feature, method, abs(effect) AS e FROM feature_importance WHERE sae = ? AND layer = ? AND feature >= 0 "
        "AND run_id = (SELECT max(run_id) FROM feature_importance WHERE sae = ? AND layer = ?)",
        [sae.name, sae.layer, sae.name, sae.layer],
    ).to_pylist()
    rank = {"exact": 0, "ig": 1, "ap": 2}
    out: dict[int, tuple[int, float]] = {}
    for r in rows:
        if r["feature"] not in out or rank.get(r["method"], 3) < out[r["feature"]][0]:
            out[r["feature"]] = (rank.get(r["method"], 3), r["e"])
    return {f: e for f, (_, e) in out.items()}


def metadata_assoc(store: Store, sae: SaeRef) -> dict[int, list[dict[str, Any]]]:
    """Per feature, its associations of the newest correlations run with q < 0.05 that go up
    with the feature (AUROC > 0.5, or a positive Spearman), strongest evidence first."""
    if not store.has_table("feature_metadata_assoc"):
        return {}
    rows = store.query(
        "SELECT feature, field, level, stat, effect, p_value FROM feature_metadata_assoc WHERE sae = ? AND layer = ? "
        "AND q_value < 0.05 AND ((stat = 'auroc' AND effect > 0.5) OR (stat = 'spearman' AND effect > 0)) AND run_id = "
        "(SELECT max(run_id) FROM feature_metadata_assoc WHERE sae = ? AND layer = ?) ORDER BY feature, p_value",
        [sae.name, sae.layer, sae.name, sae.layer],
    ).to_pylist()
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.pop("feature"), []).append(r)
    return out


def logit_tokens(
    store: Store, sae: SaeRef, scorer: Scorer, tokenization: str, feats: list[int]
) -> dict[int, list[str]]:
    """The 5 tokens each feature's decoder direction raises most through the unembedding
    (W_dec[f] @ W_U^T, the direct path), when the explainer shares the store's tokenizer (its
    W_U is then the store model's when it is the same model, as by default); else none."""
    import torch

    from extractors.chat_tokens import tokenizer_hash
    from extractors.sae.load import load_sae

    tz = store.query("SELECT tokenizer_hash FROM tokenizations WHERE tokenization = ?", [tokenization]).column(0)
    if not len(tz) or tz[0].as_py() != tokenizer_hash(scorer.lm.tokenizer):
        return {}
    W_dec = load_sae(sae.name, "cpu", layer=sae.layer, store=store).sae.W_dec.detach().float()
    W_U = scorer.lm.model.get_output_embeddings().weight.detach().float().cpu()
    if W_U.shape[1] != W_dec.shape[1]:
        return {}
    with torch.no_grad():
        top = (W_dec[torch.as_tensor(feats)] @ W_U.T).topk(5, dim=-1).indices
    return {f: [scorer.lm.tokenizer.decode([int(i)]) for i in row] for f, row in zip(feats, top, strict=True)}


def select_features(cfg: LabelConfig, store: Store, sae: SaeRef, firing: Any) -> tuple[list[int], list[int], str]:
    """(features to label, features skipped as too rare, how they were chosen)."""
    top_n, ids = parse_features(cfg.features, sae.d_sae)
    n_firing = np.diff(firing.start)
    if ids:
        keep = [f for f in ids if n_firing[f] >= cfg.min_firing]
        return keep, [f for f in ids if n_firing[f] < cfg.min_firing], "ids"
    imp = importance_order(store, sae)
    live = np.flatnonzero(n_firing >= cfg.min_firing)
    if imp:
        order = sorted(live, key=lambda f: (-imp.get(int(f), -1.0), int(f)))
        how = "importance"
    else:
        order = sorted(live, key=lambda f: (-int(n_firing[f]), int(f)))
        how = "density"
    return [int(f) for f in order[:top_n]], [], how


def label_row(sae: SaeRef, f: int, method: str, explanation: str, explainer: str, s: dict, run_id: str) -> dict:
    keep = [n for n in review.SCHEMA.names if n in s]
    return {
        "sae": sae.name,
        "layer": sae.layer,
        "feature": f,
        "explanation": explanation,
        "explainer": explainer,
        "method": method,
        "source": "auto",
        "run_id": run_id,
    } | {k: s[k] for k in keep}


def bar_plot(summary: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure  # lazy: only when a plot is drawn

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    names = list(summary)
    for j, key in enumerate(("detection_bacc", "fuzzing_bacc", "auroc")):
        vals = [summary[m][key] for m in names]
        lo = [summary[m][key] - summary[m][key + "_low"] for m in names]
        hi = [summary[m][key + "_high"] - summary[m][key] for m in names]
        ax.bar(np.arange(len(names)) + 0.27 * (j - 1), vals, 0.25, yerr=[lo, hi], capsize=3, label=key)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over features (95% CI)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    return plots.save_figure(fig, path)


def summarize(rows: list[dict], n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Per method, the mean over features of each score with a bootstrap CI over features."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for m in METHODS:
        sub = [r for r in rows if r["method"] == m]
        if not sub:
            continue
        out[m] = {"features": len(sub)}
        for key in ("detection_bacc", "fuzzing_bacc", "auroc", "confidence"):
            v = np.array([r[key] for r in sub], dtype=float)
            v = v[np.isfinite(v)]
            mean = float(v.mean()) if len(v) else float("nan")
            boots = [rng.choice(v, len(v)).mean() for _ in range(n_boot)] if len(v) and n_boot else [mean]
            lo, hi = np.percentile(boots, [2.5, 97.5])
            out[m] |= {key: mean, key + "_low": float(lo), key + "_high": float(hi)}
    return out


def run_labels(cfg: LabelConfig) -> LabelResult:
    """Explain, score, baseline and write (see the module docstring)."""
    t0 = time.perf_counter()
    store = Store(cfg.store)
    sae = resolve_sae(store, cfg.sae, cfg.layers[0] if cfg.layers else None)
    parse_features(cfg.features, sae.d_sae)  # out of range: before the codes or a model load
    cache = Path(cfg.model_cache) if cfg.model_cache else None
    check_loadable(cfg.model, cache)
    codes = token_codes(store, sae)
    firing = sort_firing(codes, sae.d_sae)
    feats, skipped, how = select_features(cfg, store, sae, firing)
    if len(feats) < 2:
        raise StoreError(
            f"--features {' '.join(cfg.features)}: {len(feats)} feature(s) fire on >= --min-firing {cfg.min_firing} "
            f"tokens (skipped as too rare: {skipped or 'none'}); the shuffled baseline needs 2: lower --min-firing "
            "or name more features"
        )
    sampling = dict(
        context=cfg.context,
        n_top=cfg.n_top,
        n_quantiles=cfg.n_quantiles,
        per_quantile=cfg.per_quantile,
        n_test=cfg.n_test,
        seed=cfg.seed,
    )
    examples = {f: feature_examples(codes, firing, f, **sampling) for f in feats}
    assoc = metadata_assoc(store, sae)
    run_id = f"label_features-{cfg.run_key(sae)}"
    lm = load(cfg.model, cfg.device, cfg.compute_dtype, cache)
    config = {k: v for k, v in vars(cfg).items()} | {"sae_name": sae.name, "features_chosen_by": how}
    with Run(
        store,
        "label_features",
        config,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=[sae.layer],
        run_id=run_id,
    ) as run:
        scorer = Scorer(lm, run.dir / "explanations", cfg.batch_size)
        logits_up = logit_tokens(store, sae, scorer, codes.tokenization, feats)
        done: dict[int, dict] = {}
        fdir = run.dir / "features"
        fdir.mkdir(parents=True, exist_ok=True)
        for f in tqdm(feats, desc="explain + score", disable=not cfg.progress):
            path = fdir / f"{f}.json"
            if path.exists():
                done[f] = json.loads(path.read_text())
                continue
            ex = examples[f]
            max_act = max(max(e.acts) for e in ex.explain)
            raw = scorer.explain(explain_messages(ex.explain, max_act), cfg.max_new_tokens)
            llm_expl, parsed = parse_explanation(raw)
            det_expl = scoring.deterministic_explanation(ex, logits_up.get(f), assoc.get(f))
            rec = {
                "feature": f,
                "n_firing": ex.n_firing,
                "density": ex.density,
                "llm": {"explanation": llm_expl, "parsed": parsed, "raw": raw}
                | scoring.score_explanation(scorer, llm_expl, ex, n_boot=cfg.n_boot, seed=cfg.seed),
                "deterministic": {"explanation": det_expl}
                | scoring.score_explanation(scorer, det_expl, ex, n_boot=cfg.n_boot, seed=cfg.seed),
            }
            store.write_json(path, rec)  # the feature's unit: a rerun reads it back
            done[f] = rec
        perm = scoring.derangement(len(feats), cfg.seed)
        for i, f in enumerate(tqdm(feats, desc="shuffled baseline", disable=not cfg.progress)):
            other = feats[int(perm[i])]
            expl = done[other]["llm"]["explanation"]
            if done[f].get("shuffled", {}).get("from_feature") != other:
                done[f]["shuffled"] = {"explanation": expl, "from_feature": other} | scoring.score_explanation(
                    scorer, expl, examples[f], n_boot=cfg.n_boot, seed=cfg.seed
                )
                store.write_json(fdir / f"{f}.json", done[f])
        rows = []
        for f in feats:
            d = done[f]
            rows.append(label_row(sae, f, "llm", d["llm"]["explanation"], lm.model_id, d["llm"], run_id))
            rows.append(
                label_row(
                    sae,
                    f,
                    "deterministic",
                    d["deterministic"]["explanation"],
                    "deterministic",
                    d["deterministic"],
                    run_id,
                )
            )
            rows.append(
                label_row(
                    sae, f, "shuffled", d["shuffled"]["explanation"], f"shuffled({lm.model_id})", d["shuffled"], run_id
                )
            )
        store.write_table(review.TABLE, pa.Table.from_pylist(rows, schema=review.SCHEMA), part=run_id)
        summary = summarize(rows, cfg.n_boot, cfg.seed)
        plot = str(
            bar_plot(
                summary,
                run.dir / "label_scores.png",
                f"SAE {sae.name} layer {sae.layer}: {len(feats)} features ({how}), explainer {lm.model_id}",
            )
        )
        secs = time.perf_counter() - t0
        counts = {"features": len(feats), "skipped": len(skipped), "generated": scorer.generated}
        metrics = {"summary": summary, "seconds": secs, "chosen_by": how}
        store.write_json(
            run.dir / "label_features.json",
            {"run_id": run_id, "config": config, "features": feats, "counts": counts, "metrics": metrics, "plot": plot},
        )
        run.finish(counts=counts, metrics=metrics)
    return LabelResult(run_id, sae, rows, summary, skipped, scorer.generated, secs, plot)


def window_texts(cfg: LabelConfig, store: Store, sae: SaeRef, feats: list[int]) -> dict[int, list[str]]:
    """The explain windows of each feature, activating tokens marked, for the review CSV."""
    codes = token_codes(store, sae)
    firing = sort_firing(codes, sae.d_sae)
    out = {}
    for f in feats:
        ex: FeatureExamples = feature_examples(
            codes,
            firing,
            f,
            context=cfg.context,
            n_top=5,
            n_quantiles=cfg.n_quantiles,
            per_quantile=0,
            n_test=0,
            seed=cfg.seed,
        )
        out[f] = [highlight(e.tokens, marked(e.acts)).replace("\n", "\\n") for e in ex.explain]
    return out


def report(res: LabelResult) -> str:
    lines = [
        f"SAE {res.sae.name} layer {res.sae.layer}: {len(res.rows) // len(METHODS)} features labelled in "
        f"{res.seconds:.0f} s ({res.generated} explanations generated, the rest from the cache)"
        + (f"; skipped as too rare: {res.skipped}" if res.skipped else ""),
        f"{'method':<14}{'detection bacc':>22}{'fuzzing bacc':>22}{'AUROC':>22}",
    ]
    for m, s in res.summary.items():
        cells = [
            f"{s[k]:.3f} [{s[k + '_low']:.2f}, {s[k + '_high']:.2f}]"
            for k in ("detection_bacc", "fuzzing_bacc", "auroc")
        ]
        lines.append(f"{m:<14}" + "".join(f"{c:>22}" for c in cells))
    for r in res.rows:
        if r["method"] == "llm":
            lines.append(f"  feature {r['feature']:>5}  AUROC {r['auroc']:.2f}  {r['explanation'][:90]}")
    lines.append(f"table {review.TABLE} (run {res.run_id}); plot {res.plot}")
    return "\n".join(lines)


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(LabelConfig, argv, prog="python -m analytics.label_features")
    store = Store(cfg.store)
    if cfg.export_delphi or cfg.export_review or cfg.import_review:
        sae = resolve_sae(store, cfg.sae, cfg.layers[0] if cfg.layers else None)
        if cfg.export_delphi:
            print(delphi.export_from(store, sae, cfg))
        elif cfg.import_review:
            n, part = review.import_review(store, sae, Path(cfg.import_review))
            print(f"{n} hand labels stored in {review.TABLE} (source human, part {part})")
        else:
            low = [r["feature"] for r in review.current_labels(store, sae) if r["source"] != "human"]
            n = review.export_review(
                store, sae, Path(cfg.export_review), cfg.review_below, window_texts(cfg, store, sae, low)
            )
            print(f"{n} labels with confidence < {cfg.review_below} written to {cfg.export_review}")
        return 0
    print(report(run_labels(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
