"""geoserve as Envoy's endpoint picker: an ``ext_proc`` server (the Gateway API
Inference Extension's protocol) that routes every request with a :class:`Router`.

``pip install "geoserve[envoy]"``; ``geoserve envoy-picker TOPOLOGY --region R``.
The Envoy side is in ``docs/integrations/envoy.md`` (the tests load that config).

Per request, on one ``Process`` stream:

1. request headers - ``x-session-id`` (session), ``x-geoserve-priority`` (a class
   name), ``x-geoserve-origin`` (set by the edge; default the picker's region),
   ``x-geoserve-version`` (a session's version pin); held, not answered yet;
2. request body chunks - fed to :class:`~.openai_body.BodyScanner`; the picker
   decides as soon as it knows the ``model`` and the first ``prefix_blocks`` blocks
   of ``messages`` / ``prompt`` (or the body has ended), not at the end of a long
   body. The destination goes out as the ``x-gateway-destination-endpoint`` header
   (the primary: an ``ORIGINAL_DST`` cluster dials one address) and as ``envoy.lb``
   dynamic metadata (the primary and the fallbacks in retry order, for Envoy's
   ``override_host`` load-balancing policy). A client's own destination header is
   overwritten (or removed when no endpoint is chosen): it cannot steer.
   Degrade (and an alias) rewrites the body's ``model`` to the deployment's; a
   degrade that shortens the answer (``Decision.max_tokens``) sets the body's
   limit too - for that one the picker holds the chunks to the body's end, since a
   limit may follow the prompt (the only case it waits for a whole body).
   The routed request also carries the serving version as ``x-geoserve-version``
   (Envoy's route copies it onto the response: ``%REQ(x-geoserve-version)%``);
3. the release of the router's state when the response has ended, from Envoy's
   gRPC access log (``release_on="access_log"``, the doc's config: the entry says
   who served and the status; the stream's ``x-request-id`` matches it to the
   request), so that the response is not on the ext_proc stream at all - or at the
   response headers where Envoy sends them (served replica from the
   ``upstream.address`` attribute; ``ok`` unless 5xx), whichever comes first.

Body modes: ``STREAMED`` with ``send_body_without_waiting_for_header_response``
(the default config: the headers answer waits for the first chunks, each chunk is
acknowledged after), ``BUFFERED`` (one round trip more; the destination rides on
the body answer) and ``FULL_DUPLEX_STREAMED`` (the GIE's mode: chunks are echoed
back). Answers instead of a destination (OpenAI-style JSON error bodies): 400
malformed body or headers, 404 unknown model or version, 413 body over
``max_body_bytes``, 429 with ``retry-after`` on shed (or when a queue decision
does not clear within ``max_hold_ms``), 503 when no replica can serve.

Transports (``PickerServer(transport=...)``): ``grpc.aio`` on the event loop, or
the native one (``geoserve._core.extproc``: gRPC C++ threads handing each message
to the picker as bytes). Both move bytes: each message is read by
``read_message`` (only the fields the picker uses, straight from the wire format:
``_core/procmsg.pyx``, its twin ``_twin/procmsg.py``) and drives the same
per-message generator, ``_steps``, which answers with serialized responses (the
common ones built once). The access log service (``access_log``) is served beside
``Process`` on the same port, by either transport.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable, Generator, Iterator, Optional

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from .. import _compat
from .._compat import kernels
from .._twin.procmsg import (LB_NAMESPACE, REQUEST_BODY, REQUEST_HEADERS, REQUEST_TRAILERS, RESPONSE_BODY,
                             RESPONSE_HEADERS, RESPONSE_TRAILERS, Message, WireError)
from ..prefix import TEXT_BLOCK_BYTES, TEXT_BLOCK_TOKENS, block_hashes_from_bytes
from ..router import Router
from ..snapshot import Snapshot
from ..types import Decision, Request, SignalColumns, Signals
from .common import (CHARS_PER_TOKEN, ORIGIN_HEADER, PRIORITY_HEADER, SESSION_HEADER, VERSION_HEADER, Reject,
                     SignalFeed, deciding, error_body, host_port)
from .openai_body import BodyError, BodyScanner

__all__ = ["EndpointPicker", "PickerMetrics", "PickerServer", "DESTINATION_HEADER", "LB_NAMESPACE", "TRANSPORTS",
           "native_transport"]

log = logging.getLogger("geoserve.envoy")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
REQUEST_ID_HEADER = "x-request-id"  # Envoy's: how an access log entry finds its request
RELEASE_ON = ("access_log", "response")

# the headers the picker reads (the others are not decoded): the request's, and the response's status
_READ_HEADERS = frozenset(("content-length", SESSION_HEADER, PRIORITY_HEADER, ORIGIN_HEADER, VERSION_HEADER,
                           REQUEST_ID_HEADER, ":status"))
read_message: Callable[[bytes, frozenset], Message] = kernels(which="procmsg").read
read_access_log: Callable[[bytes], list] = kernels(which="procmsg").read_access_log

_MODES = processing_mode_pb2.ProcessingMode
STREAMED, BUFFERED, FULL_DUPLEX = _MODES.STREAMED, _MODES.BUFFERED, _MODES.FULL_DUPLEX_STREAMED
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# the answers that are always the same, serialized once (every answer leaves as bytes)
_CONTINUE_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
_CONTINUE_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString()
_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
_CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse()).SerializeToString()


def _first_byte(kind: int) -> int:
    """A ProcessingRequest's first byte when it carries ``kind`` (its oneof field,
    length-delimited): how the native transport tells the parts of the exchange
    apart for its standing answers (EndpointPicker._standing)."""
    return kind << 3 | 2


class PickerMetrics:
    """The picker's counters, on a Prometheus registry of their own. They are kept
    as plain numbers under one lock and become Prometheus samples when scraped
    (``collect``): prometheus_client's own metric objects cost ~1.5 µs an update,
    and a request makes six - a third of the stream kernel's work per request."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import CollectorRegistry

        lock = threading.Lock()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = _Metric("counter", "geoserve_picker_decisions", "Routing decisions", lock,
                                 ("action", "reason"))
        self.answers = _Metric("counter", "geoserve_picker_immediate_responses",
                               "Requests answered by the picker itself", lock, ("code",))
        self.released = _Metric("counter", "geoserve_picker_released", "Requests whose router state was released",
                                lock, ("ok",))
        self.stream_errors = _Metric("counter", "geoserve_picker_stream_errors",
                                     "ext_proc streams that ended in an error", lock)
        self.active = _Metric("gauge", "geoserve_picker_active_streams", "ext_proc streams open", lock)
        self.access_log = _Metric("counter", "geoserve_picker_access_log_entries", "Envoy's access log entries, by "
                                  "what they did: released a request, came before its stream ended (kept for it), "
                                  "were not routed by the picker, or were ignored (release_on=response)", lock,
                                  ("outcome",))
        self.expired = _Metric("counter", "geoserve_picker_releases_expired", "Routed requests released because no "
                               "access log entry came for them within release_after_s (or too many waited)", lock)
        self.decide_seconds = _Metric("histogram", "geoserve_picker_decision_seconds",
                                      "Time from request headers to decision", lock,
                                      buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5))
        self._all = (self.decisions, self.answers, self.released, self.stream_errors, self.active, self.access_log,
                     self.expired, self.decide_seconds)
        self.registry.register(self)

    def describe(self) -> list:
        return [metric.family() for metric in self._all]

    def collect(self):
        for metric in self._all:
            yield metric.family()


