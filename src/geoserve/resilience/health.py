"""Health with hysteresis, draining, and region health.

A replica's health is a two-state machine fed by probe results (liveness and a
real inference canary alike): ``fail_threshold`` consecutive failures mark it down,
``recover_threshold`` consecutive successes mark it up again, so one lost probe
does not drop a replica and one lucky probe does not bring a broken one back.
Defaults are SGLang's model gateway's (3 and 2); Envoy's active health checks
take the same two thresholds (it has no default). Draining is separate and
explicit: a draining replica takes no new traffic, its in-flight requests finish.

A region is down when its own probe machine says so (e.g. a canary against the
regional gateway) or when none of its replicas is up; it is skipped from the next
snapshot on, not after a DNS TTL.

A replica can also fail softly - a brownout: it answers, three times slower. Its
engine's measured step time against the profile's at the same batch feeds a
second machine with the same hysteresis (``SoftFailure``); a replica it holds
slow is reported *degraded*, which the router treats as Envoy treats a degraded
host: used only when no healthy replica will do (docs/api.md step 1).

Time is a parameter (``now_ms``) of every call: the gateway ticks the machines with
its clock, tests with theirs.
"""

from __future__ import annotations

from typing import Iterable

import msgspec

from ..types import Signals

__all__ = ["HealthPolicy", "Hysteresis", "FleetHealth", "SlowPolicy", "SoftFailure"]


class HealthPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    fail_threshold: int = 3  # consecutive failures to mark down (SGLang gateway default)
    recover_threshold: int = 2  # consecutive successes to mark up (SGLang gateway default)

    def __post_init__(self) -> None:
        if self.fail_threshold < 1 or self.recover_threshold < 1:
            raise ValueError("thresholds must be >= 1")


class Hysteresis:
    """Up/down with N failures to go down and M successes to come back."""

    __slots__ = ("policy", "up", "streak", "changed_ms", "transitions")

    def __init__(self, policy: HealthPolicy, up: bool = True) -> None:
        self.policy = policy
        self.up = up
        self.streak = 0  # consecutive results against the current state
        self.changed_ms = 0.0
        self.transitions = 0

    def record(self, ok: bool, now_ms: float) -> bool:
        """One probe result; returns the (possibly new) state."""
        if ok == self.up:
            self.streak = 0
            return self.up
        self.streak += 1
        needed = self.policy.recover_threshold if ok else self.policy.fail_threshold
        if self.streak >= needed:
            self.up = ok
            self.streak = 0
            self.changed_ms = now_ms
            self.transitions += 1
        return self.up


class FleetHealth:
    """Per-replica and per-region health, folded into each update's Signals."""

    def __init__(self, replicas_by_region: dict[str, Iterable[str]], policy: HealthPolicy = HealthPolicy()) -> None:
        self.policy = policy
        self.region_of = {rid: region for region, ids in replicas_by_region.items() for rid in ids}
        self.replicas = {rid: Hysteresis(policy) for rid in self.region_of}
        self.regions = {region: Hysteresis(policy) for region in replicas_by_region}
        self.draining: set[str] = set()

    @classmethod
    def for_topology(cls, topology, policy: HealthPolicy = HealthPolicy()) -> "FleetHealth":
        return cls(topology.replicas_by_region(), policy)

    def probe(self, replica: str, ok: bool, now_ms: float) -> bool:
        """A liveness or canary result for one replica."""
        return self.replicas[replica].record(ok, now_ms)

    def probe_region(self, region: str, ok: bool, now_ms: float) -> bool:
        """A result of the region's own probe (its gateway, its inference canary)."""
        return self.regions[region].record(ok, now_ms)

    def drain(self, replica: str) -> None:
        self.draining.add(replica)

    def undrain(self, replica: str) -> None:
        self.draining.discard(replica)

    def replica_up(self, replica: str) -> bool:
        return self.replicas[replica].up

    def regions_down(self) -> tuple[str, ...]:
        down = []
        for region, machine in self.regions.items():
            members = [m for rid, m in self.replicas.items() if self.region_of[rid] == region]
            if not machine.up or not any(m.up for m in members):
                down.append(region)
        return tuple(down)

    def apply(self, signals: Signals) -> Signals:
        """The same update with health, draining and dead regions folded in."""
        replicas = tuple(
            msgspec.structs.replace(
                s,
                healthy=s.healthy and self.replicas[s.replica].up if s.replica in self.replicas else s.healthy,
                draining=s.draining or s.replica in self.draining,
            )
            for s in signals.replicas
        )
        down = tuple(dict.fromkeys(signals.regions_down + self.regions_down()))
        return msgspec.structs.replace(signals, replicas=replicas, regions_down=down)



class SlowPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A replica whose measured step time is at least ``ratio`` times its profile's
    (at the same batch) ``fail_threshold`` signal rounds in a row is degraded, until
    ``recover_threshold`` rounds in a row below it."""

    ratio: float = 2.0
    fail_threshold: int = 2
    recover_threshold: int = 5

    def __post_init__(self) -> None:
        if not self.ratio > 1.0:
            raise ValueError("ratio must be > 1")
        if self.fail_threshold < 1 or self.recover_threshold < 1:
            raise ValueError("thresholds must be >= 1")


class SoftFailure:
    """Per replica: degraded or not, from measured against expected step times."""

    def __init__(self, replicas: Iterable[str], policy: SlowPolicy = SlowPolicy()) -> None:
        self.policy = policy
        machine = HealthPolicy(fail_threshold=policy.fail_threshold, recover_threshold=policy.recover_threshold)
        self.replicas = {rid: Hysteresis(machine) for rid in replicas}

    def observe(self, replica: str, step_ms: float, expected_ms: float, now_ms: float) -> bool:
        """One round's measured step time (NaN: none this round, the state stays);
        True while the replica is degraded."""
        m = self.replicas[replica]
        if step_ms != step_ms or not expected_ms > 0.0:
            return not m.up
        return not m.record(step_ms < self.policy.ratio * expected_ms, now_ms)

    def degraded(self) -> tuple[str, ...]:
        return tuple(rid for rid, m in self.replicas.items() if not m.up)
