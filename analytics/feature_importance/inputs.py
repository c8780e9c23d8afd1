"""What feature importance reads from the store: the metric named by `--metric`, the rows and
site tokens of `--view` / `--split` / `--max-rows`, and the padded batches the model runs.

Every check here runs before the model loads: an unknown metric, category or probe is one
error naming the value and the choices.

    completion_loss     mean cross-entropy of the rows' supervised tokens (tokens.is_supervised)
    category:<name>     mean log-probability of the supervised tokens of the rows of that
                        category (rows.category); only rows of the category are read
    probe:<name>        mean logit of a saved linear probe (trainers.probe) over the site tokens:
                        a probe file (.json/.safetensors) or a probe name, found in the newest
                        finished probe run; its layer must be >= the SAE's layer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from analytics.feature_importance.attribution import Batch
from extractors.hidden import hidden_array_name
from store.arrays import array_exists, open_array
from store.catalog.tokens import row_tokens, tokenizations
from store.core import Store, StoreError
from store.materialize import view_sql
from trainers.finetune.lm_loss import pad_right

METRIC_FORMS = "completion_loss, category:<name> or probe:<name>"


class MetricSpec(NamedTuple):
    kind: str  # completion_loss | category | probe
    name: str | None  # the category or probe named


def parse_metric(spec: str) -> MetricSpec:
    """The --metric string, checked for its form only (no store needed)."""
    if spec == "completion_loss":
        return MetricSpec("completion_loss", None)
    kind, sep, name = spec.partition(":")
    if sep and kind in ("category", "probe") and name.strip():
        return MetricSpec(kind, name.strip())
    raise ValueError(f"--metric {spec!r} is not one of {METRIC_FORMS}")


def check_category(store: Store, name: str) -> None:
    have = sorted(c for c in store.query("SELECT DISTINCT category FROM rows").column(0).to_pylist() if c is not None)
    if name not in have:
        raise StoreError(f"--metric category:{name}: no rows have category {name!r} (categories: {', '.join(have)})")


class ProbeRef(NamedTuple):
    path: Path
    layer: int
    coef: torch.Tensor  # [d] on raw activations: logit = h . coef + bias
    bias: float
    meta: dict[str, Any]


def _probe_files(store: Store) -> list[Path]:
    """Probe .json files of finished probe runs, newest run first."""
    if not store.has_table("runs"):
        return []
    ids = (
        store.query("SELECT run_id FROM runs WHERE kind = 'probe' AND status = 'finished' ORDER BY started_at DESC")
        .column(0)
        .to_pylist()
    )
    out = []
    for rid in ids:
        out += sorted(store.run_folder(rid).glob("probe_layer_*_seed_*.json"))
    return out


def find_probe(store: Store, name: str, layer: int) -> ProbeRef:
    """A probe file, or the probe called `name` of the newest finished probe run: its file at the
    SAE's layer if there is one, else the nearest layer above it (lowest seed)."""
    from safetensors.torch import load_file  # lazy: only probe metrics need it

    p = Path(name).expanduser()
    if p.suffix in (".json", ".safetensors") or p.is_file():
        cands = [p.with_suffix(".json")]
        if not cands[0].is_file():
            raise StoreError(f"--metric probe:{name}: no probe file {cands[0]} (from python -m trainers.probe)")
    else:
        files = _probe_files(store)
        named = {f: json.loads(f.read_text()) for f in files}
        cands = [f for f, m in named.items() if m.get("probe") == name]
        if not cands:
            known = sorted({m.get("probe") for m in named.values()} - {None})
            raise StoreError(
                f"--metric probe:{name}: no finished probe run has a probe named {name!r} "
                f"(probes: {', '.join(known) or 'none'}; train one with python -m trainers.probe)"
            )
        run = cands[0].parent
        cands = [f for f in cands if f.parent == run]
    metas = [(f, json.loads(f.read_text())) for f in cands]
    # The SAE's own layer first, then the nearest layer above it; the lowest seed.
    keyed = [(int(m["layer"]) != layer, int(m["layer"]), int(m.get("seed", 0)), f, m) for f, m in metas]
    usable = sorted((k for k in keyed if k[1] >= layer), key=lambda t: t[:3])
    if not usable:
        have = sorted({int(m["layer"]) for _, m in metas})
        raise StoreError(
            f"--metric probe:{name} reads layer(s) {have}, below the SAE's layer {layer}: a feature at layer "
            f"{layer} cannot change it; use a probe at layer >= {layer}"
        )
    _, lp, _, f, meta = usable[0]
    array = meta.get("array", "")
    if not array.startswith("hidden/"):
        raise StoreError(f"--metric probe:{name}: the probe reads {array!r}; only probes on hidden/layer_L work here")
    t = load_file(str(f.with_suffix(".safetensors")))
    return ProbeRef(f, lp, t["coef_raw"].float(), float(t["bias_raw"][0]), meta)


