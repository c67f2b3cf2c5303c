"""The planner's fast model: SLA attainment of one hour of demand on a placement.

Whole days of plans go through this (a day is a few thousand evaluations); the
simulator checks it on sampled hours (``plan.validate``; the tolerance is the design
guide's: within 2 points of the simulator's interactive attainment).

Per (region, model) pool of ``N`` replicas at ``lam`` requests/s:

* **Hold time and batch.** A request holds a decode slot for its prefill plus its
  output at the batch's step time, ``T(b) = E[p] + E[out] (a + c b)`` ms, and by
  Little's law ``b = lam/N T(b)``: ``b = lam' (E[p] + a E[out]) / (1 - lam' c E[out])``.
  The pool is saturated when ``b`` passes ``utilization_cap`` of the slots.
* **Prefill queue.** Each replica prefills FIFO, an M/G/1 queue at ``rho = lam' E[p]``
  (a random split: the router's soft affinity keeps popular prefixes on their home
  replica, so its balancing is not counted on) whose wait has mass ``rho`` and an
  exponential tail with the Pollaczek-Khinchine mean.
* **Slot wait.** The pool's slots as one Erlang-C system (``N x slots`` servers,
  offered load ``N b``): the router spreads by load, so slots pool.
* A request misses when RTT + waits + its own prefill + one step passes its budget
  (the design guide's stretched budget for long prompts): the model averages the
  tails over a sample of the demand's prompt and output distribution, prefill from
  the simulator's calibrated latency curve on the uncached tokens.
* **Overflow** is a fluid, in the router's order: a region keeps the load at which
  at most ``route_miss`` of its requests would pass the *local* budget (the
  router's routing target, :meth:`ServiceModel.route_capacity`); the rest goes to
  the remote regions in RTT order while their RTT fits the cross-region budget and
  they have room under the same rule; then regions fill to their hard cap (the
  router's ``local_degraded`` and spill into busier regions); what is left is
  queued past its budget or shed - a miss. Sheddable classes (batch, best effort)
  yield first, so interactive traffic keeps the room.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from ..sim.latency import LatencyModel
from .scenario import ModelSpec, PlanScenario

__all__ = ["ServiceModel", "HourResult", "evaluate_hour", "replicas_needed"]

LOCAL_BUDGET_MS = 800.0
CROSS_BUDGET_MS = 1200.0
INFERENCE_SHARE_MS = 600.0
PROFILE_PREFILL = (7.7, 0.107)  # the router's linear profile for the 70B: the budgets' cold prefill


@lru_cache(maxsize=8)
def request_mix(prompt_mean: float, output_mean: float, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output sizes of the simulator's own synthetic demand (system
    prompts and multi-turn follow-ups included): one source for both models."""
    from ..sim.demand import synthetic

    rate = 50.0
    reqs = synthetic(np.random.default_rng(seed), regions=("r",), shares=(1.0,), utc_offsets=(0.0,), mean_rate=rate,
                     duration_s=samples / rate, day_s=86_400.0, trough=1.0, prompt_mean=prompt_mean, output_mean=output_mean)
    prompt = np.array([q.prompt_tokens for q in reqs], dtype=float)
    output = np.array([q.output_tokens for q in reqs], dtype=float)
    return prompt, output


