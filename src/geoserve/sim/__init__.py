"""geoserve.sim: a deterministic discrete-event simulator of a multi-region GPU fleet.

It replays request traces through the same :class:`geoserve.Router` a gateway
runs, next to the baselines users would pick instead, and reports SLA attainment,
tail latency, KV reuse, spill and GPU utilization (docs/simulator.md).
"""

from .latency import LatencyModel
from .policies import POLICIES, RoutingPolicy
from .scenario import Scenario, default_scenario
from .engine import Simulation, simulate

__all__ = ["LatencyModel", "POLICIES", "RoutingPolicy", "Scenario", "default_scenario", "Simulation", "simulate"]
