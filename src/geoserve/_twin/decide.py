"""The routing decision, in plain Python: the reference the Cython kernel must match.

One request against one snapshot and one router state (read only):

1. candidates - replicas of the model that are ``ok`` (healthy, not draining, not
   stale), in a region that is up, of the pinned version if any, not excluded;
   a candidate is *admitted* for the priority class while its slot utilization
   ``(in_flight + pending) / slots`` is below the class's ceiling;
2. prediction - TTFT = RTT(origin, region) + queue wait + prefill of the prompt
   tokens the prefix index says are not cached there + one decode step;
3. soft affinity - the ring key picks a home replica on the (model, region) ring
   (the first admitted candidate clockwise); it wins while under its bounded-load
   capacity ``ceil(c * (region load + 1) / replicas)`` (Mirrokni, Thorup,
   Zadimoghaddam, SODA'18) and within budget; otherwise the lowest predicted TTFT
   wins (ties: lowest replica index);
4. budget - stay home when a local replica meets the local budget; else overflow to
   the remote region with the lowest predicted TTFT (ties: nearer, then lower index)
   that fits the cross-region budget, is below the spill ceiling and has spill
   allowance left; else serve locally within the cross-region budget
   (``local_degraded``);
5. admission - queue (caller waits ``retry_after_ms``) when a local replica will
   admit the class soon enough to fit the budget and the region's queue bound holds;
   else degrade to the fallback model when it can serve; else shed.

Every line here has a twin line in ``geoserve/_core/decide.pyx``; float expressions
are written in the same order so that both give bit-identical results.
"""

from __future__ import annotations

import math

from .._codes import (
    DEGRADE,
    OVERFLOW,
    QUEUE,
    R_AFFINITY,
    R_FALLBACK_MODEL,
    R_LEAST_TTFT,
    R_LOCAL_DEGRADED,
    R_NO_REPLICA,
    R_OVER_BUDGET,
    R_QUEUE_FULL,
    R_SPILL_AFFINITY,
    R_SPILL_LEAST_TTFT,
    R_WAIT_FOR_SLOT,
    SERVE,
    SHED,
)
from .._hashing import mix64
from ..state import PROBE, WAYS

INF = math.inf
_OK = 0


# ---------------------------------------------------------------- prefix index
def _slot_key(block_hash: int) -> int:
    # 0 marks an empty slot, so the (one in 2**64) zero hash is stored as 1.
    return block_hash if block_hash != 0 else 1


def prefix_find(state, block_hash: int) -> int:
    """The slot holding ``block_hash``, or -1."""
    keys = state.prefix_keys
    mask = len(keys) - 1
    key = _slot_key(block_hash)
    base = mix64(key) & mask
    for p in range(PROBE):
        slot = (base + p) & mask
        k = int(keys[slot])
        if k == key:
            return slot
        if k == 0:
            return -1
    return -1


def _add_owner(state, slot: int, replica: int, stamp: int) -> None:
    owners, stamps = state.prefix_owner, state.prefix_stamp
    first = slot * WAYS
    free = -1
    oldest = first
    for w in range(first, first + WAYS):
        o = owners[w]
        if o == replica:
            stamps[w] = stamp
            return
        if o < 0:
            if free < 0:
                free = w
        elif stamps[w] < stamps[oldest]:
            oldest = w
    way = free if free >= 0 else oldest
    owners[way] = replica
    stamps[way] = stamp


def prefix_record(state, prefix, replica: int) -> None:
    """Remember that ``replica`` was sent every block of ``prefix`` (one clock tick)."""
    keys, owners, stamps = state.prefix_keys, state.prefix_owner, state.prefix_stamp
    mask = len(keys) - 1
    state.clock[0] += 1
    stamp = int(state.clock[0])
    for h in prefix:
        key = _slot_key(int(h))
        base = mix64(key) & mask
        victim, victim_stamp = -1, -1
        placed = False
        for p in range(PROBE):
            slot = (base + p) & mask
            k = int(keys[slot])
            if k == key or k == 0:
                keys[slot] = key
                _add_owner(state, slot, replica, stamp)
                placed = True
                break
            newest = int(max(stamps[slot * WAYS : slot * WAYS + WAYS]))
            if victim < 0 or newest < victim_stamp:
                victim, victim_stamp = slot, newest
        if not placed:
            keys[victim] = key
            owners[victim * WAYS : victim * WAYS + WAYS] = -1
            stamps[victim * WAYS : victim * WAYS + WAYS] = 0
            _add_owner(state, victim, replica, stamp)


