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
there are no math rows. On a planted positive control (`python -m extractors.dataset --control
planted`, `--downstream-metric auto|rule`) the downstream metric is instead the share of the
planted (trigger) eval rows whose greedy completion follows the planted rule
(extractors.ingest.sample.planted.rule_followed). The arms:

* default, `--arms top,matched_random` (any of `top,matched_random,bottom,full`): `top` (the
  selector's top k, the same rows every seed), `matched_random` (k rows drawn with seed s with
  exactly the top k's category counts, `--overlap exclude|allow`), `bottom` (the k lowest-ranked
  rows with top's category counts, per category its last-ranked rows: the anchor on the other
  side) and `full` (the whole pool, at the same optimizer steps, batch and lr as the k-row arms:
  the "no selection" anchor); every arm is compared with matched_random (`<arm>_vs_matched_random`);
* `--ablation scale`, our users' scale-vs-rank-window study, at a = 3k // 5 and w = k - a (k = 500:
  300 and 200): `top{a}` vs `top{k}` (is the smaller, better-ranked set better?) and
  `ranks{a+1}-{k}` vs `random{w}_from_{k+1}-` (w rows drawn with seed s from ranks > k).

Budget: with `--max-steps N` every arm takes exactly N optimizer steps (as many epochs as that
needs); without it every arm takes `--epochs` x ceil(rows / (batch x accum)) steps, and arms whose
step counts would differ (the ablation's arms have different sizes) are refused with the fix. The
`full` arm is outside that check: it takes the k-row arms' step count by construction (so it sees
each pool row about steps x batch / pool times). The budget (steps, batch, lr, rows per arm,
seeds) is written into `select_experiment.json` (status planned) before the first arm trains.

Statistics (analytics.select_stats), per seed and pooled over seeds, for each comparison a - b:
the difference of token-weighted eval losses (negative: a is better) and of downstream accuracy
(positive: a is better), a 95% percentile CI by the paired bootstrap over eval rows (and, pooled,
seeds), and one verdict per comparison: the p-value is the bootstrap's own, from the same
replicates as the CI (analytics.select_stats: the test and the interval resample the same rows and
seeds); the rows-only sign-flip p is kept beside it as `p_sign_flip_rows`, a secondary
diagnostic. The base adapter's own eval loss and accuracy are reported for scale.

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
from typing import Any, Literal

from analytics import select_arms as sa
from analytics.selection.summary import plot, report, summarize
from extractors.sft_data import select_rows_by
from store.catalog.runs import Run
from store.cli import ModelOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError, write_json
from trainers.selection.subsets import resolve_source, subset_name, subset_rows, write_subset

