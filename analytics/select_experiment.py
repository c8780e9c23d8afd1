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
finished arm and trains only the missing ones; rerunning a finished experiment does nothing.

Shared arms: the base measurement and every (seed, arm) are claimable units (store.claims, as
extraction units are): N processes started with the same command (N CPU processes, one per GPU
with `CUDA_VISIBLE_DEVICES=i`, or `torchrun` ranks, whose LOCAL_RANK picks the GPU) split them,
none computed twice; a killed worker's arm is taken over (its claim is stale at once on the same
host, after `--claim-timeout` elsewhere) and continues from the arm's latest finetune checkpoint.
Each unit's eval loss goes to `arms/<arm>.eval_loss.json`; the first worker to find every unit
committed writes the summary (the others find it), which equals a single-process run's:

    python -m analytics.select_experiment --selector attribution:latest --k 500 --seeds 5 &
    python -m analytics.select_experiment --selector attribution:latest --k 500 --seeds 5 &
    torchrun --nproc-per-node 4 -m analytics.select_experiment --selector attribution:latest --k 500
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from analytics import select_arms as sa
from analytics.select_budget import ArmTrainingOptions
from analytics.selection.summary import plot, report, result_doc, summarize
from extractors.model import pick_device
from extractors.sft_data import select_rows_by
from store import claims
from store.catalog.runs import Run
from store.cli import (
    ModelOptions,
    ProgressOptions,
    RankOptions,
    StoreOptions,
    config_dict,
    parse_config,
    user_errors,
)
from store.core import Store, StoreError, write_json
from trainers.selection.subsets import resolve_source, subset_name, subset_rows, write_subset

# Fields that do not change what an arm is: left out of the experiment's id, so changing them
# (more seeds, other bootstrap settings, another device) reuses the finished arms.
# How the work is shared (ranks, claim timeout) is not what it is either: every process started with
# the same command joins the same experiment.
NOT_IN_ID = (
    "store",
    "seeds",
    "arms",
    "n_boot",
    "n_perm",
    "stats_seed",
    "device",
    "model_cache",
    "progress",
    "rank",
    "world_size",
    "local_rank",
    "claim_timeout",
)


