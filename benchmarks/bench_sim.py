"""Simulator speed: simulated requests per wall-clock second with geoserve's policy.

    python -m pytest benchmarks/bench_sim.py

The trace is the default scenario's synthetic demand (shared system prompts,
multi-turn sessions, an APAC outage); the demand is built once, outside the timing.
"""

import msgspec
import pytest

from geoserve.sim import POLICIES, Simulation, default_scenario
from geoserve.sim.engine import _fresh

SCENARIO = msgspec.structs.replace(default_scenario(), duration_s=120.0)
DEMAND = Simulation(SCENARIO, "geoserve").requests


@pytest.mark.parametrize("policy", ["geoserve", "llmd_scorer", "round_robin"])
def test_simulate(benchmark, policy):
    assert policy in POLICIES
    benchmark.group = "simulate"
    benchmark.extra_info["requests"] = len(DEMAND)

    def run():
        Simulation(SCENARIO, policy, _fresh(DEMAND)).run()

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["simulated_requests_per_s"] = len(DEMAND) / benchmark.stats.stats.median
