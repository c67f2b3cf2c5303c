"""The decision on hand-built snapshots: one scenario, one expected decision.

Numbers used below (default 70B profile, 8 decode slots a replica): mean service
time 6,419 ms, so one slot frees every ~802 ms; a 1,000-token prompt prefills in
114.7 ms; one decode step at batch b is 28.4 + 0.35 b ms.
"""

import math

import numpy as np
import pytest

import geoserve as g
from builders import deployment, ids_in, snapshot, topology

SLOT_MS = g.ModelProfile().service_ms(8) / 8  # ~802.4 ms


def router(impl, topo=None, **kw):
    return g.Router(topo or topology(), implementation=impl, **kw)


def req(origin="us", **kw):
    kw.setdefault("model", "m")
    kw.setdefault("prompt_tokens", 1000)
    return g.Request(origin=origin, **kw)


def test_idle_fleet_serves_locally_with_the_predicted_split(impl):
    r = router(impl)
    d = r.decide(req("eu"), snapshot(r))
    assert (d.action, d.reason, d.region) == ("serve", "least_ttft", "eu")
    assert d.replica == "eu-m-v1-0"  # all equal: lowest index
    assert d.network_ms == 2.0 and d.queue_ms == 0.0
    assert d.prefill_ms == pytest.approx(7.7 + 0.107 * 1000)
    assert d.decode_ms == pytest.approx(28.4 + 0.35)
    assert d.ttft_ms == pytest.approx(d.network_ms + d.queue_ms + d.prefill_ms + d.decode_ms)
    assert d.budget_ms == 800.0 and d.http_status == 200
    assert d.endpoint == "10.1.0.0:8000" and d.version == "v1" and d.model == "m"


def test_apac_saturated_overflows_to_the_us_within_the_cross_region_budget(impl):
    r = router(impl)
    s = snapshot(r, region={"ap": dict(in_flight=8)})
    d = r.decide(req("ap"), s)
    assert (d.action, d.region) == ("overflow", "us")  # us (150 ms) beats eu (220 ms)
    assert d.network_ms == 150.0
    assert d.ttft_ms <= d.budget_ms == 1200.0


def test_apac_slow_but_admitting_still_overflows_when_local_misses_the_local_budget(impl):
    r = router(impl)
    s = snapshot(r, region={"ap": dict(in_flight=4, queue_depth=2)})  # + 1,605 ms queue wait
    d = r.decide(req("ap"), s)
    assert (d.action, d.region) == ("overflow", "us")


def test_eu_saturated_and_only_spare_region_too_far_queues_never_overflows(impl):
    r = router(impl)
    s = snapshot(
        r,
        region={
            "eu": dict(in_flight=8),
            "us": dict(in_flight=8),
            "ap": dict(in_flight=4, queue_depth=10),  # accepts spill, but ~8 s of queue
        },
    )
    d = r.decide(req("eu"), s)
    assert d.action == "queue" and d.region == "eu"
    assert d.replica is None and d.endpoint is None
    assert d.retry_after_ms == math.ceil(SLOT_MS)
    assert d.ttft_ms <= d.budget_ms == 1200.0
    assert d.queue_ms == pytest.approx(SLOT_MS)


def test_eu_saturated_and_waiting_does_not_fit_either_sheds_with_retry_after(impl):
    r = router(impl)
    s = snapshot(
        r,
        region={
            "eu": dict(in_flight=8, queue_depth=1),
            "us": dict(in_flight=8),
            "ap": dict(in_flight=4, queue_depth=10),
        },
    )
    d = r.decide(req("eu"), s)
    assert (d.action, d.reason) == ("shed", "over_budget")
    assert d.retry_after_ms == math.ceil(SLOT_MS)
    assert d.http_status == 429 and d.replica is None


def test_sticky_replica_under_its_bound_keeps_the_session(impl):
    r = router(impl)
    home = r.decide(req(session="user-42"), snapshot(r)).replica
    d = r.decide(req(session="user-42"), snapshot(r, region={"us": dict(in_flight=2)}))
    assert (d.action, d.reason, d.replica) == ("serve", "affinity", home)