class ServiceModel:
    """One model's service on one replica, for the demand's request mix."""

    def __init__(self, model: ModelSpec, *, prompt_mean: float = 1155.0, output_mean: float = 211.0,
                 kv_hit_rate: float = 0.4, utilization_cap: float = 0.97,
                 samples: int = 8000, seed: int = 1) -> None:
        self.model = model
        self.slots = model.decode_slots
        self.latency = LatencyModel().scaled(model.speed) if model.speed != 1.0 else LatencyModel()
        prompt, output = request_mix(prompt_mean, output_mean, samples, seed)
        prefill = np.array([self.latency.prefill_ms(t) for t in prompt * (1.0 - kv_hit_rate)])
        cold = (PROFILE_PREFILL[0] + PROFILE_PREFILL[1] * prompt) * model.speed
        self.prefill = prefill
        self.cross_budget = np.maximum(CROSS_BUDGET_MS, cold + CROSS_BUDGET_MS - INFERENCE_SHARE_MS)
        self.local_budget = np.maximum(LOCAL_BUDGET_MS, cold + LOCAL_BUDGET_MS - INFERENCE_SHARE_MS)
        self.mean_prefill = float(prefill.mean())
        self.mean_prefill_sq = float((prefill ** 2).mean())
        self.mean_output = float(output.mean())
        self.step_base = self.latency.tpot_base_ms
        self.step_per_seq = self.latency.tpot_ms_per_batch
        self.utilization_cap = utilization_cap
        self.capacity_per_replica = self._capacity()

    # ------------------------------------------------------------ one replica
    def batch(self, lam_per_replica: float) -> float:
        """In-flight requests per replica at ``lam`` requests/s (inf past saturation)."""
        lam = lam_per_replica / 1000.0
        denom = 1.0 - lam * self.step_per_seq * self.mean_output
        if denom <= 0:
            return math.inf
        return lam * (self.mean_prefill + self.step_base * self.mean_output) / denom

    def hold_ms(self, b: float) -> float:
        return self.mean_prefill + self.mean_output * (self.step_base + self.step_per_seq * b)

    def _capacity(self) -> float:
        """Requests/s one replica holds with ``b`` at the utilization cap (and its
        prefill server below it)."""
        b = self.slots * self.utilization_cap
        by_slots = 1000.0 * b / self.hold_ms(b)
        by_prefill = 1000.0 * self.utilization_cap / self.mean_prefill
        return min(by_slots, by_prefill)

    @lru_cache(maxsize=4096)
    def route_capacity(self, replicas: int, route_miss: float = 0.01) -> float:
        """Requests/s a pool of ``replicas`` keeps before the router starts to send
        work away: at most ``route_miss`` of it would pass the local budget."""
        if replicas <= 0:
            return 0.0
        lo, hi = 0.0, replicas * self.capacity_per_replica
        if self.miss(hi, replicas, 2.0, budget="local") <= route_miss:
            return hi
        for _ in range(30):
            mid = (lo + hi) / 2
            if self.miss(mid, replicas, 2.0, budget="local") <= route_miss:
                lo = mid
            else:
                hi = mid
        return lo

    def miss(self, lam: float, replicas: int, rtt_ms: float, *, budget: str = "cross") -> float:
        """Share of requests served by a pool of ``replicas`` at ``lam`` requests/s
        (the pool's total) whose TTFT passes their budget when they come from
        ``rtt_ms`` away."""
        if replicas <= 0:
            return 1.0
        per = lam / replicas
        b = self.batch(per)
        if not b < self.slots:
            return 1.0
        budgets = self.cross_budget if budget == "cross" else self.local_budget
        slack = budgets - rtt_ms - self.prefill - (self.step_base + self.step_per_seq * b)
        rho = per * self.mean_prefill / 1000.0
        tail = np.zeros_like(slack)
        if rho > 0:
            if rho >= 1:
                return 1.0
            mean_wait = (per / 1000.0) * self.mean_prefill_sq / (2.0 * (1.0 - rho))
            theta = mean_wait / rho  # the waiters' mean wait (P-K over P(wait) = rho)
            tail += rho * np.exp(-np.maximum(slack, 0.0) / max(theta, 1e-9))
        servers = replicas * self.slots
        offered = replicas * b
        c = erlang_c(servers, offered)
        if c > 0:
            hold = self.hold_ms(b)
            tail += c * np.exp(-np.maximum(slack, 0.0) * (servers - offered) / hold)
        p = np.where(slack < 0, 1.0, np.minimum(1.0, tail))
        return float(p.mean())