def prefix_match(state, prefix, first: int, last: int) -> dict[int, int]:
    """Replica -> leading blocks of ``prefix`` it was sent, for replicas in [first, last)."""
    matched: dict[int, int] = {}
    owners = state.prefix_owner
    for i, h in enumerate(prefix):
        slot = prefix_find(state, int(h))
        if slot < 0:
            break
        advanced = False
        for w in range(slot * WAYS, slot * WAYS + WAYS):
            r = int(owners[w])
            if first <= r < last and matched.get(r, 0) == i:
                matched[r] = i + 1
                advanced = True
        if not advanced:
            break
    return matched


# ---------------------------------------------------------------- the decision
class _Pick:
    """What choosing among one model's replicas found."""

    __slots__ = ("action", "reason", "replica", "split", "budget", "cached", "fallbacks", "any_candidate", "wait_replica", "wait_ms", "wait_load")

    def __init__(self) -> None:
        self.action = -1
        self.reason = -1
        self.replica = -1
        self.split = (0.0, 0.0, 0.0, 0.0, 0.0)
        self.budget = 0.0
        self.cached = 0
        self.fallbacks: list[int] = []
        self.any_candidate = False
        self.wait_replica = -1
        self.wait_ms = INF
        self.wait_load = 0


class _Model:
    """One pass of the decision over the replicas of one model."""

    def __init__(self, snap, state, req, model: int, version: int) -> None:
        f = snap.fleet
        self.snap, self.state, self.f, self.req = snap, state, f, req
        self.model, self.version = model, version
        self.first = int(f.model_start[model])
        self.last = int(f.model_start[model + 1])
        self.live = state.epoch == snap.epoch
        self.matched = prefix_match(state, req.prefix, self.first, self.last)

    def pending(self, r: int) -> int:
        return int(self.state.pending[r]) if self.live else 0

    def load(self, r: int) -> int:
        return int(self.snap.in_flight[r]) + self.pending(r)

    def candidate(self, r: int) -> bool:
        s, f = self.snap, self.f
        if s.status[r] != _OK or not s.region_up[f.replica_region[r]]:
            return False
        if self.version >= 0 and f.replica_version[r] != self.version:
            return False
        return r not in self.req.exclude

    def admitted(self, r: int) -> bool:
        return self.load(r) < self.req.ceiling * int(self.f.decode_slots[r])

    def predict(self, r: int, load: int) -> tuple[float, float, float, float, float, int]:
        """(network, queue, prefill, decode, ttft, cached tokens) at a given load."""
        s, f, req = self.snap, self.f, self.req
        slots = int(f.decode_slots[r])
        network = float(f.rtt_ms[req.origin, f.replica_region[r]])
        queue = (int(s.queue_depth[r]) + max(0, load + 1 - slots)) * float(s.service_ms[r]) / slots
        cached = min(self.matched.get(r, 0) * req.block_tokens, req.prompt_tokens)
        prefill = float(f.prefill_base_ms[r]) + float(s.prefill_ms_per_token[r]) * (req.prompt_tokens - cached)
        decode = float(s.tpot_base_ms[r]) + float(s.tpot_ms_per_batch[r]) * min(load + 1, slots)
        return network, queue, prefill, decode, network + queue + prefill + decode, cached

    def ring_home(self, region: int) -> int:
        """First admitted candidate clockwise from the key on the (model, region) ring."""
        f = self.f
        g = self.model * f.n_regions + region
        start, end = int(f.ring_start[g]), int(f.ring_start[g + 1])
        size = end - start
        if size == 0:
            return -1
        pos = mix64(self.req.ring_key)
        # first point >= pos (lower bound), wrapping past the end
        lo, hi = start, end
        while lo < hi:
            mid = (lo + hi) // 2
            if int(f.ring_points[mid]) < pos:
                lo = mid + 1
            else:
                hi = mid
        at = lo - start
        for step in range(size):
            r = int(f.ring_owner[start + (at + step) % size])
            if self.candidate(r) and self.admitted(r):
                return r
        return -1

    def choose(self, b_local: float, b_cross: float) -> _Pick:
        s, st, f, req = self.snap, self.state, self.f, self.req
        n_regions = f.n_regions
        home = req.home
        pick = _Pick()

        # Pass 1: each region's load over its usable replicas of this model.
        load_sum = [0] * n_regions
        slot_sum = [0] * n_regions
        n_ok = [0] * n_regions
        for r in range(self.first, self.last):
            g = int(f.replica_region[r])
            if s.status[r] != _OK or not s.region_up[g]:
                continue
            load_sum[g] += self.load(r)
            slot_sum[g] += int(f.decode_slots[r])
            n_ok[g] += 1
        accepts = [False] * n_regions
        for g in range(n_regions):
            if g == home or slot_sum[g] == 0:
                continue
            if not load_sum[g] < f.policy.spill_ceiling * slot_sum[g]:
                continue
            pair = float(s.spill_pair[home * n_regions + g])
            total = float(s.spill_total[g])
            if self.live:
                pair -= int(st.spill_pair[home * n_regions + g])
                total -= int(st.spill_total[g])
            accepts[g] = pair >= 1.0 and total >= 1.0

        # Pass 2: predictions, the best replica per region, the retry list.
        best = [-1] * n_regions
        best_ttft = [INF] * n_regions
        ttft_of: dict[int, float] = {}
        ranked: list[tuple[float, int]] = []  # (ttft, replica), best first, at most max_fallbacks + 1
        keep = f.policy.max_fallbacks + 1
        for r in range(self.first, self.last):
            if not self.candidate(r):
                continue
            pick.any_candidate = True
            g = int(f.replica_region[r])
            load = self.load(r)
            slots = int(f.decode_slots[r])
            if not load < req.ceiling * slots:
                if g == home:
                    # departures needed before this class is admitted here
                    k = math.floor(load - req.ceiling * slots) + 1
                    wait = k * float(s.service_ms[r]) / slots
                    if wait < pick.wait_ms:
                        pick.wait_ms, pick.wait_replica, pick.wait_load = wait, r, load - k
                continue
            ttft = self.predict(r, load)[4]
            ttft_of[r] = ttft
            if g == home:
                eligible = ttft <= b_cross
            else:
                eligible = accepts[g] and ttft <= b_cross
            if (g == home or eligible) and ttft < best_ttft[g]:
                best_ttft[g], best[g] = ttft, r
            if eligible:
                at = len(ranked)
                while at > 0 and ranked[at - 1][0] > ttft:
                    at -= 1
                if at < keep:
                    ranked.insert(at, (ttft, r))
                    del ranked[keep:]

        chosen, action, reason, budget = -1, -1, -1, 0.0
        # Home region: the affinity home while under its bound, else the fastest.
        if req.has_key:
            r = self.ring_home(home)
            if r >= 0 and self._under_bound(r, load_sum[home], n_ok[home]) and ttft_of[r] <= b_local:
                chosen, action, reason, budget = r, SERVE, R_AFFINITY, b_local
        if chosen < 0 and best[home] >= 0 and best_ttft[home] <= b_local:
            chosen, action, reason, budget = best[home], SERVE, R_LEAST_TTFT, b_local
        # Overflow: the remote region with the lowest predicted TTFT within budget.
        if chosen < 0:
            target = -1
            for g in range(n_regions):
                if g == home or best[g] < 0:
                    continue
                if target < 0 or best_ttft[g] < best_ttft[target] or (
                    best_ttft[g] == best_ttft[target] and f.rtt_ms[req.origin, g] < f.rtt_ms[req.origin, target]
                ):
                    target = g
            if target >= 0:
                chosen, action, reason, budget = best[target], OVERFLOW, R_SPILL_LEAST_TTFT, b_cross
                if req.has_key:
                    r = self.ring_home(target)
                    if r >= 0 and self._under_bound(r, load_sum[target], n_ok[target]) and ttft_of[r] <= b_cross:
                        chosen, reason = r, R_SPILL_AFFINITY
        # Within the user-facing SLA at home, outside the routing target.
        if chosen < 0 and best[home] >= 0 and best_ttft[home] <= b_cross:
            chosen, action, reason, budget = best[home], SERVE, R_LOCAL_DEGRADED, b_cross

        if chosen >= 0:
            network, queue, prefill, decode, ttft, cached = self.predict(chosen, self.load(chosen))
            pick.action, pick.reason, pick.replica, pick.budget = action, reason, chosen, budget
            pick.split = (network, queue, prefill, decode, ttft)
            pick.cached = cached
            pick.fallbacks = [r for _, r in ranked if r != chosen][: f.policy.max_fallbacks]
        return pick

    def _under_bound(self, r: int, region_load: int, region_replicas: int) -> bool:
        capacity = math.ceil(self.f.policy.load_bound * (region_load + 1) / region_replicas)
        return self.load(r) + 1 <= capacity

    def budgets(self) -> tuple[float, float]:
        """Local and cross-region TTFT budgets, stretched for long prompts, less time waited."""
        f, req = self.f, self.req
        share = f.policy.inference_share_ms
        cold = float(f.model_prefill_base_ms[self.model]) + float(f.model_prefill_ms_per_token[self.model]) * req.prompt_tokens
        local, cross = req.local_budget, req.cross_budget
        stretched_local = cold + (local - share)
        stretched_cross = cold + (cross - share)
        b_local = (local if local >= stretched_local else stretched_local) - req.waited_ms
        b_cross = (cross if cross >= stretched_cross else stretched_cross) - req.waited_ms
        return b_local, b_cross


