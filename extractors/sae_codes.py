"""Sparse SAE codes in the store: the library behind `python -m extractors.run --kinds sae --sae PATH`.

    python -m extractors.run --layer 17 --kinds sae --sae store_data/runs/<run_id>/sae
    python -m extractors.run --layer 17 --kinds hidden sae --sae PATH     # states, then codes

For every token of the selected rows (all tokens, special ones included) the SAE's
activations are reduced to their top k (k = the SAE's own k for TopK SAEs, else the
config's `sae_k` when it has one, else `DEFAULT_K`; tokens with more active features are
counted in the run record), sorted by decreasing value, and written as two token-major Zarr
arrays over the store's layout:

    sae/<sae_name>/layer_<L>/indices   [n_slots, k] uint16 (int32 when d_sae > 65535)
    sae/<sae_name>/layer_<L>/values    [n_slots, k] in --dtype (bf16 by default: fp32's range,
                                       so the attention sink's large activations cannot overflow)

A slot with value 0 is empty (its index is 0), so `sum_j values[t, j] * W_dec[indices[t, j]]`
decodes every token. Inputs come from the stored hidden states (`hidden/layer_L`) for rows
committed there, so the model does not run again; other rows run the model up to layer L
(extractors.forward.LayerCapture) and their states are rounded to the hidden array's
storage dtype first, so a token's code does not depend on which path computed it.

Units follow the hidden-state extractor's contract: the units that hold selected rows not
yet committed in both arrays are computed (each unit's tokens encoded in fixed slices, so
a rerun gives the same bytes), written whole, fsynced, then committed; a killed run rerun
with the same command finishes exactly the missing units, and a finished one is a no-op.
When all selected rows are committed the catalog tables are (re)built from the committed
codes: see extractors.sae_tables.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from extractors.extract import wait_for, UnitWriter, plan_work, row_token_ids
from extractors.forward import LayerCapture, pad_batch, plan_batches
from store.arrays import committed_rows, create_array, decode, encode, open_array, record_array
from store.cli import config_dict
from store.core import Store, StoreError
from store.materialize import gather
from store.runs import Run
from store.tokens import Layout

DEFAULT_K = 64          # slots per token for SAEs without their own k (ReLU, JumpReLU, ...)
ENCODE_SLICE = 4096     # tokens per SAE encode call (fixed, so results do not depend on batching)
_REAL = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_STORAGE = {v: k for k, v in _REAL.items()}


def code_array_names(sae_name: str, layer: int) -> tuple[str, str]:
    base = f"sae/{sae_name}/layer_{layer}"
    return f"{base}/indices", f"{base}/values"


def pick_layer(layers: list[int], sae_layer: int | None, spec: str) -> int:
    """The SAE's own layer when it records one (it must be requested), else the single --layer."""
    if sae_layer is not None:
        if sae_layer not in layers:
            raise StoreError(f"SAE {spec} was trained on layer {sae_layer}, but --layer {layers} was requested; "
                             f"pass --layer {sae_layer}")
        return sae_layer
    if len(layers) != 1:
        raise StoreError(f"SAE {spec} does not say which layer it reads; pass exactly one --layer, got {layers}")
    return layers[0]


