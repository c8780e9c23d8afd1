"""The view behind a loader, and ActivationDataset, the map-style loader (see store.loaders).

`Selection` runs the view once through store.materialize.select (its SQL, commit check of the
first array and whole-row expansion), checks every other array's commits the same way, and turns
selection positions into a batch dict through materialize's kept per-process readers (memory-
mapped chunks locally, byte-range reads on object storage): no second gather.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from store.arrays import array_exists, committed_row_ids, decode
from store.core import Store, StoreError
from store.materialize import missing_error, reader, select


class _Source:
    """One requested array: dense (one zarr array) or SAE codes (indices + values arrays)."""

    def __init__(self, store: Store, name: str):
        self.name = name
        if _is_array(store, name):
            self.parts = [name]
            self.d_sae = None
        elif _is_array(store, f"{name}/indices") and _is_array(store, f"{name}/values"):
            self.parts = [f"{name}/indices", f"{name}/values"]
            attrs = reader(store, self.parts[0]).arr.attrs
            if "d_sae" not in attrs:
                raise StoreError(
                    f"{name}/indices has no d_sae attribute; re-extract the codes (extractors.run --kinds sae)"
                )
            self.d_sae = int(attrs["d_sae"])
        else:
            have = (
                [r["name"] for r in store.query("SELECT name FROM arrays ORDER BY 1").to_pylist()]
                if store.has_table("arrays")
                else []
            )
            raise StoreError(
                f"array {name!r} is not in {store.root}: name a dense array (hidden/layer_L) or an SAE's codes "
                f"as sae/<sae>/layer_L (without /indices or /values); arrays there: {have or 'none'}"
            )
        self.dtypes = [reader(store, p).dtype for p in self.parts]


def _is_array(store: Store, name: str) -> bool:
    """Is `name` a zarr array of the store (not a group such as sae/<sae>/layer_L)?"""
    if not array_exists(store, name):
        return False
    return json.loads((store.array_path(name) / "zarr.json").read_bytes()).get("node_type") == "array"


def check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class Selection:
    """The view's tokens (frame), its arrays, and turning positions into a batch dict."""

    def __init__(self, store: Store, view_or_sql: str | pl.DataFrame, arrays: list[str], columns: list[str] | None):
        if isinstance(arrays, str) or not arrays:
            raise ValueError(f"arrays must be a non-empty list of array names, got {arrays!r}")
        self.store = store
        self.sources = [_Source(store, a) for a in arrays]
        given = isinstance(view_or_sql, pl.DataFrame)  # a selection made already (a trainer's own sampling)
        if given:
            frame = (
                view_or_sql
                if columns is None
                else view_or_sql.select(
                    [c for c in view_or_sql.columns if c in ("row_id", "tok_index") or c in columns]
                )
            )
        else:
            frame = select(store, view_or_sql, self.sources[0].parts[0], columns=columns)
        if "tok_index" not in frame.columns or "row_id" not in frame.columns:
            raise StoreError(
                f"the {'frame' if given else 'view'} must return row_id and tok_index (join the tokens table)"
                f"{'' if given else ', or row_id alone for whole rows'}; it returns {frame.columns}"
            )
        selected = frame["row_id"].unique()
        for src in self.sources:
            for part in src.parts[1:] if src is self.sources[0] and not given else src.parts:
                missing = selected.filter(~selected.is_in(pl.Series(committed_row_ids(store, part)).implode()))
                if len(missing):
                    missing_error(store, part, missing.sort(), len(selected))
        keep = [c for c in (frame.columns if columns is None else columns) if c not in ("row_id", "tok_index")]
        self.n = len(frame)
        self.tok = frame["tok_index"].to_numpy().astype(np.int64)
        self.row_id = frame["row_id"].to_numpy()
        self.columns = {c: frame[c].to_numpy() for c in keep}
        self.frame_rows = frame["row_id"]
        # every part's chunks are local files, memory-mapped by its reader (not ranged reads)
        self.mapped = all(reader(store, p)._base is not None for s in self.sources for p in s.parts)

    def read(self, pos: np.ndarray, decoded: bool = False) -> list[np.ndarray]:
        """Rows of every array part for selection positions `pos`: stored, or decoded (bf16 widened
        to float32 as they are gathered, one pass)."""
        tok = self.tok[pos]
        return [reader(self.store, p).gather(tok, decoded=decoded) for s in self.sources for p in s.parts]

    def batch(self, pos: np.ndarray, raw: list[np.ndarray] | None = None) -> dict[str, Any]:
        """The batch dict of positions `pos`; `raw`: their stored rows, read already (a buffer)."""
        decoded = raw is None
        raw = self.read(pos, decoded=True) if raw is None else raw
        out: dict[str, Any] = {}
        i = 0
        for s in self.sources:
            if s.d_sae is None:
                if decoded:
                    x = raw[i]
                elif s.dtypes[0] == "bfloat16":  # store.arrays.decode, shifted in place: one array, not two
                    x = raw[i].astype(np.uint32)
                    x <<= 16
                    x = x.view(np.float32)
                else:
                    x = np.ascontiguousarray(decode(raw[i], s.dtypes[0]))
                out[s.name] = torch.from_numpy(x)
                i += 1
                continue
            val = raw[i + 1] if decoded else decode(raw[i + 1], s.dtypes[1])
            idx, val = raw[i].astype(np.int64), val.astype(np.float32, copy=False)
            i += 2
            b, j = np.nonzero(val)  # empty slots (value 0, index 0) are not codes
            out[s.name] = torch.sparse_coo_tensor(
                torch.from_numpy(np.stack([b, idx[b, j]])),
                torch.from_numpy(val[b, j]),
                (len(pos), s.d_sae),
                check_invariants=False,
            ).coalesce()
        out["tok_index"] = torch.from_numpy(self.tok[pos])
        out["row_id"] = self.row_id[pos].tolist()
        for c, v in self.columns.items():
            out[c] = torch.from_numpy(v[pos]) if v.dtype.kind in "biuf" else v[pos].tolist()
        return out


