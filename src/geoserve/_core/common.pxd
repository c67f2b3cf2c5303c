# Inline helpers shared by the kernels (cimported; no module of its own).
from libc.stdint cimport uint64_t

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
