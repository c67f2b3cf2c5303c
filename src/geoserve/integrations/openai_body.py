"""The head of an OpenAI-style JSON body, read as it streams in:
:class:`BodyScanner` (compiled, ``_core/bodyscan.pyx``, where built; else its
pure-Python twin, ``_twin/bodyscan.py``, which documents what it reads) and
:class:`BodyError`."""

from __future__ import annotations

from .._compat import kernels
from .._twin.bodyscan import PROMPT_KEYS, BodyError

__all__ = ["BodyScanner", "BodyError", "PROMPT_KEYS"]

BodyScanner = kernels(which="bodyscan").BodyScanner