class ActivationDataset(Dataset):
    """Map-style: index i is token i of the view (view order), or row i with `unit="row"`; with
    `batch_size=B`, the i-th run of B tokens (rows); `take(positions)`, a batch of any positions.
    See store.loaders for a batch's keys. `view_or_sql` may also be a polars frame of row_id and
    tok_index (a trainer's own sampled selection): every array's commits are checked the same way."""

    def __init__(
        self,
        store: Store | str,
        view_or_sql: str | pl.DataFrame,
        arrays: list[str],
        columns: list[str] | None = None,
        *,
        unit: str = "token",
        batch_size: int | None = None,
    ):
        if unit not in ("token", "row"):
            raise ValueError(f"unit must be 'token' or 'row', got {unit!r}")
        self.batch_size = None if batch_size is None else check_positive("batch_size", batch_size)
        self.unit = unit
        self.sel = Selection(store if isinstance(store, Store) else Store(store), view_or_sql, arrays, columns)
        if unit == "row":  # rows in first-appearance order, each with its lines of the view
            f = pl.DataFrame({"row_id": self.sel.frame_rows}).with_row_index("_i")
            g = f.group_by("row_id", maintain_order=True).agg(pl.col("_i"))
            self._members = [np.asarray(m, dtype=np.int64) for m in g["_i"].to_list()]
        n = self.sel.n if unit == "token" else len(self._members)
        self.n_items = n
        self._len = n if self.batch_size is None else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._len

    def take(self, positions: np.ndarray) -> dict[str, Any]:
        """One batch of the given token positions of the selection (any order, repeats allowed):
        a trainer's own order (trainers.sae's stored permutation) through the same batching."""
        if self.unit != "token":
            raise ValueError("take() gives tokens; with unit='row', index the dataset by row")
        pos = np.asarray(positions, dtype=np.int64)
        if len(pos) and not (0 <= pos.min() and pos.max() < self.sel.n):
            raise IndexError(f"positions must be in 0 .. {self.sel.n - 1}, got {pos.min()} .. {pos.max()}")
        return self.sel.batch(pos)

    def stack(self, array: str) -> np.ndarray:
        """One dense array of every item, in the dataset's order, batch by batch: [n_tokens, d]
        float32 (what materialize returns for the same selection, read `batch_size` at a time)."""
        src = next((s for s in self.sel.sources if s.name == array), None)
        if src is None or src.d_sae is not None:
            raise ValueError(f"stack() takes one of the dataset's dense arrays, got {array!r}")
        parts = [self[i][array].numpy() for i in range(len(self))] if self.batch_size else []
        if not self.batch_size and len(self):
            parts = [self.sel.batch(np.arange(self.sel.n))[array].numpy()]
        if not parts:
            arr = reader(self.sel.store, src.parts[0]).arr
            return np.zeros((0, *arr.shape[1:]), np.float32)
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} items")
        i %= self._len
        b = self.batch_size or 1
        items = range(i * b, min((i + 1) * b, self.n_items))
        if self.unit == "row":
            members = [self._members[k] for k in items]
            out = self.sel.batch(np.concatenate(members))
            out["row_lengths"] = torch.tensor([len(m) for m in members], dtype=torch.int64)
            return out
        out = self.sel.batch(np.arange(items.start, items.stop, dtype=np.int64))
        if self.batch_size is None:  # one token: no batch dimension
            out = {k: v[0] for k, v in out.items()}
        return out
