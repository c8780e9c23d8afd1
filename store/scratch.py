"""Scratch folders: where a process spills what does not fit in memory (ingest and tokenization
spool their batches here), inside the store like every other path."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from store.core import _SAFE_PART, Store, StoreError, pid_alive
from store.fs import staging_root

_SCRATCH_PID = re.compile(r"-(\d+)-[0-9a-f]{12}$")


@contextlib.contextmanager
def scratch(store: Store, purpose: str) -> Iterator[Path]:
    """A private local folder for one process's spill files, deleted on exit:
    `<root>/scratch/<purpose>-<pid>-<random>` (for a remote store, under its local staging
    folder). Folders a killed process left (its pid is gone) are deleted when the next one is made."""
    if not _SAFE_PART.match(purpose):
        raise StoreError(f"scratch purpose {purpose!r} must be one name (letters, digits, _ . -)")
    base = (staging_root(str(store.root)) if store.remote else store.root) / "scratch"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        m = _SCRATCH_PID.search(old.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    folder = base / f"{purpose}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