class _Metric:
    """One metric family of ``PickerMetrics``: a counter or gauge by label values,
    or a histogram, as plain numbers updated under the metrics' lock."""

    __slots__ = ("kind", "name", "doc", "labelnames", "values", "buckets", "_lock")

    def __init__(self, kind: str, name: str, doc: str, lock: threading.Lock, labelnames: tuple = (),
                 buckets: tuple = ()) -> None:
        self.kind, self.name, self.doc, self.labelnames, self._lock = kind, name, doc, labelnames, lock
        self.buckets = buckets
        # label values -> count; a histogram: [count per bucket and +Inf..., sum]
        self.values: dict = {(): [0] * (len(buckets) + 2)} if kind == "histogram" else {} if labelnames else {(): 0}

    def inc(self, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0) + 1

    def dec(self) -> None:
        with self._lock:
            self.values[()] -= 1

    def observe(self, value: float) -> None:
        at = bisect.bisect_left(self.buckets, value)  # the first bound >= value (Prometheus' le)
        with self._lock:
            counts = self.values[()]
            counts[at] += 1
            counts[-1] += value

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def family(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            values = {k: (list(v) if isinstance(v, list) else v) for k, v in self.values.items()}
        if self.kind == "histogram":
            counts = values[()]
            cumulative = list(itertools.accumulate(counts[:-1]))
            bounds = [str(b) for b in self.buckets] + ["+Inf"]
            return HistogramMetricFamily(self.name, self.doc, buckets=list(zip(bounds, cumulative)),
                                         sum_value=counts[-1])
        family = (CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily)(
            self.name, self.doc, labels=self.labelnames)
        for labels, value in sorted(values.items()):
            family.add_metric(labels, value)
        return family


class _Exchange:
    """One HTTP request's state on its ext_proc stream."""

    __slots__ = ("headers", "scanner", "body_bytes", "mode", "owed", "decision", "started", "released", "standing",
                 "content_length", "response_body_mode", "holding", "finished")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.scanner = BodyScanner()
        self.body_bytes = 0
        self.mode = STREAMED
        self.response_body_mode = _MODES.NONE
        self.owed: list[tuple[bytes, bool]] = []  # body chunks not answered yet
        self.decision: Optional[Decision] = None
        self.started = time.perf_counter()
        self.released = False
        self.content_length: Optional[int] = None
        self.holding = False  # decided, the body still arriving: a shorter limit is set at its end
        self.standing = False  # the native transport has its standing answers
        self.finished = False  # answered with an immediate response: the stream ends


class EndpointPicker:
    """The ext_proc servicer. ``update(signals)`` installs a new snapshot (the
    picker's poller calls it); decisions read the latest."""

    def __init__(self, router: Router, *, region: str, max_body_bytes: int = 4 << 20, prefix_blocks: int = 16,
                 max_hold_ms: float = 250.0, metrics: Optional[PickerMetrics] = None, release_on: str = "access_log",
                 release_after_s: float = 900.0, max_waiting: int = 1 << 14) -> None:
        if region not in router.fleet.region_index:
            raise ValueError(f"region {region!r} is not in the topology")
        if release_on not in RELEASE_ON:
            raise ValueError(f"release_on must be one of {RELEASE_ON}, not {release_on!r}")
        if not release_after_s > 0 or max_waiting < 1:
            raise ValueError("release_after_s must be > 0 and max_waiting >= 1")
        self.router = router
        self.region = region
        self.max_body_bytes = max_body_bytes
        self.prefix_blocks = prefix_blocks
        self.max_hold_ms = max_hold_ms
        self.metrics = metrics
        self.snapshot: Optional[Snapshot] = None
        self._indexed = None
        self._replica_at: dict[str, str] = {}
        self._routed: dict[tuple, Any] = {}  # (endpoint, fallbacks, version) -> the headers answer that routes there
        self._standing_answers: dict[bool, tuple] = {}  # full duplex -> the native standing answers
        self.release_on = release_on
        self._warned_expiry = False
        self._waiting = _ById(release_after_s, max_waiting)  # releases of ended streams, for their entries
        self._logged_early = _ById(release_after_s, max_waiting)  # (ok, served) of entries, for their streams' end
        self._log_lock = threading.Lock()

    def replica_at(self, address: str) -> Optional[str]:
        """The replica id behind an upstream address (for the served replica)."""
        fleet = self.router.fleet
        if self._indexed is not fleet:  # a membership change since the last lookup
            self._replica_at = {host_port(e): rid for rid, e in zip(fleet.replica_ids, fleet.endpoints)}
            self._indexed = fleet
        return self._replica_at.get(address)

    def update(self, signals: "Signals | SignalColumns") -> Snapshot:
        self.snapshot = snapshot = self.router.snapshot(signals)
        return snapshot

    def install(self, snapshot: Snapshot) -> None:
        """Use a snapshot built elsewhere (the server's signal feed)."""
        self.snapshot = snapshot

    # ------------------------------------------------------------ the stream
    # One mechanism, two transports: _steps() is what the picker does with one
    # ext_proc message; Process drives it on grpc.aio, native_stream() on the native
    # server's threads (geoserve._core.extproc), which only move bytes.
    def _open(self) -> _Exchange:
        if self.metrics is not None:
            self.metrics.active.inc()
        return _Exchange()

    def _close(self, ex: _Exchange) -> None:
        decision = ex.decision
        if not (decision is not None and decision.endpoint is not None and not ex.released
                and self.wait_for_log(ex, functools.partial(self._release, ex))):
            self._release(ex, ok=True)  # a stream that ends early (client gone) gives its slot back
        if self.metrics is not None:
            self.metrics.active.dec()

    def _failed(self) -> None:
        if self.metrics is not None:
            self.metrics.stream_errors.inc()
        log.exception("ext_proc stream failed")

    def _steps(self, ex: _Exchange, message: Message) -> Iterator[Any]:
        """One ext_proc message (as ``read_message`` reads it): yields its answers
        (serialized) in order and, while a queue decision is held, the seconds to
        wait before it is decided again (floats). After an immediate response
        (``ex.finished``) the stream ends."""
        kind = message.kind
        if message.modes is not None:
            ex.mode, ex.response_body_mode, send_early = message.modes
            if ex.mode == STREAMED and not send_early:
                log.error("ext_proc config: STREAMED needs send_body_without_waiting_for_header_response")
                ex.finished = True
                yield _immediate(500, "the picker's Envoy config is wrong (see docs/integrations/envoy.md)",
                                 "server_error")
                return
        if kind == REQUEST_BODY:
            yield from (yield from self._on_body(ex, message))  # its holds, then its answers
        elif kind == REQUEST_HEADERS:
            yield from self._on_headers(ex, message)
        elif kind == RESPONSE_HEADERS:
            yield self._on_response_headers(ex, message)
        elif kind == RESPONSE_BODY:
            if message.end_of_stream:
                self._release(ex, ok=True)
            yield _CONTINUE_RESPONSE_BODY
        elif kind == REQUEST_TRAILERS:
            yield _CONTINUE_TRAILERS
        elif kind == RESPONSE_TRAILERS:
            yield _CONTINUE_RESPONSE_TRAILERS

    async def Process(self, request_iterator, context):  # noqa: N802 (the gRPC method's name)
        """The grpc.aio transport's stream: serialized ``ProcessingRequest``s in,
        serialized ``ProcessingResponse``s out (registered without (de)serializers,
        see :meth:`PickerServer.start`); a hold sleeps on the event loop."""
        ex = self._open()
        try:
            async for data in request_iterator:
                for step in self._steps(ex, read_message(data, _READ_HEADERS)):
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                        continue
                    yield step
                if ex.finished:
                    return
        except Exception:
            self._failed()
            raise
        finally:
            self._close(ex)

    def native_stream(self, compiled: Optional[bool] = None) -> Callable[[Optional[bytes]], Optional[tuple]]:
        """A handler for one stream of the native transport: serialized
        ``ProcessingRequest`` in, ``(serialized answers, stream ends[, standing
        answers])`` out, run on the server's thread for that stream (a hold sleeps
        there); ``None`` in when the stream has ended. Once the picker has decided,
        it hands the transport the answers that no longer depend on what arrives
        (``_standing_for``), so that Envoy gets them without a call into Python.

        Where the compiled kernels are built the handler is the stream kernel
        (``_core/pickstream.pyx``: the common request - STREAMED body, a plain
        route - without the interpreter, handing the stream to this Python handler,
        its twin, for everything else); ``compiled`` forces one or the other."""
        kernel = _compat.compiled_pickstream
        if compiled and kernel is None:
            raise RuntimeError("the compiled stream kernel is not built in this install")
        if compiled is False or (compiled is None and _compat.FORCED_TWIN):
            kernel = None
        ex = self._open()
        return kernel.Stream(self, ex) if kernel is not None else self._handler(ex)

    def _handler(self, ex: _Exchange) -> Callable[[Optional[bytes]], Optional[tuple]]:
        """The Python handler of ``native_stream`` for the stream of ``ex``."""
        def handle(data: Optional[bytes]) -> Optional[tuple]:
            if data is None:
                self._close(ex)
                return None
            try:
                return self._native(ex, self._steps(ex, read_message(data, _READ_HEADERS)))
            except Exception:
                self._failed()
                raise

        return handle

    def _native(self, ex: _Exchange, steps: Iterator[Any]) -> tuple:
        """Drive one message's steps the native transport's way (a hold sleeps on
        the stream's thread): ``(answers, stream ends[, standing answers])``."""
        answers = []
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
            else:
                answers.append(step)
        if ex.finished:
            return answers, True, None
        if ex.standing or ex.decision is None or ex.holding:
            return answers, False
        ex.standing = True
        return answers, False, self._standing_for(ex.mode == FULL_DUPLEX)

    def _standing_for(self, duplex: bool) -> tuple:
        """The native transport's standing answers once a request is decided (and
        not holding its body): exactly what ``_steps`` would answer, given at once -
        the rest of the body chunks are acknowledged (echoed in full duplex: not
        standing), the response headers, body and trailers get theirs; the
        response headers and body are still handed to the picker after the answer
        has gone (notify), for the release."""
        standing = self._standing_answers.get(duplex)
        if standing is None:
            standing = ((_first_byte(RESPONSE_HEADERS), _CONTINUE_RESPONSE_HEADERS, True),
                        (_first_byte(RESPONSE_BODY), _CONTINUE_RESPONSE_BODY, True),
                        (_first_byte(REQUEST_TRAILERS), _CONTINUE_TRAILERS, False),
                        (_first_byte(RESPONSE_TRAILERS), _CONTINUE_RESPONSE_TRAILERS, False))
            if not duplex:
                standing += ((_first_byte(REQUEST_BODY), _CONTINUE_BODY, False),)
            self._standing_answers[duplex] = standing
        return standing

    def _on_headers(self, ex: _Exchange, headers: Message) -> list:
        ex.headers = headers.headers
        length = ex.headers.get("content-length")
        if length is not None:
            try:
                ex.content_length = int(length)
            except ValueError:
                return [self._reject(ex, Reject(400, "content-length is not a number"))]
            if ex.content_length > self.max_body_bytes:
                return [self._reject(ex, Reject(413, f"the body is over {self.max_body_bytes} bytes"))]
        if headers.end_of_stream:
            return [self._reject(ex, Reject(400, "a JSON body with a model is required"))]
        if ex.mode == BUFFERED:  # the destination rides on the body's answer; the client's header goes now
            return [_REMOVE_DESTINATION]
        return []  # held until the body says where to go

    def _on_body(self, ex: _Exchange, body: Message) -> Generator[float, None, list]:
        """Yields the seconds of a held queue decision, returns the answers."""
        chunk, end = body.body, body.end_of_stream
        if ex.decision is not None and not ex.holding:  # decided: pass the rest through
            if ex.mode == FULL_DUPLEX:
                return [_echo(chunk, end)]
            return [_CONTINUE_BODY]
        try:
            if not self._take(ex, chunk, end):
                return []
        except Reject as reject:
            return [self._reject(ex, reject)]
        return (yield from self._decide_body(ex, end))

    def _take(self, ex: _Exchange, chunk: bytes, end: bool) -> bool:
        """A body chunk in: whether the picker can decide now (Reject when the body is bad)."""
        ex.owed.append((chunk, end))
        ex.body_bytes += len(chunk)
        if ex.body_bytes > self.max_body_bytes:
            raise Reject(413, f"the body is over {self.max_body_bytes} bytes")
        try:
            ex.scanner.feed(chunk, end)
        except BodyError as err:
            raise Reject(400, str(err)) from None
        if ex.holding:
            if not end:
                return False
        elif not self._ready(ex, end):
            return False
        if end:
            self._check_json(ex)
        return True

    @staticmethod
    def _check_json(ex: _Exchange) -> None:
        try:  # the whole body is here: hold it to full JSON, not just its top level
            msgspec.json.decode(ex.scanner.buffer)
        except msgspec.DecodeError as err:
            raise Reject(400, f"the body is not valid JSON: {err}") from None

    def _decide_body(self, ex: _Exchange, end: bool) -> Generator[float, None, list]:
        """The decision once the body allows it (its holds yielded), and the answers."""
        try:
            decision = ex.decision if ex.holding else (yield from self._deciding(ex))
        except Reject as reject:
            return [self._reject(ex, reject)]
        ex.decision = decision
        if decision.max_tokens is not None and not end:
            ex.holding = True  # its limit may still come: answer the chunks at the body's end
            return []
        ex.holding = False
        return self._route_answers(ex, decision)

    def _ready(self, ex: _Exchange, end: bool) -> bool:
        scanner = ex.scanner
        if end:
            if scanner.model is None:
                raise Reject(400, "the body has no model")
            return True
        if scanner.model is None or scanner.prompt_span is None:
            return False
        return scanner.prompt_span[1] is not None or scanner.prompt_length() >= self.prefix_blocks * TEXT_BLOCK_BYTES

    # ------------------------------------------------------------ the decision
    def _request(self, ex: _Exchange, waited_ms: float) -> Request:
        scanner, headers = ex.scanner, ex.headers
        prompt = scanner.prompt_bytes()
        complete = scanner.prompt_span is not None and scanner.prompt_span[1] is not None
        blocks = min(self.prefix_blocks, len(prompt) // TEXT_BLOCK_BYTES)
        data = prompt[: blocks * TEXT_BLOCK_BYTES] if blocks or not complete else prompt
        total = ex.content_length if ex.content_length is not None else len(scanner.buffer)
        return Request(
            model=scanner.model, origin=headers.get(ORIGIN_HEADER) or self.region,
            priority=headers.get(PRIORITY_HEADER) or "interactive", version=headers.get(VERSION_HEADER) or None,
            prompt_tokens=max(1, total // CHARS_PER_TOKEN), max_tokens=scanner.max_tokens or 256,
            session=headers.get(SESSION_HEADER) or None, prefix=block_hashes_from_bytes(data), block_tokens=TEXT_BLOCK_TOKENS,
            waited_ms=waited_ms,
        )

    def _deciding(self, ex: _Exchange) -> Generator[float, None, Decision]:
        metrics = self.metrics
        on_decision = (lambda d: metrics.decisions.inc(d.action, d.reason)) if metrics is not None else None
        decision = yield from deciding(self.router, lambda: self.snapshot, lambda held: self._request(ex, held),
                                       self.max_hold_ms, on_decision)
        if metrics is not None:
            metrics.decide_seconds.observe(time.perf_counter() - ex.started)
        return decision

    @staticmethod
    def _edits(ex: _Exchange, decision: Decision) -> list[tuple[int, int, bytes]]:
        """Byte edits of the body, last first: the deployment's model name, the
        shorter limit of a degrade (every limit key the client sent, else one added
        after the opening brace; the body has ended when the limit is set)."""
        scanner, edits = ex.scanner, []
        if decision.model != scanner.model and scanner.model_span is not None:
            edits.append((*scanner.model_span, json.dumps(decision.model).encode()))
        if decision.max_tokens is not None:
            limit = str(decision.max_tokens).encode()
            edits.extend((start, end, limit) for start, end in scanner.limit_spans)
            if not scanner.limit_spans and scanner.object_start is not None:
                at = scanner.object_start + 1
                edits.append((at, at, b'"max_tokens":' + limit + b","))
        return sorted(edits, reverse=True)

    def _route_answers(self, ex: _Exchange, decision: Decision) -> list:
        edits = self._edits(ex, decision)
        if not edits and ex.mode == STREAMED:  # the common answer: the same for every request to these hosts
            owed, ex.owed = ex.owed, []
            return ([self._routed_answer(decision.endpoint, decision.fallback_endpoints, decision.version)]
                    + [_CONTINUE_BODY] * len(owed))
        content_length = None
        if edits and ex.content_length is not None:
            content_length = ex.content_length + sum(len(new) - (end - start) for start, end, new in edits)
        mutation, metadata = self._destination(decision.endpoint, decision.fallback_endpoints, decision.version,
                                               content_length)
        owed, ex.owed = ex.owed, []
        body = b"".join(c for c, _ in owed)
        for start, stop, new in edits:  # last first: earlier offsets stay valid
            body = body[:start] + new + body[stop:]  # the owed chunks start at byte 0: nothing was answered before
        end = owed[-1][1]
        if ex.mode == BUFFERED:
            if edits:
                mutation.body_mutation.body = body
            return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=mutation),
                                          dynamic_metadata=metadata).SerializeToString()]
        answers = [pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=mutation),
                                         dynamic_metadata=metadata).SerializeToString()]
        if ex.mode == FULL_DUPLEX:
            answers.append(_echo(body, end))
        else:  # STREAMED with edits: the rewritten bytes replace the first owed chunk, the others are emptied
            answers.append(pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(body=body)))).SerializeToString())
            answers.extend([_CLEAR_BODY] * len(owed[1:]))
        return answers

    def _routed_answer(self, endpoint: str, fallbacks: tuple, version: Optional[str]) -> bytes:
        """The headers answer that routes to ``endpoint`` (``fallbacks`` in the
        metadata) served by ``version``, built once per destination."""
        routed = (endpoint, fallbacks, version)
        answer = self._routed.get(routed)
        if answer is None:
            if len(self._routed) >= 4096:  # bounded: fallback orders vary
                self._routed.clear()
            mutation, metadata = self._destination(endpoint, fallbacks, version)
            answer = self._routed[routed] = pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=mutation), dynamic_metadata=metadata).SerializeToString()
        return answer

    @staticmethod
    def _destination(endpoint: str, fallbacks: tuple, version: Optional[str],
                     content_length: Optional[int] = None) -> tuple:
        """The header mutation and ``envoy.lb`` metadata that send a request to
        ``endpoint`` (``fallbacks`` in the metadata), tagged with the ``version``
        that serves it (Envoy's route copies it onto the response; a client's own
        value is replaced or removed), with a new content-length when the body
        was edited."""
        primary = host_port(endpoint)
        hosts = [primary] + [host_port(e) for e in fallbacks]
        set_headers = [_header(DESTINATION_HEADER, primary)]
        if version:
            set_headers.append(_header(VERSION_HEADER, version))
        if content_length is not None:
            set_headers.append(_header("content-length", str(content_length)))
        mutation = pb.CommonResponse(header_mutation=pb.HeaderMutation(
            set_headers=set_headers, remove_headers=[] if version else [VERSION_HEADER]))
        metadata = struct_pb2.Struct(fields={LB_NAMESPACE: struct_pb2.Value(struct_value=struct_pb2.Struct(
            fields={DESTINATION_HEADER: struct_pb2.Value(string_value=",".join(hosts))}))})
        return mutation, metadata

    def _reject(self, ex: _Exchange, reject: Reject) -> bytes:
        """The immediate response that answers ``ex`` instead of routing it (its stream ends)."""
        ex.finished = True
        if self.metrics is not None:
            self.metrics.answers.inc(str(reject.status))
        return _immediate(reject.status, reject.message, reject.kind, reject.headers())

    # ------------------------------------------------------------ the response
    def _on_response_headers(self, ex: _Exchange, message: Message) -> bytes:
        try:
            status = int(message.headers.get(":status") or 0)
        except ValueError:
            status = 0
        served = self.replica_at(message.upstream) if message.upstream is not None else None
        if ex.response_body_mode == _MODES.NONE or message.end_of_stream:
            self._release(ex, ok=status < 500, replica=served)
        return _CONTINUE_RESPONSE_HEADERS

    def _release(self, ex: _Exchange, ok: bool, replica: Optional[str] = None) -> None:
        if ex.released or ex.decision is None:
            return
        ex.released = True
        self.router.complete(ex.decision, replica=replica, ok=ok)
        if self.metrics is not None:
            self.metrics.released.inc("true" if ok else "false")

    # ------------------------------------------------------------ the access log
    # With release_on="access_log" a routed request is released by its entry in
    # Envoy's gRPC access log, written when the response has ended (who served,
    # the status), found by Envoy's x-request-id. The doc's config does not send
    # the response to the picker, so Envoy ends the stream once the request is
    # through and the release waits for the entry; where the stream outlives the
    # response (a BUFFERED body) the entry waits for the stream's end instead.
    # A release whose entry never comes goes after release_after_s, or when more
    # than max_waiting wait (counted as expired).
    def wait_for_log(self, ex: _Exchange, release: Callable[[bool, Optional[str]], None]) -> bool:
        """Keep the release of a routed request whose stream has ended
        (``release(ok, served replica)``) for its access log entry, or release it
        now with the entry that came first; False (release now, as the stream's
        end) unless the picker releases from the log and the request has an id."""
        if self.release_on != "access_log":
            return False
        request_id = ex.headers.get(REQUEST_ID_HEADER)
        if not request_id:
            return False
        with self._log_lock:
            logged = self._logged_early.take(request_id)
            if logged is None:
                self._waiting.add(request_id, release)
            due = self._waiting.due()
        if logged is not None:
            release(*logged)
        self._expire(due)
        return True

    def waiting(self) -> int:
        """Routed requests waiting for their access log entry."""
        return len(self._waiting)

    def release_waiting(self) -> None:
        """Release every request still waiting for its entry (the picker stops: none will come)."""
        with self._log_lock:
            due = self._waiting.clear()
            self._logged_early.clear()
        self._expire(due, stopping=True)

    def access_log(self, data: bytes) -> None:
        """One message of Envoy's access log stream (a serialized
        ``StreamAccessLogsMessage``): each entry of a request the picker routed
        (its ``envoy.lb`` metadata) releases that request, with the replica that
        served (``upstream_remote_address``) and ``ok`` unless the status is 5xx
        (0, the client gone, is ok). Raises ValueError if it is not such a message."""
        try:
            entries = read_access_log(data)
        except WireError as err:
            raise ValueError(f"not an access log message ({err})") from None
        for request_id, status, upstream, routed in entries:
            if self.release_on != "access_log":
                outcome = "ignored"
            elif not routed:
                outcome = "not_routed"  # answered by the picker, or never reached it
            else:
                logged = (status < 500, self.replica_at(upstream) if upstream is not None else None)
                with self._log_lock:
                    release = self._waiting.take(request_id)
                    if release is None:  # its stream has not ended (or it was released at the response)
                        self._logged_early.add(request_id, logged)
                    self._logged_early.due()
                if release is not None:
                    release(*logged)
                outcome = "early" if release is None else "released"
            if self.metrics is not None:
                self.metrics.access_log.inc(outcome)
        with self._log_lock:
            due = self._waiting.due()
        self._expire(due)

    def _expire(self, due: list, stopping: bool = False) -> None:
        """Release ``due`` as ok, served unknown: counted as expired (and said once
        in the log) unless the picker is stopping."""
        if due and not stopping and not self._warned_expiry:
            self._warned_expiry = True
            log.warning("routed requests were released without their access log entry (after release_after_s, or "
                        "too many waited): is Envoy's access_log block (docs/integrations/envoy.md) sending to this "
                        "picker? Without one, run the picker with --release-on response")
        for release in due:
            release(True, None)
            if self.metrics is not None and not stopping:
                self.metrics.expired.inc()

    def access_log_stream(self) -> Callable[[Optional[bytes]], Optional[tuple]]:
        """A handler for one access log stream of the native transport (it answers nothing)."""
        def handle(data: Optional[bytes]) -> Optional[tuple]:
            if data is not None:
                self._access_log_message(data)
                return [], False
            return None

        return handle

    async def StreamAccessLogs(self, request_iterator, context) -> bytes:  # noqa: N802 (the gRPC method's name)
        """The grpc.aio transport's access log stream: serialized messages in, an
        empty ``StreamAccessLogsResponse`` when Envoy closes it."""
        async for data in request_iterator:
            self._access_log_message(data)
        return b""

    def _access_log_message(self, data: bytes) -> None:
        try:
            self.access_log(data)
        except ValueError:  # a bad message loses only itself: the stream (and the releases after it) go on
            if self.metrics is not None:
                self.metrics.stream_errors.inc()
            log.exception("unreadable access log message")


