"""Simulator speed: simulated requests per wall-clock second with geoserve's policy.

    python -m pytest benchmarks/bench_sim.py

The trace is the default scenario's synthetic demand (shared system prompts,
multi-turn sessions, ~30 blocks of 64 tokens per prompt, an APAC outage) over two
simulated minutes: 7,601 requests and 1,200+ signal updates. The demand is built
once and copied fresh for every round outside the timing; the timing covers what a
user runs per policy: ``Simulation(scenario, policy, requests).run()`` (router
and fleet construction, the event loop, the conservation check).
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

    def fresh():
        return (_fresh(DEMAND),), {}

    def run(requests):
        sim = Simulation(SCENARIO, policy, requests)
        sim.run()

    benchmark.pedantic(run, setup=fresh, rounds=7, iterations=1)
    benchmark.extra_info["simulated_requests_per_s"] = len(DEMAND) / benchmark.stats.stats.median
