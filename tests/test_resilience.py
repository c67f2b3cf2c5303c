"""Resilience state machines, driven by an injected clock (no sleeps)."""

import math

import msgspec
import pytest

import geoserve as g
from builders import deployment, ids_in, snapshot, topology
from geoserve.resilience import (
    CLOSED, HALF_OPEN, OPEN, PROMOTED, ROLLED_BACK, RUNNING, CanaryPlan, ConfigStore, ConfigVersion, EjectionPolicy,
    FleetHealth, HealthPolicy, Hysteresis, OutlierDetector, RetryBudget, Rollout, SpillBudget, StaleConfig, TokenBucket,
)


def signals_for(router, now=0.0):
    return g.Signals(now_ms=now, replicas=tuple(g.ReplicaSignal(replica=r, observed_ms=now) for r in router.fleet.replica_ids))


# ---------------------------------------------------------------- health
def test_hysteresis_needs_n_failures_to_go_down_and_m_successes_to_come_back():
    h = Hysteresis(HealthPolicy(fail_threshold=3, recover_threshold=2))
    assert [h.record(False, t) for t in (1, 2)] == [True, True]
    assert h.record(True, 3) is True and h.streak == 0  # a success resets the failure streak
    assert [h.record(False, t) for t in (4, 5, 6)] == [True, True, False]
    assert h.changed_ms == 6 and h.transitions == 1
    assert h.record(True, 7) is False and h.record(False, 8) is False  # one lucky probe is not enough
    assert [h.record(True, t) for t in (9, 10)] == [False, True]
    with pytest.raises(ValueError):
        HealthPolicy(fail_threshold=0)


def test_fleet_health_marks_replicas_drains_and_takes_a_region_down_within_one_snapshot(impl):
    r = g.Router(topology(), implementation=impl)
    health = FleetHealth.for_topology(r.topology)
    us = ids_in(r, "us")
    for t in range(3):
        health.probe(us[0], False, t)
    health.drain(us[1])
    sig = health.apply(signals_for(r))
    s = r.snapshot(sig)
    assert s.replica_status(us[0]) == "unhealthy" and s.replica_status(us[1]) == "draining"
    for t in range(3):
        health.probe_region("ap", False, 10 + t)  # the region's own canary fails
    assert health.regions_down() == ("ap",)
    s = r.snapshot(health.apply(signals_for(r, 20.0)))
    d = r.decide(g.Request(model="m", origin="ap", prompt_tokens=100), s)
    assert d.action == "overflow" and d.region != "ap"
    for rid in ids_in(r, "eu"):  # every replica of a region down -> the region is down
        for t in range(3):
            health.probe(rid, False, 30 + t)
    assert set(health.regions_down()) == {"ap", "eu"}


# ---------------------------------------------------------------- breakers
def detector(n=10, **kw):
    return OutlierDetector({"us": [f"r{i}" for i in range(n)]}, EjectionPolicy(**kw))


def test_consecutive_failures_eject_for_a_time_that_grows_with_each_ejection():
    d = detector()
    for t in range(4):
        assert d.record("r0", False, t) == CLOSED
    assert d.record("r0", False, 4) == OPEN
    assert d.excluded(10_000) == {"r0"}
    assert d.state("r0", 30_003) == OPEN and d.state("r0", 30_004) == HALF_OPEN  # 30 s x 1
    assert d.excluded(30_004) == set()  # half-open: a probe may go
    d.sent("r0", 30_004)
    assert d.excluded(30_005) == {"r0"}  # its one probe is out
    assert d.record("r0", False, 30_010) == OPEN  # the probe failed: out again, 30 s x 2
    assert d.state("r0", 90_009) == OPEN and d.state("r0", 90_010) == HALF_OPEN
    d.sent("r0", 90_010)
    assert d.record("r0", True, 90_020) == CLOSED
    assert d.ejections == 2


def test_an_error_rate_trips_the_breaker_too():
    d = detector(error_rate=0.5, window=10, min_requests=10, consecutive_failures=100)
    for t in range(10):
        d.record("r1", t % 2 == 0, t)  # 50 % failures, never 2 in a row
    assert d.state("r1", 10) == OPEN


def test_ejection_is_capped_at_a_share_of_the_region():
    d = detector(n=10, max_ejection_share=0.1)
    for rid in ("r0", "r1"):
        for t in range(5):
            d.record(rid, False, t)
    assert d.state("r0", 5) == OPEN and d.state("r1", 5) == CLOSED  # cap: max(1, 10 %) = 1
    assert d.excluded(5) == {"r0"}


