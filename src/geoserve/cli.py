"""``geoserve <command>``: the package's command line.

* ``geoserve check FLEET`` - load and validate a topology file (TOML, JSON, YAML);
  prints a summary, or the error with the field it names (exit 2).
* ``geoserve decide FLEET --signals S.json --request R.json`` - one decision, as
  JSON, from files: a replayable record of (request, snapshot, policy). Without
  ``--signals`` every replica is idle and healthy.
* ``geoserve simulate [SCENARIO] [--policies a,b] [--json FILE] [--plot DIR]`` - the
  global fleet simulation (geoserve.sim), the project's main job; ``--bad-days``
  runs the resilience scenarios instead (geoserve.sim.bad_days).
* ``geoserve fake-replica [--port P] [--speed X]`` - an OpenAI-compatible fake
  replica paced like a 70B (geoserve.testing; the [gateway] extra).
* ``geoserve serve FLEET --region R [--port P]`` - the reference OpenAI-compatible
  gateway (geoserve.integrations.gateway; the [gateway] and [signals] extras).
* ``geoserve demo [--duration S] [--rate R]`` - three fake regions, the gateway, load,
  APAC lost half-way and back, a live view and a summary (geoserve.demo).
* ``geoserve envoy-picker FLEET --region R [--port P]`` - Envoy's ext_proc endpoint
  picker (geoserve.integrations.envoy; the [envoy] extra; docs/integrations/envoy.md).
* ``geoserve bench [--quick] [--json FILE]`` - the micro-benchmarks (geoserve.bench).
* ``geoserve plan [SCENARIO] [--check] [--json FILE] [--charts DIR]`` - the capacity
  planner on a day (geoserve.plan; docs/capacity.md); ``--check`` adds the
  simulator's verdict on sampled hours and a compressed day per scaler.
* ``geoserve sweep --scenarios A,B --policies P,Q --seeds 1,2 [--ray ADDRESS]`` - a
  grid of simulations on local processes or an existing Ray cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import msgspec

from . import __version__, bench, native
from .errors import GeoserveError
from .router import Router
from .types import Policy, ReplicaSignal, Request, Signals, Topology


def _load_json(path: str, kind: type, what: str):
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=kind)
    except OSError as err:
        raise SystemExit(f"geoserve: cannot read {what} {path}: {err.strerror}")
    except msgspec.DecodeError as err:  # ValidationError is a DecodeError
        raise SystemExit(f"geoserve: bad {what} {path}: {err}")


def _check(args: argparse.Namespace) -> int:
    topology = Topology.from_file(args.fleet)
    router = Router(topology)
    f = router.fleet
    print(f"{args.fleet}: ok - {len(topology.regions)} regions, {len(topology.edges)} edges, "
          f"{len(f.models)} models, {f.n_replicas} replicas, {len(topology.aliases)} aliases")
    for g, region in enumerate(topology.regions):
        per_model = []
        for m, model in enumerate(f.models):
            lo, hi = f.group_start[m * f.n_regions + g], f.group_start[m * f.n_regions + g + 1]
            if hi > lo:
                per_model.append(f"{model} x{hi - lo}")
        print(f"  {region}: {', '.join(per_model) or '-'} ({f.region_slots[g]} decode slots)")
    return 0


def _decide(args: argparse.Namespace) -> int:
    topology = Topology.from_file(args.fleet)
    policy = _load_json(args.policy, Policy, "policy") if args.policy else None
    router = Router(topology, policy)
    if args.signals:
        signals = _load_json(args.signals, Signals, "signals")
    else:
        signals = Signals(now_ms=0.0, replicas=tuple(ReplicaSignal(replica=r, observed_ms=0.0) for r in router.fleet.replica_ids))
    request = _load_json(args.request, Request, "request")
    decision = router.decide(request, router.snapshot(signals))
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(decision).decode(), indent=2) + "\n")
    return 0


def _bad_days(args: argparse.Namespace) -> int:
    import json

    from .sim.bad_days import POLICIES as BAD_DAY_POLICIES, run_bad_days

    policies = tuple(args.policies.split(",")) if args.policies else BAD_DAY_POLICIES
    report = run_bad_days(policies, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    text = json.dumps(report, indent=1, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import msgspec as _msgspec

    from .sim import POLICIES, default_scenario, simulate
    from .sim.report import plot, print_table, to_json
    from .sim.scenario import load_scenario

    if args.bad_days:
        return _bad_days(args)
    scenario = load_scenario(args.scenario) if args.scenario else default_scenario()
    if args.seed is not None:
        scenario = _msgspec.structs.replace(scenario, seed=args.seed)
    names = args.policies.split(",") if args.policies else list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        print(f"geoserve: unknown policies {unknown} (known: {', '.join(POLICIES)})", file=sys.stderr)
        return 2
    print(f"scenario {scenario.name!r}, seed {scenario.seed}, {scenario.duration_s:g} s simulated, policies: {', '.join(names)}", file=sys.stderr)

    def progress(name: str, fraction: float) -> None:
        done = int(fraction * 30)
        sys.stderr.write(f"\r  {name:24s} [{'#' * done}{'.' * (30 - done)}] {100 * fraction:5.1f}%")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    result = simulate(scenario, names, progress=progress)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(result))
    if args.plot:
        for path in plot(result, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .plan import default_plan_scenario, load_plan_scenario, plan_report
    from .plan.report import print_report

    ps = load_plan_scenario(args.scenario) if args.scenario else default_plan_scenario()
    log = lambda msg: print(f"  {msg} ...", file=sys.stderr, flush=True)  # noqa: E731
    out = plan_report(ps, check=args.check, day_scale=args.day_scale, compression=args.compression, log=log)
    print_report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    if args.charts:
        from .plan.charts import charts

        for path in charts(ps, out, args.charts):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json

    from .plan.sweep import FIGURES, grid, sweep

    try:
        cells = grid(args.scenarios.split(","), args.policies.split(","), [int(x) for x in args.seeds.split(",")],
                     args.duration)
    except ValueError as err:
        print(f"geoserve: {err}", file=sys.stderr)
        return 2
    where = f"Ray at {args.ray}" if args.ray else f"{args.workers or 'all'} local processes"
    print(f"{len(cells)} simulations on {where}", file=sys.stderr)
    rows = sweep(cells, workers=args.workers, ray_address=args.ray)
    cols = ("scenario", "policy", "seed") + FIGURES[:4]
    print("  ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]:>14.4g}" if isinstance(row[c], float) else f"{str(row[c]):>14}" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _run_until_interrupted(server, banner) -> int:
    """Start an async ``server`` (``start() -> port``, ``stop()``), print the banner,
    serve until SIGTERM or Ctrl-C, stop it (gracefully: what it serves is finished
    or cancelled by its own ``stop``), exit 0."""
    import asyncio
    import signal

    async def serve() -> None:
        port = await server.start()
        print(banner(port), flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            await stopping.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


def _fake_replica(args: argparse.Namespace) -> int:
    from .testing import FakeReplica

    class Server:
        def __init__(self) -> None:
            self.replica = FakeReplica(args.model, speed=args.speed, slots=args.slots, replica_id=args.id)

        async def start(self) -> int:
            return await self.replica.start(args.host, args.port)

        async def stop(self) -> None:
            await self.replica.stop()

    return _run_until_interrupted(
        Server(), lambda port: f"fake replica {args.id} ({args.model}, speed x{args.speed:g}) on http://{args.host}:{port}")


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .integrations.gateway import Gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = Gateway(Topology.from_file(args.fleet), region=args.region, host=args.host, port=args.port,
                     poll_interval_ms=args.poll_ms, max_body_bytes=args.max_body_bytes, max_hold_ms=args.max_hold_ms)
    return _run_until_interrupted(server, lambda port: f"geoserve gateway ({args.region}) on http://{args.host}:{port}")


def _envoy_picker(args: argparse.Namespace) -> int:
    import logging

    from .integrations.envoy import PickerServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = PickerServer(Topology.from_file(args.fleet), region=args.region, host=args.host, port=args.port,
                          poll_interval_ms=args.poll_ms, metrics_port=args.metrics_port,
                          max_body_bytes=args.max_body_bytes, max_hold_ms=args.max_hold_ms, transport=args.transport,
                          release_on=args.release_on.replace("-", "_"), release_after_s=args.release_after_s)

    def banner(port: int) -> str:
        metrics = f", metrics on http://{args.host}:{server.metrics_port}/metrics" if args.metrics_port is not None else ""
        return f"geoserve envoy picker ({args.region}) on {args.host}:{port} ({server.transport} transport){metrics}"

    return _run_until_interrupted(server, banner)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="geoserve", description="Latency-SLA-aware multi-region LLM routing.")
    parser.add_argument("--version", action="version", version=f"geoserve {__version__} (native={native})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a topology file")
    p.add_argument("fleet")
    p.set_defaults(run=_check)
    p = sub.add_parser("decide", help="one decision from files, as JSON")
    p.add_argument("fleet")
    p.add_argument("--request", required=True, help="a Request as JSON")
    p.add_argument("--signals", help="Signals as JSON (default: every replica idle)")
    p.add_argument("--policy", help="a Policy as JSON (default: the defaults)")
    p.set_defaults(run=_decide)
    p = sub.add_parser("simulate", help="the global fleet simulation: geoserve vs the baselines")
    p.add_argument("scenario", nargs="?", help="a scenario TOML (default: the built-in seed scenario)")
    p.add_argument("--policies", help="comma-separated policy names (default: all)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts (needs the [sim] extra)")
    p.add_argument("--bad-days", action="store_true",
                   help="the resilience scenarios (outage with spill caps, brownout, flapping; docs/resilience.md)")
    p.set_defaults(run=_simulate)
    p = sub.add_parser("fake-replica", help="an OpenAI-compatible fake replica paced like a 70B (needs [gateway])")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default="llama-70b")
    p.add_argument("--speed", type=float, default=1.0, help="divide every duration by this (10 = ten times faster)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--id", default="fake-0", help="the replica id it reports")
    p.set_defaults(run=_fake_replica)
    p = sub.add_parser("demo", help="a live three-region fleet on loopback, APAC lost and back (needs [gateway], [signals])")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load (the demo stops by itself)")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=lambda args: __import__("geoserve.demo", fromlist=["main"]).main(args.duration, args.rate, args.json))
    p = sub.add_parser("serve", help="the reference OpenAI-compatible gateway (needs [gateway] and [signals])")
    p.add_argument("fleet")
    p.add_argument("--region", required=True, help="the region this gateway runs in (the default origin)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--poll-ms", type=float, default=200.0, help="engine signal poll interval")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-hold-ms", type=float, default=2000.0, help="longest a queued request is held")
    p.set_defaults(run=_serve)
    p = sub.add_parser("envoy-picker", help="Envoy's ext_proc endpoint picker (needs [envoy])")
    p.add_argument("fleet")
    p.add_argument("--region", required=True, help="the region this picker runs in (the default origin)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here")
    p.add_argument("--poll-ms", type=float, default=200.0, help="engine signal poll interval")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--max-hold-ms", type=float, default=250.0, help="longest a queued request is held")
    p.add_argument("--transport", choices=("auto", "native", "aio"), default="auto",
                   help="gRPC C++ threads (native, where built) or grpc.aio; auto: native where built")
    p.add_argument("--release-on", choices=("access-log", "response"), default="access-log",
                   help="release a routed request from Envoy's access log entry (the doc's config), or at the "
                   "response headers / the stream's end (a config that sends the response and no access log)")
    p.add_argument("--release-after-s", type=float, default=900.0,
                   help="with --release-on access-log: release a routed request whose entry has not come after this "
                   "long (longer than your longest response)")
    p.set_defaults(run=_envoy_picker)
    p = sub.add_parser("bench", help="micro-benchmarks: native kernels vs their twins, one run")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)
    p = sub.add_parser("plan", help="capacity: placement strategies, cost and SLA over a day")
    p.add_argument("scenario", nargs="?", help="a plan scenario TOML (default: the built-in seed day)")
    p.add_argument("--check", action="store_true", help="check the recommendation in the simulator (minutes)")
    p.add_argument("--day-scale", type=float, default=0.2, help="fleet scale of the simulated day")
    p.add_argument("--compression", type=float, default=30.0, help="how much faster the simulated day runs")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--charts", help="write charts (PNG) into this folder (needs [sim])")
    p.set_defaults(run=_plan)
    p = sub.add_parser("sweep", help="a grid of scenarios x policies x seeds, in parallel")
    p.add_argument("--scenarios", default="default", help="comma-separated TOML paths, or 'default'")
    p.add_argument("--policies", default="geoserve", help="comma-separated routing policies")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--duration", type=float, help="override the scenarios' simulated seconds")
    p.add_argument("--workers", type=int, help="local processes (default: one per core)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster ('auto', 'ray://...', or 'local')")
    p.add_argument("--json", help="write the rows as JSON")
    p.set_defaults(run=_sweep)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except GeoserveError as err:
        print(f"geoserve: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
