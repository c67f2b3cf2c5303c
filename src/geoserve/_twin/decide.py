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
from ..state import EWMA_WEIGHT, PROBE, WAYS

INF = math.inf
_OK = 0
_DEGRADED = 5  # snapshot.DEGRADED: usable, but only when no healthy replica will do


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
    owners, stamps = state.prefix_owner[slot], state.prefix_stamp[slot]
    free = -1
    oldest = 0
    for w in range(WAYS):
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
            newest = int(stamps[slot].max())
            if victim < 0 or newest < victim_stamp:
                victim, victim_stamp = slot, newest
        if not placed:
            keys[victim] = key
            owners[victim] = -1
            stamps[victim] = 0
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
        for w in range(WAYS):
            r = int(owners[slot, w])
            if first <= r < last and matched.get(r, 0) == i:
                matched[r] = i + 1
                advanced = True
        if not advanced:
            break
    return matched


# ---------------------------------------------------------------- the decision
class _Pick:
    """What choosing among one model's replicas found."""

    __slots__ = ("action", "reason", "replica", "split", "budget", "cached", "fallbacks", "wait_replica", "wait_ms", "wait_load")

    def __init__(self) -> None:
        self.action = -1
        self.reason = -1
        self.replica = -1
        self.split = (0.0, 0.0, 0.0, 0.0, 0.0)
        self.budget = 0.0
        self.cached = 0
        self.fallbacks: list[int] = []
        self.wait_replica = -1
        self.wait_ms = INF
        self.wait_load = 0


class _Group:
    """A scan of one (model, region) group: its load and its best admitted replica."""

    __slots__ = ("region", "load_sum", "slot_sum", "n_ok", "best", "best_ttft")

    def __init__(self, region: int) -> None:
        self.region = region
        self.load_sum = 0
        self.slot_sum = 0
        self.n_ok = 0
        self.best = -1
        self.best_ttft = INF