def test_panic_mode_ignores_ejections_when_too_few_replicas_are_left():
    d = detector(n=4, max_ejection_share=0.5)
    for t in range(5):
        d.record("r0", False, t)
    assert d.excluded(10) == {"r0"} and not d.panicking
    # two more replicas are down by health checks: 1 of 4 usable < 50 % -> panic
    assert d.excluded(10, healthy={"r1": False, "r2": False}) == set()
    assert d.panicking == {"us"}


def test_ejected_replicas_leave_the_snapshot(impl):
    r = g.Router(topology(), implementation=impl)
    d = OutlierDetector.for_topology(r.topology, EjectionPolicy(max_ejection_share=0.5))
    us = ids_in(r, "us")
    for t in range(5):
        d.record(us[0], False, t)
    s = r.snapshot(d.apply(signals_for(r, 10.0), 10.0))
    assert s.replica_status(us[0]) == "unhealthy"
    assert all(r.decide(g.Request(model="m", origin="us", session=f"s{k}"), s).replica != us[0] for k in range(40))


# ---------------------------------------------------------------- spill, retries
def test_token_buckets_refill_at_their_rate_up_to_the_burst():
    b = TokenBucket(rate_per_s=10.0, burst=5.0)
    assert all(b.take(0.0) for _ in range(5)) and not b.take(0.0)
    assert not b.take(50.0) and b.take(100.0)  # 10/s: one token per 100 ms
    assert b.refill(10_000.0) == 5.0


def test_spill_budget_feeds_the_snapshot_and_caps_overflow(impl):
    r = g.Router(topology(), implementation=impl)
    budget = SpillBudget(r.topology.regions, pair_rate_per_s=1.0, pair_burst=3.0, rescuer_rate_per_s=1.0, rescuer_burst=4.0)
    full_ap = [g.ReplicaSignal(replica=x, observed_ms=0.0, in_flight=8 if x.startswith("ap") else 0) for x in r.fleet.replica_ids]
    spilled = []
    for second in range(3):
        now = second * 1000.0
        replicas = tuple(msgspec.structs.replace(x, observed_ms=now) for x in full_ap)
        s = r.snapshot(g.Signals(now_ms=now, replicas=replicas, spill=budget.allowances(now)))
        for _ in range(10):
            d = r.route(g.Request(model="m", origin="ap", prompt_tokens=100), s)
            if d.action == "overflow":
                assert budget.record_decision(d, "ap", now)
                spilled.append((second, d.region))
            r.complete(d, d.replica)
    per_pair = {(sec, reg): spilled.count((sec, reg)) for sec, reg in spilled}
    assert per_pair[(0, "us")] == 3 and per_pair[(0, "eu")] == 3  # the pair bursts
    assert sum(n for (sec, _), n in per_pair.items() if sec > 0) <= 4  # then 1/s per pair
    assert budget.refused == 0


def test_spill_caps_split_across_gateways():
    one = SpillBudget(("a", "b"), pair_rate_per_s=10, pair_burst=10, rescuer_rate_per_s=10, rescuer_burst=10)
    half = SpillBudget(("a", "b"), pair_rate_per_s=10, pair_burst=10, rescuer_rate_per_s=10, rescuer_burst=10, share=0.5)
    assert sum(one.record("a", "b", 0.0) for _ in range(20)) == 10
    assert sum(half.record("a", "b", 0.0) for _ in range(20)) == 5


def test_the_retry_budget_is_a_share_of_requests_in_flight_with_a_floor():
    b = RetryBudget(budget_share=0.2, min_concurrency=3)
    assert [b.try_retry() for _ in range(4)] == [True, True, True, False]  # the floor with no traffic
    for _ in range(100):
        b.begin_request()
    assert sum(b.try_retry() for _ in range(30)) == 17  # 20 % of 100, 3 already out
    b.end_retry()
    assert b.try_retry() and not b.try_retry()


# ---------------------------------------------------------------- versions
def versioned(alias_target):
    deps = [deployment("m", "v7", r, 2) for r in ("us", "eu", "ap")] + [deployment("m", "v8", r, 2) for r in ("us", "eu", "ap")]
    return topology(deps, aliases={"chat": alias_target})


