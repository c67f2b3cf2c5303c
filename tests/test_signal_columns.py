"""SignalColumns: the columnar signal path builds the same snapshot as structs."""

import math

import numpy as np
import pytest

import geoserve as g
from builders import topology

FIELDS = ("status", "in_flight", "queue_depth", "kv_free_blocks", "prefill_ms_per_token", "tpot_base_ms",
          "tpot_ms_per_batch", "service_ms", "slot_ms", "region_up", "spill_pair", "spill_total")


def test_columns_and_structs_give_identical_snapshots():
    r = g.Router(topology())
    ids = r.fleet.replica_ids
    n = len(ids)
    rng = np.random.default_rng(7)
    observed = rng.choice([0.0, -5000.0, math.nan], n, p=[0.7, 0.15, 0.15])
    healthy = rng.random(n) > 0.2
    draining = rng.random(n) > 0.8
    degraded = rng.random(n) > 0.7
    in_flight = rng.integers(0, 9, n)
    queue = rng.integers(0, 3, n)
    tpot = np.where(rng.random(n) > 0.5, 31.0, math.nan)
    service = np.where(rng.random(n) > 0.5, 900.0, math.nan)
    structs = g.Signals(
        now_ms=0.0,
        replicas=tuple(
            g.ReplicaSignal(
                replica=ids[i], observed_ms=float(observed[i]), healthy=bool(healthy[i]), draining=bool(draining[i]),
                degraded=bool(degraded[i]), in_flight=int(in_flight[i]), queue_depth=int(queue[i]),
                tpot_ms=None if math.isnan(tpot[i]) else float(tpot[i]),
                mean_service_ms=None if math.isnan(service[i]) else float(service[i]),
            )
            for i in range(n)
            if not math.isnan(observed[i])
        ),
        regions_down=("eu",),
        spill=(g.SpillAllowance(rescuer="us", tokens=3.0),),
    )
    columns = g.SignalColumns(
        now_ms=0.0, observed_ms=observed, in_flight=in_flight, queue_depth=queue, healthy=healthy,
        draining=draining, degraded=degraded, tpot_ms=tpot, mean_service_ms=service, regions_down=("eu",),
        spill=(g.SpillAllowance(rescuer="us", tokens=3.0),),
    )
    a, b = r.snapshot(structs), r.snapshot(columns)
    for name in FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    request = g.Request(model="m", origin="us", prompt_tokens=500)
    assert r.decide(request, a).replica == r.decide(request, b).replica


@pytest.mark.parametrize(
    "column,values,field",
    [
        ("in_flight", [1, 2, -1], "in_flight[2]"),
        ("in_flight", [1.0, 2.5, 0.0], "in_flight[1]"),
        ("in_flight", [1.0, math.nan, 0.0], "in_flight[1]"),
        ("queue_depth", [0, 2**40, 0], "queue_depth[1]"),
        ("observed_ms", [0.0, math.inf, 0.0], "observed_ms[1]"),
        ("tpot_ms", [math.nan, 0.0, math.nan], "tpot_ms[1]"),
        ("mean_service_ms", [-3.0, math.nan, math.nan], "mean_service_ms[0]"),
        ("prefill_ms_per_token", [math.nan, math.nan, math.inf], "prefill_ms_per_token[2]"),
        ("in_flight", [1, 2], "in_flight"),
        ("healthy", [1, 0, 1], "healthy"),
        ("in_flight", ["a", "b", "c"], "in_flight"),
    ],
)
def test_bad_columns_name_the_column_and_replica(column, values, field):
    one_region = topology([g.Deployment(model="m", version="v1", region="us",
                                        replicas=tuple(g.ReplicaSpec(id=f"r{i}") for i in range(3)))],
                          regions=("us",), rtt=((2.0,),))
    r = g.Router(one_region)
    base = dict(now_ms=0.0, observed_ms=np.zeros(3), in_flight=np.zeros(3, np.int64), queue_depth=np.zeros(3, np.int64))
    base[column] = np.array(values)
    with pytest.raises(g.SignalError) as err:
        r.snapshot(g.SignalColumns(**base))
    assert err.value.field == field


# ---- the compiled column derivation against the reference (snapshot.derive_columns)
from hypothesis import given, strategies as st  # noqa: E402

from geoserve import _compat  # noqa: E402
from geoserve.snapshot import derive_columns  # noqa: E402

FLOATS = (0.0, 1.5, 31.0, -2.0, math.nan, math.inf, -math.inf, 1e300)
TIMES = (0.0, -1000.0, -5000.0, -5001.0, 100.0, math.nan, math.inf)
COUNTS = (0, 1, 7, 2**31 - 1, -1)
DERIVED = ("status", "in_flight", "queue_depth", "kv_free_blocks", "prefill_ms_per_token", "tpot_base_ms",
           "tpot_ms_per_batch", "service_ms", "slot_ms")


def _fleet_router():
    from builders import deployment
    deps = [deployment("m", "v1", "us", 3, slots=4), deployment("m", "v1", "eu", 2, slots=16),
            deployment("small", "v1", "ap", 2, slots=1)]
    return g.Router(topology(deps, models={"small": g.ModelProfile(mean_service_ms=500.0)}))


@st.composite
def column_updates(draw, n):
    def col(values, dtype, optional=True):
        if optional and draw(st.booleans()):
            return None
        return np.array(draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)), dtype=dtype)

    return g.SignalColumns(
        now_ms=draw(st.sampled_from((0.0, 3.0, 10_000.0))),
        observed_ms=col(TIMES, np.float64, optional=False),
        in_flight=col(COUNTS, np.int32, optional=False),
        queue_depth=col(COUNTS, np.int32, optional=False),
        healthy=col((True, False), bool),
        draining=col((True, False), bool),
        kv_free_blocks=col(COUNTS, np.int32),
        prefill_ms_per_token=col(FLOATS, np.float64),
        tpot_ms=col(FLOATS, np.float64),
        mean_service_ms=col(FLOATS, np.float64),
    )


