"""The compiled kernel and its pure-Python twin make identical decisions.

Random fleets (1-3 regions, edges, 1-2 models with versions and a fallback),
random signals (draining, unhealthy, stale and missing replicas, dead regions,
spill allowances, near-ties from small value sets), and random request streams
(pinned versions, aliases, sessions, shared prefixes, exclusions, waits) that
interleave route(), complete() and new snapshots. Both implementations run the
same stream on their own router state; every decision and the final state must be
equal, and invariants must hold on every decision. The CI profile runs >= 1,000
examples (HYPOTHESIS_PROFILE=ci).
"""

import math

import msgspec

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import geoserve as g
from geoserve.snapshot import DEGRADED, OK

pytestmark = pytest.mark.usefixtures("native_available")

LOCATION_NAMES = ("r0", "r1", "r2", "e0")
RTT_VALUES = (0.0, 2.0, 80.0, 80.0, 150.0, 220.0, 700.0)


@st.composite
def fleets(draw):
    n_regions = draw(st.integers(1, 3))
    n_edges = draw(st.integers(0, 1))
    regions = LOCATION_NAMES[:n_regions]
    edges = ("e0",) * n_edges
    n = n_regions + n_edges
    rtt = tuple(tuple(draw(st.sampled_from(RTT_VALUES)) for _ in range(n)) for _ in range(n))
    models = ("big", "small")[: draw(st.integers(1, 2))]
    deployments = []
    k = 0
    for m in models:
        for region in regions:
            for version in ("v1", "v2"):
                count = draw(st.integers(0, 3))
                if count == 0:
                    continue
                slots = draw(st.sampled_from((1, 2, 4, 8)))
                reps = tuple(g.ReplicaSpec(id=f"x{k + i}", endpoint=f"h{k + i}") for i in range(count))
                k += count
                deployments.append(g.Deployment(model=m, version=version, region=region, replicas=reps, decode_slots=slots))
        if not any(d.model == m for d in deployments):
            reps = (g.ReplicaSpec(id=f"x{k}", endpoint=f"h{k}"),)
            k += 1
            deployments.append(g.Deployment(model=m, version="v1", region=regions[0], replicas=reps, decode_slots=2))
    fallbacks = {"big": "small"} if len(models) == 2 and draw(st.booleans()) else {}
    aliases = {"chat": draw(st.sampled_from(["big", "big@" + next(d.version for d in deployments if d.model == "big")]))}
    profiles = {
        m: g.ModelProfile(
            prefill_base_ms=draw(st.sampled_from((0.0, 7.7))),
            prefill_ms_per_token=draw(st.sampled_from((0.0, 0.05, 0.107))),
            tpot_base_ms=draw(st.sampled_from((10.0, 28.4))),
            tpot_ms_per_batch=draw(st.sampled_from((0.0, 0.35))),
            mean_service_ms=draw(st.sampled_from((None, 500.0, 4000.0))),
        )
        for m in models
    }
    ceiling = draw(st.sampled_from((0.5, 0.8, 1.0)))
    priorities = {"batch": g.PriorityClass(draw(st.sampled_from((300.0, 10_000.0))), 10_000.0, ceiling, True,
                                           spill_reserve=draw(st.sampled_from((0.0, 1.0, 2.5, 5.0))))}
    topology = g.Topology(
        regions=regions, edges=edges, rtt_ms=rtt, deployments=tuple(deployments),
        models=profiles, aliases=aliases, fallbacks=fallbacks, priorities=priorities,
    )
    policy = g.Policy(
        load_bound=draw(st.sampled_from((1.0, 1.25, 2.0))),
        ring_vnodes=draw(st.sampled_from((1, 4, 16))),
        max_fallbacks=draw(st.integers(0, 3)),
        spill_ceiling=draw(st.sampled_from((0.5, 0.9, 1.0))),
        prefix_index_entries=draw(st.sampled_from((16, 64))),
        signal_max_age_ms=1000.0,
    )
    return topology, policy


@st.composite
def signal_sets(draw, topology):
    sigs = []
    for d in topology.deployments:
        for rep in d.replicas:
            kind = draw(st.sampled_from(("ok", "ok", "ok", "ok", "unhealthy", "draining", "stale", "missing", "degraded")))
            if kind == "missing":
                continue
            sigs.append(
                g.ReplicaSignal(
                    replica=rep.id,
                    observed_ms=-5000.0 if kind == "stale" else 0.0,
                    healthy=kind != "unhealthy",
                    draining=kind == "draining",
                    degraded=kind == "degraded",
                    in_flight=draw(st.integers(0, 9)),
                    queue_depth=draw(st.sampled_from((0, 0, 1, 3))),
                    tpot_ms=draw(st.sampled_from((None, None, 30.0))),
                    prefill_ms_per_token=draw(st.sampled_from((None, None, 0.2))),
                )
            )
    regions_down = tuple(r for r in topology.regions if draw(st.integers(0, 5)) == 0)
    spill = []
    for rescuer in topology.regions:
        if draw(st.booleans()):
            spill.append(g.SpillAllowance(rescuer=rescuer, tokens=draw(st.sampled_from((0.0, 1.0, 2.0, math.inf)))))
        if draw(st.integers(0, 3)) == 0:
            spill.append(g.SpillAllowance(rescuer=rescuer, origin=draw(st.sampled_from(topology.regions)), tokens=draw(st.sampled_from((0.0, 1.0, 5.0)))))
    return g.Signals(now_ms=0.0, replicas=tuple(sigs), regions_down=regions_down, spill=tuple(spill))