def test_config_versions_only_move_forward_and_know_their_age(impl):
    r = g.Router(versioned("m@v7"), implementation=impl)
    store = ConfigStore(max_staleness_ms=10_000.0, router=r)
    store.apply(ConfigVersion(version=1, issued_ms=0.0, topology=versioned("m@v7")), 0.0)
    assert r.decide(g.Request(model="chat", origin="us"), r.snapshot(signals_for(r))).version == "v7"
    store.apply(ConfigVersion(version=2, issued_ms=500.0, topology=versioned("m@v8")), 600.0)  # the alias switches
    assert r.decide(g.Request(model="chat", origin="us"), r.snapshot(signals_for(r))).version == "v8"
    pinned = r.decide(g.Request(model="chat", origin="us", version="v7"), r.snapshot(signals_for(r)))
    assert pinned.version == "v7"  # a session's pin outlives the alias switch
    for late in (1, 2):
        with pytest.raises(StaleConfig) as err:
            store.apply(ConfigVersion(version=late, issued_ms=0.0, topology=versioned("m@v7")), 700.0)
        assert err.value.field == "version"
    assert store.current.version == 2 and store.refused == 2
    assert store.age_ms(5_500.0) == 5_000.0 and not store.stale(5_500.0) and store.stale(10_501.0)


# ---------------------------------------------------------------- canary
def canary(**kw):
    topo = versioned("m@v7")
    plan = CanaryPlan(model="m", version="v8", previous="v7", regions=("ap", "eu", "us"), window_ms=1000.0, min_requests=20, **kw)
    return topo, Rollout(plan, topo)


def test_a_canary_contains_the_new_version_to_its_regions(impl):
    topo, rollout = canary()
    r = g.Router(topo, implementation=impl)
    s = r.snapshot(rollout.apply(signals_for(r)))
    assert rollout.version_for("ap") == "v8" and rollout.version_for("us") == "v7"
    assert rollout.version_for("us", pinned="v8") == "v8"  # a pin always wins
    # a v8-pinned request from the US may only land on APAC's v8 replicas
    d = r.decide(g.Request(model="m", origin="us", version="v8"), s)
    assert (d.region, d.version) == ("ap", "v8")
    assert s.replica_status("us-m-v8-0") == "draining" and s.replica_status("ap-m-v8-0") == "ok"


def test_a_good_canary_advances_region_by_region_and_is_promoted():
    _, rollout = canary()
    for stage_end, region in ((1000.0, "ap"), (2000.0, "eu"), (3000.0, "us")):
        assert rollout.tick(stage_end - 1) is None  # the window is not over
        for _ in range(25):
            rollout.observe(region, "v8", True, 300.0)
        event = rollout.tick(stage_end)
        assert event is not None
    assert rollout.state == PROMOTED and rollout.canary_regions == ("ap", "eu", "us")


def test_a_bad_canary_rolls_back_and_never_leaves_its_region(impl):
    topo, rollout = canary()
    for _ in range(25):
        rollout.observe("ap", "v8", False, math.nan)  # the new version fails
        rollout.observe("us", "v8", True, 100.0)  # other regions' results do not count
    assert rollout.tick(1000.0).startswith("rolled back")
    assert rollout.state == ROLLED_BACK and rollout.canary_regions == ()
    r = g.Router(topo, implementation=impl)
    s = r.snapshot(rollout.apply(signals_for(r, 1000.0)))
    assert all(s.replica_status(f"{reg}-m-v8-{i}") == "draining" for reg in ("us", "eu", "ap") for i in range(2))
    assert rollout.version_for("ap") == "v7"
    # a session pinned to the bad version gets no replica (503) instead of a silent switch
    d = r.decide(g.Request(model="m", origin="ap", version="v8"), s)
    assert (d.action, d.reason, d.http_status) == ("shed", "no_replica", 503)


def test_a_canary_waits_for_enough_evidence():
    _, rollout = canary()
    for _ in range(5):
        rollout.observe("ap", "v8", True, 100.0)
    assert rollout.tick(5000.0) is None and rollout.state == RUNNING


def test_soft_failure_marks_a_slow_replica_degraded_with_hysteresis():
    from geoserve.resilience import SlowPolicy, SoftFailure

    slow = SoftFailure(["a", "b"], SlowPolicy(ratio=2.0, fail_threshold=2, recover_threshold=3))
    assert slow.observe("a", 90.0, 30.0, 0.0) is False  # one slow round is not enough
    assert slow.observe("a", 90.0, 30.0, 100.0) is True  # two in a row: degraded
    assert slow.observe("a", float("nan"), 30.0, 200.0) is True  # no measurement: unchanged
    assert slow.observe("a", 31.0, 30.0, 300.0) is True
    assert slow.observe("a", 31.0, 30.0, 400.0) is True
    assert slow.observe("a", 31.0, 30.0, 500.0) is False  # three good rounds: healthy again
    assert slow.observe("b", 59.0, 30.0, 0.0) is False and slow.observe("b", 59.0, 30.0, 100.0) is False  # under 2x
    assert slow.degraded() == ()
    with pytest.raises(ValueError):
        SlowPolicy(ratio=1.0)
