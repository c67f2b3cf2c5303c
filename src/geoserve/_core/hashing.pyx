# cython: language_level=3
"""Prefix block hashes, compiled: the twin of ``geoserve/_twin/hashing.py``.

One pass over the tokens: each block is widened (or copied) into a small
little-endian uint32 buffer, range-checked on the way, and hashed with XXH3-64
seeded by the previous block's hash (vendored xxhash.h, inlined). uint32 input on
a little-endian machine is hashed in place, without a copy.
"""

cimport numpy as cnp
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

import sys

import numpy as np

cnp.import_array()

from .common cimport XXH3_64bits, XXH3_64bits_withSeed, chain_hashes, mix64

cdef bint LITTLE = sys.byteorder == "little"


cdef inline uint64_t xxh3_64(const void* data, size_t length, uint64_t seed) noexcept nogil:
    return XXH3_64bits_withSeed(data, length, seed)


def xxh3_64_of(bytes data, uint64_t seed=0):
    """XXH3-64 of ``data`` (for tests: must equal the xxhash package's)."""
    return xxh3_64(<const char*>data, len(data), seed)


cdef int _widen(const char* src, int kind, Py_ssize_t start, Py_ssize_t count, uint32_t* buf) noexcept nogil:
    # Copy ``count`` integers of ``kind`` into buf as uint32; -1 if one is out of range.
    # One loop per kind, so the compiler sees a plain widening loop (and vectorizes it).
    cdef Py_ssize_t i
    cdef uint64_t bad = 0
    cdef const int64_t* i64
    cdef const uint64_t* u64
    cdef const int32_t* i32
    cdef const int16_t* i16
    cdef const uint16_t* u16
    cdef const int8_t* i8
    cdef const uint8_t* u8
    if kind == 0:
        i64 = (<const int64_t*>src) + start
        for i in range(count):
            bad |= <uint64_t>i64[i] >> 32  # negative or >= 2**32 sets a high bit
            buf[i] = <uint32_t>i64[i]
    elif kind == 1:
        u64 = (<const uint64_t*>src) + start
        for i in range(count):
            bad |= u64[i] >> 32
            buf[i] = <uint32_t>u64[i]
    elif kind == 2:
        i32 = (<const int32_t*>src) + start
        for i in range(count):
            bad |= <uint64_t>(<int64_t>i32[i]) >> 32
            buf[i] = <uint32_t>i32[i]
    elif kind == 4:
        i16 = (<const int16_t*>src) + start
        for i in range(count):
            bad |= <uint64_t>(<int64_t>i16[i]) >> 32
            buf[i] = <uint32_t>i16[i]
    elif kind == 5:
        u16 = (<const uint16_t*>src) + start
        for i in range(count):
            buf[i] = u16[i]
    elif kind == 6:
        i8 = (<const int8_t*>src) + start
        for i in range(count):
            bad |= <uint64_t>(<int64_t>i8[i]) >> 32
            buf[i] = <uint32_t>i8[i]
    else:
        u8 = (<const uint8_t*>src) + start
        for i in range(count):
            buf[i] = u8[i]
    return -1 if bad else 0


cdef dict _KINDS = {
    np.dtype(np.int64): 0, np.dtype(np.uint64): 1, np.dtype(np.int32): 2, np.dtype(np.uint32): 3,
    np.dtype(np.int16): 4, np.dtype(np.uint16): 5, np.dtype(np.int8): 6, np.dtype(np.uint8): 7,
}


def block_hashes(tokens, int64_t block_tokens):
    """Chained XXH3-64 of ``block_tokens``-token blocks of uint32 token ids."""
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    cdef cnp.ndarray arr = tokens if isinstance(tokens, cnp.ndarray) else np.asarray(tokens)
    kind = _KINDS.get(arr.dtype)
    if arr.ndim != 1 or (kind is None and arr.size) or not LITTLE:
        from .._twin.hashing import block_hashes as twin  # odd input: the twin validates it

        return twin(tokens, block_tokens)
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    cdef int k = kind
    cdef Py_ssize_t n = arr.shape[0]
    cdef Py_ssize_t n_blocks = (n + block_tokens - 1) // block_tokens
    cdef cnp.ndarray out = np.empty(n_blocks, dtype=np.uint64)
    cdef uint64_t* hashes = <uint64_t*>cnp.PyArray_DATA(out)
    cdef const char* src = <const char*>cnp.PyArray_DATA(arr)
    cdef uint32_t* buf = NULL
    cdef uint64_t h = 0
    cdef Py_ssize_t b, start, count
    cdef int bad = 0
    if k != 3:
        buf = <uint32_t*>malloc(block_tokens * sizeof(uint32_t))
        if buf == NULL:
            raise MemoryError()
    with nogil:
        for b in range(n_blocks):
            start = b * block_tokens
            count = block_tokens if n - start > block_tokens else n - start
            if k == 3:
                h = xxh3_64(src + start * 4, count * 4, h)
            else:
                if _widen(src, k, start, count, buf) < 0:
                    bad = 1
                    break
                h = xxh3_64(buf, count * 4, h)
            hashes[b] = h
    free(buf)
    if bad:
        raise ValueError("tokens must be a 1-D sequence of integers in [0, 2**32)")
    return out


