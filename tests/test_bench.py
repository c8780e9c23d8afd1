"""The benchmarks run end to end in a tiny CPU setting (tiny model, a few rows), so they do not
rot: every method yields a positive rate, the JSON and chart are written, the extractor's
arrays equal what the naive approach computes, and bad arguments are refused. They time
nothing: speed is measured by `python -m bench.extract` / `python -m bench.read`, not tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench import read as bench_read
from bench.common import disk_write_bandwidth, print_table
from bench.extract import run as bench_extract


@pytest.fixture(scope="module")
def extract_result(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    store = d / "store"
    res = bench_extract.run_bench(
        bench_extract.BenchExtractConfig(
            model=tiny_model,
            layers=[1, 3],
            rows=6,
            unit_tokens=1024,
            disk_mb=8,
            saelens_context=64,
            methods=["forward", "packed", "extract", "naive", "saelens", "forward_full", "forward_windows"],
            store=str(store),
            out=str(d / "extract.json"),
            progress=False,
        )
    )
    return res, store, d


def test_bench_extract_measures_every_method(extract_result):
    res, _, d = extract_result
    saved = json.loads((d / "extract.json").read_text())
    assert (d / "extract.png").stat().st_size > 0
    assert saved["summary"] == pytest.approx(res["summary"])
    assert set(saved["methods"]) == {
        "forward",
        "packed",
        "extract",
        "naive",
        "saelens",
        "forward_full",
        "forward_windows",
    }
    packed, padded = saved["methods"]["packed"], saved["methods"]["forward"]
    assert (
        packed["padding"] == 0.0 and packed["dense_slots_per_token"] == 1.0 and padded["dense_slots_per_token"] >= 1.0
    )
    assert packed["attention_pairs_per_token"] >= packed["row_attention_pairs_per_token"] > 0
    assert saved["summary"]["packed_vs_saelens"] > 0 and saved["methods"]["extract"]["padding"] == 0.0
    for name, m in saved["methods"].items():
        assert m["tokens_per_s"] > 0 and m["tokens"] > 0, name
    s = saved["summary"]
    assert s["disk_write_GBps"] > 0 and 0 <= s["padding_fraction"] < 1
    # 6 rows (~1,100 tokens) take two 1024-slot units: 2 layers x 2 units x 1024 slots x 64 wide x 2 bytes (bf16)
    assert saved["units"] == 2
    assert 4 * 1024 * 64 * 2 <= s["bytes_per_token"] * saved["tokens"] <= 4 * 1024 * 64 * 2 + 8192
    assert saved["methods"]["extract"]["payload_bytes_per_token"] == 2 * 64 * 2
    assert s["extract_vs_naive"] > 0 and s["extract_vs_saelens"] > 0 and s["saelens_vs_its_forward"] > 0
    assert saved["methods"]["saelens"]["tokens"] == saved["methods"]["forward_windows"]["tokens"] > 0
    assert "extract" in saved["table"] and saved["machine"]["cpu_cores"] >= 1


def test_bench_extract_writes_what_the_model_computes(extract_result, tiny_model):
    """The benchmarked extractor wrote the model's own hidden states (bf16 of the fp32 values)."""
    import torch
    from transformers import AutoModelForCausalLM

    from store.core import Store
    from store.materialize import materialize

    _, store, _ = extract_result
    st = Store(store)
    m = materialize(st, "SELECT row_id, token_pos, tok_index FROM tokens ORDER BY tok_index", "hidden/layer_1")
    row = m.frame["row_id"][0]
    ids = st.query("SELECT token_id FROM tokens WHERE row_id = ? ORDER BY token_pos", [row]).column(0).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]  # layer 1
    want = want.to(torch.bfloat16).float().numpy()
    got = m.X[(m.frame["row_id"] == row).to_numpy()]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())


def test_bench_extract_refuses_a_real_store_and_bad_methods(extract_result, tiny_model, tmp_path):
    from extractors.pipeline import ExtractConfig
    from extractors.pipeline import run_extraction as run

    _, store, _ = extract_result
    run(ExtractConfig(layers=[2], store=str(store), model=tiny_model, progress=False))  # a real extraction
    with pytest.raises(ValueError, match="written by a real extraction"):
        bench_extract.run_bench(
            bench_extract.BenchExtractConfig(
                model=tiny_model,
                layers=[2],
                rows=6,
                store=str(store),
                out=str(tmp_path / "x.json"),
                methods=["forward"],
                disk_mb=8,
                progress=False,
            )
        )
    from store.cli import parse_config

    with pytest.raises(SystemExit):
        parse_config(bench_extract.BenchExtractConfig, ["--methods", "fastest"])