class Req:
    """A request resolved to indices (what the kernel receives)."""

    __slots__ = (
        "origin", "home", "priority", "prompt_tokens", "ring_key", "has_key", "prefix", "block_tokens",
        "exclude", "waited_ms", "local_budget", "cross_budget", "ceiling",
    )

    def __init__(self, fleet, origin, priority, prompt_tokens, ring_key, has_key, prefix, block_tokens, exclude, waited_ms):
        self.origin = origin
        self.home = int(fleet.home[origin])
        self.priority = priority
        self.prompt_tokens = prompt_tokens
        self.ring_key = ring_key
        self.has_key = has_key
        self.prefix = prefix
        self.block_tokens = block_tokens
        self.exclude = set(int(x) for x in exclude)
        self.waited_ms = waited_ms
        self.local_budget = float(fleet.class_local_budget_ms[priority])
        self.cross_budget = float(fleet.class_cross_budget_ms[priority])
        self.ceiling = float(fleet.class_slot_ceiling[priority])


def decide(snap, state, model, version, origin, priority, prompt_tokens, ring_key, has_key, prefix, block_tokens, exclude, waited_ms):
    """The decision as a tuple; see ``geoserve._compat`` for its fields."""
    f = snap.fleet
    req = Req(f, origin, priority, prompt_tokens, ring_key, has_key, prefix, block_tokens, exclude, waited_ms)
    main = _Model(snap, state, req, model, version)
    b_local, b_cross = main.budgets()
    pick = main.choose(b_local, b_cross)
    if pick.replica >= 0:
        return _result(pick.action, pick.reason, model, pick)

    # Queue: a home replica will admit this class soon enough for the budget.
    queue_full = False
    r = pick.wait_replica
    if r >= 0:
        network, queue, prefill, decode, _, cached = main.predict(r, pick.wait_load)
        queue = pick.wait_ms + queue
        ttft = network + queue + prefill + decode
        if ttft <= b_cross:
            if int(state.queued[req.home]) < int(f.region_slots[req.home]):
                out = _Pick()
                out.replica, out.budget, out.cached = r, b_cross, cached
                out.split = (network, queue, prefill, decode, ttft)
                return _result(QUEUE, R_WAIT_FOR_SLOT, model, out, retry_after=_retry(f, pick.wait_ms))
            queue_full = True

    # Degrade: the fallback model, any version, when it can serve now.
    fallback = int(f.fallback_model[model])
    any_candidate = pick.any_candidate
    if fallback >= 0:
        small = _Model(snap, state, req, fallback, -1)
        fb_local, fb_cross = small.budgets()
        alt = small.choose(fb_local, fb_cross)
        any_candidate = any_candidate or alt.any_candidate
        if alt.replica >= 0:
            return _result(DEGRADE, R_FALLBACK_MODEL, fallback, alt)

    shed = _Pick()
    shed.budget = b_cross
    if not any_candidate:
        reason = R_NO_REPLICA
    elif queue_full:
        reason = R_QUEUE_FULL
    else:
        reason = R_OVER_BUDGET
    wait = pick.wait_ms if pick.wait_replica >= 0 else float(f.policy.default_retry_after_ms)
    return _result(SHED, reason, model, shed, retry_after=_retry(f, wait))


def _retry(f, wait_ms: float) -> int:
    ms = math.ceil(wait_ms)
    return ms if ms > f.policy.min_retry_after_ms else f.policy.min_retry_after_ms


def _result(action, reason, model, pick, retry_after=-1):
    network, queue, prefill, decode, ttft = pick.split
    return (
        action, reason, model, pick.replica, tuple(pick.fallbacks),
        network, queue, prefill, decode, ttft, pick.budget, pick.cached, retry_after,
    )
