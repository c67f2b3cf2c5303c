"""The Envoy picker's stream kernel (``_core/pickstream.pyx``) against its twin, the
picker's Python handler: two pickers with the same topology and signals, one
stream's messages fed to each as the native transport feeds them (a standing
answer given without a call, a notified one checked against the handler's), and
after every message the same answers, the same end, the same standing answers;
after every stream the same router state and the same metrics.

The streams are drawn to reach every way out of the kernel's common path: other
body modes and a STREAMED config without early bodies, bad or oversized
content-length, bodies without a model, with an unknown model, an alias, a bad
limit, invalid JSON or over the size limit, priorities and origins unknown, a
version pin, a fleet that degrades (to another model, or with a shorter answer),
queues and sheds, and responses served by another replica, failed, or never
reaching the picker - released then by the request's access log entry (served by
either, by neither, failed), by none (left waiting), or at the stream's end."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

import geoserve as g  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from builders import access_log  # noqa: E402
from geoserve import _compat  # noqa: E402
from geoserve.integrations.envoy import EndpointPicker, PickerMetrics  # noqa: E402

pytestmark = pytest.mark.skipif(_compat.compiled_pickstream is None, reason="the compiled kernels are not built")
MODES = pm.ProcessingMode
ENDPOINTS = {"b0": "10.0.0.1:8000", "b1": "10.0.0.2:8000", "e0": "10.1.0.1:8000", "s0": "10.0.9.1:8000"}


def topology(degrade_max_tokens):
    def dep(model, region, ids, version="v1"):
        return g.Deployment(model=model, version=version, region=region, decode_slots=8,
                            replicas=tuple(g.ReplicaSpec(id=i, endpoint=ENDPOINTS[i]) for i in ids))

    classes = {"interactive": g.PriorityClass(800.0, 1200.0, 1.0, degrade_max_tokens=degrade_max_tokens),
               "batch": g.PriorityClass(5000.0, 20000.0, 0.8)}
    return g.Topology(regions=("us", "eu"), rtt_ms=((2.0, 80.0), (80.0, 2.0)),
                      deployments=(dep("big", "us", ("b0", "b1")), dep("big", "eu", ("e0",)),
                                   dep("small", "us", ("s0",), "v2")),
                      fallbacks={"big": "small"}, aliases={"llama": "big"}, priorities=classes)


def picker(topo, busy, prefix_blocks):
    router = g.Router(topo)
    p = EndpointPicker(router, region="us", max_body_bytes=6000, prefix_blocks=prefix_blocks, max_hold_ms=0.0,
                       metrics=PickerMetrics())
    n = router.fleet.n_replicas
    load = np.array(busy[:n], np.int32)
    p.update(g.SignalColumns(now_ms=0.0, observed_ms=np.zeros(n), in_flight=load, queue_depth=load))
    return p


def headers_message(pairs, mode, early, end):
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]), end_of_stream=end),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode,
                                                 send_body_without_waiting_for_header_response=early))


def response_message(status, upstream, end):
    attributes = {}
    if upstream is not None:
        s = struct_pb2.Struct()
        s.update({"upstream.address": upstream})
        attributes = {"envoy.filters.http.ext_proc": s}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=status.encode())]), end_of_stream=end), attributes=attributes)


@st.composite
def streams(draw):
    mode = draw(st.sampled_from([MODES.STREAMED] * 6 + [MODES.BUFFERED, MODES.FULL_DUPLEX_STREAMED]))
    early = draw(st.sampled_from([True] * 9 + [False]))
    fields = {}
    model = draw(st.sampled_from(["big"] * 5 + ["small", "llama", "nope", None, 5]))
    if model is not None:
        fields["model"] = model
    text = "q" * draw(st.integers(0, 5000))
    if draw(st.booleans()):
        fields["prompt"] = text
    else:
        fields["messages"] = [{"role": "user", "content": text}]
    limit = draw(st.sampled_from([None, None, 8, 0, 300, -1, "x"]))
    if limit is not None:
        fields["max_tokens"] = limit
    items = list(fields.items())
    if draw(st.booleans()):
        items.reverse()  # the limit or the model after the prompt
    body = json.dumps(dict(items)).encode()
    if draw(st.integers(0, 19)) == 0:
        body = body[:-1] + b",}"  # not JSON
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=3, unique=True)))
    chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    pairs = []
    length = draw(st.sampled_from(["exact"] * 6 + [None, "abc", "99999999"]))
    if length is not None:
        pairs.append(("content-length", str(len(body)) if length == "exact" else length))
    for key, values in (("x-session-id", ["s1", "s2"]), ("x-geoserve-priority", ["interactive", "batch", "vip"]),
                        ("x-geoserve-origin", ["us", "eu", "mars"]), ("x-geoserve-version", ["v1", "v9"]),
                        ("x-request-id", ["r1", "r2", "r3"]), ("x-request-id", ["r1", "r2", "r3"])):
        if draw(st.integers(0, 3)) == 0:
            pairs.append((key, draw(st.sampled_from(values))))
    messages = [headers_message(pairs, mode, early, draw(st.integers(0, 24)) == 0)]
    messages += [pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(chunks) - 1))
                 for i, c in enumerate(chunks)]
    if draw(st.integers(0, 3)):
        upstream = draw(st.sampled_from([None, "routed", "10.0.0.1:8000", "10.0.0.2:8000", "10.9.9.9:1"]))
        messages.append(("response", draw(st.sampled_from(["200", "200", "503", "x"])), upstream,
                         draw(st.booleans())))
    stop = draw(st.integers(1, len(messages)))  # the stream may end early (the client gone)
    logged = draw(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.sampled_from([200, 200, 503, 0]),
                                     st.sampled_from([None, "routed", "10.0.0.1:8000", "10.0.9.1:8000", "10.9.9.9:1"]),
                                     st.booleans()), max_size=2))  # access log entries after the stream
    return messages[:stop], logged


class Transport:
    """A stream as extproc_pump.h drives it: standing answers given without a call
    (a notified one still hands the message over, after the answer)."""

    def __init__(self, handle):
        self.handle, self.standing, self.done = handle, {}, False

    def send(self, data):
        standing = self.standing.get(data[0])
        if standing is not None and not standing[1]:
            return ("standing", standing[0])
        out = self.handle(data)
        self.done = out[1]
        for tag, answer, notify in (out[2] or () if len(out) > 2 else ()):
            self.standing[tag] = (answer, notify)
        return out


def state_of(p):
    st_ = p.router.state
    return [st_.epoch] + [np.array(getattr(st_, name)).tobytes() for name in (
        "pending", "pending_prefill_ms", "prefill_until_ms", "prefill_ewma_ms", "spill_pair", "spill_total", "queued",
        "prefix")]


def metrics_of(p):
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for metric in p.metrics.registry.collect()
                  for s in metric.samples
                  if not s.name.startswith("geoserve_picker_decision_seconds") and not s.name.endswith("_created"))


@given(runs=st.lists(streams(), min_size=1, max_size=4), busy=st.lists(st.integers(0, 9), min_size=4, max_size=4),
       degrade_max_tokens=st.sampled_from([None, 64]), prefix_blocks=st.sampled_from([1, 4, 16]))
def test_the_kernel_answers_as_the_python_handler(runs, busy, degrade_max_tokens, prefix_blocks):
    topo = topology(degrade_max_tokens)
    kernel_picker, python_picker = picker(topo, busy, prefix_blocks), picker(topo, busy, prefix_blocks)
    for messages, logged in runs:
        kernel = Transport(kernel_picker.native_stream(compiled=True))
        python = Transport(python_picker.native_stream(compiled=False))
        assert type(kernel.handle).__name__ == "Stream"
        routed = {}
        for message in messages:
            if isinstance(message, tuple):  # the response, to where the request went
                _, status, upstream, end = message
                if upstream == "routed":
                    upstream = routed.get("endpoint")
                message = response_message(status, upstream, end)
            data = message.SerializeToString()
            got, expected = kernel.send(data), python.send(data)
            assert got == expected, message
            for answer in got[0] if got[0] != "standing" else ():
                decoded = pb.ProcessingResponse.FromString(answer)
                if decoded.HasField("request_headers"):
                    for h in decoded.request_headers.response.header_mutation.set_headers:
                        if h.header.key == "x-gateway-destination-endpoint":
                            routed["endpoint"] = h.header.raw_value.decode()
            if kernel.done:
                break
        assert kernel.handle(None) is None and python.handle(None) is None
        assert kernel_picker.waiting() == python_picker.waiting()
        assert state_of(kernel_picker) == state_of(python_picker)
        entries = [(rid, status, routed.get("endpoint") if upstream == "routed" else upstream, by_picker)
                   for rid, status, upstream, by_picker in logged]
        for p in (kernel_picker, python_picker):
            p.access_log(access_log(*entries))
        assert kernel_picker.waiting() == python_picker.waiting()
        assert state_of(kernel_picker) == state_of(python_picker)
        assert metrics_of(kernel_picker) == metrics_of(python_picker)
    assert kernel_picker.metrics.active.get() == 0


@pytest.mark.skipif(_compat.FORCED_TWIN, reason="the kernel routes through the compiled router, forced off here")
def test_the_common_request_never_reaches_python():
    """A plain route is the kernel's alone: no call into the Python handler."""
    p = picker(topology(None), [0, 0, 0, 0], 16)
    calls = []
    original = p._handler
    p._handler = lambda ex: calls.append(ex) or original(ex)
    body = json.dumps({"model": "big", "prompt": "hello " * 100}).encode()
    t = Transport(p.native_stream(compiled=True))
    t.send(headers_message([("content-length", str(len(body)))], MODES.STREAMED, True, False).SerializeToString())
    out = t.send(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)).SerializeToString())
    assert len(out[0]) == 2 and out[2] is not None  # routed: the destination, the chunk acknowledged, standing answers
    routed = pb.ProcessingResponse.FromString(out[0][0]).request_headers.response.header_mutation.set_headers[0]
    t.send(response_message("200", routed.header.raw_value.decode(), False).SerializeToString())
    assert t.handle(None) is None
    assert calls == [] and int(p.router.state.pending.sum()) == 0