def test_sticky_replica_over_its_bound_loses_to_the_lowest_predicted_ttft(impl):
    r = router(impl)
    home = r.decide(req(session="user-42"), snapshot(r)).replica
    # bound: ceil(1.25 * (6 + 1) / 4) = 3 < 6 + 1
    d = r.decide(req(session="user-42"), snapshot(r, replica={home: dict(in_flight=6)}))
    others = [x for x in ids_in(r, "us") if x != home]
    assert (d.action, d.reason) == ("serve", "least_ttft")
    assert d.replica == others[0]  # the rest are equal: lowest index wins


def test_sticky_replica_over_budget_loses_even_under_its_bound(impl):
    r = router(impl)
    home = r.decide(req(session="user-42"), snapshot(r)).replica
    d = r.decide(req(session="user-42"), snapshot(r, replica={home: dict(queue_depth=1)}))
    assert d.replica != home and d.reason == "least_ttft"


def test_unusable_replicas_and_dead_regions_are_never_chosen(impl):
    r = router(impl)
    us = ids_in(r, "us")
    s = snapshot(
        r,
        now=10_000.0,
        replica={
            us[0]: dict(draining=True),
            us[1]: dict(healthy=False),
            us[3]: dict(observed_ms=0.0),  # 10 s old: stale
        },
    )
    assert s.replica_status(us[3]) == "stale"
    for k in range(50):
        d = r.decide(req(session=f"s{k}", exclude=(us[2],)), s)
        assert d.replica not in us
        assert (d.action, d.region) == ("overflow", "eu")
    down = snapshot(r, regions_down=("us",))
    for k in range(20):
        d = r.decide(req(session=f"s{k}"), down)
        assert d.region != "us" and d.action == "overflow"


def test_missing_signal_means_unusable(impl):
    r = router(impl)
    us = ids_in(r, "us")
    s = snapshot(r, missing=tuple(us[:3]))
    assert s.replica_status(us[0]) == "no_signal"
    assert {r.decide(req(session=f"s{k}"), s).replica for k in range(30)} == {us[3]}


def test_batch_yields_before_interactive_at_the_same_load(impl):
    r = router(impl)
    s = snapshot(r, default=dict(in_flight=7))  # 7/8 = 0.875 everywhere
    assert r.decide(req(priority="interactive"), s).action == "serve"
    batch = r.decide(req(priority="batch"), s)
    assert batch.action == "queue"  # above its 0.8 ceiling, but 10 s of budget
    r.state.queued[0] = r.fleet.region_slots[0]  # the region's queue bound is reached
    batch = r.decide(req(priority="batch"), s)
    assert (batch.action, batch.reason, batch.http_status) == ("shed", "queue_full", 429)
    assert r.decide(req(priority="interactive"), s).action == "serve"


def test_best_effort_yields_before_batch(impl):
    r = router(impl)
    s = snapshot(r, default=dict(in_flight=5))  # 0.625: under batch's 0.8, over best_effort's 0.6
    assert r.decide(req(priority="batch"), s).action == "serve"
    assert r.decide(req(priority="best_effort"), s).action == "queue"


def _two_models(impl):
    deps = [deployment(m, "v1", reg, 2) for m in ("big", "small") for reg in ("us", "eu", "ap")]
    small = g.ModelProfile(prefill_base_ms=3.5, prefill_ms_per_token=0.049, tpot_base_ms=13.0, tpot_ms_per_batch=0.16)
    return router(impl, topology(deps, fallbacks={"big": "small"}, models={"small": small}))


def test_degrade_to_the_fallback_model_when_it_fits_and_the_full_model_does_not(impl):
    r = _two_models(impl)
    big = [x for x in r.fleet.replica_ids if "-big-" in x]
    s = snapshot(r, replica={x: dict(in_flight=8, queue_depth=10) for x in big})
    d = r.decide(req(model="big"), s)
    assert (d.action, d.reason, d.model, d.region) == ("degrade", "fallback_model", "small", "us")
    assert d.replica.startswith("us-small-") and d.ttft_ms <= d.budget_ms


def test_everything_full_sheds_with_retry_after(impl):
    r = _two_models(impl)
    s = snapshot(r, default=dict(in_flight=8, queue_depth=10))
    d = r.decide(req(model="big"), s)
    assert (d.action, d.reason, d.http_status) == ("shed", "over_budget", 429)
    assert d.retry_after_ms == math.ceil(SLOT_MS)  # the next free slot of `big` at home


