"""LoRA supervised finetuning on the store's own tokens: the `python -m trainers.finetune` command.

    python -m trainers.finetune --split train_base --eval-split eval            # embedded model + store
    python -m trainers.finetune --store /tmp/st --max-rows 64 --epochs 1 --batch-size 8 --eval-max-rows 16  # CPU-sized
    python -m trainers.finetune --train-rows-sql "SELECT row_id FROM subsets WHERE subset = 'attr-top50-...'"
    python -m trainers.finetune --resume-adapter latest --epochs 1              # continue an adapter
    python -m trainers.finetune --checkpoint-every 50   # checkpoints; after a kill, rerun the same command

It trains a peft LoRA adapter on the stored chat-template token ids (the `tokens` table, our
users' "finetune_raw" tokenization: nothing is re-rendered) with a completion-only loss: every
token whose `is_supervised` is false (prompt, template, special) is labelled -100 (see
extractors.sft_data). The loss of an optimizer step is the mean over all supervised tokens of
its `--batch-size` x `--grad-accum` rows (token-weighted, as transformers.Trainer does).
Rows longer than `--max-length` are an error, or cut with `--on-long truncate` (counted).

Outputs in runs/<run_id>/: `adapter/` (peft's format plus the tokenizer and store_adapter.json;
`peft.PeftModel.from_pretrained(base, folder)` opens it without this package),
`train_metrics.json` (train loss per step, eval loss per epoch, epoch 0 = before training),
`loss_curve.png`; a `runs` record (kind finetune) and a row in the `adapters` table whose
name (the run id) is what `--adapter` takes in trainers.eval_loss and extractors.run.
CPU (fp32) works for a few hundred steps on the embedded model; a GPU trains in bf16.

Resume (trainers.finetune.checkpoint): `--checkpoint-every N` writes a checkpoint every N steps
and after each epoch's eval; `--resume auto` (the default) continues the newest unfinished
finetune run with the same settings that has one, `--resume RUN_ID` a named one (its settings
must match), `--resume never` starts afresh. On CPU the result is bit-identical to a run never
interrupted.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from extractors.adapters import AdapterRef, check_base, resolve_adapter, write_adapter_record, write_meta
from extractors.chat_tokens import ensure_tokenization
from extractors.model import load_model, pad_token_id
from extractors.sft_data import SFTRows, load_sft_rows, select_rows_by
from store.catalog.runs import Run
from store.cli import ModelOptions, ProgressOptions, SeedOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from trainers.finetune import checkpoint as ckpt
from trainers.finetune.lm_loss import batches, eval_rows, row_losses
from trainers.resume import claim


@dataclass(kw_only=True)
class FinetuneConfig(StoreOptions, ModelOptions, SeedOptions, ProgressOptions):
    """LoRA finetune (peft) on stored tokens with a completion-only loss.

    --seed seeds the LoRA init, dropout and row order; --compute-dtype is the base model's
    dtype (the LoRA weights stay fp32)."""

    split: str = field(default="train_base", metadata={"help": "rows to train on (a split, or all)"})
    train_rows_sql: str | None = field(
        default=None,
        metadata={
            "help": "train on the rows this SQL returns "
            "(a row_id column, e.g. from the subsets table) instead of --split"
        },
    )
    eval_split: str = field(
        default="eval",
        metadata={"help": "rows whose loss is measured before training and after each epoch ('' skips it)"},
    )
    max_rows: int | None = field(
        default=None, metadata={"help": "train on the first N selected rows by row_id (a fixed pseudo-random sample)"}
    )
    eval_max_rows: int | None = field(default=None, metadata={"help": "measure eval loss on the first N eval rows"})
    max_length: int = field(default=2048, metadata={"help": "longest row in tokens (see --on-long)"})
    on_long: Literal["error", "truncate"] = field(
        default="error",
        metadata={"help": "rows longer than --max-length: error, or truncate them (counted in the run record)"},
    )
    resume_adapter: str | None = field(
        default=None,
        metadata={
            "help": "continue training this adapter (a name "
            "from the adapters table, latest, or a peft folder); its LoRA settings "
            "win over --lora-*"
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names LoRA wraps (peft's target_modules), default q_proj k_proj v_proj o_proj"},
    )
    lr: float = field(default=2e-4, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up; then linear decay to 0"})
    epochs: int = field(default=1, metadata={"help": "passes over the training rows"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 disables)"})
    eval_batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per eval batch"})
    checkpoint_every: int | None = field(
        default=None,
        metadata={
            "help": "optimizer steps between checkpoints (adapter, AdamW, RNG states, row-order position; "
            "safetensors + JSON in runs/<id>/checkpoints), plus one after each epoch's eval; the latest and "
            "the best by eval loss are kept; leave it out for none"
        },
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "auto (continue the newest unfinished finetune run with the same settings, if it has a "
            "checkpoint), never (always a new run), or a RUN_ID to continue (its settings must match)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_length", "lora_r", "epochs", "batch_size", "grad_accum", "eval_batch_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_rows", "eval_max_rows", "max_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("--warmup-steps and --max-grad-norm must be >= 0")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(
                f"--checkpoint-every must be a positive number of optimizer steps, got {self.checkpoint_every}; "
                f"leave it out for no checkpoints"
            )


class FinetuneResult(NamedTuple):
    run_id: str
    adapter: str  # its name in the adapters table
    path: str  # the peft folder
    metrics: dict[str, Any]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (as transformers')."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def _peft_model(lm: Any, cfg: FinetuneConfig, store: Store) -> tuple[Any, AdapterRef | None]:
    from peft import LoraConfig, PeftModel, get_peft_model  # lazy: peft is optional and heavy

    torch.manual_seed(cfg.seed)
    if cfg.resume_adapter:
        ref = resolve_adapter(store, cfg.resume_adapter)
        check_base(ref, lm.model_id, lm.model_hash)
        return PeftModel.from_pretrained(lm.model, ref.path, is_trainable=True), ref
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(lm.model, lora), None
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise StoreError(f"--target-modules {' '.join(cfg.target_modules)}: {e}") from e


def eval_loss_of(
    model: Any, data: Any, cfg: FinetuneConfig, device: torch.device, pad_id: int, desc: str
) -> dict[str, Any]:
    sums, counts = eval_rows(
        model,
        data.input_ids,
        data.labels,
        device=device,
        pad_id=pad_id,
        batch_tokens=cfg.eval_batch_tokens,
        progress=cfg.progress,
        desc=desc,
    )
    n = sum(counts)
    loss = sum(sums) / n if n else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if n else float("nan"),
        "supervised_tokens": n,
        "rows": len(counts),
    }


class TrainLog(NamedTuple):
    steps: list[dict[str, Any]]  # one entry per optimizer step
    evals: list[dict[str, Any]]  # eval loss before training (epoch 0) and after each epoch
    n_steps: int
    tokens_seen: int
    seconds: float  # time in optimizer steps (eval excluded)
    resumed_from_step: int | None  # the checkpoint a resumed run started from
    checkpoints: list[dict[str, Any]]  # what this process wrote: step, bytes, seconds


def _rows(
    store: Store, cfg: FinetuneConfig, tokenization: str, train_ids: list[str], eval_ids: list[str]
) -> tuple[SFTRows, SFTRows | None]:
    """The training rows (and eval rows, or None) as token ids + completion-only labels."""
    train = load_sft_rows(store, tokenization, train_ids, max_length=cfg.max_length, on_long=cfg.on_long)
    evald = (
        load_sft_rows(store, tokenization, eval_ids, max_length=cfg.max_length, on_long=cfg.on_long)
        if eval_ids
        else None
    )
    if sum(train.n_supervised) == 0:
        raise StoreError(
            f"the {len(train_ids)} training rows have no supervised tokens (is_supervised); "
            f"select rows with an assistant completion"
        )
    return train, evald


def _optimizer_step(
    model: Any,
    opt: Any,
    train: SFTRows,
    n_sup: list[int],
    group: list[int],
    lr: float,
    cfg: FinetuneConfig,
    dev: torch.device,
    pad_id: int,
) -> tuple[float, float, int]:
    """One optimizer step over a group of rows: (loss, grad norm, supervised tokens). The loss
    is the mean over the group's supervised tokens, accumulated over its micro-batches."""
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for g in trainable:
        g.grad = None
    n_group = sum(n_sup[i] for i in group)
    loss_total = 0.0
    for micro in batches(group, cfg.batch_size):
        if not any(n_sup[i] for i in micro):
            continue
        s, _ = row_losses(
            model,
            [train.input_ids[i] for i in micro],
            [train.labels[i] for i in micro],
            device=dev,
            pad_id=pad_id,
        )
        loss = s.sum() / max(1, n_group)
        loss.backward()
        loss_total += float(loss.detach())
    gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)) if cfg.max_grad_norm else float("nan")
    for pg in opt.param_groups:
        pg["lr"] = lr
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return loss_total, gnorm, n_group


