"""Placement: where each model lives and how many replicas per region per hour.

One mechanism sizes every strategy (:func:`size_hour`): the demand of each origin
region flows to the nearest region *allowed* to hold the model that still has
GPUs (its own first), within the cross-region budget; each serving region gets the
fewest replicas the analytic model says keep the SLA target for the flow it
receives; the hour is then checked as a whole (:func:`analytic.evaluate_hour`) and
replicas are added where misses concentrate until it holds or GPUs run out. A
strategy is only a choice of inputs:

=====================  ==================================  ==========  ===========
strategy               where the models may live            schedule    inventory
=====================  ==================================  ==========  ===========
replicate_everywhere   every model in every region          static      ignored
hub_and_spoke          every model in the hubs              static      respected
follow_the_sun         every region, pooled across them     hourly      respected
tiered                 small model everywhere (its share    hourly      respected
                       of the demand), large in the hubs
=====================  ==================================  ==========  ===========

*Static* plans hold each region's peak of the day for 24 h; *hourly* plans follow
the demand and pay one cold start of GPU time for every replica they start.
``replicate_everywhere`` is the seed's costly baseline - each region provisioned
for its own local peak - and ignores inventory on purpose, to show what it would
cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..sim.demand import diurnal_factor
from .analytic import CROSS_BUDGET_MS, ServiceModel, evaluate_hour, replicas_needed
from .scenario import PlanScenario

__all__ = ["Plan", "STRATEGIES", "demand_at", "hourly_demand", "size_hour", "make_plan", "all_plans", "recommend", "region_loss"]

STRATEGIES = ("replicate_everywhere", "hub_and_spoke", "follow_the_sun", "tiered")


def demand_at(s: PlanScenario, hours_utc) -> np.ndarray:
    """Requests/s per origin region at UTC hours (the diurnal curve), shape (len, regions)."""
    d = s.demand
    hours = np.atleast_1d(np.asarray(hours_utc, dtype=float))
    shares = np.asarray(d.shares, dtype=float) / sum(d.shares)
    mean_factor = (1 + d.trough) / 2
    cols = [d.mean_rate * shares[g] * diurnal_factor(hours, r.utc_offset_h, d.peak_hour_local, d.trough) / mean_factor
            for g, r in enumerate(s.regions)]
    return np.stack(cols, axis=1)


def hourly_demand(s: PlanScenario) -> np.ndarray:
    """Requests/s per UTC hour and origin region, shape (24, regions): the highest
    rate within each hour (a plan holds its count for the whole hour)."""
    if s.demand.hourly:
        return np.asarray(s.demand.hourly, dtype=float)
    within = np.stack([demand_at(s, np.arange(24) + f) for f in np.linspace(0.0, 1.0, 9)])
    return within.max(axis=0)


def services(s: PlanScenario) -> dict[str, ServiceModel]:
    return {m.name: ServiceModel(m, prompt_mean=s.demand.prompt_mean, output_mean=s.demand.output_mean,
                                 kv_hit_rate=s.kv_hit_rate) for m in s.models}


def interactive_share(s: PlanScenario) -> float:
    p = s.demand.priorities
    return p.get("interactive", 0.0) / sum(p.values())


def size_hour(service: ServiceModel, demand, rtt, *, allowed, max_replicas, target: float,
              interactive: float = 0.8) -> np.ndarray:
    """Replicas per region for one hour of one model (see the module docstring).
    ``max_replicas[g]`` bounds region g (inventory / GPUs per replica; ``inf`` for none)."""
    n = len(demand)
    demand = np.asarray(demand, dtype=float)
    rtt = np.asarray(rtt, dtype=float)
    allowed = np.asarray(allowed, dtype=bool)
    limit = np.where(allowed, np.asarray(max_replicas, dtype=float), 0.0)
    reps = np.zeros(n, dtype=int)
    if demand.sum() <= 0:
        return reps
    # flows: each origin to its nearest allowed region with room (at the routing target's rate)
    room = np.array([service.route_capacity(int(k)) if math.isfinite(k) else math.inf for k in limit])
    flow = np.zeros(n)
    worst_rtt = np.zeros(n)
    for g in np.argsort(-demand, kind="stable"):
        left = demand[g]
        for h in np.argsort(rtt[g], kind="stable"):
            if left <= 0:
                break
            if room[h] <= 0 or rtt[g, h] + service.mean_prefill >= CROSS_BUDGET_MS:
                continue
            take = min(left, room[h])
            flow[h] += take
            room[h] -= take
            worst_rtt[h] = max(worst_rtt[h], rtt[g, h])
            left -= take
    for h in range(n):
        if flow[h] > 0:
            reps[h] = min(int(limit[h]) if math.isfinite(limit[h]) else 1 << 30,
                          replicas_needed(service, flow[h], target=target, rtt_ms=worst_rtt[h]))
    # the hour as a whole: add where the model says misses are, while GPUs last
    for _ in range(10_000):
        result = evaluate_hour(service, demand, reps, rtt, interactive_share=interactive)
        if result.attainment >= target:
            break
        grow = [h for h in range(n) if allowed[h] and reps[h] < limit[h]]
        if not grow:
            break
        # the region serving the most load per replica gets the next one
        h = max(grow, key=lambda h: (result.load[h] + (demand[h] if reps[h] == 0 else 0.0)) / max(reps[h], 0.5))
        reps[h] += 1
    return reps


@dataclass
class Plan:
    """Replicas per hour, model and region, and what they cost and predict."""

    strategy: str
    regions: tuple
    models: tuple
    replicas: np.ndarray  # (24, models, regions)
    gpus_per_replica: np.ndarray  # (models,)
    price: np.ndarray  # (regions,) per GPU-hour
    cold_start_h: np.ndarray  # (models,)
    attainment: np.ndarray = field(default=None)  # (24,) predicted interactive attainment
    cross_share: np.ndarray = field(default=None)  # (24,) share of requests served outside their region
    demand: np.ndarray = field(default=None)  # (24,) requests/s
    notes: list = field(default_factory=list)
    over_inventory: bool = False

    @property
    def gpus(self) -> np.ndarray:
        """GPUs held per hour and region, shape (24, regions)."""
        return np.einsum("hmg,m->hg", self.replicas, self.gpus_per_replica)

    @property
    def starts(self) -> np.ndarray:
        """Replicas started at each hour boundary, (24, models, regions) (a day repeats)."""
        prev = np.roll(self.replicas, 1, axis=0)
        return np.maximum(0, self.replicas - prev)

    @property
    def gpu_hours(self) -> float:
        warm = float(self.gpus.sum())
        cold = float(np.einsum("hmg,m,m->", self.starts, self.gpus_per_replica, self.cold_start_h))
        return warm + cold

    @property
    def cost(self) -> float:
        warm = self.gpus @ self.price
        cold = np.einsum("hmg,m,m,g->", self.starts, self.gpus_per_replica, self.cold_start_h, self.price)
        return float(warm.sum() + cold)

    @property
    def day_attainment(self) -> float:
        """Predicted interactive attainment over the day, weighted by demand."""
        return float((self.attainment * self.demand).sum() / self.demand.sum())

    @property
    def day_cross_share(self) -> float:
        return float((self.cross_share * self.demand).sum() / self.demand.sum())

    def summary(self) -> dict:
        gpus = self.gpus
        return {
            "strategy": self.strategy,
            "gpu_hours": round(self.gpu_hours, 1),
            "cost": round(self.cost, 2),
            "predicted_attainment": round(self.day_attainment, 5),
            "worst_hour_attainment": round(float(self.attainment.min()), 5),
            "cross_region_share": round(self.day_cross_share, 5),
            "peak_gpus": {r: int(gpus[:, g].max()) for g, r in enumerate(self.regions)},
            "over_inventory": self.over_inventory,
            "replicas": {m: {r: self.replicas[:, k, g].tolist() for g, r in enumerate(self.regions)}
                         for k, m in enumerate(self.models)},
            "notes": list(self.notes),
        }


def _strategy_inputs(s: PlanScenario, strategy: str):
    """(per model: demand multiplier, allowed regions), static?, respect inventory?"""
    names = s.region_names
    everywhere = np.ones(len(names), dtype=bool)
    hubs = np.array([r in s.hubs for r in names])
    large, small = s.large, s.small
    if strategy == "replicate_everywhere":
        return {large: (1.0, everywhere)}, True, False
    if strategy == "hub_and_spoke":
        return {large: (1.0, hubs)}, True, True
    if strategy == "follow_the_sun":
        return {large: (1.0, everywhere)}, False, True
    if strategy == "tiered":
        return {small: (s.tiered_share, everywhere), large: (1.0 - s.tiered_share, hubs)}, False, True
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def make_plan(s: PlanScenario, strategy: str, *, svc: Optional[dict] = None, lost: Optional[str] = None,
              demand: Optional[np.ndarray] = None) -> Plan:
    """One strategy's plan for the scenario's day. ``lost``: plan as if that region
    were gone all day (N+1 headroom is the max over regions of these)."""
    svc = svc or services(s)
    demand = hourly_demand(s) if demand is None else demand
    per_model, static, respect = _strategy_inputs(s, strategy)
    names = s.region_names
    models = tuple(m.name for m in s.models)
    hours, n = demand.shape
    target = s.sla_target + s.planning_margin
    inter = interactive_share(s)
    inventory = np.array([r.gpus for r in s.regions], dtype=float)
    replicas = np.zeros((hours, len(models), n), dtype=int)
    gpus_left = np.tile(inventory if respect else np.full(n, np.inf), (hours, 1))
    for name, (mult, allowed) in per_model.items():
        k = models.index(name)
        allowed = allowed.copy()
        if lost is not None:
            allowed &= np.array([r != lost for r in names])
        gpus = s.models[k].gpus
        for h in range(hours):
            replicas[h, k] = size_hour(svc[name], demand[h] * mult, s.rtt_ms, allowed=allowed,
                                       max_replicas=np.floor(gpus_left[h] / gpus), target=target, interactive=inter)
            gpus_left[h] -= replicas[h, k] * gpus
        if static:
            replicas[:, k] = replicas[:, k].max(axis=0)
    plan = Plan(strategy, names, models, replicas, np.array([m.gpus for m in s.models], dtype=float),
                np.array([r.price_per_gpu_hour for r in s.regions], dtype=float),
                np.array([s.cold_start_s(m) / 3600.0 for m in models]))
    plan.over_inventory = bool((plan.gpus > inventory).any())
    if plan.over_inventory:
        over = [f"{r} {int(plan.gpus[:, g].max())} > {int(inventory[g])} GPUs" for g, r in enumerate(names)
                if plan.gpus[:, g].max() > inventory[g]]
        plan.notes.append("needs more GPUs than the inventory: " + ", ".join(over))
    if strategy == "tiered":
        plan.notes.append(f"answers {s.tiered_share:.0%} of requests with {s.small} instead of {s.large}: a product decision, not only a cost")
    _predict(s, plan, svc, demand, per_model)
    return plan


def _predict(s: PlanScenario, plan: Plan, svc: dict, demand: np.ndarray, per_model: dict) -> None:
    hours = demand.shape[0]
    inter = interactive_share(s)
    att = np.zeros(hours)
    cross = np.zeros(hours)
    for h in range(hours):
        for name, (mult, _) in per_model.items():
            k = plan.models.index(name)
            r = evaluate_hour(svc[name], demand[h] * mult, plan.replicas[h, k], s.rtt_ms, interactive_share=inter)
            att[h] += mult * r.attainment
            cross[h] += mult * r.cross_share
    plan.attainment, plan.cross_share, plan.demand = att, cross, demand.sum(axis=1)


def all_plans(s: PlanScenario, strategies=STRATEGIES) -> dict[str, Plan]:
    svc = services(s)
    return {name: make_plan(s, name, svc=svc) for name in strategies}


def recommend(s: PlanScenario, plans: dict[str, Plan]) -> Optional[str]:
    """The cheapest plan that fits the inventory and whose every hour keeps the
    target (the tiered plan only when the scenario lets the small model answer)."""
    ok = [p for p in plans.values() if not p.over_inventory and p.attainment.min() >= s.sla_target
          and (s.recommend_tiered or p.strategy != "tiered")]
    return min(ok, key=lambda p: p.cost).strategy if ok else None


def region_loss(s: PlanScenario, plan: Plan, *, svc: Optional[dict] = None) -> dict:
    """N+1 regional headroom versus explicit degradation, for a plan.

    * **headroom**: the plan re-sized for each region lost all day, the maximum per
      hour and region over those cases - what keeping N+1 costs every day;
    * **degradation**: the plan as it is with a region gone at each hour: the
      predicted attainment of the worst hour, and the 8B replicas that would carry
      the unserved requests during the incident instead (the seed's "fall back to a
      smaller model").
    """
    svc = svc or services(s)
    demand = hourly_demand(s)
    per_model, _, _ = _strategy_inputs(s, plan.strategy)
    inter = interactive_share(s)
    cases = {}
    if len(s.regions) < 2:
        raise ValueError("a region loss needs a second region to fail over to")
    worst = np.maximum.reduce([make_plan(s, plan.strategy, svc=svc, lost=r).replicas for r in s.region_names])
    # headroom: every region's count covers any single loss (the lost region's own are moot)
    headroom = Plan(plan.strategy + "+n1", plan.regions, plan.models, np.maximum(worst, plan.replicas),
                    plan.gpus_per_replica, plan.price, plan.cold_start_h)
    _predict(s, headroom, svc, demand, per_model)
    for g, region in enumerate(s.region_names):
        att = np.zeros(24)
        unserved = np.zeros(24)
        for h in range(24):
            for name, (mult, _) in per_model.items():
                k = plan.models.index(name)
                reps = plan.replicas[h, k].copy()
                reps[g] = 0
                r = evaluate_hour(svc[name], demand[h] * mult, reps, s.rtt_ms, interactive_share=inter)
                att[h] += mult * r.attainment
                unserved[h] += r.unserved
        small = svc[s.small]
        fallback = int(max(math.ceil(u / small.capacity_per_replica) for u in unserved)) if unserved.max() > 0 else 0
        cases[region] = {"worst_hour_attainment": round(float(att.min()), 5),
                         "worst_hour_utc": int(att.argmin()),
                         "peak_unserved_rps": round(float(unserved.max()), 1),
                         "fallback_replicas_needed": fallback,
                         "fallback_gpus_needed": fallback * s.model(s.small).gpus}
    return {"headroom_cost": round(headroom.cost, 2), "plan_cost": round(plan.cost, 2),
            "headroom_extra_cost": round(headroom.cost - plan.cost, 2),
            "headroom_extra_share": round(headroom.cost / plan.cost - 1.0, 4),
            "headroom_gpu_hours": round(headroom.gpu_hours, 1),
            "headroom_over_inventory": bool((headroom.gpus > np.array([r.gpus for r in s.regions])).any()),
            "without_headroom": cases}
