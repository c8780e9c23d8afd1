"""Zarr group metadata for `arrays/`: every folder from `arrays/` down to an array is a group.

With it, plain Zarr tools see the store's arrays as one hierarchy:

    zarr.open_group("store_data/arrays")                  # members: hidden, sae, probe, ...
    zarr.open_group("store_data/arrays/hidden")           # members: layer_6, layer_17, ...
    xarray.open_zarr("store_data/arrays/hidden", consolidated=False)   # layer_* over `token`

A group's `zarr.json` is written once, only where none exists: a temp file is hard-linked
into place, which fails if another process got there first, so ranks creating arrays at the
same time never clash and never replace a group (or attributes someone set on it later).
`create_array` calls `ensure_groups` before it writes an array's own metadata, so a reader
that sees an array also sees its groups. Stores made before groups existed are upgraded by
`write_missing_groups` (`python -m store.sql --refresh` runs it).

No consolidated metadata: in Zarr v3 it is a zarr-python extension, not part of the spec,
and a reader that finds it trusts it instead of listing the folder, so it would go stale,
silently hiding arrays, whenever another process adds one (an SAE-codes job beside an
extraction, a later `--layers` run). Listing a group is one directory scan on local disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from store.core import Store, StoreError, fsync_path, temp_path
from store.fs import RemotePath, create_exclusive

_GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2).encode()


def _node_type(folder: Path) -> str | None:
    """'array', 'group' (or another node type), or None where the folder has no zarr.json."""
    try:
        return json.loads((folder / "zarr.json").read_bytes()).get("node_type")
    except FileNotFoundError:
        return None


def _write_group(folder: Path) -> bool:
    """Make `folder` a group unless it already has Zarr metadata; True if this call wrote it."""
    meta = folder / "zarr.json"
    if meta.exists():
        return False
    if isinstance(folder, RemotePath):
        return create_exclusive(meta, _GROUP_JSON)  # a conditional PUT: never replaces one
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(folder / "zarr.json")
    with open(tmp, "wb") as fh:
        fh.write(_GROUP_JSON)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, meta)  # atomic, and never replaces an existing file
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    fsync_path(folder)
    return True


def ensure_groups(store: Store, name: str) -> list[Path]:
    """Give `arrays/` and every folder above the array `name` group metadata (idempotent);
    returns the folders this call made groups. Refuses a name that lies inside an array."""
    if _node_type(store.array_path(name)) not in (None, "array"):
        raise StoreError(f"{name!r} is a group of arrays, not an array; name one of its arrays, e.g. {name}/layer_17")
    folder = store.array_path(name).parent
    chain = [folder, *folder.parents]
    chain = chain[: chain.index(store.arrays_dir) + 1][::-1]  # arrays/, arrays/hidden, ...
    written = []
    for d in chain:
        kind = _node_type(d)
        if kind == "array":
            inside = d.relative_to(store.arrays_dir).as_posix()
            raise StoreError(
                f"array name {name!r} lies inside the array {inside!r}; an array cannot hold others: pick another name"
            )
        if kind is None and _write_group(d):
            written.append(d)
    return written


def write_missing_groups(store: Store) -> list[Path]:
    """Walk `arrays/` and give every folder that holds an array, at any depth, group metadata
    (for stores made before groups existed; idempotent). Returns the folders made groups."""
    written: list[Path] = []

    def walk(folder: Path) -> bool:  # does `folder` hold (or is it) an array?
        kind = _node_type(folder)
        if kind == "array":
            return True  # never descend into an array's chunks
        holds = False
        if isinstance(folder, RemotePath):
            subdirs = [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()]
        else:
            with os.scandir(folder) as it:
                subdirs = [Path(e.path) for e in it if e.is_dir() and not e.name.startswith(".")]
        for sub in sorted(subdirs):
            holds |= walk(sub)
        if holds and kind is None and _write_group(folder):
            written.append(folder)
        return holds

    if store.arrays_dir.is_dir():
        walk(store.arrays_dir)
    return written
