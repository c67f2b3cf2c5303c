"""RouterState: what route() records, what complete() releases, and when counters reset."""

import numpy as np

import geoserve as g
from builders import deployment, ids_in, snapshot, topology


def req(origin="us", **kw):
    kw.setdefault("model", "m")
    kw.setdefault("prompt_tokens", 1000)
    return g.Request(origin=origin, **kw)


def test_route_then_complete_releases_the_optimistic_count(impl):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    d = r.route(req(), s)
    i = r.fleet.replica_index[d.replica]
    assert r.state.pending[i] == 1
    r.complete(d, replica=d.replica)
    assert r.state.pending[i] == 0
    r.complete(d, replica=d.replica)  # a second complete cannot go below zero
    assert r.state.pending[i] == 0


def test_a_newer_snapshot_starts_the_epoch_counters_afresh(impl):
    r = g.Router(topology(), implementation=impl)
    s1 = snapshot(r, region={"ap": dict(in_flight=8)})
    old = r.route(req("ap"), s1)
    assert old.action == "overflow" and r.state.spill_total.sum() == 1 and r.state.pending.sum() == 1
    # a second later: the old request's prefill (~115 ms predicted) is done by then
    s2 = snapshot(r, now=1000.0, region={"ap": dict(in_flight=8)})
    # decide() against the newer snapshot ignores the old epoch's counters ...
    assert r.decide(req("ap"), s2).replica == old.replica
    r.route(req("eu"), s2)  # ... and route() rolls them over
    assert r.state.epoch == s2.epoch and r.state.spill_total.sum() == 0 and r.state.pending.sum() == 1
    r.complete(old, replica=old.replica)  # the old epoch's request is in s2's signals, not in pending
    assert r.state.pending.sum() == 1


def test_an_older_snapshot_never_rolls_the_state_back(impl):
    r = g.Router(topology(), implementation=impl)
    s1, s2 = snapshot(r), snapshot(r)
    r.route(req(), s2)
    r.route(req(), s1)  # a late caller with an old snapshot
    assert r.state.epoch == s2.epoch


def test_queue_slots_are_held_until_complete(impl):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r, default=dict(in_flight=7))
    d = r.route(req(priority="batch"), s)
    assert d.action == "queue" and r.state.queued[0] == 1
    r.complete(d)
    assert r.state.queued[0] == 0


def test_serving_fallback_moves_the_prefix_to_the_replica_that_served(impl):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    prefix = (11, 12, 13)
    d = r.route(req(prefix=prefix, prompt_tokens=192), s)
    served = d.fallbacks[0]
    only_served = tuple(x for x in ids_in(r, "us") if x != served)
    assert r.decide(req(prefix=prefix, prompt_tokens=192, exclude=only_served), s).cached_tokens == 0
    r.complete(d, replica=served, ok=True)
    probe = r.decide(req(prefix=prefix, prompt_tokens=192, exclude=only_served), s)
    assert probe.replica == served and probe.cached_tokens == 192


def test_update_topology_carries_state_by_replica_id(impl):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    d = r.route(req(prefix=(5, 6)), s)
    bigger = topology([deployment("m", "v1", reg, 5) for reg in ("us", "eu", "ap")])
    r.update_topology(bigger)
    assert r.state.pending[r.fleet.replica_index[d.replica]] == 1
    s2 = snapshot(r)
    others = tuple(x for x in ids_in(r, "us") if x != d.replica)
    again = r.decide(req(prefix=(5, 6), exclude=others), s2)  # the prefix index was remapped too
    assert again.cached_tokens == 128 and again.replica == d.replica
    try:
        r.decide(req(), s)
    except ValueError as err:
        assert "another fleet" in str(err)
    else:
        raise AssertionError("a snapshot of the old fleet must be refused")


def test_prefix_index_is_bounded_and_evicts_the_least_recent(impl):
    policy = g.Policy(prefix_index_entries=16)
    r = g.Router(topology(), policy, implementation=impl)
    s = snapshot(r)
    for k in range(200):
        r.complete(r.route(req(prefix=(1000 + k,), prompt_tokens=64), s))
    assert len(r.state.prefix_keys) == 16
    assert (r.state.prefix_keys != 0).sum() == 16
    recent = r.decide(req(prefix=(1199,), prompt_tokens=64), s)
    assert recent.cached_tokens == 64
    oldest = r.decide(req(prefix=(1000,), prompt_tokens=64), s)
    assert oldest.cached_tokens == 0


def test_explicit_state_can_be_passed_to_decide(impl):
    r = g.Router(topology(), implementation=impl)
    s = snapshot(r)
    other = g.RouterState.for_fleet(r.fleet)
    other.epoch = s.epoch
    us = ids_in(r, "us")
    other.pending[[r.fleet.replica_index[x] for x in us[:3]]] = 8  # three replicas full
    assert r.decide(req(), s, state=other).replica == us[3]
    assert r.decide(req(), s).replica == us[0]
    wrong = g.RouterState(3, 3)
    try:
        r.decide(req(), s, state=wrong)
    except ValueError:
        pass
    else:
        raise AssertionError("a state of the wrong shape must be refused")
    assert np.all(r.state.pending == 0)


def test_a_prefill_sent_before_a_snapshot_is_still_ahead_after_it(impl):
    # The engine reports a prefill in progress as running, not waiting: the next
    # snapshot's queue depth is 0, but the router knows how much of it is left.
    r = g.Router(topology(), implementation=impl)
    us = ids_in(r, "us")
    only_first = tuple(us[1:])
    long = r.route(req(prompt_tokens=8000, exclude=only_first), snapshot(r, now=0.0))
    assert long.replica == us[0] and long.prefill_ms > 800.0
    later = snapshot(r, now=300.0, replica={us[0]: dict(in_flight=1)})
    d = r.decide(req(prompt_tokens=100, exclude=only_first), later)
    assert d.queue_ms == long.prefill_ms - 300.0
    # once it is over (by the clock or by its completion), nothing of it is left
    assert r.decide(req(prompt_tokens=100, exclude=only_first),
                    snapshot(r, now=long.prefill_ms + 1.0)).queue_ms == 0.0
    r.complete(long, replica=long.replica)
    assert r.decide(req(prompt_tokens=100, exclude=only_first), later).queue_ms == 0.0


def test_a_membership_change_carries_the_prefill_backlog_by_replica_id(impl):
    r = g.Router(topology(), implementation=impl)
    us = ids_in(r, "us")
    long = r.route(req(prompt_tokens=8000, exclude=tuple(us[1:])), snapshot(r))
    before = float(r.state.prefill_until_ms[r.fleet.replica_index[long.replica]])
    r.update_topology(topology([d for d in topology().deployments if d.region != "eu"]))
    i = r.fleet.replica_index[long.replica]
    assert float(r.state.prefill_until_ms[i]) == before
    assert np.isfinite(r.state.prefill_until_ms).sum() == 1
    r.complete(long, replica=long.replica)  # no error; what it releases is only ever its own replica's
    assert np.isfinite(r.state.prefill_until_ms).sum() == 1 and float(r.state.prefill_until_ms[i]) <= before
