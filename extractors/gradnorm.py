"""Per-token gradient norms in the store: the array kind behind `--kinds gradnorm`.

    python -m extractors.run --layers 17 24 --kinds gradnorm               # every row, layers 17 and 24
    python -m extractors.run --layers 12 17 --kinds gradnorm --rows-view "SELECT row_id FROM rows
        WHERE quality IN ('poor', 'very poor')"                           # our users' "wrong chains"
    python -m extractors.run --layer 17 --kinds gradnorm --max-rows 40 --store /tmp/st   # CPU-sized
    python -m extractors.run --layer 17 --kinds gradnorm --adapter NAME|PATH   # on a finetuned adapter

For each token t of a row and each requested layer L the array `gradnorm/layer_L` (float32,
1-D over the store's token axis) holds ||d loss / d h_L[t]||_2, where h_L is the residual
stream after decoder block L (the layer convention of extractors.forward) and the loss is
the row's completion loss on its stored tokens: the cross-entropy of every supervised token
(`tokens.is_supervised`: the final assistant content and its closing token; the prompt is
masked) given the tokens before it, summed over them (`--loss-reduction sum`, bergson's
and the users' convention) or averaged (`mean`). Each row's loss is its own: a batch's loss
is the sum of its rows' losses, and rows never interact (causal attention, right padding).

Every requested layer comes from ONE backward pass that runs only through the blocks above
the shallowest requested layer L0: a forward hook on block L0 replaces its output with a
detached copy that requires grad, hooks on the deeper blocks keep their outputs, and
`torch.autograd.grad(loss, [h_L0, h_L1, ...])` returns all gradients at once. Model
parameters never require grad, so nothing below L0 is recorded and no parameter gradient is
ever formed. Logits are computed only at the positions that predict a supervised token.

Tokens after which nothing is supervised get 0 (the last supervised token included: its
own logits predict no supervised token), and so does every token of a row without a
supervised token; the run counts those rows. Units, commits and exact resume are the unit
engine's (extractors.units): a killed run rerun with the same command recomputes exactly
the uncommitted units with the same batches, so the arrays are byte-identical.

For SQL, the committed norms are also copied into the table `token_gradnorm_values` (one
Parquet file per array and unit, rewritten when the unit's commit changes; 8 bytes per
token), which the view `token_gradnorms` joins with the tokens and the rows' metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from extractors.adapters import AdapterRef, adapter_attrs, layer_array_name
from extractors.forward import pad_batch, padding_fraction, validate_layers
from extractors.hidden import to_device, token_index, unit_batches
from extractors.model import decoder_layers, pad_token_id
from extractors.units import ArrayKind, ArraySpec, UnitOptions, UnitRun, UnitWork, extract_units
from store.arrays import array_key, committed_in_unit
from store.catalog.tokens import Layout, row_tokens
from store.core import Store
from store.materialize import gather

VALUES_TABLE = "token_gradnorm_values"
REDUCTIONS = ("sum", "mean")


def gradnorm_array_name(layer: int, adapter: str | None = None) -> str:
    """gradnorm/layer_L, or gradnorm/<adapter>/layer_L for norms on a finetuned adapter."""
    return layer_array_name("gradnorm", layer, adapter)


@dataclass(frozen=True)
class GradnormSpec:
    """What `extract_gradnorms` computes: the norms at these layers of the gradient of each row's
    completion loss (`sum` or `mean` over its supervised tokens); with `adapter`, on base + that
    adapter (the LoadedModel given must be wrapped already: extractors.adapters.use_adapter)."""

    layers: list[int]
    loss_reduction: str = "sum"
    batch_tokens: int | None = None  # padded tokens per batch; None: 32768 on CUDA, 2048 on CPU
    adapter: AdapterRef | None = None
    run_config: dict[str, Any] = field(default_factory=dict)  # the command's config, for the run record


class GradnormSource(Protocol):
    """A command config that knows its gradnorm spec and engine options (extractors.pipeline.ExtractConfig)."""

    def gradnorm_spec(self, adapter: AdapterRef | None = None) -> GradnormSpec: ...

    def unit_options(self) -> UnitOptions: ...


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder stack returning the final-normed hidden state, lm_head, logit soft cap or None)
    of a causal LM, a peft wrapper unwrapped first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), cap


def completion_loss(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    supervised: torch.Tensor,
    lm_head: Any,
    reduction: str,
    cap: float | None = None,
) -> torch.Tensor:
    """Sum over rows of each row's completion loss: the cross-entropy of the supervised tokens
    at positions >= 1 from the final hidden state one position earlier, summed over the row
    (`sum`) or averaged (`mean`). Logits are formed only where they are needed."""
    tgt = supervised.clone()
    tgt[:, 0] = False
    b, p = tgt.nonzero(as_tuple=True)
    logits = lm_head(hidden[b, p - 1]).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ce = torch.nn.functional.cross_entropy(logits, input_ids[b, p], reduction="none")
    if reduction == "mean":
        ce = ce / tgt.sum(1).clamp(min=1).to(ce.dtype)[b]
    return ce.sum()


def token_grad_norms(
    model: Any, input_ids: torch.Tensor, supervised: torch.Tensor, layers: list[int], reduction: str = "sum"
) -> dict[int, torch.Tensor]:
    """{L: [B, T] float32 ||d loss / d h_L||} for a right-padded batch, from one backward pass
    through the blocks above min(layers) (see the module docstring)."""
    layers = sorted(layers)
    blocks = decoder_layers(model)
    decoder, lm_head, cap = _parts(model)
    kept: dict[int, torch.Tensor] = {}

    def first(_mod, _inp, out):
        h = (out[0] if isinstance(out, tuple) else out).detach().requires_grad_(True)
        kept[layers[0]] = h
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def deeper(_mod, _inp, out, L):
        kept[L] = out[0] if isinstance(out, tuple) else out

    handles = [blocks[layers[0]].register_forward_hook(first)]
    handles += [blocks[L].register_forward_hook(lambda m, i, o, L=L: deeper(m, i, o, L)) for L in layers[1:]]
    try:
        with torch.enable_grad():
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            if not bool(supervised[:, 1:].any()):
                return {L: torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device) for L in layers}
            loss = completion_loss(hidden, input_ids, supervised, lm_head, reduction, cap)
            grads = torch.autograd.grad(loss, [kept[L] for L in layers])
    finally:
        for h in handles:
            h.remove()
    return {L: g.float().norm(dim=-1) for L, g in zip(layers, grads, strict=False)}


def reference_grad_norms(
    model: Any, input_ids: torch.Tensor, supervised: torch.Tensor, layers: list[int], reduction: str = "sum"
) -> dict[int, torch.Tensor]:
    """The plain-autograd reference for one unpadded row or batch: the full model with
    `output_hidden_states`, `retain_grad` on every requested layer and `loss.backward()`
    through all blocks, the embeddings made to require grad (parameters stay frozen).
    hidden_states[L + 1] is block L's output, except the last block, whose entry has the
    final norm applied, so that one is taken with a hook instead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks, n = decoder_layers(base), len(decoder_layers(base))
    last: dict[str, torch.Tensor] = {}
    handle = blocks[n - 1].register_forward_hook(
        lambda _m, _i, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.enable_grad():
            emb = base.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, output_hidden_states=True, use_cache=False)
            hs = {L: (last["h"] if L == n - 1 else out.hidden_states[L + 1]) for L in layers}
            for h in hs.values():
                h.retain_grad()
            logits = out.logits.float()
            tgt = supervised.clone()
            tgt[:, 0] = False
            ce = (
                torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
                * tgt[:, 1:]
            )
            per_row = ce.sum(1) / (tgt.sum(1).clamp(min=1) if reduction == "mean" else 1)
            per_row.sum().backward()
    finally:
        handle.remove()
    return {L: h.grad.float().norm(dim=-1) for L, h in hs.items()}


