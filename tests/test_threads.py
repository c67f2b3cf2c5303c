"""Many threads, one router: decide() is lock-free and agrees with one thread;
route() keeps exact counts under its lock."""

import threading

import numpy as np

import geoserve as g
from geoserve import bench


def _requests(n):
    rng = np.random.default_rng(11)
    origins = ("us-east", "eu-west", "ap-northeast")
    out = []
    for k in range(n):
        prefix = np.array([rng.integers(1, 50), k + 100], dtype=np.uint64) if k % 3 else ()
        out.append(g.Request(model="llama-70b", origin=origins[k % 3], prompt_tokens=int(rng.integers(0, 4000)),
                             prefix=prefix, session=f"s{k % 17}" if k % 5 == 0 else None))
    return out


def _run_threads(target, n_threads):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as err:  # surfaced below, never swallowed
            errors.append(err)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_eight_threads_decide_like_one(impl):
    router = g.Router(bench.fleet_topology(64), implementation=impl)
    snap = router.snapshot(bench.columns(router))
    # some routed history so the prefix index and pending counts matter
    for request in _requests(300):
        router.route(request, snap)
    requests = _requests(400 if impl == "native" else 80)
    expected = [router.decide(q, snap) for q in requests]
    results = [None] * 8

    def work(i):
        results[i] = [router.decide(q, snap) for q in requests]

    _run_threads(work, 8)
    assert all(r == expected for r in results)


def test_eight_threads_route_and_complete_keep_exact_counts(impl):
    router = g.Router(bench.fleet_topology(64), implementation=impl)
    snap = router.snapshot(bench.columns(router, in_flight=0, jitter=0))
    per_thread = 300 if impl == "native" else 60
    requests = _requests(per_thread)
    kept = [[] for _ in range(8)]

    def work(i):
        for q in requests:
            d = router.route(q, snap)
            if d.replica is not None and len(kept[i]) % 2 == 0:
                router.complete(d, d.replica)  # complete every other one
            kept[i].append(d)

    _run_threads(work, 8)
    decisions = [d for ds in kept for d in ds]
    served = [d for ds in kept for j, d in enumerate(ds) if d.action in ("serve", "overflow", "degrade")]
    completed = sum(1 for ds in kept for j, d in enumerate(ds) if d.replica is not None and j % 2 == 0)
    assert len(decisions) == 8 * per_thread
    assert router.state.pending.sum() == len(served) - completed
