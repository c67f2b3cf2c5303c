"""Circuit breakers and outlier ejection, with Envoy's semantics users already know.

Per replica, from the results of real requests:

* **closed** - traffic flows; ``consecutive_failures`` failures in a row (Envoy's
  consecutive_5xx: 5), or a failure share of at least ``error_rate`` over the last
  ``window`` results (at least ``min_requests`` of them), open it;
* **open** (ejected) - no traffic for ``base_ejection_ms x times ejected`` (Envoy:
  30 s x n), so a replica that keeps failing stays out longer each time;
* **half-open** - then ``half_open_probes`` requests are let through; a success
  closes the breaker, a failure opens it again (n + 1).

Ejection is bounded: at most ``max_ejection_share`` of a region's replicas are
ejected at once (Envoy's max_ejection_percent: 10 %, at least one host); a breaker
that would trip past the cap stays closed. **Panic**: when fewer than
``panic_threshold`` of a region's replicas are routable (Envoy's default 50 %),
ejections are ignored in that region - better to spread over all than to pile onto
the few left.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

import msgspec

from ..types import Signals

__all__ = ["EjectionPolicy", "OutlierDetector", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class EjectionPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    consecutive_failures: int = 5
    error_rate: float = 0.5
    window: int = 20
    min_requests: int = 10
    base_ejection_ms: float = 30_000.0
    max_ejection_share: float = 0.10
    half_open_probes: int = 1
    panic_threshold: float = 0.5


class _Breaker:
    __slots__ = ("state", "consecutive", "times_ejected", "open_until", "probes", "recent")

    def __init__(self, window: int) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.times_ejected = 0
        self.open_until = 0.0
        self.probes = 0
        self.recent: deque = deque(maxlen=window)


class OutlierDetector:
    def __init__(self, replicas_by_region: dict[str, Iterable[str]], policy: EjectionPolicy = EjectionPolicy()) -> None:
        self.policy = policy
        self.region_of = {rid: region for region, ids in replicas_by_region.items() for rid in ids}
        self.members = {region: list(ids) for region, ids in replicas_by_region.items()}
        self.breakers = {rid: _Breaker(policy.window) for rid in self.region_of}
        self.ejections = 0  # counter: how often a breaker opened
        self.panicking: set[str] = set()  # regions in panic at the last excluded()

    @classmethod
    def for_topology(cls, topology, policy: EjectionPolicy = EjectionPolicy()) -> "OutlierDetector":
        return cls(topology.replicas_by_region(), policy)

    # ---- the clock
    def _advance(self, b: _Breaker, now_ms: float) -> None:
        if b.state == OPEN and now_ms >= b.open_until:
            b.state = HALF_OPEN
            b.probes = 0

    def state(self, replica: str, now_ms: float) -> str:
        b = self.breakers[replica]
        self._advance(b, now_ms)
        return b.state

    # ---- results of real requests
    def sent(self, replica: str, now_ms: float) -> None:
        """A request went to ``replica`` (half-open breakers count their probes)."""
        b = self.breakers[replica]
        self._advance(b, now_ms)
        if b.state == HALF_OPEN:
            b.probes += 1

    def record(self, replica: str, ok: bool, now_ms: float) -> str:
        b = self.breakers[replica]
        self._advance(b, now_ms)
        b.recent.append(ok)
        if ok:
            b.consecutive = 0
            if b.state == HALF_OPEN:
                b.state = CLOSED
                b.recent.clear()
            return b.state
        b.consecutive += 1
        if b.state == HALF_OPEN:
            self._open(b, now_ms)
        elif b.state == CLOSED and self._tripped(b) and self._room_to_eject(replica, now_ms):
            self._open(b, now_ms)
        return b.state

    def _tripped(self, b: _Breaker) -> bool:
        p = self.policy
        if b.consecutive >= p.consecutive_failures:
            return True
        n = len(b.recent)
        return n >= p.min_requests and (n - sum(b.recent)) / n >= p.error_rate

    def _room_to_eject(self, replica: str, now_ms: float) -> bool:
        members = self.members[self.region_of[replica]]
        cap = max(1, math.floor(self.policy.max_ejection_share * len(members)))
        return sum(1 for rid in members if self.state(rid, now_ms) != CLOSED) < cap

    def _open(self, b: _Breaker, now_ms: float) -> None:
        b.times_ejected += 1
        b.state = OPEN
        b.open_until = now_ms + self.policy.base_ejection_ms * b.times_ejected
        b.consecutive = 0
        b.probes = 0
        b.recent.clear()
        self.ejections += 1

    # ---- what routing sees
    def excluded(self, now_ms: float, healthy: dict[str, bool] | None = None) -> set[str]:
        """Replicas to keep out of the next snapshot: open breakers and half-open ones
        whose probes are all out - except in regions in panic (``self.panicking``)."""
        out: set[str] = set()
        self.panicking: set[str] = set()
        for region, members in self.members.items():
            region_out = []
            for rid in members:
                b = self.breakers[rid]
                self._advance(b, now_ms)
                if b.state == OPEN or (b.state == HALF_OPEN and b.probes >= self.policy.half_open_probes):
                    region_out.append(rid)
            usable = sum(1 for rid in members if rid not in region_out and (healthy is None or healthy.get(rid, True)))
            if members and usable / len(members) < self.policy.panic_threshold:
                self.panicking.add(region)  # ignore ejections here: spread over all
                continue
            out.update(region_out)
        return out

    def apply(self, signals: Signals, now_ms: float) -> Signals:
        """The update with ejected replicas marked unhealthy."""
        healthy = {s.replica: s.healthy for s in signals.replicas}
        out = self.excluded(now_ms, healthy)
        if not out:
            return signals
        replicas = tuple(msgspec.structs.replace(s, healthy=False) if s.replica in out else s for s in signals.replicas)
        return msgspec.structs.replace(signals, replicas=replicas)