@pytest.mark.parametrize("change", ["drop-routed", "drop-other", "add"])
@pytest.mark.parametrize("served", ["routed", "none", "other"])
def test_a_membership_change_between_routing_and_release(change, served):
    """The fleet changes while a routed request is in flight (the replica that took
    it removed, another removed, one added): the response's release lands as the
    Python handler's does, on the new fleet's state."""
    topo = topology(None)
    pickers = [picker(topo, [0, 0, 0, 0], 16) for _ in range(2)]
    body = json.dumps({"model": "big", "prompt": "hello " * 100}).encode()
    head = headers_message([("content-length", str(len(body)))], MODES.STREAMED, True, False).SerializeToString()
    chunk = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)).SerializeToString()
    streams = [Transport(p.native_stream(compiled=c)) for p, c in zip(pickers, (True, False))]
    outs = [(s.send(head), s.send(chunk)) for s in streams]
    assert outs[0] == outs[1]
    answer = pb.ProcessingResponse.FromString(outs[0][1][0][0])
    endpoint = answer.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    routed_id = next(k for k, v in ENDPOINTS.items() if v == endpoint)
    deployments = list(topo.deployments)
    us_big = deployments[0]
    if change == "add":
        extra = g.ReplicaSpec(id="b9", endpoint="10.0.0.9:8000")
        deployments[0] = g.Deployment(model="big", version="v1", region="us", decode_slots=8,
                                      replicas=us_big.replicas + (extra,))
    else:
        assert routed_id in {r.id for r in us_big.replicas}  # an idle fleet: the origin's own replicas
        drop = routed_id if change == "drop-routed" else next(r.id for r in us_big.replicas if r.id != routed_id)
        deployments[0] = g.Deployment(model="big", version="v1", region="us", decode_slots=8,
                                      replicas=tuple(r for r in us_big.replicas if r.id != drop))
    new = g.Topology(regions=topo.regions, rtt_ms=topo.rtt_ms, deployments=tuple(deployments),
                     fallbacks=topo.fallbacks, aliases=topo.aliases, priorities=topo.priorities)
    for p in pickers:
        p.router.update_topology(new)
        n = p.router.fleet.n_replicas
        p.update(g.SignalColumns(now_ms=1.0, observed_ms=np.ones(n), in_flight=np.zeros(n, np.int32),
                                 queue_depth=np.zeros(n, np.int32)))
    upstream = {"routed": endpoint, "none": None, "other": "10.1.0.1:8000"}[served]
    response = response_message("200", upstream, False).SerializeToString()
    assert streams[0].send(response) == streams[1].send(response)
    assert streams[0].handle(None) is None and streams[1].handle(None) is None
    assert state_of(pickers[0]) == state_of(pickers[1])
    assert metrics_of(pickers[0]) == metrics_of(pickers[1])
