"""Replicas that come and go in the simulator: one state machine for every scaler.

A :class:`ReplicaPool` holds, per group (a region's replicas of one model), each
replica's state - ``off``, ``starting`` (paying GPU time through its cold start),
``ready`` (taking work), ``draining`` (no new work, finishing what it has) - and the
GPU time each state costs. A controller (a plan's schedule, an autoscaler) only
says how many replicas each group should have; the pool starts, cancels and drains
to get there. It plugs into the simulator's capacity hook
(``Simulation.capacity``): every signal round it advances the states with the
engines' metrics and answers which replicas accept new work.

Time is *day time* in seconds: the simulator's clock times ``compression`` (a day
of 24 h simulated in ``86400 / compression`` s keeps cold starts and scaler windows
in proportion to the demand curve).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["ReplicaPool", "OFF", "STARTING", "READY", "DRAINING", "PoolHook"]

OFF, STARTING, READY, DRAINING = range(4)


class ReplicaPool:
    def __init__(self, groups: Sequence[Sequence[int]], *, n_replicas: int, gpus: Sequence[int],
                 cold_start_s: Sequence[float], slots: Sequence[int], initial: Sequence[int]) -> None:
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups]
        self.gpus = list(gpus)
        self.cold_start_s = list(cold_start_s)
        self.slots = list(slots)
        self.state = np.full(n_replicas, OFF, dtype=np.int8)
        self.ready_at = np.zeros(n_replicas)
        self.gpu_s = np.zeros(len(self.groups))  # GPU-seconds (day time) per group
        self.starts = np.zeros(len(self.groups), dtype=np.int64)
        self.now = 0.0
        for k, n in enumerate(initial):
            if n > len(self.groups[k]):
                raise ValueError(f"group {k}: {n} replicas asked, {len(self.groups[k])} exist")
            self.state[self.groups[k][:n]] = READY

    # ------------------------------------------------------------ counts
    def count(self, k: int, *states: int) -> int:
        return int(np.isin(self.state[self.groups[k]], states).sum())

    def provisioned(self, k: int) -> int:
        """Replicas that are or will be ready (starting + ready)."""
        return self.count(k, STARTING, READY)

    def accepting(self) -> np.ndarray:
        return self.state == READY

    # ------------------------------------------------------------ moves
    def set_target(self, k: int, n: int) -> None:
        """Start, cancel or drain replicas of group ``k`` until ``n`` are starting or ready."""
        members = self.groups[k]
        n = max(0, min(int(n), len(members)))
        have = self.provisioned(k)
        st = self.state
        if n > have:
            need = n - have
            for r in members:  # draining replicas come back first: no cold start
                if need and st[r] == DRAINING:
                    st[r] = READY
                    need -= 1
            for r in members:
                if need and st[r] == OFF:
                    st[r] = STARTING
                    self.ready_at[r] = self.now + self.cold_start_s[k]
                    self.starts[k] += 1
                    need -= 1
        elif n < have:
            extra = have - n
            for r in members[::-1]:  # cancel cold starts first, then drain the newest
                if extra and st[r] == STARTING:
                    st[r] = OFF
                    extra -= 1
            for r in members[::-1]:
                if extra and st[r] == READY:
                    st[r] = DRAINING
                    extra -= 1

    def advance(self, now: float, busy: np.ndarray) -> None:
        """Move to day time ``now``: GPU time for what is held, cold starts that
        finish, drained replicas (``busy[r]``: work in flight or queued) that go off."""
        dt = max(0.0, now - self.now)
        st = self.state
        for k, members in enumerate(self.groups):
            held = int((st[members] != OFF).sum())
            self.gpu_s[k] += held * self.gpus[k] * dt
        self.now = now
        st[(st == STARTING) & (self.ready_at <= now)] = READY
        st[(st == DRAINING) & ~busy] = OFF

    def gpu_hours(self) -> float:
        return float(self.gpu_s.sum() / 3600.0)


class PoolHook:
    """The simulator's capacity hook: a pool and a controller
    ``decide(pool, day_s, in_flight, queue_depth)`` that sets its targets."""

    def __init__(self, pool: ReplicaPool, decide: Callable, compression: float = 1.0) -> None:
        self.pool = pool
        self.decide = decide
        self.compression = compression
        self.trace: list = []  # (day s, provisioned per group), one row per change

    def on_signals(self, t_ms: float, in_flight: np.ndarray, queue_depth: np.ndarray) -> np.ndarray:
        now = t_ms / 1000.0 * self.compression
        self.pool.advance(now, (in_flight + queue_depth) > 0)
        self.decide(self.pool, now, in_flight, queue_depth)
        row = tuple(self.pool.provisioned(k) for k in range(len(self.pool.groups)))
        if not self.trace or self.trace[-1][1] != row:
            self.trace.append((now, row))
        return self.pool.accepting()


def schedule_decider(counts: Callable[[float], Sequence[int]], lead_s: Sequence[float]) -> Callable:
    """A controller that follows a known schedule ``counts(day_s)`` (replicas per
    group) and starts replicas one cold start ahead: a plan, or the oracle."""

    def decide(pool: ReplicaPool, now: float, in_flight, queue_depth) -> None:
        for k in range(len(pool.groups)):
            ahead = counts(now + lead_s[k])[k]
            pool.set_target(k, max(counts(now)[k], ahead))

    return decide


def hourly_counts(table: np.ndarray, step_s: float = 3600.0) -> Callable[[float], Sequence[int]]:
    """``table[i]`` (replicas per group) holds from ``i * step_s``; a day repeats."""
    rows = len(table)

    def counts(day_s: float):
        return table[int(math.floor(day_s / step_s)) % rows]

    return counts
