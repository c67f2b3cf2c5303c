"""A small, correct OpenAI-compatible gateway on the router (aiohttp, both ends).

``pip install "geoserve[gateway]"``; ``geoserve serve TOPOLOGY --region R``.
For teams without Envoy or Ray (docs/integrations/gateway.md). Per request:

1. read the body (at most ``max_body_bytes``, within ``body_timeout_s``: a slow
   client gets 408, an oversized body 413 - nothing is buffered past the limit);
   parse it; the prompt's text gives the prefix blocks (``geoserve.prefix``);
2. decide (``integrations.common.decide``: queue held within ``max_hold_ms``, 429
   with ``Retry-After`` on shed, 503 when no replica exists, 404 unknown model,
   400 bad input); the body's ``model`` is rewritten to the deployment's name when
   it differs (alias, degrade);
3. forward to the decision's replica, then its fallbacks in order when the
   connection fails or the replica answers 5xx *before the first byte* - each
   retry taken from the retry budget (Envoy's: retries in flight at most 20 % of
   requests in flight, at least 3), never after: once bytes flow, a broken
   upstream is surfaced to the client (an SSE ``error`` event, or a cut
   connection) and not retried;
4. stream the response through as it arrives (backpressure: the next upstream
   chunk is read only after the client took the last), stamping
   ``x-geoserve-version`` and ``x-geoserve-replica``;
5. release the router's state when the response ends (served replica, ``ok``).

``/health`` (200 with a snapshot), ``/metrics`` (Prometheus), ``/v1/models``.
``stop()`` stops accepting, lets in-flight streams finish (up to ``drain_s``),
then closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional

import msgspec
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from ..prefix import TEXT_BLOCK_TOKENS, block_hashes_from_text
from ..resilience.health import FleetHealth, HealthPolicy
from ..resilience.retry import RetryBudget
from ..router import Router
from ..types import Decision, Request
from .common import (CHARS_PER_TOKEN, ORIGIN_HEADER, PRIORITY_HEADER, SESSION_HEADER, VERSION_HEADER, Reject,
                     SignalFeed, decide, engine_body, error_body, host_port)

__all__ = ["Gateway", "REPLICA_HEADER"]

log = logging.getLogger("geoserve.gateway")

REPLICA_HEADER = "x-geoserve-replica"
MAX_DECISIONS = 3  # a request is decided at most this often (the first, then with failed replicas excluded)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "upgrade",
               "proxy-authenticate", "proxy-authorization", "te", "trailer"}


class _UpstreamFailed(Exception):
    """The replica could not be reached or answered 5xx before any byte was sent on."""


class Gateway:
    def __init__(self, topology, *, region: str, host: str = "127.0.0.1", port: int = 0, policy=None,
                 poll_interval_ms: float = 200.0, poll_timeout_s: float = 0.5, max_body_bytes: int = 4 << 20,
                 body_timeout_s: float = 30.0, max_hold_ms: float = 2000.0, connect_timeout_s: float = 2.0,
                 retry_budget: Optional[RetryBudget] = None, drain_s: float = 30.0, health_policy=None,
                 canary_interval_s: Optional[float] = 10.0, canary_timeout_s: float = 5.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.router = Router(topology, policy)
        if region not in self.router.fleet.region_index:
            raise ValueError(f"region {region!r} is not in the topology")
        self.region = region
        self.host, self.port = host, port
        # inference canaries keep their own health machine (a liveness probe passing
        # every 200 ms must not reset the failure streak of a canary every 10 s)
        self.canary_health = FleetHealth.for_topology(topology, HealthPolicy(fail_threshold=2, recover_threshold=2))
        self.feed = SignalFeed(self.router, interval_ms=poll_interval_ms, timeout_s=poll_timeout_s,
                               health_policy=health_policy, folds=(self.canary_health.apply,))
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_hold_ms = max_hold_ms
        self.connect_timeout_s = connect_timeout_s
        self.retries = retry_budget if retry_budget is not None else RetryBudget()
        self.drain_s = drain_s
        self.canary_interval_s = canary_interval_s
        self.canary_timeout_s = canary_timeout_s
        self._canary_task: Optional[asyncio.Task] = None
        self.registry = CollectorRegistry()
        self.m_decisions = Counter("geoserve_gateway_decisions", "Routing decisions", ["action", "reason"],
                                   registry=self.registry)
        self.m_answers = Counter("geoserve_gateway_responses", "Responses by status", ["code"], registry=self.registry)
        self.m_retries = Counter("geoserve_gateway_retries", "Retries on fallbacks", ["outcome"], registry=self.registry)
        self.m_broken = Counter("geoserve_gateway_broken_streams", "Upstreams that failed after the first byte",
                                registry=self.registry)
        self.m_active = Gauge("geoserve_gateway_active_requests", "Requests in flight", registry=self.registry)
        self._runner: Optional[web.AppRunner] = None
        self._client: Optional[ClientSession] = None
        self._active = 0
        self._idle = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/completions", self._proxy)
        app.router.add_post("/v1/chat/completions", self._proxy)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> int:
        await self.feed.start()
        self._client = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=300),
                                     timeout=ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
                                     auto_decompress=False)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.drain_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._idle.set()
        if self.canary_interval_s:
            self._canary_task = asyncio.create_task(self._canaries())
        return self.port

    async def canary_round(self) -> dict[str, bool]:
        """A real one-token completion to every replica; each result is a health
        probe (an engine whose /health answers but which cannot serve - the wrong
        model loaded, a broken GPU - goes down like one that does not answer)."""
        fleet = self.router.fleet
        now_ms = time.monotonic() * 1000.0

        async def one(rid: str, endpoint: str, model: str) -> bool:
            body = {"model": model, "prompt": "ping", "max_tokens": 1}
            try:
                async with self._client.post(f"http://{host_port(endpoint)}/v1/completions", json=body,
                                             timeout=ClientTimeout(total=self.canary_timeout_s)) as r:
                    await r.read()
                    return r.status == 200
            except (ClientError, asyncio.TimeoutError, OSError):
                return False

        models = [fleet.models[int(m)] for m in fleet.replica_model]
        results = await asyncio.gather(*(one(rid, e, m) for rid, e, m in zip(fleet.replica_ids, fleet.endpoints, models)))
        outcome = dict(zip(fleet.replica_ids, results))
        for rid, ok in outcome.items():
            self.canary_health.probe(rid, ok, now_ms)
        return outcome

    async def _canaries(self) -> None:
        while True:
            await asyncio.sleep(self.canary_interval_s)
            try:
                await self.canary_round()
            except Exception:  # noqa: BLE001 - a bad round must not stop the next
                log.exception("canary round failed")

    async def stop(self) -> None:
        """Graceful: no new connections, in-flight requests finish (up to ``drain_s``)."""
        if self._canary_task is not None:
            self._canary_task.cancel()
            await asyncio.gather(self._canary_task, return_exceptions=True)
            self._canary_task = None
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()  # stop accepting
            if self._active:
                try:
                    await asyncio.wait_for(self._idle.wait(), self.drain_s)
                except asyncio.TimeoutError:
                    log.warning("drain timed out with %d requests in flight", self._active)
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self.feed.stop()

    # ------------------------------------------------------------ small endpoints
    async def _models(self, request: web.Request) -> web.Response:
        fleet = self.router.fleet
        names = list(fleet.models) + sorted(fleet.aliases)
        return web.json_response({"object": "list", "data": [{"id": n, "object": "model", "owned_by": "geoserve"}
                                                             for n in names]})

    async def _health(self, request: web.Request) -> web.Response:
        if self.feed.snapshot is None:
            return web.Response(status=503, text="no signals yet")
        return web.Response(text="ok")

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------ the proxy
    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        self._active += 1
        self._idle.clear()
        self.m_active.inc()
        try:
            return await self._handle(request)
        finally:
            self._active -= 1
            self.m_active.dec()
            if self._active == 0:
                self._idle.set()

    def _answer(self, reject: Reject) -> web.Response:
        self.m_answers.labels(str(reject.status)).inc()
        return web.Response(status=reject.status, body=error_body(reject.status, reject.message, reject.kind),
                            content_type="application/json", headers=dict(reject.headers()))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body, raw = await self._read(request)
        except Reject as reject:
            return self._answer(reject)
        tried: tuple[str, ...] = ()
        slot = _RetrySlot(self.retries, self.m_retries)
        try:
            for attempt in range(MAX_DECISIONS):
                if attempt > 0 and not slot.take():
                    break  # the budget says no: what failed is the answer
                try:
                    decision = await decide(self.router, lambda: self.feed.snapshot,
                                            lambda held: self._request(request, body, raw, held, tried), self.max_hold_ms,
                                            lambda d: self.m_decisions.labels(d.action, d.reason).inc())
                except Reject as reject:
                    return self._answer(reject)
                edited = engine_body(body, decision)
                payload = raw if edited is None else msgspec.json.encode(edited)
                response = await self._forward(request, decision, payload, slot)
                if response is not None:
                    return response
                # every replica of that decision failed before the first byte: decide again
                # without them (another region, if the budget allows a retry)
                tried = tried + (decision.replica,) + decision.fallbacks
        finally:
            slot.close()
        return self._answer(Reject(502, "no replica answered", "upstream_error"))

    async def _read(self, request: web.Request) -> tuple[dict, bytes]:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise Reject(413, f"the body is over {self.max_body_bytes} bytes") from None
        except asyncio.TimeoutError:
            raise Reject(408, f"the body did not arrive within {self.body_timeout_s:g} s") from None
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as err:
            raise Reject(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise Reject(400, "the body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise Reject(400, "the body needs a model (a string)")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise Reject(400, "max_tokens must be an integer >= 1")
        return body, raw

    def _request(self, request: web.Request, body: dict, raw: bytes, waited_ms: float, exclude: tuple = ()) -> Request:
        headers = request.headers
        text = _prompt_text(body)
        return Request(
            model=body["model"], origin=headers.get(ORIGIN_HEADER) or self.region,
            priority=headers.get(PRIORITY_HEADER) or "interactive", version=headers.get(VERSION_HEADER) or None,
            prompt_tokens=max(1, (len(text.encode()) if text else len(raw)) // CHARS_PER_TOKEN),
            max_tokens=body.get("max_tokens") or body.get("max_completion_tokens") or 256,
            session=headers.get(SESSION_HEADER) or None,
            prefix=block_hashes_from_text(text) if text else (), block_tokens=TEXT_BLOCK_TOKENS, waited_ms=waited_ms,
            exclude=exclude,
        )

    async def _forward(self, request: web.Request, decision: Decision, raw: bytes,
                       slot: "_RetrySlot") -> Optional[web.StreamResponse]:
        """The decision's replica, then its fallbacks, while each fails before the first
        byte (refused, or a 5xx) and the retry budget allows; None if all failed."""
        targets = [(decision.replica, decision.endpoint)] + list(zip(decision.fallbacks, decision.fallback_endpoints))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        for i, (replica, endpoint) in enumerate(targets):
            if i > 0 and not slot.take():
                break
            url = f"http://{host_port(endpoint)}{request.path_qs}"
            try:
                upstream = await self._client.post(url, data=raw, headers=headers)
            except (ClientError, asyncio.TimeoutError, OSError) as err:
                log.info("replica %s unreachable (%s)", replica, err)
                continue
            if upstream.status >= 500:  # nothing sent on yet: the next one may take it
                upstream.release()
                continue
            return await self._stream(request, decision, replica, upstream)
        self.router.complete(decision, ok=False)
        return None

    async def _stream(self, request, decision, replica, upstream) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status)
        for k, v in upstream.headers.items():
            if k.lower() not in _HOP_BY_HOP:
                response.headers[k] = v
        if decision.version is not None:
            response.headers[VERSION_HEADER] = decision.version
        response.headers.setdefault(REPLICA_HEADER, replica)
        sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        ok = True
        try:
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)  # waits for the client: backpressure, no unbounded buffer
            except (ClientError, asyncio.TimeoutError, OSError) as err:
                ok = False
                self.m_broken.inc()
                if sse:  # surfaced, not retried: bytes already reached the client
                    event = {"error": {"message": f"upstream {replica} failed mid-stream: {err}", "type": "upstream_error",
                                       "code": 502}}
                    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                else:
                    raise
            await response.write_eof()
        except (ConnectionResetError, ClientError, OSError):
            ok = False  # the client went away, or the upstream broke a non-streaming body
            if request.transport is not None:
                request.transport.close()
        finally:
            upstream.release()
            self.m_answers.labels(str(upstream.status)).inc()
            self.router.complete(decision, replica=replica, ok=ok and upstream.status < 500)
        return response


class _RetrySlot:
    """One request's use of the retry budget: it counts as a request in flight, and
    at most one of its attempts at a time counts as a retry in flight."""

    __slots__ = ("budget", "counter", "held")

    def __init__(self, budget: RetryBudget, counter) -> None:
        self.budget, self.counter, self.held = budget, counter, False
        budget.begin_request()

    def take(self) -> bool:
        """A slot for the next attempt (the previous retry, if any, is over)."""
        self._release()
        if not self.budget.try_retry():
            self.counter.labels("refused").inc()
            return False
        self.counter.labels("taken").inc()
        self.held = True
        return True

    def _release(self) -> None:
        if self.held:
            self.held = False
            self.budget.end_retry()

    def close(self) -> None:
        self._release()
        self.budget.end_request()


def _prompt_text(body: dict) -> Optional[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [m.get("content") for m in messages if isinstance(m, dict)]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    return None
