"""pytest-benchmark over geoserve.bench's cases: the compiled path and the twin, one run.

    python -m pytest benchmarks/bench_cases.py --benchmark-group-by=group

Each group holds one case's native and python timing; compare within a group
(ratios), not across runs or machines. `geoserve bench` prints the same cases
without pytest.
"""

import pytest

from geoserve import bench

CASES = {case.name: case for case in bench.cases(quick=True)}


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.parametrize("name", list(CASES))
def test_case(benchmark, name, impl):
    case = CASES[name]
    benchmark.group = name
    benchmark.extra_info["replicas"] = case.replicas
    if "calls" in case.extra:
        benchmark.extra_info["operations_per_round"] = case.extra["calls"][impl]
    benchmark(case.native if impl == "native" else case.python)


def test_bare_xxh3_floor(benchmark):
    """The XXH3 calls block_hashes needs, alone: the floor for the hashing cases."""
    benchmark.group = "block_hashes/4096/uint32"
    benchmark(CASES["block_hashes/4096/uint32"].extra["bare_xxh3"])


def test_ring_quality():
    quality = bench.ring_quality(keys=20_000)
    assert quality["keys_moved"] == quality["keys_moved_min"]  # consistent hashing's minimum


def test_bounded_load_quality():
    quality = bench.bounded_load_quality(count=20_000)
    assert quality["max_over_mean"] <= quality["bound"] + 0.05  # ceil() rounding above c
