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

The compiled kernel hashes a 4,096-token NumPy array in one pass without copies
(docs/performance.md); the twin is the reference.
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np

from ._compat import kernels

__all__ = ["block_hashes", "block_hashes_from_text", "block_hashes_from_bytes", "TEXT_BLOCK_BYTES", "TEXT_BLOCK_TOKENS"]

TEXT_BLOCK_BYTES = 256
TEXT_BLOCK_TOKENS = 64

_hashing = kernels(which="hashing")


def block_hashes(tokens: Union[np.ndarray, Iterable[int]], block_tokens: int = 64) -> np.ndarray:
    """Chained block hashes of token ids (uint32 each), as a uint64 array."""
    return _hashing.block_hashes(tokens, block_tokens)


def block_hashes_from_text(text: str, block_bytes: int = TEXT_BLOCK_BYTES) -> np.ndarray:
    """Chained block hashes of UTF-8 text (``block_bytes`` bytes a block)."""
    return _hashing.text_block_hashes(text, block_bytes)


def block_hashes_from_bytes(data: bytes, block_bytes: int = TEXT_BLOCK_BYTES) -> np.ndarray:
    """Chained block hashes of raw bytes (``block_bytes`` a block): what a proxy
    that sees the body, not the text, hashes - the Envoy picker, the prompt's JSON."""
    return _hashing.bytes_block_hashes(data, block_bytes)
