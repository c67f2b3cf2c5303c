"""Time to first byte through the reference gateway vs straight to the replica.

    python benchmarks/bench_gateway.py [--requests N]

On 127.0.0.1: one fake replica (``geoserve fake-replica``, 1000x faster than a 70B so
the engine adds almost nothing), the gateway (``geoserve serve``) in its own
process, and this client (aiohttp) alternating between the two round by round.
Streaming requests (SSE); time to the first byte of the body, concurrency 1 and 8.
Not a test: bounded (a few thousand requests), loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from geoserve.testing.processes import fast_fleet_toml, free_port, geoserve_process

BODY = json.dumps({"model": "llama-70b", "prompt": "Say something short. " * 20, "max_tokens": 8,
                   "stream": True}).encode()


async def ttfb(url: str, concurrency: int, count: int) -> list[float]:
    out: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        left = iter(range(count))

        async def worker() -> None:
            for _ in left:
                t0 = time.perf_counter()
                async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                    await r.content.readany()
                    out.append((time.perf_counter() - t0) * 1000.0)
                    await r.read()
                    assert r.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    replica_port, gateway_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(fast_fleet_toml(replica_port))
        stack.enter_context(geoserve_process("fake-replica", "--port", str(replica_port), "--speed", "1000",
                                             "--slots", "512"))
        stack.enter_context(geoserve_process("serve", str(fleet), "--region", "us", "--port", str(gateway_port)))
        targets = {"direct": replica_port, "gateway": gateway_port}
        for concurrency in (1, 8):
            samples: dict[str, list[float]] = {t: [] for t in targets}
            for _ in range(args.rounds):
                for name, port in targets.items():
                    samples[name] += asyncio.run(ttfb(f"http://127.0.0.1:{port}/v1/completions", concurrency,
                                                      args.requests // args.rounds))
            p50 = {t: statistics.median(v) for t, v in samples.items()}
            p99 = {t: sorted(v)[int(0.99 * len(v))] for t, v in samples.items()}
            print(f"c={concurrency}: direct p50 {p50['direct']:.3f} ms p99 {p99['direct']:.3f} | gateway p50 "
                  f"{p50['gateway']:.3f} ms p99 {p99['gateway']:.3f} | adds {p50['gateway'] - p50['direct']:.3f} ms p50",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