@pytest.mark.skipif(_compat.compiled_decide is None, reason="compiled kernels not built")
@given(data=st.data())
def test_compiled_derivation_matches_the_reference(data):
    router = _fleet_router()
    fleet = router.fleet
    columns = data.draw(column_updates(fleet.n_replicas))
    compiled = _compat.compiled_decide.derive_columns(fleet, columns.now_ms, columns)
    try:
        reference = derive_columns(fleet, columns.now_ms, columns)
    except g.SignalError:
        assert compiled is None  # the reference names the error; the fast path stepped aside
        return
    assert compiled is not None  # exact dtypes and valid values: the fast path must take them
    for name, a, b in zip(DERIVED, compiled, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


@pytest.mark.skipif(_compat.compiled_decide is None, reason="compiled kernels not built")
@pytest.mark.parametrize("column,values", [
    ("in_flight", np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.int64)),
    ("in_flight", [1, 2, 3, 4, 5, 6, 7]),
    ("observed_ms", np.zeros(7, dtype=np.float32)),
    ("observed_ms", np.zeros(14)[::2]),
    ("healthy", np.ones(7, dtype=np.int32)),
    ("in_flight", np.zeros(6, dtype=np.int32)),
])
def test_other_dtypes_and_shapes_take_the_reference_path(column, values):
    router = _fleet_router()
    n = router.fleet.n_replicas
    base = dict(now_ms=0.0, observed_ms=np.zeros(n), in_flight=np.zeros(n, np.int32), queue_depth=np.zeros(n, np.int32))
    base[column] = values
    columns = g.SignalColumns(**base)
    assert _compat.compiled_decide.derive_columns(router.fleet, 0.0, columns) is None
    try:
        expected = derive_columns(router.fleet, 0.0, columns)
    except g.SignalError as e:
        with pytest.raises(g.SignalError, match=str(e.field).replace("[", r"\[").replace("]", r"\]")):
            router.snapshot(columns)
        return
    snap = router.snapshot(columns)  # the router falls back to the reference
    for name, b in zip(DERIVED, expected):
        assert np.array_equal(getattr(snap, name), b), name


@pytest.mark.parametrize("columns", [False, True])
def test_a_measured_step_time_scales_the_service_time_unless_it_is_measured_too(columns):
    r = g.Router(topology())
    ids = r.fleet.replica_ids
    n = len(ids)
    f = r.fleet
    step = f.default_tpot_base_ms[0] + f.default_tpot_ms_per_batch[0] * f.service_batch[0]  # at half the slots
    tpot = np.full(n, math.nan)
    tpot[0] = tpot[1] = 3 * step  # three times the profile's step
    service = np.full(n, math.nan)
    service[1] = 5000.0
    if columns:
        signals = g.SignalColumns(now_ms=0.0, observed_ms=np.zeros(n), in_flight=np.zeros(n, dtype=np.int32),
                                  queue_depth=np.zeros(n, dtype=np.int32), tpot_ms=tpot, mean_service_ms=service)
    else:
        signals = g.Signals(now_ms=0.0, replicas=tuple(
            g.ReplicaSignal(replica=rid, observed_ms=0.0, tpot_ms=None if math.isnan(tpot[i]) else float(tpot[i]),
                            mean_service_ms=None if math.isnan(service[i]) else float(service[i]))
            for i, rid in enumerate(ids)))
    s = r.snapshot(signals)
    default = r.fleet.default_service_ms
    prefill = f.prefill_base_ms[0] + f.default_prefill_ms_per_token[0] * 1155
    assert s.service_ms[0] == pytest.approx(default[0] * (prefill + 211 * tpot[0]) / (prefill + 211 * step))
    assert 2.5 < s.service_ms[0] / default[0] < 3.0  # the decode part triples, the prefill part does not
    assert s.service_ms[1] == 5000.0  # measured: as reported
    assert np.array_equal(s.service_ms[2:], default[2:])  # nothing measured: exactly the profile's


def test_an_update_that_measures_nothing_shares_the_fleets_unmeasured_columns():
    # No KV, rate, step or service column: the last six derived columns are the
    # fleet's, shared read only - and equal to what all-NaN columns (every replica
    # keeps its profile) derive the long way, with and without missing signals.
    r = g.Router(topology())
    n = r.fleet.n_replicas
    observed = np.zeros(n)
    observed[1] = math.nan
    base = dict(now_ms=0.0, observed_ms=observed, in_flight=np.ones(n, np.int32), queue_depth=np.ones(n, np.int32))
    nan = np.full(n, math.nan)
    plain = r.snapshot(g.SignalColumns(**base))
    spelled = r.snapshot(g.SignalColumns(**base, prefill_ms_per_token=nan, tpot_ms=nan, mean_service_ms=nan,
                                         kv_free_blocks=r.fleet.kv_blocks.copy()))
    derivations = [derive_columns(r.fleet, 0.0, g.SignalColumns(**base))]
    if _compat.compiled_decide is not None:
        derivations.append(_compat.compiled_decide.derive_columns(r.fleet, 0.0, g.SignalColumns(**base)))
    for derived in derivations:
        assert all(a is b for a, b in zip(derived[3:], r.fleet.unmeasured))
    for name in DERIVED:
        assert np.array_equal(getattr(plain, name), getattr(spelled, name)), name
    assert plain.in_flight[1] == 0 and plain.status[1] == 4  # no signal: nothing known
    with pytest.raises(ValueError):
        plain.service_ms[0] = 1.0
