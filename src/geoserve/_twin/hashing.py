"""Prefix block hashes in plain Python (the twin of ``geoserve/_core/hashing.pyx``).

Block i's hash is ``xxh3_64(block bytes, seed=hash of block i-1)``, seed 0 for the
first; token ids are little-endian uint32; a trailing partial block is hashed too.
"""

from __future__ import annotations

import numpy as np
import xxhash

from .._hashing import GOLDEN64, mix64_array


def chain(data: bytes, block_bytes: int) -> np.ndarray:
    n = -(-len(data) // block_bytes)
    out = np.empty(n, dtype=np.uint64)
    h = 0
    digest = xxhash.xxh3_64_intdigest
    for i in range(n):
        h = digest(data[i * block_bytes : (i + 1) * block_bytes], seed=h)
        out[i] = h
    return out


def block_hashes(tokens, block_tokens: int) -> np.ndarray:
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 0xFFFFFFFF)):
        raise ValueError("tokens must be a 1-D sequence of integers in [0, 2**32)")
    return chain(arr.astype("<u4", copy=False).tobytes(), 4 * block_tokens)


def text_block_hashes(text: str, block_bytes: int) -> np.ndarray:
    if block_bytes < 1:
        raise ValueError("block_bytes must be >= 1")
    return chain(text.encode("utf-8"), block_bytes)


def bytes_block_hashes(data: bytes, block_bytes: int) -> np.ndarray:
    if block_bytes < 1:
        raise ValueError("block_bytes must be >= 1")
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    return chain(data, block_bytes)


def ring_points(ids: list, vnodes: int) -> np.ndarray:
    """Ring points of each replica: mix64(xxh3_64(id) + k * golden) for k < vnodes."""
    base = np.array([xxhash.xxh3_64_intdigest(rid.encode()) for rid in ids], dtype=np.uint64)
    steps = np.arange(vnodes, dtype=np.uint64) * np.uint64(GOLDEN64)
    return mix64_array((base[:, None] + steps[None, :]).ravel())


def sort_ring(points: np.ndarray, owners: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each group [starts[g], starts[g+1]) by point, ties in input (owner) order."""
    keys, vals = points.copy(), owners.copy()
    for g in range(len(starts) - 1):
        lo, hi = int(starts[g]), int(starts[g + 1])
        order = np.argsort(points[lo:hi], kind="stable")
        keys[lo:hi] = points[lo:hi][order]
        vals[lo:hi] = owners[lo:hi][order]
    return keys, vals
