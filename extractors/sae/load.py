"""Load an SAE for the store, and the store's registry of SAEs (the `saes` table).

    load_sae("latest", layer=17, store=store)                     # the newest SAE of layer 17
    load_sae("train_sae-20261201-...", store=store)              # a name from the saes table
    load_sae("store_data/runs/train_sae-.../sae")                   # a local sae-lens folder
    load_sae("gemma-scope-2b-pt-res-canonical/layer_17/width_16k/canonical")  # the registry

A spec is, in this order: `latest` (the most recently recorded SAE of that layer in the
store's `saes` table), a name in that table, an existing sae-lens folder (loaded with
`sae_lens.SAE.load_from_disk`), else `RELEASE/SAE_ID` (split at the first '/') for
`sae_lens.SAE.from_pretrained`. An unknown spec is an error listing the store's SAEs.

Offline (the normal case on these machines) `from_pretrained` retries for ~23 s before it
raises, so we first try to open a TCP connection to the Hub (a DNS failure answers at once,
a firewall within `HUB_TIMEOUT_S`). When the Hub is unreachable, we load from the local
Hugging Face cache with huggingface_hub's offline switch set for the duration of the call
(no environment variable), and when the files are not cached we raise `SAELoadError` naming
the fallback: train one on this store with `python -m trainers.sae`.

Every SAE gets a store name (`sae_name`), used in array names (`sae/<name>/layer_17/...`)
and in the `sae` column of the catalog tables: the training run id for SAEs trained here,
else the release and id, else the folder name plus a hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from huggingface_hub import constants

from store.arrays import array_key
from store.core import Store, StoreError

HUB_TIMEOUT_S = 3.0
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


class SAELoadError(StoreError):
    """The SAE cannot be loaded; the message says why and what to do instead."""


class LoadedSAE(NamedTuple):
    sae: Any  # a sae_lens.SAE (inference) in eval mode
    name: str  # store name (see module docstring)
    source: str  # "local" | "pretrained"
    path: str  # folder, or RELEASE/SAE_ID
    layer: int | None  # the layer it was trained on, when it says so
    architecture: str
    d_in: int
    d_sae: int
    k: int | None  # TopK's k, else None


def _fallback(layer: int | None, store: Store | str | None) -> str:
    root = store.root if isinstance(store, Store) else store
    where = f" --store {root}" if root else ""
    return (
        f"train one on this store's activations instead: python -m trainers.sae --layer "
        f"{layer if layer is not None else 'L'}{where}, then pass --sae latest (or its name)"
    )


def sanitize(name: str) -> str:
    """A string -> one array-name component ([A-Za-z0-9_.-], '/' becomes '__')."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "__")).strip("._")
    return s or "sae"


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hugging Face Hub's endpoint?"""
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_cache_has_models() -> bool:
    cache = Path(constants.HF_HUB_CACHE)
    return cache.is_dir() and any(p.name.startswith("models--") for p in cache.iterdir())


def layer_of(sae: Any) -> int | None:
    """The layer an SAE reads: our own metadata, else TransformerLens' resid_post hook name."""
    meta = sae.cfg.metadata
    if meta.get("store_layer") is not None:
        return int(meta.get("store_layer"))
    m = _HOOK_RE.match(str(meta.get("hook_name") or ""))
    return int(m.group(1)) if m else None


def _describe(sae: Any, name: str, source: str, path: str) -> LoadedSAE:
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    cfg = sae.cfg
    return LoadedSAE(
        sae,
        name,
        source,
        path,
        layer_of(sae),
        cfg.architecture(),
        int(cfg.d_in),
        int(cfg.d_sae),
        int(cfg.k) if hasattr(cfg, "k") else None,
    )


