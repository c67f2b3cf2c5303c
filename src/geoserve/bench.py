"""geoserve's micro-benchmark harness (``geoserve bench``), runnable from an installed package.

Each *case* builds its inputs once and hands back zero-argument callables: the
compiled path and the pure-Python twin on identical inputs, timed in the same run,
so the ratio means something on a noisy shared machine (absolute times do not:
docs/performance.md). ``benchmarks/`` runs the same cases under pytest-benchmark.

Timing: ``repeats`` rounds of ``number`` calls each; a case reports the median
per-call time over rounds and the spread (min and max of the rounds).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from . import _compat
from .router import Router
from .types import Deployment, ModelProfile, ReplicaSpec, Request, SignalColumns, Topology

REGIONS = ("us-east", "eu-west", "ap-northeast")
RTT_MS = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))


def fleet_topology(per_region: int, slots: int = 64, profile: Optional[ModelProfile] = None) -> Topology:
    """Three regions of ``per_region`` 70B replicas (the benchmark fleets: 3x64, 3x340)."""
    deployments = tuple(
        Deployment(
            model="llama-70b", version="v1", region=region, decode_slots=slots,
            replicas=tuple(ReplicaSpec(id=f"{region}/{i}", endpoint=f"10.{g}.{i // 250}.{i % 250}:8000") for i in range(per_region)),
        )
        for g, region in enumerate(REGIONS)
    )
    models = {"llama-70b": profile} if profile is not None else {}
    return Topology(regions=REGIONS, rtt_ms=RTT_MS, deployments=deployments, models=models)


def columns(router: Router, in_flight: int = 20, jitter: int = 4, seed: int = 1) -> SignalColumns:
    """Every replica healthy with ``in_flight`` +- ``jitter`` requests (seeded)."""
    n = router.fleet.n_replicas
    rng = np.random.default_rng(seed)
    return SignalColumns(
        now_ms=0.0, observed_ms=np.zeros(n),
        in_flight=rng.integers(max(0, in_flight - jitter), in_flight + jitter + 1, n).astype(np.int32),
        queue_depth=np.zeros(n, dtype=np.int32),
    )


def requests(count: int, affinity: bool, origin: str = "us-east") -> list[Request]:
    """Distinct requests: with ``affinity``, each has its own two-block prefix (NumPy)."""
    out = []
    for k in range(count):
        prefix = np.array([2 * k + 1, 2 * k + 2], dtype=np.uint64) if affinity else ()
        out.append(Request(model="llama-70b", origin=origin, prompt_tokens=1000, prefix=prefix))
    return out


@dataclass
class Case:
    name: str
    replicas: int
    native: Optional[Callable[[], object]] = None
    python: Optional[Callable[[], object]] = None
    extra: dict = field(default_factory=dict)


def _cycler(items: list) -> Callable[[], object]:
    it = iter(())

    def nxt():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(items)
            return next(it)

    return nxt


def decide_case(per_region: int, affinity: bool) -> Case:
    topo = fleet_topology(per_region)
    calls = {}
    for impl in ("native", "python"):
        router = Router(topo, implementation=impl)
        snap = router.snapshot(columns(router))
        nxt = _cycler(requests(2048, affinity))
        decide = router.decide
        calls[impl] = (lambda decide=decide, snap=snap, nxt=nxt: decide(nxt(), snap))
    kind = "prefix" if affinity else "no-key"
    return Case(f"decide/{3 * per_region}/{kind}", 3 * per_region, calls["native"], calls["python"])


def hashing_case(dtype: str) -> Case:
    tokens = np.random.default_rng(3).integers(0, 128_000, 4096).astype(dtype)
    native, twin = _compat.kernels("native", "hashing"), _compat.kernels("python", "hashing")
    case = Case(f"block_hashes/4096/{dtype}", 0, lambda: native.block_hashes(tokens, 64), lambda: twin.block_hashes(tokens, 64))
    as_u32 = tokens.astype(np.uint32)
    case.extra["bare_xxh3"] = lambda: native.bare_xxh3_blocks(as_u32, 64)
    return case


def bodyscan_case(kind: str) -> Case:
    """The gateways' body scanner on an OpenAI body: a short completion in one
    chunk, or a chat body of ~8 KB arriving in 1 KB chunks (the picker's first
    chunks), to its end."""
    import json

    if kind == "short":
        body = json.dumps({"model": "llama-70b", "prompt": "Say something short. " * 20, "max_tokens": 4}).encode()
        chunks = [body]
    else:
        messages = [{"role": "system", "content": "You are a careful assistant. " * 100},
                    {"role": "user", "content": "Summarise the text above, with care: \"quoted\" parts too. " * 80}]
        body = json.dumps({"model": "llama-70b", "messages": messages, "max_tokens": 256, "stream": True}).encode()
        chunks = [body[i:i + 1024] for i in range(0, len(body), 1024)]
    last = len(chunks) - 1
    calls = {}
    for impl in ("native", "python"):
        scanner = _compat.kernels(impl, "bodyscan").BodyScanner

        def scan(scanner=scanner):
            s = scanner()
            for i, chunk in enumerate(chunks):
                s.feed(chunk, i == last)
            return s

        calls[impl] = scan
    return Case(f"bodyscan/{kind}/{len(body) // 1024 or len(body)}{'KB' if len(body) >= 1024 else 'B'}"
                f"/{len(chunks)}-chunk", 0, calls["native"], calls["python"])


def procmsg_case(kind: str) -> Case:
    """The Envoy picker's message reader on what Envoy sends: request headers (10
    headers, the protocol configuration), response headers with the
    ``upstream.address`` attribute, or one entry of its access log (the fields
    Envoy 1.40 fills for a routed request). Needs the [envoy] extra (its protobufs
    build the messages and are the twin)."""
    if kind == "access_log":
        return _access_log_case()
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from .integrations.envoy import _READ_HEADERS

    def headers(pairs):
        return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]))

    if kind == "request":
        message = pb.ProcessingRequest(request_headers=headers([
            (":authority", "gateway.example:10000"), (":path", "/v1/chat/completions"), (":method", "POST"),
            (":scheme", "http"), ("user-agent", "openai-python/1.51"), ("content-type", "application/json"),
            ("content-length", "7310"), ("x-forwarded-proto", "http"), ("x-session-id", "4f1c9a2e"),
            ("x-request-id", "0b8c9f1e-1a2b-4c3d-9e8f-123456789abc")]),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=1, send_body_without_waiting_for_header_response=True))
    else:
        attributes = struct_pb2.Struct()
        attributes.update({"upstream.address": "10.0.3.17:8000"})
        message = pb.ProcessingRequest(response_headers=headers([
            (":status", "200"), ("content-type", "text/event-stream"), ("x-envoy-upstream-service-time", "412")]),
            attributes={"envoy.filters.http.ext_proc": attributes})
    data = message.SerializeToString()
    native, twin = _compat.kernels("native", "procmsg"), _compat.kernels("python", "procmsg")
    return Case(f"procmsg/{kind}_headers/{len(data)}B", 0, lambda: native.read(data, _READ_HEADERS),
                lambda: twin.read(data, _READ_HEADERS))


def _access_log_case() -> Case:
    data = _access_log_message("c3ee8345-84cc-4ff1-9a1e-a5d852e7e332", "10.0.3.17", 8000)
    native, twin = _compat.kernels("native", "procmsg"), _compat.kernels("python", "procmsg")
    return Case(f"procmsg/access_log_entry/{len(data)}B", 0, lambda: native.read_access_log(data),
                lambda: twin.read_access_log(data))


def _access_log_message(request_id: str, host: str, port: int) -> bytes:
    """Envoy's access log message with one entry as Envoy 1.40 fills it for a
    request the picker routed to ``host:port``."""
    from envoy.config.core.v3 import address_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2
    from google.protobuf import duration_pb2

    def address(port):
        return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))

    common = al.AccessLogCommon(
        downstream_remote_address=address(53810), downstream_local_address=address(10000),
        downstream_direct_remote_address=address(53810), upstream_remote_address=address(port),
        upstream_local_address=address(39802), upstream_cluster="geoserve_endpoints",
        stream_id="c3ee8345-84cc-4ff1-9a1e-a5d852e7e332", upstream_request_attempt_count=1,
        downstream_wire_bytes_sent=535, downstream_wire_bytes_received=8901, upstream_wire_bytes_sent=9070,
        upstream_wire_bytes_received=497, access_log_type=al.DownstreamEnd)
    common.start_time.GetCurrentTime()
    for name, nanos in (("time_to_last_rx_byte", 175981), ("time_to_first_upstream_tx_byte", 1041767),
                        ("time_to_last_upstream_tx_byte", 1070259), ("time_to_first_upstream_rx_byte", 13775593),
                        ("time_to_last_upstream_rx_byte", 13894028), ("time_to_first_downstream_tx_byte", 13864054),
                        ("time_to_last_downstream_tx_byte", 13907058), ("duration", 13914459)):
        getattr(common, name).CopyFrom(duration_pb2.Duration(nanos=nanos))
    common.metadata.filter_metadata["envoy.lb"].update({"x-gateway-destination-endpoint": "10.0.3.17:8000,10.0.3.18:8000"})
    entry = al.HTTPAccessLogEntry(
        common_properties=common, protocol_version=al.HTTPAccessLogEntry.HTTP11,
        request=al.HTTPRequestProperties(request_method=2, scheme="http", authority="gateway.example:10000",
                                         path="/v1/completions", request_id=request_id,
                                         request_headers_bytes=252, request_body_bytes=8764),
        response=al.HTTPResponseProperties(response_headers_bytes=187, response_body_bytes=311,
                                           response_code_details="via_upstream"))
    entry.response.response_code.value = 200
    return als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
        log_entry=[entry])).SerializeToString()


def picker_stream_case(per_region: int) -> Case:
    """One request through the Envoy picker's native-transport handler, as Envoy
    sends it for the doc's config: the stream opened, its request headers (10,
    with the protocol configuration), a 2 KB completion body in one chunk (routed
    on a 3x``per_region`` fleet), the stream's end (the release kept), then the
    request's access log entry (released). The stream kernel
    (``_core/pickstream``) against the picker's Python handler, its twin. Needs
    the [envoy] extra."""
    import json

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from .integrations.envoy import EndpointPicker, PickerMetrics

    body = json.dumps({"model": "llama-70b", "prompt": "Summarise the report below. " * 70, "max_tokens": 128}).encode()

    def headers(pairs):
        return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]))

    request = pb.ProcessingRequest(request_headers=headers([
        (":authority", "gateway.example:10000"), (":path", "/v1/completions"), (":method", "POST"), (":scheme", "http"),
        ("user-agent", "openai-python/1.51"), ("content-type", "application/json"), ("content-length", str(len(body))),
        ("x-forwarded-proto", "http"), ("x-geoserve-origin", "us-east"),
        ("x-request-id", "0b8c9f1e-1a2b-4c3d-9e8f-123456789abc")]),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=1, send_body_without_waiting_for_header_response=True))
    chunk = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    calls = {}
    for impl, compiled in (("native", True), ("python", False)):
        router = Router(fleet_topology(per_region))
        picker = EndpointPicker(router, region="us-east", metrics=PickerMetrics())
        picker.update(columns(router))
        messages = [request.SerializeToString(), chunk.SerializeToString()]
        handle = picker.native_stream(compiled=compiled)  # where the request goes (it stays there: its prefix)
        handle(messages[0])
        routed = pb.ProcessingResponse.FromString(handle(messages[1])[0][0])
        handle(None)
        host, port = routed.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode().split(":")
        logged = _access_log_message("0b8c9f1e-1a2b-4c3d-9e8f-123456789abc", host, int(port))
        picker.access_log(logged)

        def one(picker=picker, compiled=compiled, messages=messages, logged=logged):
            handle = picker.native_stream(compiled=compiled)
            for message in messages:
                handle(message)
            handle(None)
            picker.access_log(logged)

        calls[impl] = one
    return Case(f"picker_stream/{3 * per_region}/one-request", 3 * per_region, calls["native"], calls["python"])


def snapshot_case(per_region: int) -> Case:
    topo = fleet_topology(per_region)
    calls = {}
    for impl in ("native", "python"):
        router = Router(topo, implementation=impl)
        cols = columns(router)
        kernels = router.kernels

        def update(router=router, cols=cols, kernels=kernels):
            snap = router.snapshot(cols)
            if hasattr(kernels, "SnapshotView"):
                snap._native = kernels.SnapshotView(snap)  # what a native router pays per update
            return snap

        calls[impl] = update
    return Case(f"snapshot_update/{3 * per_region}/columns", 3 * per_region, calls["native"], calls["python"])


def membership_case(per_region: int) -> Case:
    topo = fleet_topology(per_region)
    calls = {}
    for impl in ("native", "python"):
        router = Router(topo, implementation=impl)
        calls[impl] = lambda router=router: router.update_topology(topo)
    return Case(f"membership_change/{3 * per_region}", 3 * per_region, calls["native"], calls["python"])


def route_loop_case(per_region: int, count: int) -> Case:
    topo = fleet_topology(per_region)
    reqs = requests(count, affinity=True)
    calls = {}
    for impl in ("native", "python"):
        router = Router(topo, implementation=impl)
        snap = router.snapshot(columns(router))
        items = reqs if impl == "native" else reqs[: max(1, count // 50)]

        def loop(router=router, snap=snap, items=items):
            route, complete = router.route, router.complete
            for q in items:
                d = route(q, snap)
                complete(d, d.replica)

        calls[impl] = (loop, len(items))
    case = Case(f"route_complete/{3 * per_region}/prefix", 3 * per_region, calls["native"][0], calls["python"][0])
    case.extra["calls"] = {"native": calls["native"][1], "python": calls["python"][1]}
    return case


def ring_quality(per_region: int = 64, keys: int = 20_000) -> dict:
    """Keys remapped when one replica is lost, against the minimum (the keys it owned)."""
    topo = fleet_topology(per_region, slots=1_000_000)
    n = per_region
    sessions = [Request(model="llama-70b", origin="us-east", session=f"s{k}") for k in range(keys)]
    before_router = Router(topo)
    snap = before_router.snapshot(columns(before_router, in_flight=0, jitter=0))
    before = [before_router.decide(q, snap).replica for q in sessions]
    lost = "us-east/7"
    d0 = topo.deployments[0]
    smaller = Deployment(model=d0.model, version=d0.version, region=d0.region, decode_slots=d0.decode_slots,
                         replicas=tuple(r for r in d0.replicas if r.id != lost))
    after_router = Router(Topology(regions=topo.regions, rtt_ms=topo.rtt_ms, deployments=(smaller,) + topo.deployments[1:]))
    snap2 = after_router.snapshot(columns(after_router, in_flight=0, jitter=0))
    after = [after_router.decide(q, snap2).replica for q in sessions]
    moved = sum(a != b for a, b in zip(before, after))
    owned = sum(b == lost for b in before)
    counts = np.bincount([before_router.fleet.replica_index[b] for b in before], minlength=n)[:n]
    return {
        "name": f"ring/keys_moved/{n}", "replicas": n, "keys": keys, "keys_moved": int(moved),
        "keys_moved_min": int(owned), "expected_min": keys / n,
        "max_over_mean_keys": float(counts.max() / counts.mean()),
    }


def bounded_load_quality(per_region: int = 64, count: int = 20_000, hot_share: float = 0.5) -> dict:
    """max/mean in-flight when half the traffic shares one key (bounded loads at c=1.25).
    Prefill costs nothing here, so the load bound alone decides (not queued prefills)."""
    free = ModelProfile(prefill_base_ms=0.0, prefill_ms_per_token=0.0)
    router = Router(fleet_topology(per_region, slots=1_000_000, profile=free))
    snap = router.snapshot(columns(router, in_flight=0, jitter=0))
    rng = np.random.default_rng(5)
    for k in range(count):
        session = "hot" if rng.random() < hot_share else f"s{k}"
        router.route(Request(model="llama-70b", origin="us-east", session=session), snap)
    loads = router.state.pending[: per_region].astype(float)
    return {
        "name": f"ring/bounded_load/{per_region}", "replicas": per_region, "requests": count, "hot_share": hot_share,
        "max_over_mean": float(loads.max() / loads.mean()), "bound": router.policy.load_bound,
    }


def sim_speed(policy: str = "geoserve", duration_s: float = 120.0, rounds: int = 5) -> dict:
    """Simulated requests per wall-clock second: the default scenario (shared system
    prompts, multi-turn sessions, an outage), one policy. The demand is built and
    copied outside the timing; each round times ``Simulation(...).run()`` (as
    ``benchmarks/bench_sim.py`` does)."""
    import msgspec

    from .sim import Simulation, default_scenario
    from .sim.engine import _fresh

    scenario = msgspec.structs.replace(default_scenario(), duration_s=duration_s)
    base = Simulation(scenario, policy)  # builds the demand once
    rates = []
    for _ in range(rounds):
        requests = _fresh(base.requests)
        t0 = time.perf_counter()
        sim = Simulation(scenario, policy, requests)
        sim.run()
        rates.append(len(requests) / (time.perf_counter() - t0))
    return {"name": f"simulate/{policy}/requests_per_s", "replicas": sim.fleet.n_replicas,
            "requests": len(base.requests), "simulated_requests_per_s": statistics.median(rates),
            "best_requests_per_s": max(rates)}


def _time(fn: Callable[[], object], number: int, repeats: int) -> list[float]:
    """Per-call microseconds of each round."""
    fn()  # warm caches and lazy views
    rounds = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for _ in range(number):
                fn()
            rounds.append((time.perf_counter_ns() - t0) / number / 1e3)
    finally:
        if gc_was:
            gc.enable()
    return rounds


def _summary(rounds: list[float], per_call: int = 1) -> dict:
    us = [r / per_call for r in rounds]
    return {"median_us": statistics.median(us), "min_us": min(us), "max_us": max(us)}


def _has_envoy_protos() -> bool:
    try:
        import envoy.service.ext_proc.v3.external_processor_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def cases(quick: bool) -> list[Case]:
    return [
        decide_case(64, affinity=False),
        decide_case(64, affinity=True),
        decide_case(340, affinity=False),
        decide_case(340, affinity=True),
        hashing_case("int64"),
        hashing_case("uint32"),
        bodyscan_case("short"),
        bodyscan_case("chat"),
        *([procmsg_case("request"), procmsg_case("response"), procmsg_case("access_log"), picker_stream_case(64)]
          if _has_envoy_protos() else []),
        snapshot_case(340),
        membership_case(340),
        route_loop_case(64, 20_000 if quick else 100_000),
    ]


def run(quick: bool = False, out=sys.stdout) -> list[dict]:
    if _compat.compiled_decide is None:
        raise SystemExit("geoserve bench: the compiled kernels are not built; nothing to compare")
    scale = 1 if quick else 5
    results: list[dict] = []
    for case in cases(quick):
        loop_calls = case.extra.get("calls")
        if loop_calls:  # one invocation = a whole loop of route+complete
            native = _summary(_time(case.native, 1, 3 * scale), loop_calls["native"])
            python = _summary(_time(case.python, 1, 3), loop_calls["python"])
            row = {"name": case.name, "replicas": case.replicas,
                   "native_median_us": native["median_us"], "python_median_us": python["median_us"],
                   "native_min_us": native["min_us"], "native_max_us": native["max_us"],
                   "decisions_per_s": 1e6 / native["median_us"], "python_decisions_per_s": 1e6 / python["median_us"]}
        else:
            heavy = case.name.startswith("membership") or case.name.startswith("snapshot")
            n_native = (20 if heavy else 2000) * scale
            native = _summary(_time(case.native, n_native, 7))
            python = _summary(_time(case.python, max(5, n_native // (1 if heavy else 100)), 5))
            row = {"name": case.name, "replicas": case.replicas,
                   "native_median_us": native["median_us"], "python_median_us": python["median_us"],
                   "native_min_us": native["min_us"], "native_max_us": native["max_us"]}
            if "bare_xxh3" in case.extra:
                bare = _summary(_time(case.extra["bare_xxh3"], n_native, 7))
                row["bare_xxh3_median_us"] = bare["median_us"]
                row["over_bare"] = native["median_us"] / bare["median_us"]
        row["ratio"] = row["python_median_us"] / row["native_median_us"]
        results.append(row)
        _print_row(row, out)
    extras = (ring_quality(keys=5_000 if quick else 20_000), bounded_load_quality(count=5_000 if quick else 20_000),
              sim_speed(duration_s=60.0 if quick else 240.0))
    for quality in extras:
        results.append(quality)
        print(f"  {quality['name']:34s} " + ", ".join(f"{k}={_fmt(v)}" for k, v in quality.items() if k not in ("name",)), file=out)
    return results


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _print_row(row: dict, out) -> None:
    extra = ""
    if "decisions_per_s" in row:
        extra = f"  {row['decisions_per_s']:>11,.0f} decisions/s"
    if "over_bare" in row:
        extra = f"  bare xxh3 {row['bare_xxh3_median_us']:.2f} us, x{row['over_bare']:.2f}"
    print(
        f"  {row['name']:34s} native {row['native_median_us']:9.2f} us "
        f"[{row['native_min_us']:.2f}-{row['native_max_us']:.2f}]  python {row['python_median_us']:10.2f} us"
        f"  x{row['ratio']:7.1f}{extra}",
        file=out,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer rounds (CI)")
    parser.add_argument("--json", metavar="FILE", help="write the results as a JSON list")


def main(args: argparse.Namespace) -> int:
    print(f"geoserve bench ({'quick' if args.quick else 'full'}): medians of rounds, [min-max]; ratio = python / native")
    results = run(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


__all__ = ["run", "main", "add_arguments", "cases", "Case", "fleet_topology", "columns", "requests", "ring_quality",
           "bounded_load_quality", "sim_speed"]
