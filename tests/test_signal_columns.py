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
    in_flight = rng.integers(0, 9, n)
    queue = rng.integers(0, 3, n)
    tpot = np.where(rng.random(n) > 0.5, 31.0, math.nan)
    service = np.where(rng.random(n) > 0.5, 900.0, math.nan)
    structs = g.Signals(
        now_ms=0.0,
        replicas=tuple(
            g.ReplicaSignal(
                replica=ids[i], observed_ms=float(observed[i]), healthy=bool(healthy[i]), draining=bool(draining[i]),
                in_flight=int(in_flight[i]), queue_depth=int(queue[i]),
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
        draining=draining, tpot_ms=tpot, mean_service_ms=service, regions_down=("eu",),
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
