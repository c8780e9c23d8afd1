"""Seeded samples of a view (store.reads.sample through materialize, and the SQL macros sample_key /
sample_tokens) against a plain reference written here: SplitMix64 in Python ints, a key for
every token of the view, the N smallest. Hermetic: a made-up tokenization and bf16 array."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zarr

from store.arrays import commit_unit, create_array, decode, encode, write_unit
from store.catalog.tokens import plan_layout, write_tokenization
from store.core import Store, StoreError
from store.materialize import materialize

UNIT, WIDTH, A = 64, 4, "hidden/layer_0"
VIEW = "SELECT row_id, tok_index, token_pos, role FROM tokens WHERE role = 'assistant'"
M64 = (1 << 64) - 1


def _ref_key(t: int, seed: int) -> int:
    """SplitMix64 (Steele et al. 2014) seeded with mix(seed): its output number t + 1."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    return mix((mix(seed) + (t + 1) * 0x9E3779B97F4A7C15) & M64)


def _reference(tok_index, n: int, seed: int) -> list[int]:
    return sorted(tok_index, key=lambda t: _ref_key(int(t), seed))[:n]


def _store(path, shuffle: int | None = None, n_rows: int = 40) -> tuple[Store, np.ndarray]:
    """Rows of 5..30 tokens in 64-slot units, every unit written and committed. `shuffle`: the
    same tokenization, its tables written in another row order and in several parts."""
    st = Store(path)
    rng = np.random.default_rng(3)
    lens = {f"r{i:02d}": int(rng.integers(5, 31)) for i in range(n_rows)}
    layout = plan_layout("tok-test", [(r, "train_base", n) for r, n in lens.items()], UNIT)
    order = list(lens)
    if shuffle is not None:
        order = [order[i] for i in np.random.default_rng(shuffle).permutation(n_rows)]
    rows = pa.table({"row_id": order, "split": ["train_base"] * n_rows})
    ids = [r for r in order for _ in range(lens[r])]
    pos = [p for r in order for p in range(lens[r])]
    role = ["assistant" if p % 3 else "user" for p in pos]
    tokens = pa.table(
        {
            "row_id": ids,
            "token_pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(pos, pa.int32()),
            "token_text": [f"t{p}" for p in pos],
            "role": role,
            "msg_index": pa.array([0] * len(ids), pa.int16()),
            "is_supervised": [r == "assistant" for r in role],
            "rel_pos": pa.array([0.0] * len(ids), pa.float32()),
            "char_start": pa.array(pos, pa.int32()),
            "char_end": pa.array(pos, pa.int32()),
        }
    )
    if shuffle is None:
        st.write_table("rows", rows)
    else:
        half = n_rows // 2
        st.write_table("rows", rows.slice(0, half), part="part-0")
        st.write_table("rows", rows.slice(half), part="part-1")
    write_tokenization(st, layout, tokens, {"model": "test"})
    arr = create_array(
        st, A, n_slots=layout.n_slots, width=WIDTH, chunk_slots=UNIT, dtype="bf16", attrs={"tokenization": "tok-test"}
    )
    values = encode(np.random.default_rng(5).standard_normal((layout.n_slots, WIDTH)).astype(np.float32), "bf16")
    for unit, members in layout.rows_of_unit().items():
        write_unit(st, arr, A, unit, values[unit * UNIT : (unit + 1) * UNIT])
        commit_unit(st, A, unit, [layout.row_ids[i] for i in members], "run")
    (st.root / "views").mkdir(exist_ok=True)
    (st.root / "views" / "assist.sql").write_text(VIEW)
    return st, values


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("a") / "st"), _store(tmp_path_factory.mktemp("b") / "st", shuffle=1)


def _view_tokens(st: Store) -> list[int]:
    return st.query("SELECT tok_index FROM assist").column(0).to_pylist()


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
@pytest.mark.parametrize("n", [1, 37, 250])
def test_sample_is_the_n_smallest_seeded_keys(stores, n, seed):
    (st, values), _ = stores
    every = _view_tokens(st)
    assert n < len(every)
    m = materialize(st, "assist", A, sample=n, seed=seed)
    want = _reference(every, n, seed)
    assert m.frame["tok_index"].to_list() == want  # the same tokens, in key order
    assert m.frame.columns == ["row_id", "tok_index", "token_pos", "role"] and set(m.frame["role"]) == {"assistant"}
    assert np.array_equal(m.X, decode(values[np.array(want)], "bfloat16"))
    # The SQL macros: the same key for every token, the same sample without a sort.
    keys = st.query(f"SELECT tok_index, sample_key(tok_index, {seed}) AS k FROM assist").to_pylist()
    assert all(r["k"] == _ref_key(r["tok_index"], seed) for r in keys)
    sql = st.query(f"SELECT tok_index FROM sample_tokens('assist', {n}, seed := {seed})").column(0).to_pylist()
    assert sql == want


