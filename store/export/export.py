"""A view's activations out of the store, in three layouts other libraries read themselves:

    python -m store.export --view content_tokens --array hidden/layer_17 --format hf OUT
    python -m store.export --view content_tokens --array hidden/layer_17 --format parquet OUT.parquet
    python -m store.export --view content_tokens --array hidden/layer_17 --format saelens OUT
    # CPU-sized: the tests' store, a few thousand tokens, under a second

* `hf`: a Hugging Face `datasets` folder (`datasets.load_from_disk(OUT)`), one row per token of
  the view, in the view's order: `tok_index`, `row_id`, the view's other columns (`--columns`
  picks some) and the vectors as a fixed-length float32 list column named after the array
  (`hidden/layer_17` -> `hidden_layer_17`; a 1-D array such as `gradnorm/layer_17` -> a float32
  column).
* `parquet`: the same table as one Parquet file (a row group per `--batch-tokens` tokens), the
  vectors as a `fixed_size_list<float32>[d]` column: polars reads it as `Array(Float32, d)`,
  DuckDB as `FLOAT[d]`. The export's provenance is in the file's key-value metadata
  (`activation_store.export`).
* `saelens`: SAELens' cached-activations layout (what its `CacheActivationsRunner` writes and
  its `ActivationsStore` reads with `use_cached_activations` / `cached_activations_path`): a
  `datasets` folder with one row per sequence of `--context-size` tokens, the column `--hook-name`
  (default `blocks.L.hook_resid_post` for `hidden/layer_L`, our layer L's output) an
  `Array2D(context_size, d_in)` of float32, and `token_ids` (`context_size` int32) when the view
  returns `token_id`. The view's tokens are cut into consecutive sequences in the view's order;
  the last, partial one is left out (counted in export.json). Set SAELens' `context_size` to
  `--context-size` and `d_in` to the array's width.

Vectors are read through the training loaders' selection (store.loaders: materialize's SQL,
commit checks and chunk-sorted gathers), `--batch-tokens` at a time, so memory holds one batch,
never the view. bf16 arrays are widened to float32 exactly. The output is written beside OUT
under a temporary name and renamed into place at the end, so OUT is either absent or complete;
an existing OUT is refused unless `--overwrite`. Each export is a run (`runs`, kind `export`)
and writes `export.json` (view SQL, array, counts, run id) into its folder (Parquet: into the
file's metadata).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from store.catalog.runs import Run
from store.cli import ProgressOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from store.loaders import ActivationDataset
from store.materialize import view_text

FORMATS = ("hf", "parquet", "saelens")


@dataclass(kw_only=True)
class ExportConfig(StoreOptions, ProgressOptions):
    """Export a view's activations as a Hugging Face datasets folder, a Parquet file or SAELens'
    cached-activations layout."""

    out: str = field(metadata={"help": "where to write: a folder (hf, saelens) or a .parquet file", "positional": True})
    view: str = field(metadata={"help": "a view name (sql/*.sql) or SQL returning row_id and tok_index"})
    array: str = field(metadata={"help": "the dense array to export, e.g. hidden/layer_17"})
    format: Literal["hf", "parquet", "saelens"] = field(
        default="parquet", metadata={"help": "hf (datasets folder), parquet (one file) or saelens (cached activations)"}
    )
    columns: list[str] = field(
        default_factory=list,
        metadata={"help": "view columns to carry (hf, parquet)", "default_help": "all of the view's"},
    )
    context_size: int = field(default=128, metadata={"help": "saelens: tokens per cached sequence"})
    hook_name: str | None = field(
        default=None,
        metadata={
            "help": "saelens: the activation column's name",
            "default_help": "blocks.L.hook_resid_post for hidden/layer_L, else the array name",
        },
    )
    batch_tokens: int = field(default=65536, metadata={"help": "tokens read and written at a time"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT"})

    def __post_init__(self) -> None:
        for name in ("context_size", "batch_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")


def column_name(array: str) -> str:
    """The vector column of the hf and parquet exports: `hidden/layer_17` -> `hidden_layer_17`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", array)