@st.composite
def requests(draw, topology):
    ids = [rep.id for d in topology.deployments for rep in d.replicas]
    versions = sorted({d.version for d in topology.deployments if d.model == "big"})
    model = draw(st.sampled_from(("big", "chat", "big@" + versions[0])))
    version = draw(st.sampled_from((None, None, *versions)))
    block_tokens = draw(st.sampled_from((16, 64, 512)))
    n_blocks = draw(st.integers(0, 6))
    prefix = tuple(draw(st.integers(0, 6)) * 100 + i for i in range(n_blocks))  # shared leading blocks
    if draw(st.booleans()):
        prefix = np.array(prefix, dtype=np.uint64)  # the compiled boundary's fast path takes arrays
    return g.Request(
        model=model,
        origin=draw(st.sampled_from(topology.locations)),
        priority=draw(st.sampled_from(("interactive", "interactive", "batch", "best_effort"))),
        version=version,
        prompt_tokens=draw(st.sampled_from((0, 1, 100, 1000, 5000, 20_000))),
        session=draw(st.sampled_from((None, None, "s1", "s2", "s3"))),
        prefix=prefix,
        block_tokens=block_tokens,
        exclude=tuple(draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))),
        waited_ms=draw(st.sampled_from((0.0, 0.0, 100.0, 900.0))),
    )


@st.composite
def scenarios(draw):
    topology, policy = draw(fleets())
    steps = []
    for _ in range(draw(st.integers(1, 25))):
        op = draw(st.sampled_from(("route", "route", "route", "decide", "complete", "snapshot")))
        if op == "snapshot":
            steps.append(("snapshot", draw(signal_sets(topology))))
        elif op == "complete":
            steps.append(("complete", draw(st.integers(0, 30)), draw(st.booleans())))
        else:
            steps.append((op, draw(requests(topology))))
    return topology, policy, draw(signal_sets(topology)), steps


def _same(a, b):
    """Decisions are equal (a NumPy prefix inside the request compares by value)."""
    if a.request is not b.request:
        return False
    return msgspec.structs.replace(a, request=None) == msgspec.structs.replace(b, request=None)


def _check_invariants(router, snap, request, d):
    f = router.fleet
    assert d.action in ("serve", "overflow", "queue", "degrade", "shed")
    if d.replica is None:
        assert d.action in ("queue", "shed")
        assert d.retry_after_ms is not None and d.retry_after_ms >= router.policy.min_retry_after_ms
        return
    i = f.replica_index[d.replica]
    assert snap.status[i] in (OK, DEGRADED), "never an unhealthy, draining, stale or unsignalled replica"
    degraded = tuple(rid for k, rid in enumerate(f.replica_ids) if snap.status[k] == DEGRADED)
    if snap.status[i] == DEGRADED and d.action in ("serve", "overflow") and len(degraded) <= 16:
        # a degraded replica only when no healthy one would serve or take the overflow
        alt = router.decide(msgspec.structs.replace(request, exclude=request.exclude + degraded), snap)
        assert alt.action not in ("serve", "overflow"), "a degraded replica while a healthy one would do"
    assert snap.region_up[f.replica_region[i]], "never a dead region"
    assert d.replica not in request.exclude, "never an excluded replica"
    assert d.replica not in d.fallbacks and not set(d.fallbacks) & set(request.exclude)
    assert d.ttft_ms <= d.budget_ms, "never over budget"
    home = f.topology.regions[f.home[f.location_index[request.origin]]]
    if d.action == "serve":
        assert d.region == home
    if d.action == "overflow":
        assert d.region != home
    if d.action != "degrade":
        model, version = f.resolve_model(request.model)
        if request.version is not None:
            version = f.version_index[request.version]
        if version >= 0:
            assert f.replica_version[i] == version, "never a version mismatch"
        assert d.model == f.models[model]
    else:
        assert d.model == "small"


@given(scenarios())
def test_native_and_twin_decide_identically(scenario):
    topology, policy, signals, steps = scenario
    native = g.Router(topology, policy, implementation="native")
    twin = g.Router(topology, policy, implementation="python")
    snaps = (native.snapshot(signals), twin.snapshot(signals))
    history = []
    for step in steps:
        if step[0] == "snapshot":
            snaps = (native.snapshot(step[1]), twin.snapshot(step[1]))
            continue
        if step[0] == "complete":
            if history:
                dn, dt = history[step[1] % len(history)]
                served = dn.fallbacks[0] if (step[2] and dn.fallbacks) else dn.replica
                native.complete(dn, replica=served, ok=step[2])
                twin.complete(dt, replica=served, ok=step[2])
            continue
        request = step[1]
        try:
            dn = getattr(native, step[0])(request, snaps[0])
        except g.UnknownVersion:
            with pytest.raises(g.UnknownVersion):
                getattr(twin, step[0])(request, snaps[1])
            continue
        dt = getattr(twin, step[0])(request, snaps[1])
        assert _same(dn, dt)
        event(f"{dn.action}/{dn.reason}")
        _check_invariants(native, snaps[0], request, dn)
        if step[0] == "route":
            history.append((dn, dt))
    assert native.state.same_as(twin.state)
