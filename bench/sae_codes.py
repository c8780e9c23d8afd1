"""Benchmark: storage of sparse SAE codes vs dense arrays, and SAE encode throughput.

    python -m bench.sae_codes                                   # ./store_data, its newest SAE at layer 17
    python -m bench.sae_codes --store /tmp/st --sae PATH --tokens 16384

Bytes per token: sparse top-k codes (indices + values, as stored by extractors.sae.codes)
vs dense hidden states (bf16 / fp32) vs dense SAE activations (fp16 / fp32), computed from
the dtypes and, where the arrays exist, measured from their chunk files (bytes on disk per
slot and per used token; a unit's tail slots are allocated but unused).

Throughput (tokens/s, on this machine's device, CPU when no GPU): gathering stored hidden
states, the SAE's dense encode, encode + top-k (what the extractor does), and decoding
sparse codes back through the SAE's decoder. Prints a table and writes JSON to
<store>/runs/<bench id>/sae_codes.json (or --out).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import zarr

from bench.common import Bench, BenchOutOptions
from extractors.sae.format import DEFAULT_K, code_array_names, decode_codes, encode_topk
from extractors.sae.load import LoadedSAE, load_sae, registered
from store.arrays import array_exists
from store.cli import LayerOptions, StoreOptions, config_dict, parse_config, user_errors
from store.core import Store, StoreError
from store.materialize import gather


@dataclass
class BenchConfig(StoreOptions, LayerOptions, BenchOutOptions):
    """Bytes per token of SAE codes vs dense arrays, and SAE encode throughput.

    --store must hold hidden/layer_L for the one --layer (the layer of the SAE too); without
    --out the JSON goes to the store's runs/<bench id>/sae_codes.json."""

    layers: list[int] = field(default_factory=lambda: [17])
    sae: str | None = field(
        default=None,
        metadata={
            "help": "SAE folder or RELEASE/SAE_ID (default: the newest "
            "in the store's saes table for --layer, else an untrained TopK SAE)"
        },
    )
    d_sae: int | None = field(default=None, metadata={"help": "width of the untrained SAE (default 4 x d_model)"})
    k: int = field(default=32, metadata={"help": "k of the untrained SAE"})
    tokens: int = field(default=32768, metadata={"help": "tokens timed (gathered from the stored states)"})
    repeats: int = field(default=3, metadata={"help": "timing repeats (the best is kept)"})

    def __post_init__(self) -> None:
        self.one_layer("bench.sae_codes")

    @property
    def layer(self) -> int:
        return self.layers[0]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _disk_bytes(store: Store, name: str) -> int | None:
    if not array_exists(store, name):
        return None
    return sum(p.stat().st_size for p in (store.array_path(name) / "c").rglob("*") if p.is_file())


def _pick_sae(store: Store, cfg: BenchConfig, d_in: int):
    spec = cfg.sae or ("latest" if registered(store, cfg.layer) else None)
    if spec is not None:
        return load_sae(spec, "cpu", layer=cfg.layer, store=store)
    from sae_lens import TopKSAE, TopKSAEConfig  # lazy: heavy, only for the untrained SAE

    torch.manual_seed(0)
    d_sae = cfg.d_sae or 4 * d_in
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=cfg.k)).eval()
    return LoadedSAE(sae, "untrained", "random", "", cfg.layer, "topk", d_in, d_sae, cfg.k)


