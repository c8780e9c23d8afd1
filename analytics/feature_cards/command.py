"""`python -m analytics.feature_cards`: the config, the resumable card run, its table, JSON and plot.

    python -m analytics.feature_cards --sae latest
    python -m analytics.feature_cards --sae latest --layer 17 --top-k 20 --context 8 --quantiles 10 --per-quantile 5
    python -m analytics.feature_cards --sae latest --features 3 17 40        # ids (one id as 7,)
    python -m analytics.feature_cards --sae latest --features 100            # the top 100 (importance, else density)
    python -m analytics.feature_cards --sae latest --export-delphi /tmp/delphi-run

Writes table `feature_cards` (schema.py: one row per feature) one Parquet part per batch of
--batch-features features, `catalog/feature_cards/<sae>__layer_<L>/<run_id>/b<batch>.parquet`,
each after its JSON summary `runs/<run_id>/batches/b<batch>.json`; a `runs` record (kind
feature_cards); and in the run dir `plan.json` (the features and batches), `feature_cards.json`
and `feature_cards.png`. The run id is the hash of what is computed (SAE, its codes' run and
rows, the model, the options, the newest runs of the joined tables), so a killed run resumes
at its first missing batch and a rerun of a finished one does nothing. When a run finishes,
the cards other runs wrote for the same SAE, layer and features are dropped: the table holds
one card per (sae, layer, feature), the newest.

The codes are read once (one sorted gather per array) and sorted once; no model runs: the
decoder comes from the SAE's checkpoint and the unembedding from the model's weights.
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

from analytics.feature_cards import compute, inputs
from analytics.feature_cards.schema import SCHEMA, TABLE
from analytics.label_features import delphi
from analytics.label_features.inputs import SaeRef, code_arrays, parse_features, resolve_sae, token_codes
from analytics.label_features.samples import Firing, sort_firing
from store.arrays import array_key, committed_set, open_array
from store.catalog.runs import Run
from store.cli import LayerOptions, ModelOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from store.fs import read_parquet
from trainers import plots

KIND = "feature_cards"


@dataclass(kw_only=True)
class CardsConfig(delphi.DelphiOptions, StoreOptions, LayerOptions, ModelOptions, ProgressOptions):
    """Feature cards of an SAE, in one pass over its stored codes: top and quantile contexts,
    activation histogram, density, logit effects, metadata associations, importance and the
    attribution-rank correlation, into table feature_cards (resumable per batch of features)."""

    sae: str = field(default="latest", metadata={"help": "the SAE: latest (newest in the saes table) or its name"})
    layers: list[int] = field(default_factory=list, metadata={"default_help": "the SAE's layer"})
    model: str = field(
        default=inputs.CODES_MODEL,
        metadata={
            "default_help": "codes, the model that computed the codes (their arrays record it); its unembedding "
            "gives the logit effects: loaded, never run"
        },
    )
    features: list[str] = field(
        default_factory=list,
        metadata={
            "help": "N (the top N features by importance when feature_importance has the SAE, else by density) "
            "or feature ids (3 17 40; one id as 7,)",
            "default_help": "every feature of the SAE",
        },
    )
    top_k: int = field(default=20, metadata={"help": "top-activation contexts per card"})
    context: int = field(default=8, metadata={"help": "tokens each side of a context's firing token"})
    quantiles: int = field(default=10, metadata={"help": "equal-count activation quantiles sampled per card"})
    per_quantile: int = field(default=5, metadata={"help": "contexts sampled from each quantile"})
    logits: int = field(default=10, metadata={"help": "top and bottom logit effects per card"})
    batch_features: int = field(default=256, metadata={"help": "features per batch (one table part and JSON each)"})

    def __post_init__(self) -> None:
        self.check_device()
        if len(self.layers) > 1:
            self.one_layer("feature_cards")
        for name in ("top_k", "quantiles", "logits", "batch_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.context < 0 or self.per_quantile < 0:
            raise ValueError(f"--context and --per-quantile must be >= 0, got {self.context}, {self.per_quantile}")
        if self.features:
            parse_features(self.features, 1 << 30)  # the form; the range is checked against the SAE

    @property
    def options(self) -> compute.CardOptions:
        return compute.CardOptions(self.top_k, self.context, self.quantiles, self.per_quantile)


class CardsResult(NamedTuple):
    run_id: str
    sae: SaeRef
    features: list[int]
    batches: int  # batches of the run
    computed: int  # batches this call computed (0: a rerun of a finished run)
    seconds: float
    summary: dict[str, Any]
    plot: str | None
    noop: bool = False  # a rerun of a finished run: nothing was done


def part_name(sae: SaeRef, run_id: str, batch: int) -> str:
    return f"{array_key(f'{sae.name}/layer_{sae.layer}')}/{run_id}/b{batch:05d}"


def run_key(cfg: CardsConfig, sae: SaeRef, codes: dict[str, Any], joins: dict[str, str | None]) -> str:
    """The hash of what is computed: the same command on the same store resumes the same run."""
    keys = ("features", "top_k", "context", "quantiles", "per_quantile", "logits", "compute_dtype")
    what = {k: getattr(cfg, k) for k in keys}
    what |= {"batch_features": cfg.batch_features, "sae": sae.name, "layer": sae.layer, "codes": codes, "joins": joins}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def choose_features(cfg: CardsConfig, store: Store, sae: SaeRef, firing: Firing | None) -> tuple[list[int], str]:
    """(the features to card, how they were chosen); `firing` only for a top N by density."""
    if not cfg.features:
        return list(range(sae.d_sae)), "all"
    top_n, ids = parse_features(cfg.features, sae.d_sae)
    if ids:
        return ids, "ids"
    imp = inputs.importance(store, sae)
    if imp:
        by_effect = sorted(range(sae.d_sae), key=lambda f: (f not in imp, -abs(imp[f][0]) if f in imp else 0.0, f))
        return by_effect[:top_n], "importance"
    assert firing is not None
    n = np.diff(firing.start)
    return sorted(range(sae.d_sae), key=lambda f: (-int(n[f]), f))[:top_n], "density"


def card_rows(
    sae: SaeRef,
    run_id: str,
    cards: list[dict[str, Any]],
    un: inputs.Unembedding,
    n_logits: int,
    joins: dict[str, Any],
) -> list[dict[str, Any]]:
    """The codes-only card columns of compute.batch_cards completed with the logit effects and
    the joins, in schema order."""
    feats = np.array([c["feature"] for c in cards], dtype=np.int64)
    top_i, top_v, bot_i, bot_v = compute.logit_effects(un.W_dec, un.W_U, feats, n_logits)
    rows = []
    for i, c in enumerate(cards):
        f = c["feature"]
        effect, method, metric = joins["importance"].get(f, (None, None, None))
        rho = float(joins["rho"][f])
        rows.append(
            {"sae": sae.name, "layer": sae.layer, "run_id": run_id}
            | c
            | {
                "logit_top_tokens": [un.decode(int(t)) for t in top_i[i]],
                "logit_top_values": top_v[i].tolist(),
                "logit_bottom_tokens": [un.decode(int(t)) for t in bot_i[i]],
                "logit_bottom_values": bot_v[i].tolist(),
                "assoc": joins["assoc"].get(f, []),
                "importance": effect,
                "importance_method": method,
                "importance_metric": metric,
                "attribution_rho": rho if np.isfinite(rho) else None,
            }
        )
    return [{k: r[k] for k in SCHEMA.names} for r in rows]


def batch_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per card, what the batch JSON keeps (the contexts and histogram are in the table)."""
    keep = ("feature", "n_firing", "density", "max_act", "mean_act", "logit_top_tokens", "importance")
    return [
        {k: r[k] for k in keep}
        | {"attribution_rho": r["attribution_rho"], "top_tokens": [x["tokens"][x["center"]] for x in r["top_contexts"]]}
        for r in rows
    ]