class _ById:
    """Items waiting for their counterpart by request id (a release for its access
    log entry, an entry for its stream's end), an id's namesakes oldest first;
    ``due()`` takes out those past ``max_age_s`` or over ``limit``. Its owner locks."""

    def __init__(self, max_age_s: float, limit: int) -> None:
        self.max_age_s, self.limit = max_age_s, limit
        self._by_id: dict[str, list[int]] = {}
        self._order: collections.OrderedDict = collections.OrderedDict()  # sequence -> (deadline, id, item)
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, request_id: str, item: Any) -> None:
        self._sequence += 1
        self._by_id.setdefault(request_id, []).append(self._sequence)
        self._order[self._sequence] = (time.monotonic() + self.max_age_s, request_id, item)

    def take(self, request_id: str) -> Any:
        """The oldest item for ``request_id``, taken out (None if there is none)."""
        sequences = self._by_id.get(request_id)
        if not sequences:
            return None
        return self._remove(sequences[0])

    def due(self) -> list:
        order, due, now = self._order, [], time.monotonic()
        while order:
            sequence = next(iter(order))
            if order[sequence][0] > now and len(order) <= self.limit:
                break
            due.append(self._remove(sequence))
        return due

    def clear(self) -> list:
        items = [item for _, _, item in self._order.values()]
        self._order.clear()
        self._by_id.clear()
        return items

    def _remove(self, sequence: int) -> Any:
        _, request_id, item = self._order.pop(sequence)
        sequences = self._by_id[request_id]
        sequences.remove(sequence)
        if not sequences:
            del self._by_id[request_id]
        return item


