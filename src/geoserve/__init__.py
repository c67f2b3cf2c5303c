"""geoserve: route each LLM request to the closest replica that still meets its SLA.

The public face: build a :class:`Router` from a :class:`Topology` and a
:class:`Policy`, turn :class:`Signals` into a snapshot, and ask for a
:class:`Decision` per :class:`Request`. ``native`` is True when the compiled
kernels are in use (``GEOSERVE_NO_EXTENSIONS=1`` forces the pure-Python twins).
See docs/api.md.
"""

from ._compat import native
from .errors import (
    ConfigError,
    GeoserveError,
    RequestError,
    SignalError,
    UnknownLocation,
    UnknownModel,
    UnknownPriority,
    UnknownVersion,
)
from .prefix import block_hashes, block_hashes_from_bytes, block_hashes_from_text
from .router import Router
from .snapshot import Fleet, Snapshot
from .state import RouterState
from .types import (
    Decision,
    Deployment,
    ModelProfile,
    Policy,
    PriorityClass,
    ReplicaSignal,
    ReplicaSpec,
    Request,
    SignalColumns,
    Signals,
    SpillAllowance,
    Topology,
)

__version__ = "0.1.0"

__all__ = [
    "native",
    "Topology",
    "Deployment",
    "ReplicaSpec",
    "ModelProfile",
    "PriorityClass",
    "Policy",
    "Signals",
    "SignalColumns",
    "ReplicaSignal",
    "SpillAllowance",
    "Request",
    "Decision",
    "Router",
    "RouterState",
    "Fleet",
    "Snapshot",
    "block_hashes",
    "block_hashes_from_text",
    "block_hashes_from_bytes",
    "GeoserveError",
    "ConfigError",
    "SignalError",
    "RequestError",
    "UnknownModel",
    "UnknownVersion",
    "UnknownLocation",
    "UnknownPriority",
]