# Fields that do not change what an arm is: left out of the experiment's id, so changing them
# (more seeds, other bootstrap settings, another device) reuses the finished arms.
NOT_IN_ID = ("store", "seeds", "arms", "n_boot", "n_perm", "stats_seed", "device", "model_cache", "progress")


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
    arms: str = field(
        default="top,matched_random",
        metadata={
            "help": "the arms, comma-separated, from top,matched_random,bottom,full: bottom = the k lowest-ranked "
            "rows with top's category counts, full = the whole pool at the same optimizer steps and batch; each "
            "is compared with matched_random (not with --ablation)"
        },
    )
    downstream_metric: Literal["auto", "math", "rule"] = field(
        default="auto",
        metadata={
            "help": "math: share of math eval answers correct; rule: share of planted (trigger) eval rows whose "
            "generated completion follows the planted rule; auto: rule on a planted control store, else math"
        },
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
    n_perm: int = field(
        default=10000, metadata={"help": "sign-flip permutations of the secondary rows-only p (p_sign_flip_rows)"}
    )
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
        sa.parse_arms(self.arms)
        if self.ablation != "none" and self.arms != "top,matched_random":
            raise ValueError(f"--ablation {self.ablation} has its own arms; drop --arms {self.arms} (or --ablation)")
        if self.selector.partition(":")[0] == "random":
            raise ValueError(
                "--selector random makes both arms random; pick attribution:<run>, predictor:<run> "
                "or reward_model (random is what they are compared with)"
            )


def experiment_id(cfg: SelectExperimentConfig, base: Any, top_subset: str) -> str:
    what = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_ID}
    what.update(base_adapter=base.name if base else None, top_subset=top_subset)
    return "select-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def run_select_experiment(cfg: SelectExperimentConfig) -> dict[str, Any]:
    """Plan, train the missing arms, measure, summarize (see the module docstring)."""
    from tqdm.auto import tqdm

    store = Store(cfg.store)
    select_rows_by(store, split=cfg.eval_split, max_rows=cfg.eval_max_rows, flag="--eval-split")
    resolved, _ = resolve_source(store, cfg.selector)
    base = sa.resolve_base(store, cfg.resume_adapter)
    base_spec = sa.spec_of(store, base)
    arms, comps = sa.plan(
        cfg.selector,
        cfg.k,
        cfg.seeds,
        None if cfg.ablation == "none" else "scale",
        cfg.overlap,
        cfg.pool_split,
        sa.parse_arms(cfg.arms),
    )
    run_id = experiment_id(cfg, base, subset_name(store, arms[0].spec))
    # Every subset (cheap, deterministic) and the budget check before anything trains.
    subsets = {a.arm_id: write_subset(store, a.spec) for a in arms}
    sizes = {a.arm_id: len(subset_rows(store, subsets[a.arm_id])) for a in arms}
    budget = sa.Budget(cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.warmup_steps)
    # The full pool takes the k-row arms' optimizer steps and batch (fewer passes over each row).
    full = tuple(a.arm_id for a in arms if a.name == "full")
    steps = sa.check_budget(sizes, budget, fixed=full)
    metric = cfg.downstream_metric
    if metric == "auto":
        metric = "rule" if sa.is_control(store) else "math"
    if metric == "rule" and not sa.is_control(store):
        raise StoreError(
            f"--downstream-metric rule needs a planted control store (rows.planted); {store.root} has none: "
            "build one with python -m extractors.dataset --control planted, or pass --downstream-metric math"
        )
    rows_of = sa.rule_rows if metric == "rule" else sa.math_rows
    math_ids, truth, prompts, reason = rows_of(store, cfg.eval_split, cfg.math_max_rows, cfg.downstream)
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
        metric,
    )
    budget_doc = {
        "steps": steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps,
        "rows": {a.name: sizes[a.arm_id] for a in arms},
        "seeds": cfg.seeds,
        "row_visits": steps * cfg.batch_size * cfg.grad_accum,
        "full_arm": "the whole pool at the same optimizer steps, batch and lr as the k-row arms" if full else None,
    }
    record = {
        **config_dict(cfg),
        "run_id": run_id,
        "selector_resolved": resolved,
        "base_adapter": base.name if base else None,
        "steps": steps,
        "budget": budget_doc,
        "downstream_metric": metric,
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
        # The pre-declared budget, on disk before the first arm trains (replaced by the result).
        write_json(
            run.dir / "select_experiment.json",
            {
                "run_id": run_id,
                "status": "planned",
                "selector": resolved,
                "k": cfg.k,
                "budget": budget_doc,
                "arms": [a.arm_id for a in arms],
                "downstream_metric": metric,
            },
        )
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
            trained = sa.train_arm(store, run_id, arm, subsets[arm.arm_id], sizes[arm.arm_id], base, budget, cfg, steps)
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
        png = plot(summary, run.dir / "select_experiment.png", title, metric)
        result = {
            "run_id": run_id,
            "selector": resolved,
            "k": cfg.k,
            "seeds": cfg.seeds,
            "ablation": cfg.ablation,
            "base_adapter": base.name if base else None,
            "status": "finished",
            "budget": budget_doc,
            "eval": {
                "split": cfg.eval_split,
                "rows": len(done["base"]["eval_row_ids"]),
                "supervised_tokens": int(sum(done["base"]["n_tokens"])),
            },
            "downstream": {"metric": metric, "rows": len(math_ids), "skipped_because": reason},
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
                "p_value": f"primary: the bootstrap's own two-sided p from the same {cfg.n_boot} replicates "
                "as the CI (rows, and pooled also seeds, resampled): p < 0.05 exactly when the 95% CI excludes 0",
                "p_sign_flip_rows": f"secondary: two-sided sign-flip permutation test on per-row differences "
                f"pooled over seeds ({cfg.n_perm} permutations); rows only, conditional on these seeds' arms",
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
