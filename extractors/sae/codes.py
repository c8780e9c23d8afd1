"""Sparse SAE codes in the store: the array kind behind `python -m extractors.run --kinds sae`.

    python -m extractors.run --layer 17 --kinds sae --sae latest       # the newest SAE of layer 17
    python -m extractors.run --layer 17 --kinds sae --sae <name>|PATH  # a saes-table name, a folder
    python -m extractors.run --layer 17 --kinds hidden sae --sae PATH  # states, then codes

For every token of the selected rows (all tokens, special ones included) the SAE's
activations are reduced to their top k (k = the SAE's own k for TopK SAEs, else the
config's `sae_k` when it has one, else `DEFAULT_K`; tokens with more active features are
counted in the run record) and stored in the format of extractors.sae.format (values in
--dtype, bf16 by default: fp32's range, so the attention sink's large activations cannot
overflow). Inputs come from the stored hidden states (`hidden/layer_L`) for rows
committed there, so the model does not run again; other rows run the model up to layer L
(packed batches, extractors.packing, as hidden states are; `--pack off`: padded,
extractors.forward.LayerCapture) and their states are rounded to the hidden array's
storage dtype first, so a token's code does not depend on which path computed it.

Units follow the unit engine's contract (extractors.units): the units that hold selected
rows not yet committed in both arrays are computed (each unit's tokens encoded in fixed
slices, so a rerun gives the same bytes), written whole, fsynced, then committed; a killed
run rerun with the same command finishes exactly the missing units, and a finished one is
a no-op.
When all selected rows are committed the catalog tables are (re)built from the committed
codes: see extractors.sae.tables.

With `--adapter NAME` the codes are those of base + adapter states, in
`sae/<sae>/<adapter>/layer_L/{indices,values}` on the same token axis; their inputs come from
`hidden/<adapter>/layer_L` where committed, else from the adapter-wrapped model. The SAE must
have been trained on the base model's (or this adapter's) activations. The catalog tables are
not built for adapter codes: they hold one (SAE, layer) of the base model each, keyed by `sae`
and `layer` only, and analyses read them without an adapter filter, so adapter codes there would
be mixed with the base's; read adapter codes from their arrays (store.materialize.gather).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from extractors.adapters import AdapterRef, adapter_attrs, base_of
from extractors.forward import LayerCapture, pad_batch, plan_batches
from extractors.hidden import hidden_array_name
from extractors.model import check_model_hash, pad_token_id
from extractors.packing import PackedForward, plan_packs, use_packing
from extractors.sae.format import DEFAULT_K, code_array_names, encode_topk, index_dtype
from extractors.sae.load import LoadedSAE, pick_layer, write_sae_row
from extractors.sae.tables import build_sae_tables, tables_current
from extractors.units import ArrayKind, ArraySpec, UnitOptions, UnitWork, extract_units, row_slices
from store.arrays import REAL_DTYPE, STORAGE_OF, array_exists, committed_rows, committed_set, decode, encode, open_array
from store.catalog.tokens import Layout, row_token_ids
from store.core import Store, StoreError
from store.materialize import gather


@dataclass(frozen=True)
class SaeCodesSpec:
    """What `extract_sae_codes` computes: the top-k codes of the SAE `sae` (the spec as given, for
    messages) at its layer among `layers`; with `adapter`, of base + that adapter's states (the
    LoadedModel given must be wrapped already: extractors.adapters.use_adapter)."""

    sae: str
    layers: list[int]
    dtype: str  # storage dtype of the values (and of fresh states without a stored hidden array)
    batch_tokens: int  # padded tokens per batch for rows that run the model
    k: int | None = None  # slots per token for SAEs without their own k (None: DEFAULT_K)
    adapter: AdapterRef | None = None
    run_config: dict[str, Any] = field(default_factory=dict)  # the command's config, for the run record
    pack: str = "auto"  # auto | on | off: packed batches for rows that run the model (extractors.packing)


class SAECodes(ArrayKind):
    """The array kind: top-k codes of one SAE at one layer, from stored states or the model."""

    run_kind = "extract_sae"

    def __init__(
        self,
        store: Store,
        lm: Any,
        layout: Layout,
        loaded: LoadedSAE,
        layer: int,
        k: int,
        dtype: str,
        batch_tokens: int,
        adapter: AdapterRef | None = None,
        pack: str = "auto",
    ):
        self.store, self.lm, self.layout, self.loaded = store, lm, layout, loaded
        self.packed = use_packing(lm.model, pack)
        self.layer, self.k, self.dtype, self.batch_tokens, self.adapter = layer, k, dtype, batch_tokens, adapter
        name = adapter.name if adapter is not None else None
        self.idx_name, self.val_name = code_array_names(loaded.name, layer, name)
        self.names = [self.idx_name, self.val_name]
        self.desc = f"SAE codes layer {layer}"
        hidden_name = hidden_array_name(layer, name)
        self.hidden = open_array(store, hidden_name) if array_exists(store, hidden_name) else None
        self.hidden_done = committed_rows(store, hidden_name) if self.hidden is not None else {}
        # Fresh states are rounded to the stored states' dtype, so both paths give one code.
        self.store_dtype = STORAGE_OF.get(self.hidden.attrs.get("dtype"), dtype) if self.hidden is not None else dtype
        self.n_tokens, self.n_fresh, self.truncated, self.encode_s = 0, 0, 0, 0.0
        self.cap: LayerCapture | PackedForward | None = None

    def specs(self, run_id: str) -> list[ArraySpec]:
        lm, ld = self.lm, self.loaded
        attrs = {
            "model": lm.model_id,
            "model_hash": lm.model_hash,
            "tokenization": self.layout.tokenization,
            "run_id": run_id,
            "layer": self.layer,
            "sae": ld.name,
            "sae_path": ld.path,
            "sae_source": ld.source,
            "architecture": ld.architecture,
            "d_in": ld.d_in,
            "d_sae": ld.d_sae,
            "k": self.k,
            "order": "decreasing value",
            "empty_slot": "value 0 (index 0)",
            "decode": "sum_j values[t,j] * W_dec[indices[t,j]] + b_dec",
        }
        on = {}  # base arrays keep their attributes exactly as before adapters existed
        if self.adapter is not None:
            attrs.update(adapter_attrs(self.adapter))
            on = {"adapter": self.adapter.name}
        return [
            ArraySpec(
                name,
                self.k,
                dtype,
                {**attrs, "kind": f"sae_{part}", "part": part},
                "sae",
                self.layer,
                {"sae": ld.name, "k": self.k, "part": part, **on},
            )
            for name, part, dtype in (
                (self.idx_name, "indices", index_dtype(ld.d_sae)),
                (self.val_name, "values", self.dtype),
            )
        ]

    def plan(self, work: list[UnitWork]) -> None:
        lay = self.layout
        need = [i for w in work for i in w.rows if lay.row_ids[i] not in self.hidden_done.get(w.unit, set())]
        self.ids = row_token_ids(self.store, lay.tokenization, [lay.row_ids[i] for i in need]) if need else {}
        self.need_model = bool(need)

    def __enter__(self) -> SAECodes:
        if self.need_model:
            self.cap = (PackedForward if self.packed else LayerCapture)(self.lm.model, [self.layer]).__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cap is not None:
            self.cap.__exit__(*exc)

    def _inputs(self, rows: list[int], lo: int, hidden_done: set[str]) -> tuple[np.ndarray, int]:
        """The unit's selected tokens' layer-L states [n, d] in token order, and how many came
        from the model (the rest are gathered from the stored hidden states)."""
        layout, lm = self.layout, self.lm
        sl = row_slices(layout, rows, lo)
        X = np.empty((sum(n for _, _, n in sl), lm.model.config.hidden_size), dtype=np.float32)
        where, off = {}, 0
        for i, _, n in sl:
            where[i] = off
            off += n
        stored = [i for i, _, _ in sl if layout.row_ids[i] in hidden_done]
        fresh = [i for i, _, _ in sl if layout.row_ids[i] not in hidden_done]
        if stored:
            tok = np.concatenate(
                [np.arange(layout.tok_starts[i], layout.tok_starts[i] + layout.lengths[i]) for i in stored]
            )
            Xs = gather(self.store, self.hidden, tok)
            o = 0
            for i in stored:
                X[where[i] : where[i] + layout.lengths[i]] = Xs[o : o + layout.lengths[i]]
                o += layout.lengths[i]
        if fresh:
            pad_id = pad_token_id(lm.tokenizer)
            order = sorted(fresh, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
            plan = plan_packs if self.packed else plan_batches
            for b in plan(layout.lengths, order, self.batch_tokens):
                ids = [self.ids[layout.row_ids[i]] for i in b.rows]
                if isinstance(self.cap, PackedForward):  # [N, d], row after row
                    flat = self.cap.run(ids, lm.device)[self.layer]
                    offs = np.cumsum([0, *b.lengths]).tolist()
                    out = [flat[offs[j] : offs[j + 1]] for j in range(len(b.rows))]
                else:
                    padded = self.cap.capture(pad_batch(ids, b.width, pad_id, lm.device))[self.layer]
                    out = [padded[j, : b.lengths[j]] for j in range(len(b.rows))]
                for j, i in enumerate(b.rows):
                    # Round to the storage dtype: the same input the stored-state path would see.
                    h = decode(encode(out[j].float(), self.store_dtype), REAL_DTYPE[self.store_dtype])
                    X[where[i] : where[i] + b.lengths[j]] = h
        return X, sum(layout.lengths[i] for i in fresh)

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        X, fresh = self._inputs(work.rows, lo, self.hidden_done.get(work.unit, set()))
        te = time.perf_counter()
        idx, val, trunc = encode_topk(self.loaded.sae, torch.from_numpy(X), self.k)
        self.encode_s += time.perf_counter() - te
        self.n_tokens += len(X)
        self.n_fresh += fresh
        self.truncated += trunc
        rows = self.layout.unit_tokens
        bufs = {
            self.idx_name: np.zeros((rows, self.k), dtype=index_dtype(self.loaded.d_sae)),
            self.val_name: np.zeros((rows, self.k), dtype=encode(np.zeros(1, np.float32), self.dtype).dtype),
        }
        o = 0
        for _, s, n in row_slices(self.layout, work.rows, lo):
            bufs[self.idx_name][s : s + n] = idx[o : o + n]
            bufs[self.val_name][s : s + n] = encode(val[o : o + n], self.dtype)
            o += n
        for name, b in bufs.items():
            stage[name].copy_(torch.from_numpy(b.view(np.int16) if b.dtype == np.uint16 else b))
        tick(len(X))

    def counts(self) -> dict[str, Any]:
        return {
            "tokens_from_store": self.n_tokens - self.n_fresh,
            "tokens_from_model": self.n_fresh,
            "tokens_truncated_to_k": self.truncated,
        }

    def metrics(self, seconds: float) -> dict[str, Any]:
        return {
            "encode_seconds": self.encode_s,
            "encode_tokens_per_s": self.n_tokens / self.encode_s if self.encode_s else 0.0,
        }


def check_sae(loaded: LoadedSAE, lm: Any, spec: str) -> None:
    """Refuse an SAE whose width or training model does not fit `lm`; on base + adapter, an SAE
    trained on the base model's activations is accepted (how an SAE transfers to a finetune)."""
    d_model = lm.model.config.hidden_size
    if loaded.d_in != d_model:
        raise StoreError(f"SAE {spec} reads {loaded.d_in}-wide inputs but {lm.model_id} has d_model {d_model}")
    meta = loaded.sae.cfg.metadata
    trained_on = {"model_hash": meta.get("store_model_hash"), "model": meta.get("model_name")}
    if trained_on["model_hash"] != lm.model_hash:
        lm = lm._replace(model_id=base_of(lm.model_id), model_hash=base_of(lm.model_hash))
    check_model_hash(lm, trained_on, f"the activations SAE {spec} was trained on")