@dataclass(kw_only=True)
class SelectExperimentConfig(ArmTrainingOptions, StoreOptions, ModelOptions, RankOptions, ProgressOptions):
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

    def __post_init__(self) -> None:
        self.check_device()
        self.fill_ranks()
        self.check_training()
        for name in ("k", "seeds", "n_boot", "n_perm", "max_new_tokens", "gen_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_max_rows is not None and self.eval_max_rows <= 0:
            raise ValueError(f"--eval-max-rows must be positive, got {self.eval_max_rows}")
        if self.math_max_rows < 0:
            raise ValueError(f"--math-max-rows must be >= 0, got {self.math_max_rows}")
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


def _stored_result(store: Store, run_id: str, arm_ids: list[str]) -> dict[str, Any] | None:
    """The experiment's finished result JSON when it covers exactly these arms, else None."""
    path = store.run_dir(run_id) / "select_experiment.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("status") != "finished" or [f"s{a['seed']}-{a['arm']}" for a in doc["arms"]] != arm_ids:
        return None
    return doc


def run_select_experiment(cfg: SelectExperimentConfig) -> dict[str, Any]:
    """Plan, train the missing arms (each claimed: N processes share them), measure, summarize (see
    the module docstring)."""

    store = Store(cfg.store)
    if cfg.local_rank is not None and cfg.device in ("auto", "cuda"):
        cfg.device = str(pick_device(cfg.device, cfg.local_rank))  # one GPU per rank of a node
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
    units = ["base", *(a.arm_id for a in arms)]
    done = sa.finished(store, run_id)
    stored = _stored_result(store, run_id, units[1:])
    if stored is not None and all(u in done for u in units):
        print(f"nothing to do: selection experiment {run_id} is finished ({len(arms)} arms)")
        return stored
    # Every subset (cheap, deterministic) and the budget check before anything trains.
    subsets = {a.arm_id: write_subset(store, a.spec) for a in arms}
    sizes = {a.arm_id: len(subset_rows(store, subsets[a.arm_id])) for a in arms}
    budget = cfg.budget()
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
        store.run_dir(run_id) / "arms",
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
    common = {
        "selector": resolved,
        "base_adapter": base.name if base else None,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lr": cfg.lr,
        "eval_split": cfg.eval_split,
    }
    # The pre-declared budget, on disk before the first arm trains (replaced by the result; every
    # worker of the experiment writes the same document).
    write_json(
        store.run_dir(run_id) / "select_experiment.json",
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
    by_id = {a.arm_id: a for a in arms}
    prior = set(done)  # committed before this process started (reported as reused)

    def compute(arm_id: str) -> dict[str, Any]:
        if arm_id == "base":
            return {
                **common,
                "arm": "base",
                "seed": None,
                "subset": None,
                "adapter": base.name if base else None,
                "finetune_run_id": None,
                "n_train_rows": 0,
                "steps": 0,
                "epochs": 0,
                **measure.eval_loss(base_spec, "base"),
                **measure.downstream(base_spec),
            }
        arm = by_id[arm_id]
        trained = sa.train_arm(store, run_id, arm, subsets[arm_id], sizes[arm_id], base, budget, cfg, steps)
        return {
            **common,
            "arm": arm.name,
            "seed": arm.seed,
            "subset": subsets[arm_id],
            "n_train_rows": sizes[arm_id],
            **trained,
            **measure.eval_loss(trained["adapter"], arm_id),
            **measure.downstream(trained["adapter"]),
        }

        # Each unit (the base, then every arm) is claimed before it is computed (store.claims), so N
        # processes started with this command split them; a dead worker's claim is taken over.

    scope, timeout = f"select-{run_id}", cfg.claim_timeout

    sa.share_units(
        store,
        scope,
        units,
        lambda: sa.finished(store, run_id),
        lambda u: sa.commit(store, run_id, u, compute(u)),
        rank=cfg.rank,
        world_size=cfg.world_size,
        timeout=timeout,
        desc="selection arms",
        progress=cfg.progress,
    )
    # The summary, once: whoever gets here first with every unit committed writes it, the others find it.
    with claims.exclusive(store, scope, "summary", timeout):
        stored = _stored_result(store, run_id, units[1:])
        if stored is not None:
            return stored
        done = sa.finished(store, run_id)
        missing = [u for u in units if u not in done]
        if missing:
            raise StoreError(f"experiment {run_id}: units {missing} are not committed; rerun the same command")
        summary = summarize(cfg, done, comps, done["base"])
        title = f"{resolved}, k {cfg.k}, {cfg.seeds} seeds, {steps} steps"
        run_dir = store.run_dir(run_id)
        png = plot(summary, run_dir / "select_experiment.png", title, metric)
        measure.merge_compare(run_dir / "eval_loss_compare.json", units)
        result = result_doc(cfg, run_id, resolved, base, budget_doc, done, arms, subsets, sizes, prior, summary)
        result.update(downstream={"metric": metric, "rows": len(math_ids), "skipped_because": reason}, plot=str(png))
        record = {**config_dict(cfg), "run_id": run_id, "selector_resolved": resolved, "budget": budget_doc}
        with Run(
            store,
            "select_experiment",
            {**record, "base_adapter": common["base_adapter"], "steps": steps, "downstream_metric": metric},
            model_id=base.base_model if base else cfg.model,
            model_hash=base.base_hash if base else "",
            run_id=run_id,
        ) as run:
            write_json(run.dir / "select_experiment.json", result)
            pooled = {n: c["eval_loss"]["pooled"] for n, c in summary["comparisons"].items()}
            run.finish(
                counts={
                    "arms": len(arms),
                    "trained": result["trained_arms"],
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
