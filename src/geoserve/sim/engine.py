"""The event loop: requests, replicas, signals and faults in simulated time.

Events are ``(time_ms, kind, seq, a, b)`` in one heap; ``kind`` breaks time ties
(faults, then signals, then completions before arrivals, so a slot freed at t is
seen by a request arriving at t) and ``seq`` makes the order total, so a seed gives
the same run on every machine. Arrivals are merged from the sorted demand instead
of being pushed up front.

A request's life: the gateway in its origin region asks the policy (with the last
signal update, stale in between); it travels half the RTT to the replica's region;
the replica queues, prefills and decodes it (``replica.py``); its first token and
its last travel half the RTT back. ``queue`` decisions come back after
``retry_after_ms``; a request on a replica that fails before its first token is
retried (up to ``max_attempts``, never on the same replica), after it is lost.
Every request ends in exactly one terminal state (asserted at the end).
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from typing import Callable, Optional

import numpy as np

from .. import _compat
from ..router import Router
from ..types import SignalColumns
from .demand import SimRequest, assign_origins, follow_the_sun, load_azure, load_mooncake, scale_rate, synthetic
from .latency import LatencyModel
from .policies import POLICIES
from .replica import Replica
from .scenario import Scenario, scenario_topology

FAULT, SIGNAL, DELIVER, COMPLETE, PREFILL, FAIL, REACH, RETRY, ARRIVAL = range(9)
TERMINAL = ("served", "overflowed", "degraded", "shed", "lost")
SMALL_MODEL_SPEED = (8 / 1) / (70 / 4)  # 8B on one GPU vs 70B on four, by parameters per GPU


def build_demand(scenario: Scenario, rng: np.random.Generator) -> list[SimRequest]:
    d, f = scenario.demand, scenario.fleet
    if d.kind == "synthetic":
        return synthetic(
            rng, regions=f.regions, shares=d.shares, utc_offsets=f.utc_offsets_h, mean_rate=d.mean_rate,
            duration_s=scenario.duration_s, day_s=scenario.day_s, start_hour_utc=scenario.start_hour_utc,
            prompt_mean=d.prompt_mean, output_mean=d.output_mean, block_tokens=d.block_tokens,
            prefix_groups=d.prefix_groups, prefix_share=d.prefix_share, follow_up_share=d.follow_up_share,
            priorities=d.priorities, trough=d.trough,
        )
    loader = load_mooncake if d.kind == "mooncake" else load_azure
    rows = loader(d.path, d.limit or None)
    rows = scale_rate(rows, d.mean_rate)
    rows = [r for r in rows if r["arrival_ms"] <= scenario.duration_s * 1000.0]
    if d.follow_the_sun:
        copies = follow_the_sun(rows, f.regions, scenario.day_s * 1000.0, f.utc_offsets_h)
        out = []
        for region, row in sorted(copies, key=lambda x: x[1]["arrival_ms"]):
            req = assign_origins(rng, [row], [region], [1.0], d.priorities)[0]
            req.id = len(out)
            out.append(req)
        return out
    return assign_origins(rng, rows, f.regions, d.shares, d.priorities)


class Simulation:
    """One scenario, one policy, one seed."""

    def __init__(self, scenario: Scenario, policy: str, requests: Optional[list[SimRequest]] = None,
                 engine: Optional[str] = None) -> None:
        """``engine``: ``"native"`` (the compiled twin of this class's loop, the default
        when the kernels are built), ``"python"``, or ``None`` for the default."""
        if engine not in (None, "native", "python"):
            raise ValueError(f"engine must be 'native' or 'python', got {engine!r}")
        if engine is None:
            engine = "native" if _compat.native and _compat.compiled_simcore is not None else "python"
        if engine == "native" and _compat.compiled_simcore is None:
            raise ImportError("the compiled simulator engine is not built")
        self.engine = engine
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
        self.scenario = scenario
        self.router = Router(scenario_topology(scenario))
        self.fleet = fleet = self.router.fleet
        rng = np.random.default_rng(scenario.seed)
        self.requests = requests if requests is not None else build_demand(scenario, rng)
        big = LatencyModel()
        small = big.scaled(SMALL_MODEL_SPEED)
        kv_tokens = scenario.fleet.kv_blocks * scenario.fleet.kv_block_tokens
        block = scenario.demand.block_tokens if scenario.demand.kind != "mooncake" else 512
        self.replicas = [
            Replica(r, int(fleet.replica_region[r]), int(fleet.decode_slots[r]),
                    big if fleet.models[fleet.replica_model[r]] == "llama-70b" else small, kv_tokens, block)
            for r in range(fleet.n_replicas)
        ]
        self.one_way = (fleet.rtt_ms / 2.0).tolist()
        self.policy = POLICIES[policy](self)
        self.policy_name = policy
        self.heap: list = []
        self.seq = 0
        self.signal_delay_ms = 0.0
        self.slot_samples: list = []  # (t, slots in use per region), one per signal update
        self.now = 0.0
        self.end_ms = scenario.duration_s * 1000.0
        # Capacity over time (geoserve.plan): an object with ``on_signals(t_ms,
        # in_flight, queue_depth) -> accepting`` (one bool per replica), asked every
        # signal round; a replica not accepting is reported draining (no new work,
        # in-flight work finishes). None: the whole fleet serves throughout.
        self.capacity = None

    # ------------------------------------------------------------ events
    def push(self, t: float, kind: int, a=None, b=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, a, b))

    def run(self, progress: Optional[Callable[[float], None]] = None) -> list[SimRequest]:
        # The run makes no reference cycles worth collecting (requests, decisions
        # and snapshots are acyclic): the cyclic collector only rescans them.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if self.engine == "native":
                _compat.compiled_simcore.Engine(self, progress).run()
            else:
                self._run_python(progress)
        finally:
            if collecting:
                gc.enable()
        self._check_conservation()
        return self.requests

    def _run_python(self, progress: Optional[Callable[[float], None]]) -> None:
        s = self.scenario
        end_ms = s.duration_s * 1000.0
        self._schedule_faults()
        self.push(0.0, SIGNAL)
        arrivals = self.requests
        i, n = 0, len(arrivals)
        heap = self.heap
        pop = heapq.heappop
        tick = max(1, n // 50)
        while i < n or heap:
            if i < n and (not heap or arrivals[i].arrival_ms < heap[0][0] or
                          (arrivals[i].arrival_ms == heap[0][0] and heap[0][1] > ARRIVAL)):
                req = arrivals[i]
                i += 1
                if progress and i % tick == 0:
                    progress(i / n)
                self._route(req, req.arrival_ms)
                continue
            t, kind, _, a, b = pop(heap)
            self.now = t
            if kind == COMPLETE:
                self._complete(a, b, t)
            elif kind == PREFILL:
                self._prefill_done(a, b, t)
            elif kind == REACH:
                self._reach(a, b, t)
            elif kind == SIGNAL:
                self._signal(t)
                if t < end_ms or i < n or self._work_left():
                    self.push(t + s.signal_interval_ms, SIGNAL)
            elif kind == DELIVER:
                self.policy.on_signals(a, b)
            elif kind == RETRY:
                self._route(a, t)
            elif kind == FAIL:
                self._failed(a, b, t)
            elif kind == FAULT:
                self._fault(*a, t)
        self.end_ms = max(self.now, end_ms)
        if progress:
            progress(1.0)

    def _work_left(self) -> bool:
        if any(r.in_use or r.waiting for r in self.replicas):
            return True
        return any(e[1] in (RETRY, FAIL, REACH, PREFILL, COMPLETE) for e in self.heap)

    # ------------------------------------------------------------ signals
    def _signal(self, t: float) -> None:
        n = len(self.replicas)
        observed = np.empty(n)
        healthy = np.empty(n, dtype=bool)
        running = np.empty(n, dtype=np.int32)
        waiting = np.empty(n, dtype=np.int32)
        used = [0] * self.fleet.n_regions
        for i, r in enumerate(self.replicas):
            if r.alive:
                r.last_signal_ms = t
            observed[i] = r.last_signal_ms
            healthy[i] = r.alive
            running[i], waiting[i] = r.signals(t)
            used[r.region] += r.in_use
        timings = {}
        if self.scenario.engine_timings:  # measured: the current step and the prefill rate, slowdowns included
            rate = self.fleet.default_prefill_ms_per_token
            timings = {"tpot_ms": np.array([r.step_ms(r.batch) for r in self.replicas]),
                       "prefill_ms_per_token": np.array([rate[i] * r.slow for i, r in enumerate(self.replicas)])}
        usable = healthy & (t - observed <= self.fleet.policy.signal_max_age_ms)
        if self.capacity is not None:
            accepting = self.capacity.on_signals(t, running, waiting)
            timings["draining"] = ~accepting
            usable &= accepting
        columns = SignalColumns(now_ms=t, observed_ms=observed, healthy=healthy, in_flight=running, queue_depth=waiting,
                                **timings)
        self.slot_samples.append((t, used))
        if self.signal_delay_ms > 0:
            self.push(t + self.signal_delay_ms, DELIVER, columns, usable)
        else:
            self.policy.on_signals(columns, usable)

    # ------------------------------------------------------------ requests
    def _route(self, req: SimRequest, t: float) -> None:
        req.attempts += 1
        action, r, retry_after = self.policy.route(req, t)
        if action == "queue":
            req.queued += 1
            self.push(t + max(1.0, retry_after), RETRY, req)
            return
        if action == "shed" or action == "lost" or r < 0:
            self._terminal(req, "shed" if action == "shed" else "lost", t)
            return
        req.replica = r
        req.region = self.fleet.topology.regions[self.replicas[r].region]
        req.model_used = self.fleet.models[self.fleet.replica_model[r]]
        req.outcome = {"serve": "served", "overflow": "overflowed", "degrade": "degraded"}[action]
        origin = self.fleet.location_index[req.origin]
        self.push(t + self.one_way[origin][self.replicas[r].region], REACH, req, req.attempts)

    def _reach(self, req: SimRequest, attempt: int, t: float) -> None:
        replica = self.replicas[req.replica]
        if not replica.alive:
            self.push(t + self._back(req), FAIL, req, attempt)
            return
        end = replica.admit(req, t)
        if end >= 0:
            self.push(end, PREFILL, req, attempt)

    def _back(self, req: SimRequest) -> float:
        origin = self.fleet.location_index[req.origin]
        return self.one_way[origin][self.replicas[req.replica].region]

    def _prefill_done(self, req: SimRequest, attempt: int, t: float) -> None:
        replica = self.replicas[req.replica]
        if req.attempts != attempt or req.id not in replica.prefilling:
            return  # dropped by a fault in the meantime
        first = replica.join_decode(req, t)
        req.ttft_ms = first + self._back(req) - req.arrival_ms
        self._reschedule(replica)

    def _reschedule(self, replica: Replica) -> None:
        t_next = replica.next_completion()
        if t_next >= 0:
            self.push(t_next, COMPLETE, replica.index, replica.version)

    def _complete(self, index: int, version: int, t: float) -> None:
        replica = self.replicas[index]
        if version != replica.version:
            return  # superseded by a later change of the batch
        for req in replica.finish_due(t):
            req.completion_ms = t + self._back(req) - req.arrival_ms
            self.policy.complete(req, True, t, req.ttft_ms)
        for req, end in replica.start_waiting(t):
            self.push(end, PREFILL, req, req.attempts)
        self._reschedule(replica)

    def _failed(self, req: SimRequest, attempt: int, t: float) -> None:
        if req.attempts != attempt:
            return
        self.policy.complete(req, False, t, math.nan)
        if req.ttft_ms == req.ttft_ms:  # failed after its first token: never retried
            self._terminal(req, "lost", t)
            return
        req.tried = req.tried + (req.replica,)
        if req.attempts < self.scenario.max_attempts and self.policy.retry(req, t):
            self._route(req, t)
        else:
            self._terminal(req, "lost", t)

    def _terminal(self, req: SimRequest, outcome: str, t: float) -> None:
        req.outcome = outcome
        req.replica = -1
        req.ttft_ms = math.nan
        req.completion_ms = math.nan

    # ------------------------------------------------------------ faults
    def fault_schedule(self) -> list:
        """The faults as (time ms, op, replica indices, value), op in down/up/slow/delay,
        in the order both engines push them."""
        regions = self.fleet.topology.regions
        ops = []
        canary = self.scenario.canary
        if canary is not None and canary.slow_factor != 1.0:  # a bad build: every new-version replica is slower
            fleet = self.fleet
            new = fleet.versions.index(canary.version)
            members = tuple(r.index for r in self.replicas if int(fleet.replica_version[r.index]) == new)
            ops.append((0.0, "slow", members, canary.slow_factor))
        for fault in self.scenario.faults:
            start, end = fault.start_s * 1000.0, fault.end_s * 1000.0
            members = tuple(r.index for r in self.replicas if regions[r.region] == fault.region)
            if fault.kind == "outage":
                ops += [(start, "down", members, 0.0), (end, "up", members, 0.0)]
            elif fault.kind == "brownout":
                ops += [(start, "slow", members, fault.factor), (end, "slow", members, 1.0)]
            elif fault.kind == "flap":
                one = (self.fleet.replica_index[fault.replica],)
                t, down = start, True
                while t < end:
                    ops.append((t, "down" if down else "up", one, 0.0))
                    t += fault.period_s * 1000.0
                    down = not down
                ops.append((end, "up", one, 0.0))
            elif fault.kind == "signal_delay":
                ops += [(start, "delay", (), fault.delay_ms), (end, "delay", (), 0.0)]
        return ops

    def _schedule_faults(self) -> None:
        for t, op, members, value in self.fault_schedule():
            self.push(t, FAULT, (op, members, value))

    def _fault(self, op: str, members: tuple, value: float, t: float) -> None:
        replicas = [self.replicas[i] for i in members]
        if op == "down":
            self._down(replicas, t)
        elif op == "up":
            self._up(replicas, t)
        elif op == "slow":
            self._slow(replicas, value, t)
        else:
            self.signal_delay_ms = value

    def _down(self, members, t: float) -> None:
        for replica in members:
            if not replica.alive:
                continue
            replica.alive = False
            for req in replica.fail_all(t):
                self.push(t + self._back(req), FAIL, req, req.attempts)

    def _up(self, members, t: float) -> None:
        for replica in members:
            replica.alive = True

    def _slow(self, members, factor: float, t: float) -> None:
        for replica in members:
            replica.set_slow(factor, t)
            self._reschedule(replica)

    # ------------------------------------------------------------ checks
    def _check_conservation(self) -> None:
        counts = {k: 0 for k in TERMINAL}
        for req in self.requests:
            if req.outcome not in counts:
                raise AssertionError(f"request {req.id} ended without a terminal state ({req.outcome!r})")
            counts[req.outcome] += 1
            if req.outcome in ("served", "overflowed", "degraded") and not (req.ttft_ms == req.ttft_ms and req.completion_ms == req.completion_ms):
                raise AssertionError(f"request {req.id} is {req.outcome} but has no latency")
        if sum(counts.values()) != len(self.requests):
            raise AssertionError("terminal states do not add up to the requests")


def simulate(scenario: Scenario, policies=None, progress=None, engine: Optional[str] = None) -> dict:
    """Run every policy on the same demand; return the report (see report.py)."""
    from .report import report

    names = list(policies or POLICIES)
    base = Simulation(scenario, names[0]) if names else None
    results = {}
    for name in names:
        requests = _fresh(base.requests)
        sim = Simulation(scenario, name, requests, engine=engine)
        started = time.perf_counter()
        sim.run((lambda f, name=name: progress(name, f)) if progress else None)
        sim.wall_s = time.perf_counter() - started
        results[name] = sim
    return report(scenario, results)


def _fresh(requests: list[SimRequest]) -> list[SimRequest]:
    """Copies with no history, so every policy replays identical demand."""
    return [
        SimRequest(r.id, r.arrival_ms, r.origin, r.prompt_tokens, r.output_tokens, r.prefix, r.block_tokens,
                   r.priority, r.model, r.session, r.blocks, r.peak)
        for r in requests
    ]
