"""What labelling reads from the store: the SAE named by --sae, its stored codes (with the token
ids, texts and token-set mask) and the feature selection of --features.

Every check here runs before any model loads: an SAE without codes, or a --features
naming a feature the SAE does not have, is one error naming the value and the command or
value that fixes it.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from extractors.sae.format import code_array_names
from extractors.sae.load import registered
from store.arrays import array_exists, committed_set, open_array
from store.core import Store, StoreError
from store.materialize import gather, view_sql

DEFAULT_TOKEN_SET = "content_tokens"  # the SAE trainer's default --view


class SaeRef(NamedTuple):
    name: str
    layer: int
    d_sae: int
    token_set: str  # the view the SAE was trained on (its codes' token set)
    model: str  # the model id of the store's tokenization (for delphi's config.json)


def resolve_sae(store: Store, spec: str, layer: int | None) -> SaeRef:
    """`latest` (newest SAE, of --layer when given) or a name of the store's saes table."""
    rows = registered(store, layer)
    if not rows:
        at = f" at layer {layer}" if layer is not None else ""
        raise StoreError(
            f"--sae {spec}: {store.root} has no SAE{at} in its saes table; train one first: "
            f"python -m trainers.sae --layer L --store {store.root}"
        )
    if spec == "latest":
        if layer is None and len({r["layer"] for r in rows}) > 1:
            have = ", ".join(f"{r['sae']} (layer {r['layer']})" for r in rows)
            raise StoreError(f"--sae latest is ambiguous without one --layer (SAEs: {have})")
        row = rows[0]
    else:
        named = [r for r in rows if r["sae"] == spec]
        if not named:
            have = ", ".join(f"{r['sae']} (layer {r['layer']})" for r in rows)
            raise StoreError(f"--sae {spec!r} is not in the saes table of {store.root} (SAEs: {have}, or latest)")
        row = named[0]
    meta = store.query(
        "SELECT d_sae, metrics FROM saes WHERE sae = ? AND layer = ?", [row["sae"], row["layer"]]
    ).to_pylist()[0]
    metrics = json.loads(meta["metrics"] or "{}")
    model = ""
    if store.has_table("tokenizations"):
        m = store.query("SELECT model FROM tokenizations ORDER BY created_at DESC LIMIT 1").column(0).to_pylist()
        model = (m[0] or "").split(" (")[0] if m else ""
    return SaeRef(row["sae"], int(row["layer"]), int(meta["d_sae"]), metrics.get("view", DEFAULT_TOKEN_SET), model)


def code_arrays(store: Store, sae: SaeRef) -> tuple[str, str]:
    """The SAE's code arrays, or the error naming the command that writes them."""
    idx_name, val_name = code_array_names(sae.name, sae.layer)
    if not (array_exists(store, idx_name) and array_exists(store, val_name)):
        raise StoreError(
            f"SAE {sae.name} has no codes at layer {sae.layer} in {store.root}; write them first: "
            f"python -m extractors.run --layer {sae.layer} --kinds sae --sae {sae.name} --store {store.root}"
        )
    if not committed_set(store, idx_name) & committed_set(store, val_name):
        raise StoreError(f"{idx_name} has no committed rows; rerun python -m extractors.run --kinds sae")
    return idx_name, val_name


class TokenCodes(NamedTuple):
    """Every token of the rows with codes, in tok_index order (rows contiguous)."""

    row_ids: list[str]  # the rows, in order
    row_start: np.ndarray  # [n_rows + 1] offsets of each row's tokens
    token_id: np.ndarray  # [n] int64
    in_set: np.ndarray  # [n] bool: in the SAE's token set
    idx: np.ndarray  # [n, k] int64 feature ids
    val: np.ndarray  # [n, k] float32 activations (0 = empty slot)
    tokenization: str
    text: list[str]  # [n] token text
    token_pos: np.ndarray  # [n] position in its row

    def row_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """[n] first token and one past the last token of each token's row."""
        lengths = np.diff(self.row_start)
        return np.repeat(self.row_start[:-1], lengths), np.repeat(self.row_start[1:], lengths)


def token_codes(store: Store, sae: SaeRef) -> TokenCodes:
    """The codes of every committed row (one sorted gather per array) with the token ids."""
    idx_name, val_name = code_arrays(store, sae)
    rows = sorted(committed_set(store, idx_name) & committed_set(store, val_name))
    tokz = open_array(store, idx_name).attrs["tokenization"]
    con = store.connect()
    try:
        con.register("_rows", pa.table({"row_id": rows}))
        t = con.sql(
            "SELECT t.tok_index, t.row_id, t.token_id, t.token_text, t.token_pos, s.tok_index IS NOT NULL AS in_set "
            f"FROM tokens t JOIN _rows USING (row_id) LEFT JOIN (SELECT DISTINCT tok_index FROM "
            f"({view_sql(store, sae.token_set)})) s ON s.tok_index = t.tok_index "
            "WHERE t.tokenization = ? ORDER BY t.tok_index",
            params=[tokz],
        ).fetchnumpy()
    finally:
        con.close()
    tok = np.asarray(t["tok_index"], dtype=np.int64)
    row_col = np.asarray(t["row_id"], dtype=object)
    change = np.flatnonzero(np.r_[True, row_col[1:] != row_col[:-1]])
    return TokenCodes(
        row_ids=[str(r) for r in row_col[change]],
        row_start=np.r_[change, len(tok)].astype(np.int64),
        token_id=np.asarray(t["token_id"], dtype=np.int64),
        in_set=np.asarray(t["in_set"], dtype=bool),
        idx=gather(store, idx_name, tok).astype(np.int64),
        val=gather(store, val_name, tok).astype(np.float32),
        tokenization=tokz,
        text=["" if x is None else str(x) for x in t["token_text"]],
        token_pos=np.asarray(t["token_pos"], dtype=np.int64),
    )


def parse_features(spec: list[str], d_sae: int) -> tuple[int | None, list[int]]:
    """--features: one number N (the top N features by importance when the cards have it, else
    by density), or feature ids (`12 40 7`; one id as `7,`): (top_n, []) or (None, ids).
    Ids out of range fail here, before anything loads."""
    parts = [p for s in spec for p in s.replace(",", " ").split()]
    if not parts:
        raise ValueError("--features needs a number N (top N) or feature ids")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--features {' '.join(spec)!r}: give a number N (top N) or integer feature ids") from None
    if len(spec) == 1 and "," not in spec[0]:
        if nums[0] < 1:
            raise ValueError(f"--features {nums[0]}: the top N needs N >= 1")
        return nums[0], []
    bad = [n for n in nums if not 0 <= n < d_sae]
    if bad:
        raise StoreError(f"--features {bad[0]} is out of range: the SAE has features 0..{d_sae - 1}")
    return None, list(dict.fromkeys(nums))
