"""The logits array kind (extractors.logits): `python -m extractors.run --kinds logits`.

    python -m extractors.run --kinds logits --split eval --max-rows 50      # top-64 logits of 50 eval rows
    python -m extractors.run --kinds hidden logits --layer 17               # states + logits, one forward pass
    python -m extractors.run --kinds logits --adapter latest                # of base + the newest adapter
    python -m extractors.run --kinds logits --logits-k 256                  # a wider top-k

Per token t of a row, the distribution the model predicts for token t+1, stored as three arrays on
the store's token axis (the same slots as hidden/layer_L):

* `logits/topk/ids` [n_slots, k] int32: the k highest-scoring vocabulary ids, in decreasing logit order;
* `logits/topk/values` [n_slots, k] bf16: their logits;
* `logits/lse` [n_slots] float32: log-sum-exp of the full-vocabulary logits (computed in float32),

so that p(id) = exp(value - lse) is the exact top-k probability (up to the bf16 rounding of the
value) and the tail mass 1 - sum_j p_j is known. k defaults to 64 (`--logits-k`). With
`--adapter NAME` the arrays are `logits/<adapter>/topk/{ids,values}` and `logits/<adapter>/lse`.

The last position of a row has no next token in the row; what is stored there is the model's
prediction after the row's last token (what it would generate next), like every other position;
consumers that need a target (trainers.decoder) drop that position.

One forward pass per batch (extractors.forward's padding-free-for-real-tokens contract: right
padding, causal attention, padded positions discarded): a hook keeps the final norm's output,
the model's own head runs only on the last position (`logits_to_keep=1`), and the unembedding is
applied to the real tokens alone, in slices of `head_tokens` so the [tokens, vocab] logits stay
small. With `--kinds hidden logits` the same pass also keeps the requested layers' outputs and
fills `hidden/[<adapter>/]layer_L` exactly as extractors.hidden does (same bytes: the outputs of
the blocks do not depend on whether the pass stops early). The whole forward lives in
`forward_logits`, so a packed (padding-free) batch path replaces one function.

Units follow the unit engine's contract (extractors.units): rerunning a finished extraction is a
no-op; a killed one, rerun with the same command, finishes exactly the missing units.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from extractors.adapters import AdapterRef, adapter_attrs
from extractors.forward import Batch, pad_batch, padding_fraction
from extractors.hidden import HiddenStates, to_device, to_storage, token_index, unit_batches
from extractors.model import decoder_layers, pad_token_id
from extractors.units import ArrayKind, ArraySpec, UnitOptions, UnitRun, UnitWork, extract_units
from store.catalog.tokens import Layout, row_token_ids
from store.core import Store, StoreError

DEFAULT_K = 64
LAST_POSITION = (
    "the prediction after the row's last token (no target inside the row); "
    "trainers.decoder and other consumers needing a next token drop it"
)


def logits_array_names(adapter: str | None = None) -> tuple[str, str, str]:
    """(ids, values, lse) array names: logits/topk/{ids,values}, logits/lse, or with an adapter
    logits/<adapter>/topk/{ids,values}, logits/<adapter>/lse."""
    base = f"logits/{adapter}" if adapter else "logits"
    return f"{base}/topk/ids", f"{base}/topk/values", f"{base}/lse"


def final_norm_and_head(model: Any) -> tuple[Any, Any]:
    """The final normalisation and the unembedding of a causal LM (Llama/Mistral/Qwen/Gemma:
    model.norm; GPT-2: transformer.ln_f; GPT-NeoX: gpt_neox.final_layer_norm); a peft wrapper is
    looked through (hooks on the wrapped modules fire when the wrapper runs)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings()
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        norm = getattr(base, name, None)
        if norm is not None and head is not None:
            return norm, head
    raise StoreError(
        f"cannot find the final norm of {type(model).__name__}; logits and the logit lens support "
        "Llama-, Mistral-, Qwen-, Gemma-, GPT-2- and NeoX-style models"
    )


