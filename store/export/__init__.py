"""`python -m store.export`: a view's activations out of the store, for other libraries (issue 27
part 3), a room of its own (store/ is at its module limit). See store.export.export.

    python -m store.export --view content_tokens --array hidden/layer_17 --format hf OUT
    python -m store.export --view content_tokens --array hidden/layer_17 --format parquet OUT.parquet
    python -m store.export --view content_tokens --array hidden/layer_17 --format saelens OUT
"""

from store.export.export import ExportConfig, export

__all__ = ["ExportConfig", "export"]
