"""The extraction pipeline behind `python -m extractors.run`: config and library call.

    python -m extractors.run --layer 17                  # embedded model + data -> ./store_data
    python -m extractors.run --layers 6 17 24            # three layers, one forward pass
    python -m extractors.run --layer 17 --split eval --max-rows 50 --store /tmp/st   # CPU-sized
    python -m extractors.run --layer 17 --kinds sae --sae latest   # codes of the newest layer-17 SAE
    python -m extractors.run --layers 17 24 --kinds gradnorm       # per-token gradient norms, one backward
    python -m extractors.run --layer 17 --kinds hidden logits      # + top-64 next-token logits, one forward pass
    python -m extractors.run --layer 17 --kinds hidden sae --sae latest --adapter latest   # on base + adapter
    torchrun --nproc-per-node 4 -m extractors.run --layer 17   # each rank a disjoint set of units

Every kind runs on the unit engine (extractors.units): hidden states (extractors.hidden),
SAE codes (extractors.sae.codes), gradient norms (extractors.gradnorm), logits (extractors.logits). Attribution scores
(extractors.attribution.scores, bergson) are per row: `--kinds attribution --adapter NAME`.
`run_extraction` loads the model (and, with `--adapter`, wraps it with the adapter) once and
hands each kind its own spec (HiddenSpec, SaeCodesSpec, GradnormSpec, AttributionSpec) and the
engine's UnitOptions. With `--adapter` every kind runs on base + adapter and writes beside the
base arrays, on the same token axis: `hidden/<adapter>/layer_L`, `sae/<sae>/<adapter>/layer_L/...`,
`gradnorm/<adapter>/layer_L`.

With no rows in the store it first ingests the embedded sample (see extractors.dataset).
Rerunning a finished extraction does nothing; rerunning a killed one finishes it exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from extractors.adapters import AdapterRef, resolve_adapter, use_adapter
from extractors.attribution.scores import (
    AttributionResult,
    AttributionSpec,
    check_inputs,
    check_options,
    extract_attribution,
)
from extractors.chat_tokens import ensure_tokenization
from extractors.gradnorm import GradnormSpec, extract_gradnorms
from extractors.hidden import ExtractResult, HiddenSpec, extract_hidden
from extractors.ingest.pipeline import IngestConfig, run_ingest, summary
from extractors.logits import LogitsSpec, extract_logits
from extractors.model import load_model, pick_device, pick_dtype
from extractors.sae.codes import SaeCodesSpec, extract_sae_codes
from extractors.sae.load import load_sae, pick_layer
from extractors.units import UnitOptions, UnitRun, select_rows, wait_for
from store.cli import LayerOptions, ModelOptions, ProgressOptions, RankOptions, StoreOptions, config_dict
from store.core import Store

KINDS = ("hidden", "sae", "gradnorm", "logits", "attribution")


@dataclass(kw_only=True)
class ExtractConfig(StoreOptions, ModelOptions, RankOptions, LayerOptions, ProgressOptions):
    """Extract per-token hidden states of a causal LM into the store's Zarr arrays (one pass for all --layers)."""

    kinds: list[str] = field(
        default_factory=lambda: ["hidden"],
        metadata={
            "help": "what to extract: hidden (hidden states), sae (sparse SAE codes, needs --sae) and/or gradnorm "
            "(per-token norms of d(completion loss)/d(residual stream), see extractors.gradnorm), logits (the "
            "top --logits-k next-token logits + log-sum-exp, see extractors.logits; with hidden, one forward pass); or "
            "attribution alone (per-row bergson scores of --pool-split vs --query-split, needs --adapter; "
            "see extractors.attribution.scores)"
        },
    )
    sae: str | None = field(
        default=None,
        metadata={
            "help": "SAE for --kinds sae: latest (the newest SAE of the "
            "layer in the saes table), a name from that table, a local sae-lens folder, or "
            "RELEASE/SAE_ID of a pretrained one"
        },
    )
    sae_k: int | None = field(
        default=None,
        metadata={
            "help": "feature slots kept per token for SAEs without their own k (default 64); TopK SAEs use their k"
        },
    )
    logits_k: int = field(
        default=64,
        metadata={"help": "--kinds logits: next-token logits kept per token (the top k, beside the full log-sum-exp)"},
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter on --model (a name from the adapters table, latest, or a peft folder): every "
            "kind runs on base + adapter, into hidden/<adapter>/layer_L, sae/<sae>/<adapter>/layer_L/... and "
            "gradnorm/<adapter>/layer_L beside the base arrays; attribution differentiates its weights"
        },
    )
    query_split: str = field(
        default="attr_query",
        metadata={"help": "--kinds attribution: the query rows whose gradients the pool is scored against"},
    )
    pool_split: str = field(
        default="score_pool",
        metadata={"help": "--kinds attribution: the rows to score (--max-rows takes the first N by row_id)"},
    )
    query_max_rows: int | None = field(
        default=None, metadata={"help": "--kinds attribution: use only the first N query rows by row_id"}
    )
    score_mode: Literal["mean", "nearest", "individual"] = field(
        default="mean",
        metadata={
            "help": "--kinds attribution: mean (one score per pool row against the mean query gradient), nearest "
            "(the max over query rows) or individual (every pool x query pair, also in attribution_pairs)"
        },
    )
    preconditioning: Literal["none", "query", "pool"] = field(
        default="query",
        metadata={
            "help": "--kinds attribution: none, or the inverse of a damped autocorrelation Hessian (mean gradient "
            "outer product) fitted on the query rows or on the pool rows, applied to the query side"
        },
    )
    projection_dim: int = field(
        default=32,
        metadata={
            "help": "--kinds attribution: random projection of each "
            "module's gradient to projection_dim x projection_dim (0: exact gradients)"
        },
    )
    projection_seed: int = field(
        default=0, metadata={"help": "--kinds attribution: seed of the projections (same seed, same scores)"}
    )
    damping: float = field(
        default=0.1, metadata={"help": "--kinds attribution: Hessian damping, as a fraction of its mean eigenvalue"}
    )
    subset_k: int | None = field(
        default=None,
        metadata={
            "help": "--kinds attribution: also write the top-k pool "
            "rows as a subset (table subsets) for trainers.finetune --train-rows-sql"
        },
    )
    unit_rows: int = field(
        default=64,
        metadata={
            "help": "--kinds attribution: pool rows per unit, the granule that is committed, resumed and shared "
            "between workers (a kill loses at most one unit; see docs/attribution.md)"
        },
    )
    split: str = field(
        default="all", metadata={"help": "rows to extract: all, train_base, attr_query, eval or score_pool"}
    )
    max_rows: int | None = field(
        default=None,
        metadata={
            "help": "extract only the first N selected rows by row_id (a content hash: a fixed pseudo-random sample)"
        },
    )
    rows_view: str | None = field(
        default=None,
        metadata={
            "help": "keep only the rows a view returns (a view "
            'name or SQL with a row_id column, e.g. "SELECT row_id FROM rows WHERE quality '
            "IN ('poor','very poor')\"), applied before --max-rows"
        },
    )
    loss_reduction: Literal["sum", "mean"] | None = field(
        default=None,
        metadata={
            "help": "the row's completion "
            "loss is the sum (or the mean) of its supervised "
            "tokens' cross-entropies; default sum for gradnorm, "
            "mean for attribution (bergson's sum would scale "
            "scores with completion length)"
        },
    )
    batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "padded tokens per batch (default 8192 on "
            "CPU, 131072 on GPU; for gradnorm 2048 and 32768, as a backward pass keeps "
            "activations); batches are length-sorted within a unit"
        },
    )
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "storage dtype of hidden states"})
    pack: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "packed batches for hidden states and SAE codes: rows end to end without padding, each "
            "with its own positions and attention (extractors.packing); auto packs models whose attention "
            "runs through transformers' sdpa interface (Llama, Mistral, Qwen, Gemma), off pads"
        },
    )
    unit_tokens: int = field(
        default=16384,
        metadata={
            "help": "token slots per unit (= per Zarr chunk), fixed "
            "when the store is first tokenized; a unit is the commit/resume granule"
        },
    )
    source: str = field(
        default="embedded",
        metadata={
            "help": "dataset to ingest when the store has no rows "
            "yet (see python -m extractors.dataset for more options)"
        },
    )
    writers: int | None = field(
        default=None,
        metadata={
            "help": "unit-writer threads (default 2 on CUDA, where "
            "the disk is the bound, 1 on CPU); any number writes the same bytes"
        },
    )
    resident: bool | None = field(
        default=None,
        metadata={
            "help": "assemble units in device-resident buffers "
            "copied to a pinned host pool (default: on with CUDA, off on CPU; "
            "--resident on CPU runs the GPU path's bookkeeping, same bytes)"
        },
    )
    claim_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "seconds after which another writer's claim "
            "of a unit counts as stale and is taken over (a dead writer on this host is "
            "taken over at once); see docs/reliability.md"
        },
    )

    def __post_init__(self) -> None:
        if not self.layers and set(self.kinds) - {"attribution", "logits"}:
            raise ValueError("pass --layer L (or --layers L1 L2 ...)")
        if self.loss_reduction is None:
            if "attribution" in self.kinds and "gradnorm" in self.kinds:
                raise ValueError(
                    "--kinds gradnorm attribution default to different loss reductions (sum, mean); "
                    "pass --loss-reduction sum or mean, or run them separately"
                )
            self.loss_reduction = "mean" if "attribution" in self.kinds else "sum"
        bad = sorted(set(self.kinds) - set(KINDS))
        if bad:
            raise ValueError(f"--kinds {bad[0]!r} is not one of {', '.join(KINDS)}")
        if "attribution" in self.kinds:
            check_options(
                self.kinds,
                self.adapter,
                projection_dim=self.projection_dim,
                damping=self.damping,
                subset_k=self.subset_k,
                query_max_rows=self.query_max_rows,
                unit_rows=self.unit_rows,
            )
        if "sae" in self.kinds and not self.sae:
            raise ValueError(
                "--kinds sae needs --sae (latest, an SAE name from the saes table, or a sae-lens folder; "
                "train one with python -m trainers.sae)"
            )
        if "logits" in self.kinds and self.logits_k <= 0:
            raise ValueError(f"--logits-k must be positive, got {self.logits_k} (the default is 64)")
        if self.max_rows is not None and self.max_rows <= 0:
            raise ValueError(f"--max-rows must be positive, got {self.max_rows}")
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            raise ValueError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        if self.unit_tokens <= 0:
            raise ValueError(
                f"--unit-tokens must be positive, got {self.unit_tokens} (a unit is one Zarr chunk "
                f"of token slots; the default is 16384)"
            )
        if self.writers is not None and self.writers <= 0:
            raise ValueError(f"--writers must be positive, got {self.writers}")
        if self.claim_timeout <= 0:
            raise ValueError(f"--claim-timeout must be positive seconds, got {self.claim_timeout}")
        self.fill_ranks()

    # ---- the typed hand-off: each kind gets its own spec, the engine its options ----

    def unit_options(self) -> UnitOptions:
        assert self.rank is not None and self.world_size is not None  # fill_ranks() set them
        return UnitOptions(self.rank, self.world_size, self.writers, self.resident, self.claim_timeout, self.progress)

    def hidden_spec(self, adapter: AdapterRef | None = None) -> HiddenSpec:
        return HiddenSpec(self.layers, self.dtype, adapter, self.pack)

    def sae_spec(self, batch_tokens: int, adapter: AdapterRef | None = None) -> SaeCodesSpec:
        assert self.sae is not None  # __post_init__ requires --sae with --kinds sae
        return SaeCodesSpec(
            self.sae, self.layers, self.dtype, batch_tokens, self.sae_k, adapter, config_dict(self), self.pack
        )

    def gradnorm_spec(self, adapter: AdapterRef | None = None) -> GradnormSpec:
        assert self.loss_reduction is not None  # __post_init__ fills it
        return GradnormSpec(self.layers, self.loss_reduction, self.batch_tokens, adapter, config_dict(self))

    def attribution_spec(self, adapter: AdapterRef) -> AttributionSpec:
        assert self.loss_reduction is not None  # __post_init__ fills it
        device = pick_device(self.device, self.local_rank)  # part of the run's settings, known before the load
        return AttributionSpec(
            adapter,
            query_split=self.query_split,
            pool_split=self.pool_split,
            query_max_rows=self.query_max_rows,
            pool_max_rows=self.max_rows,
            score_mode=self.score_mode,
            preconditioning=self.preconditioning,
            projection_dim=self.projection_dim,
            projection_seed=self.projection_seed,
            damping=self.damping,
            subset_k=self.subset_k,
            loss_reduction=self.loss_reduction,
            batch_tokens=self.batch_tokens,
            unit_rows=self.unit_rows,
            model=self.model,
            device=device.type,
            compute_dtype=str(pick_dtype(device, self.compute_dtype)).removeprefix("torch."),
            run_config=config_dict(self),
        )


