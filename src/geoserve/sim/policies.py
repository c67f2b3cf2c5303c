"""Routing policies for the simulator: geoserve and the baselines users would pick.

One small interface (:class:`RoutingPolicy`): ``on_signals(columns, usable)``
receives every signal update (stale in between), ``route(req, now)`` picks for one
request and returns ``(action, replica, retry_after_ms)`` with action ``serve``,
``overflow``, ``degrade``, ``queue``, ``shed`` or ``lost`` (no route at all),
``complete(req, ok, now, ttft_ms)`` releases when a request ends or fails, and
``retry(req, now)`` says whether a request that failed before its first token may
try another replica (the engine's ``max_attempts`` still bounds it).

Baselines are deployed the way a multi-region user deploys a single-cluster router:
one instance per region in front of that region's replicas, with GeoDNS failover to
the nearest region that has healthy replicas once the local pool has none (except
``nearest_region_only``, which never leaves, and ``envoy_priority``, whose priority
levels are the regions by RTT). Each keeps the state its peer keeps (its own
in-flight counts, an approximate prefix index) and reads the metrics its peer reads.
Parameters are the published defaults (``shared/docs/peers.md``); where a peer
works on characters or tokens we have only block hashes, and match at block
granularity instead (stated per policy).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import msgspec
import numpy as np
import xxhash

from ..types import Request

POLICIES: dict[str, Callable] = {}


def register(cls):
    if cls.name in POLICIES:
        raise ValueError(f"policy {cls.name!r} is registered twice")
    POLICIES[cls.name] = cls
    return cls


class RoutingPolicy:
    """Base: the fleet's pools, the last signals, and the helpers baselines share."""

    name = ""

    def __init__(self, sim) -> None:
        self.sim = sim
        fleet = sim.fleet
        self.fleet = fleet
        self.rng = np.random.default_rng(sim.scenario.seed + 1)
        model = fleet.model_index["llama-70b"]
        regions = fleet.topology.regions
        self.pools = [
            list(range(int(fleet.group_start[model * fleet.n_regions + g]), int(fleet.group_start[model * fleet.n_regions + g + 1])))
            for g in range(len(regions))
        ]
        self.region_of = [int(x) for x in fleet.replica_region]
        self.slots = [int(x) for x in fleet.decode_slots]
        # regions by RTT from each region (the GeoDNS / priority order)
        rtt = fleet.rtt_ms
        self.by_distance = [sorted(range(len(regions)), key=lambda g: (rtt[o, g], g)) for o in range(len(regions))]
        n = fleet.n_replicas
        self.usable = [True] * n
        self.in_flight = [0] * n
        self.queue_depth = [0] * n
        self.outstanding = [0] * n  # this router's own in-flight requests

    # ---- signals
    def on_signals(self, columns, usable: np.ndarray) -> None:
        self.usable = usable.tolist()
        self.in_flight = np.asarray(columns.in_flight).tolist()
        self.queue_depth = np.asarray(columns.queue_depth).tolist()

    # ---- helpers
    def home(self, req) -> int:
        return self.fleet.region_index[req.origin]

    def candidates(self, region: int, req) -> list:
        tried = req.tried
        usable = self.usable
        return [r for r in self.pools[region] if usable[r] and r not in tried]

    def pool(self, req) -> list:
        """Local candidates, else the nearest region that has any (GeoDNS failover)."""
        for g in self.by_distance[self.home(req)]:
            cands = self.candidates(g, req)
            if cands:
                return cands
        return []

    def p2c(self, cands: list, load) -> int:
        if len(cands) == 1:
            return cands[0]
        i, j = self.rng.choice(len(cands), 2, replace=False)
        a, b = cands[int(i)], cands[int(j)]
        return a if load(a) <= load(b) else b

    def sent(self, req, r: int) -> None:
        self.outstanding[r] += 1

    def route(self, req, now: float):  # -> (action, replica, retry_after_ms)
        """The candidates the deployment gives this policy (GeoDNS failover
        included), then the policy's own choice among them."""
        cands = self.pool(req)
        if not cands:
            return ("lost", -1, 0.0)
        return self.choose(req, cands)

    def choose(self, req, cands: list):  # -> (action, replica, retry_after_ms)
        raise NotImplementedError(f"{type(self).__name__} must implement choose() or route()")

    def pick(self, req, r: int):
        if r < 0:
            return ("lost", -1, 0.0)
        self.sent(req, r)
        return ("serve" if self.region_of[r] == self.home(req) else "overflow", r, 0.0)

    def retry(self, req, now: float) -> bool:
        """A request failed before its first token: may it try another replica?"""
        return True

    def complete(self, req, ok: bool, now: float, ttft_ms: float) -> None:
        if req.replica >= 0 and self.outstanding[req.replica] > 0:
            self.outstanding[req.replica] -= 1


