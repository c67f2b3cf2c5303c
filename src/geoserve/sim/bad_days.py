"""The seed's bad days, simulated: geoserve with its resilience machines against
Envoy-style priority failover without bounded spill.

``geoserve simulate --bad-days [--json FILE]``. Three scenarios on the default fleet
and demand (docs/resilience.md has the numbers and how to read them):

* ``outage`` - APAC down from 40 s to 70 s, around its peak: is any interactive
  request lost, does the rescuers' p99 TTFT stay within the cross-region budget,
  is batch traffic shed or queued first, does spill stay within its caps;
  ``outage-tight-caps`` - the same with caps below the need, so that they bind;
* ``brownout`` - EU three times slower from 120 s to 180 s, at its peak: how fast
  its share of new traffic falls, and its origin's interactive p99 TTFT;
* ``flapping`` - one US replica down and up every 2 s from 20 s to 100 s: the share
  of traffic it still gets against a steady run, and how many decisions changed.

* ``us-outage`` - the biggest region down at its own peak (180-210 s), more than
  the others can absorb: degrade (batch answers also cut to 64 tokens), shed, or
  cascade onto the rescuers' own users;
* ``canary`` - a new version three times slower, pre-staged in every region and
  rolled out APAC first: is it rolled back, did any session see two versions
  without being told, did any other region serve it.
"""

from __future__ import annotations

import math
from typing import Optional

import msgspec
import numpy as np

from .engine import Simulation, _fresh
from .report import ANSWERED, budgets
from .scenario import CanarySpec, Fault, ResilienceSpec, Scenario, SpillCaps, default_scenario

__all__ = ["bad_day_scenarios", "run_bad_days", "POLICIES"]

POLICIES = ("geoserve", "envoy_priority")
FLAPPING_REPLICA = "us-east/llama-70b/3"


def bad_day_scenarios() -> dict[str, Scenario]:
    base = msgspec.structs.replace(default_scenario(), resilience=ResilienceSpec(), engine_timings=True)
    return {
        "outage": msgspec.structs.replace(base, name="apac-outage-at-peak", duration_s=100.0,
                                          windows={"outage": (40.0, 70.0)}),
        "outage-tight-caps": msgspec.structs.replace(
            base, name="apac-outage-tight-spill-caps", duration_s=100.0, windows={"outage": (40.0, 70.0)},
            resilience=ResilienceSpec(spill=SpillCaps(pair_rate_per_s=8.0, pair_burst=16.0,
                                                      rescuer_rate_per_s=10.0, rescuer_burst=20.0))),
        "us-outage": msgspec.structs.replace(
            base, name="us-outage-at-its-peak", duration_s=230.0,
            faults=(Fault(kind="outage", region="us-east", start_s=180.0, end_s=210.0),),
            windows={"outage": (180.0, 210.0)},
            # a batch answer degraded to the 8B is also cut to 64 tokens (interactive keeps its length)
            degrade_max_tokens={"batch": 64, "best_effort": 64}),
        "canary": msgspec.structs.replace(
            base, name="bad-canary-in-apac", duration_s=100.0, faults=(), windows={},
            canary=CanarySpec(slow_factor=3.0)),
        "brownout": msgspec.structs.replace(
            base, name="eu-brownout-3x", duration_s=200.0,
            faults=(Fault(kind="brownout", region="eu-west", start_s=120.0, end_s=180.0, factor=3.0),),
            windows={"before": (110.0, 120.0), "0-10s": (120.0, 130.0), "10-20s": (130.0, 140.0),
                     "20-60s": (140.0, 180.0)}),
        "flapping": msgspec.structs.replace(
            base, name="us-replica-flapping", duration_s=110.0,
            faults=(Fault(kind="flap", replica=FLAPPING_REPLICA, start_s=20.0, end_s=100.0, period_s=2.0),),
            windows={"flapping": (20.0, 100.0)}),
    }


def _run(scenario: Scenario, policy: str, demand) -> Simulation:
    sim = Simulation(scenario, policy, _fresh(demand))
    sim.run()
    return sim


def _in(req, window) -> bool:
    return window[0] * 1000.0 <= req.arrival_ms < window[1] * 1000.0


def _p99(values) -> Optional[float]:
    return float(np.percentile(values, 99)) if values else None