class _Model:
    """The decision's work over the replicas of one model."""

    def __init__(self, snap, state, req, model: int, version: int) -> None:
        f = snap.fleet
        self.snap, self.state, self.f, self.req = snap, state, f, req
        self.model, self.version = model, version
        self.first = int(f.model_start[model])
        self.last = int(f.model_start[model + 1])
        self.live = state.epoch == snap.epoch
        self.healthy_only = False
        self.matched = prefix_match(state, req.prefix, self.first, self.last)

    def group_range(self, region: int) -> tuple[int, int]:
        g = self.model * self.f.n_regions + region
        return int(self.f.group_start[g]), int(self.f.group_start[g + 1])

    def pending(self, r: int) -> int:
        return int(self.state.pending[r]) if self.live else 0

    def pending_prefill(self, r: int) -> float:
        return float(self.state.pending_prefill_ms[r]) if self.live else 0.0

    def load(self, r: int) -> int:
        return int(self.snap.in_flight[r]) + self.pending(r)

    def candidate(self, r: int) -> bool:
        s, f = self.snap, self.f
        status = s.status[r]
        if not (status == _OK or (status == _DEGRADED and not self.healthy_only)) or not s.region_up[f.replica_region[r]]:
            return False
        if self.version >= 0 and f.replica_version[r] != self.version:
            return False
        return r not in self.req.exclude

    def admitted(self, r: int) -> bool:
        return self.load(r) < self.req.ceiling * int(self.f.decode_slots[r])

    def has_candidate(self) -> bool:
        return any(self.candidate(r) for r in range(self.first, self.last))

    def predict(self, r: int, load: int) -> tuple[float, float, float, float, float, int]:
        """(network, queue, prefill, decode, ttft, cached tokens) at a given load."""
        s, f, req = self.snap, self.f, self.req
        slots = int(f.decode_slots[r])
        network = float(f.rtt_ms[req.origin, f.replica_region[r]])
        # behind: what was waiting at the snapshot (a slot departure each when the slots
        # are full, else a prefill each: the queue is then prefill backlog), the
        # departures it needs itself, and the prefills this router sent there since
        slot_ms = float(s.slot_ms[r])
        ewma = float(self.state.prefill_ewma_ms[r])
        each = slot_ms if (int(s.in_flight[r]) >= slots or math.isnan(ewma)) else ewma
        queue = max(int(s.queue_depth[r]) * each + self.pending_prefill(r), float(self.state.prefill_until_ms[r]) - s.now_ms)
        queue += max(0, load + 1 - slots) * slot_ms
        cached = min(self.matched.get(r, 0) * req.block_tokens, req.prompt_tokens)
        prefill = float(f.prefill_base_ms[r]) + float(s.prefill_ms_per_token[r]) * (req.prompt_tokens - cached)
        decode = float(s.tpot_base_ms[r]) + float(s.tpot_ms_per_batch[r]) * min(load + 1, slots)
        return network, queue, prefill, decode, network + queue + prefill + decode, cached

    def ttft(self, r: int) -> float:
        return self.predict(r, self.load(r))[4]

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

    def under_bound(self, r: int, group: _Group) -> bool:
        capacity = math.ceil(self.f.policy.load_bound * (group.load_sum + 1) / group.n_ok)
        return self.load(r) + 1 <= capacity

    def affinity(self, group: _Group, budget: float) -> int:
        """The ring home in this group, if under its bound and within ``budget``; else -1."""
        if not self.req.has_key:
            return -1
        r = self.ring_home(group.region)
        if r >= 0 and self.under_bound(r, group) and self.ttft(r) <= budget:
            return r
        return -1

    def scan_load(self, group: _Group) -> None:
        """The group's load over its usable replicas (status ok or degraded, region up)."""
        s, f = self.snap, self.f
        if not s.region_up[group.region]:
            return
        lo, hi = self.group_range(group.region)
        for r in range(lo, hi):
            if s.status[r] == _OK or s.status[r] == _DEGRADED:
                group.load_sum += self.load(r)
                group.slot_sum += int(f.decode_slots[r])
                group.n_ok += 1

    def scan_home(self, group: _Group, b_cross: float, pick: _Pick, ranked: list) -> None:
        """Best admitted home replica, the retry list, and the soonest admission wait."""
        f = self.f
        lo, hi = self.group_range(group.region)
        for r in range(lo, hi):
            if not self.candidate(r):
                continue
            load = self.load(r)
            slots = int(f.decode_slots[r])
            if not load < self.req.ceiling * slots:
                # departures needed before this class is admitted here
                k = math.floor(load - self.req.ceiling * slots) + 1
                wait = k * float(self.snap.slot_ms[r])
                if wait < pick.wait_ms:
                    pick.wait_ms, pick.wait_replica, pick.wait_load = wait, r, load - k
                continue
            ttft = self.predict(r, load)[4]
            if ttft < group.best_ttft:
                group.best_ttft, group.best = ttft, r
            if ttft <= b_cross:
                _rank(ranked, ttft, r, self.f.policy.max_fallbacks + 1)

    def scan_remote(self, group: _Group, b_cross: float, ranked) -> None:
        """Best admitted replica within ``b_cross`` (and the retry list when asked)."""
        lo, hi = self.group_range(group.region)
        for r in range(lo, hi):
            if not (self.candidate(r) and self.admitted(r)):
                continue
            ttft = self.ttft(r)
            if ttft > b_cross:
                continue
            if ttft < group.best_ttft:
                group.best_ttft, group.best = ttft, r
            if ranked is not None:
                _rank(ranked, ttft, r, self.f.policy.max_fallbacks + 1)

    def accepts_spill(self, group: _Group) -> bool:
        s, st, f = self.snap, self.state, self.f
        home, n_regions = self.req.home, f.n_regions
        if group.slot_sum == 0 or not group.load_sum < f.policy.spill_ceiling * group.slot_sum:
            return False
        pair = float(s.spill_pair[home * n_regions + group.region])
        total = float(s.spill_total[group.region])
        if self.live:
            pair -= int(st.spill_pair[home * n_regions + group.region])
            total -= int(st.spill_total[group.region])
        need = self.req.spill_need  # one token, above the class's reserve for the classes above it
        return pair >= need and total >= need

    def choose(self, b_local: float, b_cross: float) -> _Pick:
        """Envoy's degraded hosts: replicas in soft failure are candidates only when
        no healthy one will do (a second pass over all of them)."""
        self.healthy_only = self.snap.any_degraded
        pick = self._choose(b_local, b_cross)
        if pick.replica < 0 and self.healthy_only:
            self.healthy_only = False
            pick = self._choose(b_local, b_cross)
        return pick

    def _choose(self, b_local: float, b_cross: float) -> _Pick:
        f, req = self.f, self.req
        pick = _Pick()
        home = _Group(req.home)
        ranked: list[tuple[float, int]] = []  # (ttft, replica) best first, at most max_fallbacks + 1
        self.scan_load(home)
        self.scan_home(home, b_cross, pick, ranked)

        # Home region: the affinity home while under its bound, else the fastest.
        chosen, action, budget = self.affinity(home, b_local), SERVE, b_local
        reason = R_AFFINITY
        if chosen < 0 and home.best >= 0 and home.best_ttft <= b_local:
            chosen, reason = home.best, R_LEAST_TTFT
        # Overflow: the remote region with the lowest predicted TTFT within budget.
        if chosen < 0:
            target = None
            for g in range(f.n_regions):
                if g == req.home:
                    continue
                group = _Group(g)
                self.scan_load(group)
                if not self.accepts_spill(group):
                    continue
                self.scan_remote(group, b_cross, None)
                if group.best < 0:
                    continue
                if target is None or group.best_ttft < target.best_ttft or (
                    group.best_ttft == target.best_ttft and f.rtt_ms[req.origin, g] < f.rtt_ms[req.origin, target.region]
                ):
                    target = group
            if target is not None:
                chosen, action, reason, budget = self.affinity(target, b_cross), OVERFLOW, R_SPILL_AFFINITY, b_cross
                if chosen < 0:
                    chosen, reason = target.best, R_SPILL_LEAST_TTFT
                ranked = []
                self.scan_remote(_Group(target.region), b_cross, ranked)
        # Within the user-facing SLA at home, outside the routing target.
        if chosen < 0 and home.best >= 0 and home.best_ttft <= b_cross:
            chosen, action, reason, budget = home.best, SERVE, R_LOCAL_DEGRADED, b_cross

        if chosen >= 0:
            network, queue, prefill, decode, ttft, cached = self.predict(chosen, self.load(chosen))
            pick.action, pick.reason, pick.replica, pick.budget = action, reason, chosen, budget
            pick.split = (network, queue, prefill, decode, ttft)
            pick.cached = cached
            pick.fallbacks = [r for _, r in ranked if r != chosen][: f.policy.max_fallbacks]
        return pick

    def budgets(self) -> tuple[float, float]:
        """Local and cross-region TTFT budgets, stretched for long prompts, less time waited."""
        b_local, b_cross = self.f.budgets(self.model, self.req.priority, self.req.prompt_tokens)
        return b_local - self.req.waited_ms, b_cross - self.req.waited_ms