class GradNorms(ArrayKind):
    """The array kind: one forward + partial backward per batch, every requested layer at once."""

    run_kind = "extract_gradnorm"

    def __init__(
        self,
        store: Store,
        lm: Any,
        layout: Layout,
        layers: list[int],
        batch_tokens: int,
        reduction: str = "sum",
        adapter: AdapterRef | None = None,
    ):
        self.store, self.lm, self.layout, self.layers = store, lm, layout, sorted(layers)
        self.batch_tokens, self.reduction, self.adapter = batch_tokens, reduction, adapter
        name = adapter.name if adapter is not None else None
        self.names = [gradnorm_array_name(L, name) for L in self.layers]
        self.desc = f"gradnorm {','.join(map(str, self.layers))}"
        self.batches: list = []
        self.no_supervised, self.compute_s = 0, 0.0

    def specs(self, run_id: str) -> list[ArraySpec]:
        lm, ad = self.lm, self.adapter
        attrs = {
            "model": lm.model_id,
            "model_hash": lm.model_hash,
            "tokenization": self.layout.tokenization,
            "run_id": run_id,
            "kind": "gradnorm",
            "loss_reduction": self.reduction,
            **(adapter_attrs(ad) if ad is not None else {"adapter": None, "adapter_path": None}),
            "value": "L2 norm of d(completion loss)/d(output of decoder block L) per token",
            "loss": f"cross-entropy of the supervised tokens, {self.reduction} over the row",
            "layer_convention": "output of decoder block L (0-based) = transformers hidden_states[L+1]",
        }
        return [
            ArraySpec(
                n,
                None,
                "fp32",
                {**attrs, "layer": L},
                "gradnorm",
                L,
                {"adapter": attrs["adapter"]} if ad is not None else None,
            )
            for L, n in zip(self.layers, self.names, strict=False)
        ]

    def plan(self, work: list[UnitWork]) -> None:
        self.rows = row_tokens(
            self.store, self.layout.tokenization, [self.layout.row_ids[i] for w in work for i in w.rows]
        )

    def __enter__(self) -> GradNorms:
        self.lm.model.requires_grad_(False)  # never a parameter gradient, adapters included
        return self

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        layout, dev = self.layout, self.lm.device
        pad_id = pad_token_id(self.lm.tokenizer)
        batches = unit_batches(layout, work.rows, self.batch_tokens)
        self.batches += batches
        for b in batches:
            rows = [self.rows[layout.row_ids[i]] for i in b.rows]
            x = pad_batch([ids for ids, _ in rows], b.width, pad_id, dev)
            sup = torch.zeros((len(rows), b.width), dtype=torch.bool)
            for j, (_, s) in enumerate(rows):
                sup[j, : len(s)] = torch.as_tensor(s, dtype=torch.bool)
            self.no_supervised += int((~sup[:, 1:].any(1)).sum())
            src, dst = (to_device(torch.from_numpy(a), dev) for a in token_index(layout, b, lo))
            t0 = time.perf_counter()
            norms = token_grad_norms(self.lm.model, x, sup.to(dev), self.layers, self.reduction)
            for L, n in zip(self.layers, self.names, strict=False):
                stage[n].index_copy_(0, dst, norms[L].reshape(-1).index_select(0, src))
            if dev.type != "cuda":
                self.compute_s += time.perf_counter() - t0
            tick(sum(b.lengths))

    def counts(self) -> dict[str, Any]:
        return {
            "batches": len(self.batches),
            "padding_fraction": round(padding_fraction(self.batches), 4),
            "rows_without_supervised_tokens": self.no_supervised,
        }

    def metrics(self, seconds: float) -> dict[str, Any]:
        tokens = sum(sum(b.lengths) for b in self.batches)
        return {
            "compute_seconds": self.compute_s,
            "compute_tokens_per_s": tokens / self.compute_s if self.compute_s else 0.0,
        }


