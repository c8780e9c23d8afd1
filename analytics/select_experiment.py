"""Does finetuning on the top-ranked rows beat a matched random subset? `python -m analytics.select_experiment`.

    python -m analytics.select_experiment --selector attribution:latest --k 500 --seeds 5
    python -m analytics.select_experiment --selector predictor:latest --k 500 --seeds 5 --max-steps 60
    python -m analytics.select_experiment --selector attribution:latest --k 500 --seeds 3 \
        --ablation scale --max-steps 60
    python -m analytics.select_experiment --store /tmp/st --selector attribution:latest --k 8 --seeds 2 \
        --max-steps 2 --batch-size 4 --eval-max-rows 16 --math-max-rows 4 --max-new-tokens 24   # CPU-sized

For each seed s = 0..S-1 it trains one arm per subset (analytics.select_arms): a continuation
finetune from the base adapter (`--resume-adapter`, default the newest adapter that is not an arm
itself; `none`: a fresh LoRA on the base model) on the subset, with identical budgets (the same
optimizer steps, batch, lr; finetune seed = s in every arm), then the per-row eval loss of each
adapter on `--eval-split` (paired by eval row) and the downstream metric: the share of math eval
rows whose greedy answer is correct (trainers.finetune.math_check), skipped with a recorded reason when
there are no math rows. The arms:

* default: `top{k}` (the selector's top k, the same rows every seed) vs `random{k}` (k rows drawn
  with seed s with exactly the top k's category counts, `--overlap exclude|allow`);
* `--ablation scale`, our users' scale-vs-rank-window study, at a = 3k // 5 and w = k - a (k = 500:
  300 and 200): `top{a}` vs `top{k}` (is the smaller, better-ranked set better?) and
  `ranks{a+1}-{k}` vs `random{w}_from_{k+1}-` (w rows drawn with seed s from ranks > k).

Budget: with `--max-steps N` every arm takes exactly N optimizer steps (as many epochs as that
needs); without it every arm takes `--epochs` x ceil(rows / (batch x accum)) steps, and arms whose
step counts would differ (the ablation's arms have different sizes) are refused with the fix.

Statistics (analytics.select_stats), per seed and pooled over seeds, for each comparison a - b:
the difference of token-weighted eval losses (negative: a is better) and of downstream accuracy
(positive: a is better), a 95% percentile CI by the paired bootstrap over eval rows (and, pooled,
seeds), and a two-sided sign-flip permutation p-value on the per-row differences pooled over
seeds. The base adapter's own eval loss and accuracy are reported for scale.

Outputs in runs/<run_id>/ (run_id = select-<hash of the config>, the same for the same command):
`select_experiment.json`, `select_experiment.png` (per-seed differences with CIs + pooled),
`arms/<arm>.json` (per-row losses, answers), `eval_loss_compare.json`; one row per (seed, arm) in
table `selection_runs` (plus the `base` row, seed null), and a `runs` record (kind
select_experiment). Resumable: rerunning the same command (also with more --seeds) reuses every
finished arm and trains only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from analytics import select_arms as sa
from analytics.select_stats import compare, level
from extractors.sft_data import select_rows_by
from store.catalog.runs import Run
from store.cli import ModelOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError, write_json
from trainers.plots import save_figure
from trainers.selection.subsets import resolve_source, subset_name, subset_rows, write_subset

# Fields that do not change what an arm is: left out of the experiment's id, so changing them
# (more seeds, other bootstrap settings, another device) reuses the finished arms.
NOT_IN_ID = ("store", "seeds", "n_boot", "n_perm", "stats_seed", "device", "model_cache", "progress")


@dataclass(kw_only=True)
class SelectExperimentConfig(StoreOptions, ModelOptions, ProgressOptions):
    """Top-k vs matched random-k continuation finetunes over seeds, with paired CIs (module docstring).
    --model is the base model the arms' adapters continue from."""

    selector: str = field(
        default="attribution:latest",
        metadata={
            "help": "the ranking: attribution:<run>|attribution:latest|predictor:<run>|predictor:latest|reward_model"
        },
    )
    k: int = field(default=500, metadata={"help": "subset size (the top k and the random k)"})
    seeds: int = field(default=5, metadata={"help": "seeds 0..N-1 (random draw and finetune seed)"})
    resume_adapter: str = field(
        default="latest",
        metadata={
            "help": "the base adapter every arm continues: a name from the adapters table, latest (the newest that "
            "is not an arm of a selection experiment), a peft folder, or none (a fresh LoRA)"
        },
    )
    overlap: Literal["exclude", "allow"] = field(
        default="exclude",
        metadata={"help": "may the random arm share rows with the top k? exclude: drawn from the pool minus the top k"},
    )
    ablation: Literal["none", "scale"] = field(
        default="none",
        metadata={"help": "scale: top{3k//5} vs top{k} and ranks {3k//5+1}-{k} vs random {k-3k//5} from ranks > k"},
    )
    pool_split: str = field(default="score_pool", metadata={"help": "the split the selector ranks"})
    epochs: int = field(default=1, metadata={"help": "passes over each arm's rows (ignored with --max-steps)"})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "every arm takes exactly this many optimizer steps (needed when arm sizes differ)"},
    )
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then linear decay"})
    eval_split: str = field(default="eval", metadata={"help": "rows whose loss is compared"})
    eval_max_rows: int | None = field(default=None, metadata={"help": "compare on the first N eval rows by row_id"})
    downstream: bool = field(
        default=True, metadata={"help": "measure math accuracy of generated answers (--no-downstream skips it)"}
    )
    math_max_rows: int = field(default=24, metadata={"help": "math eval rows whose generated answer is checked"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per math prompt (greedy)"})
    gen_batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    n_perm: int = field(default=10000, metadata={"help": "sign-flip permutations of the p-value"})
    stats_seed: int = field(default=0, metadata={"help": "seed of the bootstrap and the permutations"})
    max_length: int = field(default=2048, metadata={"help": "longest row in tokens (see --on-long)"})
    on_long: Literal["error", "truncate"] = field(
        default="error", metadata={"help": "rows longer than --max-length: error, or truncate them"}
    )

    def __post_init__(self) -> None:
        self.check_device()
        for name in (
            "k",
            "seeds",
            "epochs",
            "batch_size",
            "grad_accum",
            "n_boot",
            "n_perm",
            "max_new_tokens",
            "gen_batch_size",
            "max_length",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_rows"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.math_max_rows < 0:
            raise ValueError(f"--lr must be positive (got {self.lr}), --warmup-steps and --math-max-rows >= 0")
        if self.selector.partition(":")[0] == "random":
            raise ValueError(
                "--selector random makes both arms random; pick attribution:<run>, predictor:<run> "
                "or reward_model (random is what they are compared with)"
            )


def experiment_id(cfg: SelectExperimentConfig, base: Any, top_subset: str) -> str:
    what = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_ID}
    what.update(base_adapter=base.name if base else None, top_subset=top_subset)
    return "select-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _pairs(recs: list[dict[str, Any]], rows_key: str, value: str, weight: str | None) -> tuple[np.ndarray, ...]:
    """[S, n] values of each record, checked to be over the same rows; and the weights [n]."""
    rows = recs[0][rows_key]
    for r in recs:
        if r[rows_key] != rows:
            raise StoreError(
                f"arm {r['arm']} (seed {r['seed']}) was measured on other rows than arm {recs[0]['arm']}; "
                f"the experiment's eval rows changed: rerun it from scratch (another store or config)"
            )
    v = np.array([r[value] for r in recs], dtype=np.float64)
    w = np.array(recs[0][weight], dtype=np.float64) if weight else np.ones(len(rows))
    return v, w


def summarize(
    cfg: SelectExperimentConfig, recs: dict[str, dict[str, Any]], comps: list[sa.Comparison], base: dict[str, Any]
) -> dict[str, Any]:
    """Per-seed and pooled differences of every comparison, and the base adapter's figures."""
    rng = np.random.default_rng(cfg.stats_seed)
    out: dict[str, Any] = {}
    n_tok = np.array(base["n_tokens"], dtype=np.float64)
    for c in comps:
        A = [recs[f"s{s}-{c.a}"] for s in range(cfg.seeds)]
        B = [recs[f"s{s}-{c.b}"] for s in range(cfg.seeds)]
        la, w = _pairs([base, *A], "eval_row_ids", "loss_sum", "n_tokens")
        lb, _ = _pairs([base, *B], "eval_row_ids", "loss_sum", "n_tokens")
        entry: dict[str, Any] = {"a": c.a, "b": c.b, "seeds": list(range(cfg.seeds))}
        res = compare(la[1:] - lb[1:], w, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.stats_seed)
        entry["eval_loss"] = {
            "per_seed": [e.as_dict() for e in res["per_seed"]],
            "pooled": res["pooled"].as_dict(),
            "a_mean": float(np.mean([r["eval_loss"] for r in A])),
            "b_mean": float(np.mean([r["eval_loss"] for r in B])),
        }
        if base["downstream"] is not None:
            ca, w1 = _pairs([base, *A], "math_row_ids", "correct", None)
            cb, _ = _pairs([base, *B], "math_row_ids", "correct", None)
            res = compare(ca[1:] - cb[1:], w1, n_boot=cfg.n_boot, n_perm=cfg.n_perm, seed=cfg.stats_seed + 1)
            entry["downstream"] = {
                "per_seed": [e.as_dict() for e in res["per_seed"]],
                "pooled": res["pooled"].as_dict(),
                "a_mean": float(ca[1:].mean()),
                "b_mean": float(cb[1:].mean()),
            }
        else:
            entry["downstream"] = None
        out[c.name] = entry
    figures = {
        "adapter": base["adapter"],
        "eval_loss": level(np.array(base["loss_sum"]), n_tok, cfg.n_boot, rng),
        "downstream": (
            level(np.array(base["correct"], dtype=float), np.ones(len(base["correct"])), cfg.n_boot, rng)
            if base["downstream"] is not None
            else None
        ),
        "downstream_reason": base["downstream_reason"],
    }
    return {"comparisons": out, "base": figures}


def plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Per-seed differences with their 95% CIs and the pooled one, one panel per metric."""
    from matplotlib.figure import Figure

    comps = summary["comparisons"]
    metrics = [m for m in ("eval_loss", "downstream") if any(c[m] for c in comps.values())]
    fig = Figure(figsize=(6.2 * len(metrics), 4.3))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = {
        "eval_loss": "eval loss difference a - b (nats/token; < 0: a better)",
        "downstream": "math accuracy difference a - b (> 0: a better)",
    }
    for ax, m in zip(axes, metrics, strict=False):
        width = 0.7 / max(1, len(comps))
        for j, (_name, c) in enumerate(comps.items()):
            pts = c[m]["per_seed"] + [c[m]["pooled"]]
            x = np.arange(len(pts), dtype=float)
            x[-1] += 0.5
            x += -0.35 + width * (j + 0.5)
            est = np.array([p["estimate"] for p in pts])
            lo, hi = np.array([p["ci_low"] for p in pts]), np.array([p["ci_high"] for p in pts])
            bars = ax.errorbar(
                x[:-1],
                est[:-1],
                yerr=[est[:-1] - lo[:-1], hi[:-1] - est[:-1]],
                fmt="o",
                capsize=3,
                label=f"{c['a']} - {c['b']} (pooled p {c[m]['pooled']['p_value']:.3g})",
            )
            ax.errorbar(
                x[-1:],
                est[-1:],
                yerr=[est[-1:] - lo[-1:], hi[-1:] - est[-1:]],
                fmt="D",
                ms=8,
                capsize=5,
                color=bars[0].get_color(),
            )
        n_seeds = len(next(iter(comps.values()))["seeds"])
        ax.set_xticks(list(range(n_seeds)) + [n_seeds + 0.5], [f"seed {s}" for s in range(n_seeds)] + ["pooled"])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel(labels[m])
        b = summary["base"][m]
        what = "eval loss" if m == "eval_loss" else "math accuracy"
        ax.set_title(f"{title}\nbase adapter's {what}: {b[0]:.4f} [{b[1]:.4f}, {b[2]:.4f}]" if b else title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def run_select_experiment(cfg: SelectExperimentConfig) -> dict[str, Any]:
    """Plan, train the missing arms, measure, summarize (see the module docstring)."""
    from tqdm.auto import tqdm

    store = Store(cfg.store)
    select_rows_by(store, split=cfg.eval_split, max_rows=cfg.eval_max_rows, flag="--eval-split")
    resolved, _ = resolve_source(store, cfg.selector)
    base = sa.resolve_base(store, cfg.resume_adapter)
    base_spec = sa.spec_of(store, base)
    arms, comps = sa.plan(
        cfg.selector, cfg.k, cfg.seeds, None if cfg.ablation == "none" else "scale", cfg.overlap, cfg.pool_split
    )
    run_id = experiment_id(cfg, base, subset_name(store, arms[0].spec))
    # Every subset (cheap, deterministic) and the budget check before anything trains.
    subsets = {a.arm_id: write_subset(store, a.spec) for a in arms}
    sizes = {a.arm_id: len(subset_rows(store, subsets[a.arm_id])) for a in arms}
    budget = sa.Budget(cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_steps)
    steps = sa.check_budget(sizes, budget)
    math_ids, truth, prompts, reason = sa.math_rows(store, cfg.eval_split, cfg.math_max_rows, cfg.downstream)
    measure = sa.Measure(
        store,
        cfg.model,
        cfg.eval_split,
        cfg.eval_max_rows,
        math_ids,
        truth,
        prompts,
        reason,
        cfg.max_new_tokens,
        cfg.gen_batch_size,
        cfg.max_length,
        cfg.on_long,
        cfg.device,
        cfg.compute_dtype,
        cfg.model_cache,
        cfg.progress,
        store.run_dir(run_id) / "eval_loss_compare.json",
    )
    record = {
        **config_dict(cfg),
        "run_id": run_id,
        "selector_resolved": resolved,
        "base_adapter": base.name if base else None,
        "steps": steps,
    }
    with Run(
        store,
        "select_experiment",
        record,
        model_id=base.base_model if base else cfg.model,
        model_hash=base.base_hash if base else "",
        run_id=run_id,
    ) as run:
        done = sa.finished(store, run_id)
        reused = sorted(a for a in done if a == "base" or a in subsets)
        common = {
            "selector": resolved,
            "base_adapter": base.name if base else None,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "lr": cfg.lr,
            "eval_split": cfg.eval_split,
        }
        todo = [a for a in arms if a.arm_id not in done]
        bar = tqdm(total=len(todo) + ("base" not in done), desc="selection arms", disable=not cfg.progress)
        if "base" not in done:
            rec = {
                **common,
                "arm": "base",
                "seed": None,
                "subset": None,
                "adapter": base.name if base else None,
                "finetune_run_id": None,
                "n_train_rows": 0,
                "steps": 0,
                "epochs": 0,
                **measure.eval_loss(base_spec),
                **measure.downstream(base_spec),
            }
            sa.commit(store, run_id, "base", rec)
            done["base"] = rec
            bar.update(1)
        for arm in todo:
            bar.set_postfix(arm=arm.arm_id)
            trained = sa.train_arm(store, run_id, arm, subsets[arm.arm_id], sizes[arm.arm_id], base, budget, cfg)
            rec = {
                **common,
                "arm": arm.name,
                "seed": arm.seed,
                "subset": subsets[arm.arm_id],
                "n_train_rows": sizes[arm.arm_id],
                **trained,
                **measure.eval_loss(trained["adapter"]),
                **measure.downstream(trained["adapter"]),
            }
            sa.commit(store, run_id, arm.arm_id, rec)
            done[arm.arm_id] = rec
            bar.update(1)
        bar.close()
        summary = summarize(cfg, done, comps, done["base"])
        title = f"{resolved}, k {cfg.k}, {cfg.seeds} seeds, {steps} steps"
        png = plot(summary, run.dir / "select_experiment.png", title)
        result = {
            "run_id": run_id,
            "selector": resolved,
            "k": cfg.k,
            "seeds": cfg.seeds,
            "ablation": cfg.ablation,
            "base_adapter": base.name if base else None,
            "budget": {
                "steps": steps,
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
            },
            "eval": {
                "split": cfg.eval_split,
                "rows": len(done["base"]["eval_row_ids"]),
                "supervised_tokens": int(sum(done["base"]["n_tokens"])),
            },
            "downstream": {"rows": len(math_ids), "skipped_because": reason},
            "arms": [
                {
                    "arm": a.name,
                    "seed": a.seed,
                    "subset": subsets[a.arm_id],
                    "n_train_rows": sizes[a.arm_id],
                    "adapter": done[a.arm_id]["adapter"],
                    "eval_loss": done[a.arm_id]["eval_loss"],
                    "downstream": done[a.arm_id]["downstream"],
                    "reused": a.arm_id in reused,
                }
                for a in arms
            ],
            "reused_arms": len([a for a in reused if a != "base"]),
            "trained_arms": len(todo),
            **summary,
            "plot": str(png),
            "method": {
                "difference": "a - b; eval loss token-weighted (negative: a better), downstream "
                "accuracy (positive: a better)",
                "ci": f"95% percentile bootstrap, {cfg.n_boot} resamples, paired by eval row; pooled: "
                f"seeds and rows resampled independently (crossed), seed {cfg.stats_seed}",
                "p_value": f"two-sided sign-flip permutation test on per-row differences pooled over "
                f"seeds, {cfg.n_perm} permutations",
            },
        }
        write_json(run.dir / "select_experiment.json", result)
        pooled = {n: c["eval_loss"]["pooled"] for n, c in summary["comparisons"].items()}
        run.finish(
            counts={
                "arms": len(arms),
                "trained": len(todo),
                "reused": result["reused_arms"],
                "eval_rows": result["eval"]["rows"],
                "math_rows": len(math_ids),
            },
            metrics={"pooled_eval_loss_difference": pooled},
        )
    return result


def _fmt(e: dict[str, Any], pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
    return f"{f(e['estimate'])} [{f(e['ci_low'])}, {f(e['ci_high'])}] p={e['p_value']:.3g}"


def report(res: dict[str, Any]) -> str:
    b = res["base"]
    head = (
        f"selection experiment {res['run_id']}: {res['selector']}, k {res['k']}, {res['seeds']} seeds, "
        f"{res['budget']['steps']} steps per arm (batch {res['budget']['batch_size']}, lr {res['budget']['lr']}); "
        f"{res['trained_arms']} arms trained, {res['reused_arms']} reused"
    )
    scale = f"base adapter {b['adapter']}: eval loss {b['eval_loss'][0]:.4f} over {res['eval']['rows']} rows" + (
        f", math accuracy {b['downstream'][0]:.3f} over {res['downstream']['rows']} rows"
        if b["downstream"]
        else f"; downstream skipped: {b['downstream_reason']}"
    )
    lines = [head, scale]
    for c in res["comparisons"].values():
        lines.append(f"{c['a']} - {c['b']} (estimate [95% CI] p):")
        for s, e in zip(c["seeds"], c["eval_loss"]["per_seed"], strict=False):
            d = c["downstream"]["per_seed"][s] if c["downstream"] else None
            lines.append(f"  seed {s}: eval loss {_fmt(e)}" + (f"; math accuracy {_fmt(d, True)}" if d else ""))
        d = c["downstream"]["pooled"] if c["downstream"] else None
        lines.append(
            f"  pooled: eval loss {_fmt(c['eval_loss']['pooled'])}" + (f"; math accuracy {_fmt(d, True)}" if d else "")
        )
    lines += [
        f"JSON {Path(res['plot']).with_suffix('.json')}",
        f"plot {res['plot']}",
        f"table {sa.TABLE} (SELECT * FROM {sa.TABLE} WHERE run_id = '{res['run_id']}')",
    ]
    return "\n".join(lines)


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    cfg = parse_config(SelectExperimentConfig, argv, prog="python -m analytics.select_experiment")
    res = run_select_experiment(cfg)
    print(report(res))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
