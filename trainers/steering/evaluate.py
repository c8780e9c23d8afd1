"""Steered generation and the held-out effect of steering vectors (trainers.steering's
`generate` and `evaluate`).

    python -m trainers.steering generate --layers 17 --alpha 4 --prompt-view "SELECT row_id FROM rows
        WHERE category = 'math' AND split = 'eval' ORDER BY row_id LIMIT 4"
    python -m trainers.steering generate --layers auto --top-k 2 --alpha 4   # the layer selector's top 2
    python -m trainers.steering evaluate --alpha 4 --splits eval attr_query
    python -m trainers.steering evaluate --alpha 4 --max-rows 8 --math-rows 6 --max-new-tokens 32   # CPU-sized

Generation is greedy (deterministic) from each row's prompt (`rows.prompt`, the conversation
before the final answer) with the chat template's generation prompt; the vector alpha * v_L
is added at every position of block L's output (trainers.steering.steer).

`evaluate` steers at each layer of the steering run alone, on held-out rows (--splits,
default eval; the vectors come from train_base), and reports, whatever their sign:

* log-prob: the change in each row's mean log-prob per completion token (teacher-forced on
  its stored tokens) under steering, per group (pos / neg of the steering run), and the
  effect = mean change of pos rows - mean change of neg rows (> 0: steering makes the
  good answers likelier relative to the poor ones). `layer_features.effect` is this number.
* math: on the split's math rows (answers recomputed from the question, trainers.finetune.math_check),
  the fraction of generated answers that are correct, steered vs unsteered, and the paired
  difference.
* baselines: unsteered, and a control vector of the same norm in a seeded random direction.

Every estimate has a bootstrap 95% CI (percentile, --n-boot resamples of rows with --seed;
groups resampled independently). Results: runs/<id>/steering_eval.json, table
`steering_effects`, PNGs steering_effect_by_layer.png and steering_math_by_layer.png, and the
steering run's `layer_features` rows get `effect` and the `best` label.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from extractors.gradnorm import row_tokens
from extractors.model import check_model_hash, load_model, pad_token_id
from store.catalog.runs import Run
from store.cli import (
    LayerOptions,
    ModelOptions,
    ProgressOptions,
    SeedOptions,
    StoreOptions,
    config_dict,
    parse_config,
)
from store.core import Store, StoreError, write_json
from store.materialize import view_sql
from trainers.finetune.math_check import stated_answer, true_answer
from trainers.plots import effect_by_layer
from trainers.steering.layer_selector import LayerSelector, run_features, top_k_layers, update_layer_features
from trainers.steering.vectors import load_steering, steer

EFFECTS_TABLE = "steering_effects"
GENERATIONS_TABLE = "steering_generations"


@dataclass(kw_only=True)
class GenerateConfig(StoreOptions, ModelOptions, LayerOptions):
    """Generate from rows' prompts with a steering vector added at chosen layers (--layers), or
    at the top --top-k layers of the layer selector (no --layers, or --layers auto). --model is
    the store's model (its hash is checked against the steering vectors' hidden states)."""

    layers: list[int] = field(
        default_factory=list, metadata={"default_help": "auto, the top --top-k layers of the layer selector"}
    )
    alpha: float = field(default=4.0, metadata={"help": "scale of the added vector (alpha * v_L)"})
    top_k: int = field(default=1, metadata={"help": "with --layers auto: how many layers"})
    steering: str = field(default="latest", metadata={"help": "steering compute run id, or latest"})
    layer_selector: str = field(
        default="latest",
        metadata={
            "help": "with --layers auto: a layer selector checkpoint, or latest (python -m trainers.layer_selector)"
        },
    )
    prompt_view: str = field(
        default="SELECT row_id FROM rows WHERE category = 'math' AND split = 'eval' ORDER BY row_id LIMIT 4",
        metadata={"help": "view or SQL returning row_id: whose prompts to continue"},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})

    def __post_init__(self) -> None:
        if [str(x).lower() for x in self.layers] == ["auto"]:  # the documented spelling of the default
            self.layers = []


def parse_generate(argv: list[str] | None, prog: str) -> GenerateConfig:
    """GenerateConfig from the command line, where `--layers auto` (as in the docs) means no --layers."""
    args = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(args):
        if args[i] in ("--layers", "--layer") and i + 1 < len(args) and args[i + 1].lower() == "auto":
            i += 2
            continue
        if args[i].lower() in ("--layers=auto", "--layer=auto"):
            i += 1
            continue
        out.append(args[i])
        i += 1
    return parse_config(GenerateConfig, out, prog=prog)


@dataclass(kw_only=True)
class EvaluateConfig(StoreOptions, ModelOptions, LayerOptions, SeedOptions, ProgressOptions):
    """Measure each layer's steering effect on held-out rows, each layer alone, with bootstrap
    95% CIs. --seed seeds the bootstrap and the control direction; --model is the store's model."""

    alpha: float = field(default=4.0, metadata={"help": "scale of the added vector (alpha * v_L)"})
    steering: str = field(default="latest", metadata={"help": "steering compute run id, or latest"})
    layers: list[int] = field(default_factory=list, metadata={"default_help": "every layer of the steering run"})
    splits: list[str] = field(default_factory=lambda: ["eval"], metadata={"help": "held-out splits to evaluate on"})
    max_rows: int = field(default=24, metadata={"help": "log-prob rows per group (first by row_id)"})
    math_rows: int = field(default=24, metadata={"help": "math rows whose generated answers are checked (0: none)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per math prompt"})
    control: bool = field(default=True, metadata={"help": "also steer with a random direction of the same norm"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward / generate call"})

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.n_boot < 1 or self.math_rows < 0:
            raise ValueError("--max-rows and --n-boot must be at least 1, --math-rows at least 0")


def load_lm(store: Store, cfg: ModelOptions, meta: dict[str, Any]) -> Any:
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    check_model_hash(
        lm, {"model_hash": meta.get("model_hash"), "model": meta.get("model_id")}, "the steering vectors' hidden states"
    )
    return lm


def prompts_of(store: Store, row_ids: list[str]) -> dict[str, list[dict]]:
    con = store.connect()
    try:
        con.register("wanted", pa.table({"row_id": row_ids}))
        t = con.sql("SELECT row_id, prompt FROM rows JOIN wanted USING (row_id)").to_arrow_table().to_pylist()
    finally:
        con.close()
    return {r["row_id"]: r["prompt"] for r in t}


def generate(lm: Any, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of chat prompts (left-padded batches)."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    out: list[str] = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        with torch.inference_mode():
            ids = lm.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok)
            )
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def completion_logprobs(lm: Any, rows: list[tuple[list[int], list[bool]]], batch_size: int) -> np.ndarray:
    """Each row's mean log-prob per supervised token, teacher-forced (right-padded, causal)."""
    out = np.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    pad = pad_token_id(lm.tokenizer)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        W = max(len(rows[i][0]) for i in idx)
        x = torch.full((len(idx), W), pad, dtype=torch.long)
        m = torch.zeros((len(idx), W), dtype=torch.bool)
        for j, i in enumerate(idx):
            x[j, : len(rows[i][0])] = torch.as_tensor(rows[i][0])
            m[j, : len(rows[i][1])] = torch.as_tensor(rows[i][1])
        m[:, 0] = False
        with torch.inference_mode():
            lp = torch.log_softmax(lm.model(input_ids=x.to(lm.device), use_cache=False).logits.float(), -1).cpu()
        tok_lp = lp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1) * m[:, 1:]
        means = tok_lp.sum(1) / m[:, 1:].sum(1).clamp(min=1)
        for j, i in enumerate(idx):
            out[i] = float(means[j])
    return out


