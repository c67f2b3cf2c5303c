"""geoserve as a Ray Serve request router.

``pip install "geoserve[ray]"`` (keep it apart from ``[envoy]``: xds-protos
overwrites protobuf modules Ray needs), then on the deployment::

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class=GeoserveRequestRouter,
        request_router_kwargs={"regions": ["us-east", "eu-west"], "rtt_ms": [[2, 80], [80, 2]],
                               "region": "us-east"},
        request_routing_stats_period_s=1.0))
    class Llm:
        def record_replica_metadata(self):      # once per replica: where it runs
            return {"region": os.environ["REGION"]}
        def record_routing_stats(self):          # every period: load it knows best
            return {"draining": self.draining}

``choose_replicas`` ranks the candidates by geoserve's decision: the chosen
replica, then its fallbacks. What the router sees:

* **region** - ``replica_metadata["region"]`` (open-source Ray leaves
  ``availability_zone`` empty; it is the fallback, then the router's own region);
* **load** - Ray's queue-length cache (updated on every request Ray sends and on
  its probes) as in-flight, ``max_ongoing_requests`` as decode slots;
  ``routing_stats["draining"]`` drains a replica;
* **the request** - keyword arguments of the handle call: ``geoserve_origin``
  (default: the router's region), ``session_id``, ``priority``, and the prompt
  (``prompt=`` or a first positional ``str``) for prefix blocks. Behind Ray's HTTP
  proxy a router sees only what the ingress passes to the handle: forward the
  headers (``x-session-id``, ``x-geoserve-origin``) as these keywords.

Each handle owner (every ingress replica, every proxy) gets its own router
instance: affinity needs no shared state (sessions and prefixes map to the same
replica through the same consistent-hash ring in every instance), and in-flight
counts are each instance's own view corrected by Ray's queue-length probes. A
``queue`` or ``shed`` decision returns no replica: Ray backs off and asks again,
which is Ray's way to queue.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional

import numpy as np
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from ..prefix import TEXT_BLOCK_TOKENS, block_hashes_from_text
from ..router import Router
from ..types import Deployment, Policy, ReplicaSpec, Request, SignalColumns, Topology

__all__ = ["GeoserveRequestRouter"]


class GeoserveRequestRouter(RequestRouter):
    def initialize_state(self, regions=None, rtt_ms=None, region: Optional[str] = None, model: str = "model",
                         policy: Optional[dict] = None, **kwargs: Any) -> None:
        if not regions or rtt_ms is None:
            raise ValueError("GeoserveRequestRouter needs request_router_kwargs regions and rtt_ms")
        self._regions = tuple(regions)
        self._rtt = tuple(tuple(float(x) for x in row) for row in rtt_ms)
        self._region = region or self._regions[0]
        if self._region not in self._regions:
            raise ValueError(f"region {self._region!r} is not one of {self._regions}")
        self._model = model
        self._policy = Policy(**policy) if policy else Policy()
        self._membership: tuple = ()
        self._router: Optional[Router] = None

    # ------------------------------------------------------------ membership
    def _region_of(self, replica: RunningReplica) -> str:
        region = (replica.replica_metadata or {}).get("region") or replica.availability_zone
        return region if region in self._regions else self._region

    def _ensure(self, replicas: List[RunningReplica]) -> Router:
        membership = tuple(sorted((r.replica_id.unique_id, self._region_of(r), r.max_ongoing_requests) for r in replicas))
        if membership != self._membership:
            deployments = []
            for region in self._regions:
                mine = [(rid, slots) for rid, g, slots in membership if g == region]
                for slots in sorted({s for _, s in mine}):
                    specs = tuple(ReplicaSpec(id=rid, endpoint=rid) for rid, s in mine if s == slots)
                    deployments.append(Deployment(model=self._model, version="v1", region=region, replicas=specs,
                                                  decode_slots=max(1, slots)))
            topology = Topology(regions=self._regions, rtt_ms=self._rtt, deployments=tuple(deployments))
            if self._router is None:
                self._router = Router(topology, self._policy)
            else:
                self._router.update_topology(topology)  # carries state over by replica id
            self._membership = membership
        return self._router

    # ------------------------------------------------------------ the choice
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        router = self._ensure(candidate_replicas)
        fleet = router.fleet
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        n = fleet.n_replicas
        now = time.monotonic() * 1000.0
        in_flight = np.zeros(n, np.int32)
        draining = np.zeros(n, bool)
        cache = self.replica_queue_len_cache
        for i, rid in enumerate(fleet.replica_ids):
            replica = by_id[rid]
            queued = cache.get(replica.replica_id) if cache is not None else None
            in_flight[i] = queued if queued is not None else 0
            draining[i] = bool((replica.routing_stats or {}).get("draining", False))
        snapshot = router.snapshot(SignalColumns(now_ms=now, observed_ms=np.full(n, now), in_flight=in_flight,
                                                 queue_depth=np.zeros(n, np.int32), draining=draining))
        decision = router.decide(self._request(pending_request, fleet), snapshot)
        if decision.replica is None or decision.action in ("queue", "shed"):
            return []  # Ray backs off and asks again: its queue
        ranks = [[by_id[decision.replica]]]
        fallbacks = [by_id[f] for f in decision.fallbacks if f in by_id]
        if fallbacks:
            ranks.append(fallbacks)
        return ranks

    def _request(self, pending: Optional[PendingRequest], fleet) -> Request:
        """The request as the router takes it; unknown origins and classes take the
        router's defaults rather than failing inside Ray's routing loop."""
        kwargs = pending.kwargs if pending is not None else {}
        args = pending.args if pending is not None else []
        prompt = kwargs.get("prompt")
        if prompt is None and args and isinstance(args[0], str):
            prompt = args[0]
        text = prompt if isinstance(prompt, str) else None
        origin = kwargs.get("geoserve_origin")
        priority = kwargs.get("priority")
        session = kwargs.get("session_id")
        return Request(
            model=self._model, origin=origin if origin in fleet.location_index else self._region,
            priority=priority if priority in fleet.priority_index else "interactive",
            session=session if isinstance(session, str) else None,
            prompt_tokens=max(1, len(text) // 4) if text else 1,
            prefix=block_hashes_from_text(text) if text else (), block_tokens=TEXT_BLOCK_TOKENS,
        )