cdef cnp.ndarray _chain(const char* data, Py_ssize_t size, int64_t block_bytes):
    # chained XXH3-64 of block_bytes-byte blocks (the last may be shorter)
    cdef Py_ssize_t n_blocks = (size + block_bytes - 1) // block_bytes
    cdef cnp.ndarray out = np.empty(n_blocks, dtype=np.uint64)
    with nogil:
        chain_hashes(data, size, block_bytes, <uint64_t*>cnp.PyArray_DATA(out))
    return out


def text_block_hashes(str text, int64_t block_bytes):
    """Chained XXH3-64 of ``block_bytes``-byte blocks of UTF-8 text."""
    if block_bytes < 1:
        raise ValueError("block_bytes must be >= 1")
    cdef Py_ssize_t size
    cdef const char* data = PyUnicode_AsUTF8AndSize(text, &size)
    return _chain(data, size, block_bytes)


def bytes_block_hashes(bytes data, int64_t block_bytes):
    """Chained XXH3-64 of ``block_bytes``-byte blocks of ``data`` (a prompt's raw
    bytes, as a gateway sees them)."""
    if block_bytes < 1:
        raise ValueError("block_bytes must be >= 1")
    return _chain(data, len(data), block_bytes)


def bare_xxh3_blocks(const uint32_t[::1] tokens, int64_t block_tokens):
    """Benchmark floor: only the XXH3 calls block_hashes makes, on a uint32 buffer."""
    cdef Py_ssize_t n = tokens.shape[0], start, count
    cdef uint64_t h = 0
    with nogil:
        start = 0
        while start < n:
            count = block_tokens if n - start > block_tokens else n - start
            h = xxh3_64(&tokens[start], count * 4, h)
            start += block_tokens
    return h


# ------------------------------------------------------------ consistent-hash rings
cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL


def ring_points(list ids, int vnodes):
    """Ring points of each replica: mix64(xxh3_64(id) + k * golden) for k < vnodes."""
    cdef Py_ssize_t n = len(ids), r
    cdef int k
    cdef Py_ssize_t size
    cdef const char* utf8
    cdef uint64_t base
    cdef cnp.ndarray out = np.empty(n * vnodes, dtype=np.uint64)
    cdef uint64_t* points = <uint64_t*>cnp.PyArray_DATA(out)
    for r in range(n):
        utf8 = PyUnicode_AsUTF8AndSize(ids[r], &size)
        base = XXH3_64bits(utf8, size)
        for k in range(vnodes):
            points[r * vnodes + k] = mix64(base + <uint64_t>k * GOLDEN)
    return out


cdef void _radix_sort(uint64_t* keys, int32_t* vals, uint64_t* tmp_keys, int32_t* tmp_vals, Py_ssize_t n) noexcept nogil:
    # LSD radix sort by key, 8 bits a pass: stable, so equal keys keep their input order.
    cdef Py_ssize_t counts[256]
    cdef Py_ssize_t i, total, c
    cdef int shift, d
    cdef uint64_t* src_k = keys
    cdef int32_t* src_v = vals
    cdef uint64_t* dst_k = tmp_keys
    cdef int32_t* dst_v = tmp_vals
    cdef uint64_t* swap_k
    cdef int32_t* swap_v
    for shift in range(0, 64, 8):
        for d in range(256):
            counts[d] = 0
        for i in range(n):
            counts[(src_k[i] >> shift) & 0xFF] += 1
        total = 0
        for d in range(256):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            d = (src_k[i] >> shift) & 0xFF
            dst_k[counts[d]] = src_k[i]
            dst_v[counts[d]] = src_v[i]
            counts[d] += 1
        swap_k = src_k; src_k = dst_k; dst_k = swap_k
        swap_v = src_v; src_v = dst_v; dst_v = swap_v
    # eight passes: the sorted data ends where it started


def sort_ring(cnp.ndarray points, cnp.ndarray owners, cnp.ndarray starts):
    """Sort each group [starts[g], starts[g+1]) by point, ties in input (owner) order."""
    if cnp.PyArray_TYPE(points) != cnp.NPY_UINT64 or cnp.PyArray_TYPE(owners) != cnp.NPY_INT32 or cnp.PyArray_TYPE(starts) != cnp.NPY_INT32:
        raise TypeError("points uint64, owners int32, starts int32")
    cdef cnp.ndarray keys = np.ascontiguousarray(points).copy()
    cdef cnp.ndarray vals = np.ascontiguousarray(owners).copy()
    cdef Py_ssize_t n = keys.shape[0]
    cdef cnp.ndarray tmp_k = np.empty(n, dtype=np.uint64)
    cdef cnp.ndarray tmp_v = np.empty(n, dtype=np.int32)
    cdef const int32_t[::1] bounds = np.ascontiguousarray(starts)
    cdef uint64_t* k = <uint64_t*>cnp.PyArray_DATA(keys)
    cdef int32_t* v = <int32_t*>cnp.PyArray_DATA(vals)
    cdef uint64_t* tk = <uint64_t*>cnp.PyArray_DATA(tmp_k)
    cdef int32_t* tv = <int32_t*>cnp.PyArray_DATA(tmp_v)
    cdef Py_ssize_t g, lo, hi
    if bounds.shape[0] == 0 or bounds[0] != 0 or bounds[bounds.shape[0] - 1] != n:
        raise ValueError("starts must run from 0 to len(points)")
    with nogil:
        for g in range(bounds.shape[0] - 1):
            lo = bounds[g]
            hi = bounds[g + 1]
            _radix_sort(k + lo, v + lo, tk + lo, tv + lo, hi - lo)
    return keys, vals
