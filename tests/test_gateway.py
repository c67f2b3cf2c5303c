"""The reference gateway (geoserve serve) against fake replicas on 127.0.0.1."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

import geoserve as g  # noqa: E402
from geoserve.integrations.gateway import Gateway  # noqa: E402
from geoserve.resilience import RetryBudget  # noqa: E402
from geoserve.testing import FakeReplica  # noqa: E402
from geoserve.testing.loop import LoopThread  # noqa: E402
from geoserve.testing.processes import fast_fleet_toml, free_port, geoserve_process  # noqa: E402

SLOTS = 8


def topology(ports):
    def dep(region, ids):
        return g.Deployment(model="llama-70b", version="v1", region=region, decode_slots=SLOTS,
                            replicas=tuple(g.ReplicaSpec(id=i, endpoint=f"127.0.0.1:{ports[i]}") for i in ids))

    return g.Topology(regions=("us", "eu"), rtt_ms=((2.0, 80.0), (80.0, 2.0)),
                      deployments=(dep("us", ("us-0", "us-1")), dep("eu", ("eu-0",))), aliases={"chat": "llama-70b"})


@pytest.fixture(scope="module")
def stack():
    loop = LoopThread()
    replicas = {rid: FakeReplica(speed=10.0, slots=SLOTS, replica_id=rid) for rid in ("us-0", "us-1", "eu-0")}
    ports = {rid: loop.run(r.start()) for rid, r in replicas.items()}
    # a long poll interval: the tests install the snapshots they need (gateway.feed.snapshot)
    gw = Gateway(topology(ports), region="us", poll_interval_ms=60_000.0, max_body_bytes=64 << 10,
                 body_timeout_s=0.5, max_hold_ms=200.0)
    port = loop.run(gw.start())
    yield {"loop": loop, "replicas": replicas, "ports": ports, "gw": gw, "port": port}
    loop.run(gw.stop())
    for r in replicas.values():
        loop.run(r.stop())
    loop.close()


@pytest.fixture(autouse=True)
def fresh_state(stack):
    """Every test starts from an idle, healthy fleet."""
    gw = stack["gw"]
    n = gw.router.fleet.n_replicas
    gw.feed.snapshot = gw.router.snapshot(g.SignalColumns(
        now_ms=time.monotonic() * 1000.0, observed_ms=np.full(n, time.monotonic() * 1000.0),
        in_flight=np.zeros(n, np.int32), queue_depth=np.zeros(n, np.int32)))
    for r in stack["replicas"].values():
        r.failing, r.break_after = False, None
    yield


def post(stack, body, headers=None, raw=None, path="/v1/completions"):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def completion(prompt="hello", max_tokens=4, **kw):
    return {"model": "llama-70b", "prompt": prompt, "max_tokens": max_tokens, **kw}


def sse(stack, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw, arrivals = b"", 0
    while True:
        try:
            chunk = response.read1(65536)
        except http.client.IncompleteRead as err:
            raw += err.partial
            break
        if not chunk:
            break
        arrivals += 1
        raw += chunk
    conn.close()
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    return response.status, {k.lower(): v for k, v in response.getheaders()}, events, arrivals


def test_a_completion_arrives_whole_with_version_and_replica(stack):
    status, headers, data = post(stack, completion(max_tokens=5))
    assert status == 200, data
    assert json.loads(data)["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    assert headers["x-geoserve-version"] == "v1" and headers["x-geoserve-replica"].startswith("us-")


def test_streaming_arrives_token_by_token(stack):
    status, headers, events, arrivals = sse(stack, completion(max_tokens=12, stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == b"[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [f"tok{i} " for i in range(12)]
    assert arrivals >= 6  # not buffered into one


def test_an_alias_is_rewritten_and_sessions_stick(stack):
    served = set()
    for i in range(4):
        status, headers, data = post(stack, {"model": "chat", "prompt": f"turn {i}", "max_tokens": 2},
                                     {"x-session-id": "s-1"})
        assert status == 200 and json.loads(data)["model"] == "llama-70b"
        served.add(headers["x-geoserve-replica"])
    assert len(served) == 1


def test_a_failing_replica_is_retried_on_a_fallback_before_the_first_byte(stack):
    gw = stack["gw"]
    taken = gw.m_retries.labels("taken")._value.get()
    stack["replicas"]["us-0"].failing = True  # 500s, while the snapshot still says healthy
    for i in range(8):
        status, headers, data = post(stack, completion(f"question {i}"))
        assert status == 200, data
        assert headers["x-geoserve-replica"] == "us-1"  # the fallback (same region) served it
    assert gw.m_retries.labels("taken")._value.get() >= taken + 1


def test_when_a_region_has_no_fallback_left_the_request_is_decided_again_elsewhere(stack):
    stack["replicas"]["eu-0"].failing = True  # eu's only replica: no fallback in its region
    status, headers, data = post(stack, completion("from europe"), {"x-geoserve-origin": "eu"})
    assert status == 200, data
    assert headers["x-geoserve-replica"].startswith("us-")  # decided again without eu-0: overflow


def test_retries_never_exceed_the_retry_budget(stack):
    gw = stack["gw"]
    budget, gw.retries = gw.retries, RetryBudget(budget_share=0.0, min_concurrency=0)
    try:
        stack["replicas"]["us-0"].failing = stack["replicas"]["us-1"].failing = True
        status, _, data = post(stack, completion())
        assert status == 502 and json.loads(data)["error"]["code"] == 502
        assert gw.retries.allowed == 0 and gw.retries.refused >= 1
        assert gw.retries.active_retries == 0 and gw.retries.active_requests == 0
    finally:
        gw.retries = budget


def test_a_mid_stream_failure_is_surfaced_not_retried(stack):
    served_before = {rid: r.served for rid, r in stack["replicas"].items()}
    for r in stack["replicas"].values():
        r.break_after = 3
    status, _, events, _ = sse(stack, completion(max_tokens=10, stream=True))
    assert status == 200
    texts = [json.loads(e) for e in events]
    assert [t["choices"][0]["text"] for t in texts[:3]] == ["tok0 ", "tok1 ", "tok2 "]
    assert texts[-1]["error"]["code"] == 502  # the client is told
    assert b"[DONE]" not in events
    assert {rid: r.served for rid, r in stack["replicas"].items()} == served_before  # and nobody tried again


def test_shed_is_429_with_retry_after_and_no_replica_is_503(stack):
    gw = stack["gw"]
    n = gw.router.fleet.n_replicas
    now = time.monotonic() * 1000.0
    full = g.SignalColumns(now_ms=now, observed_ms=np.full(n, now), in_flight=np.full(n, SLOTS, np.int32),
                           queue_depth=np.full(n, 40, np.int32))
    gw.feed.snapshot = gw.router.snapshot(full)
    status, headers, data = post(stack, completion(), {"x-geoserve-priority": "best_effort"})
    assert status == 429 and int(headers["retry-after"]) >= 1, data
    dead = g.SignalColumns(now_ms=now, observed_ms=np.full(n, now), in_flight=np.zeros(n, np.int32),
                           queue_depth=np.zeros(n, np.int32), healthy=np.zeros(n, bool))
    gw.feed.snapshot = gw.router.snapshot(dead)
    status, _, data = post(stack, completion())
    assert status == 503 and json.loads(data)["error"]["code"] == 503


@pytest.mark.parametrize("raw,headers,status", [
    (b"{not json", {}, 400),
    (b'["list"]', {}, 400),
    (b'{"prompt": "no model"}', {}, 400),
    (b'{"model": "llama-70b", "prompt": "x", "max_tokens": -1}', {}, 400),
    (b'{"model": "gpt-9", "prompt": "x"}', {}, 404),
    (b'{"model": "llama-70b", "prompt": "x"}', {"x-geoserve-priority": "urgent"}, 400),
    (b'{"model": "llama-70b", "prompt": "x"}', {"x-geoserve-origin": "mars"}, 400),
    (b'{"model": "llama-70b", "prompt": "' + b"x" * (80 << 10) + b'"}', {}, 413),
])
def test_bad_input_gets_a_defined_answer(stack, raw, headers, status):
    got, _, data = post(stack, None, headers, raw=raw)
    assert got == status, data
    assert json.loads(data)["error"]["code"] == status


def test_a_slow_client_gets_408_and_holds_nothing(stack):
    with socket.create_connection(("127.0.0.1", stack["port"]), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"llama-70b\"")  # and then nothing
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_health_models_and_metrics(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack["port"], timeout=10)
    for path, check in (("/health", b"ok"), ("/v1/models", b'"chat"'), ("/metrics", b"geoserve_gateway_decisions_total")):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and check in body, (path, body[:200])
    conn.close()


def test_graceful_shutdown_drains_in_flight_streams(stack):
    loop, ports = stack["loop"], stack["ports"]
    gw = Gateway(topology(ports), region="us", poll_interval_ms=60_000.0, drain_s=20.0)
    port = loop.run(gw.start())
    result = {}

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(completion(max_tokens=60, stream=True)),
                      headers={"content-type": "application/json"})
        result["body"] = conn.getresponse().read()
        conn.close()

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while gw._active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.run(gw.stop())  # returns once the stream has finished
    t.join(timeout=20)
    assert result["body"].rstrip().endswith(b"data: [DONE]")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_cli_serves(tmp_path, stack):
    import urllib.request

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fast_fleet_toml(stack["ports"]["us-0"], speed=10.0))
    port = free_port()
    with geoserve_process("serve", str(fleet), "--region", "us", "--port", str(port)) as (_, banner):
        assert f":{port}" in banner
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(completion()).encode(),
                                         headers={"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert reply["choices"][0]["text"].startswith("tok0")


def test_inference_canaries_take_down_a_replica_whose_health_check_passes(stack):
    """A replica with the wrong model loaded answers /health and /metrics but 404s
    every completion: the canaries' own health machine takes it out."""
    loop, ports = stack["loop"], stack["ports"]
    wrong = FakeReplica(model="some-other-model", speed=10.0, slots=SLOTS, replica_id="wrong")
    wrong_port = loop.run(wrong.start())
    bad = dict(ports, **{"us-1": wrong_port})
    gw = Gateway(topology(bad), region="us", poll_interval_ms=100.0, canary_interval_s=None)
    loop.run(gw.start())
    try:
        assert loop.run(gw.canary_round()) == {"us-0": True, "us-1": False, "eu-0": True}
        loop.run(gw.canary_round())  # two failed rounds: down
        assert not gw.canary_health.replica_up("us-1")
        loop.run(gw.feed.poll_once())
        assert gw.feed.snapshot.replica_status("us-1") == "unhealthy"
        assert gw.feed.snapshot.replica_status("us-0") == "ok"
    finally:
        loop.run(gw.stop())
        loop.run(wrong.stop())