def _rank(ranked: list, ttft: float, r: int, keep: int) -> None:
    """Insert (ttft, r) keeping the list sorted by ttft, stable, at most ``keep`` long."""
    at = len(ranked)
    while at > 0 and ranked[at - 1][0] > ttft:
        at -= 1
    if at < keep:
        ranked.insert(at, (ttft, r))
        del ranked[keep:]


class Req:
    """A request resolved to indices (what the kernel receives)."""

    __slots__ = (
        "origin", "home", "priority", "prompt_tokens", "ring_key", "has_key", "prefix", "block_tokens",
        "exclude", "waited_ms", "local_budget", "cross_budget", "ceiling", "spill_need",
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
        self.spill_need = 1.0 + float(fleet.class_spill_reserve[priority])


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
    small = None
    if fallback >= 0:
        small = _Model(snap, state, req, fallback, -1)
        fb_local, fb_cross = small.budgets()
        alt = small.choose(fb_local, fb_cross)
        if alt.replica >= 0:
            return _result(DEGRADE, R_FALLBACK_MODEL, fallback, alt)

    shed = _Pick()
    shed.budget = b_cross
    if not (main.has_candidate() or (small is not None and small.has_candidate())):
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


# ------------------------------------------------------------ route / complete
def record(snap, state, action: int, replica: int, origin: int, prefix, prefill_ms: float) -> None:
    """What route() remembers of a decision made against ``snap``."""
    f = snap.fleet
    home = int(f.home[origin])
    if action in (SERVE, OVERFLOW, DEGRADE):
        prefix_record(state, prefix, replica)
        ewma = float(state.prefill_ewma_ms[replica])
        state.prefill_ewma_ms[replica] = prefill_ms if math.isnan(ewma) else ewma + (prefill_ms - ewma) * EWMA_WEIGHT
        until = float(state.prefill_until_ms[replica])
        state.prefill_until_ms[replica] = (until if until > snap.now_ms else snap.now_ms) + prefill_ms
        if snap.epoch == state.epoch:  # a late caller's stale snapshot counts nothing
            state.pending[replica] += 1
            state.pending_prefill_ms[replica] += prefill_ms
            region = int(f.replica_region[replica])
            if region != home:
                state.spill_pair[home * f.n_regions + region] += 1
                state.spill_total[region] += 1
    elif action == QUEUE:
        state.queued[home] += 1


def release(state, action: int, replica: int, epoch: int, home: int, prefill_ms: float) -> None:
    """What complete() gives back: its prefill from ``prefill_until_ms``, the
    in-flight count and its prefill (same epoch only), or the queue slot."""
    if action in (SERVE, OVERFLOW, DEGRADE):
        if replica >= 0:  # done: its prefill is no longer ahead of anything (whatever the epoch)
            state.prefill_until_ms[replica] = float(state.prefill_until_ms[replica]) - prefill_ms
        if replica >= 0 and epoch == state.epoch and state.pending[replica] > 0:
            state.pending[replica] -= 1
            left = float(state.pending_prefill_ms[replica]) - prefill_ms
            state.pending_prefill_ms[replica] = left if left > 0.0 else 0.0
    elif action == QUEUE:
        if state.queued[home] > 0:
            state.queued[home] -= 1