def bootstrap(groups: list[np.ndarray], stat: Any, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of stat(*groups), resampling each group's rows independently."""
    est = float(stat(*groups))
    draws = np.array([stat(*(g[rng.integers(0, len(g), len(g))] for g in groups)) for _ in range(n_boot)])
    return est, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def control_vector(v: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    r = torch.randn(v.shape, generator=g)
    return r / r.norm() * v.norm()


def resolve_layers(store: Store, cfg: GenerateConfig, steering: Any) -> list[int]:
    if not cfg.layers:
        sel = (
            LayerSelector.load_latest(store)
            if cfg.layer_selector == "latest"
            else LayerSelector.load(cfg.layer_selector)
        )
        return top_k_layers(run_features(store, steering.run_id), cfg.top_k, sel)
    layers = list(cfg.layers)
    bad = [L for L in layers if L not in steering.vectors]
    if bad:
        raise StoreError(
            f"--layers {bad[0]}: steering run {steering.run_id} has vectors for layers "
            f"{sorted(steering.vectors)} only; compute it: python -m trainers.steering compute --layers {bad[0]}"
        )
    return layers


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    store = Store(cfg.store)
    st = load_steering(store, cfg.steering)
    layers = resolve_layers(store, cfg, st)
    rows = store.query(f"SELECT DISTINCT row_id FROM ({view_sql(store, cfg.prompt_view)}) ORDER BY row_id")
    if "row_id" not in rows.column_names or not rows.num_rows:
        raise StoreError(f"--prompt-view {cfg.prompt_view!r} must return row_id and select at least one row")
    ids = rows.column("row_id").to_pylist()
    prompts = prompts_of(store, ids)
    lm = load_lm(store, cfg, st.meta)
    with Run(
        store, "steering_generate", config_dict(cfg), model_id=lm.model_id, model_hash=lm.model_hash, layers=layers
    ) as run:
        base = generate(lm, [prompts[r] for r in ids], cfg.max_new_tokens, cfg.batch_size)
        with steer(lm.model, {L: st.vectors[L] for L in layers}, cfg.alpha):
            steered = generate(lm, [prompts[r] for r in ids], cfg.max_new_tokens, cfg.batch_size)
        recs = [
            {
                "run_id": run.run_id,
                "steering_run": st.run_id,
                "row_id": r,
                "layers": layers,
                "alpha": cfg.alpha,
                "prompt": prompts[r][-1]["content"],
                "unsteered": b,
                "steered": s,
            }
            for r, b, s in zip(ids, base, steered, strict=False)
        ]
        store.write_table(GENERATIONS_TABLE, pa.Table.from_pylist(recs), part=run.run_id)
        write_json(run.dir / "generations.json", recs)
        run.finish(counts={"prompts": len(ids)}, metrics={"layers": layers})
    return {"run_id": run.run_id, "layers": layers, "alpha": cfg.alpha, "generations": recs}


def print_generation(res: dict[str, Any]) -> None:
    print(
        f"steering at layers {res['layers']} with alpha {res['alpha']} (run {res['run_id']}, table {GENERATIONS_TABLE})"
    )
    for g in res["generations"]:
        print(f"--- {g['row_id']}: {g['prompt'][:160]}")
        print(f"  unsteered: {g['unsteered'][:240]!r}")
        print(f"  steered:   {g['steered'][:240]!r}")


def _groups(store: Store, st: Any, splits: list[str], n: int) -> dict[str, list[str]]:
    c = st.meta["config"]
    out = {}
    for g, pred in (("pos", c["pos_sql"]), ("neg", c["neg_sql"])):
        out[g] = (
            store.query(
                f"SELECT DISTINCT r.row_id FROM rows r JOIN split_members s USING (row_id) "
                f"WHERE list_contains(?, s.split) AND ({pred}) ORDER BY r.row_id LIMIT {int(n)}",
                [splits],
            )
            .column(0)
            .to_pylist()
        )
        if not out[g]:
            raise StoreError(f"no {'/'.join(splits)} rows match {pred!r}; pass other --splits")
    return out


Condition = tuple[str, int | None, torch.Tensor | None]  # (unsteered|steered|control, layer, vector)


class MathRows(NamedTuple):
    ids: list[str]  # math rows whose answer is recomputable from the question
    prompts: dict[str, list[dict]]
    truth: dict[str, int | None]


def math_rows(store: Store, cfg: EvaluateConfig) -> MathRows:
    """The --splits' math rows (at most --math-rows) whose answer trainers.finetune.math_check recomputes."""
    ids = (
        store.query(
            "SELECT DISTINCT r.row_id FROM rows r JOIN split_members s USING (row_id) WHERE "
            f"list_contains(?, s.split) AND r.category = 'math' ORDER BY r.row_id LIMIT {cfg.math_rows}",
            [cfg.splits],
        )
        .column(0)
        .to_pylist()
        if cfg.math_rows
        else []
    )
    prompts = prompts_of(store, ids)
    truth = {r: true_answer(prompts[r][-1]["content"]) for r in ids}
    return MathRows([r for r in ids if truth[r] is not None], prompts, truth)


def conditions(cfg: EvaluateConfig, st: Any, layers: list[int]) -> list[Condition]:
    """Unsteered, then per layer: steered (and, with --control, the random direction of the same norm)."""
    conds: list[Condition] = [("unsteered", None, None)]
    for L in layers:
        conds.append(("steered", L, st.vectors[L]))
        if cfg.control:
            conds.append(("control", L, control_vector(st.vectors[L], cfg.seed, L)))
    return conds


def measure(
    lm: Any, cfg: EvaluateConfig, conds: list[Condition], groups: dict[str, list[str]], toks: dict, math: MathRows
) -> tuple[dict, dict, dict]:
    """Per condition: each group's per-row log-probs, and the math rows' generations and correctness."""
    lp, correct, texts = {}, {}, {}
    bar = tqdm(total=len(conds), desc="steering evaluate", disable=not cfg.progress)
    for name, L, v in conds:
        ctx = steer(lm.model, {L: v}, cfg.alpha) if v is not None else steer(lm.model, {}, 0.0)
        with ctx:
            for g in ("pos", "neg"):
                lp[(name, L, g)] = completion_logprobs(lm, [toks[r] for r in groups[g]], cfg.batch_size)
            if math.ids:
                gen = generate(lm, [math.prompts[r] for r in math.ids], cfg.max_new_tokens, cfg.batch_size)
                texts[(name, L)] = gen
                correct[(name, L)] = np.array(
                    [stated_answer(t) == math.truth[r] for r, t in zip(math.ids, gen, strict=False)], float
                )
        bar.update(1)
    bar.close()
    return lp, correct, texts


def effect_rows(
    cfg: EvaluateConfig,
    run_id: str,
    st: Any,
    conds: list[Condition],
    lp: dict,
    correct: dict,
    n_math: int,
    rng: np.random.Generator,
) -> tuple[list[dict[str, Any]], dict, tuple[float, float, float] | None]:
    """The bootstrap estimates: (steering_effects rows, per (condition, layer) estimates, the
    unsteered math accuracy or None). Draws from `rng` in a fixed order, so --seed repeats them."""
    effects, per_layer = [], {}
    diff = lambda a, b: a.mean() - b.mean()  # noqa: E731
    for name, L, _ in conds[1:]:
        dp = lp[(name, L, "pos")] - lp[("unsteered", None, "pos")]
        dn = lp[(name, L, "neg")] - lp[("unsteered", None, "neg")]
        rec = {
            "effect": bootstrap([dp, dn], diff, cfg.n_boot, rng),
            "pos_change": bootstrap([dp], np.mean, cfg.n_boot, rng),
            "neg_change": bootstrap([dn], np.mean, cfg.n_boot, rng),
        }
        if n_math:
            rec["math_accuracy"] = bootstrap([correct[(name, L)]], np.mean, cfg.n_boot, rng)
            rec["math_change"] = bootstrap(
                [correct[(name, L)] - correct[("unsteered", None)]], np.mean, cfg.n_boot, rng
            )
        per_layer[(name, L)] = rec
        for metric, (e, lo, hi) in rec.items():
            effects.append(
                {
                    "run_id": run_id,
                    "steering_run": st.run_id,
                    "layer": L,
                    "alpha": cfg.alpha,
                    "condition": name,
                    "metric": metric,
                    "estimate": e,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_pos": len(dp),
                    "n_neg": len(dn),
                    "n_math": n_math,
                }
            )
    base_acc = bootstrap([correct[("unsteered", None)]], np.mean, cfg.n_boot, rng) if n_math else None
    if base_acc:
        effects.append(
            {
                "run_id": run_id,
                "steering_run": st.run_id,
                "layer": None,
                "alpha": cfg.alpha,
                "condition": "unsteered",
                "metric": "math_accuracy",
                "estimate": base_acc[0],
                "ci_low": base_acc[1],
                "ci_high": base_acc[2],
                "n_pos": 0,
                "n_neg": 0,
                "n_math": n_math,
            }
        )
    return effects, per_layer, base_acc


def plot_effects(run_dir: Path, cfg: EvaluateConfig, layers: list[int], per_layer: dict, n_math: int) -> list[str]:
    """steering_effect_by_layer.png (and steering_math_by_layer.png with math rows); their paths."""
    series = {"steered": tuple(np.array([per_layer[("steered", L)]["effect"][i] for L in layers]) for i in range(3))}
    if cfg.control:
        series["random direction, same norm"] = tuple(
            np.array([per_layer[("control", L)]["effect"][i] for L in layers]) for i in range(3)
        )
    png = effect_by_layer(
        layers,
        series,
        run_dir / "steering_effect_by_layer.png",
        "log-prob effect (pos change - neg change)",
        f"alpha {cfg.alpha}, {'/'.join(cfg.splits)}",
    )
    pngs = [str(png)]
    if n_math:
        ms = {
            n: tuple(np.array([per_layer[(n, L)]["math_change"][i] for L in layers]) for i in range(3))
            for n in (["steered", "control"] if cfg.control else ["steered"])
        }
        pngs.append(
            str(
                effect_by_layer(
                    layers,
                    ms,
                    run_dir / "steering_math_by_layer.png",
                    "math accuracy change (steered - unsteered)",
                    f"alpha {cfg.alpha}",
                )
            )
        )
    return pngs


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    store = Store(cfg.store)
    st = load_steering(store, cfg.steering)
    layers = cfg.layers or sorted(st.vectors)
    bad = [L for L in layers if L not in st.vectors]
    if bad:
        raise StoreError(f"--layers {bad[0]}: steering run {st.run_id} has layers {sorted(st.vectors)}")
    groups = _groups(store, st, cfg.splits, cfg.max_rows)
    tz = store.query("SELECT tokenization FROM tokenizations ORDER BY created_at DESC LIMIT 1").column(0)[0].as_py()
    toks = row_tokens(store, tz, groups["pos"] + groups["neg"])
    math = math_rows(store, cfg)
    lm = load_lm(store, cfg, st.meta)
    conds = conditions(cfg, st, layers)
    rng = np.random.default_rng(cfg.seed)
    with Run(
        store,
        "steering_evaluate",
        {**config_dict(cfg), "steering_run": st.run_id},
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=layers,
    ) as run:
        lp, correct, texts = measure(lm, cfg, conds, groups, toks, math)
        effects, per_layer, base_acc = effect_rows(cfg, run.run_id, st, conds, lp, correct, len(math.ids), rng)
        store.write_table(EFFECTS_TABLE, pa.Table.from_pylist(effects), part=run.run_id)
        eff = {L: per_layer[("steered", L)]["effect"] for L in layers}
        best = max(layers, key=lambda L: (eff[L][0], -L))
        update_layer_features(
            store,
            st.run_id,
            {
                L: {
                    "effect": e[0],
                    "effect_ci_low": e[1],
                    "effect_ci_high": e[2],
                    "math_change": per_layer[("steered", L)].get("math_change", (None,))[0],
                }
                for L, e in eff.items()
            },
            best,
            run.run_id,
        )
        pngs = plot_effects(run.dir, cfg, layers, per_layer, len(math.ids))
        result = {
            "run_id": run.run_id,
            "steering_run": st.run_id,
            "alpha": cfg.alpha,
            "layers": layers,
            "best": best,
            "n_pos": len(groups["pos"]),
            "n_neg": len(groups["neg"]),
            "n_math": len(math.ids),
            "unsteered_math_accuracy": base_acc,
            "per_layer": {f"{n}@{L}": v for (n, L), v in per_layer.items()},
            "plots": pngs,
            "math_generations": {f"{n}@{L}": t for (n, L), t in texts.items()},
        }
        write_json(run.dir / "steering_eval.json", result)
        run.finish(
            counts={"pos_rows": len(groups["pos"]), "neg_rows": len(groups["neg"]), "math_rows": len(math.ids)},
            metrics={k: v for k, v in result.items() if k != "math_generations"},
        )
    return result


def _ci(t: tuple[float, float, float], pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:+.4f}")
    return f"{f(t[0])} [{f(t[1])}, {f(t[2])}]"


def print_evaluation(res: dict[str, Any]) -> None:
    print(
        f"steering run {res['steering_run']}, alpha {res['alpha']}: {res['n_pos']} pos / {res['n_neg']} neg held-out "
        f"rows, {res['n_math']} math rows (estimate [95% CI])"
    )
    if res["unsteered_math_accuracy"]:
        a = res["unsteered_math_accuracy"]
        print(f"unsteered math accuracy {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]")
    for key, r in res["per_layer"].items():
        line = f"{key}: log-prob effect {_ci(r['effect'])} (pos {_ci(r['pos_change'])}, neg {_ci(r['neg_change'])})"
        if "math_change" in r:
            line += f"; math accuracy {r['math_accuracy'][0]:.3f}, change {_ci(r['math_change'], pct=True)}"
        print(line)
    print(f"best layer by log-prob effect: {res['best']}; run {res['run_id']}; plots {', '.join(res['plots'])}")
