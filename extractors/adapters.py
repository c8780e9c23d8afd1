"""LoRA adapters in the store: the `adapters` registry, resolving `--adapter`, applying one.

    ref = resolve_adapter(store, "latest")                 # the newest adapter of the adapters table
    ref = resolve_adapter(store, "finetune-20261201-...")  # a name from that table
    ref = resolve_adapter(store, "store_data/runs/finetune-.../adapter")   # any peft adapter folder
    lm = apply_adapter(load_model("embedded"), "latest", store)   # base + adapter, eval, no grads

`python -m trainers.finetune` writes an adapter to `runs/<run_id>/adapter/` (peft's own format,
so `peft.PeftModel.from_pretrained(base, folder)` opens it without this package), a
`store_adapter.json` beside peft's files (our name, base model id and hash, run id), and one
row in the `adapters` table. The adapter's name is its training run id; arrays computed on it
carry that name (`hidden/<adapter>/layer_L`, `gradnorm/<adapter>/layer_L`,
`sae/<sae>/<adapter>/layer_L/...`: `layer_array_name`), so base and adapter results live side
by side on the same token axis. `python -m extractors.run --adapter NAME` resolves the adapter
once and runs every kind of the command on base + adapter (`use_adapter`).

A spec is, in this order: `latest`, a name in the `adapters` table, or a folder holding a peft
adapter (`adapter_config.json`). A folder from elsewhere (no `store_adapter.json`) is named
after the folder plus a hash of its weights, and its base model is what peft recorded
(`base_model_name_or_path`), with no hash to check.

`apply_adapter` refuses an adapter trained on another base model: the recorded base hash must
equal the loaded model's `model_hash`. The returned `LoadedModel` names base + adapter:
`model_id` "<base id>+adapter:<name>", `model_hash` "<base hash>+adapter:sha256:<weights>".
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

from store.core import Store, StoreError

TABLE = "adapters"
META_FILE = "store_adapter.json"  # our metadata beside peft's adapter_config.json
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

ADAPTERS_SCHEMA = pa.schema(
    [
        ("adapter", pa.string()),
        ("path", pa.string()),
        ("base_model", pa.string()),
        ("base_hash", pa.string()),
        ("run_id", pa.string()),
        ("tokenization", pa.string()),
        ("train_split", pa.string()),
        ("train_rows_sql", pa.string()),
        ("n_train_rows", pa.int64()),
        ("n_train_tokens", pa.int64()),
        ("resumed_from", pa.string()),
        ("lora_r", pa.int32()),
        ("lora_alpha", pa.float64()),
        ("target_modules", pa.list_(pa.string())),
        ("final_train_loss", pa.float64()),
        ("final_eval_loss", pa.float64()),
        ("config", pa.string()),
        ("metrics", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


class AdapterRef(NamedTuple):
    name: str  # store name: the finetune run id, or <folder>-<weights hash> for foreign folders
    path: str  # the peft adapter folder
    base_model: str  # the base model's id as runs record it
    base_hash: str  # the base model's hash ("" when unknown: a foreign adapter)
    run_id: str  # the finetune run ("" for a foreign adapter)


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return s or "adapter"


def weights_file(folder: Path) -> Path:
    for n in PEFT_WEIGHTS:
        if (folder / n).is_file():
            return folder / n
    raise StoreError(
        f"{folder} has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}; it is not a complete peft "
        f"adapter (train one with python -m trainers.finetune)"
    )


def weights_hash(folder: str | Path) -> str:
    """sha256 of the adapter's weight file: what identifies an adapter in model hashes."""
    h = hashlib.sha256()
    with open(weights_file(Path(folder)), "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def registered(store: Store | None) -> list[dict[str, Any]]:
    """The store's `adapters` rows, newest first."""
    if store is None or not store.has_table(TABLE):
        return []
    return store.query(f"SELECT * FROM {TABLE} ORDER BY created_at DESC, adapter").to_pylist()


def _available(store: Store | None) -> str:
    rows = registered(store)
    if not rows:
        return "this store has no adapters yet; train one with python -m trainers.finetune" + (
            f" --store {store.root}" if store is not None else ""
        )
    return "adapters in this store: " + ", ".join(r["adapter"] for r in rows) + ", or latest"


def _from_row(row: dict[str, Any], store: Store) -> AdapterRef:
    """A registered adapter; a moved store finds it at runs/<run_id>/adapter (when it has a run)."""
    moved = [store.run_folder(str(row["run_id"])) / "adapter"] if row["run_id"] else []
    for p in (Path(row["path"]), *moved):
        if (p / PEFT_CONFIG).is_file():
            return AdapterRef(
                row["adapter"], str(p), row["base_model"] or "", row["base_hash"] or "", row["run_id"] or ""
            )
    raise StoreError(
        f"adapter {row['adapter']!r} is recorded at {row['path']}, which no longer exists; "
        f"retrain it with python -m trainers.finetune --store {store.root}"
    )


def read_folder(folder: Path) -> AdapterRef:
    """An adapter folder: our metadata when present, else peft's config alone."""
    if not (folder / PEFT_CONFIG).is_file():
        raise StoreError(
            f"--adapter {str(folder)!r} is a folder without {PEFT_CONFIG}, so not a peft adapter; "
            f"pass the 'adapter' folder of a python -m trainers.finetune run, or a name"
        )
    meta_path = folder / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        # written by write_meta (the AdapterRef's fields: `name`); older folders said `adapter`
        return AdapterRef(
            meta.get("name") or meta["adapter"],
            str(folder),
            meta.get("base_model", ""),
            meta.get("base_hash", ""),
            meta.get("run_id", ""),
        )
    peft_cfg = json.loads((folder / PEFT_CONFIG).read_text())
    name = f"{_sanitize(folder.name)}-{weights_hash(folder)[:8]}"
    return AdapterRef(name, str(folder), str(peft_cfg.get("base_model_name_or_path") or ""), "", "")


def resolve_adapter(store: Store | None, spec: str) -> AdapterRef:
    """`latest`, a name in the `adapters` table, or a peft adapter folder (see the module docstring)."""
    if not spec:
        raise StoreError(f"--adapter is empty; {_available(store)}")
    if spec == "latest":
        rows = registered(store)
        if not rows:
            raise StoreError(f"--adapter latest: {_available(store)}")
        return _from_row(rows[0], store)
    named = [r for r in registered(store) if r["adapter"] == spec]
    if named:
        return _from_row(named[0], store)
    p = Path(spec).expanduser()
    if p.is_dir():
        return read_folder(p.resolve())
    raise StoreError(
        f"--adapter {spec!r} is neither a name in the store's adapters table, latest, nor an existing "
        f"peft adapter folder ({_available(store)})"
    )


def check_base(ref: AdapterRef, model_id: str, model_hash: str) -> None:
    """Refuse an adapter whose recorded base model is not the loaded one."""
    if ref.base_hash and model_hash and ref.base_hash != model_hash:
        raise StoreError(
            f"adapter {ref.name} was trained on {ref.base_model} ({ref.base_hash}), but the loaded "
            f"model is {model_id} ({model_hash}); pass --model with the adapter's base model, or "
            f"an adapter trained on {model_id}"
        )


def apply_adapter(lm: Any, spec: str | AdapterRef, store: Store | None) -> Any:
    """Wrap `lm.model` (a LoadedModel's) with the adapter `spec` (a spec string, or an AdapterRef
    already resolved) as a peft `PeftModel` in eval mode, no parameter grads; returns a LoadedModel
    naming base + adapter (see the module docstring). The base model object is modified in place
    (peft injects its LoRA layers), so do not reuse `lm` as the base."""
    try:
        from peft import PeftModel  # lazy: peft imports accelerate and more, and only adapter runs need it
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise RuntimeError("adapters need peft: pip install peft (or run make setup)") from e

    ref = spec if isinstance(spec, AdapterRef) else resolve_adapter(store, spec)
    check_base(ref, lm.model_id, lm.model_hash)
    model = PeftModel.from_pretrained(lm.model, ref.path, is_trainable=False)
    model.to(lm.device).eval()
    model.requires_grad_(False)
    return lm._replace(
        model=model,
        model_id=f"{lm.model_id}+adapter:{ref.name}",
        model_hash=f"{lm.model_hash}+adapter:sha256:{weights_hash(ref.path)}",
        note=f"{lm.note}; adapter {ref.name} from {ref.path}",
    )


def use_adapter(lm: Any, ref: AdapterRef | None, store: Store | None) -> Any:
    """`lm` on base + `ref` (apply_adapter), or `lm` itself without an adapter or when it already
    carries this one: the one way every kind of `extractors.run --adapter` gets its model."""
    if ref is None or adapter_name(lm.model_id) == ref.name:
        return lm
    return apply_adapter(lm, ref, store)


def adapter_name(model_id: str) -> str | None:
    """The adapter's name in a model id made by `apply_adapter`, else None."""
    _, sep, name = model_id.rpartition("+adapter:")
    return name if sep else None


def base_of(model_key: str) -> str:
    """The base model's id (or hash) in a model id (or hash) made by `apply_adapter`."""
    return model_key.partition("+adapter:")[0]


def layer_array_name(prefix: str, layer: int, adapter: str | None = None) -> str:
    """`<prefix>/layer_L`, or `<prefix>/<adapter>/layer_L` for an array computed on base + adapter
    (hidden/..., gradnorm/..., sae/<sae>/...): the same token axis, side by side with the base."""
    return f"{prefix}/{adapter}/layer_{layer}" if adapter else f"{prefix}/layer_{layer}"


def adapter_attrs(ref: AdapterRef) -> dict[str, str]:
    """What an array computed on base + adapter says about the adapter (its attrs and run config)."""
    return {"adapter": ref.name, "adapter_path": str(ref.path)}


def write_meta(folder: Path, ref: AdapterRef, store: Store) -> None:
    store.write_json(folder / META_FILE, ref._asdict())


def write_adapter_record(store: Store, ref: AdapterRef, **fields: Any) -> None:
    """One row per adapter in the `adapters` table (its own Parquet file, named by the adapter);
    `fields` are the other ADAPTERS_SCHEMA columns (config/metrics dicts are stored as JSON)."""
    row = {n: None for n in ADAPTERS_SCHEMA.names}
    row.update(
        {
            "adapter": ref.name,
            "path": ref.path,
            "base_model": ref.base_model,
            "base_hash": ref.base_hash,
            "run_id": ref.run_id,
            "created_at": datetime.now(UTC),
        }
    )
    for k, v in fields.items():
        if k not in row:
            raise KeyError(f"adapters table has no column {k!r}")
        row[k] = json.dumps(v, sort_keys=True, default=str) if k in ("config", "metrics") else v
    store.write_table(TABLE, pa.Table.from_pylist([row], schema=ADAPTERS_SCHEMA), part=_sanitize(ref.name))
