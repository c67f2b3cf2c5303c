"""Engine signal adapters: the real vLLM and SGLang samples, V1 names, bad input, a poller over HTTP."""

import http.server
import threading

import pytest

import geoserve as g
from builders import DATA, topology
from geoserve.resilience import FleetHealth, HealthPolicy
from geoserve.signals import MetricsPoller, parse_metrics, to_signal

VLLM = (DATA / "metrics" / "vllm_metrics.txt").read_text()
SGLANG = (DATA / "metrics" / "sglang_metrics.txt").read_text()


def test_the_real_vllm_sample():
    load = parse_metrics(VLLM)
    assert (load.engine, load.running, load.waiting, load.kv_usage) == ("vllm", 0, 0, 0.0)  # duplicated series count once


def test_the_real_sglang_sample_under_load():
    load = parse_metrics(SGLANG)
    assert (load.engine, load.running, load.waiting, load.kv_usage) == ("sglang", 162, 2826, 0.28)
    sig = to_signal("r1", load, observed_ms=5.0, kv_blocks=1000)
    assert (sig.in_flight, sig.queue_depth, sig.kv_free_blocks, sig.observed_ms) == (162, 2826, 720, 5.0)


V1 = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 5.0
vllm:num_requests_running{engine="0",model_name="other"} 40.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="other"} 9.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
"""


def test_vllm_v1_names_engines_summed_and_a_model_filter():
    load = parse_metrics(V1, model="m")
    assert (load.running, load.waiting) == (8, 3) and load.kv_usage == pytest.approx(0.3)
    assert parse_metrics(V1).running == 48  # every model on the engine


def test_only_the_families_read_reach_the_parser_and_nothing_changes(monkeypatch):
    """The lines of other families (and a histogram's buckets) are dropped before
    prometheus_client parses: the same loads as parsing every line, on the real
    samples, V1 names and a fake replica's /metrics."""
    import re

    import geoserve.signals as signals
    from geoserve.testing import FakeReplica

    fake = FakeReplica(speed=20.0, slots=8, replica_id="r0").metrics_text()
    texts = [VLLM, SGLANG, V1, fake]
    filtered = [parse_metrics(t) for t in texts] + [parse_metrics(V1, model="m")]
    assert len(signals._READ_LINES.findall(SGLANG)) < len(SGLANG.splitlines()) / 5
    monkeypatch.setattr(signals, "_READ_LINES", re.compile(r"^.*$", re.M))  # every line
    assert filtered == [parse_metrics(t) for t in texts] + [parse_metrics(V1, model="m")]
    assert filtered[1].tpot_count is not None  # SGLang's step-time histogram: _sum and _count, without buckets


@pytest.mark.parametrize(
    "text,field",
    [
        ("this is { not prometheus", "<metrics>"),
        ("# TYPE foo gauge\nfoo 1.0\n", "<metrics>"),
        ("vllm:num_requests_running 1.0\n", "waiting"),
        ("vllm:num_requests_running -1.0\nvllm:num_requests_waiting 0\n", "running"),
        ("sglang:num_running_reqs NaN\nsglang:num_queue_reqs 0\n", "running"),
    ],
)
def test_bad_metrics_are_typed_errors_naming_the_field(text, field):
    with pytest.raises(g.SignalError) as err:
        parse_metrics(text)
    assert err.value.field == field
    with pytest.raises(g.SignalError) as err:
        parse_metrics(VLLM, engine="tgi")
    assert err.value.field == "engine"


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):  # quiet
        pass


def _serve(body: str):
    handler = type("H", (_Metrics,), {"body": body.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_poller_scrapes_replicas_and_a_silent_one_goes_down_by_hysteresis(impl):
    topo = topology()
    r = g.Router(topo, implementation=impl)
    ids = r.fleet.replica_ids
    busy, idle = _serve(SGLANG), _serve(V1.replace('model_name="other"', 'model_name="x"'))
    dead = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    dead_port = dead.server_address[1]
    dead.server_close()  # nothing listens there any more: connection refused
    try:
        targets = {rid: f"http://127.0.0.1:{idle.server_address[1]}/metrics" for rid in ids}
        targets[ids[0]] = f"http://127.0.0.1:{busy.server_address[1]}/metrics"
        targets[ids[1]] = f"http://127.0.0.1:{dead_port}/metrics"
        health = FleetHealth.for_topology(topo, HealthPolicy(fail_threshold=3, recover_threshold=2))
        poller = MetricsPoller(targets, engine="auto", timeout_s=2.0, health=health, model=None)
        for round_ in range(3):
            signals = poller.poll(now_ms=100.0 * round_)
            assert health.replica_up(ids[1]) == (round_ < 2)  # down only after three failed scrapes
        s = r.snapshot(signals)
        assert s.replica_status(ids[1]) == "no_signal"  # never answered: no load to report
        assert s.replica_status(ids[0]) == "ok" and s.in_flight[r.fleet.replica_index[ids[0]]] == 162
        assert "URLError" in poller.errors[ids[1]] or "ConnectionRefused" in poller.errors[ids[1]]
        poller.close()
    finally:
        for server in (busy, idle):
            server.shutdown()
            server.server_close()


def test_the_step_time_histogram_is_read_and_windowed():
    from geoserve.signals import EngineLoad, step_ms

    load = parse_metrics(SGLANG)
    assert load.tpot_sum_s == pytest.approx(866964.5791549598) and load.tpot_count == 7.400757e06
    assert parse_metrics(V1).tpot_sum_s is None  # no histogram: no step time

    def at(seconds, tokens):
        return EngineLoad("vllm", 1, 0, None, seconds, tokens)

    assert step_ms(None, at(13.0, 1100), 16) is None  # the first scrape only starts a window
    assert step_ms((10.0, 1000), at(13.0, 1100), 16) == pytest.approx(30.0)  # 3 s over 100 tokens
    assert step_ms((10.0, 1000), at(10.1, 1010), 16) is None  # too few tokens to say
    assert step_ms((10.0, 1000), at(0.5, 20), 16) is None  # the engine restarted
