"""geoserve's Ray Serve request router with real Ray Serve: three replicas in two
regions behind real deployment handles (not choose_replicas on hand-made objects).

Ray needs its own venv (xds-protos of the [envoy] extra overwrites protobuf modules
Ray uses) and a loopback-only network namespace (Ray probes a public DNS address
at start-up): .ci/run and README run this file as

    unshare -n sh -c 'ip link set lo up && RAY_AUTH_MODE=disabled .venv-ray/bin/python -m pytest tests/test_ray_serve.py'

It skips where Ray is not installed, except under CI in that venv (GEOSERVE_RAY=1).
"""

import os
import time
import warnings

import pytest

if os.environ.get("GEOSERVE_RAY") != "1":
    pytest.importorskip("ray")

with warnings.catch_warnings():  # Ray's own pydantic deprecations, at import
    warnings.simplefilter("ignore")
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from geoserve.integrations.ray_serve import GeoserveRequestRouter

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::pytest.PytestUnraisableExceptionWarning")

SLOTS = 4


@ray.remote(num_cpus=0)
class Book:
    """Hands out regions to replicas as they start, and drains on request."""

    def __init__(self, regions):
        self.regions = list(regions)
        self.drained = set()

    def next(self):
        index = len(self.regions) - 1
        return index, self.regions.pop()

    def drain(self, index):
        self.drained.add(index)

    def is_drained(self, index):
        return index in self.drained


@serve.deployment(
    num_replicas=3, max_ongoing_requests=SLOTS, ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class=GeoserveRequestRouter,
        request_router_kwargs={"regions": ["us", "eu"], "rtt_ms": [[2.0, 80.0], [80.0, 2.0]], "region": "us"},
        request_routing_stats_period_s=0.2),
)
class Model:
    def __init__(self):
        book = ray.get_actor("geoserve-book", namespace="geoserve-test")
        self.book = book
        self.index, self.region = ray.get(book.next.remote())

    def record_replica_metadata(self):
        return {"region": self.region}

    def record_routing_stats(self):
        return {"draining": ray.get(self.book.is_drained.remote(self.index))}

    async def __call__(self, prompt, geoserve_origin=None, session_id=None, hold_s=0.0):
        import asyncio

        if hold_s:
            await asyncio.sleep(hold_s)
        return {"region": self.region, "index": self.index}


@pytest.fixture(scope="module")
def handle():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False)
    book = Book.options(name="geoserve-book", namespace="geoserve-test", lifetime="detached").remote(["eu", "us", "us"])
    ray.get(book.is_drained.remote(0))  # it is up before any replica asks
    h = serve.run(Model.bind(), name="geo", route_prefix=None)
    yield h
    serve.shutdown()
    ray.shutdown()


def call(handle, **kw):
    return handle.remote(kw.pop("prompt", "hello"), **kw).result(timeout_s=30)


def test_requests_from_a_region_stay_there_while_it_has_room(handle):
    for origin, region in (("us", "us"), ("eu", "eu")):
        served = {call(handle, prompt=f"q{i}", geoserve_origin=origin)["region"] for i in range(6)}
        assert served == {region}


def test_sessions_stick(handle):
    served = {call(handle, prompt=f"turn {i}", geoserve_origin="us", session_id="s-7")["index"] for i in range(6)}
    assert len(served) == 1


def test_overflow_when_the_region_is_full(handle):
    # fill eu's only replica (4 slots) with long requests, then ask from eu again
    held = [handle.remote(f"hold {i}", geoserve_origin="eu", hold_s=3.0) for i in range(SLOTS)]
    time.sleep(0.5)
    served = call(handle, prompt="one more", geoserve_origin="eu")
    assert served["region"] == "us"
    assert {r.result(timeout_s=30)["region"] for r in held} == {"eu"}


def test_a_drained_replica_gets_nothing(handle):
    book = ray.get_actor("geoserve-book", namespace="geoserve-test")
    ray.get(book.drain.remote(1))  # one of the two us replicas
    time.sleep(1.0)  # a few routing-stats periods
    served = {call(handle, prompt=f"after drain {i}", geoserve_origin="us")["index"] for i in range(10)}
    assert 1 not in served and served
