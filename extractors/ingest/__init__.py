"""Ingest: a SmolTalk-schema dataset becomes the store's rows, splits, quarantine and manifest.

Modules: `sources` loads a source (the embedded sample, local files, a saved dataset or
the Hub); `steps` flattens, quarantines, splits and writes; `pipeline` runs both from an
`IngestConfig` (the CLI is `python -m extractors.dataset`); `sample`, `sample_categories`
and `sample_words` generate the embedded sample.

The names below are re-exported lazily, so importing the package loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IngestConfig": "pipeline",
    "run_ingest": "pipeline",
    "summary": "pipeline",
    "ingest": "steps",
    "IngestError": "steps",
    "IngestResult": "steps",
    "SPLITS": "steps",
    "load_source": "sources",
    "Source": "sources",
    "SourceError": "sources",
    "SchemaError": "sources",
    "METADATA_COLUMNS": "sources",
    "generate_sample": "sample",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
