# Inline helpers shared by the kernels (cimported; no module of its own).
from libc.stdint cimport int64_t, uint64_t

cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include "xxhash.h"
    """
    uint64_t XXH3_64bits(const void* data, size_t length) nogil
    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed) nogil
    void prefetch "__builtin_prefetch"(const void* address) nogil


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # SplitMix64's finalizer (geoserve._hashing.mix64 in Python).
    cdef uint64_t z = x + <uint64_t>0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline Py_ssize_t chain_hashes(const char* data, Py_ssize_t size, int64_t block_bytes,
                                    uint64_t* out) noexcept nogil:
    # Chained XXH3-64 of block_bytes-byte blocks of data (the last may be shorter)
    # into out, which has room for them; returns their number. hashing._chain (the
    # prompt's block hashes) and the Envoy picker's stream kernel share it.
    cdef Py_ssize_t n_blocks = (size + block_bytes - 1) // block_bytes
    cdef uint64_t h = 0
    cdef Py_ssize_t b, start, count
    for b in range(n_blocks):
        start = b * block_bytes
        count = block_bytes if size - start > block_bytes else size - start
        h = XXH3_64bits_withSeed(data + start, count, h)
        out[b] = h
    return n_blocks