def sync_values_table(
    store: Store, layout: Layout, name: str, layer: int, adapter: str | None, rank: int = 0, world_size: int = 1
) -> int:
    """Copy this rank's committed units of `name` into `token_gradnorm_values` where the unit's
    commit is newer than its copy; returns the number of units written."""
    commits = store.table_dir("array_units") / array_key(name)
    if not commits.is_dir():
        return 0
    written = 0
    starts = dict(zip(layout.row_ids, zip(layout.tok_starts, layout.lengths, strict=False), strict=False))
    for f in sorted(commits.glob("u*.parquet")):
        unit = int(f.stem[1:])
        if unit % world_size != rank:
            continue
        part = f"{array_key(name)}/u{unit:06d}"
        copy = store.table_dir(VALUES_TABLE) / f"{part}.parquet"
        if copy.exists() and copy.stat().st_mtime_ns >= f.stat().st_mtime_ns:
            continue
        rows = sorted(committed_in_unit(store, name, unit), key=lambda r: starts[r][0])
        tok = (
            np.concatenate([np.arange(s, s + n) for s, n in (starts[r] for r in rows)])
            if rows
            else np.zeros(0, np.int64)
        )
        pos = np.concatenate([np.arange(starts[r][1]) for r in rows]) if rows else np.zeros(0, np.int64)
        rid = np.repeat(np.asarray(rows, dtype=object), [starts[r][1] for r in rows])
        vals = gather(store, name, tok)
        n = len(tok)
        store.write_table(
            VALUES_TABLE,
            pa.table(
                {
                    "array_name": pa.array([name] * n, pa.string()),
                    "adapter": pa.array([adapter] * n, pa.string()),
                    "layer": pa.array([layer] * n, pa.int32()),
                    "tokenization": pa.array([layout.tokenization] * n),
                    "row_id": pa.array(rid.tolist(), pa.string()),
                    "token_pos": pa.array(pos, pa.int32()),
                    "tok_index": pa.array(tok, pa.int64()),
                    "grad_norm": pa.array(vals, pa.float32()),
                }
            ),
            part=part,
        )
        written += 1
    return written