def test_no_healthy_replica_anywhere_is_503(impl):
    r = router(impl)
    d = r.decide(req(), snapshot(r, default=dict(healthy=False)))
    assert (d.action, d.reason, d.http_status) == ("shed", "no_replica", 503)
    assert d.retry_after_ms == r.policy.default_retry_after_ms


def _versions(impl, **kw):
    deps = [deployment("m", "v1", "us", 2), deployment("m", "v2", "eu", 2), deployment("m", "v1", "ap", 2)]
    return router(impl, topology(deps, **kw))


def test_a_pinned_version_only_lands_on_that_version(impl):
    r = _versions(impl, aliases={"chat-next": "m@v2", "chat": "m"})
    s = snapshot(r)
    assert r.decide(req(), s).version == "v1"
    for pinned in (req(version="v2"), req(model="m@v2"), req(model="chat-next"), req(model="chat", version="v2")):
        d = r.decide(pinned, s)
        assert (d.action, d.region, d.version) == ("overflow", "eu", "v2")
    d = r.decide(req(version="v2"), snapshot(r, regions_down=("eu",)))
    assert (d.action, d.reason) == ("shed", "no_replica")


def test_a_session_pin_wins_over_the_alias(impl):
    r = _versions(impl, aliases={"chat": "m@v2"})
    d = r.decide(req(model="chat", version="v1"), snapshot(r))
    assert (d.region, d.version) == ("us", "v1")


def test_an_alias_resolves(impl):
    r = router(impl, topology(aliases={"chat": "m@v1"}))
    d = r.decide(req(model="chat"), snapshot(r))
    assert (d.model, d.version, d.action) == ("m", "v1", "serve")


def test_an_edge_origin_goes_to_its_nearest_region(impl):
    rtt = (
        (2.0, 80.0, 150.0, 190.0),
        (80.0, 2.0, 220.0, 280.0),
        (150.0, 220.0, 2.0, 110.0),
        (190.0, 280.0, 110.0, 0.0),
    )
    r = router(impl, topology(edges=("syd",), rtt=rtt))
    d = r.decide(req("syd"), snapshot(r))
    assert (d.action, d.region, d.network_ms) == ("serve", "ap", 110.0)
    full = r.decide(req("syd"), snapshot(r, region={"ap": dict(in_flight=8)}))
    assert (full.action, full.region, full.network_ms) == ("overflow", "us", 190.0)


def test_spill_allowance_per_pair_and_in_total_is_respected(impl):
    r = router(impl)
    no_pair = snapshot(r, region={"ap": dict(in_flight=8)}, spill=(g.SpillAllowance(rescuer="us", origin="ap", tokens=0),))
    assert r.decide(req("ap"), no_pair).region == "eu"
    two = snapshot(r, region={"ap": dict(in_flight=8)}, spill=(g.SpillAllowance(rescuer="us", tokens=2),))
    regions = [r.route(req("ap"), two).region for _ in range(3)]
    assert regions == ["us", "us", "eu"]


def test_lower_classes_leave_the_last_spill_tokens_to_higher_ones(impl):
    # batch keeps a reserve of 5 tokens, best_effort 10: with 4 left, only interactive spills
    r = router(impl)
    s = snapshot(r, region={"ap": dict(in_flight=8), "eu": dict(in_flight=8)},
                 spill=(g.SpillAllowance(rescuer="us", tokens=4),))
    assert r.decide(req("ap"), s).action == "overflow"
    for priority in ("batch", "best_effort"):
        d = r.decide(req("ap", priority=priority), s)
        assert d.action != "overflow" and d.region != "us", priority
    plenty = snapshot(r, region={"ap": dict(in_flight=8), "eu": dict(in_flight=8)},
                      spill=(g.SpillAllowance(rescuer="us", tokens=11),))
    assert r.decide(req("ap", priority="best_effort"), plenty).action == "overflow"


def test_a_rescuer_above_its_spill_ceiling_takes_no_overflow(impl):
    r = router(impl)
    us = ids_in(r, "us")
    busy_us = {us[0]: dict(in_flight=7), us[1]: dict(in_flight=7), us[2]: dict(in_flight=7), us[3]: dict(in_flight=8)}
    s = snapshot(r, region={"ap": dict(in_flight=8)}, replica=busy_us)  # us at 29/32 = 0.906
    assert r.decide(req("ap"), s).region == "eu"