def _train(
    model: Any,
    cfg: FinetuneConfig,
    train: SFTRows,
    evald: SFTRows | None,
    total: int,
    dev: torch.device,
    pad_id: int,
    plan: ckpt.Plan,
) -> TrainLog:
    """The epochs: seeded row order, optimizer steps, eval loss before and after each epoch;
    checkpoints every `plan.every` steps and after each epoch's eval, or a resume from one."""
    n_sup = train.n_supervised
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_step = cfg.batch_size * cfg.grad_accum
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    steps_log: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    written: list[dict[str, Any]] = []
    step, tokens_seen, t_train, start_epoch, start_pos, order = 0, 0, 0.0, 1, 0, None
    resumed: int | None = None
    if plan.resume_from is not None:
        doc, saved_order = ckpt.load_checkpoint(plan.resume_from, model, opt)
        if doc["rows"] != plan.rows or doc["total_steps"] != total:
            raise StoreError(
                f"checkpoint {plan.resume_from} was written for other training or eval rows (the selection "
                f"returns other rows now); start a new run with --resume never"
            )
        rng.bit_generator.state = doc["row_order_rng"]
        step, tokens_seen, t_train = doc["step"], doc["tokens_seen"], doc["train_seconds"]
        resumed = step
        steps_log, evals = doc["train"], doc["eval"]
        start_epoch, start_pos = doc["epoch"], doc["position"]
        order = saved_order
        if doc["epoch_done"]:
            start_epoch, start_pos, order = start_epoch + 1, 0, None
    elif evald is not None:
        evals.append({"epoch": 0, "step": 0, **eval_loss_of(model, evald, cfg, dev, pad_id, "eval (before)")})

    def checkpoint(epoch: int, position: int, epoch_done: bool, eval_loss: float | None) -> None:
        doc = {
            "step": step,
            "epoch": epoch,
            "position": position,
            "epoch_done": epoch_done,
            "eval_loss": eval_loss,
            "row_order_rng": rng.bit_generator.state,
            "lr_schedule": {"kind": "linear warm-up, linear decay to 0", "warmup_steps": cfg.warmup_steps},
            "total_steps": total,
            "rows": plan.rows,
            "tokens_seen": tokens_seen,
            "train_seconds": t_train,
            "train": steps_log,
            "eval": evals,
        }
        w = ckpt.save_checkpoint(plan.run_dir, model, opt, order, doc)
        written.append({"step": step, "bytes": w.bytes, "seconds": w.seconds})
        plan.sync()

    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not cfg.progress)
    model.train()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if step >= total:
            break
        if order is None:
            order = [int(i) for i in rng.permutation(len(train.input_ids))]
        groups = list(batches(order, per_step))
        for pos in range(start_pos, len(groups)):
            if step >= total:
                break
            group = groups[pos]
            t0 = time.perf_counter()
            lr = lr_at(step, total, cfg.warmup_steps, cfg.lr)
            loss_total, gnorm, n_group = _optimizer_step(model, opt, train, n_sup, group, lr, cfg, dev, pad_id)
            t_train += time.perf_counter() - t0
            step += 1
            tokens_seen += sum(len(train.input_ids[i]) for i in group)
            steps_log.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_total,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "rows": len(group),
                    "supervised_tokens": n_group,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_total:.4f}", epoch=epoch)
            if plan.every and step % plan.every == 0 and pos + 1 < len(groups) and step < total:
                checkpoint(epoch, pos + 1, False, None)  # the epoch's last step checkpoints after its eval
        if evald is not None:
            evals.append(
                {"epoch": epoch, "step": step, **eval_loss_of(model, evald, cfg, dev, pad_id, f"eval (epoch {epoch})")}
            )
        if plan.every and (evald is not None or step % plan.every == 0):
            checkpoint(epoch, len(groups), True, ckpt.finite(evals[-1]["loss"]) if evald is not None else None)
        order, start_pos = None, 0
    bar.close()
    model.eval()
    return TrainLog(steps_log, evals, step, tokens_seen, t_train, resumed, written)


