"""The picker's side of the ext_proc protocol, message by message (no Envoy): when it
answers, in which order, and what it writes. The end-to-end behaviour with a real
Envoy is in test_envoy_picker.py."""

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

import geoserve as g  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from builders import access_log  # noqa: E402
from geoserve.integrations.envoy import DESTINATION_HEADER, EndpointPicker  # noqa: E402

MODES = pm.ProcessingMode


def picker(fallback: bool = False, degrade_max_tokens=None, **options) -> EndpointPicker:
    def dep(model, region, ids, slots=8):
        return g.Deployment(model=model, version="v1", region=region, decode_slots=slots,
                            replicas=tuple(g.ReplicaSpec(id=i, endpoint=f"10.0.{int(model == 'small')}.{k + 1}:8000")
                                           for k, i in enumerate(ids)))

    deployments = [dep("big", "us", ("b0", "b1"))] + ([dep("small", "us", ("s0",))] if fallback else [])
    classes = {"interactive": g.PriorityClass(800.0, 1200.0, 1.0, degrade_max_tokens=degrade_max_tokens)}
    router = g.Router(g.Topology(regions=("us",), rtt_ms=((2.0,),), deployments=tuple(deployments),
                                 fallbacks={"big": "small"} if fallback else {}, priorities=classes))
    p = EndpointPicker(router, region="us", **options)
    n = router.fleet.n_replicas
    busy = np.array([8 if rid.startswith("b") and fallback else 0 for rid in router.fleet.replica_ids], np.int32)
    p.update(g.SignalColumns(now_ms=0.0, observed_ms=np.zeros(n), in_flight=busy, queue_depth=busy))
    return p


def headers(pairs, mode=MODES.STREAMED):
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, send_body_without_waiting_for_header_response=True))


def chunk(data: bytes, end: bool):
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


class AioStream:
    """The grpc.aio transport's side: feeds messages to ``Process`` one at a time
    and collects what the picker answers to each."""

    def __init__(self, p: EndpointPicker) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.answers: list = []
        self.task = asyncio.ensure_future(self._run(p))

    async def _iterate(self):
        while True:
            message = await self.queue.get()
            if message is None:
                return
            yield message

    async def _run(self, p) -> None:
        async for answer in p.Process(self._iterate(), None):  # bytes both ways, as grpc.aio hands them
            self.answers.append(pb.ProcessingResponse.FromString(answer))

    async def send(self, message) -> list:
        before = len(self.answers)
        await self.queue.put(message.SerializeToString())
        for _ in range(5):
            await asyncio.sleep(0)
        return [a.WhichOneof("response") for a in self.answers[before:]]

    async def close(self) -> None:
        await self.queue.put(None)
        await self.task

    async def ended(self) -> None:  # the picker ended the stream itself
        await self.task


class BytesStream:
    """The native transport's side: the handler of ``native_stream()`` fed
    serialized messages, as the gRPC C++ server's thread feeds it (the compiled
    stream kernel where built)."""

    compiled = None

    def __init__(self, p: EndpointPicker) -> None:
        self.handle = p.native_stream(compiled=self.compiled)
        self.answers: list = []
        self.done = False
        self.standing: dict = {}  # first byte -> (answer, notify): answered by the transport, as extproc_pump.h does
        self.answered_by_transport = 0

    async def send(self, message) -> list:
        assert not self.done, "the picker had ended this stream"
        data = message.SerializeToString()
        standing = self.standing.get(data[0])
        if standing is not None and not standing[1]:
            out = [standing[0]]
        else:
            out, self.done, *more = self.handle(data)
            for tag, answer, notify in (more[0] or () if more else ()):
                self.standing[tag] = (answer, notify)
            if standing is not None:  # notified after the transport's answer: the picker's must be the same
                assert out == [standing[0]]
        self.answered_by_transport += standing is not None
        answers = [pb.ProcessingResponse.FromString(a) for a in out]
        self.answers.extend(answers)
        return [a.WhichOneof("response") for a in answers]

    async def close(self) -> None:
        assert self.handle(None) is None

    async def ended(self) -> None:
        assert self.done
        await self.close()


class PythonBytesStream(BytesStream):
    """The same with the Python handler (the stream kernel's twin)."""

    compiled = False


@pytest.fixture(params=[AioStream, BytesStream, PythonBytesStream], ids=["aio", "native-handler", "python-handler"])
def Stream(request):  # noqa: N802 (a class, chosen per run)
    return request.param