def test_bench_read_compares_with_memmap(extract_result, tmp_path):
    _, store, _ = extract_result
    out = tmp_path / "read.json"
    res = bench_read.run_bench(
        bench_read.BenchReadConfig(
            store=str(store),
            array="hidden/layer_3",
            n_tokens=200,
            n_rows=2,
            batch_size=256,
            repeats=1,
            out=str(out),
            progress=False,
        )
    )
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    cases = {(r["case"], r["method"]) for r in saved["results"]}
    assert {
        ("tokens", "materialize"),
        ("tokens", "memmap"),
        ("rows", "gather"),
        ("stream", "iter_materialize shuffled"),
        ("stream", "raw sequential read"),
    } <= cases
    for r in res["results"]:
        assert r["cold_tokens_per_s"] > 0 and r["warm_tokens_per_s"] > 0
    assert all(
        "warm_vs_memmap" in r and "warm_vs_kept_map" in r
        for r in saved["results"]
        if r["method"] in ("materialize", "gather", "iter_materialize chunk order")
    )
    assert {("tokens", "memmap kept map"), ("stream", "memmap kept map shuffled")} <= cases
    # the seeded samples (store.reads.sample): the asked-for sizes, each call split into SQL and gather
    tokens = next(r for r in saved["results"] if r["case"] == "tokens" and r["method"] == "materialize")
    assert tokens["tokens"] == 200 and "seeded sample of 200" in tokens["note"]
    for r in saved["results"]:
        if r["method"] in ("materialize", "materialize in parts"):
            sql, gat = (tuple(map(float, r[k].split(" / "))) for k in ("sql_share", "gather_share"))
            assert all(0 < x < 1 for x in sql + gat) and abs(sql[0] + gat[0] - 1) < 0.02
    # the store was only read: no raw copy or benchmark folder left behind
    assert not any(p.name == "raw.bin" for p in store.rglob("raw.bin"))


def test_disk_probe_and_table(tmp_path, capsys):
    d = disk_write_bandwidth(tmp_path / "probe", total_mb=4, file_mb=1)
    assert d["bytes"] == 4 << 20 and d["write_GBps"] > 0 and not (tmp_path / "probe").exists()
    text = print_table([{"m": "a", "v": 1234.5}, {"m": "bb", "v": None}], [("m", "method", ""), ("v", "tok/s", ",.0f")])
    assert text.splitlines()[2].endswith("1,234") and text.splitlines()[3].endswith("-")
    assert text in capsys.readouterr().out


def test_gpu_staging_path_writes_the_same_bytes_on_cpu(extract_result, tiny_model, tmp_path):
    """The CUDA path's bookkeeping (device-resident unit buffers, a pool of host buffers,
    several writer threads) runs on CPU too, and must write what the default path wrote."""
    import shutil

    import zarr

    from extractors.hidden import HiddenSpec, extract_hidden
    from extractors.model import load_model
    from extractors.units import select_rows
    from store.catalog.tokens import read_layout, tokenizations
    from store.core import Store

    _, store, _ = extract_result
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    st = Store(copy)
    bench_extract._clear_arrays(st, ["hidden/layer_1", "hidden/layer_3"])
    lm = load_model(tiny_model, "cpu")
    layout = read_layout(st, tokenizations(st)[0]["tokenization"])
    res = extract_hidden(
        st,
        lm,
        layout,
        select_rows(st, "all", 6),
        HiddenSpec([1, 3], "bf16"),
        batch_tokens=8192,
        run_config={"bench": True},
        writers=3,
        resident=True,
        progress=False,
    )
    assert res.rows == 6 and len(set(layout.units)) == 2  # the second unit reuses the staging buffers
    for name in ("hidden/layer_1", "hidden/layer_3"):
        a = zarr.open_array(str(Store(store).array_path(name)), mode="r")[:]
        b = zarr.open_array(str(st.array_path(name)), mode="r")[:]
        assert a.any() and np.array_equal(a, b)