@torch.no_grad()
def encode_topk(sae: Any, X: torch.Tensor, k: int,
                slice_tokens: int = ENCODE_SLICE) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k (indices int64, values float32, sorted by decreasing value) of the SAE's
    activations of X [n, d_in]; zero slots get index 0. Also returns how many tokens had
    more than k active features (codes truncated; always 0 for TopK SAEs with this k)."""
    idx_out = np.zeros((len(X), k), dtype=np.int64)
    val_out = np.zeros((len(X), k), dtype=np.float32)
    truncated = 0
    for s in range(0, len(X), slice_tokens):
        acts = sae.encode(X[s: s + slice_tokens].to(sae.device, sae.dtype)).float()
        top = acts.topk(k, dim=-1, sorted=True)
        vals = top.values.clamp_min(0)
        idx = torch.where(vals > 0, top.indices, torch.zeros_like(top.indices))
        truncated += int(((acts > 0).sum(-1) > k).sum())
        idx_out[s: s + len(acts)] = idx.cpu().numpy()
        val_out[s: s + len(acts)] = vals.cpu().numpy()
    return idx_out, val_out, truncated


@torch.no_grad()
def decode_codes(sae: Any, indices: np.ndarray, values: np.ndarray, slice_tokens: int = ENCODE_SLICE) -> torch.Tensor:
    """Reconstructions from stored codes through the SAE's own decoder (dense activations)."""
    out = []
    for s in range(0, len(indices), slice_tokens):
        idx = torch.as_tensor(indices[s: s + slice_tokens].astype(np.int64), device=sae.device)
        val = torch.as_tensor(values[s: s + slice_tokens], dtype=sae.dtype, device=sae.device)
        acts = torch.zeros(len(idx), sae.cfg.d_sae, dtype=sae.dtype, device=sae.device)
        acts.scatter_add_(1, idx, val)      # zero slots add 0 to feature 0
        out.append(sae.decode(acts).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, sae.cfg.d_in)


def _row_slices(layout: Layout, rows: list[int], lo: int) -> list[tuple[int, int, int]]:
    """(layout index, start within the unit, length) in token order."""
    return sorted(((i, layout.tok_starts[i] - lo, layout.lengths[i]) for i in rows), key=lambda t: t[1])


def _unit_inputs(store: Store, lm: Any, layout: Layout, rows: list[int], lo: int, *, hidden: zarr.Array | None,
                 hidden_done: set[str], layer: int, cap: LayerCapture | None, ids: dict[str, list[int]],
                 batch_tokens: int, store_dtype: str) -> tuple[np.ndarray, int]:
    """The unit's selected tokens' layer-L states [n, d] in token order, and how many came
    from the model (the rest are gathered from the stored hidden states)."""
    sl = _row_slices(layout, rows, lo)
    d = lm.model.config.hidden_size
    X = np.empty((sum(n for _, _, n in sl), d), dtype=np.float32)
    where, off = {}, 0
    for i, _, n in sl:
        where[i] = off
        off += n
    stored = [i for i, _, _ in sl if layout.row_ids[i] in hidden_done]
    fresh = [i for i, _, _ in sl if layout.row_ids[i] not in hidden_done]
    if stored:
        tok = np.concatenate([np.arange(layout.tok_starts[i], layout.tok_starts[i] + layout.lengths[i])
                              for i in stored])
        Xs = gather(store, hidden, tok)
        o = 0
        for i in stored:
            X[where[i]: where[i] + layout.lengths[i]] = Xs[o: o + layout.lengths[i]]
            o += layout.lengths[i]
    if fresh:
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        order = sorted(fresh, key=lambda i: (layout.lengths[i], layout.row_ids[i]))
        for b in plan_batches(layout.lengths, order, batch_tokens):
            x = pad_batch([ids[layout.row_ids[i]] for i in b.rows], b.width, pad_id, lm.device)
            out = cap.capture(x)[layer]
            for j, i in enumerate(b.rows):
                # Round to the storage dtype: the same input the stored-state path would see.
                h = decode(encode(out[j, : b.lengths[j]].float(), store_dtype), _REAL[store_dtype])
                X[where[i]: where[i] + b.lengths[j]] = h
    return X, sum(layout.lengths[i] for i in fresh)