def default_hook_name(array: str) -> str:
    m = re.fullmatch(r"hidden/layer_(\d+)", array)
    return f"blocks.{m.group(1)}.hook_resid_post" if m else array


def _vectors(x: np.ndarray) -> pa.Array:
    """[B] -> float32 column; [B, d] -> fixed_size_list<float32>[d] (no copy beyond the cast)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        return pa.array(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def _token_table(batch: dict[str, Any], array: str, columns: list[str]) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "tok_index": pa.array(batch["tok_index"].numpy()),
        "row_id": pa.array(batch["row_id"], pa.string()),
    }
    for c in columns:
        v = batch[c]
        cols[c] = pa.array(v.numpy() if hasattr(v, "numpy") else v)
    cols[column_name(array)] = _vectors(batch[array].numpy())
    return pa.table(cols)


class ExportResult(dict):
    """What an export wrote: out, format, n_tokens (and n_sequences / n_left_out for saelens), run_id."""


def export(cfg: ExportConfig) -> ExportResult:
    """Write the export (see the module docstring); returns its counts."""
    store = Store(cfg.store)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another OUT")
    ds = ActivationDataset(
        store, cfg.view, arrays=[cfg.array], columns=cfg.columns or None, batch_size=cfg.batch_tokens
    )
    src = ds.sel.sources[0]
    if src.d_sae is not None:
        raise StoreError(
            f"{cfg.array} is an SAE's sparse codes; export a dense array (hidden/layer_L, gradnorm/layer_L), "
            f"or read the codes with store.loaders.ActivationStream"
        )
    width = reader_width(ds)
    if cfg.format == "saelens" and width is None:
        raise StoreError(f"{cfg.array} is 1-D; SAELens' cached activations need a [n_tokens, d] array")
    if ds.n_items == 0:
        raise StoreError(f"the view selects no tokens:\n{view_text(store, cfg.view)}")
    columns = [c for c in ds.sel.columns if c != "row_id"] if not cfg.columns else list(cfg.columns)
    tmp = out.with_name(f".{out.name}.partial")
    _remove(tmp)
    meta = {
        "view": cfg.view,
        "view_sql": view_text(store, cfg.view),
        "array": cfg.array,
        "store": str(store.root),
        "format": cfg.format,
    }
    with Run(store, "export", config_dict(cfg)) as run:
        bar = tqdm(total=ds.n_items, desc=f"export {cfg.format}", unit="tok", disable=not cfg.progress)
        batches = _batches(ds, bar)
        try:
            if cfg.format == "parquet":
                counts = _write_parquet(tmp, batches, cfg.array, columns, {**meta, "run_id": run.run_id})
            elif cfg.format == "hf":
                counts = _write_hf(tmp, batches, cfg.array, columns)
            else:
                hook = cfg.hook_name or default_hook_name(cfg.array)
                ids = "token_id" in ds.sel.columns
                counts = _write_saelens(tmp, batches, cfg.array, hook, cfg.context_size, width, ids)
                meta.update(hook_name=hook, context_size=cfg.context_size, d_in=width)
        except BaseException:
            _remove(tmp)  # OUT stays absent (or as it was)
            raise
        finally:
            bar.close()
        if cfg.format != "parquet":
            (tmp / "export.json").write_text(json.dumps({**meta, **counts, "run_id": run.run_id}, indent=2))
        _remove(out)
        tmp.rename(out)
        run.finish(counts=counts)
    return ExportResult(out=str(out), format=cfg.format, run_id=run.run_id, **counts)


def reader_width(ds: ActivationDataset) -> int | None:
    """The array's row width (None for a 1-D array)."""
    from store.materialize import reader

    arr = reader(ds.sel.store, ds.sel.sources[0].parts[0]).arr
    return int(arr.shape[1]) if arr.ndim == 2 else None


