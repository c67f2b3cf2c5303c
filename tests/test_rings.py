"""Consistent-hash rings: few keys move on membership change; loads stay bounded."""

import math

import numpy as np

import geoserve as g
from builders import deployment, snapshot, topology

KEYS = [f"session-{i}" for i in range(2000)]


def homes(router, keys=KEYS):
    s = snapshot(router)
    return {k: router.decide(g.Request(model="m", origin="us", session=k), s).replica for k in keys}


def test_losing_a_replica_moves_only_the_keys_it_owned(impl):
    eight = topology([deployment("m", "v1", "us", 8, slots=10_000)], regions=("us",), rtt=((2.0,),))
    before = homes(g.Router(eight, implementation=impl))
    lost = "us-m-v1-3"
    seven = topology(
        [g.Deployment(model="m", version="v1", region="us", decode_slots=10_000,
                      replicas=tuple(r for r in eight.deployments[0].replicas if r.id != lost))],
        regions=("us",), rtt=((2.0,),),
    )
    after = homes(g.Router(seven, implementation=impl))
    moved = [k for k in KEYS if before[k] != after[k]]
    owned = [k for k in KEYS if before[k] == lost]
    assert set(moved) == set(owned)  # the theoretical minimum: exactly the lost replica's keys


def test_keys_spread_evenly_over_replicas(impl):
    r = g.Router(topology([deployment("m", "v1", "us", 8, slots=10_000)], regions=("us",), rtt=((2.0,),)), implementation=impl)
    counts = np.bincount([r.fleet.replica_index[x] for x in homes(r).values()], minlength=8)
    assert counts.max() / counts.mean() < 1.5  # 64 virtual nodes per replica


def test_bounded_loads_cap_a_hot_key(impl):
    # every request has the same key: bounded loads spread them at c x the mean
    r = g.Router(topology([deployment("m", "v1", "us", 8, slots=1000)], regions=("us",), rtt=((2.0,),)), implementation=impl)
    s = snapshot(r)
    for _ in range(400):
        r.route(g.Request(model="m", origin="us", session="hot"), s)
    loads = r.state.pending
    assert loads.sum() == 400
    assert loads.max() <= math.ceil(1.25 * 400 / 8)


# ---- the ring-building kernels and their twins
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from geoserve import _compat  # noqa: E402


@given(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=20, unique=True), st.integers(1, 40))
def test_native_and_twin_ring_points_are_identical(native_available, ids, vnodes):
    native = _compat.kernels("native", "hashing").ring_points(ids, vnodes)
    twin = _compat.kernels("python", "hashing").ring_points(ids, vnodes)
    assert native.tolist() == twin.tolist()


@given(st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([0, 5, 2**63]), max_size=200), st.integers(1, 4))
def test_native_and_twin_ring_sorts_are_identical_even_with_ties(native_available, values, groups):
    points = np.array(values, dtype=np.uint64)
    owners = np.arange(len(values), dtype=np.int32)
    cuts = sorted({0, len(values), *[len(values) * k // groups for k in range(groups)]})
    starts = np.array(cuts, dtype=np.int32)
    a = _compat.kernels("native", "hashing").sort_ring(points, owners, starts)
    b = _compat.kernels("python", "hashing").sort_ring(points, owners, starts)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    for lo, hi in zip(cuts, cuts[1:]):
        assert (np.diff(a[0][lo:hi].astype(object)) >= 0).all()