@torch.no_grad()
def measure(cfg: BenchConfig, store: Store) -> dict[str, Any]:
    """Bytes per token (from the dtypes and, where stored, from the chunk files) and tokens/s."""
    hidden = f"hidden/layer_{cfg.layer}"
    if not array_exists(store, hidden):
        raise StoreError(
            f"{store.root} has no {hidden}; extract it: python -m extractors.run --layer {cfg.layer} "
            f"--store {store.root}"
        )
    tok = store.query("SELECT tok_index FROM content_tokens ORDER BY tok_index").column(0).to_numpy()
    n_used = int(store.query("SELECT count(*) FROM tokens").column(0)[0].as_py())
    tok = tok[np.linspace(0, len(tok) - 1, min(cfg.tokens, len(tok))).astype(np.int64)]
    X = torch.from_numpy(gather(store, hidden, tok))
    d_in = X.shape[1]
    loaded = _pick_sae(store, cfg, d_in)
    sae, d_sae = loaded.sae, loaded.d_sae
    k = min(loaded.k or DEFAULT_K, d_sae)
    idx_b = 2 if d_sae <= 65535 else 4
    sizes = {
        f"sparse codes k={k} (uint{8 * idx_b} + bf16)": k * (idx_b + 2),
        f"sparse codes k={k} (uint{8 * idx_b} + fp32)": k * (idx_b + 4),
        f"dense hidden d={d_in} bf16": d_in * 2,
        f"dense hidden d={d_in} fp32": d_in * 4,
        f"dense SAE acts d_sae={d_sae} fp16": d_sae * 2,
        f"dense SAE acts d_sae={d_sae} fp32": d_sae * 4,
        "dense SAE acts d_sae=16384 fp16 (GemmaScope 16k)": 16384 * 2,
    }
    measured = {}
    idx_name, val_name = code_array_names(loaded.name, cfg.layer)
    for label, names in ((f"stored hidden/layer_{cfg.layer}", [hidden]), ("stored SAE codes", [idx_name, val_name])):
        b = [_disk_bytes(store, n) for n in names]
        if all(x is not None for x in b):
            n_slots = int(zarr.open_array(str(store.array_path(names[0])), mode="r").shape[0])
            measured[label] = {"bytes_on_disk": sum(b), "per_slot": sum(b) / n_slots, "per_used_token": sum(b) / n_used}
    enc = {}
    n = len(X)
    enc["gather stored hidden (bf16 -> fp32)"] = n / _best(lambda: gather(store, hidden, tok), cfg.repeats)
    enc["SAE encode (dense activations)"] = n / _best(
        lambda: [sae.encode(X[s : s + 4096]) for s in range(0, n, 4096)], cfg.repeats
    )
    enc[f"SAE encode + top-{k} (extractor path)"] = n / _best(lambda: encode_topk(sae, X, k), cfg.repeats)
    idx, val, _ = encode_topk(sae, X, k)
    enc["decode sparse codes (SAE decoder)"] = n / _best(lambda: decode_codes(sae, idx, val), cfg.repeats)
    gpu = torch.cuda.is_available()
    return {
        "device": "cuda" if gpu else "cpu",
        "gpu_available": gpu,
        "torch_threads": torch.get_num_threads(),
        "sae": loaded.name,
        "sae_path": loaded.path,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "tokens_timed": n,
        "bytes_per_token": sizes,
        "measured": measured,
        "tokens_per_s": enc,
        "config": config_dict(cfg),
        "when": datetime.now(UTC).isoformat(),
    }


def format_table(res: dict) -> str:
    lines = [
        f"device: {res['device']} ({res['torch_threads']} torch threads)"
        + ("" if res["gpu_available"] else "; no GPU available in this session: CPU figures only"),
        f"SAE {res['sae']} d_in {res['d_in']} d_sae {res['d_sae']} k {res['k']}",
        "",
        f"{'representation':<44} {'bytes/token':>12} {'vs sparse':>10}",
    ]
    base = next(iter(res["bytes_per_token"].values()))
    for name, b in res["bytes_per_token"].items():
        lines.append(f"{name:<44} {b:>12,} {b / base:>9.1f}x")
    for name, m in res["measured"].items():
        lines.append(
            f"{name + ' (on disk)':<44} {m['per_used_token']:>12,.0f}   per used token ({m['per_slot']:,.0f} per slot)"
        )
    lines += ["", f"{'throughput (' + str(res['tokens_timed']) + ' tokens)':<44} {'tokens/s':>12}"]
    for name, t in res["tokens_per_s"].items():
        lines.append(f"{name:<44} {t:>12,.0f}")
    return "\n".join(lines)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure, print the table, write the JSON (see the module docstring); returns the result."""
    with Bench("sae_codes", cfg.store, cfg.out, scratch="none", beside_store=True) as bench:
        res = {**bench.header(cfg), **measure(cfg, bench.store)}
        print(format_table(res))
        bench.write(res, bench.path())
        return res


@user_errors(ValueError, RuntimeError, StoreError)
def main(argv: list[str] | None = None) -> int:
    run_bench(parse_config(BenchConfig, argv, prog="python -m bench.sae_codes"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