def erlang_c(servers: int, offered: float) -> float:
    """P(wait) of M/M/servers at ``offered`` erlangs, from Erlang B as a ratio of
    Poisson terms (in logs, vectorized: pools here have up to ~10k slots)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    k = np.arange(servers + 1, dtype=float)
    log_terms = k * math.log(offered) - np.concatenate(([0.0], np.cumsum(np.log(k[1:]))))
    top = log_terms.max()
    b = math.exp(log_terms[-1] - top) / float(np.exp(log_terms - top).sum())
    rho = offered / servers
    return b / (1.0 - rho + rho * b)


class HourResult:
    """One hour on one placement: what the analytic model predicts."""

    __slots__ = ("attainment", "cross_share", "load", "utilization", "unserved")

    def __init__(self, attainment: float, cross_share: float, load: np.ndarray, utilization: np.ndarray, unserved: float) -> None:
        self.attainment = attainment  # interactive requests within their budget
        self.cross_share = cross_share  # requests served outside their origin region
        self.load = load  # requests/s served per region
        self.utilization = utilization  # load / capacity at the cap, per region
        self.unserved = unserved  # requests/s queued past their budget or shed


def evaluate_hour(service: ServiceModel, demand: Sequence[float], replicas: Sequence[int], rtt_ms,
                  *, interactive_share: float = 0.8, reachable: Optional[Sequence[bool]] = None) -> HourResult:
    """Predict one hour: ``demand[g]`` requests/s from region g for the model,
    ``replicas[g]`` of its replicas in region g."""
    n = len(demand)
    demand = np.asarray(demand, dtype=float)
    reps = np.asarray(replicas, dtype=int)
    rtt = np.asarray(rtt_ms, dtype=float)
    total = float(demand.sum())
    if total <= 0:
        return HourResult(1.0, 0.0, np.zeros(n), np.zeros(n), 0.0)
    hard = reps * service.capacity_per_replica
    soft = np.array([service.route_capacity(int(k)) for k in reps])
    served = np.zeros((n, n))  # [origin, serving] requests/s
    excess = demand.copy()
    for cap in (soft, hard):  # the routing target first, then the hard cap
        room = cap - served.sum(axis=0)
        local = np.minimum(excess, np.maximum(room, 0.0))
        served[np.arange(n), np.arange(n)] += local
        room -= local
        excess -= local
        # overflow, the most overloaded origins first, each to its nearest regions that fit
        for g in np.argsort(-excess, kind="stable"):
            for h in np.argsort(rtt[g], kind="stable"):
                if excess[g] <= 0:
                    break
                if h == g or rtt[g, h] + service.mean_prefill >= CROSS_BUDGET_MS or room[h] <= 0:
                    continue
                take = min(excess[g], room[h])
                served[g, h] += take
                room[h] -= take
                excess[g] -= take
    cap = hard
    load = served.sum(axis=0)
    # sheddable traffic yields first: the unserved is interactive only past the rest
    unserved_total = float(excess.sum())
    unserved_interactive = max(0.0, unserved_total - (1.0 - interactive_share) * total)
    missed = unserved_interactive
    for h in range(n):
        if load[h] <= 0:
            continue
        for g in range(n):
            if served[g, h] > 0:
                missed += interactive_share * served[g, h] * service.miss(load[h], int(reps[h]), rtt[g, h])
    attainment = 1.0 - missed / (interactive_share * total)
    cross = float(served.sum() - np.trace(served)) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        util = np.where(cap > 0, load / cap, 0.0)
    return HourResult(max(0.0, attainment), cross, load, util, unserved_total)


def replicas_needed(service: ServiceModel, lam: float, *, target: float, rtt_ms: float = 2.0, limit: int = 100_000) -> int:
    """The fewest replicas that serve ``lam`` requests/s locally with ``target`` of
    them within budget (0 for no demand)."""
    if lam <= 0:
        return 0
    n = max(1, math.ceil(lam / service.capacity_per_replica))
    while n < limit and (lam > n * service.capacity_per_replica or 1.0 - service.miss(lam, n, rtt_ms) < target):
        n += 1
    return n
