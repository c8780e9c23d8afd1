"""Completion-only eval loss of the base model or an adapter: the `python -m trainers.eval_loss` command.

    python -m trainers.eval_loss --split eval                       # the base model
    python -m trainers.eval_loss --split eval --adapter latest      # an adapter: merged into the same JSON
    python -m trainers.eval_loss --store /tmp/st --split eval --max-rows 16 --adapter latest   # CPU-sized

The loss is the mean cross-entropy over every supervised token of the rows (prompt, template and
special tokens masked exactly as `tokens.is_supervised` says; see extractors.sft_data), i.e.
sum of token losses / `supervised_token_count`; perplexity is exp(loss). A split without a
supervised token is an error.

Each call writes a `runs` record (kind eval_loss), its per-row losses to the `eval_losses` table
(run_id, model_id, adapter, row_id, n_tokens, loss = the row's mean, loss_sum) so analyses can
bootstrap over rows, and merges its result into `--output-json` (default
runs/eval_loss-<split>/eval_loss_compare.json): `base` (the call without --adapter) and
`adapters.<name>` (one per adapter), each with mean_loss, perplexity, supervised_token_count,
num_eval_rows and the model identifiers; every adapter entry also gets `delta_loss` and
`delta_ppl` (adapter minus base) once both are in, and the newest adapter's are repeated at
the top level (`adapter`, `delta_loss`, `delta_ppl`). Both calls must use the same rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from extractors.adapters import adapter_name, apply_adapter, resolve_adapter
from extractors.chat_tokens import ensure_tokenization
from extractors.model import load_model, pad_token_id
from extractors.sft_data import load_sft_rows, select_rows_by
from store.catalog.runs import Run
from store.cli import ModelOptions, ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError, write_json
from trainers.finetune.checkpoint import rows_hash
from trainers.finetune.lm_loss import eval_rows

EVAL_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model_id", pa.string()),
        ("model_hash", pa.string()),
        ("adapter", pa.string()),
        ("split", pa.string()),
        ("row_id", pa.string()),
        ("n_tokens", pa.int64()),
        ("loss", pa.float64()),
        ("loss_sum", pa.float64()),
    ]
)


@dataclass(kw_only=True)
class EvalLossConfig(StoreOptions, ModelOptions, ProgressOptions):
    """Mean completion-only loss and perplexity of the base model (--model) or a LoRA adapter on stored rows."""

    split: str = field(default="eval", metadata={"help": "rows to evaluate (a split, or all)"})
    rows_sql: str | None = field(
        default=None, metadata={"help": "evaluate the rows this SQL returns (a row_id column) instead of --split"}
    )
    max_rows: int | None = field(default=None, metadata={"help": "evaluate the first N rows by row_id"})
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter on --model: a name from the "
            "adapters table, latest, or a peft folder (none: the base model)"
        },
    )
    output_json: str | None = field(
        default=None,
        metadata={
            "help": "the comparison JSON this call merges into "
            "(default runs/eval_loss-<split>/eval_loss_compare.json in the store)"
        },
    )
    max_length: int = field(default=2048, metadata={"help": "longest row in tokens (see --on-long)"})
    on_long: Literal["error", "truncate"] = field(
        default="error", metadata={"help": "rows longer than --max-length: error, or truncate them (counted)"}
    )
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per batch"})

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"--max-rows must be positive, got {self.max_rows}")
        if self.max_length <= 0 or self.batch_tokens <= 0:
            raise ValueError("--max-length and --batch-tokens must be positive")


def compare_path(store: Store, cfg: EvalLossConfig) -> Path:
    if cfg.output_json:
        return Path(cfg.output_json).expanduser().resolve()
    key = "sql-" + hashlib.sha256(cfg.rows_sql.encode()).hexdigest()[:8] if cfg.rows_sql else cfg.split
    return store.run_dir(f"eval_loss-{key}") / "eval_loss_compare.json"


def merge(doc: dict[str, Any], entry: dict[str, Any], adapter: str | None, path: Path) -> dict[str, Any]:
    """Put `entry` in the comparison document and recompute the deltas."""
    for other in [doc.get("base"), *doc.get("adapters", {}).values()]:
        if other and other["rows_hash"] != entry["rows_hash"]:
            raise StoreError(
                f"{path} compares other rows ({other['num_eval_rows']} rows, {other['rows_hash']}) "
                f"than this call ({entry['num_eval_rows']} rows, {entry['rows_hash']}); use the same "
                f"--split/--max-rows, or another --output-json"
            )
    if adapter is None:
        doc["base"] = entry
    else:
        doc.setdefault("adapters", {})[adapter] = entry
        doc["latest_adapter"] = adapter
    base = doc.get("base")
    for entry_ in doc.get("adapters", {}).values():
        if base:
            entry_["delta_loss"] = entry_["mean_loss"] - base["mean_loss"]
            entry_["delta_ppl"] = entry_["perplexity"] - base["perplexity"]
    latest = doc.get("adapters", {}).get(doc.get("latest_adapter", ""))
    if latest:
        doc["adapter"] = latest
        doc["delta_loss"], doc["delta_ppl"] = latest.get("delta_loss"), latest.get("delta_ppl")
    return doc


def run_eval_loss(cfg: EvalLossConfig) -> dict[str, Any]:
    """Evaluate, record, merge (see the module docstring); returns the comparison document."""
    store = Store(cfg.store)
    row_ids = select_rows_by(store, split=cfg.split, sql=cfg.rows_sql, max_rows=cfg.max_rows)
    if cfg.adapter:  # a bad --adapter fails before the model loads
        resolve_adapter(store, cfg.adapter)
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    layout = ensure_tokenization(store, lm.tokenizer, lm.model_id, 16384, progress=cfg.progress)
    data = load_sft_rows(store, layout.tokenization, row_ids, max_length=cfg.max_length, on_long=cfg.on_long)
    if cfg.adapter:
        lm = apply_adapter(lm, cfg.adapter, store)
    name = adapter_name(lm.model_id)
    path = compare_path(store, cfg)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    with Run(store, "eval_loss", config_dict(cfg), model_id=lm.model_id, model_hash=lm.model_hash) as run:
        t0 = time.perf_counter()
        sums, counts = eval_rows(
            lm.model,
            data.input_ids,
            data.labels,
            device=lm.device,
            pad_id=pad_token_id(lm.tokenizer),
            batch_tokens=cfg.batch_tokens,
            progress=cfg.progress,
            desc="eval loss" + (f" ({name})" if name else ""),
        )
        seconds = time.perf_counter() - t0
        n = sum(counts)
        if n == 0:
            raise StoreError(
                f"the {len(row_ids)} rows of {cfg.rows_sql or cfg.split!r} have no supervised token "
                f"(is_supervised), so there is no loss to measure; pick rows with completions"
            )
        loss = sum(sums) / n
        entry = {
            "mean_loss": loss,
            "perplexity": math.exp(loss),
            "supervised_token_count": n,
            "num_eval_rows": len(row_ids),
            "mean_row_loss": sum(s / c for s, c in zip(sums, counts, strict=False) if c)
            / max(1, sum(1 for c in counts if c)),
            "model_id": lm.model_id,
            "model_hash": lm.model_hash,
            "adapter": name,
            "run_id": run.run_id,
            "split": cfg.split,
            "rows_sql": cfg.rows_sql,
            "truncated_rows": data.n_truncated,
            "tokenization": layout.tokenization,
            "rows_hash": rows_hash(row_ids),
            "seconds": seconds,
        }
        store.write_table(
            "eval_losses",
            pa.table(
                {
                    "run_id": [run.run_id] * len(row_ids),
                    "model_id": [lm.model_id] * len(row_ids),
                    "model_hash": [lm.model_hash] * len(row_ids),
                    "adapter": [name] * len(row_ids),
                    "split": [cfg.split] * len(row_ids),
                    "row_id": row_ids,
                    "n_tokens": counts,
                    "loss": [s / c if c else None for s, c in zip(sums, counts, strict=False)],
                    "loss_sum": sums,
                },
                schema=EVAL_SCHEMA,
            ),
            part=run.run_id,
        )
        doc = merge(doc, entry, name, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, doc)
        store.write_json(run.dir / "eval_loss.json", entry)
        run.finish(
            counts={"rows": len(row_ids), "supervised_tokens": n},
            metrics={k: entry[k] for k in ("mean_loss", "perplexity", "supervised_token_count", "num_eval_rows")},
        )
    doc["_path"] = str(path)
    return doc


def report(doc: dict[str, Any], adapter: bool) -> str:
    e = doc["adapter"] if adapter else doc["base"]
    line = (
        f"{e['model_id']}: loss {e['mean_loss']:.4f}, perplexity {e['perplexity']:.3f} over "
        f"{e['supervised_token_count']} supervised tokens of {e['num_eval_rows']} rows"
    )
    if adapter and e.get("delta_loss") is not None:
        line += f"; vs base: delta_loss {e['delta_loss']:+.4f}, delta_ppl {e['delta_ppl']:+.3f}"
    return line + f"\ncompare JSON: {doc['_path']}"


@user_errors(ValueError, StoreError, RuntimeError)
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    cfg = parse_config(EvalLossConfig, argv, prog="python -m trainers.eval_loss")
    print(report(run_eval_loss(cfg), bool(cfg.adapter)))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