def run_extraction(cfg: ExtractConfig) -> ExtractResult | UnitRun | AttributionResult | None:
    """Ingest if needed, load the model (and adapter), tokenize if needed, then extract what is missing."""
    store = Store(cfg.store)
    engine = cfg.unit_options()
    if cfg.local_rank is not None and cfg.device in ("auto", "cuda"):
        cfg.device = str(pick_device(cfg.device, cfg.local_rank))  # one GPU per rank of a node
    if not store.has_table("manifests"):
        if engine.rank == 0:
            ingest = IngestConfig(store=cfg.store, source=cfg.source, model=cfg.model)
            print(summary(run_ingest(ingest, progress=cfg.progress)))
        else:
            wait_for(lambda: store.has_table("manifests"), "the ingest")
    loaded_sae = None
    if "sae" in cfg.kinds:  # a bad --sae fails here, before the model loads
        assert cfg.sae is not None
        layer = cfg.layers[0] if len(cfg.layers) == 1 else None
        loaded_sae = load_sae(cfg.sae, str(pick_device(cfg.device)), layer=layer, store=store)
        pick_layer(cfg.layers, loaded_sae.layer, cfg.sae)
    # A bad --adapter (or attribution split) fails here too; the adapter is resolved once, for every kind.
    adapter = resolve_adapter(store, cfg.adapter) if cfg.adapter else None
    if "attribution" in cfg.kinds:
        assert adapter is not None  # __post_init__ requires --adapter with --kinds attribution
        check_inputs(store, cfg.attribution_spec(adapter))
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    print(
        f"model {lm.model_id} on {lm.device} ({str(lm.dtype).replace('torch.', '')}) loaded in "
        f"{lm.load_seconds:.1f} s; {lm.note}"
    )
    layout = ensure_tokenization(store, lm.tokenizer, lm.model_id, cfg.unit_tokens, engine.rank, cfg.progress)
    lm = use_adapter(lm, adapter, store)  # after tokenizing: the tokenization is the base model's
    if adapter is not None:
        print(f"adapter {adapter.name} from {adapter.path}: every kind runs on base + adapter")
    selected = select_rows(store, cfg.split, cfg.max_rows, view=cfg.rows_view)
    batch_tokens = cfg.batch_tokens or (131072 if lm.device.type == "cuda" else 8192)
    result: ExtractResult | UnitRun | AttributionResult | None = None
    if "logits" in cfg.kinds:  # with hidden: one forward pass fills both (extractors.logits)
        layers = cfg.layers if "hidden" in cfg.kinds else []
        spec = LogitsSpec(cfg.logits_k, layers, cfg.dtype, batch_tokens, adapter, config_dict(cfg))
        result = extract_logits(store, lm, layout, selected, spec, engine)
    if "hidden" in cfg.kinds and "logits" not in cfg.kinds:
        result = extract_hidden(
            store,
            lm,
            layout,
            selected,
            cfg.hidden_spec(adapter),
            batch_tokens=batch_tokens,
            run_config=config_dict(cfg),
            **dataclasses.asdict(engine),
        )
        if not result.skipped:
            print(
                f"extracted {result.rows} rows, {result.tokens} tokens in {result.seconds:.1f} s: "
                f"{result.tokens_per_s:,.0f} tok/s end to end; forward alone {result.forward_tokens_per_s:,.0f} "
                f"tok/s; padding {result.padding:.1%}; run {result.run_id}"
            )
    if "sae" in cfg.kinds:
        assert loaded_sae is not None
        extract_sae_codes(store, lm, layout, selected, cfg.sae_spec(batch_tokens, adapter), loaded_sae, engine)
    if "gradnorm" in cfg.kinds:
        gn = extract_gradnorms(store, cfg.gradnorm_spec(adapter), lm, layout, selected, engine)
        result = result if result is not None else gn
    if "attribution" in cfg.kinds:
        assert adapter is not None
        result = extract_attribution(store, lm, layout, cfg.attribution_spec(adapter), engine)
    store.refresh_catalog()
    print(f"catalog: {store.sql_command}")
    return result
