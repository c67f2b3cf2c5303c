"""Resilience: explicit state machines that feed the snapshot, never the kernel.

Each is ticked with the caller's clock (``now_ms`` is a parameter), so tests need
no sleeps; what a decision needs of them is folded into :class:`geoserve.Signals`
(replica health, draining and soft failure, dead regions, spill allowance) or carried by the
request (a version pin, replicas already tried).
"""

from .breaker import CLOSED, HALF_OPEN, OPEN, EjectionPolicy, OutlierDetector
from .canary import PROMOTED, ROLLED_BACK, RUNNING, CanaryPlan, Rollout
from .health import FleetHealth, HealthPolicy, Hysteresis, SlowPolicy, SoftFailure
from .retry import RetryBudget
from .spill import SpillBudget, TokenBucket
from .versions import ConfigStore, ConfigVersion, StaleConfig

__all__ = [
    "HealthPolicy", "Hysteresis", "FleetHealth", "SlowPolicy", "SoftFailure",
    "EjectionPolicy", "OutlierDetector", "CLOSED", "OPEN", "HALF_OPEN",
    "TokenBucket", "SpillBudget", "RetryBudget",
    "ConfigVersion", "ConfigStore", "StaleConfig",
    "CanaryPlan", "Rollout", "RUNNING", "PROMOTED", "ROLLED_BACK",
]
