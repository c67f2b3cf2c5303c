"""The picker's native transport (geoserve._core.extproc) on its own, against a
real gRPC client on 127.0.0.1: it moves bytes in order between a stream and that
stream's handler, ends streams as the handler says, turns a failing handler into
INTERNAL without losing the stream's close, serves gRPC health, and stops with
streams still open. The picker over it, with a real Envoy, is test_envoy_picker.py."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

grpc = pytest.importorskip("grpc")

from geoserve.integrations.envoy import native_transport  # noqa: E402

if not native_transport():
    if os.environ.get("CI"):
        raise RuntimeError("the native transport is not built: .ci/run installs gRPC C++ and builds it")
    pytest.skip("the native transport is not built here (gRPC C++ was not found at install time)",
                allow_module_level=True)

from geoserve._core.extproc import NativeServer  # noqa: E402

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class Recorder:
    """A factory whose handlers answer ``behaviour(data)`` and record what they saw."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.streams: list[list] = []
        self.lock = threading.Lock()

    def __call__(self):
        seen: list = []
        with self.lock:
            self.streams.append(seen)

        def handle(data):
            seen.append(data)
            return None if data is None else self.behaviour(data)

        return handle


@pytest.fixture
def reported(monkeypatch):
    """What the transport reported through sys.unraisablehook (a handler's error)."""
    import sys

    errors: list = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: errors.append(unraisable.exc_value))
    return errors


@pytest.fixture
def serve():
    started = []

    def start(factory):
        server = NativeServer(factory)
        port = server.start("127.0.0.1", 0)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return server, channel.stream_stream(METHOD), channel

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0.1)


def test_messages_go_through_in_order_and_the_handler_sees_the_end(serve):
    rec = Recorder(lambda data: ([b"a:" + data, b"b:" + data], False))
    _, call, _ = serve(rec)
    assert list(call(iter([b"1", b"22", b""]))) == [b"a:1", b"b:1", b"a:22", b"b:22", b"a:", b"b:"]
    assert rec.streams == [[b"1", b"22", b"", None]]


def test_a_stream_without_messages_opens_nothing(serve):
    rec = Recorder(lambda data: ([], False))
    _, call, _ = serve(rec)
    assert list(call(iter([]))) == []
    assert rec.streams == []  # the factory is called with the first message


def test_done_ends_the_stream_after_its_answers(serve):
    rec = Recorder(lambda data: ([b"bye"], True) if data == b"stop" else ([], False))
    _, call, _ = serve(rec)
    assert list(call(iter([b"x", b"stop", b"never read"]))) == [b"bye"]
    assert rec.streams[0][-1] is None and b"never read" not in rec.streams[0]


def test_standing_answers_are_given_without_the_handler_or_before_it(serve):
    """After a handler names standing answers, messages that start with their byte
    are answered by the transport: without the handler, or (notify) with the
    handler called after the answer has gone, its own answers dropped; other
    messages still reach the handler, in order."""
    def behaviour(data):
        if data == b"decided":
            return [b"seen:" + data], False, ((ord("B"), b"ack", False), (ord("N"), b"early", True))
        return [b"seen:" + data], False

    rec = Recorder(behaviour)
    _, call, _ = serve(rec)
    got = list(call(iter([b"Bbefore", b"decided", b"B1", b"N1", b"B2", b"other", b"N2"])))
    assert got == [b"seen:Bbefore", b"seen:decided", b"ack", b"early", b"ack", b"seen:other", b"early"]
    assert rec.streams == [[b"Bbefore", b"decided", b"N1", b"other", b"N2", None]]


def test_a_later_standing_answer_replaces_one_for_the_same_byte(serve):
    def behaviour(data):
        return [], False, ((ord("B"), data.upper(), False),)

    _, call, _ = serve(Recorder(behaviour))
    assert list(call(iter([b"x", b"B1", b"y", b"B2"]))) == [b"X", b"Y"]


