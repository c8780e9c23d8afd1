"""Claims: how several writers on one store split the work instead of doubling it.

Before a writer computes a unit (or ingests, or tokenizes) it claims it: it creates
`claims/<scope>/<item>.json` (host, pid, time) only if it is absent, which exactly one
process can do (`store.fs.create_exclusive`: locally a temp file hard-linked into place, so
the claim appears with its content; on object storage a conditional PUT, `If-None-Match: *`). Another writer
that finds the claim leaves the item to its owner and moves
on; when it has nothing else left it waits for the item to be committed, or takes the claim
over once it is stale: the owner's process is gone (same host, pid not alive) or the claim
is older than `timeout` seconds (another host's writer that died). A takeover first renames
the stale file to a unique name, which only one contender can do, then claims afresh (object
storage has no rename: the stale claim is deleted, then contenders race for a fresh one).

Claims only decide who computes what; correctness never depends on them: commits are still
what readers trust, and two writers that both computed a unit would write the same bytes.
A writer removes its claims when it ends; a killed writer's claims are stale at once for
the next writer on the same host.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from store.core import Store, pid_alive, safe_name, sweep_temp_files
from store.fs import RemotePath, create_exclusive


def _path(store: Store, scope: str, item: str) -> Path:
    if not (safe_name(scope, slashes=True) and safe_name(item)):
        raise ValueError(f"bad claim name {scope!r}/{item!r}")
    return store.claims_dir / scope / f"{item}.json"


def _alive(info: dict) -> bool | None:
    """True/False on this host; None when the owner is on another host (we cannot tell)."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        return pid_alive(int(info["pid"]))
    except (KeyError, TypeError, ValueError):
        return True


def owner(store: Store, scope: str, item: str) -> dict | None:
    """The claim's content, or None when the item is not claimed."""
    try:
        return json.loads(_path(store, scope, item).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": None, "pid": None, "time": 0.0}  # half-written: stale by age


def is_stale(info: dict, timeout: float) -> bool:
    return _alive(info) is False or time.time() - float(info.get("time") or 0.0) > timeout


def acquire(store: Store, scope: str, item: str, timeout: float = 3600.0) -> bool:
    """Claim `item` for this process: True when it is ours now (fresh, already ours, or taken
    over from a stale owner), False while another live writer holds it."""
    path = _path(store, scope, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(3):
        # create-if-absent with the content in place at once (store.fs): a claim is never seen
        # empty, which would read as stale (no owner, time 0) and be taken over
        if not create_exclusive(path, json.dumps(me).encode()):
            info = owner(store, scope, item)
            if info is None:
                continue  # released meanwhile: try again
            if info.get("host") == me["host"] and info.get("pid") == me["pid"]:
                return True
            if not is_stale(info, timeout):
                return False
            if isinstance(path, RemotePath):
                # No rename on object storage: delete the stale claim and race for a fresh
                # one; the conditional create still lets only one contender win it (a slow
                # contender could delete the winner's claim: then both compute the unit,
                # which costs time, never correctness; see the module docstring).
                path.unlink(missing_ok=True)
                continue
            try:  # only one contender wins this rename
                os.rename(path, path.with_name(f".{path.stem}.{uuid.uuid4().hex}.stale"))
            except FileNotFoundError:
                pass
            for old in path.parent.glob(f".{path.stem}.*.stale"):
                old.unlink(missing_ok=True)
            continue
        return True
    return False


def release(store: Store, scope: str, item: str) -> None:
    """Remove this process's claim of `item` (another owner's claim is left alone)."""
    info = owner(store, scope, item)
    if info is not None and info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
        _path(store, scope, item).unlink(missing_ok=True)


def release_all(store: Store, scope: str, timeout: float = 3600.0) -> None:
    """Remove this process's claims in `scope`, and stale ones (a killed writer's claims of
    units it had committed are nobody's business any more)."""
    d = store.claims_dir / scope
    for f in d.glob("*.json") if d.is_dir() else []:
        info = owner(store, scope, f.stem)
        if info is not None and is_stale(info, timeout):
            f.unlink(missing_ok=True)
        else:
            release(store, scope, f.stem)


@contextmanager
def exclusive(store: Store, scope: str, item: str, timeout: float = 3600.0, poll: float = 0.5):
    """Hold the claim of `item` for the block, waiting while another live writer holds it (for
    one-off steps such as the ingest and the tokenization: the second process waits for the
    first, then finds the work done)."""
    while not acquire(store, scope, item, timeout):
        time.sleep(poll)
    try:
        yield
    finally:
        release(store, scope, item)


def stale_claims(store: Store, timeout: float = 3600.0) -> list[tuple[Path, dict]]:
    """(file, content) of every stale claim of the store, in any scope."""
    out = []
    for f in sorted(store.claims_dir.rglob("*.json")) if store.claims_dir.is_dir() else []:
        info = owner(store, str(f.parent.relative_to(store.claims_dir)), f.stem)
        if info is not None and is_stale(info, timeout):
            out.append((f, info))
    return out


def sweep_stale(store: Store, timeout: float = 3600.0) -> int:
    """Remove every stale claim of the store (writers that died after their last commit leave
    claims nobody would otherwise touch); returns how many."""
    found = stale_claims(store, timeout)
    for f, _ in found:
        f.unlink(missing_ok=True)
    sweep_temp_files(store.claims_dir)  # a killed claimer's temp file (create_exclusive)
    return len(found)
