"""``geoserve demo``: a live multi-region fleet on loopback, a region lost and back.

Starts fake replicas for three regions (us-east 3, eu-west 2, ap-northeast 1; the
seed's RTTs applied as delays between a request's origin and a replica's region),
the reference gateway in front of them, and a bounded load generator with the
seed's demand shares (45 / 30 / 25 %), sessions and a priority mix. Half-way
through, every APAC replica starts failing; at three quarters it recovers. A live
view (``rich``, when installed and on a terminal; plain lines otherwise) shows per
region load, spill and p99 time to first byte; a summary table ends it. Everything
it started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["run_demo", "DemoResult"]

REGIONS = ("us-east", "eu-west", "ap-northeast")
RTT = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))
REPLICAS = (3, 2, 1)
SHARES = (0.45, 0.30, 0.25)


@dataclass
class Sample:
    t: float
    origin: str
    status: int
    region: str = ""
    ttfb_ms: float = float("nan")


@dataclass
class DemoResult:
    samples: list = field(default_factory=list)
    outage: tuple = (0.0, 0.0)

    def table(self) -> list[dict]:
        rows = []
        for origin in REGIONS:
            mine = [s for s in self.samples if s.origin == origin]
            for name, window in (("whole run", None), ("APAC down", self.outage)):
                part = [s for s in mine if window is None or window[0] <= s.t < window[1]]
                ok = [s for s in part if s.status == 200]
                ttfb = sorted(s.ttfb_ms for s in ok)
                rows.append({
                    "origin": origin, "window": name, "requests": len(part),
                    "answered": len(ok) / len(part) if part else None,
                    "served_at_home": sum(s.region == origin for s in ok) / len(ok) if ok else None,
                    "ttfb_p50_ms": ttfb[len(ttfb) // 2] if ttfb else None,
                    "ttfb_p99_ms": ttfb[min(len(ttfb) - 1, int(0.99 * len(ttfb)))] if ttfb else None,
                    "shed": sum(s.status == 429 for s in part), "errors": sum(s.status >= 500 for s in part),
                })
        return rows


def _topology(ports: dict):
    from .types import Deployment, ReplicaSpec, Topology

    deployments = tuple(
        Deployment(model="llama-70b", version="v1", region=region, decode_slots=8,
                   replicas=tuple(ReplicaSpec(id=rid, endpoint=f"127.0.0.1:{ports[rid]}") for rid in ports
                                  if rid.startswith(region)))
        for region in REGIONS
    )
    return Topology(regions=REGIONS, rtt_ms=RTT, deployments=deployments, aliases={"chat": "llama-70b"})


async def _demo(duration_s: float, rate: float, speed: float, seed: int, live: bool) -> DemoResult:
    import aiohttp

    from .integrations.gateway import REPLICA_HEADER, Gateway
    from .testing import FakeReplica

    rng = random.Random(seed)
    replicas: dict = {}
    for g, region in enumerate(REGIONS):
        for k in range(REPLICAS[g]):
            rid = f"{region}-{k}"
            rtt = {origin: RTT[o][g] for o, origin in enumerate(REGIONS)}
            replicas[rid] = FakeReplica(speed=speed, slots=8, replica_id=rid, rtt_ms=rtt)
    result = DemoResult(outage=(duration_s / 2, duration_s * 3 / 4))
    gateway: Optional[Gateway] = None
    started: list = []
    try:
        ports = {}
        for rid, replica in replicas.items():
            ports[rid] = await replica.start()
            started.append(replica)
        gateway = Gateway(_topology(ports), region="us-east", poll_interval_ms=200.0, max_hold_ms=500.0)
        port = await gateway.start()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        t0 = time.monotonic()
        semaphore = asyncio.Semaphore(64)  # bounded: never more than 64 requests open

        async def one(session, i: int) -> None:
            origin = rng.choices(REGIONS, SHARES)[0]
            priority = rng.choices(("interactive", "batch", "best_effort"), (0.8, 0.15, 0.05))[0]
            body = {"model": "chat", "max_tokens": rng.randint(8, 32), "stream": True,
                    "messages": [{"role": "system", "content": "You are a helpful assistant. " * 40},
                                 {"role": "user", "content": f"question {i}"}]}
            headers = {"x-geoserve-origin": origin, "x-geoserve-priority": priority,
                       "x-session-id": f"{origin}-{rng.randrange(200)}"}
            start = time.monotonic()
            sample = Sample(start - t0, origin, 0)
            try:
                async with semaphore, session.post(url, json=body, headers=headers) as r:
                    sample.status = r.status
                    await r.content.readany()
                    sample.ttfb_ms = (time.monotonic() - start) * 1000.0
                    rid = r.headers.get(REPLICA_HEADER, "")
                    sample.region = next((g for g in REGIONS if rid.startswith(g)), "")
                    await r.read()
            except aiohttp.ClientError:
                sample.status = 599
            result.samples.append(sample)

        async def faults() -> None:
            await asyncio.sleep(result.outage[0])
            for rid, replica in replicas.items():
                if rid.startswith("ap-northeast"):
                    replica.failing = True
            await asyncio.sleep(result.outage[1] - result.outage[0])
            for replica in replicas.values():
                replica.failing = False

        async def view() -> None:
            await _live_view(result, replicas, t0, duration_s, live)

        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(faults()), asyncio.create_task(view())]
            pending = []
            i = 0
            while time.monotonic() - t0 < duration_s:
                pending.append(asyncio.create_task(one(session, i)))
                i += 1
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*pending)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if gateway is not None:
            await gateway.stop()
        for replica in started:
            await replica.stop()
    return result


async def _live_view(result: DemoResult, replicas: dict, t0: float, duration_s: float, live: bool) -> None:
    def snapshot_rows():
        now = time.monotonic() - t0
        recent = [s for s in result.samples if s.t >= now - 5.0]
        rows = []
        for region in REGIONS:
            load = sum(r.running + r.waiting for rid, r in replicas.items() if rid.startswith(region))
            down = all(r.failing for rid, r in replicas.items() if rid.startswith(region))
            spill_in = sum(1 for s in recent if s.region == region and s.origin != region and s.status == 200)
            ttfb = sorted(s.ttfb_ms for s in recent if s.origin == region and s.status == 200)
            p99 = ttfb[min(len(ttfb) - 1, int(0.99 * len(ttfb)))] if ttfb else float("nan")
            rows.append((region, "DOWN" if down else "up", load, spill_in, p99))
        return now, rows

    try:
        from rich.live import Live
        from rich.table import Table
    except ImportError:
        live = False
    if live and sys.stdout.isatty():
        def render():
            now, rows = snapshot_rows()
            table = Table(title=f"geoserve demo  t={now:5.1f}/{duration_s:.0f} s  requests={len(result.samples)}")
            for col in ("region", "state", "in flight", "spilled in (5 s)", "p99 TTFB of its users (5 s)"):
                table.add_column(col)
            for region, state, load, spill, p99 in rows:
                table.add_row(region, state, str(load), str(spill), f"{p99:.0f} ms")
            return table

        with Live(render(), refresh_per_second=4) as board:
            while True:
                await asyncio.sleep(0.25)
                board.update(render())
    else:
        while True:
            await asyncio.sleep(2.0)
            now, rows = snapshot_rows()
            print(f"t={now:5.1f}s " + "  ".join(f"{r}:{s} load={l} spill-in={sp} p99={p:.0f}ms"
                                                for r, s, l, sp, p in rows), flush=True)


def run_demo(duration_s: float = 40.0, rate: float = 25.0, speed: float = 20.0, seed: int = 1,
             live: bool = True) -> DemoResult:
    return asyncio.run(_demo(duration_s, rate, speed, seed, live))


def print_summary(result: DemoResult, out=None) -> None:
    out = out if out is not None else sys.stdout
    head = f"{'origin':14s} {'window':10s} {'requests':>8s} {'answered':>9s} {'at home':>8s} {'TTFB p50':>9s} {'p99':>8s} {'shed':>5s} {'5xx':>4s}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for row in result.table():
        def pct(x):
            return f"{100 * x:7.1f}%" if x is not None else "       -"

        def ms(x):
            return f"{x:7.0f}ms" if x is not None else "        -"

        print(f"{row['origin']:14s} {row['window']:10s} {row['requests']:8d} {pct(row['answered']):>9s} "
              f"{pct(row['served_at_home']):>8s} {ms(row['ttfb_p50_ms']):>9s} {ms(row['ttfb_p99_ms']):>8s} "
              f"{row['shed']:5d} {row['errors']:4d}", file=out)
    print(f"APAC's replicas failed from {result.outage[0]:.0f} s to {result.outage[1]:.0f} s; 'at home': answered "
          "in the user's own region.", file=out)


def main(duration_s: float, rate: float, as_json: bool = False) -> int:
    result = run_demo(duration_s, rate)
    if as_json:
        print(json.dumps(result.table(), indent=1))
    else:
        print_summary(result)
    return 0