def load_local(path: Path, device: str = "cpu") -> LoadedSAE:
    from sae_lens import SAE  # lazy: sae_lens is heavy (it imports transformer_lens and more)
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME  # lazy: see above

    if not (path / SAE_CFG_FILENAME).is_file() or not (path / SAE_WEIGHTS_FILENAME).is_file():
        raise SAELoadError(
            f"{path} is not a sae-lens folder (it needs {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME}); pass the 'sae' folder of a python -m trainers.sae run"
        )
    sae = SAE.load_from_disk(str(path), device=device)
    name = sae.cfg.metadata.get("store_sae_name")
    if not name:
        digest = hashlib.sha256((path / SAE_WEIGHTS_FILENAME).read_bytes()).hexdigest()[:8]
        name = f"{sanitize(path.name)}-{digest}"
    return _describe(sae, sanitize(str(name)), "local", str(path))


def load_pretrained(
    release: str,
    sae_id: str,
    device: str = "cpu",
    *,
    layer: int | None = None,
    store: Store | str | None = None,
    check_hub: bool = True,
) -> LoadedSAE:
    """`SAE.from_pretrained`, failing fast and clearly when the Hub is out of reach."""
    spec = f"{release}/{sae_id}"
    online = hub_reachable() if check_hub else True
    if not online and not _hf_cache_has_models():
        raise SAELoadError(
            f"cannot load pretrained SAE {spec!r}: the Hugging Face Hub ({constants.ENDPOINT}) is not "
            f"reachable and the local Hugging Face cache ({constants.HF_HUB_CACHE}) holds no models; "
            + _fallback(layer, store)
        )
    from sae_lens import SAE  # lazy: see load_local

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not online  # what huggingface_hub.is_offline_mode() reads
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except ValueError as e:  # unknown release or id (sae-lens lists the valid ones)
        raise SAELoadError(
            f"unknown pretrained SAE {spec!r}: {e} (RELEASE/SAE_ID splits at the first "
            f"'/'; no registry entry exists for SmolLM models); " + _fallback(layer, store)
        ) from e
    except OSError as e:  # LocalEntryNotFoundError and other download failures
        why = (
            "the Hub is not reachable and it is not in the local Hugging Face cache"
            if not online
            else f"download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        )
        raise SAELoadError(f"cannot load pretrained SAE {spec!r}: {why}; " + _fallback(layer, store)) from e
    finally:
        constants.HF_HUB_OFFLINE = saved
    return _describe(sae, sanitize(spec), "pretrained", spec)


def registered(store: Store | None, layer: int | None = None) -> list[dict[str, Any]]:
    """The store's `saes` rows (name, layer, path, source, run_id, updated_at), newest first."""
    if store is None or not store.has_table("saes"):
        return []
    where, params = ("WHERE layer = ?", [layer]) if layer is not None else ("", [])
    return store.query(
        f"SELECT sae, layer, path, source, run_id, updated_at FROM saes {where} ORDER BY updated_at DESC, sae", params
    ).to_pylist()


def _available(store: Store | None, layer: int | None) -> str:
    rows = registered(store, None)
    if not rows:
        return "this store has no SAEs yet"
    return "SAEs in this store: " + ", ".join(f"{r['sae']} (layer {r['layer']})" for r in rows) + ", or latest"


def _load_registered(row: dict[str, Any], store: Store, device: str) -> LoadedSAE:
    """Load a `saes` row: its folder (or, for a moved store, runs/<run_id>/sae), or its RELEASE/ID."""
    if row["source"] == "pretrained":
        release, sae_id = row["path"].split("/", 1)
        return load_pretrained(release, sae_id, device, layer=row["layer"], store=store)
    for p in (Path(row["path"]), store.run_folder(str(row["run_id"])) / "sae"):
        if p.is_dir():
            return load_local(p, device)
    raise SAELoadError(
        f"SAE {row['sae']!r} is recorded at {row['path']}, which no longer exists; " + _fallback(row["layer"], store)
    )


def load_sae(
    spec: str, device: str = "cpu", *, layer: int | None = None, store: Store | str | None = None
) -> LoadedSAE:
    """`latest`, a store name, a local sae-lens folder, or RELEASE/SAE_ID (see module docstring)."""
    if isinstance(store, str):
        store = Store(store)
    if spec == "latest":
        rows = registered(store, layer)
        if not rows:
            at = f" at layer {layer}" if layer is not None else ""
            raise SAELoadError(
                f"--sae latest: no SAE{at} in {store.root if store else 'the store'} "
                f"({_available(store, layer)}); " + _fallback(layer, store)
            )
        if layer is None and len({r["layer"] for r in rows}) > 1:
            raise SAELoadError(f"--sae latest is ambiguous without one --layer ({_available(store, None)})")
        return _load_registered(rows[0], store, device)
    named = [r for r in registered(store, None) if r["sae"] == spec]
    if named:
        at_layer = [r for r in named if layer is None or r["layer"] == layer]
        return _load_registered((at_layer or named)[0], store, device)
    p = Path(spec).expanduser()
    if p.is_dir():
        return load_local(p.resolve(), device)
    looks_like_path = spec.startswith((".", "/", "~")) or p.suffix in (".json", ".safetensors")
    if looks_like_path or "/" not in spec.strip("/"):
        raise SAELoadError(
            f"--sae {spec!r} is neither a name in the store's saes table, latest, an existing "
            f"sae-lens folder nor RELEASE/SAE_ID ({_available(store, layer)}); " + _fallback(layer, store)
        )
    release, sae_id = spec.split("/", 1)
    try:
        return load_pretrained(release, sae_id, device, layer=layer, store=store)
    except SAELoadError as e:
        raise SAELoadError(f"{e} (no local folder {p} exists either; {_available(store, layer)})") from e


def pick_layer(layers: list[int], sae_layer: int | None, spec: str) -> int:
    """The SAE's own layer when it records one (it must be requested), else the single --layer."""
    if sae_layer is not None:
        if sae_layer not in layers:
            raise StoreError(
                f"SAE {spec} was trained on layer {sae_layer}, but --layer {layers} was requested; "
                f"pass --layer {sae_layer}"
            )
        return sae_layer
    if len(layers) != 1:
        raise StoreError(f"SAE {spec} does not say which layer it reads; pass exactly one --layer, got {layers}")
    return layers[0]


def write_sae_record(
    store: Store,
    *,
    name: str,
    layer: int,
    architecture: str,
    d_in: int,
    d_sae: int,
    k: int | None,
    path: str,
    source: str,
    run_id: str,
    metrics: dict[str, Any],
    qa: dict[str, Any] | None = None,
) -> None:
    """One row per (SAE, layer) in the `saes` table (rewritten by later runs of that SAE); `qa`
    is the QA gate of trainers.sae.qa (columns qa_passed and qa, its table as JSON)."""
    store.write_rows(
        "saes",
        [
            {
                "sae": name,
                "layer": layer,
                "architecture": architecture,
                "d_in": d_in,
                "d_sae": d_sae,
                "k": k,
                "path": path,
                "source": source,
                "run_id": run_id,
                "explained_variance": metrics.get("eval", {}).get("explained_variance"),
                "l0": metrics.get("eval", {}).get("l0"),
                "ce_increase": metrics.get("ce", {}).get("ce_increase"),
                "nmse": metrics.get("eval", {}).get("nmse"),
                "dead_fraction": metrics.get("eval", {}).get("dead_fraction"),
                "kl_mean": metrics.get("ce", {}).get("kl_mean"),
                "kl_share_above": metrics.get("ce", {}).get("kl_share_above"),
                "qa_passed": qa["passed"] if qa else None,
                "qa": json.dumps(qa, sort_keys=True) if qa else None,
                "metrics": json.dumps(metrics, sort_keys=True, default=str),
                "updated_at": datetime.now(UTC),
            }
        ],
        part=array_key(f"{name}/layer_{layer}"),
    )


def write_sae_row(store: Store, loaded: LoadedSAE, layer: int, run_id: str) -> None:
    """A `saes` row for an SAE that did not come from `python -m trainers.sae` on this store."""
    if (store.table_dir("saes") / f"{array_key(f'{loaded.name}/layer_{layer}')}.parquet").exists():
        return
    write_sae_record(
        store,
        name=loaded.name,
        layer=layer,
        architecture=loaded.architecture,
        d_in=loaded.d_in,
        d_sae=loaded.d_sae,
        k=loaded.k,
        path=loaded.path,
        source=loaded.source,
        run_id=run_id,
        metrics={},
    )