# ---------------------------------------------------------------- helpers
def _header(key: str, value: str):
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
                                      append_action=_OVERWRITE)


def _echo(chunk: bytes, end: bool) -> bytes:
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
        streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end))))).SerializeToString()


def _immediate(status: int, message: str, kind: str = "invalid_request_error", extra=()) -> bytes:
    body = error_body(status, message, kind)
    headers = [_header("content-type", "application/json")] + [_header(k, v) for k, v in extra]
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status), headers=pb.HeaderMutation(set_headers=headers), body=body,
        details=f"geoserve_{status}")).SerializeToString()


_REMOVE_DESTINATION = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse(
    header_mutation=pb.HeaderMutation(remove_headers=[DESTINATION_HEADER])))).SerializeToString()
_CLEAR_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
    body_mutation=pb.BodyMutation(clear_body=True)))).SerializeToString()


# ---------------------------------------------------------------- the server
def native_transport() -> bool:
    """Whether this install has the native transport (``geoserve._core.extproc``,
    built where gRPC C++ was found at install time; see setup.py)."""
    try:
        from .._core import extproc  # noqa: F401
    except ImportError:
        return False
    return True


TRANSPORTS = ("auto", "native", "aio")
_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_ACCESS_LOG_SERVICE = "envoy.service.accesslog.v3.AccessLogService"


