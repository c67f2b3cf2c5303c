"""Block hashes: chained xxh3_64, as the design defines them."""

import numpy as np
import pytest
import xxhash

import geoserve as g


def test_token_blocks_are_chained_xxh3_of_little_endian_uint32():
    tokens = np.arange(130, dtype=np.int64)
    hashes = g.block_hashes(tokens, block_tokens=64)
    assert hashes.dtype == np.uint64 and len(hashes) == 3  # ceil(130 / 64): the partial block counts
    raw = tokens.astype("<u4").tobytes()
    h0 = xxhash.xxh3_64_intdigest(raw[:256], seed=0)
    h1 = xxhash.xxh3_64_intdigest(raw[256:512], seed=h0)
    h2 = xxhash.xxh3_64_intdigest(raw[512:], seed=h1)
    assert hashes.tolist() == [h0, h1, h2]


def test_shared_prefixes_share_leading_hashes_and_diverge_after():
    a = g.block_hashes(list(range(256)) + [1] * 64)
    b = g.block_hashes(list(range(256)) + [2] * 64)
    assert a[:4].tolist() == b[:4].tolist() and a[4] != b[4]
    c = g.block_hashes([7] + list(range(1, 256)))
    assert (a[:4] != c[:4]).all()  # a different first token changes every chained hash


def test_text_blocks_are_256_utf8_bytes():
    text = "é" * 300  # 600 bytes
    hashes = g.block_hashes_from_text(text)
    assert len(hashes) == 3
    assert int(hashes[0]) == xxhash.xxh3_64_intdigest(text.encode()[:256], seed=0)
    assert len(g.block_hashes_from_text("")) == 0


def test_bad_tokens_are_refused():
    with pytest.raises(ValueError):
        g.block_hashes([-1, 2])
    with pytest.raises(ValueError):
        g.block_hashes([1 << 33])
    with pytest.raises(ValueError):
        g.block_hashes([1, 2], block_tokens=0)


def test_hashes_drive_affinity_end_to_end(impl):
    from builders import snapshot, topology

    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    system = list(range(1000, 1300))  # a shared 300-token system prompt
    cached, picks = [], []
    for user in range(20):
        tokens = system + [user] * 50
        request = g.Request(model="m", origin="us", prompt_tokens=len(tokens), prefix=g.block_hashes(tokens))
        d = r.route(request, s)
        cached.append(d.cached_tokens)
        picks.append(d.replica)
    # The ring key (first 256 tokens) is shared: the ring home takes the first ones;
    # as its queued prefills outweigh the cached prefix, the next replicas warm up too.
    # Each replica pays for the shared prefix at most once; every later request hits.
    assert cached.count(0) <= 4 and cached.count(256) == 20 - cached.count(0)
    home = r.fleet.replica_index[picks[0]]  # the ring home of the shared key
    assert picks[0] == picks[3] and r.state.pending[home] > max(np.delete(r.state.pending[:4], home))


# ---- the compiled hashing kernel and its twin give identical hashes
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from geoserve import _compat  # noqa: E402

DTYPES = [np.int64, np.uint64, np.int32, np.uint32, np.int16, np.uint16, np.int8, np.uint8]


@given(
    st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(dt, st.integers(0, 300), elements=st.integers(0, min(np.iinfo(dt).max, 2**32 - 1)))),
    st.sampled_from([1, 3, 16, 64, 512]),
)
def test_native_and_twin_block_hashes_are_identical(native_available, tokens, block_tokens):
    native = _compat.compiled_hashing.block_hashes(tokens, block_tokens)
    twin = _compat.twin_hashing.block_hashes(tokens, block_tokens)
    assert native.dtype == np.uint64 and native.tolist() == twin.tolist()
    strided = tokens[::2]  # not contiguous
    assert _compat.compiled_hashing.block_hashes(strided, block_tokens).tolist() == _compat.twin_hashing.block_hashes(strided, block_tokens).tolist()


@given(st.text(max_size=600), st.sampled_from([1, 7, 256]))
def test_native_and_twin_text_hashes_are_identical(native_available, text, block_bytes):
    assert _compat.compiled_hashing.text_block_hashes(text, block_bytes).tolist() == _compat.twin_hashing.text_block_hashes(text, block_bytes).tolist()


@given(st.binary(max_size=600), st.sampled_from([1, 7, 256]))
def test_native_and_twin_bytes_hashes_are_identical(native_available, data, block_bytes):
    native = _compat.compiled_hashing.bytes_block_hashes(data, block_bytes)
    assert native.tolist() == _compat.twin_hashing.bytes_block_hashes(data, block_bytes).tolist()
    text = data.decode("latin-1")  # the same blocks as text when the bytes are its UTF-8
    if text.encode("utf-8") == data:
        assert native.tolist() == _compat.compiled_hashing.text_block_hashes(text, block_bytes).tolist()


@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_vendored_xxh3_matches_the_xxhash_package(native_available, data, seed):
    assert _compat.compiled_hashing.xxh3_64_of(data, seed) == xxhash.xxh3_64_intdigest(data, seed=seed)


@pytest.mark.parametrize("impl_name", ["python", "native"])
def test_out_of_range_tokens_are_refused_by_both(native_available, impl_name):
    module = _compat.kernels(impl_name, "hashing")
    for bad in (np.array([1, -1], dtype=np.int64), np.array([2**32], dtype=np.uint64), np.array([-3], dtype=np.int8), [[1, 2]], np.array([1.5])):
        with pytest.raises(ValueError):
            module.block_hashes(bad, 64)
