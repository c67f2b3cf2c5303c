"""Typed errors raised at geoserve's boundaries.

Every error that bad input can cause is a subclass of :class:`GeoserveError`
(and of :class:`ValueError`, so generic handlers still catch it) and carries the
path of the offending field in ``.field`` (``"deployments[2].region"``,
``"replicas[7].queue_depth"``, ``"model"``). Nothing past the boundary raises on
bad input: the kernels only ever see validated arrays.
"""

from __future__ import annotations

__all__ = [
    "count",
    "GeoserveError",
    "ConfigError",
    "SignalError",
    "RequestError",
    "UnknownModel",
    "UnknownVersion",
    "UnknownLocation",
    "UnknownPriority",
]


class GeoserveError(ValueError):
    """Base of every input error; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ConfigError(GeoserveError):
    """A topology or policy that cannot be used (file, schema or meaning)."""


class SignalError(GeoserveError):
    """A replica signal that is out of range, unknown or duplicated."""


class RequestError(GeoserveError):
    """A request that cannot be decided (HTTP 400 unless a subclass says otherwise)."""

    http_status = 400


class UnknownModel(RequestError):
    """The model or alias names nothing in the topology (HTTP 404)."""

    http_status = 404


class UnknownVersion(RequestError):
    """The pinned version is not deployed anywhere for that model (HTTP 404)."""

    http_status = 404


class UnknownLocation(RequestError):
    """The origin is neither a region nor an edge point of presence."""


class UnknownPriority(RequestError):
    """The priority class is not defined in the topology."""


def count(value: object, field: str, error: type = GeoserveError, limit: int = 1 << 31) -> int:
    """A non-negative integer count no larger than ``limit``, or ``error`` naming ``field``."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise error(field, f"must be an integer >= 0, got {value!r}")
    if value > limit:
        raise error(field, f"{value} is larger than {limit}")
    return int(value)