class PrefixIndex:
    """Block hash -> replicas recently sent it (LRU over blocks): the approximate
    trees and per-endpoint indexes of SGLang, llm-d, Ray and Dynamo, at block level."""

    def __init__(self, capacity: int = 1 << 17) -> None:
        self.blocks: OrderedDict = OrderedDict()
        self.capacity = capacity

    def insert(self, prefix, r: int) -> None:
        blocks = self.blocks
        for h in prefix:
            owners = blocks.get(h)
            if owners is None:
                blocks[h] = {r}
            else:
                owners.add(r)
                blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def match(self, prefix) -> dict:
        """Replica -> leading blocks of ``prefix`` it was sent."""
        matched: dict = {}
        for i, h in enumerate(prefix):
            owners = self.blocks.get(h)
            if not owners:
                break
            advanced = False
            for r in owners:
                if matched.get(r, 0) == i:
                    matched[r] = i + 1
                    advanced = True
            if not advanced:
                break
        return matched


def _key(req) -> int:
    """Session, else the first 256 tokens' block (as geoserve and SGLang prefix_hash key)."""
    if req.session is not None:
        return xxhash.xxh3_64_intdigest(req.session.encode())
    if len(req.prefix):
        k = max(1, min(len(req.prefix), -(-256 // req.block_tokens)))
        return int(req.prefix[k - 1])
    return req.id


class _Ring:
    """A consistent-hash ring per region over the 70B pool (64 points per replica)."""

    def __init__(self, policy: RoutingPolicy, vnodes: int = 64) -> None:
        self.rings = []
        for pool in policy.pools:
            points = []
            for r in pool:
                base = xxhash.xxh3_64_intdigest(policy.fleet.replica_ids[r].encode())
                points.extend(((base + k * 0x9E3779B97F4A7C15) % (1 << 64), r) for k in range(vnodes))
            points.sort()
            self.rings.append(([p for p, _ in points], [r for _, r in points]))

    def walk(self, region: int, key: int):
        import bisect

        points, owners = self.rings[region]
        if not points:
            return
        at = bisect.bisect_left(points, xxhash.xxh3_64_intdigest(key.to_bytes(8, "little")))
        seen = set()
        for step in range(len(points)):
            r = owners[(at + step) % len(points)]
            if r not in seen:
                seen.add(r)
                yield r


# ------------------------------------------------------------------ geoserve
@register
class Geoserve(RoutingPolicy):
    """geoserve's Router, exactly as a gateway runs it."""

    name = "geoserve"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.router = sim.router
        self.snapshot = None
        self.ids = self.fleet.replica_ids
        self.guard = _Guard(sim) if sim.scenario.resilience is not None or sim.scenario.canary is not None else None

    @property
    def boundary(self):
        """The router's compiled boundary when nothing of this policy's stands between
        the engine and the router (no guard): the compiled engine then calls its C
        entry points where ``route``/``complete`` below would call the router."""
        return self.router._boundary if self.guard is None else None

    def on_signals(self, columns, usable) -> None:
        if self.guard is not None:
            columns = self.guard.fold(columns)
        self.snapshot = self.router.snapshot(columns)

    def route(self, req, now: float):
        router = self.router
        d = req.decision
        if d is not None and d.action == "queue":
            router.complete(d)  # it asks again: give back the queue slot
        tried = req.tried
        guard = self.guard
        request = Request(
            req.model, req.origin, req.priority, guard.version_for(req) if guard is not None else None,
            req.prompt_tokens, req.output_tokens, req.session, req.prefix, req.block_tokens,
            tuple([self.ids[r] for r in tried]) if tried else (), now - req.arrival_ms,
        )
        d = req.decision = router.route(request, self.snapshot)
        req.output_cap = d.max_tokens or 0  # a degrade may shorten the answer
        if guard is not None:
            guard.routed(req, d, now)
        return (d.action, d.replica_index, d.retry_after_ms or 0.0)

    def retry(self, req, now: float) -> bool:
        return self.guard.retry(req) if self.guard is not None else True

    def complete(self, req, ok: bool, now: float, ttft_ms: float) -> None:
        d = req.decision
        if d is not None and d.action in _HOLDS_A_REPLICA:
            self.router.complete(d, d.replica, ok)
            if self.guard is not None:
                self.guard.result(req, d, ok, now, ttft_ms)


class _Guard:
    """geoserve.resilience around the router, as a gateway runs it: each signal round
    is a liveness probe per replica (health with hysteresis), each request result
    feeds outlier ejection, each overflow spends spill tokens, and a canary rollout
    pins sessions to a version and drains the new one outside its regions; all of it
    folded into the next snapshot's columns (``healthy``, ``draining``, ``degraded``,
    ``spill``)
    or carried by the request (its version pin), none of it in the kernel."""

    def __init__(self, sim) -> None:
        from ..resilience import CanaryPlan, FleetHealth, OutlierDetector, RetryBudget, Rollout, SoftFailure, SpillBudget

        scenario = sim.scenario
        spec = scenario.resilience
        fleet = sim.router.fleet
        topology = fleet.topology
        self.ids = list(fleet.replica_ids)
        self.home_region = {loc: topology.regions[int(g)] for loc, g in zip(fleet.locations, fleet.home)}
        self.spilled: list = []  # (time ms, origin region, rescuer) of every overflow sent
        self.health = self.outliers = self.spill = self.retries = self.slow = None
        # the profile's step time per replica at a batch: base + per_batch x batch
        self.step_base, self.step_per_batch = fleet.default_tpot_base_ms, fleet.default_tpot_ms_per_batch
        self.retrying: set = set()  # requests whose current attempt is a retry
        if spec is not None:
            self.retries = RetryBudget(spec.retry_budget_share, spec.retry_min_concurrency)
            self.health = FleetHealth.for_topology(topology, spec.health)
            self.outliers = OutlierDetector.for_topology(topology, spec.ejection)
            if spec.slow is not None:
                self.slow = SoftFailure(self.ids, spec.slow)
            caps = spec.spill
            if caps is not None:
                self.spill = SpillBudget(topology.regions, pair_rate_per_s=caps.pair_rate_per_s,
                                         pair_burst=caps.pair_burst, rescuer_rate_per_s=caps.rescuer_rate_per_s,
                                         rescuer_burst=caps.rescuer_burst)
        self.rollout = None
        self.pins: dict = {}  # session -> version: the pin a client echoes (x-geoserve-version)
        if scenario.canary is not None:
            c = scenario.canary
            self.rollout = Rollout(CanaryPlan(model="llama-70b", version=c.version, previous="v1", regions=c.regions,
                                              window_ms=c.window_s * 1000.0, min_requests=c.min_requests,
                                              max_error_rate=c.max_error_rate, max_p99_ttft_ms=c.max_p99_ttft_ms),
                                   topology)
            self.new_mask = np.array([rid in self.rollout.new_replicas for rid in self.ids])
            self.new_region = [self.rollout.new_replicas.get(rid) for rid in self.ids]

    def fold(self, columns):
        now = columns.now_ms
        changes = {}
        if self.health is not None:
            up = {rid: self.health.probe(rid, ok, now) for rid, ok in zip(self.ids, np.asarray(columns.healthy).tolist())}
            ejected = self.outliers.excluded(now, up)
            changes["healthy"] = np.array([up[rid] and rid not in ejected for rid in self.ids], dtype=bool)
            changes["regions_down"] = self.health.regions_down()
        if self.slow is not None and columns.tpot_ms is not None:
            expected = self.step_base + self.step_per_batch * np.maximum(1, np.asarray(columns.in_flight))
            changes["degraded"] = np.array([self.slow.observe(rid, step, want, now) for rid, step, want in zip(
                self.ids, np.asarray(columns.tpot_ms).tolist(), expected.tolist())], dtype=bool)
        if self.spill is not None:
            changes["spill"] = self.spill.allowances(now)
        if self.rollout is not None:
            self.rollout.tick(now)
            allowed = set(self.rollout.canary_regions)
            changes["draining"] = np.array([region is not None and region not in allowed for region in self.new_region])
        return msgspec.structs.replace(columns, **changes)

    def version_for(self, req) -> "str | None":
        if self.rollout is None:
            return None
        pinned = self.pins.get(req.session) if req.session is not None else None
        return self.rollout.version_for(self.home_region[req.origin], pinned)

    def _retry_over(self, req) -> None:
        if req.id in self.retrying:
            self.retrying.discard(req.id)
            self.retries.end_retry()

    def routed(self, req, d, now: float) -> None:
        if d.action == "shed" and self.retries is not None:
            self._retry_over(req)  # a retry that found nowhere to go ends here
        if d.replica is None or d.action == "queue":
            if d.action == "shed" and d.reason == "no_replica" and req.session is not None:
                self.pins.pop(req.session, None)  # its version is gone (rolled back): 503, the session starts over
            return
        if self.outliers is not None:
            self.outliers.sent(d.replica, now)
            self.retries.begin_request()
        if req.session is not None and self.rollout is not None:
            self.pins.setdefault(req.session, d.version)
        home = self.home_region[req.origin]
        if d.region != home:
            self.spilled.append((now, home, d.region))
            if self.spill is not None:
                self.spill.record_decision(d, home, now)

    def retry(self, req) -> bool:
        """Envoy's retry budget: retries in flight stay under a share of the requests
        in flight (never onto the same replica: the request carries ``tried``)."""
        if self.retries is None:
            return True
        if not self.retries.try_retry():
            return False
        self.retrying.add(req.id)
        return True

    def result(self, req, d, ok: bool, now: float, ttft_ms: float) -> None:
        if self.outliers is not None:
            self.outliers.record(d.replica, ok, now)
            self.retries.end_request()
            self._retry_over(req)  # this attempt is over (a further retry takes a new slot)
            if not ok:  # a failed request is a failed probe too (passive health checking)
                self.health.probe(d.replica, False, now)
        if self.rollout is not None:
            self.rollout.observe(d.region, d.version, ok, ttft_ms)


_HOLDS_A_REPLICA = frozenset(("serve", "overflow", "degrade"))


# ------------------------------------------------------------------ baselines
@register
class RandomPolicy(RoutingPolicy):
    name = "random"

    def choose(self, req, cands):
        return self.pick(req, cands[int(self.rng.integers(len(cands)))])


@register
class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.next = [0] * len(self.pools)

    def choose(self, req, cands):
        g = self.region_of[cands[0]]
        r = cands[self.next[g] % len(cands)]
        self.next[g] += 1
        return self.pick(req, r)


@register
class LeastRequest(RoutingPolicy):
    """Envoy ``least_request``: power of two choices on the router's own active requests."""

    name = "least_request_p2c"

    def choose(self, req, cands):
        return self.pick(req, self.p2c(cands, self.outstanding.__getitem__))


@register
class ConsistentHash(RoutingPolicy):
    """Hard affinity: the ring's home for the key, whatever its load."""

    name = "consistent_hash"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.ring = _Ring(self)

    def choose(self, req, cands):
        allowed = set(cands)
        for r in self.ring.walk(self.region_of[cands[0]], _key(req)):
            if r in allowed:
                return self.pick(req, r)
        return self.pick(req, -1)


@register
class BoundedConsistentHash(RoutingPolicy):
    """SGLang ``prefix_hash``: the ring's home unless its load > 1.25 x average, then clockwise."""

    name = "bounded_consistent_hash"
    factor = 1.25

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.ring = _Ring(self)

    def choose(self, req, cands):
        allowed = set(cands)
        load = self.outstanding
        average = sum(load[r] for r in cands) / len(cands)
        first = -1
        for r in self.ring.walk(self.region_of[cands[0]], _key(req)):
            if r in allowed:
                if first < 0:
                    first = r
                if load[r] <= self.factor * average:
                    return self.pick(req, r)
        return self.pick(req, first)


@register
class SGLangCacheAware(RoutingPolicy):
    """SGLang ``cache_aware`` (CLI defaults 64 / 1.5 / 0.3) on the router's own counts;
    its character radix tree is approximated by block hashes."""

    name = "sglang_cache_aware"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.index = PrefixIndex()

    def choose(self, req, cands):
        load = self.outstanding
        loads = [load[r] for r in cands]
        lo, hi = min(loads), max(loads)
        least = cands[loads.index(lo)]
        if hi - lo > 64 and hi > 1.5 * lo:
            return self._pick(req, least)
        matched = self.index.match(req.blocks)
        best, best_blocks = least, 0
        for r in cands:
            m = matched.get(r, 0)
            if m > best_blocks:
                best, best_blocks = r, m
        rate = best_blocks / len(req.prefix) if len(req.prefix) else 0.0
        return self._pick(req, best if rate > 0.3 else least)

    def _pick(self, req, r):
        self.index.insert(req.blocks, r)
        return self.pick(req, r)


@register
class LlmdScorer(RoutingPolicy):
    """llm-d endpoint picker: filters saturated endpoints, then 2*queue + 2*kv + 3*prefix.
    KV utilization is taken as slot utilization (the simulator does not track KV bytes)."""

    name = "llmd_scorer"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.index = PrefixIndex()

    def choose(self, req, cands):
        q = self.queue_depth
        kv = [self.in_flight[r] / self.slots[r] for r in cands]
        fresh = [r for r, k in zip(cands, kv) if max(q[r] / 5.0, k / 0.8) < 1.0]
        if not fresh:
            if req.priority != "interactive":  # sheddable (priority < 0): 429
                return ("shed", -1, 1000.0)
            fresh = cands
        qs = [q[r] for r in fresh]
        qmin, qmax = min(qs), max(qs)
        matched = self.index.match(req.blocks)
        total = max(1, len(req.prefix))
        best, best_score = fresh[0], -math.inf
        for r in fresh:
            queue_score = 1.0 if qmax == qmin else (qmax - q[r]) / (qmax - qmin)
            kv_score = 1.0 - self.in_flight[r] / self.slots[r]
            score = 2 * queue_score + 2 * kv_score + 3 * matched.get(r, 0) / total
            if score > best_score:
                best, best_score = r, score
        self.index.insert(req.blocks, best)
        return self.pick(req, best)


@register
class DynamoKV(RoutingPolicy):
    """NVIDIA Dynamo KV router, temperature 0: argmin prefill_scale * max(active prefill
    + prompt - overlap, 0) + decode blocks, in blocks, from the router's own bookkeeping."""

    name = "dynamo_kv"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.index = PrefixIndex()
        n = self.fleet.n_replicas
        self.prefill_blocks = [0] * n
        self.decode_blocks = [0] * n

    def choose(self, req, cands):
        matched = self.index.match(req.blocks)
        blocks = len(req.prefix)
        best, best_cost = cands[0], math.inf
        for r in cands:
            cost = max(self.prefill_blocks[r] + blocks - matched.get(r, 0), 0) + self.decode_blocks[r]
            if cost < best_cost:
                best, best_cost = r, cost
        self.index.insert(req.blocks, best)
        self.prefill_blocks[best] += blocks
        self.decode_blocks[best] += blocks + -(-req.output_tokens // req.block_tokens)
        return self.pick(req, best)

    def on_signals(self, columns, usable) -> None:
        super().on_signals(columns, usable)
        self.prefill_blocks = [0] * self.fleet.n_replicas  # a signal period later, routed prefills are done

    def complete(self, req, ok, now, ttft_ms):
        if req.replica >= 0:
            self.decode_blocks[req.replica] = max(0, self.decode_blocks[req.replica] - len(req.prefix) - -(-req.output_tokens // req.block_tokens))
        super().complete(req, ok, now, ttft_ms)


@register
class RayPrefix(RoutingPolicy):
    """Ray Serve LLM prefix-aware router: queue spread > 10 -> power of two; else the
    longest prefix match when the match rate >= 0.1; queue lengths are Ray's cache
    (the last signal plus what this router sent since)."""

    name = "ray_prefix"

    def __init__(self, sim) -> None:
        super().__init__(sim)
        self.index = PrefixIndex()
        self.since = [0] * self.fleet.n_replicas

    def on_signals(self, columns, usable) -> None:
        super().on_signals(columns, usable)
        self.since = [0] * self.fleet.n_replicas

    def _queue(self, r):
        return self.in_flight[r] + self.since[r]

    def choose(self, req, cands):
        queues = [self._queue(r) for r in cands]
        choice = -1
        if max(queues) - min(queues) <= 10 and len(req.prefix):
            matched = self.index.match(req.blocks)
            best, blocks = -1, 0
            for r in cands:
                if matched.get(r, 0) > blocks:
                    best, blocks = r, matched[r]
            if best >= 0 and blocks / len(req.prefix) >= 0.1:
                choice = best
        if choice < 0:
            choice = self.p2c(cands, self._queue)
        self.index.insert(req.blocks, choice)
        self.since[choice] += 1
        return self.pick(req, choice)


@register
class EnvoyPriority(RoutingPolicy):
    """Envoy priority failover, overprovisioning 1.4: the nearest region takes
    min(1, 1.4 x its healthy share) of the traffic, the rest spills to the next
    priority; least_request inside a priority. No cap on spill."""

    name = "envoy_priority"

    def route(self, req, now):
        left = 1.0
        u = self.rng.random()
        levels = self.by_distance[self.home(req)]
        for i, g in enumerate(levels):
            pool = self.pools[g]
            healthy = [r for r in pool if self.usable[r] and r not in req.tried]
            share = min(left, 1.4 * len(healthy) / len(pool)) if pool else 0.0
            if healthy and (u < share or i == len(levels) - 1):
                return self.pick(req, self.p2c(healthy, self.outstanding.__getitem__))
            u -= share
            left -= share
            if left <= 0:
                break
        cands = self.pool(req)  # all priorities unhealthy: panic to whatever is left
        return self.pick(req, self.p2c(cands, self.outstanding.__getitem__) if cands else -1)


@register
class NearestRegionOnly(RoutingPolicy):
    """GeoDNS to the nearest region and a local least-loaded balancer; never leaves it."""

    name = "nearest_region_only"

    def route(self, req, now):
        cands = self.candidates(self.home(req), req)
        if not cands:
            return self.pick(req, -1)
        return self.pick(req, min(cands, key=self.outstanding.__getitem__))
