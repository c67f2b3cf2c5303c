"""Autoscaling per region on leading signals, and the scaler it is measured against.

:class:`Autoscaler` - the policy. Per group (a region's replicas of one model),
every signal round, from the engines' own metrics:

* **demand in slots** = requests running + waiting on the ready replicas (vLLM's
  ``num_requests_running`` + ``num_requests_waiting``): queue depth is in it, and
  in this replica model decode slots are the binding share of KV (64 sequences
  hold ~20 % of the 470k-token cache), so slot pressure *is* KV pressure;
* **trend**: the slope of that demand over ``trend_window_s`` (a least-squares
  line over the window), projected one cold start ahead - a replica ordered now
  serves in ``cold_start_s``, so it must be ordered for the load of then;
* **wanted** = ceil(projected demand / (slots x ``target_utilization``)) +
  ``warm_buffer`` replicas, never below ``min_replicas``;
* **up** at once (cold starts are the bottleneck; draining replicas are reclaimed
  before new ones are started); **down** only after ``down_after_s`` of wanting
  fewer, by at most ``down_step`` a round, and not within ``down_after_s`` of the
  last scale-up (hysteresis).

:class:`UtilizationScaler` - the lagging baseline: the Kubernetes-HPA shape on the
GPU's busy share (DCGM ``GPU_UTIL``: time with any kernel running, i.e. at least
one request in flight), averaged over ``window_s``: +``step`` when above
``scale_up_at``, -``step`` when below ``scale_down_at``, one move per
``cooldown_s``. It sees neither queues nor trend.

Both are pure state machines over an injected clock (``now`` in day seconds) and
arrays of metrics, so tests drive them without a simulator.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .pool import READY, ReplicaPool

__all__ = ["AutoscalePolicy", "Autoscaler", "UtilizationScaler"]


@dataclass(frozen=True)
class AutoscalePolicy:
    target_utilization: float = 0.75
    warm_buffer: int = 1
    min_replicas: int = 1
    trend_window_s: float = 600.0
    down_after_s: float = 900.0
    down_step: int = 1


class Autoscaler:
    def __init__(self, policy: AutoscalePolicy = AutoscalePolicy()) -> None:
        self.policy = policy
        self.history: dict[int, deque] = {}  # group -> (day s, demand in slots)
        self.low_since: dict[int, float] = {}
        self.last_up: dict[int, float] = {}
        self.wanted_last: dict[int, int] = {}

    def wanted(self, pool: ReplicaPool, k: int, now: float, demand: float) -> int:
        p = self.policy
        hist = self.history.setdefault(k, deque())
        hist.append((now, demand))
        while hist and hist[0][0] < now - p.trend_window_s:
            hist.popleft()
        slope = 0.0
        if len(hist) >= 3:
            t = np.fromiter((h[0] for h in hist), float)
            y = np.fromiter((h[1] for h in hist), float)
            t -= t.mean()
            var = float((t * t).sum())
            if var > 0:
                slope = float((t * (y - y.mean())).sum()) / var
        projected = max(demand, demand + slope * pool.cold_start_s[k])
        n = math.ceil(projected / (pool.slots[k] * p.target_utilization)) + p.warm_buffer
        return max(p.min_replicas, n)

    def __call__(self, pool: ReplicaPool, now: float, in_flight: np.ndarray, queue_depth: np.ndarray) -> None:
        p = self.policy
        ready = pool.state == READY
        for k, members in enumerate(pool.groups):
            demand = float(in_flight[members][ready[members]].sum() + queue_depth[members].sum())
            want = self.wanted(pool, k, now, demand)
            self.wanted_last[k] = want
            have = pool.provisioned(k)
            if want > have:
                pool.set_target(k, want)
                self.last_up[k] = now
                self.low_since.pop(k, None)
            elif want < have:
                since = self.low_since.setdefault(k, now)
                if now - since >= p.down_after_s and now - self.last_up.get(k, -math.inf) >= p.down_after_s:
                    pool.set_target(k, max(want, have - p.down_step))
                    self.low_since[k] = now  # one step per period
            else:
                self.low_since.pop(k, None)


@dataclass(frozen=True)
class UtilizationPolicy:
    scale_up_at: float = 0.9
    scale_down_at: float = 0.5
    window_s: float = 300.0
    cooldown_s: float = 300.0
    step: int = 1
    min_replicas: int = 1


class UtilizationScaler:
    def __init__(self, policy: UtilizationPolicy = UtilizationPolicy()) -> None:
        self.policy = policy
        self.samples: dict[int, deque] = {}
        self.last_move: dict[int, float] = {}
        self.first_seen: dict[int, float] = {}

    def __call__(self, pool: ReplicaPool, now: float, in_flight: np.ndarray, queue_depth: np.ndarray) -> None:
        p = self.policy
        ready = pool.state == READY
        for k, members in enumerate(pool.groups):
            live = members[ready[members]]
            busy = float((in_flight[live] > 0).mean()) if len(live) else 1.0
            window = self.samples.setdefault(k, deque())
            window.append((now, busy))
            while window and window[0][0] < now - p.window_s:
                window.popleft()
            first = self.first_seen.setdefault(k, now)
            if now - self.last_move.get(k, -math.inf) < p.cooldown_s or now - first < p.window_s:
                continue  # a full window first, then one move per cooldown
            util = sum(b for _, b in window) / len(window)
            have = pool.provisioned(k)
            if util > p.scale_up_at:
                pool.set_target(k, have + p.step)
                self.last_move[k] = now
            elif util < p.scale_down_at and have > p.min_replicas:
                pool.set_target(k, have - p.step)
                self.last_move[k] = now