def test_local_replica_within_the_sla_but_outside_the_target_serves_local_degraded(impl):
    r = router(impl)
    s = snapshot(r, region={"us": dict(queue_depth=1), "eu": dict(in_flight=8), "ap": dict(in_flight=8)})
    d = r.decide(req("us"), s)
    assert (d.action, d.reason, d.region) == ("serve", "local_degraded", "us")
    assert 800.0 < d.ttft_ms <= d.budget_ms == 1200.0


def test_a_long_prompt_keeps_its_budget_headroom_and_is_served(impl):
    r = router(impl)
    d = r.decide(req(prompt_tokens=20_000), snapshot(r))
    cold = 7.7 + 0.107 * 20_000
    assert (d.action, d.region) == ("serve", "us")
    assert d.budget_ms == pytest.approx(cold + 200.0)
    assert d.ttft_ms > 800.0


def test_time_already_waited_comes_out_of_the_budget(impl):
    r = router(impl)
    d = r.decide(req(waited_ms=300.0), snapshot(r))
    assert d.budget_ms == 500.0


def test_fallbacks_are_the_next_best_in_order_and_exclude_the_primary(impl):
    r = router(impl)
    s = snapshot(r)
    d = r.decide(req(), s)
    assert (d.replica, d.fallbacks) == ("us-m-v1-0", ("us-m-v1-1", "us-m-v1-2"))
    assert d.endpoints == ("10.0.0.0:8000", "10.0.0.1:8000", "10.0.0.2:8000")
    retry = r.decide(req(exclude=(d.replica,)), s)
    assert retry.replica == d.fallbacks[0]


def test_a_burst_between_snapshots_spreads_instead_of_herding(impl):
    deps = [deployment("m", "v1", reg, 4, slots=64) for reg in ("us", "eu", "ap")]
    r = router(impl, topology(deps))
    s = snapshot(r)
    picks = [r.route(req(prompt_tokens=64), s).replica for _ in range(100)]  # short prompts: all fit at home
    counts = np.bincount([r.fleet.replica_index[p] for p in picks], minlength=4)[:4]
    assert counts.sum() == 100 and counts.max() - counts.min() <= 1
    # with affinity keys, bounded loads cap the hottest replica at c x the mean
    r2 = router(impl, topology(deps))
    s2 = snapshot(r2)
    for k in range(100):
        r2.route(req(prefix=(k + 1,), prompt_tokens=64), s2)
    assert r2.state.pending[:4].sum() == 100
    assert r2.state.pending[:4].max() <= math.ceil(1.25 * 100 / 4)


def test_a_burst_of_long_prompts_spills_once_the_queued_prefills_fill_the_budget(impl):
    r = router(impl, topology([deployment("m", "v1", reg, 4, slots=64) for reg in ("us", "eu", "ap")]))
    s = snapshot(r)
    decisions = [r.route(req(prompt_tokens=1000), s) for _ in range(40)]
    home = [d for d in decisions if d.region == "us"]
    # each request waits behind the prefills the router already sent there: 2 + k * 114.7 + 114.7 + decode <= 800
    assert len(home) == 4 * 6 and all(d.ttft_ms <= 800.0 for d in home)
    assert all(d.action == "overflow" and d.ttft_ms <= 1200.0 for d in decisions[len(home):])


def test_requests_sent_since_the_snapshot_count_as_work_ahead(impl):
    r = router(impl)
    s = snapshot(r)
    first = r.route(req(), s)
    assert first.queue_ms == 0.0
    # the next one to the same replica waits behind the first one's prefill
    only_first = tuple(x for x in ids_in(r, "us") if x != first.replica)
    again = r.decide(req(exclude=only_first), s)
    assert again.replica == first.replica and again.queue_ms == pytest.approx(first.prefill_ms)
    r.complete(first, replica=first.replica)
    assert r.decide(req(exclude=only_first), s).queue_ms == 0.0


