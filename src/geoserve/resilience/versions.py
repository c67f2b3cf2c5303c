"""A versioned control-plane config with bounded staleness.

Routing tables, aliases and flags travel as one :class:`ConfigVersion` with a
monotonically increasing ``version`` and the time it was issued. A gateway applies
only newer versions (an older or repeated one is refused with :class:`StaleConfig`,
so a delayed message cannot roll a region back), knows how old its config is, and
can say when it is older than the staleness bound it promised. Applying swaps the
router's topology in one step (``Router.update_topology``): an alias switch
(``chat = "llama-70b@v8"``) is atomic for every request decided after it.

Sessions are pinned to the version they started on: the gateway stamps
``x-geoserve-version`` with ``Decision.version`` and the client echoes it, which
becomes ``Request.version`` (a pin wins over an alias); the pin therefore survives
across gateway instances and Ray handle owners, and overflow is version-aware
because a pinned request only lands on replicas of its version.
"""

from __future__ import annotations

from typing import Optional

import msgspec

from ..errors import ConfigError
from ..types import Topology

__all__ = ["ConfigVersion", "ConfigStore", "StaleConfig"]


class StaleConfig(ConfigError):
    """A config version that is not newer than the one applied."""


class ConfigVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    issued_ms: float
    topology: Topology
    flags: dict[str, str] = {}


class ConfigStore:
    def __init__(self, max_staleness_ms: float = 30_000.0, router=None) -> None:
        self.max_staleness_ms = max_staleness_ms
        self.current: Optional[ConfigVersion] = None
        self.router = router
        self.refused = 0

    def apply(self, config: ConfigVersion, now_ms: float) -> None:
        if self.current is not None and config.version <= self.current.version:
            self.refused += 1
            raise StaleConfig("version", f"version {config.version} is not newer than the applied {self.current.version}")
        if self.router is not None:
            self.router.update_topology(config.topology)
        self.current = config

    def age_ms(self, now_ms: float) -> float:
        return float("inf") if self.current is None else now_ms - self.current.issued_ms

    def stale(self, now_ms: float) -> bool:
        """Older than the bound: the gateway should say so (health, metrics)."""
        return self.age_ms(now_ms) > self.max_staleness_ms
