"""An SAE's stored codes in EleutherAI delphi's latent-cache layout, so delphi's own loader,
explainers and scorers run on them.

    python -m analytics.label_features --export-delphi /tmp/delphi-run --sae latest

delphi (delphi/latents/cache.py, `LatentCache.save_splits` / `save_config`) keeps one folder
per hookpoint under `<run>/latents/`, and in it one safetensors file per contiguous range of
latents, named `<first>_<last>.safetensors`, plus the cache's `config.json`:

    locations    [n_active, 3]  uint16 (uint32 when a sequence or latent offset is >= 2**16):
                 (sequence, position, latent - first)
    activations  [n_active]     float16
    tokens       [n_sequences, ctx_len] int64: the token ids the activations index

The ranges are delphi's: `torch.linspace(0, d_sae, n_splits + 1).long()` boundaries, the last
latent of a range being the next boundary - 1. delphi caches fixed-length sequences of a token
stream (documents concatenated); here the stream is the committed rows one after another in
store order (tok_index), cut into `ctx_len` sequences, the tail padded with `pad_token_id`.
Only tokens of the SAE's token set (its training view) carry activations, as in the feature
cards. `export.json` beside `latents/` maps each row to its span of the stream, so a
(sequence, position) of delphi's output joins back to (row_id, token_pos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from analytics.label_features.inputs import SaeRef, TokenCodes, token_codes
from store.core import Store, StoreError

DEFAULT_CTX_LEN = 256  # delphi's CacheConfig.cache_ctx_len
DEFAULT_SPLITS = 5  # delphi's CacheConfig.n_splits


@dataclass(kw_only=True)
class DelphiOptions:
    """The export's flags, shared by analytics.label_features and analytics.feature_cards."""

    export_delphi: str | None = field(
        default=None,
        metadata={"help": "write the SAE's codes in delphi's latent-cache layout to this folder, then stop"},
    )
    delphi_ctx_len: int = field(default=DEFAULT_CTX_LEN, metadata={"help": "delphi export: tokens per sequence"})
    delphi_splits: int = field(default=DEFAULT_SPLITS, metadata={"help": "delphi export: safetensors files"})


class DelphiExport(NamedTuple):
    dir: Path  # the run folder (latents/ inside)
    module_dir: Path  # latents/<hookpoint>
    files: list[Path]
    n_sequences: int
    n_active: int


def hookpoint(layer: int) -> str:
    """The residual stream after block L, in the hookpoint naming of sparsify / delphi."""
    return f"layers.{layer}"


def split_ranges(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """(first, last) latent of each split file, as delphi's `_generate_split_indices`."""
    import torch  # delphi's float32 linspace, truncated, so the file names match its own

    b = torch.linspace(0, d_sae, steps=n_splits + 1).long().tolist()
    return [(int(lo), int(hi) - 1) for lo, hi in zip(b[:-1], b[1:], strict=True)]


def stream(c: TokenCodes, ctx_len: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [n_seq, ctx_len], and per active slot: flat position, latent, activation)."""
    n = len(c.token_id)
    n_seq = -(-n // ctx_len)
    tokens = np.full(n_seq * ctx_len, pad_token_id, dtype=np.int64)
    tokens[:n] = c.token_id
    active = (c.val > 0) & c.in_set[:, None]
    flat = np.repeat(np.arange(n, dtype=np.int64), c.idx.shape[1])[active.ravel()]
    return tokens.reshape(n_seq, ctx_len), flat, c.idx[active], c.val[active]


def export_delphi(
    store: Store,
    sae: SaeRef,
    out: Path,
    *,
    ctx_len: int = DEFAULT_CTX_LEN,
    n_splits: int = DEFAULT_SPLITS,
    pad_token_id: int = 0,
) -> DelphiExport:
    """Write the layout of the module docstring under `out`; an existing export is replaced."""
    from safetensors.numpy import save_file  # lazy: only the export writes safetensors

    if ctx_len < 1 or n_splits < 1 or n_splits > sae.d_sae:
        raise StoreError(f"--delphi-ctx-len {ctx_len} must be >= 1 and --delphi-splits {n_splits} in 1..{sae.d_sae}")
    c = token_codes(store, sae)
    tokens, flat, feat, act = stream(c, ctx_len, pad_token_id)
    seq, pos = flat // ctx_len, flat % ctx_len
    module_dir = out / "latents" / hookpoint(sae.layer)
    module_dir.mkdir(parents=True, exist_ok=True)
    for old in module_dir.glob("*.safetensors"):
        old.unlink()
    files = []
    for first, last in split_ranges(sae.d_sae, n_splits):
        m = (feat >= first) & (feat <= last)
        loc = np.stack([seq[m], pos[m], feat[m] - first], axis=1)
        small = len(loc) == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16)
        path = module_dir / f"{first}_{last}.safetensors"
        save_file(
            {
                "locations": np.ascontiguousarray(loc.astype(np.uint16 if small else np.uint32)),
                "activations": np.ascontiguousarray(act[m].astype(np.float16)),
                "tokens": np.ascontiguousarray(tokens),
            },
            str(path),
        )
        files.append(path)
    # delphi's save_config: CacheConfig.to_dict() + model_name; the loader reads model_name (the
    # tokenizer) and this folder's files. The dataset_* fields name where the tokens came from.
    config = {
        "dataset_repo": str(store.root),
        "dataset_split": "committed rows with SAE codes, in store order",
        "dataset_name": c.tokenization,
        "dataset_column": "tokens",
        "batch_size": int(tokens.shape[0]),
        "cache_ctx_len": ctx_len,
        "n_tokens": int(len(c.token_id)),
        "n_splits": n_splits,
        "model_name": sae.model,
    }
    (module_dir / "config.json").write_text(json.dumps(config, indent=4))
    rows = [
        {"row_id": r, "start": int(s), "length": int(e - s)}
        for r, s, e in zip(c.row_ids, c.row_start[:-1], c.row_start[1:], strict=True)
    ]
    meta = {
        "sae": sae.name,
        "layer": sae.layer,
        "d_sae": sae.d_sae,
        "hookpoint": hookpoint(sae.layer),
        "token_set": sae.token_set,
        "tokenization": c.tokenization,
        "ctx_len": ctx_len,
        "pad_token_id": pad_token_id,
        "n_tokens": int(len(c.token_id)),
        "n_sequences": int(tokens.shape[0]),
        "n_active": int(len(act)),
        "files": [f.name for f in files],
        "rows": rows,  # stream position p = sequence * ctx_len + position; row = the span holding p
    }
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return DelphiExport(out, module_dir, files, int(tokens.shape[0]), int(len(act)))


def export_from(store: Store, sae: SaeRef, opts: DelphiOptions) -> str:
    """The export the --export-delphi flags ask for (both commands' flag), and the line describing it."""
    out = export_delphi(store, sae, Path(opts.export_delphi), ctx_len=opts.delphi_ctx_len, n_splits=opts.delphi_splits)
    return (
        f"delphi latent cache of SAE {sae.name} layer {sae.layer}: {out.n_active} activations over "
        f"{out.n_sequences} sequences of {opts.delphi_ctx_len} tokens in {len(out.files)} files under "
        f"{out.module_dir} (LatentDataset raw_dir = {out.dir / 'latents'})"
    )
