"""64-bit mixing shared by the rings, the prefix index and their twins.

``mix64`` is the SplitMix64 finalizer (Steele, Lea, Flood: "Fast splittable
pseudorandom number generators", OOPSLA'14): a bijection on 64-bit integers with
full avalanche, so keys that differ in one bit land far apart on a ring or in a
hash table. The Cython kernels carry the same three lines in C.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def mix64(x: int) -> int:
    z = (x + GOLDEN64) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """``mix64`` over a uint64 array (NumPy wraps uint64 arithmetic modulo 2**64)."""
    z = x.astype(np.uint64) + np.uint64(GOLDEN64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))