def test_the_engine_body_carries_the_deployments_model_and_a_degrades_shorter_limit():
    from geoserve.integrations.common import engine_body

    def decision(model, max_tokens=None):
        return g.Decision(action="degrade", reason="fallback_model", request=g.Request(model="chat", origin="us"),
                          model=model, max_tokens=max_tokens)

    body = {"model": "llama-70b", "prompt": "hi", "max_tokens": 500}
    assert engine_body(body, decision("llama-70b")) is None  # nothing to change: forwarded as sent
    assert engine_body(body, decision("llama-8b")) == dict(body, model="llama-8b")
    assert engine_body(body, decision("llama-8b", 64)) == dict(body, model="llama-8b", max_tokens=64)
    chat = {"model": "chat", "messages": [], "max_completion_tokens": 500}
    assert engine_body(chat, decision("llama-8b", 64)) == dict(chat, model="llama-8b", max_completion_tokens=64)
    bare = {"model": "chat", "prompt": "hi"}
    assert engine_body(bare, decision("llama-8b", 64)) == dict(bare, model="llama-8b", max_tokens=64)


def test_a_replica_that_steps_three_times_slower_is_reported_degraded_and_avoided():
    # the signal feed reads vLLM's step-time histogram from the fake replicas' /metrics
    # and SoftFailure marks the slow one degraded: the router then prefers the other
    from geoserve.integrations.common import SignalFeed

    speed = 100.0
    profile = g.ModelProfile(prefill_base_ms=7.7 / speed, prefill_ms_per_token=0.107 / speed,
                             tpot_base_ms=28.4 / speed, tpot_ms_per_batch=0.35 / speed)
    loop = LoopThread()
    fakes = {rid: FakeReplica(speed=speed, slots=SLOTS, replica_id=rid) for rid in ("a", "b")}
    ports = {rid: loop.run(f.start()) for rid, f in fakes.items()}
    topo = g.Topology(regions=("us",), rtt_ms=((2.0,),), models={"llama-70b": profile}, deployments=(
        g.Deployment(model="llama-70b", version="v1", region="us", decode_slots=SLOTS, replicas=tuple(
            g.ReplicaSpec(id=rid, endpoint=f"127.0.0.1:{port}") for rid, port in ports.items())),))
    router = g.Router(topo)
    feed = SignalFeed(router, interval_ms=60_000.0)
    fakes["b"].slow = 3.0

    def work():
        for port in ports.values():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/completions", body=json.dumps(completion(max_tokens=40)),
                         headers={"content-type": "application/json"})
            assert conn.getresponse().read()
            conn.close()

    try:
        snapshots = []
        for _ in range(4):
            work()
            snapshots.append(loop.run(feed.poll_once()))
        assert [s.replica_status("b") for s in snapshots] == ["ok", "ok", "degraded", "degraded"]
        assert all(s.replica_status("a") == "ok" for s in snapshots)
        tpot = {rid: sig.tpot_ms for rid, sig in feed.poller.last.items()}
        assert tpot["b"] == pytest.approx(3 * tpot["a"], rel=0.05)  # measured, per window
        assert router.decide(g.Request(model="llama-70b", origin="us"), snapshots[-1]).replica == "a"
    finally:
        loop.run(feed.stop())
        for f in fakes.values():
            loop.run(f.stop())
        loop.close()
