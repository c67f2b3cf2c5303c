"""What every gateway integration shares, whatever its protocol: the request
headers it reads, the answers it gives instead of a destination, the decision with
a bounded hold for ``queue``, and the signal feed that keeps its snapshot fresh.

The Envoy picker (``envoy.py``) and the reference gateway (``gateway.py``) differ
only in how bytes arrive and leave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Callable, Generator, Optional

import msgspec

from ..errors import RequestError, UnknownModel, UnknownVersion
from ..router import Router
from ..snapshot import Snapshot
from ..types import Decision, Request, Signals

__all__ = ["SESSION_HEADER", "PRIORITY_HEADER", "ORIGIN_HEADER", "VERSION_HEADER", "CHARS_PER_TOKEN", "Reject",
           "decide", "deciding", "error_body", "SignalFeed"]

log = logging.getLogger("geoserve.integrations")

SESSION_HEADER = "x-session-id"
PRIORITY_HEADER = "x-geoserve-priority"
ORIGIN_HEADER = "x-geoserve-origin"
VERSION_HEADER = "x-geoserve-version"
CHARS_PER_TOKEN = 4  # prompt tokens are estimated from bytes (no tokenizer in the path)


class Reject(Exception):
    """Answer the request here with ``status`` instead of routing it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after_s = status, message, kind, retry_after_s

    def headers(self) -> list[tuple[str, str]]:
        return [("retry-after", str(self.retry_after_s))] if self.retry_after_s else []