def test_bench_catalog_builds_times_and_replicates(tmp_path, tiny_model):
    """bench.catalog on a tiny generated source: both steps measured in their own process, every
    available view queried, the replicated tokens table exactly `replicate` times larger with
    distinct tok_index; a rerun on the same --work reuses the finished steps."""
    from bench import catalog as bench_catalog
    from store.core import Store

    cfg = bench_catalog.BenchCatalogConfig(
        rows=300,
        test_rows=60,
        modes=["full"],
        replicate=2,
        model=tiny_model,
        replicate_modes=["full"],
        repeats=1,
        ingest_batch_rows=100,
        tokenize_batch_rows=100,
        work=str(tmp_path / "work"),
        out=str(tmp_path / "catalog.json"),
        progress=False,
    )
    res = bench_catalog.run_bench(cfg)
    saved = json.loads((tmp_path / "catalog.json").read_text())
    assert (tmp_path / "catalog.png").stat().st_size > 0 and saved["table"] == res["table"]
    base, rep = saved["results"]
    assert base["store"] == "full" and rep["store"] == "full x2 tokens"
    assert base["ingest"]["sizes"]["train_base"] == 240 and base["rows"] == 300
    for step in ("ingest", "tokenize"):
        assert base[step]["seconds"] > 0 and base[step]["peak_rss_MB"] > 0
    assert rep["tokens"] == 2 * base["tokens"] and sum(base["bytes"].values()) > 0
    views = {q["view"]: q for q in base["queries"]}
    rviews = {q["view"]: q for q in rep["queries"]}
    assert views["assistant_tokens"]["available"] and not views["token_gradnorms"]["available"]
    for v, q in views.items():
        if q["available"]:
            assert (
                0 < q["selection_lines"] <= q["lines"] and q["selection_tokens"] >= 10_000 or q["selection_rows"] == 300
            )
            assert rviews[v]["lines"] == 2 * q["lines"] and rviews[v]["selection_lines"] == 2 * q["selection_lines"]
    st = Store(tmp_path / "work" / "full-300-x2")
    n, distinct = st.query("SELECT count(*), count(DISTINCT tok_index) FROM tokens").to_pylist()[0].values()
    assert n == distinct == rep["tokens"]
    # both tables clustered by row (what lets DuckDB skip row groups in a selection): each
    # row's tokens contiguous and in order, in the tokenization's row order (rows: split, row_id)
    for root, factor in ((tmp_path / "work" / "full-300", 1), (tmp_path / "work" / "full-300-x2", 2)):
        s = Store(root)
        seq = s.query("SELECT row_id, token_pos FROM tokens").to_pydict()  # file order
        runs = [r for i, r in enumerate(seq["row_id"]) if i == 0 or r != seq["row_id"][i - 1]]
        assert runs == s.query("SELECT row_id FROM rows").column(0).to_pylist()
        n_of = dict(zip(*s.query("SELECT row_id, n_tokens FROM row_layout").to_pydict().values(), strict=False))
        assert seq["token_pos"] == [p for r in runs for p in range(factor * n_of[r])]
    # so 3 rows' tokens lie in few row groups by the row_id statistics; a scrambled copy: all
    ids = st.query("SELECT row_id FROM rows ORDER BY row_id").column(0).to_pylist()[::120]
    clustered = bench_catalog.row_groups_hit(tmp_path / "work" / "full-300-x2", ids)
    assert clustered["total"] >= 10 and clustered["hit"] <= clustered["total"] // 2
    assert 0 < rep["selection_row_groups"]["hit"] <= rep["selection_row_groups"]["total"] == clustered["total"]
    scrambled = tmp_path / "work" / "scrambled"
    shutil.copytree(tmp_path / "work" / "full-300-x2", scrambled)
    for part in (scrambled / "catalog" / "tokens").rglob("*.parquet"):
        t = pq.read_table(part)
        pq.write_table(
            t.take(np.random.default_rng(0).permutation(t.num_rows)), part, row_group_size=-(-t.num_rows // 5)
        )
    assert bench_catalog.row_groups_hit(scrambled, ids)["hit"] == bench_catalog.row_groups_hit(scrambled, ids)["total"]
    again = bench_catalog.run_bench(cfg)
    assert again["results"][0]["ingest"]["reused"] and again["results"][0]["tokenize"]["reused"]
    with pytest.raises(ValueError, match="unknown mode"):
        bench_catalog.BenchCatalogConfig(modes=["huge"])
    with pytest.raises(ValueError, match="mode m1 needs"):
        bench_catalog.BenchCatalogConfig(rows=3000, test_rows=300)


def test_bench_s3_measures_local_and_s3(tiny_model, model_cache, tmp_path):
    """bench.s3 in a tiny setting against its own moto server: every case measured on both
    stores with a positive rate and a ratio to local, JSON + chart written, the server's
    environment removed again."""
    pytest.importorskip("moto.server")
    import os

    from bench import s3 as bench_s3

    env = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}
    res = bench_s3.run_bench(
        bench_s3.BenchS3Config(
            model=tiny_model,
            layers=[3],
            rows=16,
            width=64,
            unit_tokens=512,
            n_tokens=300,
            n_rows=4,
            repeats=1,
            model_cache=str(model_cache),
            out=str(tmp_path / "s3.json"),
            progress=False,
        )
    )
    saved = json.loads((tmp_path / "s3.json").read_text())
    assert (tmp_path / "s3.png").stat().st_size > 0 and saved["table"] == res["table"]
    by = {(r["store"].split(" ")[0], r["case"]) for r in saved["results"]}
    for case in ("ingest", "extract", "unit writes", "tokens", "rows", "stream"):
        assert ("local", case) in by and ("S3", case) in by
    for r in saved["results"]:
        assert r["tokens"] > 0 and r["seconds"] > 0
        if r["store"].startswith("S3"):
            assert (r.get("vs_local") or r.get("vs_local_warm")) > 0
    assert {k: os.environ.get(k) for k in env} == env
    with pytest.raises(ValueError, match="must be s3://"):
        bench_s3.BenchS3Config(s3_url="gs://x/y")