def extract_sae_codes(store: Store, cfg: Any, lm: Any, layout: Layout, selected: list[str], batch_tokens: int,
                      loaded: Any = None):
    """Fill sae/<name>/layer_L/{indices,values} for the selected rows, then the catalog tables.
    `loaded`: the SAE already loaded on lm.device (else cfg.sae is loaded here)."""
    from extractors.sae_tables import build_sae_tables, tables_current, write_sae_row
    from trainers.sae_load import load_sae

    if loaded is None:
        loaded = load_sae(cfg.sae, str(lm.device), layer=cfg.layers[0] if len(cfg.layers) == 1 else None,
                          store=str(store.root))
    sae = loaded.sae
    layer = pick_layer(cfg.layers, loaded.layer, cfg.sae)
    d_model = lm.model.config.hidden_size
    if loaded.d_in != d_model:
        raise StoreError(f"SAE {cfg.sae} reads {loaded.d_in}-wide inputs but {lm.model_id} has d_model {d_model}")
    want_hash = sae.cfg.metadata.get("store_model_hash")
    if want_hash and want_hash != lm.model_hash:
        raise StoreError(f"SAE {cfg.sae} was trained on activations of model hash {want_hash}, but this run "
                         f"uses {lm.model_id} ({lm.model_hash}); pass the matching --model")
    # TopK SAEs keep their own k; others keep --sae-k slots when ExtractConfig has that field.
    k = min(loaded.k or getattr(cfg, "sae_k", None) or DEFAULT_K, loaded.d_sae)
    idx_name, val_name = code_array_names(loaded.name, layer)
    names = [idx_name, val_name]
    work = plan_work(layout, selected, names, cfg.rank, cfg.world_size, store)
    if not work:
        print(f"nothing to do: {idx_name} already holds all {len(selected)} selected rows")
        if not tables_current(store, loaded.name, layer, idx_name, val_name):
            print(build_sae_tables(store, loaded, layer, progress=cfg.progress))
        return None

    run = Run(store, "extract_sae", {**config_dict(cfg), "sae_name": loaded.name, "sae_path": loaded.path,
                                     "k": k, "layer": layer},
              model_id=lm.model_id, model_hash=lm.model_hash, layers=[layer], rank=cfg.rank,
              world_size=cfg.world_size)
    try:
        attrs = {"model": lm.model_id, "model_hash": lm.model_hash, "tokenization": layout.tokenization,
                 "run_id": run.run_id, "layer": layer, "sae": loaded.name, "sae_path": loaded.path,
                 "sae_source": loaded.source, "architecture": loaded.architecture, "d_in": loaded.d_in,
                 "d_sae": loaded.d_sae, "k": k, "order": "decreasing value",
                 "empty_slot": "value 0 (index 0)", "decode": "sum_j values[t,j] * W_dec[indices[t,j]] + b_dec"}
        idx_dtype = "uint16" if loaded.d_sae <= 65535 else "int32"
        dtypes = {idx_name: idx_dtype, val_name: cfg.dtype}
        arrays: dict[str, zarr.Array] = {}
        for name, part in ((idx_name, "indices"), (val_name, "values")):
            if cfg.rank == 0:
                arrays[name] = create_array(store, name, n_slots=layout.n_slots, width=k,
                                            chunk_slots=layout.unit_tokens,
                                            dtype=dtypes[name], attrs={**attrs, "kind": f"sae_{part}", "part": part})
                record_array(store, name, arrays[name], kind="sae", layer=layer, run_id=run.run_id,
                             extra={"sae": loaded.name, "k": k, "part": part})
            else:
                wait_for(lambda n=name: (store.array_path(n) / "zarr.json").exists(), name)
                arrays[name] = zarr.open_array(str(store.array_path(name)), mode="r+")
        counts = _run_units(store, lm, layout, work, sae, layer, k, arrays, idx_name, val_name, cfg, batch_tokens, run)
        for name in names:
            record_array(store, name, arrays[name], kind="sae", layer=layer, run_id=run.run_id,
                         extra={"sae": loaded.name, "k": k, "part": name.rsplit("/", 1)[1]})
        run.finish(counts=counts["counts"], metrics=counts["metrics"])
    except BaseException as e:
        run.fail(e)
        raise
    write_sae_row(store, loaded, layer, run.run_id)
    done = committed_rows(store, idx_name)
    have = set().union(*done.values()) if done else set()
    if set(selected) <= have:
        print(build_sae_tables(store, loaded, layer, progress=cfg.progress))
    c = counts["counts"]
    print(f"SAE codes {idx_name.rsplit('/', 1)[0]} (k {k}): {c['rows']} rows, {c['tokens']} tokens "
          f"({c['tokens_from_store']} from stored states, {c['tokens_from_model']} from the model) in "
          f"{counts['metrics']['seconds']:.1f} s; run {run.run_id}")
    if c["tokens_truncated_to_k"]:
        print(f"note: {c['tokens_truncated_to_k']} tokens had more than {k} active features; their codes keep "
              f"the top {k}")
    return run.run_id


