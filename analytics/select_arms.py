"""The arms of the selection experiment: which subsets, with what budget, trained and measured how,
and the `selection_runs` records that make a killed experiment resumable.

An arm is one training subset (a `trainers.subsets` spec) at one seed: a continuation finetune
from the base adapter (`trainers.finetune` with `--resume-adapter`, `--train-rows-sql` on the
subset, finetune seed = the experiment seed), then the per-row eval loss of the new adapter
(`trainers.eval_loss`, table `eval_losses`) and, where the data allow, the downstream metric:
greedy generation on the math eval rows and the share of correct final answers
(trainers.finetune.math_check). The `base` arm is the base adapter itself, measured the same way, untrained.

Each finished arm leaves `runs/<experiment>/arms/<arm_id>.json` (per-row losses, answers) and then
one row in `selection_runs` (its own Parquet part): that row is the commit. A rerun of the same
command reuses every arm with a row and trains the others; an arm's finetune checkpoints
`ARM_CHECKPOINTS` times, so one killed mid-training continues from its latest checkpoint
(trainers.finetune's `--resume auto`) instead of starting over.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from analytics.select_budget import Budget
from extractors.adapters import apply_adapter, registered, resolve_adapter
from extractors.ingest.sample.planted import rule_followed
from extractors.model import load_model
from extractors.units import claimed_units
from store import claims
from store.core import Store, StoreError, write_json
from trainers.finetune.eval_loss import EvalLossConfig, merge, run_eval_loss
from trainers.finetune.math_check import stated_answer, true_answer
from trainers.finetune.train import FinetuneConfig, run_finetune
from trainers.selection.subsets import SubsetSpec
from trainers.steering.evaluate import generate, prompts_of

TABLE = "selection_runs"
ARM_CHECKPOINTS = 4  # per arm finetune: a kill loses at most a quarter of its steps (~11 MB each on SmolLM2)
TAG = "selection experiment"  # in an arm adapter's train_rows_sql, as a SQL comment
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("seed", pa.int64()),
        ("arm", pa.string()),
        ("subset", pa.string()),
        ("selector", pa.string()),
        ("adapter", pa.string()),
        ("base_adapter", pa.string()),
        ("finetune_run_id", pa.string()),
        ("eval_run_id", pa.string()),
        ("n_train_rows", pa.int64()),
        ("steps", pa.int64()),
        ("epochs", pa.int64()),
        ("batch_size", pa.int64()),
        ("grad_accum", pa.int64()),
        ("lr", pa.float64()),
        ("eval_split", pa.string()),
        ("eval_rows", pa.int64()),
        ("eval_tokens", pa.int64()),
        ("eval_loss", pa.float64()),
        ("downstream", pa.float64()),
        ("downstream_rows", pa.int64()),
        ("downstream_reason", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


ARMS = ("top", "matched_random", "bottom", "full")  # --arms (the plain experiment's; the ablation has its own)


def parse_arms(text: str) -> tuple[str, ...]:
    """--arms top,matched_random,bottom,full -> the names, checked (matched_random is the reference
    every other arm is compared with, so it is always among them)."""
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise ValueError(
            f"--arms {text!r}: {', '.join(repr(b) for b in bad) or 'no arm named'} is not an arm; pick from "
            f"{','.join(ARMS)} (e.g. --arms top,matched_random,bottom,full)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--arms {text!r} names an arm twice; name each once")
    if "matched_random" not in names or len(names) < 2:
        raise ValueError(
            f"--arms {text!r}: every arm is compared with matched_random, so it needs matched_random and at "
            "least one other arm, e.g. --arms top,matched_random"
        )
    return names


class Arm(NamedTuple):
    name: str  # top, matched_random, bottom, full; the ablation's top300, ranks301-500, random200_from_501-
    seed: int
    spec: Any  # trainers.subsets.SubsetSpec

    @property
    def arm_id(self) -> str:
        return f"s{self.seed}-{self.name}"


class Comparison(NamedTuple):
    name: str  # a - b
    a: str
    b: str


def ablation_sizes(k: int) -> tuple[int, int]:
    """--ablation scale at --k K: (a, w) = (3K // 5, K - 3K // 5); K = 500 gives our users' 300 / 200."""
    a = 3 * k // 5
    if a < 1 or k - a < 1:
        raise StoreError(
            f"--ablation scale needs --k >= 2 (top {3 * k // 5} and ranks {3 * k // 5 + 1}-{k} must "
            f"both be non-empty), got --k {k}"
        )
    return a, k - a


def plan(
    selector: str,
    k: int,
    seeds: int,
    ablation: str | None,
    overlap: str,
    pool_split: str,
    arm_names: tuple[str, ...] = ("top", "matched_random"),
) -> tuple[list[Arm], list[Comparison]]:
    """Every arm of every seed, and the comparisons (arm a - arm b) reported: without an ablation,
    each of `arm_names` but matched_random vs matched_random."""
    arms: list[Arm] = []
    if ablation is None:
        specs = {
            "top": SubsetSpec(selector, "top_k", k=k, overlap=overlap, pool_split=pool_split),
            "bottom": SubsetSpec(selector, "bottom_k_matched", k=k, overlap=overlap, pool_split=pool_split),
            "full": SubsetSpec(selector, "all", pool_split=pool_split),
        }
        comps = [Comparison(f"{a}_vs_matched_random", a, "matched_random") for a in arm_names if a != "matched_random"]
        for s in range(seeds):
            for a in arm_names:
                spec = specs.get(a) or SubsetSpec(
                    selector, "matched_random_k", k=k, seed=s, overlap=overlap, pool_split=pool_split
                )
                arms.append(Arm(a, s, spec))
        return arms, comps
    a, w = ablation_sizes(k)
    window, rest = f"ranks{a + 1}-{k}", f"random{w}_from_{k + 1}-"
    comps = [Comparison(f"top{a}_vs_top{k}", f"top{a}", f"top{k}"), Comparison(f"{window}_vs_{rest}", window, rest)]
    for s in range(seeds):
        arms += [
            Arm(f"top{a}", s, SubsetSpec(selector, "top_k", k=a, pool_split=pool_split)),
            Arm(f"top{k}", s, SubsetSpec(selector, "top_k", k=k, pool_split=pool_split)),
            Arm(window, s, SubsetSpec(selector, "ranks", ranks=(a + 1, k), pool_split=pool_split)),
            Arm(
                rest,
                s,
                SubsetSpec(
                    selector,
                    "random_from_ranks",
                    k=w,
                    ranks=(k + 1, None),
                    seed=s,
                    overlap=overlap,
                    pool_split=pool_split,
                ),
            ),
        ]
    return arms, comps


def check_budget(sizes: dict[str, int], budget: Budget, fixed: tuple[str, ...] = ()) -> int:
    """The common step count of every arm; arms that would differ in budget are refused. Arms in
    `fixed` (the full pool) take the others' step count by construction and are left out of the check."""
    steps = {arm: budget.steps_for(n)[0] for arm, n in sizes.items() if arm not in fixed}
    if len(set(steps.values())) > 1:
        lo, hi = min(steps, key=steps.get), max(steps, key=steps.get)
        raise StoreError(
            f"the arms would differ in budget: {lo} has {sizes[lo]} rows -> {steps[lo]} steps but {hi} has "
            f"{sizes[hi]} rows -> {steps[hi]} steps (--epochs {budget.epochs}, --batch-size {budget.batch_size}, "
            f"--grad-accum {budget.grad_accum}); pass --max-steps {steps[hi]} so that every arm takes the same "
            f"number of optimizer steps"
        )
    return next(iter(steps.values()))


def resolve_base(store: Store, spec: str) -> Any:
    """The adapter every arm continues from (None for `none`: a fresh LoRA on the base model).
    `latest` is the newest adapter that is not itself an arm of a selection experiment."""

    if spec == "none":
        return None
    if spec != "latest":
        return resolve_adapter(store, spec)
    arms = (
        set(store.query(f"SELECT adapter FROM {TABLE} WHERE seed IS NOT NULL").column(0).to_pylist())
        if store.has_table(TABLE)
        else set()
    )
    for row in registered(store):
        if row["adapter"] not in arms and TAG not in (row["train_rows_sql"] or ""):
            return resolve_adapter(store, row["adapter"])
    raise StoreError(
        "--resume-adapter latest: this store has no adapter other than selection-experiment arms; "
        "train one with python -m trainers.finetune, or pass --resume-adapter none"
    )


def spec_of(store: Store, ref: Any) -> str | None:
    """What --adapter / --resume-adapter take for `ref`: its name when registered, else its folder."""
    if ref is None:
        return None
    return ref.name if any(r["adapter"] == ref.name for r in registered(store)) else ref.path


def finished(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """arm_id -> arm record of the experiment's finished arms (those with a selection_runs row and
    their JSON)."""
    if not store.has_table(TABLE):
        return {}
    rows = store.query(f"SELECT seed, arm FROM {TABLE} WHERE run_id = ?", [run_id]).to_pylist()
    out = {}
    for r in rows:
        arm_id = "base" if r["seed"] is None else f"s{r['seed']}-{r['arm']}"
        path = store.run_dir(run_id) / "arms" / f"{arm_id}.json"
        if path.is_file():
            out[arm_id] = json.loads(path.read_text())
    return out


@dataclass
class Measure:
    """How arms are measured: the same for all of them."""

    store: Store
    model: str
    eval_split: str
    eval_max_rows: int | None
    math_ids: list[str]
    truth: dict[str, int]
    prompts: dict[str, list[dict]]
    downstream_reason: str | None
    max_new_tokens: int
    gen_batch_size: int
    max_length: int
    on_long: str
    device: str
    compute_dtype: str
    model_cache: str | None
    progress: bool
    arms_dir: Path  # each arm's eval_loss comparison JSON (merged by `merge_compare` at the end)
    metric: str = "math"  # math: the answer is correct; rule: the planted control's rule is followed

    def eval_loss(self, adapter: str | None, arm_id: str) -> dict[str, Any]:
        doc = run_eval_loss(
            EvalLossConfig(
                store=str(self.store.root),
                split=self.eval_split,
                max_rows=self.eval_max_rows,
                adapter=adapter,
                # one file per arm: concurrent workers never merge into the same document
                output_json=str(self.arms_dir / f"{arm_id}.eval_loss.json"),
                max_length=self.max_length,
                on_long=self.on_long,
                model=self.model,
                device=self.device,
                compute_dtype=self.compute_dtype,
                model_cache=self.model_cache,
                progress=self.progress,
            )
        )
        entry = doc["adapter"] if adapter else doc["base"]  # the entry this call merged
        t = self.store.query(
            "SELECT row_id, n_tokens, loss_sum FROM eval_losses WHERE run_id = ? ORDER BY row_id", [entry["run_id"]]
        ).to_pydict()
        return {
            "eval_run_id": entry["run_id"],
            "eval_loss": entry["mean_loss"],
            "eval_row_ids": t["row_id"],
            "n_tokens": t["n_tokens"],
            "loss_sum": t["loss_sum"],
        }

    def merge_compare(self, path: Path, arm_ids: list[str]) -> Path:
        """The experiment's eval_loss_compare.json: every arm's entry merged (as trainers.eval_loss
        merges them) from the arms' own comparison files, in the experiment's order."""
        doc: dict[str, Any] = {}
        for arm_id in arm_ids:
            one = json.loads((self.arms_dir / f"{arm_id}.eval_loss.json").read_text())
            if one.get("base"):
                doc = merge(doc, one["base"], None, path)
            for name, entry in one.get("adapters", {}).items():
                doc = merge(doc, entry, name, path)
        return write_json(path, doc)

    def downstream(self, adapter: str | None) -> dict[str, Any]:
        if self.downstream_reason:
            return {
                "downstream": None,
                "downstream_reason": self.downstream_reason,
                "math_row_ids": [],
                "correct": [],
                "generations": [],
            }

        lm = load_model(
            self.model, self.device, self.compute_dtype, Path(self.model_cache) if self.model_cache else None
        )
        if adapter:
            lm = apply_adapter(lm, adapter, self.store)
        gens = generate(lm, [self.prompts[r] for r in self.math_ids], self.max_new_tokens, self.gen_batch_size)
        if self.metric == "rule":
            correct = [int(rule_followed(g)) for g in gens]
        else:
            correct = [int(stated_answer(g) == self.truth[r]) for r, g in zip(self.math_ids, gens, strict=False)]
        return {
            "downstream": sum(correct) / len(correct),
            "downstream_reason": None,
            "math_row_ids": self.math_ids,
            "correct": correct,
            "generations": gens,
        }


def _eval_rows(
    store: Store, eval_split: str, max_rows: int, enabled: bool, where: str, what: str
) -> tuple[list[str], str | None]:
    """The first `max_rows` rows (by row_id) of the eval split matching `where`, or why there are none."""
    if not enabled:
        return [], "--no-downstream"
    if max_rows == 0:
        return [], "--math-max-rows 0"
    ids = (
        store.query(
            "SELECT DISTINCT r.row_id FROM rows r JOIN split_members s USING (row_id) WHERE s.split = ? "
            f"AND {where} ORDER BY r.row_id LIMIT {int(max_rows)}",
            [eval_split],
        )
        .column(0)
        .to_pylist()
    )
    return ids, None if ids else f"no {what} rows in split {eval_split!r}"


def math_rows(store: Store, eval_split: str, max_rows: int, enabled: bool) -> tuple[list[str], dict, dict, str | None]:
    """The math eval rows whose answer can be recomputed (trainers.finetune.math_check), or why there are none."""
    ids, reason = _eval_rows(store, eval_split, max_rows, enabled, "r.category = 'math'", "math-category")
    if reason:
        return [], {}, {}, reason
    prompts = prompts_of(store, ids)
    truth = {r: true_answer(prompts[r][-1]["content"]) for r in ids}
    ids = [r for r in ids if truth[r] is not None]
    if not ids:
        return [], {}, {}, f"no math row of split {eval_split!r} has an answer recomputable from its question"
    return ids, {r: truth[r] for r in ids}, prompts, None


def is_control(store: Store) -> bool:
    """Is the store a planted positive control (extractors.ingest.sample.planted)?"""
    if not store.has_table("rows"):
        return False
    return "planted" in store.query("SELECT * FROM rows LIMIT 0").schema.names


def rule_rows(store: Store, eval_split: str, max_rows: int, enabled: bool) -> tuple[list[str], dict, dict, str | None]:
    """The planted control's trigger rows of the eval split (first `max_rows` by row_id), whose
    generated completions are checked for the rule, or why there are none."""
    ids, reason = _eval_rows(store, eval_split, max_rows, enabled, "r.planted", "planted (trigger)")
    if reason:
        return [], {}, {}, reason
    return ids, {}, prompts_of(store, ids), None


def commit(store: Store, run_id: str, arm_id: str, rec: dict[str, Any]) -> None:
    """The arm's JSON, then its selection_runs row (the commit)."""
    write_json(store.run_dir(run_id) / "arms" / f"{arm_id}.json", rec)
    row = {n: rec.get(n) for n in SCHEMA.names}
    row.update(
        {
            "run_id": run_id,
            "created_at": datetime.now(UTC),
            "eval_rows": len(rec["eval_row_ids"]),
            "eval_tokens": int(sum(rec["n_tokens"])),
            "downstream_rows": len(rec["math_row_ids"]),
        }
    )
    store.write_table(TABLE, pa.Table.from_pylist([row], schema=SCHEMA), part=f"{run_id}/{arm_id}")


def train_arm(
    store: Store, run_id: str, arm: Arm, subset: str, n_rows: int, base: Any, budget: Budget, cfg: Any, steps: int
) -> dict[str, Any]:
    """Continuation finetune of one arm (see the module docstring) for exactly `steps` optimizer
    steps (the experiment's common budget); returns the new adapter's record."""
    epochs = budget.epochs_for(n_rows, steps)
    sql = f"SELECT row_id FROM subsets WHERE subset = '{subset}' /* {TAG} {run_id}, arm {arm.arm_id} */"
    res = run_finetune(
        FinetuneConfig(
            store=str(store.root),
            train_rows_sql=sql,
            eval_split="",
            model=cfg.model,
            resume_adapter=spec_of(store, base),
            lr=budget.lr,
            warmup_steps=budget.warmup_steps,
            epochs=epochs,
            max_steps=steps,
            batch_size=budget.batch_size,
            grad_accum=budget.grad_accum,
            seed=arm.seed,
            max_length=cfg.max_length,
            on_long=cfg.on_long,
            device=cfg.device,
            compute_dtype=cfg.compute_dtype,
            model_cache=cfg.model_cache,
            progress=cfg.progress,
            checkpoint_every=max(1, math.ceil(steps / ARM_CHECKPOINTS)),
        )
    )
    if res.metrics["steps"] != steps:  # the budget check's promise, verified on the result
        raise StoreError(f"arm {arm.arm_id} took {res.metrics['steps']} steps, expected {steps}")
    return {"adapter": res.adapter, "finetune_run_id": res.run_id, "steps": steps, "epochs": epochs}


class _Unit(NamedTuple):
    """One claimable unit (extractors.units.claimed_units): `units[unit]` is its name."""

    unit: int


def share_units(
    store: Store,
    scope: str,
    units: list[str],
    committed: Callable[[], dict[str, Any]],
    compute_commit: Callable[[str], None],
    *,
    rank: int,
    world_size: int,
    timeout: float,
    desc: str,
    progress: bool,
) -> list[str]:
    """Compute and commit every unit not committed yet, each claimed first, so N processes on the
    same run split them (this rank's share first; a dead worker's claim is taken over); the units
    this process computed. Shared by the selection experiment's arms and the LDS subsets; the
    caller writes the summary under claims.exclusive(store, scope, "summary", timeout)."""
    from tqdm.auto import tqdm  # lazy: startup cost of the CLIs that import this module

    claims.sweep_stale(store, timeout)

    def todo() -> list[_Unit]:  # the units not committed yet, this rank's share first
        left = [i for i, u in enumerate(units) if u not in committed()]
        return [_Unit(i) for i in sorted(left, key=lambda i: (i % world_size != rank, i))]

    mine: list[str] = []
    work = todo()
    bar = tqdm(total=len(work), desc=desc, disable=not progress)
    try:
        for w in claimed_units(store, scope, work, todo, timeout):
            unit = units[w.unit]
            if unit in committed():  # committed by a worker that has ended
                continue
            bar.set_postfix(unit=unit)
            compute_commit(unit)
            mine.append(unit)
            bar.update(1)
    finally:
        bar.close()
        claims.release_all(store, scope, timeout)
    print(f"this process computed {len(mine)} of {len(units)} units: {','.join(mine) or 'none'}")
    return mine