def tokenization_of(store: Store, layer: int) -> tuple[str, dict[str, Any]]:
    """The tokenization (and the attributes naming the model) of the stored layer-L states, else
    the store's newest tokenization."""
    name = hidden_array_name(layer)
    if array_exists(store, name):
        attrs = dict(open_array(store, name).attrs)
        return attrs["tokenization"], attrs
    toks = tokenizations(store)
    if not toks:
        raise StoreError(
            f"{store.root} has no tokenized rows; extract the layer first: python -m extractors.run --layer {layer} "
            f"--store {store.root}"
        )
    return toks[-1]["tokenization"], {}


class Rows(NamedTuple):
    row_ids: list[str]
    ids: dict[str, list[int]]
    supervised: dict[str, list[bool]]
    site: dict[str, np.ndarray]  # token positions of the view in each row


def select_rows(
    store: Store, tokenization: str, *, view: str, split: str, max_rows: int, category: str | None, supervised: bool
) -> Rows:
    """The view's rows in the split (of the category; with a supervised token when the metric
    reads them), the first `max_rows` by row_id, with their tokens and site positions."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if split != "all":
        where.append("v.row_id IN (SELECT row_id FROM split_members WHERE split = $split)")
        params["split"] = split
    if category is not None:
        where.append("v.row_id IN (SELECT row_id FROM rows WHERE category = $cat)")
        params["cat"] = category
    if supervised:
        where.append("v.row_id IN (SELECT row_id FROM tokens WHERE tokenization = $tok AND is_supervised)")
        params["tok"] = tokenization
    con = store.connect()
    try:
        cols = [c[0] for c in con.sql(f"SELECT * FROM ({view_sql(store, view)}) LIMIT 0").description]
        for need in ("row_id", "token_pos"):
            if need not in cols:
                raise StoreError(f"--view {view!r} must return row_id and token_pos (it returns {', '.join(cols)})")
        if "tokenization" in cols:
            where.append("v.tokenization = $tok")
            params["tok"] = tokenization
        cond = " AND ".join(where) or "TRUE"
        picked = con.sql(
            f"SELECT DISTINCT v.row_id FROM ({view_sql(store, view)}) v WHERE {cond} ORDER BY 1 LIMIT {int(max_rows)}",
            params=params,
        ).fetchall()
        row_ids = [r[0] for r in picked]
        if not row_ids:
            what = f" of category {category!r}" if category else ""
            raise StoreError(f"--view {view!r} selects no rows{what} in --split {split!r}; check both")
        con.register("_picked", pa.table({"row_id": row_ids}))
        site = con.sql(
            f"SELECT DISTINCT v.row_id, v.token_pos FROM ({view_sql(store, view)}) v JOIN _picked USING (row_id) "
            + ("WHERE v.tokenization = $tok " if "tokenization" in cols else "")
            + "ORDER BY 1, 2",
            params={"tok": tokenization} if "tokenization" in cols else None,
        ).fetchnumpy()
    finally:
        con.close()
    toks = row_tokens(store, tokenization, row_ids)
    pos = {r: site["token_pos"][site["row_id"] == r].astype(np.int64) for r in row_ids}
    return Rows(row_ids, {r: toks[r][0] for r in row_ids}, {r: toks[r][1] for r in row_ids}, pos)


def make_batches(rows: Rows, *, target: str, batch_tokens: int, pad_id: int, device: torch.device) -> list[Batch]:
    """Length-sorted batches of at most `batch_tokens` padded tokens (one row at least);
    `target` is 'supervised' (loss metrics) or 'site' (a probe)."""
    order = sorted(rows.row_ids, key=lambda r: (len(rows.ids[r]), r))
    groups, cur = [], []
    for r in order:
        if cur and len(rows.ids[r]) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(r)
    if cur:
        groups.append(cur)
    out = []
    for g in groups:
        ids = pad_right([rows.ids[r] for r in g], pad_id, device)
        attn = pad_right([[1] * len(rows.ids[r]) for r in g], 0, device)
        site = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(g):
            site[i, torch.as_tensor(rows.site[r], device=device)] = True
        if target == "site":
            tgt = site.clone()
        else:
            tgt = pad_right([[int(s) for s in rows.supervised[r]] for r in g], 0, device).bool()
        out.append(Batch(ids, attn, site, tgt))
    return out


def denominator(batches: list[Batch], target: str) -> float:
    """The global count the metric divides by: supervised tokens at positions >= 1 (those a loss
    is computed on), or site tokens."""
    if target == "site":
        return float(sum(int(b.target.sum()) for b in batches))
    return float(sum(int(b.target[:, 1:].sum()) for b in batches))
