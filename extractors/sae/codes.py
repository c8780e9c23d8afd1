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
(extractors.forward.LayerCapture) and their states are rounded to the hidden array's
storage dtype first, so a token's code does not depend on which path computed it.

Units follow the unit engine's contract (extractors.units): the units that hold selected
rows not yet committed in both arrays are computed (each unit's tokens encoded in fixed
slices, so a rerun gives the same bytes), written whole, fsynced, then committed; a killed
run rerun with the same command finishes exactly the missing units, and a finished one is
a no-op.
When all selected rows are committed the catalog tables are (re)built from the committed
codes: see extractors.sae.tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from extractors.forward import LayerCapture, pad_batch, plan_batches
from extractors.model import check_model_hash, pad_token_id
from extractors.sae.format import DEFAULT_K, code_array_names, encode_topk, index_dtype
from extractors.sae.load import LoadedSAE, load_sae, pick_layer, write_sae_row
from extractors.sae.tables import build_sae_tables, tables_current
from extractors.units import ArrayKind, ArraySpec, UnitWork, extract_units, row_slices
from store.arrays import REAL_DTYPE, STORAGE_OF, array_exists, committed_rows, committed_set, decode, encode, open_array
from store.catalog.tokens import Layout, row_token_ids
from store.cli import config_dict
from store.core import Store, StoreError
from store.materialize import gather


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
    ):
        self.store, self.lm, self.layout, self.loaded = store, lm, layout, loaded
        self.layer, self.k, self.dtype, self.batch_tokens = layer, k, dtype, batch_tokens
        self.idx_name, self.val_name = code_array_names(loaded.name, layer)
        self.names = [self.idx_name, self.val_name]
        self.desc = f"SAE codes layer {layer}"
        hidden_name = f"hidden/layer_{layer}"
        self.hidden = open_array(store, hidden_name) if array_exists(store, hidden_name) else None
        self.hidden_done = committed_rows(store, hidden_name) if self.hidden is not None else {}
        # Fresh states are rounded to the stored states' dtype, so both paths give one code.
        self.store_dtype = STORAGE_OF.get(self.hidden.attrs.get("dtype"), dtype) if self.hidden is not None else dtype
        self.n_tokens, self.n_fresh, self.truncated, self.encode_s = 0, 0, 0, 0.0
        self.cap: LayerCapture | None = None

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
        return [
            ArraySpec(
                name,
                self.k,
                dtype,
                {**attrs, "kind": f"sae_{part}", "part": part},
                "sae",
                self.layer,
                {"sae": ld.name, "k": self.k, "part": part},
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
            self.cap = LayerCapture(self.lm.model, [self.layer]).__enter__()
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
            for b in plan_batches(layout.lengths, order, self.batch_tokens):
                x = pad_batch([self.ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, lm.device)
                out = self.cap.capture(x)[self.layer]
                for j, i in enumerate(b.rows):
                    # Round to the storage dtype: the same input the stored-state path would see.
                    h = decode(encode(out[j, : b.lengths[j]].float(), self.store_dtype), REAL_DTYPE[self.store_dtype])
                    X[where[i] : where[i] + b.lengths[j]] = h
        return X, sum(layout.lengths[i] for i in fresh)

    def fill(self, work: UnitWork, lo: int, stage: dict[str, torch.Tensor], tick: Callable[[int], None]) -> None:
        import time

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


def extract_sae_codes(
    store: Store,
    cfg: Any,
    lm: Any,
    layout: Layout,
    selected: list[str],
    batch_tokens: int,
    loaded: LoadedSAE | None = None,
) -> str | None:
    """Fill sae/<name>/layer_L/{indices,values} for the selected rows, then the catalog tables.
    `loaded`: the SAE already loaded on lm.device (else cfg.sae is loaded here)."""
    if loaded is None:
        loaded = load_sae(cfg.sae, str(lm.device), layer=cfg.layers[0] if len(cfg.layers) == 1 else None, store=store)
    layer = pick_layer(cfg.layers, loaded.layer, cfg.sae)
    d_model = lm.model.config.hidden_size
    if loaded.d_in != d_model:
        raise StoreError(f"SAE {cfg.sae} reads {loaded.d_in}-wide inputs but {lm.model_id} has d_model {d_model}")
    meta = loaded.sae.cfg.metadata
    check_model_hash(
        lm,
        {"model_hash": meta.get("store_model_hash"), "model": meta.get("model_name")},
        f"the activations SAE {cfg.sae} was trained on",
    )
    # TopK SAEs keep their own k; others keep --sae-k slots when ExtractConfig has that field.
    k = min(loaded.k or getattr(cfg, "sae_k", None) or DEFAULT_K, loaded.d_sae)
    kind = SAECodes(store, lm, layout, loaded, layer, k, cfg.dtype, batch_tokens)
    res = extract_units(
        store,
        layout,
        selected,
        kind,
        run_config={**config_dict(cfg), "sae_name": loaded.name, "sae_path": loaded.path, "k": k, "layer": layer},
        device=lm.device,
        model_id=lm.model_id,
        model_hash=lm.model_hash,
        layers=[layer],
        rank=cfg.rank,
        world_size=cfg.world_size,
        writers=getattr(cfg, "writers", None),
        claim_timeout=getattr(cfg, "claim_timeout", 3600.0),
        resident=getattr(cfg, "resident", None),
        progress=cfg.progress,
    )
    if res.skipped:
        if not tables_current(store, loaded.name, layer, kind.idx_name, kind.val_name):
            print(build_sae_tables(store, loaded, layer, progress=cfg.progress))
        return None
    write_sae_row(store, loaded, layer, res.run_id)
    if set(selected) <= committed_set(store, kind.idx_name):
        print(build_sae_tables(store, loaded, layer, progress=cfg.progress))
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
