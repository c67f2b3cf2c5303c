"""The planner checked by the simulator (``geoserve.sim``, the same Router a gateway runs).

* :func:`check_hours` - sampled hours of a plan: the hour's demand held flat on the
  hour's replicas, simulated for a few minutes, beside the analytic prediction for
  exactly the same inputs (the tolerance: 2 points of interactive attainment).
* :func:`run_day` - a time-compressed day on a scaled fleet with a controller
  moving replicas (a plan's schedule, the autoscaler, a baseline, the oracle)
  through :class:`pool.ReplicaPool`; GPU-hours come back at full scale.

Scaling: demand and replica counts are multiplied by ``scale`` (counts rounded,
at least one where the plan has any); compression keeps cold starts and scaler
windows in proportion to the demand curve (see ``pool``), not request durations,
which stay real - a drain then costs up to ~``compression`` x its real GPU time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..sim.engine import Simulation, build_demand
from ..sim.report import report
from ..sim.scenario import DemandSpec, FleetSpec, Scenario
from .analytic import evaluate_hour, replicas_needed
from .autoscale import Autoscaler, UtilizationScaler
from .placement import Plan, _strategy_inputs, demand_at, hourly_demand, interactive_share, services
from .pool import PoolHook, ReplicaPool, hourly_counts, schedule_decider
from .scenario import PlanScenario

__all__ = ["HourCheck", "check_hours", "DayRun", "run_day", "SCALERS"]


def _scaled(counts, scale: float) -> np.ndarray:
    c = np.asarray(counts, dtype=float)
    return np.where(c > 0, np.maximum(1, np.rint(c * scale)), 0).astype(int)


def sim_scenario(ps: PlanScenario, *, large: tuple, small: tuple, rates, duration_s: float, day_s: float = 86_400.0,
                 trough: float = 1.0, seed: int = 7, name: str = "plan-check") -> Scenario:
    big, little = ps.model(ps.large), ps.model(ps.small)
    total = float(sum(rates))
    return Scenario(
        name=name, seed=seed, duration_s=duration_s, day_s=day_s, faults=(), windows={},
        fleet=FleetSpec(regions=ps.region_names, rtt_ms=ps.rtt_ms, utc_offsets_h=tuple(r.utc_offset_h for r in ps.regions),
                        replicas=tuple(int(x) for x in large), fallback_replicas=tuple(int(x) for x in small),
                        decode_slots=big.decode_slots, fallback_decode_slots=little.decode_slots),
        demand=DemandSpec(mean_rate=total, shares=tuple(float(max(r, 1e-9) / max(total, 1e-9)) for r in rates), trough=float(trough),
                          prompt_mean=ps.demand.prompt_mean, output_mean=ps.demand.output_mean,
                          priorities=dict(ps.demand.priorities)),
    ).validate()


def _requests(scenario: Scenario, small_share: float, small_model: str):
    reqs = build_demand(scenario, np.random.default_rng(scenario.seed))
    if small_share > 0:
        pick = np.random.default_rng(scenario.seed + 1).uniform(size=len(reqs)) < small_share
        for q, p in zip(reqs, pick):
            if p:
                q.model = small_model
    return reqs


@dataclass
class HourCheck:
    hour: int
    analytic: float  # predicted interactive attainment
    simulated: float  # the simulator's
    requests: int
    cross_analytic: float
    cross_simulated: float

    @property
    def error(self) -> float:
        return abs(self.analytic - self.simulated)


def check_hours(ps: PlanScenario, plan: Plan, hours, *, scale: float = 1.0, duration_s: float = 300.0,
                seed: int = 7) -> list[HourCheck]:
    svc = services(ps)
    demand = hourly_demand(ps)
    per_model, _, _ = _strategy_inputs(ps, plan.strategy)
    lk, sk = plan.models.index(ps.large), plan.models.index(ps.small)
    small_share = per_model.get(ps.small, (0.0,))[0]
    inter = interactive_share(ps)
    out = []
    for h in hours:
        large, small = _scaled(plan.replicas[h, lk], scale), _scaled(plan.replicas[h, sk], scale)
        rates = demand[h] * scale
        predicted = cross = 0.0
        for name, (mult, _) in per_model.items():
            reps = large if name == ps.large else small
            r = evaluate_hour(svc[name], rates * mult, reps, ps.rtt_ms, interactive_share=inter)
            predicted += mult * r.attainment
            cross += mult * r.cross_share
        scenario = sim_scenario(ps, large=large, small=small, rates=rates, duration_s=duration_s, seed=seed + h)
        sim = Simulation(scenario, "geoserve", _requests(scenario, small_share, ps.small))
        sim.run()
        rep = report(scenario, {"geoserve": sim})["policies"]["geoserve"]
        out.append(HourCheck(h, predicted, rep["sla_attainment_interactive"], rep["requests"], cross, rep["cross_region_fraction"]))
    return out


# ---------------------------------------------------------------- whole days
@dataclass
class DayRun:
    controller: str
    attainment: float  # interactive, simulated
    gpu_hours: float  # full-scale equivalent, day time
    cross_share: float
    requests: int
    starts: int
    wall_s: float
    trace: list  # (day s, provisioned replicas per group)

    def summary(self) -> dict:
        return {"controller": self.controller, "sla_attainment_interactive": round(self.attainment, 5),
                "gpu_hours": round(self.gpu_hours, 1), "cross_region_share": round(self.cross_share, 5),
                "requests": self.requests, "replica_starts": self.starts, "wall_s": round(self.wall_s, 1)}


SCALERS = ("plan", "autoscaler", "static_peak", "utilization", "oracle")


def run_day(ps: PlanScenario, plan: Plan, controller: str, *, scale: float = 0.2, compression: float = 30.0,
            seed: int = 7, autoscaler: Optional[Autoscaler] = None) -> DayRun:
    """A compressed day of ``plan``'s demand with ``controller`` moving the large
    model's replicas (the small model, if the plan has one, follows the plan)."""
    if controller not in SCALERS:
        raise ValueError(f"unknown controller {controller!r} (known: {', '.join(SCALERS)})")
    if ps.demand.hourly:
        raise ValueError("a simulated day replays the diurnal curve; demand.hourly is checked by sampled hours only")
    lk, sk = plan.models.index(ps.large), plan.models.index(ps.small)
    per_model, _, _ = _strategy_inputs(ps, plan.strategy)
    large_share = per_model.get(ps.large, (0.0,))[0]
    small_share = per_model.get(ps.small, (0.0,))[0]
    big = ps.model(ps.large)
    n = len(ps.regions)
    table_large = np.stack([_scaled(plan.replicas[h, lk], scale) for h in range(24)])
    table_small = np.stack([_scaled(plan.replicas[h, sk], scale) for h in range(24)])
    inventory = np.array([math.floor(r.gpus / big.gpus * scale) for r in ps.regions])
    # the fleet the simulator holds: everything a controller may ever switch on
    if controller in ("plan", "oracle"):
        fleet_large = table_large.max(axis=0) if controller == "plan" else inventory
    elif controller == "static_peak":
        fleet_large = table_large.max(axis=0)
    else:
        fleet_large = np.maximum(inventory, table_large.max(axis=0))
    fleet_small = table_small.max(axis=0)
    day_s = 86_400.0 / compression
    scenario = sim_scenario(ps, large=fleet_large, small=fleet_small, rates=np.asarray(ps.demand.shares) * ps.demand.mean_rate * scale,
                            duration_s=day_s, day_s=day_s, trough=ps.demand.trough, seed=seed, name=f"day-{controller}")
    sim = Simulation(scenario, "geoserve", _requests(scenario, small_share, ps.small))
    fleet = sim.fleet
    models = fleet.models
    groups, gpus, cold, slots = [], [], [], []
    for name, spec in ((ps.large, big), (ps.small, ps.model(ps.small))):
        if name not in models:
            continue
        m = models.index(name)
        for g in range(n):
            members = [r for r in range(fleet.n_replicas) if fleet.replica_model[r] == m and fleet.replica_region[r] == g]
            groups.append(members)
            gpus.append(spec.gpus)
            cold.append(ps.cold_start_s(name))
            slots.append(spec.decode_slots)
    has_small = ps.small in models
    table = np.concatenate([table_large, table_small], axis=1) if has_small else table_large
    svc = services(ps)
    target = ps.sla_target + ps.planning_margin

    if controller == "plan":
        decide = schedule_decider(hourly_counts(table), cold)
    elif controller == "static_peak":
        decide = schedule_decider(hourly_counts(table.max(axis=0, keepdims=True), 86_400.0), cold)
    elif controller == "oracle":
        # knows the demand curve: each region's own need every 5 minutes (the same
        # sizing rule as the plan, no pooling), started one cold start ahead
        step = 300.0
        times = np.arange(0.0, 86_400.0, step) + step / 2
        need = np.zeros((len(times), len(groups)), dtype=int)
        for i, t in enumerate(times):
            rates = demand_at(ps, t / 3600.0)[0] * scale
            for g in range(n):
                need[i, g] = min(fleet_large[g], replicas_needed(svc[ps.large], rates[g] * large_share, target=target))
        if has_small:
            need[:, n:] = np.repeat(table_small, int(3600 / step), axis=0)
        decide = schedule_decider(hourly_counts(need, step), cold)
    else:
        scaler = autoscaler if controller == "autoscaler" and autoscaler is not None else (
            Autoscaler() if controller == "autoscaler" else UtilizationScaler())
        plan_decide = schedule_decider(hourly_counts(table), cold)

        def decide(pool, now, in_flight, queue_depth, scaler=scaler):
            if has_small:  # the small model follows the plan; the scaler moves the large one
                small_pool_view = _GroupView(pool, range(n, 2 * n))
                plan_decide(small_pool_view, now, in_flight, queue_depth)
            scaler(_GroupView(pool, range(n)), now, in_flight, queue_depth)

    start_counts = table[0] if controller != "static_peak" else table.max(axis=0)
    pool = ReplicaPool(groups, n_replicas=fleet.n_replicas, gpus=gpus, cold_start_s=cold, slots=slots,
                       initial=[min(int(c), len(g)) for c, g in zip(start_counts, groups)])
    hook = PoolHook(pool, decide, compression)
    sim.capacity = hook
    started = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - started
    pool.advance(sim.now / 1000.0 * compression, np.zeros(fleet.n_replicas, dtype=bool))
    rep = report(scenario, {"geoserve": sim})["policies"]["geoserve"]
    return DayRun(controller, rep["sla_attainment_interactive"], pool.gpu_hours() / scale, rep["cross_region_fraction"],
                  rep["requests"], int(pool.starts.sum()), wall, hook.trace)


class _GroupView:
    """A controller's view of some of a pool's groups, renumbered from 0."""

    def __init__(self, pool: ReplicaPool, ks) -> None:
        self._pool, self._ks = pool, list(ks)
        self.groups = [pool.groups[k] for k in self._ks]
        self.slots = [pool.slots[k] for k in self._ks]
        self.cold_start_s = [pool.cold_start_s[k] for k in self._ks]
        self.state = pool.state

    def provisioned(self, k: int) -> int:
        return self._pool.provisioned(self._ks[k])

    def set_target(self, k: int, n: int) -> None:
        self._pool.set_target(self._ks[k], n)