def extract_gradnorms(
    store: Store,
    spec: GradnormSpec | GradnormSource,
    lm: Any,
    layout: Layout,
    selected: list[str],
    engine: UnitOptions | None = None,
    run_extra: dict[str, Any] | None = None,
) -> UnitRun:
    """Fill gradnorm/[<adapter>/]layer_L for the selected rows, then the values table; `lm` is the
    model the norms are taken on (base + spec.adapter when it has one), `run_extra` goes into the
    run's config. `spec` may also be an ExtractConfig (bench.gradnorm passes its own), which gives
    its spec and engine options."""
    if not isinstance(spec, GradnormSpec):
        spec, engine = spec.gradnorm_spec(), spec.unit_options()
    engine = engine or UnitOptions()
    adapter = spec.adapter
    layers = validate_layers(spec.layers, len(decoder_layers(lm.model)), lm.model_id)
    batch_tokens = spec.batch_tokens or (32768 if lm.device.type == "cuda" else 2048)
    kind = GradNorms(store, lm, layout, layers, batch_tokens, spec.loss_reduction, adapter)
    extra = adapter_attrs(adapter) if adapter is not None else {}
    extra.update(run_extra or {})
    res = extract_units(
        store,
        layout,
        selected,
        kind,
        run_config={**spec.run_config, **extra, "gradnorm_batch_tokens": batch_tokens},
        device=lm.device,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=layers,
        engine=engine,
    )
    name = adapter.name if adapter is not None else None
    synced = sum(
        sync_values_table(store, layout, n, L, name, engine.rank, engine.world_size)
        for L, n in zip(layers, kind.names, strict=False)
    )
    if not res.skipped:
        c, m = res.counts, res.metrics
        print(
            f"gradient norms {', '.join(kind.names)} ({spec.loss_reduction} loss): {c['rows']} rows, "
            f"{c['tokens']} tokens in {m['seconds']:.1f} s ({m['tokens_per_s']:,.0f} tok/s); run {res.run_id}"
        )
        if c["rows_without_supervised_tokens"]:
            print(
                f"note: {c['rows_without_supervised_tokens']} rows have no supervised token to predict; "
                f"their norms are 0"
            )
    if synced:
        print(f"table {VALUES_TABLE}: {synced} units copied (view token_gradnorms)")
    return res
