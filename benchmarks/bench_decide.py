"""decide() and snapshot build, native vs pure-Python twin, by fleet size.

Run: ``python -m pytest benchmarks/bench_decide.py --benchmark-group-by=param:replicas``.
Report ratios measured in one run, never absolute times (docs/performance.md).
"""

import itertools

import numpy as np
import pytest

import geoserve as g
from builders import deployment, snapshot, topology

SIZES = [64, 340]  # replicas per region, three regions


def fleet(per_region):
    return topology([deployment("m", "v1", r, per_region, slots=64) for r in ("us", "eu", "ap")])


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.parametrize("replicas", SIZES)
@pytest.mark.parametrize("affinity", [False, True])
def test_decide(benchmark, impl, replicas, affinity):
    router = g.Router(fleet(replicas), implementation=impl)
    snap = snapshot(router, default=dict(in_flight=20, queue_depth=0))
    reqs = [
        g.Request(model="m", origin="us", prompt_tokens=1000,
                  prefix=np.array([k * 16 + 1, k * 16 + 2], dtype=np.uint64) if affinity else ())
        for k in range(1024)
    ]
    it = itertools.cycle(reqs)
    benchmark.extra_info["replicas"] = 3 * replicas
    benchmark(lambda: router.decide(next(it), snap))


@pytest.mark.parametrize("replicas", [340])
def test_snapshot_build(benchmark, replicas):
    router = g.Router(fleet(replicas))
    signals = g.Signals(now_ms=0.0, replicas=tuple(g.ReplicaSignal(replica=r, observed_ms=0.0, in_flight=3) for r in router.fleet.replica_ids))
    benchmark.extra_info["replicas"] = 3 * replicas
    benchmark(router.snapshot, signals)