def topk_lse(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 [n, k], values float32 [n, k], lse float32 [n]) of [n, vocab] logits, in float32."""
    z = logits.float()
    val, ids = torch.topk(z, k, dim=-1, sorted=True)
    return ids.to(torch.int32), val, torch.logsumexp(z, dim=-1)


@dataclass(frozen=True)
class LogitsSpec:
    """What `extract_logits` computes: the top-k next-token logits and the log-sum-exp per token; with
    `hidden_layers`, the same pass also stores those layers' states (in `hidden_dtype`); with
    `adapter`, of base + that adapter (the LoadedModel given must be wrapped already)."""

    k: int = DEFAULT_K
    hidden_layers: list[int] = field(default_factory=list)
    hidden_dtype: str = "bf16"
    batch_tokens: int = 8192
    adapter: AdapterRef | None = None
    run_config: dict[str, Any] = field(default_factory=dict)


class Logits(ArrayKind):
    """The array kind: one full forward pass per batch, the head on real tokens only."""

    run_kind = "extract_logits"

    def __init__(self, store: Store, lm: Any, layout: Layout, spec: LogitsSpec, head_tokens: int):
        self.store, self.lm, self.layout, self.spec, self.head_tokens = store, lm, layout, spec, head_tokens
        adapter = spec.adapter.name if spec.adapter is not None else None
        self.ids_name, self.val_name, self.lse_name = logits_array_names(adapter)
        self.vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        if not 1 <= spec.k <= self.vocab:
            raise ValueError(f"--logits-k must be in 1..{self.vocab} (the vocabulary of {lm.model_id}), got {spec.k}")
        self.layers = sorted(set(spec.hidden_layers))
        # The hidden arrays of the same pass: HiddenStates names and describes them (same arrays, same bytes).
        self.hidden = (
            HiddenStates(store, lm, layout, self.layers, spec.hidden_dtype, spec.batch_tokens, spec.adapter)
            if self.layers
            else None
        )
        self.names = [self.ids_name, self.val_name, self.lse_name, *(self.hidden.names if self.hidden else [])]
        self.desc = "logits" + (f" + hidden {','.join(map(str, self.layers))}" if self.layers else "")
        self.batches: list[Batch] = []
        self.fwd_s = 0.0

    def specs(self, run_id: str) -> list[ArraySpec]:
        lm, spec = self.lm, self.spec
        attrs = {
            "model": lm.model_id,
            "model_hash": lm.model_hash,
            "tokenization": self.layout.tokenization,
            "run_id": run_id,
            "k": spec.k,
            "vocab_size": self.vocab,
            "position_convention": "slot t holds the distribution of the token after token t",
            "last_position": LAST_POSITION,
            "probability": "p(ids[t, j]) = exp(values[t, j] - lse[t]); tail mass = 1 - sum_j p",
        }
        extra: dict[str, Any] = {"k": spec.k}
        if spec.adapter is not None:
            attrs.update(adapter_attrs(spec.adapter))
            extra["adapter"] = spec.adapter.name
        parts = (
            (self.ids_name, spec.k, "int32", "ids", {"order": "decreasing logit"}),
            (self.val_name, spec.k, "bf16", "values", {}),
            (self.lse_name, None, "fp32", "lse", {"lse": "log-sum-exp over the full vocabulary, float32"}),
        )
        out = [
            ArraySpec(
                name, width, dt, {**attrs, "kind": f"logits_{part}", **more}, "logits", None, {**extra, "part": part}
            )
            for name, width, dt, part, more in parts
        ]
        return out + (self.hidden.specs(run_id) if self.hidden else [])

    def plan(self, work: list[UnitWork]) -> None:
        rows = [self.layout.row_ids[i] for w in work for i in w.rows]
        self.ids = row_token_ids(self.store, self.layout.tokenization, rows)

    def __enter__(self) -> Logits:
        self.norm, self.head = final_norm_and_head(self.lm.model)
        blocks = decoder_layers(self.lm.model)
        self._out: dict[Any, torch.Tensor] = {}
        self._handles = [
            blocks[L].register_forward_hook(
                lambda _m, _i, o, L=L: self._out.__setitem__(L, o[0] if isinstance(o, tuple) else o)
            )
            for L in self.layers
        ]
        self._handles.append(self.norm.register_forward_hook(lambda _m, _i, o: self._out.__setitem__("norm", o)))
        self._inference = torch.inference_mode()
        self._inference.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inference.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def forward_logits(self, x: torch.Tensor, src: torch.Tensor):
        """One batch: {layer: [n, d]} states and the (ids, values, lse) of the real tokens `src`
        (flat positions in the padded [B*T] batch). The one place the model runs."""
        self._out = {}
        self.lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
        normed = self._out["norm"]
        h = normed.reshape(-1, normed.shape[-1]).index_select(0, src)
        step = self.head_tokens
        parts = [topk_lse(self.head(h[s : s + step]), self.spec.k) for s in range(0, len(h), step)]
        ids, val, lse = (torch.cat(p) for p in zip(*parts, strict=True))
        states = {L: self._out[L].reshape(-1, self._out[L].shape[-1]).index_select(0, src) for L in self.layers}
        return states, (ids, val, lse)

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        layout, dev = self.layout, self.lm.device
        pad_id = pad_token_id(self.lm.tokenizer)
        batches = unit_batches(layout, work.rows, self.spec.batch_tokens)
        self.batches += batches
        for b in batches:
            x = pad_batch([self.ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, dev)
            src, dst = (to_device(torch.from_numpy(a), dev) for a in token_index(layout, b, lo))
            tf = time.perf_counter()
            states, (ids, val, lse) = self.forward_logits(x, src)
            self.fwd_s += time.perf_counter() - tf  # on CUDA: launch time only (the engine's total is the rate)
            stage[self.ids_name].index_copy_(0, dst, ids)
            stage[self.val_name].index_copy_(0, dst, to_storage(val, "bf16"))
            stage[self.lse_name].index_copy_(0, dst, lse)
            if self.hidden is not None:
                for L, n in zip(self.layers, self.hidden.names, strict=True):
                    stage[n].index_copy_(0, dst, to_storage(states[L], self.spec.hidden_dtype))
            tick(sum(b.lengths))

    def counts(self) -> dict[str, Any]:
        return {"batches": len(self.batches), "padding_fraction": round(padding_fraction(self.batches), 4)}

    def metrics(self, seconds: float) -> dict[str, Any]:
        tokens = sum(sum(b.lengths) for b in self.batches)
        return {"forward_seconds": self.fwd_s, "forward_tokens_per_s": tokens / self.fwd_s if self.fwd_s else 0.0}


def extract_logits(
    store: Store,
    lm: Any,
    layout: Layout,
    selected: list[str],
    spec: LogitsSpec,
    engine: UnitOptions | None = None,
) -> UnitRun:
    """Fill logits/[<adapter>/]{topk/ids,topk/values,lse} (and, with spec.hidden_layers, the hidden
    arrays of the same pass) for the selected rows not yet committed (see the module docstring)."""
    engine = engine or UnitOptions()
    head_tokens = 16384 if lm.device.type == "cuda" else 1024  # [slice, vocab] float32 logits at a time
    kind = Logits(store, lm, layout, spec, head_tokens)
    extra = adapter_attrs(spec.adapter) if spec.adapter is not None else {}
    res = extract_units(
        store,
        layout,
        selected,
        kind,
        run_config={**spec.run_config, "logits_k": spec.k, "hidden_layers": kind.layers, **extra},
        device=lm.device,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=kind.layers,
        engine=engine,
    )
    if not res.skipped:
        m = res.metrics
        also = f", + hidden {','.join(map(str, kind.layers))}" if kind.layers else ""
        print(
            f"logits (top {spec.k} of {kind.vocab}{also}): {res.rows} rows, {res.tokens} tokens in "
            f"{res.seconds:.1f} s: {m['tokens_per_s']:,.0f} tok/s; "
            f"padding {res.counts['padding_fraction']:.1%}; run {res.run_id}"
        )
    return res