def test_sample_is_reproducible_across_calls_stores_and_threads(stores):
    (a, _), (b, _) = stores
    first = materialize(a, "assist", A, sample=100, seed=7)
    assert first.frame.equals(materialize(a, "assist", A, sample=100, seed=7).frame)
    assert np.array_equal(first.X, materialize(a, "assist", A, sample=100, seed=7).X)
    # Another store of the same tokenization, its tables written in another order and in parts.
    assert sorted(_view_tokens(a)) == sorted(_view_tokens(b)) and _view_tokens(a) != _view_tokens(b)
    other = materialize(b, "assist", A, sample=100, seed=7)
    assert other.frame.equals(first.frame) and np.array_equal(other.X, first.X)
    con = b.connect()
    con.execute("SET threads = 1")
    con.close()
    assert materialize(b, "assist", A, sample=100, seed=7).frame.equals(first.frame)
    # Nested: a smaller sample of the same seed is a prefix of the larger one.
    assert materialize(a, "assist", A, sample=30, seed=7).frame.equals(first.frame[:30])


def test_different_seeds_draw_different_samples(stores):
    (st, _), _ = stores
    samples = [set(materialize(st, "assist", A, sample=100, seed=s).frame["tok_index"]) for s in range(4)]
    assert all(len(s) == 100 for s in samples)
    for i in range(4):
        for j in range(i + 1, 4):
            assert samples[i] != samples[j] and len(samples[i] & samples[j]) < 80  # ~100 * 100 / ~500


def test_a_sample_larger_than_the_view_is_the_whole_view_in_key_order(stores):
    (st, _), _ = stores
    every = _view_tokens(st)
    m = materialize(st, "assist", A, sample=len(every) + 1000, seed=3)
    assert m.frame["tok_index"].to_list() == _reference(every, len(every), 3)
    sql = st.query(f"SELECT tok_index FROM sample_tokens('assist', {len(every) + 1000}, seed := 3)")
    assert sql.column(0).to_pylist() == _reference(every, len(every), 3)


def test_a_row_view_samples_whole_rows(stores):
    (st, values), _ = stores
    starts = dict(st.query("SELECT row_id, tok_start FROM row_layout").to_pandas().itertuples(index=False))
    m = materialize(st, "SELECT row_id, split FROM rows", A, sample=5, seed=11)
    rows = m.frame["row_id"].unique(maintain_order=True).to_list()
    by_start = {v: k for k, v in starts.items()}
    assert rows == [by_start[t] for t in _reference(list(starts.values()), 5, 11)]
    n_tokens = dict(st.query("SELECT row_id, n_tokens FROM row_layout").to_pandas().itertuples(index=False))
    assert len(m.frame) == sum(n_tokens[r] for r in rows)  # every token of each sampled row
    assert np.array_equal(m.X, decode(values[m.frame["tok_index"].to_numpy()], "bfloat16"))
    assert len(materialize(st, "SELECT row_id FROM rows", A, sample=1000, seed=11).frame) == sum(n_tokens.values())


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_a_bad_sample_size_is_a_clear_error(stores, n):
    (st, _), _ = stores
    with pytest.raises(ValueError, match=f"sample must be a positive number.*got {n!r}"):
        materialize(st, "assist", A, sample=n)
    if isinstance(n, int) and not isinstance(n, bool):
        with pytest.raises(Exception, match=f"n must be a positive number of tokens, got {n}"):
            st.query(f"SELECT * FROM sample_tokens('assist', {n})")
    with pytest.raises(ValueError, match="seed must be an integer in 0 .. 2\\*\\*64 - 1, got -1"):
        materialize(st, "assist", A, sample=3, seed=-1)


def test_a_view_without_tok_index_cannot_be_sampled(stores):
    (st, _), _ = stores
    with pytest.raises(StoreError, match=r"a sample needs the view to return tok_index.*\['row_id', 'token_pos'\]"):
        materialize(st, "SELECT row_id, token_pos FROM tokens", A, sample=3)


def test_the_array_is_plain_zarr(stores):
    """The sample's vectors are the array's rows (read with zarr, not the store's gather)."""
    (st, _), _ = stores
    m = materialize(st, "assist", A, sample=20, seed=2)
    raw = zarr.open_array(str(st.array_path(A)), mode="r").oindex[m.frame["tok_index"].to_numpy()]
    assert np.array_equal(m.X, decode(np.asarray(raw), "bfloat16"))
