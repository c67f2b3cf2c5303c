"""The compiled simulator engine and its Python twin give byte-identical reports."""

import os
import subprocess
import sys

import msgspec
import pytest

from geoserve.sim import POLICIES, Simulation, default_scenario, simulate
from geoserve.sim.demand import SimRequest
from geoserve.sim.engine import _fresh
from geoserve.sim.report import to_json
from geoserve.sim.scenario import CanarySpec, Fault, ResilienceSpec, SpillCaps

pytestmark = pytest.mark.usefixtures("native_available")


def scenario(**kw):
    return msgspec.structs.replace(default_scenario(), duration_s=45.0, **kw)


CASES = {
    "outage": scenario(faults=(Fault(kind="outage", region="ap-northeast", start_s=10.0, end_s=25.0),),
                       windows={"outage": (10.0, 25.0)}),
    "brownout-flap-delay": scenario(faults=(
        Fault(kind="brownout", region="eu-west", start_s=5.0, end_s=30.0, factor=3.0),
        Fault(kind="flap", replica="us-east/llama-70b/0", start_s=2.0, end_s=40.0, period_s=2.0),
        Fault(kind="signal_delay", start_s=15.0, end_s=35.0, delay_ms=400.0),
    ), windows={}),
    "resilience": scenario(faults=(
        Fault(kind="outage", region="ap-northeast", start_s=10.0, end_s=25.0),
        Fault(kind="flap", replica="us-east/llama-70b/0", start_s=2.0, end_s=40.0, period_s=2.0),
        Fault(kind="brownout", region="eu-west", start_s=5.0, end_s=30.0, factor=3.0),
    ), windows={}, engine_timings=True, canary=CanarySpec(slow_factor=3.0, window_s=8.0, min_requests=10),
        resilience=ResilienceSpec(spill=SpillCaps(pair_rate_per_s=3.0, pair_burst=3.0, rescuer_rate_per_s=4.0,
                                                  rescuer_burst=4.0))),
    "overload": msgspec.structs.replace(scenario(faults=(), windows={}),
                                        demand=msgspec.structs.replace(default_scenario().demand, mean_rate=160.0)),
    # too few 70B replicas: the router degrades to the 8B, shortening the answers of two classes
    "degrade": msgspec.structs.replace(
        scenario(faults=(), windows={}, degrade_max_tokens={"batch": 32, "interactive": 96}),
        fleet=msgspec.structs.replace(default_scenario().fleet, replicas=(3, 2, 1)),
        demand=msgspec.structs.replace(default_scenario().demand, mean_rate=90.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_and_python_engines_agree_exactly(case):
    policies = list(POLICIES)
    native = to_json(simulate(CASES[case], policies, engine="native"))
    python = to_json(simulate(CASES[case], policies, engine="python"))
    assert native == python


def test_the_compiled_engine_is_the_default_and_the_switch_forces_the_twin():
    assert Simulation(scenario(), "geoserve").engine == "native"
    code = "from geoserve.sim import Simulation, default_scenario; print(Simulation(default_scenario(), 'random').engine)"
    env = {**os.environ, "GEOSERVE_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "python"
    with pytest.raises(ValueError):
        Simulation(scenario(), "geoserve", engine="fortran")


def test_geoserve_without_a_guard_is_routed_through_the_routers_c_entry_points(monkeypatch):
    # The compiled engine calls the router's compiled boundary directly (no Request
    # or Decision per call) where geoserve's policy would; with a guard in between
    # (resilience), it asks the policy. Either way the reports are the twin's.
    from geoserve.sim.policies import Geoserve

    calls = {"route": 0, "complete": 0}
    for name in calls:
        original = getattr(Geoserve, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(Geoserve, name, counted)
    plain = CASES["outage"]
    sim = Simulation(plain, "geoserve", engine="native")
    sim.run()
    assert calls == {"route": 0, "complete": 0}
    assert sum(q.attempts for q in sim.requests) > len(sim.requests)  # retries took the C path too
    guarded = Simulation(CASES["resilience"], "geoserve", engine="native")
    guarded.run()
    assert calls["route"] >= len(guarded.requests) and calls["complete"] > 0


def test_a_degrade_with_a_class_cap_decodes_the_shorter_answer():
    sim = Simulation(CASES["degrade"], "geoserve", engine="native")
    sim.run()
    capped = [q for q in sim.requests if q.output_cap]
    assert capped and all(q.outcome == "degraded" and q.output_cap < q.output_tokens for q in capped)
    assert {q.priority for q in capped} <= {"batch", "interactive"}
    assert all(q.output_cap == (32 if q.priority == "batch" else 96) for q in capped)


class Tagged(SimRequest, gc=False):
    """A subclass: the compiled engine reads and writes its fields by name, not at
    SimRequest's slots."""


def test_request_fields_read_at_their_slots_or_by_name_give_the_same_run():
    base = Simulation(CASES["outage"], "geoserve").requests
    slots = Simulation(CASES["outage"], "geoserve", _fresh(base), engine="native")
    named = Simulation(CASES["outage"], "geoserve",
                       [Tagged(**msgspec.structs.asdict(q)) for q in _fresh(base)], engine="native")
    slots.run()
    named.run()
    fields = ("outcome", "ttft_ms", "completion_ms", "cached_tokens", "output_cap", "queued", "attempts", "replica",
              "region", "model_used")
    assert repr([[getattr(q, f) for f in fields] for q in slots.requests]) == \
        repr([[getattr(q, f) for f in fields] for q in named.requests])  # repr: NaN latencies compare equal
    assert {q.outcome for q in named.requests} >= {"served", "overflowed"}


def test_small_prefix_caches_grow_and_evict_as_the_twin_does():
    # KV caches far smaller than the demand's blocks: the caches evict on almost every
    # request; one 1,100-block prompt is more than a table sized for the capacity
    # holds at half load, so the compiled cache rehashes once.
    import numpy as np

    small = msgspec.structs.replace(CASES["outage"], fleet=msgspec.structs.replace(default_scenario().fleet, kv_blocks=40))
    demand = Simulation(small, "geoserve").requests
    long = msgspec.structs.replace(demand[100], prefix=np.arange(1, 1101, dtype=np.uint64), blocks=(),
                                   prompt_tokens=1100 * demand[100].block_tokens)
    long.__post_init__()
    demand[100] = long
    reports = {}
    for engine in ("native", "python"):
        sims = [Simulation(small, p, _fresh(demand), engine=engine) for p in ("geoserve", "consistent_hash", "round_robin")]
        for sim in sims:
            sim.run()
        reports[engine] = [repr([(q.outcome, q.ttft_ms, q.cached_tokens, q.replica) for q in sim.requests]) for sim in sims]
    assert reports["native"] == reports["python"]
