"""Canary rollout: one region at a time, an SLO gate per stage, automatic rollback.

A :class:`CanaryPlan` names the new version, the previous one, and the regions in
the order they switch (smallest first); a :class:`Rollout` runs it:

* **containment** - the new version's replicas are pre-staged everywhere (the
  expensive weight copy is done before), but outside the regions already in the
  canary they are *draining* in every snapshot (:meth:`Rollout.apply`), so no
  request - not even an overflowed one pinned to the new version - can land there;
* **who gets it** - :meth:`Rollout.version_for` pins a new session from a canary
  region to the new version, and everyone else to the previous one; an existing pin
  always wins, so no session ever sees two versions;
* **the gate** - after each stage's ``window_ms`` with at least ``min_requests``
  observed on the new version in that region, an error rate above
  ``max_error_rate`` or a p99 TTFT above ``max_p99_ttft_ms`` rolls back (the new
  version drains everywhere; a session pinned to it is degraded to the fallback
  model where there is one - the decision says so - or else gets no replica, HTTP
  503, and starts over: never silently moved to the old version); otherwise the
  next region switches, and after the last one the rollout is promoted.
"""

from __future__ import annotations

from typing import Optional

import msgspec
import numpy as np

from ..types import Signals

__all__ = ["CanaryPlan", "Rollout", "RUNNING", "PROMOTED", "ROLLED_BACK"]

RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"


class CanaryPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    version: str
    previous: str
    regions: tuple[str, ...]  # switch order: smallest region first
    window_ms: float = 60_000.0
    min_requests: int = 50
    max_error_rate: float = 0.01
    max_p99_ttft_ms: float = 1200.0


class Rollout:
    def __init__(self, plan: CanaryPlan, topology, now_ms: float = 0.0) -> None:
        if not plan.regions:
            raise ValueError("a canary needs at least one region")
        self.plan = plan
        self.state = RUNNING
        self.stage = 0
        self.stage_started_ms = now_ms
        self.new_replicas = {
            rep.id: d.region for d in topology.deployments
            if d.model == plan.model and d.version == plan.version for rep in d.replicas
        }
        self.errors = 0
        self.ttft: list[float] = []
        self.history: list[tuple[float, str]] = [(now_ms, f"canary {plan.version} in {plan.regions[0]}")]

    @property
    def canary_regions(self) -> tuple[str, ...]:
        if self.state == ROLLED_BACK:
            return ()
        if self.state == PROMOTED:
            return self.plan.regions
        return self.plan.regions[: self.stage + 1]

    def version_for(self, origin_region: str, pinned: Optional[str] = None) -> str:
        """The version a request should be pinned to (a pin always wins)."""
        if pinned is not None:
            return pinned
        return self.plan.version if origin_region in self.canary_regions else self.plan.previous

    def observe(self, region: str, version: str, ok: bool, ttft_ms: float) -> None:
        """A finished request on the new version in the stage's region counts for the gate."""
        if self.state != RUNNING or version != self.plan.version or region != self.plan.regions[self.stage]:
            return
        if ok:
            self.ttft.append(ttft_ms)
        else:
            self.errors += 1

    def tick(self, now_ms: float) -> Optional[str]:
        """Evaluate the gate when the stage's window is over; returns what happened."""
        if self.state != RUNNING or now_ms - self.stage_started_ms < self.plan.window_ms:
            return None
        n = self.errors + len(self.ttft)
        if n < self.plan.min_requests:
            return None  # not enough evidence yet: keep waiting
        error_rate = self.errors / n
        p99 = float(np.percentile(self.ttft, 99)) if self.ttft else float("inf")
        region = self.plan.regions[self.stage]
        if error_rate > self.plan.max_error_rate or p99 > self.plan.max_p99_ttft_ms:
            self.state = ROLLED_BACK
            event = f"rolled back {self.plan.version}: {region} error rate {error_rate:.3f}, p99 {p99:.0f} ms"
        elif self.stage + 1 < len(self.plan.regions):
            self.stage += 1
            event = f"{region} passed; canary {self.plan.version} in {self.plan.regions[self.stage]}"
        else:
            self.state = PROMOTED
            event = f"promoted {self.plan.version}"
        self.stage_started_ms = now_ms
        self.errors = 0
        self.ttft = []
        self.history.append((now_ms, event))
        return event

    def apply(self, signals: Signals) -> Signals:
        """New-version replicas outside the canary regions drain (containment)."""
        allowed = set(self.canary_regions)
        replicas = tuple(
            msgspec.structs.replace(s, draining=True)
            if s.replica in self.new_replicas and self.new_replicas[s.replica] not in allowed else s
            for s in signals.replicas
        )
        return msgspec.structs.replace(signals, replicas=replicas)