def _batches(ds: ActivationDataset, bar: Any):
    for i in range(len(ds)):
        b = ds[i]
        bar.update(len(b["tok_index"]))
        yield b


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _write_parquet(path: Path, batches, array: str, columns: list[str], meta: dict[str, Any]) -> dict[str, int]:
    import pyarrow.parquet as pq

    writer, n = None, 0
    try:
        for b in batches:
            t = _token_table(b, array, columns)
            if writer is None:
                schema = t.schema.with_metadata({"activation_store.export": json.dumps(meta)})
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(t.replace_schema_metadata(writer.schema.metadata))
            n += t.num_rows
    finally:
        if writer is not None:
            writer.close()
    return {"n_tokens": n}


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ImportError("the hf and saelens exports need the `datasets` package: pip install datasets") from e
    return datasets


def _finish_hf(tmp: Path, arrow: Path) -> None:
    """An arrow file -> a `save_to_disk` folder at tmp (state.json, dataset_info.json, shards)."""
    datasets = _datasets()
    ds = datasets.Dataset.from_file(str(arrow))
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar counts the tokens; save_to_disk's would be a second
    try:
        ds.save_to_disk(str(tmp))
    finally:
        if was_on:
            datasets.enable_progress_bars()
    del ds


def _write_hf(tmp: Path, batches, array: str, columns: list[str]) -> dict[str, int]:
    from datasets.arrow_writer import ArrowWriter

    scratch = tmp.with_name(tmp.name + ".arrow")
    n = 0
    writer = ArrowWriter(path=str(scratch))
    try:
        for b in batches:
            t = _token_table(b, array, columns)
            writer.write_table(t)
            n += t.num_rows
        writer.finalize()
        writer.close()
        _finish_hf(tmp, scratch)
    finally:
        writer.close()
        scratch.unlink(missing_ok=True)
    return {"n_tokens": n}


def _write_saelens(
    tmp: Path, batches, array: str, hook: str, context: int, d_in: int, with_ids: bool
) -> dict[str, int]:
    datasets = _datasets()
    from datasets.arrow_writer import ArrowWriter

    feats: dict[str, Any] = {hook: datasets.Array2D(shape=(context, d_in), dtype="float32")}
    if with_ids:
        feats["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=context)
    features = datasets.Features(feats)
    scratch = tmp.with_name(tmp.name + ".arrow")
    X = np.empty((0, d_in), np.float32)
    ids = np.empty(0, np.int32)
    n_seq = n_tok = 0
    writer = ArrowWriter(features=features, path=str(scratch))
    try:
        for b in batches:  # carry the tail of each batch into the next sequence
            X = np.concatenate([X, b[array].numpy()])
            if with_ids:
                ids = np.concatenate([ids, b["token_id"].numpy().astype(np.int32)])
            n_tok += len(b["tok_index"])
            k = len(X) // context
            if k:
                rows: dict[str, list] = {hook: list(X[: k * context].reshape(k, context, d_in))}
                if with_ids:
                    rows["token_ids"] = list(ids[: k * context].reshape(k, context))
                writer.write_batch(rows)
                n_seq += k
                X, ids = X[k * context :], ids[k * context :]
        if n_seq == 0:
            raise StoreError(
                f"the view has {n_tok} tokens, fewer than one sequence of --context-size {context}; "
                f"pass a smaller --context-size"
            )
        writer.finalize()
        writer.close()
        _finish_hf(tmp, scratch)
    finally:
        writer.close()
        scratch.unlink(missing_ok=True)
    return {"n_tokens": n_seq * context, "n_sequences": n_seq, "n_left_out": n_tok - n_seq * context}


@user_errors(StoreError, ValueError)
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, prog="python -m store.export")
    res = export(cfg)
    extra = ""
    if cfg.format == "saelens":
        extra = f", {res['n_sequences']} sequences of {cfg.context_size} ({res['n_left_out']} tokens left out)"
    print(f"{res['n_tokens']} tokens of {cfg.array} -> {res['out']} ({cfg.format}{extra}); run {res['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