def test_a_large_message_arrives_whole(serve):
    big = os.urandom(3 << 20)  # bigger than a gRPC frame or slice: reassembled
    _, call, _ = serve(Recorder(lambda data: ([data[::-1]], False)))
    assert list(call(iter([big]))) == [big[::-1]]


@pytest.mark.parametrize("behaviour", [
    lambda data: 1 / 0,  # raises
    lambda data: "not a tuple",
    lambda data: (["str, not bytes"], False),
    lambda data: ([], False, ((300, b"x", False),)),  # a standing answer's byte out of range
    lambda data: ([], False, (("B", b"x", False),)),
    lambda data: ([], False, (66, b"x", False)),  # not a tuple of them
])
def test_a_failing_handler_ends_its_stream_with_internal_and_is_still_closed(serve, behaviour, reported):
    rec = Recorder(behaviour)
    _, call, _ = serve(rec)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"x"])))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert rec.streams == [[b"x", None]]  # closed: the picker gives the stream's router state back
    assert [type(e) for e in reported] in ([ZeroDivisionError], [TypeError])  # reported, not swallowed


def test_a_factory_that_fails_is_internal(serve, reported):
    def factory():
        raise RuntimeError("no")

    _, call, _ = serve(factory)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"x"])))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert [str(e) for e in reported] == ["no"]


def test_streams_are_concurrent_and_each_has_its_own_handler(serve):
    def factory():
        count = [0]

        def handle(data):
            if data is None:
                return None
            count[0] += 1
            return [data + b"#" + str(count[0]).encode()], False

        return handle

    _, call, _ = serve(factory)

    def one(k):
        return list(call(iter([f"{k}".encode()] * 5)))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert results == [[f"{k}#{i}".encode() for i in range(1, 6)] for k in range(64)]


def test_health_follows_set_serving(serve):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, _, channel = serve(Recorder(lambda data: ([], False)))
    stub = health_pb2_grpc.HealthStub(channel)
    server.set_serving("envoy.service.ext_proc.v3.ExternalProcessor", True)
    check = lambda name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status  # noqa: E731
    assert check("envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.SERVING
    server.set_serving("envoy.service.ext_proc.v3.ExternalProcessor", False)
    assert check("envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_stop_cancels_open_streams_and_waits_for_their_handlers():
    rec = Recorder(lambda data: ([b"ok"], False))
    server = NativeServer(rec)
    port = server.start("127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    gate = threading.Event()

    def requests():
        yield b"first"
        gate.wait(10)  # the stream stays open until the server is gone

    responses = channel.stream_stream(METHOD)(requests())
    assert next(responses) == b"ok"
    server.stop(0.05)
    assert rec.streams == [[b"first", None]]  # the handler saw its end before stop returned
    with pytest.raises(grpc.RpcError):
        next(responses)
    gate.set()
    channel.close()


def test_more_methods_are_served_as_raw_streams_beside_process():
    """Envoy's access log stream (client-streaming: it reads no answer until the
    end) on the same server: its own factory's handlers see its messages and its
    end; Process is unaffected."""
    logs = Recorder(lambda data: ([], False))
    process = Recorder(lambda data: ([b"ok"], False))
    path = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
    server = NativeServer(process, {path: logs})
    port = server.start("127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        response, call = channel.stream_unary(path).with_call(iter([b"e1", b"e2"]), timeout=5)
        assert call.code() == grpc.StatusCode.OK
        assert logs.streams == [[b"e1", b"e2", None]]
        assert list(channel.stream_stream(METHOD)(iter([b"x"]))) == [b"ok"]
        assert process.streams == [[b"x", None]]
    finally:
        channel.close()
        server.stop(0.1)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError):
        NativeServer(42)
    with pytest.raises(TypeError):
        NativeServer(lambda: None, {"/a.B/C": 42})
    with pytest.raises(ValueError, match="path"):
        NativeServer(lambda: None, {"StreamAccessLogs": lambda: None})
    server = NativeServer(lambda: None)
    with pytest.raises(OSError):
        server.start("not-an-address", 0)
    server.start("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        server.start("127.0.0.1", 0)
    server.stop(0)
