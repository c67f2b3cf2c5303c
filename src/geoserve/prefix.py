"""Prefix block hashes: how a request says which KV cache it could reuse.

A prompt is cut into blocks; block i's hash is ``xxh3_64(block bytes, seed=hash of
block i-1)`` (seed 0 for the first), so one hash names the whole prefix up to its
block and two prompts share block i's hash exactly when they share everything
before it (the scheme of vLLM's and SGLang's prefix caches, with xxh3 as llm-d
uses). A trailing partial block is hashed too, as Mooncake's traces do, so
``len(hashes) == ceil(tokens / block_tokens)``.

* token ids: little-endian uint32 bytes, 64 tokens a block by default;
* text (no tokenizer at the gateway): UTF-8 bytes, 256 bytes a block - about 64
  tokens of English, so requests built from text use ``block_tokens=64``.
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np
import xxhash

__all__ = ["block_hashes", "block_hashes_from_text", "TEXT_BLOCK_BYTES", "TEXT_BLOCK_TOKENS"]

TEXT_BLOCK_BYTES = 256
TEXT_BLOCK_TOKENS = 64


def _chain(data: bytes, block_bytes: int) -> np.ndarray:
    n = -(-len(data) // block_bytes)
    out = np.empty(n, dtype=np.uint64)
    h = 0
    digest = xxhash.xxh3_64_intdigest
    for i in range(n):
        h = digest(data[i * block_bytes : (i + 1) * block_bytes], seed=h)
        out[i] = h
    return out


def block_hashes(tokens: Union[np.ndarray, Iterable[int]], block_tokens: int = 64) -> np.ndarray:
    """Chained block hashes of token ids (uint32 each), as a uint64 array."""
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 0xFFFFFFFF)):
        raise ValueError("tokens must be a 1-D sequence of integers in [0, 2**32)")
    return _chain(arr.astype("<u4", copy=False).tobytes(), 4 * block_tokens)


def block_hashes_from_text(text: str, block_bytes: int = TEXT_BLOCK_BYTES) -> np.ndarray:
    """Chained block hashes of UTF-8 text (``block_bytes`` bytes a block)."""
    if block_bytes < 1:
        raise ValueError("block_bytes must be >= 1")
    return _chain(text.encode("utf-8"), block_bytes)
