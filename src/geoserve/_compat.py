"""The one switch between the Cython kernels and their pure-Python twins.

``GEOSERVE_NO_EXTENSIONS=1`` forces the twins (as yarl's, multidict's and
msgpack's variables do); otherwise the compiled kernels are used when they
import. ``native`` says which won. A kernel set provides:

* ``decide(snapshot, state, model, version, origin, priority, prompt_tokens,
  ring_key, has_key, prefix, block_tokens, exclude, waited_ms)`` -> ``(action,
  reason, model, replica, fallbacks, network_ms, queue_ms, prefill_ms, decode_ms,
  ttft_ms, budget_ms, cached_tokens, retry_after_ms)`` with indices into the fleet
  (``replica`` -1 and ``retry_after_ms`` -1 when absent);
* ``prefix_record(state, prefix, replica)``: remember where a prefix was sent.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from ._twin import decide as twin

FORCED_TWIN = os.environ.get("GEOSERVE_NO_EXTENSIONS", "") not in ("", "0")

compiled: Optional[ModuleType]
try:
    from ._core import decide as compiled
except ImportError:  # not built (an sdist without a compiler, or a source checkout)
    compiled = None

native = compiled is not None and not FORCED_TWIN
default: ModuleType = compiled if native and compiled is not None else twin


def kernels(implementation: Optional[str] = None) -> ModuleType:
    """``None``/``"auto"``: the default; ``"native"`` or ``"python"`` on request."""
    if implementation in (None, "auto"):
        return default
    if implementation == "python":
        return twin
    if implementation == "native":
        if compiled is None:
            raise ImportError("geoserve's compiled kernels are not built (pip install . compiles them)")
        return compiled
    raise ValueError(f"implementation must be 'auto', 'native' or 'python', got {implementation!r}")