def error_body(status: int, message: str, kind: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def seconds(ms: float) -> int:
    return max(1, math.ceil(ms / 1000.0))


def deciding(router: Router, snapshot: Callable[[], Optional[Snapshot]], request: Callable[[float], Request],
             max_hold_ms: float, on_decision: Optional[Callable[[Decision], None]] = None
             ) -> Generator[float, None, Decision]:
    """``router.route`` for one request, as the design guide's HTTP answers say:
    a ``queue`` decision is held ``retry_after_ms`` and decided again (with the wait
    taken out of its budget) up to ``max_hold_ms``, then 429; a shed is 429 with
    ``retry-after``, or 503 when no replica can serve the model at all; an unknown
    model or version is 404, any other bad field 400.

    A generator, so that any transport can hold: it yields the seconds to wait
    before asking again (an event loop sleeps them with ``asyncio.sleep``, a
    native stream's thread with ``time.sleep``) and returns a decision that goes
    somewhere (serve, overflow, degrade); raises :class:`Reject` otherwise.
    :func:`decide` drives it on an event loop."""
    current = snapshot()
    if current is None:
        raise Reject(503, "no engine signals yet", "unavailable")
    held_ms = 0.0
    while True:
        try:
            decision = router.route(request(held_ms), current)
        except (UnknownModel, UnknownVersion) as err:
            raise Reject(404, str(err), "not_found_error") from None
        except RequestError as err:
            raise Reject(400, str(err)) from None
        if on_decision is not None:
            on_decision(decision)
        if decision.action != "queue":
            break
        router.complete(decision)  # give the queue slot back: it asks again
        wait = float(decision.retry_after_ms or 0)
        if held_ms + wait > max_hold_ms:
            raise Reject(429, "the region is busy; retry", "rate_limit_exceeded", seconds(wait))
        yield wait / 1000.0
        held_ms += wait
        current = snapshot() or current
    if decision.action == "shed":
        if decision.reason == "no_replica":
            raise Reject(503, f"no replica can serve {decision.request.model!r} now", "unavailable")
        raise Reject(429, f"shed ({decision.reason})", "rate_limit_exceeded", seconds(decision.retry_after_ms or 1000))
    return decision


async def decide(router: Router, snapshot: Callable[[], Optional[Snapshot]], request: Callable[[float], Request],
                 max_hold_ms: float, on_decision: Optional[Callable[[Decision], None]] = None) -> Decision:
    """:func:`deciding` on an event loop: its holds are ``asyncio.sleep``."""
    steps = deciding(router, snapshot, request, max_hold_ms, on_decision)
    try:
        while True:
            await asyncio.sleep(next(steps))
    except StopIteration as done:
        return done.value


def engine_body(body: dict, decision: Decision) -> Optional[dict]:
    """The body the engine must get, when it differs from the client's: the
    deployment's own model name (an alias, a degrade) and the shorter output limit
    a degrade may set (``decision.max_tokens``, in whichever of ``max_tokens`` /
    ``max_completion_tokens`` the client used). None: forward it as it is."""
    if decision.model == body.get("model") and decision.max_tokens is None:
        return None
    edited = dict(body, model=decision.model)
    if decision.max_tokens is not None:
        keys = [k for k in ("max_tokens", "max_completion_tokens") if k in body] or ["max_tokens"]
        for key in keys:
            edited[key] = decision.max_tokens
    return edited


def host_port(endpoint: str) -> str:
    """``http://10.0.0.1:8000/v1`` -> ``10.0.0.1:8000``."""
    rest = endpoint.split("://", 1)[-1]
    return rest.split("/", 1)[0]


class SignalFeed:
    """Engine signals for a router: every replica's ``/metrics`` (vLLM or SGLang)
    and ``/health`` polled at ``interval_ms`` with a timeout, health hysteresis
    (``FleetHealth``), soft failure from the engines' measured step times
    (``SoftFailure``: a replica stepping at least twice its profile's time is
    reported degraded), and a fresh snapshot per round in ``self.snapshot``."""

    def __init__(self, router: Router, *, interval_ms: float = 200.0, timeout_s: float = 0.5, health_policy=None,
                 slow_policy=None, on_snapshot: Optional[Callable[[Snapshot], None]] = None,
                 folds: tuple = ()) -> None:
        """``folds``: more machines applied to each round's Signals (e.g. inference
        canaries' health) before the snapshot is built."""
        from ..resilience.health import FleetHealth, HealthPolicy, SlowPolicy, SoftFailure
        from ..signals import MetricsPoller

        self.router = router
        fleet = router.fleet
        self.health = FleetHealth.for_topology(fleet.topology, health_policy or HealthPolicy())
        self.slow = SoftFailure(fleet.replica_ids, slow_policy or SlowPolicy())
        hosts = {rid: host_port(e) for rid, e in zip(fleet.replica_ids, fleet.endpoints)}
        self.poller = MetricsPoller({rid: f"http://{h}/metrics" for rid, h in hosts.items()},
                                    health_urls={rid: f"http://{h}/health" for rid, h in hosts.items()},
                                    health=self.health, timeout_s=timeout_s)
        self.interval_ms = interval_ms
        self.on_snapshot = on_snapshot
        self.folds = tuple(folds)
        self.snapshot: Optional[Snapshot] = None
        self._task: Optional[asyncio.Task] = None

    async def poll_once(self) -> Snapshot:
        now_ms = time.monotonic() * 1000.0
        signals = await asyncio.get_running_loop().run_in_executor(None, self.poller.poll, now_ms)
        signals = self.soft_failure(signals)
        for fold in self.folds:
            signals = fold(signals)
        self.snapshot = snapshot = self.router.snapshot(signals)
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)
        return snapshot

    def soft_failure(self, signals: Signals) -> Signals:
        """Each measured step time against the profile's at the replica's batch:
        replicas ``SoftFailure`` holds slow are reported degraded."""
        fleet = self.router.fleet
        replicas = []
        for sig in signals.replicas:
            r = fleet.replica_index.get(sig.replica)
            if r is None or sig.replica not in self.slow.replicas:
                replicas.append(sig)
                continue
            expected = float(fleet.default_tpot_base_ms[r] + fleet.default_tpot_ms_per_batch[r] * max(1, sig.in_flight))
            step = math.nan if sig.tpot_ms is None else float(sig.tpot_ms)
            slow = self.slow.observe(sig.replica, step, expected, signals.now_ms)
            replicas.append(msgspec.structs.replace(sig, degraded=True) if slow and not sig.degraded else sig)
        return msgspec.structs.replace(signals, replicas=tuple(replicas))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_ms / 1000.0)
            try:
                await self.poll_once()
            except Exception:  # a bad round keeps the last snapshot; the next one may do
                log.exception("signal poll failed")

    async def start(self) -> Snapshot:
        """One round now (so the first request has a snapshot), then every interval."""
        snapshot = await self.poll_once()
        self._task = asyncio.create_task(self._run())
        return snapshot

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.poller.close()