def _outage(sim: Simulation) -> dict:
    fleet, window = sim.fleet, sim.scenario.windows["outage"]
    reqs = [q for q in sim.requests if _in(q, window)]
    apac = [q for q in reqs if q.origin == "ap-northeast"]
    inter = [q for q in apac if q.priority == "interactive"]
    rescued = [q for q in inter if q.outcome in ANSWERED]
    over_budget = sum(1 for q in rescued if q.ttft_ms > budgets(q, fleet)[1])
    rescuers = [q for q in rescued if q.region != "ap-northeast"]
    by_class = {}
    for cls in ("interactive", "batch", "best_effort"):
        mine = [q for q in reqs if q.priority == cls]
        by_class[cls] = {"requests": len(mine), "shed": sum(q.outcome == "shed" for q in mine),
                         "lost": sum(q.outcome == "lost" for q in mine),
                         "queued": sum(q.queued > 0 for q in mine)}
    rescuer_ttft = {r: _p99([q.ttft_ms for q in rescued if q.region == r]) for r in ("us-east", "eu-west")}
    # the SLA is per request (long prompts' budgets stretch): <= 0 is within it
    rescuer_over = {r: _p99([q.ttft_ms - budgets(q, fleet)[1] for q in rescued if q.region == r])
                    for r in ("us-east", "eu-west")}
    return {
        "apac_interactive": len(inter),
        "apac_interactive_answered": len(rescued),
        "apac_interactive_lost": sum(q.outcome == "lost" for q in inter),
        "apac_interactive_shed": sum(q.outcome == "shed" for q in inter),
        "apac_interactive_over_cross_budget": over_budget,
        "rescued_within_own_cross_budget": (sum(q.ttft_ms <= budgets(q, fleet)[1] for q in rescuers) / len(rescuers)
                                            if rescuers else None),
        "rescuer_p99_ttft_ms": rescuer_ttft,
        "rescuer_p99_over_own_budget_ms": rescuer_over,
        "all_traffic_by_class": by_class,
        "spill": _spill(sim, window),
    }


def _spill(sim: Simulation, window) -> dict:
    """Spill sent per (origin region -> rescuer), the most in any second, against the
    caps' most-possible (rate + burst) for geoserve's guard."""
    home = {loc: sim.fleet.topology.regions[int(g)] for loc, g in zip(sim.fleet.locations, sim.fleet.home)}
    sent: dict = {}
    for q in sim.requests:
        if q.outcome in ANSWERED and q.region != home[q.origin] and _in(q, window):
            sent.setdefault((home[q.origin], q.region), []).append(q.arrival_ms)
    out = {}
    for (o, r), times in sorted(sent.items()):
        t = np.sort(np.array(times))
        per_second = int(np.max(np.searchsorted(t, t + 1000.0) - np.arange(len(t)))) if len(t) else 0
        out[f"{o}->{r}"] = {"requests": len(t), "max_per_second": per_second}
    caps = sim.scenario.resilience.spill if sim.policy_name == "geoserve" and sim.scenario.resilience else None
    if caps is not None:
        out["caps"] = {"pair_per_second_max": caps.pair_rate_per_s + caps.pair_burst,
                       "rescuer_per_second_max": caps.rescuer_rate_per_s + caps.rescuer_burst}
        guard = sim.policy.guard
        out["caps"]["refused_by_buckets"] = guard.spill.refused if guard.spill is not None else 0
    return out


def _brownout(sim: Simulation) -> dict:
    fleet, windows = sim.fleet, sim.scenario.windows
    out = {}
    for name, window in windows.items():
        reqs = [q for q in sim.requests if _in(q, window) and q.outcome in ANSWERED]
        share = sum(q.region == "eu-west" for q in reqs) / len(reqs) if reqs else None
        eu_inter = [q.ttft_ms for q in sim.requests if _in(q, window) and q.origin == "eu-west"
                    and q.priority == "interactive" and q.outcome in ANSWERED]
        met = [q for q in sim.requests if _in(q, window) and q.origin == "eu-west" and q.priority == "interactive"]
        ok = sum(1 for q in met if q.outcome in ANSWERED and q.ttft_ms <= budgets(q, fleet)[1])
        # the SLA is per request (a long prompt's budget stretches with its cold
        # prefill): the p99 of TTFT minus the request's own budget is <= 0 when the
        # window's p99 is within the SLA
        over = [q.ttft_ms - budgets(q, fleet)[1] for q in met if q.outcome in ANSWERED]
        out[name] = {"eu_share_of_new_traffic": share, "eu_origin_interactive_p99_ttft_ms": _p99(eu_inter),
                     "eu_origin_interactive_p99_over_own_budget_ms": _p99(over),
                     "eu_origin_interactive_sla": ok / len(met) if met else None}
    return out


