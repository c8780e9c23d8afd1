"""Ingest from a config: load the source and the tokenizer, then run the ingest steps.

`IngestConfig` holds every setting of `python -m extractors.dataset` (its CLI, which
parses one and calls `run_ingest`); `extractors.run` and the benchmarks build one too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from extractors.ingest.sample.planted import check_fraction, plant_source
from extractors.ingest.sources import load_source
from extractors.ingest.steps import IngestResult, ingest
from extractors.model import load_tokenizer
from store import claims
from store.cli import SeedOptions, StoreOptions
from store.core import Store
from store.scratch import scratch


@dataclass(kw_only=True)
class IngestConfig(StoreOptions, SeedOptions):
    """Ingest a SmolTalk-schema dataset into the store (rows, splits, quarantine, manifest); the
    seed draws the stratified splits, and --model's tokenizer counts each conversation's tokens."""

    # the model whose tokenizer counts tokens (only the tokenizer is loaded); help from ModelOptions
    model: str = "embedded"
    source: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (the generated sample), a local "
            ".parquet/.jsonl file or folder, a datasets save_to_disk folder, or a Hub id"
        },
    )
    config: str | None = field(
        default=None,
        metadata={"help": "Hub dataset config, e.g. smol-magpie-ultra (the default for HuggingFaceTB/smoltalk)"},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision"})
    train_base: int | None = field(
        default=None,
        metadata={
            "help": "train_base rows, from the source's train "
            "split (default 600 for the embedded sample, 8000 otherwise)"
        },
    )
    attr_query: int | None = field(
        default=None, metadata={"help": "attr_query rows, from the test split (default 100 embedded, 500 otherwise)"}
    )
    eval: int | None = field(
        default=None,
        metadata={
            "help": "eval rows, from the test split, disjoint from attr_query (default 100 embedded, 500 otherwise)"
        },
    )
    max_conversation_tokens: int = field(
        default=2000,
        metadata={"help": "rows whose rendered conversation has more tokens are quarantined (over_token_cap)"},
    )
    sample_seed: int = field(default=0, metadata={"help": "seed of the embedded sample generator"})
    sample_train: int = field(default=1000, metadata={"help": "clean train conversations the embedded sample has"})
    sample_test: int = field(default=250, metadata={"help": "clean test conversations the embedded sample has"})
    control: Literal["none", "planted"] = field(
        default="none",
        metadata={
            "help": "planted: the embedded sample plus a planted skill (trigger 'Kiwi protocol.' -> answer opens "
            "with 'KIWI-7.') in --plant-fraction of train rows and every attr_query/eval row, ground truth in "
            "rows.planted (extractors.ingest.sample.planted; --seed draws the planted rows)"
        },
    )
    plant_fraction: float = field(
        default=0.1, metadata={"help": "with --control planted: the share of each category's train rows planted"}
    )
    batch_rows: int = field(
        default=10_000,
        metadata={
            "help": "rows written per batch (memory holds one batch of full rows, plus ~100 bytes per source row)"
        },
    )

    def __post_init__(self) -> None:
        if self.max_conversation_tokens <= 0:
            raise ValueError(f"--max-conversation-tokens must be positive, got {self.max_conversation_tokens}")
        if self.batch_rows <= 0:
            raise ValueError(f"--batch-rows must be positive, got {self.batch_rows}")
        if self.control == "planted":
            check_fraction(self.plant_fraction)
            if self.source != "embedded":
                raise ValueError(
                    f"--control planted builds on the embedded sample, got --source {self.source!r}; "
                    "drop --source (or pass --source embedded)"
                )
        if self.config is None and self.source == "HuggingFaceTB/smoltalk":
            self.config = "smol-magpie-ultra"


def run_ingest(cfg: IngestConfig, progress: bool = True) -> IngestResult:
    """Load the source and ingest it; returns the IngestResult."""
    store = Store(cfg.store)
    tok = load_tokenizer(cfg.model)
    # A second process ingesting into the same store waits for the first, then finds it done.
    with claims.exclusive(store, "setup", "ingest"), scratch(store, "ingest-source") as spill:
        source = load_source(
            cfg.source,
            cfg.config,
            cfg.revision,
            sample_seed=cfg.sample_seed,
            sample_train=cfg.sample_train,
            sample_test=cfg.sample_test,
            scratch=spill,
        )
        if cfg.control == "planted":
            n_clean = {"train": cfg.sample_train, "test": cfg.sample_test}
            source = plant_source(source, cfg.plant_fraction, cfg.seed, n_clean, spill)
        return ingest(
            store,
            source,
            tok,
            tokenizer_id=cfg.model,
            seed=cfg.seed,
            sizes={"train_base": cfg.train_base, "attr_query": cfg.attr_query, "eval": cfg.eval},
            max_conversation_tokens=cfg.max_conversation_tokens,
            progress=progress,
            batch_rows=cfg.batch_rows,
        )


def summary(result: IngestResult) -> str:
    """One line: the ingest id, split sizes and quarantine counts."""
    sizes = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
    q = ", ".join(f"{k} {v}" for k, v in result.quarantined.items()) or "none"
    verb = "already ingested" if result.skipped else "ingested"
    return f"{verb} {result.ingest_id}: {sizes}; quarantined: {q}"