def test_the_prefix_index_makes_cached_tokens_part_of_the_prediction(impl):
    r = router(impl)
    s = snapshot(r)
    prefix = tuple(range(1, 9))  # 8 blocks of 64 tokens
    first = r.route(req(prefix=prefix, prompt_tokens=512), s)
    assert first.cached_tokens == 0
    r.complete(first, replica=first.replica)
    again = r.decide(req(prefix=prefix, prompt_tokens=600), s)
    assert again.replica == first.replica and again.cached_tokens == 512
    assert again.prefill_ms == pytest.approx(7.7 + 0.107 * 88)
    elsewhere = r.decide(req(prefix=prefix, prompt_tokens=600, exclude=(first.replica,)), s)
    assert elsewhere.cached_tokens == 0


def test_identical_inputs_give_identical_decisions(impl):
    def run():
        r = router(impl)
        s = snapshot(r, region={"ap": dict(in_flight=7, queue_depth=1)})
        return [r.route(req(o, session=f"s{k % 7}", prefix=(k % 5 + 1,)), s) for k in range(60) for o in ("us", "eu", "ap")]

    assert run() == run()


def test_decide_is_pure(impl):
    r = router(impl)
    s = snapshot(r)
    r.route(req(prefix=(1, 2, 3)), s)
    before = r.state.copy()
    for k in range(20):
        r.decide(req(prefix=(1, 2, 3, k + 10), session=f"x{k}"), s)
    assert before.same_as(r.state)


def test_a_degraded_region_is_used_only_when_no_healthy_replica_will_do(impl):
    # Envoy's degraded hosts: the US replicas report a soft failure; an idle US would
    # meet the local budget, but a healthy EU replica within the cross-region budget
    # takes the request first, and the US serves once nothing healthy is left
    r = router(impl)
    s = snapshot(r, region={"us": dict(degraded=True)})
    assert s.replica_status("us-m-v1-0") == "degraded" and s.any_degraded
    d = r.decide(req(), s)
    assert (d.action, d.region) == ("overflow", "eu") and d.ttft_ms <= 1200.0
    assert all(f.startswith("eu-") for f in d.fallbacks)
    no_spill = snapshot(r, region={"us": dict(degraded=True)}, spill=(g.SpillAllowance(rescuer="eu", tokens=0.0),
                                                                      g.SpillAllowance(rescuer="ap", tokens=0.0)))
    d = r.decide(req(), no_spill)
    assert (d.action, d.reason, d.region) == ("serve", "least_ttft", "us")
    # one degraded replica among healthy ones at home: the healthy ones first
    us = ids_in(r, "us")
    d = r.decide(req(), snapshot(r, replica={us[0]: dict(degraded=True)}))
    assert d.region == "us" and d.replica != us[0] and us[0] not in d.fallbacks
    # degraded loses to every other status: a stale or unhealthy replica stays out
    s = snapshot(r, replica={us[0]: dict(degraded=True, healthy=False)})
    assert s.replica_status(us[0]) == "unhealthy"


def test_a_degrade_shortens_the_answer_when_the_class_says_so(impl):
    deps = [deployment(m, "v1", reg, 2) for m in ("big", "small") for reg in ("us", "eu", "ap")]
    small = g.ModelProfile(prefill_base_ms=3.5, prefill_ms_per_token=0.049, tpot_base_ms=13.0, tpot_ms_per_batch=0.16)
    classes = {"interactive": g.PriorityClass(800.0, 1200.0, 1.0, degrade_max_tokens=128)}
    r = router(impl, topology(deps, fallbacks={"big": "small"}, models={"small": small}, priorities=classes))
    big = [x for x in r.fleet.replica_ids if "-big-" in x]
    busy = snapshot(r, replica={x: dict(in_flight=8, queue_depth=10) for x in big})
    d = r.decide(req(model="big", max_tokens=512), busy)
    assert (d.action, d.model, d.max_tokens) == ("degrade", "small", 128)
    assert r.decide(req(model="big", max_tokens=100), busy).max_tokens is None  # already shorter
    assert r.decide(req(model="big", max_tokens=512), snapshot(r)).max_tokens is None  # served: as asked
    with pytest.raises(g.ConfigError, match="degrade_max_tokens"):
        router(impl, topology(deps, priorities={"interactive": g.PriorityClass(800.0, 1200.0, 1.0, degrade_max_tokens=0)}))
