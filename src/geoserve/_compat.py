"""The one switch between the Cython kernels and their pure-Python twins.

``GEOSERVE_NO_EXTENSIONS=1`` forces the twins (as yarl's, multidict's and
msgpack's variables do); otherwise the compiled kernels are used when they
import. ``native`` says which won. The kernel modules, each with a twin:

``decide`` (``_core/decide.pyx`` / ``_twin/decide.py``)
    ``decide(snapshot, state, model, version, origin, priority, prompt_tokens,
    ring_key, has_key, prefix, block_tokens, exclude, waited_ms)`` -> ``(action,
    reason, model, replica, fallbacks, network_ms, queue_ms, prefill_ms, decode_ms,
    ttft_ms, budget_ms, cached_tokens, retry_after_ms)`` with indices into the fleet
    (``replica`` and ``retry_after_ms`` are -1 when absent);
    ``prefix_record(state, prefix, replica)``. The compiled module adds
    ``Boundary``, the router's request-to-decision path for the common case, and
    ``derive_columns``, the columnar snapshot derivation for the common dtypes (its
    reference is ``snapshot.derive_columns``, which also takes every error).
``hashing`` (``_core/hashing.pyx`` / ``_twin/hashing.py``)
    ``block_hashes(tokens, block_tokens)``, ``text_block_hashes(text, block_bytes)``,
    ``bytes_block_hashes(data, block_bytes)``,
    ``ring_points(ids, vnodes)``, ``sort_ring(points, owners, starts)``.
``bodyscan`` (``_core/bodyscan.pyx`` / ``_twin/bodyscan.py``)
    ``BodyScanner``: the top level of a streamed OpenAI-style JSON body (model,
    output limit, the prompt's byte span), for the gateways.
``procmsg`` (``_core/procmsg.pyx`` / ``_twin/procmsg.py``)
    ``read(data, header_keys)``: the fields of a serialized ext_proc
    ``ProcessingRequest`` the Envoy picker reads, without building the message.
``pickstream`` (``_core/pickstream.pyx``; twin: the Envoy picker's Python handler)
    ``Stream(picker, exchange)``: one ext_proc stream of the native transport, the
    common request compiled (see ``EndpointPicker.native_stream``).
``simcore`` (``_core/simcore.pyx`` / ``sim/engine.py`` + ``sim/replica.py``)
    ``Engine(simulation, progress).run()``: the simulator's event loop and replica
    model; its twin is the Python engine itself (``Simulation(engine="python")``).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from ._twin import bodyscan as twin_bodyscan
from ._twin import decide as twin_decide
from ._twin import hashing as twin_hashing
from ._twin import procmsg as twin_procmsg

FORCED_TWIN = os.environ.get("GEOSERVE_NO_EXTENSIONS", "") not in ("", "0")

compiled_decide: Optional[ModuleType]
compiled_hashing: Optional[ModuleType]
compiled_simcore: Optional[ModuleType]
compiled_bodyscan: Optional[ModuleType]
compiled_procmsg: Optional[ModuleType]
compiled_pickstream: Optional[ModuleType]
try:
    from ._core import bodyscan as compiled_bodyscan
    from ._core import procmsg as compiled_procmsg
    from ._core import pickstream as compiled_pickstream
    from ._core import decide as compiled_decide
    from ._core import hashing as compiled_hashing
    from ._core import simcore as compiled_simcore
except ImportError:  # not built (an sdist without a compiler, or a source checkout)
    compiled_decide = compiled_hashing = compiled_simcore = compiled_bodyscan = compiled_procmsg = None
    compiled_pickstream = None

native = compiled_decide is not None and not FORCED_TWIN
_TWINS = {"decide": twin_decide, "hashing": twin_hashing, "bodyscan": twin_bodyscan, "procmsg": twin_procmsg}
_COMPILED = {"decide": compiled_decide, "hashing": compiled_hashing, "bodyscan": compiled_bodyscan,
             "procmsg": compiled_procmsg}


def kernels(implementation: Optional[str] = None, which: str = "decide") -> ModuleType:
    """``None``/``"auto"``: the default; ``"native"`` or ``"python"`` on request."""
    if implementation in (None, "auto"):
        implementation = "native" if native else "python"
    if implementation == "python":
        return _TWINS[which]
    if implementation == "native":
        module = _COMPILED[which]
        if module is None:
            raise ImportError("geoserve's compiled kernels are not built (pip install . compiles them)")
        return module
    raise ValueError(f"implementation must be 'auto', 'native' or 'python', got {implementation!r}")
