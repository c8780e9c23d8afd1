"""Benchmark: our LoRA finetune (trainers.finetune) vs a plain peft + transformers.Trainer loop.

    python -m bench.finetune                          # embedded model, 64 rows, batch 8, 1 epoch
    python -m bench.finetune --rows 16 --batch-size 4 # CPU-sized (~2 min on 2 cores)

Both train the same LoRA (rank, alpha, dropout, target modules), learning rate, batch size and
one epoch over the same rows' stored token ids and completion-only labels (extractors.sft_data),
on a scratch store of the embedded sample (or `--store`). The Trainer loop is what a user would
write: a datasets.Dataset of input_ids / labels / attention_mask, DataCollatorForSeq2Seq padding,
`Trainer.train()` timed by its own train_runtime. Ours is `python -m trainers.finetune` in-process,
timed by its optimizer steps (train_seconds; the eval passes are off). Tokens/s counts each row's
unpadded tokens once; the summary ratio is ours over Trainer (target >= 1). Prints a table and
writes JSON to bench_out/finetune.json (with --store: <store>/runs/<bench id>/, or --out).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Bench, BenchOutOptions, ScratchOptions, print_table
from extractors.ingest import IngestConfig, run_ingest
from extractors.model import load_model
from extractors.sft_data import load_sft_rows, select_rows_by
from store.catalog.tokens import read_layout, tokenizations
from store.cli import ModelOptions, ProgressOptions, StoreOptions, parse_config, user_errors
from store.core import StoreError
from trainers.finetune.train import FinetuneConfig, run_finetune


@dataclass
class BenchFinetuneConfig(StoreOptions, ModelOptions, ProgressOptions, BenchOutOptions, ScratchOptions):
    """Finetune tokens/s: ours vs plain peft + transformers.Trainer on the same rows.

    --store: an ingested store (default: a scratch store with the embedded sample, deleted
    afterwards); with it, the JSON goes to its runs/<bench id>/."""

    store: str | None = None
    progress: bool = False
    rows: int = field(default=64, metadata={"help": "training rows (first N of train_base by row_id)"})
    batch_size: int = field(default=8, metadata={"help": "rows per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})

    def __post_init__(self) -> None:
        for name in ("rows", "batch_size", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def trainer_loop(cfg: BenchFinetuneConfig, ft: Any, data: Any) -> dict[str, Any]:
    """The plain peft + Trainer baseline; returns its seconds and final loss."""
    # lazy: heavy (datasets, transformers' Trainer) and optional-weight (peft) packages of this baseline alone
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = get_peft_model(
        lm.model,
        LoraConfig(
            r=ft.lora_r,
            lora_alpha=ft.lora_alpha,
            lora_dropout=ft.lora_dropout,
            target_modules=list(ft.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    ds = Dataset.from_dict(
        {"input_ids": data.input_ids, "labels": data.labels, "attention_mask": [[1] * len(x) for x in data.input_ids]}
    )
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=1,
            learning_rate=cfg.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            remove_unused_columns=False,
            disable_tqdm=not cfg.progress,
            use_cpu=lm.device.type == "cpu",
            bf16=lm.device.type == "cuda",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ds,
            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        )
        res = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": float(res.metrics["train_runtime"]),
        "final_loss": losses[-1] if losses else None,
        "steps": int(res.global_step),
    }


def _ours(cfg: BenchFinetuneConfig, store: Any) -> tuple[FinetuneConfig, Any, float]:
    """`python -m trainers.finetune` in-process on the same rows; (its config, result, wall seconds)."""
    ft = FinetuneConfig(
        store=str(store.root),
        model=cfg.model,
        max_rows=cfg.rows,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lora_r=cfg.lora_r,
        eval_split="",
        epochs=1,
        device=cfg.device,
        compute_dtype=cfg.compute_dtype,
        model_cache=cfg.model_cache,
        progress=cfg.progress,
    )
    t0 = time.perf_counter()
    ours = run_finetune(ft)
    return ft, ours, time.perf_counter() - t0


def run_bench(cfg: BenchFinetuneConfig) -> dict[str, Any]:
    with Bench("finetune", cfg.store, cfg.out, keep=cfg.keep_store, beside_store=True) as bench:
        store = bench.store
        if not store.has_table("manifests"):
            run_ingest(
                IngestConfig(store=str(store.root), model=cfg.model, train_base=cfg.rows, attr_query=0, eval=0),
                progress=cfg.progress,
            )
        ft, ours, ours_wall = _ours(cfg, store)
        layout = read_layout(store, tokenizations(store)[0]["tokenization"])
        data = load_sft_rows(store, layout.tokenization, select_rows_by(store, split="train_base", max_rows=cfg.rows))
        base = trainer_loop(cfg, ft, data)
        tokens = data.n_tokens
        rows = [
            {
                "method": "ours (trainers.finetune)",
                "seconds": ours.metrics["train_seconds"],
                "tokens_per_s": tokens / ours.metrics["train_seconds"],
                "final_loss": ours.metrics["final_train_loss"],
            },
            {
                "method": "peft + transformers.Trainer",
                "seconds": base["seconds"],
                "tokens_per_s": tokens / base["seconds"],
                "final_loss": base["final_loss"],
            },
        ]
        table = print_table(
            rows,
            [
                ("method", "method", ""),
                ("seconds", "train s", ".1f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("final_loss", "last step loss", ".4f"),
            ],
        )
        ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"ours / Trainer: {ratio:.2f}x tokens/s on {len(data.row_ids)} rows ({tokens} tokens)")
        out = {
            **bench.header(cfg),
            "bench": bench.id,
            "rows": len(data.row_ids),
            "tokens": tokens,
            "ours": {**ours.metrics, "wall_seconds": ours_wall, "run_id": ours.run_id},
            "trainer": base,
            "summary": {"ours_vs_trainer": ratio},
            "table": table,
            "date": datetime.now(UTC).isoformat(),
        }
        bench.write(out, bench.path())
        return out


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchFinetuneConfig, argv, prog="python -m bench.finetune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
