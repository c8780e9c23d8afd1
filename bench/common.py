"""What both benchmarks share: the machine, the disk probe, random-init model shapes, scratch
stores, tables, JSON and bar charts.

* `disk_write_bandwidth(store)` writes and fsyncs a few hundred MB in unit-sized files on the
  store's filesystem, the way `store.arrays.write_unit` does, so a disk-bound extraction
  is recognisable next to the figure measured in the same run.
* `drop_cache(paths)` evicts files from the page cache (`posix_fadvise(DONTNEED)`, no root
  needed for clean pages), which is how reads are measured "cold".
* `random:smollm2-135m` and `random:llama-1b` are random-init Llama models with the shapes
  of SmolLM2-135M and Llama-3.2-1B (seeded; built on the device, so GPU runs need no
  weights); they use the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from store.core import Store, fsync_path, write_json  # noqa: F401 - write_json: the benchmarks' JSON writer

# Shapes from the models' config.json (Llama-3.2-1B without its rope scaling: irrelevant here).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}
RANDOM_PREFIX = "random:"


def load_bench_model(model: str, device: str = "auto", dtype: str = "auto", cache_dir: str | None = None):
    """`extractors.model.load_model`, plus the `random:<shape>` models (see the docstring)."""
    from extractors.model import LoadedModel, load_model, load_tokenizer, pick_device, pick_dtype

    if not model.startswith(RANDOM_PREFIX):
        return load_model(model, device, dtype, Path(cache_dir) if cache_dir else None)
    shape = model[len(RANDOM_PREFIX) :]
    if shape not in RANDOM_SHAPES:
        raise ValueError(
            f"--model {model!r}: unknown random shape; use one of {', '.join(RANDOM_PREFIX + k for k in RANDOM_SHAPES)}"
        )
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    dev, dt = pick_device(device), pick_dtype(pick_device(device), dtype)
    tok = load_tokenizer("embedded", Path(cache_dir) if cache_dir else None)
    s = dict(RANDOM_SHAPES[shape])
    theta = s.pop("rope_theta")
    cfg = LlamaConfig(
        **s,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    m.eval().requires_grad_(False)
    n = sum(p.numel() for p in m.parameters())
    return LoadedModel(
        m,
        tok,
        model,
        f"random-init:{shape}:seed0",
        dev,
        dt,
        time.perf_counter() - t0,
        f"random init, {n / 1e6:.0f}M parameters, {shape} shape",
    )


def result_path(out: str | None, name: str, model: str | None = None, device: str | None = None) -> Path:
    """Where a benchmark writes its JSON: --out, else bench_out/<name>.json, or with a model
    bench_out/<name>_<model, as a file name>_<device>.json."""
    if out:
        return Path(out)
    if model is not None:
        name += f"_{model.replace(':', '-').replace('/', '_').strip('._-')[-40:]}_{device}"
    return Path("bench_out") / f"{name}.json"


def scratch_store(path: str | None, prefix: str) -> tuple[Store, Path | None]:
    """The given store, or a new temporary one; returns (store, folder to delete or None)."""
    if path:
        return Store(path), None
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    return Store(tmp / "store"), tmp


def ingest_rows(store: Store, rows: int, model: str, progress: bool) -> None:
    """Ingest the embedded sample (rows -> train_base) when the store has no rows yet."""
    if store.has_table("manifests"):
        return
    from extractors.ingest import IngestConfig, run_ingest

    tokenizer_model = "embedded" if model.startswith(RANDOM_PREFIX) else model
    run_ingest(
        IngestConfig(
            store=str(store.root),
            model=tokenizer_model,
            train_base=rows,
            attr_query=0,
            eval=0,
            sample_train=max(1000, int(rows * 1.1) + 50),
        ),
        progress=progress,
    )


def disk_write_bandwidth(folder: Path, total_mb: int = 256, file_mb: int = 16) -> dict[str, float]:
    """Write `total_mb` in files of `file_mb` (each written, fsynced, its folder fsynced: the
    store's unit write) into `folder`, then delete them. Returns GB/s (1e9 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 2**16, size=file_mb * 2**19, dtype=np.uint16).tobytes()
    n = max(1, total_mb // file_mb)
    t0 = time.perf_counter()
    for k in range(n):
        p = folder / f"probe_{k:04d}.bin"
        with open(p, "wb") as fh:
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(folder)
    secs = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return {"write_GBps": n * len(block) / secs / 1e9, "bytes": n * len(block), "seconds": secs}


def drop_cache(paths: Iterable[Path]) -> None:
    """Evict files from the page cache so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def machine(device: Any = None) -> dict[str, Any]:
    """What ran the benchmark (GPU fields only when a CUDA device was used)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": None,
    }
    try:
        info["ram_GB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    if device is not None and getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec) if spec else str(v)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Returns (and prints) a plain-text table."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    # text columns (first and last) left-aligned, figures right-aligned
    left = {0, len(columns) - 1} if columns[-1][2] == "" else {0}
    lines = [
        "  ".join(c[i].ljust(widths[i]) if i in left else c[i].rjust(widths[i]) for i in range(len(columns))).rstrip()
        for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text