def extract_sae_codes(
    store: Store,
    lm: Any,
    layout: Layout,
    selected: list[str],
    spec: SaeCodesSpec,
    loaded: LoadedSAE,
    engine: UnitOptions | None = None,
) -> str | None:
    """Fill sae/<name>/[<adapter>/]layer_L/{indices,values} for the selected rows, then (for the base
    model) the catalog tables. `loaded`: the SAE, already loaded on lm.device."""
    engine = engine or UnitOptions()
    layer = pick_layer(spec.layers, loaded.layer, spec.sae)
    check_sae(loaded, lm, spec.sae)
    # TopK SAEs keep their own k; others keep --sae-k slots.
    k = min(loaded.k or spec.k or DEFAULT_K, loaded.d_sae)
    kind = SAECodes(store, lm, layout, loaded, layer, k, spec.dtype, spec.batch_tokens, spec.adapter, spec.pack)
    extra = adapter_attrs(spec.adapter) if spec.adapter is not None else {}
    res = extract_units(
        store,
        layout,
        selected,
        kind,
        run_config={
            **spec.run_config,
            "sae_name": loaded.name,
            "sae_path": loaded.path,
            "k": k,
            "layer": layer,
            **extra,
        },
        device=lm.device,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=[layer],
        engine=engine,
    )
    if res.skipped:
        _tables(store, loaded, layer, kind, spec, engine.progress, check_current=True)
        return None
    write_sae_row(store, loaded, layer, res.run_id)
    if set(selected) <= committed_set(store, kind.idx_name):
        _tables(store, loaded, layer, kind, spec, engine.progress, check_current=False)
    c, m = res.counts, res.metrics
    print(
        f"SAE codes {kind.idx_name.rsplit('/', 1)[0]} (k {k}): {c['rows']} rows, {c['tokens']} tokens "
        f"({c['tokens_from_store']} from stored states, {c['tokens_from_model']} from the model) "
        f"in {m['seconds']:.1f} s; run {res.run_id}"
    )
    if c["tokens_truncated_to_k"]:
        print(
            f"note: {c['tokens_truncated_to_k']} tokens had more than {k} active features; their codes keep the top {k}"
        )
    return res.run_id


def _tables(
    store: Store, loaded: LoadedSAE, layer: int, kind: SAECodes, spec: SaeCodesSpec, progress: bool, check_current: bool
) -> None:
    """(Re)build the catalog tables of the base model's codes (see the module docstring for adapters)."""
    if spec.adapter is not None:
        print(
            f"note: no catalog tables for {kind.idx_name.rsplit('/', 1)[0]}: the SAE tables describe the base "
            f"model's codes only; read the adapter's codes from their arrays"
        )
        return
    if check_current and tables_current(store, loaded.name, layer, kind.idx_name, kind.val_name):
        return
    print(build_sae_tables(store, loaded, layer, progress=progress))