def supersede(store: Store, sae: SaeRef, run_id: str, feats: list[int]) -> int:
    """Drop the cards that other runs wrote for these features of the SAE (one card per feature:
    the newest); returns the cards dropped."""
    mine = set(feats)
    folder = store.table_dir(TABLE) / array_key(f"{sae.name}/layer_{sae.layer}")
    dropped = 0
    for f in store.table_files(TABLE):
        if f.parent.parent != folder or f.parent.name == run_id:
            continue
        t = read_parquet(f)
        keep = np.array([x not in mine for x in t.column("feature").to_pylist()], dtype=bool)
        part = str(f.relative_to(store.table_dir(TABLE)).with_suffix("").as_posix())
        dropped += int((~keep).sum())
        if not keep.any():
            store.delete_part(TABLE, part)
            if not store.remote and not any(f.parent.iterdir()):
                f.parent.rmdir()  # the older run's folder, now empty
        elif not keep.all():
            store.write_table(TABLE, t.filter(pa.array(keep)), part=part)
    return dropped


def summary_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Two panels: the features' densities (log10), and the activation histogram of the card with
    the largest max_act with its strongest tokens."""
    from matplotlib.figure import Figure  # lazy: only when a plot is drawn

    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    dens = np.array([r["density"] for r in rows])
    live = dens[dens > 0]
    if len(live):
        ax.hist(np.log10(live), bins=40, color="tab:blue")
    ax.set_xlabel("log10 density (share of token-set tokens firing)")
    ax.set_ylabel("features")
    ax.set_title(f"{len(live)} of {len(rows)} features fire", fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    fired = [r for r in rows if r["n_firing"]]
    if fired:
        r = max(fired, key=lambda r: (r["max_act"], -r["feature"]))
        e, c = np.array(r["hist_edges"]), np.array(r["hist_counts"])
        ax.bar(e[:-1], c, width=np.diff(e), align="edge", color="tab:orange")
        tops = ", ".join(repr(x["tokens"][x["center"]]) for x in r["top_contexts"][:5])
        ax.set_title(f"feature {r['feature']}: top tokens {tops}"[:90], fontsize=8)
    ax.set_xlabel("activation")
    ax.set_ylabel("firing tokens")
    fig.suptitle(title, fontsize=9)
    return plots.save_figure(fig, path)


def _finished(store: Store, run_id: str) -> bool:
    if not store.has_table("runs"):
        return False
    got = store.query("SELECT status FROM runs WHERE run_id = ?", [run_id]).column(0).to_pylist()
    return "finished" in got


def run_cards(cfg: CardsConfig) -> CardsResult:
    """Plan, compute the missing batches, finish (see the module docstring)."""
    t0 = time.perf_counter()
    store = Store(cfg.store)
    sae = resolve_sae(store, cfg.sae, cfg.layers[0] if cfg.layers else None)
    if cfg.features:
        parse_features(cfg.features, sae.d_sae)  # out of range: before the codes or a model load
    idx_name, val_name = code_arrays(store, sae)  # an SAE without codes: the command that writes them
    attrs = dict(open_array(store, idx_name).attrs)
    cache = Path(cfg.model_cache) if cfg.model_cache else None
    model = inputs.codes_model(store, attrs, cfg.model, cache)
    rows_hash = hashlib.sha256("\n".join(sorted(committed_set(store, idx_name))).encode()).hexdigest()[:16]
    joins_runs = {
        "assoc": inputs.newest_run(store, inputs.ASSOC, sae),
        "importance": inputs.newest_run(store, inputs.IMPORTANCE, sae),
        "attribution": inputs.newest_run(store, inputs.ATTRIBUTION, where="rank IS NOT NULL"),
    }
    codes_key = {"run_id": attrs.get("run_id"), "rows": rows_hash, "model_hash": attrs.get("model_hash")}
    run_id = f"{KIND}-{run_key(cfg, sae, codes_key, joins_runs)}"
    plan_path = store.run_dir(run_id) / "plan.json"
    if plan_path.exists() and _finished(store, run_id):
        plan = json.loads(plan_path.read_text())
        done = all(
            (store.table_dir(TABLE) / f"{part_name(sae, run_id, b)}.parquet").exists() for b in range(plan["batches"])
        )
        if done:  # a rerun of a finished run: nothing to do
            summary = json.loads((store.run_dir(run_id) / "feature_cards.json").read_text())
            secs = time.perf_counter() - t0
            return CardsResult(run_id, sae, plan["features"], plan["batches"], 0, secs, summary, summary["plot"], True)
    config = config_dict(cfg) | {"sae_name": sae.name, "layer": sae.layer, "model_resolved": model}
    timings: dict[str, float] = {}
    model_ids = {"model_id": str(attrs.get("model") or model), "model_hash": str(attrs.get("model_hash") or "")}
    with Run(store, KIND, config, **model_ids, layers=[sae.layer], run_id=run_id) as run:
        t = time.perf_counter()
        codes = token_codes(store, sae)
        firing = sort_firing(codes, sae.d_sae)
        timings["read_and_sort_codes"] = time.perf_counter() - t
        feats, how = choose_features(cfg, store, sae, firing)
        batches = [feats[i : i + cfg.batch_features] for i in range(0, len(feats), cfg.batch_features)]
        store.write_json(plan_path, {"features": feats, "chosen_by": how, "batches": len(batches)})
        t = time.perf_counter()
        rho, n_rho_rows, _ = inputs.attribution_spearman(store, codes, sae.d_sae)
        joins = {"assoc": inputs.metadata_assoc(store, sae), "importance": inputs.importance(store, sae), "rho": rho}
        un = inputs.unembedding(store, sae, model, cfg.device, cache, cfg.compute_dtype)
        timings["joins_and_weights"] = time.perf_counter() - t
        t = time.perf_counter()
        computed = 0
        for b, batch in enumerate(tqdm(batches, desc="feature cards", unit="batch", disable=not cfg.progress)):
            part = part_name(sae, run_id, b)
            path = store.table_dir(TABLE) / f"{part}.parquet"
            if path.exists():  # committed by an earlier, killed run of this command
                continue
            tb = time.perf_counter()
            cards = compute.batch_cards(codes, firing, np.array(batch, dtype=np.int64), cfg.options)
            rows = card_rows(sae, run_id, cards, un, cfg.logits, joins)
            secs = time.perf_counter() - tb
            doc = {"run_id": run_id, "batch": b, "features": batch, "seconds": secs, "cards": batch_summary(rows)}
            store.write_json(run.dir / "batches" / f"b{b:05d}.json", doc)
            store.write_table(TABLE, pa.Table.from_pylist(rows, schema=SCHEMA), part=part)  # the batch's commit
            computed += 1
        timings["cards"] = time.perf_counter() - t
        dropped = supersede(store, sae, run_id, feats)
        full = store.query(
            f"SELECT feature, n_firing, density, max_act, hist_edges, hist_counts, top_contexts FROM {TABLE} "
            "WHERE run_id = ? ORDER BY feature",
            [run_id],
        ).to_pylist()
        plot = str(
            summary_plot(full, run.dir / "feature_cards.png", f"SAE {sae.name} layer {sae.layer}: {len(feats)} cards")
        )
        n_live = sum(1 for r in full if r["n_firing"])
        summary = {
            "run_id": run_id,
            "sae": sae.name,
            "layer": sae.layer,
            "features": len(feats),
            "chosen_by": how,
            "batches": len(batches),
            "computed_batches": computed,
            "firing_features": n_live,
            "n_tokens": firing.n_tokens,
            "n_active_slots": len(firing.pos),
            "median_density": float(np.median([r["density"] for r in full])) if full else None,
            "attribution_rows": n_rho_rows,
            "joined": {k: v for k, v in joins_runs.items()},
            "dropped_older_cards": dropped,
            "timings_s": timings,
            "seconds": time.perf_counter() - t0,
            "plot": plot,
        }
        store.write_json(run.dir / "feature_cards.json", summary)
        run.finish(counts={"features": len(feats), "batches": len(batches), "computed": computed}, metrics=summary)
    return CardsResult(run_id, sae, feats, len(batches), computed, time.perf_counter() - t0, summary, plot)


def report(res: CardsResult) -> str:
    s = res.summary
    if res.noop:
        head = f"feature cards of SAE {res.sae.name} layer {res.sae.layer}: run {res.run_id} is finished, nothing to do"
    else:
        head = (
            f"feature cards of SAE {res.sae.name} layer {res.sae.layer}: {len(res.features)} features "
            f"({s['firing_features']} fire) in {res.batches} batches ({res.computed} computed now) "
            f"in {res.seconds:.1f} s"
        )
    return "\n".join(
        [
            head,
            f"table {TABLE} (run {res.run_id}); plot {res.plot}",
            f"read one card: python -m store.sql \"SELECT * FROM {TABLE} WHERE sae = '{res.sae.name}' AND feature = "
            f'{res.features[0] if res.features else 0}"',
        ]
    )


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CardsConfig, argv, prog="python -m analytics.feature_cards")
    if cfg.export_delphi:
        store = Store(cfg.store)
        sae = resolve_sae(store, cfg.sae, cfg.layers[0] if cfg.layers else None)
        print(delphi.export_from(store, sae, cfg))
        return 0
    print(report(run_cards(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