def _us_outage(sim: Simulation) -> dict:
    """The biggest region down at its own peak: nobody can absorb it all. What happens
    to its users (served elsewhere, degraded, shed) and to the rescuers' own users."""
    fleet, window = sim.fleet, sim.scenario.windows["outage"]
    reqs = [q for q in sim.requests if _in(q, window)]

    def summary(qs):
        answered = [q for q in qs if q.outcome in ANSWERED]
        ok = sum(1 for q in answered if q.ttft_ms <= budgets(q, fleet)[1])
        return {"requests": len(qs), "within_budget": ok / len(qs) if qs else None,
                "degraded": sum(q.outcome == "degraded" for q in qs), "shed": sum(q.outcome == "shed" for q in qs),
                "lost": sum(q.outcome == "lost" for q in qs),
                # degraded answers the class's cap shortened, and the output tokens not decoded
                "shortened": sum(1 for q in qs if q.output_cap),
                "tokens_not_decoded": sum(q.output_tokens - q.output_cap for q in qs if q.output_cap),
                "p99_ttft_ms": _p99([q.ttft_ms for q in answered])}

    out = {}
    for origin in ("us-east", "eu-west", "ap-northeast"):
        for cls in ("interactive", "batch"):
            out[f"{origin}/{cls}"] = summary([q for q in reqs if q.origin == origin and q.priority == cls])
    out["spill"] = _spill(sim, window)
    return out


def _canary(sim: Simulation) -> dict:
    """Where the new version served, and whether any session saw two versions without
    being told (a 503 for its rolled-back version, after which it starts over)."""
    canary = sim.scenario.canary
    fleet = sim.fleet
    new = fleet.versions.index(canary.version)
    served = {}
    sessions: dict = {}
    for q in sorted(sim.requests, key=lambda q: q.arrival_ms):
        if q.outcome in ANSWERED and int(fleet.replica_version[q.replica]) == new and q.model_used == "llama-70b":
            served[q.region] = served.get(q.region, 0) + 1
        if q.session is None:
            continue
        if q.outcome in ANSWERED:
            version = fleet.versions[int(fleet.replica_version[q.replica])] if q.model_used == "llama-70b" else None
            sessions.setdefault(q.session, []).append(version)
        elif q.outcome == "shed" and q.decision is not None and q.decision.reason == "no_replica":
            sessions.setdefault(q.session, []).append("restart")
    silent = told = 0
    for history in sessions.values():
        last, switched_silently, restarted = None, False, False
        for v in history:
            if v == "restart":
                last, restarted = None, True
            elif v is not None:
                switched_silently |= last is not None and v != last
                last = v
        silent += switched_silently
        told += restarted
    guard = getattr(sim.policy, "guard", None)
    history = [f"{t / 1000.0:.1f} s: {event}" for t, event in guard.rollout.history] if guard is not None else None
    pinned_degraded = sum(1 for q in sim.requests if q.outcome == "degraded" and q.decision is not None
                          and q.decision.request.version == canary.version)
    return {"new_version_served_by_region": served, "sessions": len(sessions),
            "pinned_to_new_version_then_degraded": pinned_degraded,
            "sessions_switched_version_silently": silent, "sessions_told_to_restart": told,
            "rollout": history}


def _flapping(sim: Simulation, steady: Simulation) -> dict:
    window = sim.scenario.windows["flapping"]
    r = sim.fleet.replica_index[FLAPPING_REPLICA]
    reqs = [q for q in sim.requests if _in(q, window)]
    base = [q for q in steady.requests if _in(q, window)]
    got = sum(q.replica == r for q in reqs)
    would = sum(q.replica == r for q in base)
    changed = sum(a.replica != b.replica for a, b in zip(sim.requests, steady.requests))
    return {"flapping_replica_requests": got, "steady_run_requests": would,
            "share_of_steady": got / would if would else None,
            "failed_attempts_retried_or_lost": sum(q.attempts > 1 or q.outcome == "lost" for q in reqs),
            "lost": sum(q.outcome == "lost" for q in reqs),
            "decisions_changed_vs_steady": changed, "requests": len(sim.requests)}


def run_bad_days(policies=POLICIES, progress=None) -> dict:
    """Every scenario under every policy on the same demand; the measures above."""
    report: dict = {}
    for name, scenario in bad_day_scenarios().items():
        demand = Simulation(scenario, policies[0]).requests
        report[name] = {}
        for policy in policies:
            if progress:
                progress(f"{name}: {policy}")
            sim = _run(scenario, policy, demand)
            if name.startswith("outage"):
                report[name][policy] = _outage(sim)
            elif name == "brownout":
                report[name][policy] = _brownout(sim)
            elif name == "us-outage":
                report[name][policy] = _us_outage(sim)
            elif name == "canary":
                report[name][policy] = _canary(sim)
            else:
                steady = _run(msgspec.structs.replace(scenario, faults=()), policy, demand)
                report[name][policy] = _flapping(sim, steady)
    return _rounded(report)


def _rounded(x):
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else None
    return x