def destination(answer) -> str:
    response = answer.request_headers.response if answer.HasField("request_headers") else answer.request_body.response
    return {h.header.key: h.header.raw_value.decode() for h in response.header_mutation.set_headers}[DESTINATION_HEADER]


def test_decides_on_the_first_chunks_of_a_long_body_and_acks_the_rest(Stream):
    async def run():
        p = picker()
        body = json.dumps({"model": "big", "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
        s = Stream(p)
        assert await s.send(headers([("content-length", str(len(body)))])) == []  # held
        assert await s.send(chunk(body[:2048], False)) == []  # model known, 16 blocks not yet
        got = await s.send(chunk(body[2048:8192], False))
        assert got == ["request_headers", "request_body", "request_body"]  # decided: headers, then the two chunks
        assert destination(s.answers[0]) in ("10.0.0.1:8000", "10.0.0.2:8000")
        lb = s.answers[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields[DESTINATION_HEADER].string_value
        assert lb.split(",")[0] == destination(s.answers[0]) and len(lb.split(",")) == 2  # primary, then fallback
        for i in range(8192, len(body), 16384):
            assert await s.send(chunk(body[i:i + 16384], i + 16384 >= len(body))) == ["request_body"]
        if isinstance(s, BytesStream):  # the rest was acknowledged by the transport, not the picker
            assert s.answered_by_transport == len(range(8192, len(body), 16384))
        await s.close()

    asyncio.run(run())


def test_degrade_rewrites_the_model_and_content_length(Stream):
    async def run():
        p = picker(fallback=True)  # every big replica is full: the request degrades to small
        body = b'{"model": "big", "prompt": "hello", "max_tokens": 8}'
        s = Stream(p)
        await s.send(headers([("content-length", str(len(body)))]))
        assert await s.send(chunk(body[:10], False)) == []
        assert await s.send(chunk(body[10:], True)) == ["request_headers", "request_body", "request_body"]
        first = s.answers[0].request_headers.response
        set_headers = {h.header.key: h.header.raw_value.decode() for h in first.header_mutation.set_headers}
        new_body = s.answers[1].request_body.response.body_mutation.body
        assert json.loads(new_body)["model"] == "small"
        assert set_headers["content-length"] == str(len(new_body))
        assert destination(s.answers[0]) == "10.0.1.1:8000"
        assert s.answers[2].request_body.response.body_mutation.clear_body  # the second chunk's bytes moved to the first
        await s.close()

    asyncio.run(run())


@pytest.mark.parametrize("tail, keys", [(b', "max_tokens": 500}', ("max_tokens",)),
                                        (b', "max_completion_tokens": 500, "max_tokens": 400}',
                                         ("max_completion_tokens", "max_tokens")),
                                        (b"}", ("max_tokens",))])
def test_a_degrade_that_shortens_the_answer_sets_the_limit_even_after_the_prompt(Stream, tail, keys):
    async def run():
        p = picker(fallback=True, degrade_max_tokens=64)
        head = json.dumps({"model": "big", "prompt": "y" * 6000}).encode()[:-1]  # the limit, if any, after the prompt
        body = head + tail
        s = Stream(p)
        await s.send(headers([("content-length", str(len(body)))]))
        assert await s.send(chunk(body[:5000], False)) == []  # decided (16 blocks): held for the limit
        assert await s.send(chunk(body[5000:], True)) == ["request_headers", "request_body", "request_body"]
        set_headers = {h.header.key: h.header.raw_value.decode()
                       for h in s.answers[0].request_headers.response.header_mutation.set_headers}
        new_body = s.answers[1].request_body.response.body_mutation.body
        sent = json.loads(new_body)
        assert sent["model"] == "small" and all(sent[k] == 64 for k in keys)
        assert set_headers["content-length"] == str(len(new_body))
        await s.close()

    asyncio.run(run())


def test_buffered_mode_answers_headers_first_and_routes_on_the_body(Stream):
    async def run():
        p = picker()
        s = Stream(p)
        got = await s.send(headers([("x-gateway-destination-endpoint", "6.6.6.6:1")], MODES.BUFFERED))
        assert got == ["request_headers"]
        removed = s.answers[0].request_headers.response.header_mutation.remove_headers
        assert list(removed) == [DESTINATION_HEADER]  # the client's header goes at once
        assert await s.send(chunk(b'{"model": "big", "prompt": "hi"}', True)) == ["request_body"]
        assert destination(s.answers[1]) in ("10.0.0.1:8000", "10.0.0.2:8000")
        await s.close()

    asyncio.run(run())


def test_a_streamed_config_without_early_body_is_refused_clearly(Stream):
    async def run():
        p = picker()
        s = Stream(p)
        message = headers([])
        message.protocol_config.send_body_without_waiting_for_header_response = False
        assert await s.send(message) == ["immediate_response"]
        assert s.answers[0].immediate_response.status.code == 500
        await s.ended()

    asyncio.run(run())


def routed_headers(answer) -> dict:
    response = answer.request_headers.response if answer.HasField("request_headers") else answer.request_body.response
    return {h.header.key: h.header.raw_value.decode() for h in response.header_mutation.set_headers}


def upstream_attributes(address: str) -> dict:
    from google.protobuf import struct_pb2

    attributes = struct_pb2.Struct()
    attributes.update({"upstream.address": address})
    return {"envoy.filters.http.ext_proc": attributes}


def test_the_routed_request_carries_the_serving_version_and_the_response_headers_release(Stream):
    """The version that serves rides on the routed request (Envoy's route copies it
    onto the response, for the client to pin its session with); the response headers,
    where Envoy sends them, release the router's state and are answered plainly."""
    async def run():
        p = picker()
        s = Stream(p)
        await s.send(headers([]))
        await s.send(chunk(b'{"model": "big", "prompt": "hi"}', True))
        assert int(p.router.state.pending.sum()) == 1  # routed: one in flight on the chosen replica
        assert routed_headers(s.answers[0])["x-geoserve-version"] == "v1"
        response = pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200")])),
            attributes=upstream_attributes(destination(s.answers[0])))
        assert await s.send(response) == ["response_headers"]
        assert s.answers[-1] == pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        assert int(p.router.state.pending.sum()) == 0  # released
        await s.close()
        assert p.waiting() == 0

    asyncio.run(run())


async def routed_stream(p, Stream, request_id: str, prompt: str = "hi"):
    """A request routed and its stream ended by Envoy (the response not sent to the picker)."""
    s = Stream(p)
    await s.send(headers([("x-request-id", request_id)]))
    await s.send(chunk(json.dumps({"model": "big", "prompt": prompt}).encode(), True))
    await s.close()
    return destination(s.answers[0])


def test_the_access_log_entry_releases_a_request_whose_stream_ended_first(Stream):
    """Envoy's config does not send the response: the stream ends once the request
    is through, and the request's access log entry (its x-request-id) releases it
    when the response has ended - not the stream's end, not an entry of a request
    the picker did not route, not the same entry twice."""
    async def run():
        from geoserve.integrations.envoy import PickerMetrics

        p = picker(metrics=PickerMetrics())
        served = await routed_stream(p, Stream, "rid-1")
        assert int(p.router.state.pending.sum()) == 1 and p.waiting() == 1  # the stream is gone, the request not
        p.access_log(access_log(("rid-1", 200, served, False)))  # an entry the picker did not route: ignored
        assert int(p.router.state.pending.sum()) == 1
        p.access_log(access_log(("rid-2", 200, served, True), ("rid-1", 200, served, True)))
        assert int(p.router.state.pending.sum()) == 0 and p.waiting() == 0
        p.access_log(access_log(("rid-1", 200, served, True)))  # again: nothing left to release
        assert int(p.router.state.pending.sum()) == 0
        counted = {s.labels["outcome"]: s.value for m in p.metrics.registry.collect()
                   if m.name.endswith("access_log_entries") for s in m.samples if s.name.endswith("_total")}
        assert counted == {"not_routed": 1.0, "early": 2.0, "released": 1.0}

    asyncio.run(run())


def test_the_access_log_says_who_served_and_how_it_went():
    """The entry's upstream and status go to Router.complete, as the response
    headers' do: a 5xx is not ok, a request served by another replica (Envoy's
    retry to a fallback) records its prefix there."""
    async def run():
        p = picker()
        calls = []
        complete = p.router.complete
        p.router.complete = lambda decision, replica=None, ok=True: (calls.append((replica, ok)),
                                                                     complete(decision, replica=replica, ok=ok))
        first = await routed_stream(p, PythonBytesStream, "a")
        other = next(e for e in ("10.0.0.1:8000", "10.0.0.2:8000") if e != first)
        await routed_stream(p, PythonBytesStream, "b")
        await routed_stream(p, PythonBytesStream, "c")
        p.access_log(access_log(("a", 503, first, True), ("b", 200, other, True), ("c", 0, None, True)))
        by_endpoint = {e: rid for rid, e in zip(p.router.fleet.replica_ids, p.router.fleet.endpoints)}
        assert calls == [(by_endpoint[first], False), (by_endpoint[other], True), (None, True)]

    asyncio.run(run())


def test_an_entry_that_comes_before_its_stream_ends_releases_it_at_the_end(Stream):
    """Where the stream outlives the response (Envoy keeps a BUFFERED body's stream
    open to the HTTP stream's end), the entry is kept for the stream's end."""
    async def run():
        from geoserve.integrations.envoy import PickerMetrics

        p = picker(metrics=PickerMetrics())
        s = Stream(p)
        await s.send(headers([("x-request-id", "rid")]))
        await s.send(chunk(b'{"model": "big", "prompt": "hi"}', True))
        served = destination(s.answers[0])
        p.access_log(access_log(("rid", 503, served, True)))
        assert int(p.router.state.pending.sum()) == 1 and p.waiting() == 0  # not released before its stream ends
        await s.close()
        assert int(p.router.state.pending.sum()) == 0 and p.waiting() == 0
        released = {s.labels["ok"]: s.value for m in p.metrics.registry.collect() if m.name.endswith("released")
                    for s in m.samples if s.name.endswith("_total")}
        assert released == {"false": 1.0}  # as the entry said: a 503

    asyncio.run(run())


def test_requests_that_share_an_id_are_released_one_entry_each(Stream):
    async def run():
        p = picker()
        served = [await routed_stream(p, Stream, "same", prompt) for prompt in ("one", "two")]
        assert p.waiting() == 2
        p.access_log(access_log(("same", 200, served[0], True)))
        assert p.waiting() == 1 and int(p.router.state.pending.sum()) == 1
        p.access_log(access_log(("same", 200, served[1], True)))
        assert p.waiting() == 0 and int(p.router.state.pending.sum()) == 0

    asyncio.run(run())


def test_a_request_whose_entry_never_comes_is_released_after_a_while_or_when_too_many_wait(Stream, monkeypatch):
    """Counted as expired, and said once in the log (an Envoy without the access log
    block is the likely cause); releases at the picker's stop are neither."""
    from geoserve.integrations import envoy
    from geoserve.integrations.envoy import PickerMetrics

    warnings = []
    monkeypatch.setattr(envoy.log, "warning", lambda message, *args: warnings.append(message % args))

    async def run():
        p = picker(max_waiting=2)
        for k in range(3):
            await routed_stream(p, Stream, f"r{k}")
        assert p.waiting() == 2 and int(p.router.state.pending.sum()) == 2  # the oldest made room
        assert len(warnings) == 1  # the first picker's
        warnings.clear()
        p = picker(release_after_s=0.01, metrics=PickerMetrics())
        for k in range(2):
            await routed_stream(p, Stream, f"r{k}")
        await asyncio.sleep(0.05)
        p.access_log(access_log())  # any message looks at the deadlines
        assert p.waiting() == 0 and int(p.router.state.pending.sum()) == 0
        assert p.metrics.expired.get() == 2
        await routed_stream(p, Stream, "at-the-stop")
        p.release_waiting()
        assert p.waiting() == 0 and p.metrics.expired.get() == 2
        assert len(warnings) == 1 and "without their access log entry" in warnings[0]  # two expired, said once

    asyncio.run(run())


def test_without_a_request_id_or_when_releasing_on_the_response_the_stream_end_releases(Stream):
    async def run():
        p = picker()
        await routed_stream(p, Stream, "")  # no x-request-id: nothing could match an entry
        assert p.waiting() == 0 and int(p.router.state.pending.sum()) == 0
        p = picker(release_on="response")
        await routed_stream(p, Stream, "rid")
        assert p.waiting() == 0 and int(p.router.state.pending.sum()) == 0
        p.access_log(access_log(("rid", 200, None, True)))  # not used for releases
        assert p.waiting() == 0 and int(p.router.state.pending.sum()) == 0

    asyncio.run(run())


def test_a_bad_access_log_message_is_refused_and_loses_only_itself():
    p = picker()
    with pytest.raises(ValueError, match="not an access log message"):
        p.access_log(b"\xff\xff\xff")
    handle = p.access_log_stream()
    assert handle(b"\xff\xff\xff") == ([], False)  # counted and logged; the stream goes on
    assert handle(access_log(("x", 200, None, True))) == ([], False)
    assert handle(None) is None
    with pytest.raises(ValueError, match="release_on"):
        EndpointPicker(p.router, region="us", release_on="never")


def test_a_queue_decision_is_held_on_either_transport_then_routed_or_refused(Stream):
    """A batch request over its class's ceiling is queued: the picker holds it
    ``retry_after_ms`` (asyncio.sleep on grpc.aio, the stream's own thread on the
    native transport) and decides again on the snapshot of that time; past
    ``max_hold_ms`` it answers 429 with retry-after."""
    import threading
    import time

    def busy_picker(max_hold_ms):
        router = g.Router(g.Topology(regions=("us",), rtt_ms=((2.0,),), deployments=(g.Deployment(
            model="big", version="v1", region="us", decode_slots=8,
            replicas=tuple(g.ReplicaSpec(id=f"b{k}", endpoint=f"10.0.0.{k + 1}:8000") for k in range(2))),)))
        p = EndpointPicker(router, region="us", max_hold_ms=max_hold_ms)
        p.update(g.SignalColumns(now_ms=0.0, observed_ms=np.zeros(2), in_flight=np.full(2, 7, np.int32),
                                 queue_depth=np.zeros(2, np.int32)))  # 7/8: over batch's 0.8 ceiling
        return p

    idle = g.SignalColumns(now_ms=1.0, observed_ms=np.ones(2), in_flight=np.zeros(2, np.int32),
                           queue_depth=np.zeros(2, np.int32))
    body = b'{"model": "big", "prompt": "nightly report", "max_tokens": 8}'

    async def run():
        p = busy_picker(2000.0)
        threading.Timer(0.05, p.update, (idle,)).start()  # the next poll finds room
        s = Stream(p)
        await s.send(headers([("x-geoserve-priority", "batch")]))
        t0 = time.monotonic()
        got = await s.send(chunk(body, True))
        for _ in range(200):  # the aio stream answers from its task once the hold is over
            if got:
                break
            await asyncio.sleep(0.01)
            got = [a.WhichOneof("response") for a in s.answers]
        assert got == ["request_headers", "request_body"]
        assert time.monotonic() - t0 >= 0.8  # held retry_after_ms (803 ms), then routed
        assert destination(s.answers[0]) in ("10.0.0.1:8000", "10.0.0.2:8000")
        await s.close()

        p = busy_picker(500.0)  # the wait does not fit: 429 now, not after a hold
        s = Stream(p)
        await s.send(headers([("x-geoserve-priority", "batch")]))
        assert await s.send(chunk(body, True)) == ["immediate_response"]
        answer = s.answers[0].immediate_response
        assert answer.status.code == 429
        assert [(h.header.key, h.header.raw_value) for h in answer.headers.set_headers][1] == ("retry-after", b"1")
        await s.ended()

    asyncio.run(run())


def test_the_metrics_expose_what_was_counted_from_many_threads():
    """The picker's counters are plain numbers under a lock, turned into Prometheus
    samples when scraped: counts from several threads add up, a histogram's
    buckets are cumulative with Prometheus' le, unlabelled counters show 0."""
    import threading

    from prometheus_client import generate_latest

    from geoserve.integrations.envoy import PickerMetrics

    m = PickerMetrics()

    def work():
        for _ in range(2000):
            m.decisions.inc("serve", "affinity")
            m.active.inc()
            m.active.dec()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seconds in (0.0001, 0.0003, 2.0):
        m.decide_seconds.observe(seconds)
    text = generate_latest(m.registry).decode()
    assert 'geoserve_picker_decisions_total{action="serve",reason="affinity"} 8000.0' in text
    assert "geoserve_picker_active_streams 0.0" in text and "geoserve_picker_stream_errors_total 0.0" in text
    assert 'geoserve_picker_decision_seconds_bucket{le="0.0001"} 1.0' in text  # le: a value on the bound is in
    assert 'geoserve_picker_decision_seconds_bucket{le="0.0005"} 2.0' in text
    assert 'geoserve_picker_decision_seconds_bucket{le="+Inf"} 3.0' in text
    assert "geoserve_picker_decision_seconds_count 3.0" in text