def test_bench_ranks_compares_one_and_two_ranks(tiny_model, tmp_path):
    """`python -m bench.ranks` in a tiny setting: both cases run under torchrun, each writes
    the rows' tokens once over its ranks, the chunks equal (one thread per rank in both cases:
    on a CPU the bytes depend on the thread count), the JSON and chart exist."""
    from bench import ranks as bench_ranks

    with pytest.raises(ValueError, match="--ranks must be positive"):
        bench_ranks.BenchRanksConfig(ranks=[0])
    with pytest.raises(ValueError, match="not together with --threads"):
        bench_ranks.BenchRanksConfig(threads=2, threads_per_rank=1)
    out = tmp_path / "ranks.json"
    res = bench_ranks.run_bench(
        bench_ranks.BenchRanksConfig(
            model=tiny_model, layers=[1], rows=8, unit_tokens=512, threads_per_rank=1, out=str(out), progress=False
        )
    )
    saved = json.loads(out.read_text())
    assert (tmp_path / "ranks.png").stat().st_size > 0 and saved["tokens"] == res["tokens"] > 0
    one, two = saved["cases"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and len(two["rank_tokens"]) == 2 and min(two["rank_tokens"]) > 0
    for c in (one, two):
        assert c["tokens"] == saved["tokens"] and c["tokens_per_s"] > 0 and c["identical_to_first"]
    with pytest.raises(ValueError, match="is a store"):
        (tmp_path / "st" / "catalog").mkdir(parents=True)
        bench_ranks.run_bench(bench_ranks.BenchRanksConfig(model=tiny_model, store=str(tmp_path / "st")))


def test_result_path_names_the_default_json_by_benchmark_model_and_device():
    from bench.common import result_path

    assert result_path("x/y.json", "read") == Path("x/y.json")
    assert result_path(None, "read") == Path("bench_out/read.json")
    assert result_path(None, "extract", "hf:Org/Model.gguf", "cpu") == Path(
        "bench_out/extract_hf-Org_Model.gguf_cpu.json"
    )


def test_bench_sae_codes_on_a_given_store(extract_result, tmp_path, capsys):
    """bench.sae_codes on the extracted store (an untrained SAE: none is registered): the sizes
    from the dtypes, the stored array measured, every throughput positive, the JSON written."""
    from bench import sae_codes as bench_sae_codes

    _, store, _ = extract_result
    out = tmp_path / "sae_codes.json"
    res = bench_sae_codes.run_bench(
        bench_sae_codes.BenchConfig(store=str(store), layers=[3], tokens=256, repeats=1, out=str(out))
    )
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "sae_codes" and saved["d_in"] == 64 and saved["sae"] == "untrained"
    assert "stored hidden/layer_3" in saved["measured"] and all(v > 0 for v in res["tokens_per_s"].values())
    assert "bytes/token" in capsys.readouterr().out
    with pytest.raises(ValueError, match="takes one layer"):
        bench_sae_codes.BenchConfig(layers=[1, 3])
