"""Bounded spillover: token buckets per (origin -> rescuer) pair and per rescuer.

The router spends spill allowance within a snapshot (its state counts overflow
decisions against ``Signals.spill``); these buckets are where the allowance comes
from: they refill at a rate with a burst, and every overflow the gateway acts on
is taken from both the pair's and the rescuer's bucket. A busy region therefore
cannot tip its neighbour over: past the rate, overflow stops and the request is
queued, degraded or shed at home.

Several gateway instances split the caps: each holds ``share`` (1/N) of every rate
and burst. The cost is accuracy: a gateway with little spill demand leaves its
share unused while another is capped early; with N gateways the fleet-wide spill
is never above the cap, and can be below it by up to (N-1)/N of a burst.
"""

from __future__ import annotations

from typing import Sequence

from ..types import Decision, SpillAllowance

__all__ = ["TokenBucket", "SpillBudget"]


class TokenBucket:
    __slots__ = ("rate_per_ms", "burst", "tokens", "at_ms")

    def __init__(self, rate_per_s: float, burst: float, now_ms: float = 0.0) -> None:
        if rate_per_s < 0 or burst < 0:
            raise ValueError("rate and burst must be >= 0")
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = burst
        self.tokens = burst
        self.at_ms = now_ms

    def refill(self, now_ms: float) -> float:
        if now_ms > self.at_ms:
            self.tokens = min(self.burst, self.tokens + (now_ms - self.at_ms) * self.rate_per_ms)
            self.at_ms = now_ms
        return self.tokens

    def take(self, now_ms: float, n: float = 1.0) -> bool:
        if self.refill(now_ms) >= n:
            self.tokens -= n
            return True
        return False


class SpillBudget:
    def __init__(self, regions: Sequence[str], *, pair_rate_per_s: float, pair_burst: float, rescuer_rate_per_s: float,
                 rescuer_burst: float, share: float = 1.0, now_ms: float = 0.0) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.regions = tuple(regions)
        self.pairs = {(o, r): TokenBucket(pair_rate_per_s * share, pair_burst * share, now_ms)
                      for o in regions for r in regions if o != r}
        self.rescuers = {r: TokenBucket(rescuer_rate_per_s * share, rescuer_burst * share, now_ms) for r in regions}
        self.taken = 0
        self.refused = 0

    def allowances(self, now_ms: float) -> tuple[SpillAllowance, ...]:
        """What the next snapshot may spend (``Signals.spill``)."""
        out = [SpillAllowance(rescuer=r, tokens=b.refill(now_ms)) for r, b in self.rescuers.items()]
        out += [SpillAllowance(rescuer=r, origin=o, tokens=b.refill(now_ms)) for (o, r), b in self.pairs.items()]
        return tuple(out)

    def record(self, origin_region: str, rescuer: str, now_ms: float) -> bool:
        """An overflow the gateway acted on; False if the caps had nothing left (it
        should not happen when the router saw the allowance, but the caps hold)."""
        pair, total = self.pairs[(origin_region, rescuer)], self.rescuers[rescuer]
        pair.refill(now_ms)
        total.refill(now_ms)
        if pair.tokens >= 1 and total.tokens >= 1:
            pair.tokens -= 1
            total.tokens -= 1
            self.taken += 1
            return True
        self.refused += 1
        return False

    def record_decision(self, decision: Decision, home_region: str, now_ms: float) -> bool:
        if decision.region is None or decision.region == home_region or decision.action not in ("overflow", "degrade"):
            return True
        return self.record(home_region, decision.region, now_ms)