def _save_adapter(model: Any, lm: Any, run: Run, store: Store) -> AdapterRef:
    """peft's folder + the tokenizer + store_adapter.json in runs/<run_id>/adapter."""
    folder = run.dir / "adapter"
    model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    ref = AdapterRef(run.run_id, str(folder), lm.model_id, lm.model_hash, run.run_id)
    write_meta(folder, ref, store)
    return ref


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train the adapter and record everything (see the module docstring)."""
    store = Store(cfg.store)
    train_ids = select_rows_by(store, split=cfg.split, sql=cfg.train_rows_sql, max_rows=cfg.max_rows)
    eval_ids = (
        select_rows_by(store, split=cfg.eval_split, max_rows=cfg.eval_max_rows, flag="--eval-split")
        if cfg.eval_split
        else []
    )
    if cfg.resume_adapter:  # a bad --resume-adapter fails before the model loads
        resolve_adapter(store, cfg.resume_adapter)
    resume_id, resume_from = ckpt.resolve_resume(store, cfg)  # and so does a bad --resume
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    layout = ensure_tokenization(store, lm.tokenizer, lm.model_id, 16384, progress=cfg.progress)
    train, evald = _rows(store, cfg, layout.tokenization, train_ids, eval_ids)
    model, resumed = _peft_model(lm, cfg, store)
    steps_per_epoch = math.ceil(len(train_ids) / (cfg.batch_size * cfg.grad_accum))
    total = min(cfg.max_steps or 10**12, cfg.epochs * steps_per_epoch)
    train_desc = f"SQL {cfg.train_rows_sql!r}" if cfg.train_rows_sql else f"split {cfg.split}"
    record = {
        **config_dict(cfg),
        "tokenization": layout.tokenization,
        "train": train_desc,
        "resumed_from": resumed.name if resumed else None,
    }
    with Run(store, "finetune", record, model_id=lm.model_id, model_hash=lm.model_hash, run_id=resume_id) as run:
        claim(run.dir)  # so `--resume auto` elsewhere leaves this run alone while it trains
        rows = ckpt.rows_hash(train_ids + ["--"] + eval_ids)
        plan = ckpt.Plan(run.dir, cfg.checkpoint_every, resume_from, rows, lambda: store.sync_run(run.run_id))
        log = _train(model, cfg, train, evald, total, lm.device, pad_token_id(lm.tokenizer), plan)
        ref = _save_adapter(model, lm, run, store)
        steps_log, evals = log.steps, log.evals
        final_train = (
            float(np.mean([s["loss"] for s in steps_log[-max(1, steps_per_epoch // 4) :]])) if steps_log else None
        )
        metrics = {
            "steps": log.n_steps,
            "final_train_loss": final_train,
            "eval_loss_before": evals[0]["loss"] if evals else None,
            "eval_loss_after": evals[-1]["loss"] if evals else None,
            "train_tokens_per_s": log.tokens_seen / log.seconds if log.seconds else 0.0,
            "train_seconds": log.seconds,
            "resumed_from_step": log.resumed_from_step,
            "checkpoints_written": len(log.checkpoints),
            "checkpoint_bytes": log.checkpoints[-1]["bytes"] if log.checkpoints else None,
            "checkpoint_seconds": sum(c["seconds"] for c in log.checkpoints),
        }
        counts = {
            "train_rows": len(train_ids),
            "train_tokens": train.n_tokens,
            "supervised_tokens": sum(train.n_supervised),
            "truncated_rows": train.n_truncated,
            "eval_rows": len(eval_ids),
            "steps": log.n_steps,
            "tokens_seen": log.tokens_seen,
        }
        store.write_json(
            run.dir / "train_metrics.json",
            {
                "run_id": run.run_id,
                "adapter": ref.name,
                "config": record,
                "counts": counts,
                "metrics": metrics,
                "train": steps_log,
                "eval": evals,
            },
        )
        from trainers.plots import loss_curve  # lazy: matplotlib only when a run ends

        loss_curve(steps_log, evals, run.dir / "loss_curve.png", f"LoRA finetune {train_desc} ({len(train_ids)} rows)")
        peft_cfg = model.peft_config["default"]
        write_adapter_record(
            store,
            ref,
            tokenization=layout.tokenization,
            train_split=None if cfg.train_rows_sql else cfg.split,
            train_rows_sql=cfg.train_rows_sql,
            n_train_rows=len(train_ids),
            n_train_tokens=train.n_tokens,
            resumed_from=resumed.name if resumed else None,
            lora_r=int(peft_cfg.r),
            lora_alpha=float(peft_cfg.lora_alpha),
            target_modules=sorted(peft_cfg.target_modules),
            final_train_loss=final_train,
            final_eval_loss=metrics["eval_loss_after"],
            config=record,
            metrics=metrics,
        )
        run.finish(counts=counts, metrics=metrics)
    return FinetuneResult(run.run_id, ref.name, ref.path, metrics)


def report(res: FinetuneResult) -> str:
    m = res.metrics
    lines = [
        f"adapter {res.adapter}: {res.path}",
        f"{m['steps']} steps, final train loss {m['final_train_loss']:.4f}, {m['train_tokens_per_s']:,.0f} tok/s",
    ]
    if m["eval_loss_before"] is not None:
        lines.append(f"eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f}")
    lines.append(f"next: python -m trainers.eval_loss --adapter {res.adapter}")
    return "\n".join(lines)


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    res = run_finetune(parse_config(FinetuneConfig, argv, prog="python -m trainers.finetune"))
    print(report(res))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