def _run_units(store, lm, layout, work, sae, layer, k, arrays, idx_name, val_name, cfg, batch_tokens, run) -> dict:
    hidden_name = f"hidden/layer_{layer}"
    hidden = open_array(store, hidden_name) if (store.array_path(hidden_name) / "zarr.json").exists() else None
    hidden_done = committed_rows(store, hidden_name) if hidden is not None else {}
    store_dtype = _STORAGE.get(hidden.attrs.get("dtype"), cfg.dtype) if hidden is not None else cfg.dtype
    need_model = [i for w in work for i in w.rows if layout.row_ids[i] not in hidden_done.get(w.unit, set())]
    ids = row_token_ids(store, layout.tokenization, [layout.row_ids[i] for i in need_model]) if need_model else {}
    total = sum(layout.lengths[i] for w in work for i in w.rows)
    writer = UnitWriter(store, arrays, layout, run.run_id)
    writer.start()
    t0, enc_s, n_fresh, truncated = time.perf_counter(), 0.0, 0, 0
    bar = tqdm(total=total, desc=f"SAE codes layer {layer}", unit="tok", unit_scale=True, disable=not cfg.progress)
    cap = LayerCapture(lm.model, [layer]) if need_model else None
    try:
        if cap is not None:
            cap.__enter__()
        for w in work:
            lo = w.unit * layout.unit_tokens
            X, fresh = _unit_inputs(store, lm, layout, w.rows, lo, hidden=hidden,
                                    hidden_done=hidden_done.get(w.unit, set()), layer=layer, cap=cap, ids=ids,
                                    batch_tokens=batch_tokens, store_dtype=store_dtype)
            te = time.perf_counter()
            idx, val, trunc = encode_topk(sae, torch.from_numpy(X), k)
            enc_s += time.perf_counter() - te
            n_fresh += fresh
            truncated += trunc
            bufs = {idx_name: np.zeros((layout.unit_tokens, k), dtype=arrays[idx_name].dtype),
                    val_name: np.zeros((layout.unit_tokens, k), dtype=arrays[val_name].dtype)}
            o = 0
            for _, s, n in _row_slices(layout, w.rows, lo):
                bufs[idx_name][s: s + n] = idx[o: o + n]
                bufs[val_name][s: s + n] = encode(val[o: o + n], cfg.dtype)
                o += n
            writer.put((w, bufs))
            bar.update(len(X))
    finally:
        if cap is not None:
            cap.__exit__(None, None, None)
        bar.close()
    writer.close()
    secs = time.perf_counter() - t0
    n_rows = sum(len(w.rows) for w in work)
    return {"counts": {"rows": n_rows, "tokens": total, "units": len(work), "tokens_from_store": total - n_fresh,
                       "tokens_from_model": n_fresh, "tokens_truncated_to_k": truncated},
            "metrics": {"seconds": secs, "tokens_per_s": total / secs if secs else 0.0,
                        "encode_tokens_per_s": total / enc_s if enc_s else 0.0, "writer_seconds": writer.seconds}}
