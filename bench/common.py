"""What every benchmark shares: one harness (`Bench`: scratch store or folder, result path,
machine info, JSON + chart, clean-up), the option groups of the benchmarks' configs, the disk
probe, random-init model shapes, tables.

* `Bench(name, store=..., out=...)` is a context manager: without `--store` it makes a
  temporary scratch store (or folder) and deletes it on exit (`--keep-store` keeps it);
  `bench.path(model, device)` is where the JSON goes (`--out`, else
  bench_out/<name>[_<model>_<device>].json, or for benchmarks that write beside a given
  store, that store's runs/<bench id>/<name>.json); `bench.header(cfg, device)` starts the
  result (benchmark, config, machine); `bench.write(result, path, chart)` writes the JSON,
  draws the chart beside it and says where.
* Configs compose store.cli's shared option groups (StoreOptions, ModelOptions, LayerOptions,
  SeedOptions, ProgressOptions) and the two groups below (BenchOutOptions: --out;
  ScratchOptions: --keep-store); a benchmark redeclares only a default that differs.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from extractors.ingest import IngestConfig, run_ingest
from extractors.model import LoadedModel, load_model, load_tokenizer, pick_device, pick_dtype
from store.cli import config_dict
from store.core import Store, fsync_path, write_json

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
    if not model.startswith(RANDOM_PREFIX):
        return load_model(model, device, dtype, Path(cache_dir) if cache_dir else None)
    shape = model[len(RANDOM_PREFIX) :]
    if shape not in RANDOM_SHAPES:
        raise ValueError(
            f"--model {model!r}: unknown random shape; use one of {', '.join(RANDOM_PREFIX + k for k in RANDOM_SHAPES)}"
        )
    # lazy: heavy; this module stays light, as bench.catalog's step processes import it and report their peak RSS
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


@dataclass(kw_only=True)
class BenchOutOptions:
    out: str | None = field(
        default=None,
        metadata={
            "help": "result JSON, a PNG chart beside it (default: bench_out/<benchmark>.json, or "
            "bench_out/<benchmark>_<model>_<device>.json where one model runs; see the description above)"
        },
    )


@dataclass(kw_only=True)
class ScratchOptions:
    keep_store: bool = field(default=False, metadata={"help": "keep the temporary scratch store (without --store)"})


class Bench:
    """One benchmark run: its scratch store or folder, its result path, machine info, JSON +
    chart, clean-up (see the module docstring). `scratch="store"` gives `self.store` (the given
    store, or a temporary one); `scratch="folder"` gives `self.folder` (the given folder, or a
    temporary one); `beside_store`: without --out, the JSON goes to the given store's
    runs/<bench id>/ instead of bench_out/."""

    def __init__(
        self,
        name: str,
        store: str | None = None,
        out: str | None = None,
        *,
        scratch: Literal["store", "folder", "none"] = "store",
        keep: bool = False,
        beside_store: bool = False,
    ):
        self.name, self.out, self.keep, self.beside_store = name, out, keep, beside_store
        self.id = f"bench_{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        self._tmp: Path | None = None
        self.store: Store | None = None
        self.folder: Path | None = None
        if scratch == "store":
            self.store, self._tmp = scratch_store(store, f"bench-{name.replace('_', '-')}-")
        elif scratch == "folder":
            self.folder = Path(store) if store else Path(tempfile.mkdtemp(prefix=f"bench-{name.replace('_', '-')}-"))
            self._tmp = None if store else self.folder
        elif store:
            self.store = Store(store)

    @property
    def scratch(self) -> bool:
        """Whether the store (or folder) is this run's own temporary one."""
        return self._tmp is not None

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is None:
            return
        if self.keep and self.store is not None:
            print(f"kept the scratch store at {self.store.root}")
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def path(self, model: str | None = None, device: str | None = None) -> Path:
        """Where the JSON goes: --out, else beside a given store (`beside_store`), else bench_out/."""
        if not self.out and self.beside_store and self.store is not None and not self.scratch:
            return self.store.run_dir(self.id) / f"{self.name}.json"
        return result_path(self.out, self.name, model, device)

    def header(self, cfg: Any, device: Any = None) -> dict[str, Any]:
        """The start of every result: which benchmark, its config, the machine that ran it."""
        return {"benchmark": self.name, "config": config_dict(cfg), "machine": machine(device)}

    def write(self, result: dict[str, Any], path: Path, chart: Callable[[Path], Any] | None = None) -> Path:
        """Write the result JSON, then the chart (`chart(png_path)`) beside it, and say where."""
        write_json(path, result)
        if chart is None:
            print(f"wrote {path}")
        else:
            chart(path.with_suffix(".png"))
            print(f"wrote {path} and {path.with_suffix('.png')}")
        return path


def ingest_rows(store: Store, rows: int, model: str, progress: bool) -> None:
    """Ingest the embedded sample (rows -> train_base) when the store has no rows yet."""
    if store.has_table("manifests"):
        return
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
    import torch  # lazy: heavy (see load_bench_model)

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