class PickerServer:
    """The picker with everything around it: a gRPC server (ext_proc and the gRPC
    health service), the engine-signal poller with health hysteresis feeding a new
    snapshot every ``poll_interval_ms``, and Prometheus metrics on ``metrics_port``.

    ``transport``: ``native`` serves the stream on gRPC C++ threads that hand each
    message to the picker as bytes (``geoserve._core.extproc``; ~4x less CPU per
    request, docs/integrations/envoy.md); ``aio`` on ``grpc.aio`` in the event
    loop; ``auto`` (default) takes native where it was built. The picker's logic is
    the same object either way.

    ``await start()`` polls once before it listens, so the first request has a
    snapshot; ``await stop()`` stops everything it started.
    """

    def __init__(self, topology, *, region: str, host: str = "127.0.0.1", port: int = 0, policy=None,
                 poll_interval_ms: float = 200.0, poll_timeout_s: float = 0.5, metrics_port: Optional[int] = None,
                 health_policy=None, transport: str = "auto", **picker_options) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        if transport == "native" and not native_transport():
            raise RuntimeError("the native transport is not built in this install: gRPC C++ was not found when "
                               "geoserve was installed (Debian: apt-get install libgrpc++-dev pkg-config, then "
                               "reinstall geoserve), or use transport='aio'")
        self.transport = ("native" if native_transport() else "aio") if transport == "auto" else transport
        self.router = Router(topology, policy)
        self.metrics = PickerMetrics()
        self.picker = EndpointPicker(self.router, region=region, metrics=self.metrics, **picker_options)
        self.feed = SignalFeed(self.router, interval_ms=poll_interval_ms, timeout_s=poll_timeout_s,
                               health_policy=health_policy, on_snapshot=self.picker.install)
        self.health = self.feed.health
        self.host, self.port = host, port
        self.metrics_port = metrics_port
        self._server = None  # grpc.aio.Server or the native NativeServer
        self._metrics_server = None

    async def start(self) -> int:
        await self.feed.start()
        # room for a body of max_body_bytes in one message (BUFFERED), and the rest of the message
        max_message = self.picker.max_body_bytes + (64 << 10)
        if self.transport == "native":
            from .._core.extproc import NativeServer

            server = NativeServer(self.picker.native_stream,
                                  {f"/{_ACCESS_LOG_SERVICE}/StreamAccessLogs": self.picker.access_log_stream})
            self.port = server.start(self.host, self.port, max_message)
            for service in ("", _SERVICE):
                server.set_serving(service, True)
        else:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc

            server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                              ("grpc.max_receive_message_length", max_message)])
            # bytes in and out: the picker reads and writes the messages itself, as on the native transport
            server.add_generic_rpc_handlers((
                grpc.method_handlers_generic_handler(_SERVICE, {
                    "Process": grpc.stream_stream_rpc_method_handler(self.picker.Process)}),
                grpc.method_handlers_generic_handler(_ACCESS_LOG_SERVICE, {
                    "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(self.picker.StreamAccessLogs)})))
            self.health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
            self.port = server.add_insecure_port(f"{self.host}:{self.port}")
            await server.start()
            for service in ("", _SERVICE):
                await self.health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(self.metrics_port, addr=self.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_address[1]
        return self.port

    async def stop(self) -> None:
        """Health NOT_SERVING, then stop listening: open streams get 0.5 s to end,
        then are cancelled (each releases its router state, as do the requests
        still waiting for their access log entries)."""
        await self.feed.stop()
        server, self._server = self._server, None
        if server is not None:
            if self.transport == "native":  # waits for its streams' handlers, off the event loop
                for service in ("", _SERVICE):
                    server.set_serving(service, False)
                await asyncio.get_running_loop().run_in_executor(None, server.stop, 0.5)
            else:
                from grpc_health.v1 import health_pb2

                for service in ("", _SERVICE):
                    await self.health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
                await server.stop(grace=0.5)
            self.picker.release_waiting()  # their access log entries will not reach a stopped picker
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
