"""Hand-built fleets and snapshots for decision tests, and Envoy's access log
messages for the picker's (pure data, no I/O)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import geoserve as g

# shared/ lies beside the repository (CI copies it there); GEOSERVE_SHARED_DATA overrides
DATA = Path(os.environ.get("GEOSERVE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

REGIONS = ("us", "eu", "ap")
RTT = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))


def deployment(model: str, version: str, region: str, n: int, slots: int = 8) -> g.Deployment:
    reps = tuple(
        g.ReplicaSpec(id=f"{region}-{model}-{version}-{i}", endpoint=f"10.{REGIONS.index(region) if region in REGIONS else 9}.0.{i}:8000")
        for i in range(n)
    )
    return g.Deployment(model=model, version=version, region=region, replicas=reps, decode_slots=slots)


def topology(
    deployments: Optional[Iterable[g.Deployment]] = None,
    *,
    regions: tuple[str, ...] = REGIONS,
    rtt: tuple[tuple[float, ...], ...] = RTT,
    edges: tuple[str, ...] = (),
    aliases: Optional[Mapping[str, str]] = None,
    fallbacks: Optional[Mapping[str, str]] = None,
    models: Optional[Mapping[str, g.ModelProfile]] = None,
    priorities: Optional[Mapping[str, g.PriorityClass]] = None,
) -> g.Topology:
    if deployments is None:
        deployments = [deployment("m", "v1", r, 4) for r in regions]
    return g.Topology(
        regions=regions,
        rtt_ms=rtt,
        deployments=tuple(deployments),
        edges=edges,
        aliases=dict(aliases or {}),
        fallbacks=dict(fallbacks or {}),
        models=dict(models or {}),
        priorities=dict(priorities or {}),
    )


def snapshot(
    router: g.Router,
    *,
    now: float = 0.0,
    default: Optional[Mapping] = None,
    region: Optional[Mapping[str, Mapping]] = None,
    replica: Optional[Mapping[str, Mapping]] = None,
    regions_down: tuple[str, ...] = (),
    spill: tuple[g.SpillAllowance, ...] = (),
    missing: tuple[str, ...] = (),
) -> g.Snapshot:
    """Signals for every replica: ``default``, then per-region, then per-replica fields."""
    fleet = router.fleet
    sigs = []
    for i, rid in enumerate(fleet.replica_ids):
        if rid in missing:
            continue
        fields = dict(default or {})
        fields.update((region or {}).get(fleet.topology.regions[fleet.replica_region[i]], {}))
        fields.update((replica or {}).get(rid, {}))
        fields.setdefault("observed_ms", now)
        sigs.append(g.ReplicaSignal(replica=rid, **fields))
    return router.snapshot(g.Signals(now_ms=now, replicas=tuple(sigs), regions_down=regions_down, spill=spill))


def ids_in(router: g.Router, region: str, model: Optional[str] = None) -> list[str]:
    f = router.fleet
    g_idx = f.topology.regions.index(region)
    return [
        rid
        for i, rid in enumerate(f.replica_ids)
        if f.replica_region[i] == g_idx and (model is None or f.models[f.replica_model[i]] == model)
    ]


def access_log(*entries) -> bytes:
    """Envoy's StreamAccessLogsMessage: entries of (request id, status, upstream
    address or None, routed by the picker)."""
    from envoy.config.core.v3 import address_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2
    from google.protobuf import struct_pb2

    from geoserve.integrations.envoy import DESTINATION_HEADER

    logs = []
    for request_id, status, upstream, routed in entries:
        common = al.AccessLogCommon()
        if upstream is not None:
            host, port = upstream.rsplit(":", 1)
            common.upstream_remote_address.CopyFrom(address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=host, port_value=int(port))))
        if routed:
            lb = struct_pb2.Struct()
            lb.update({DESTINATION_HEADER: upstream or "10.0.0.1:8000"})
            common.metadata.filter_metadata["envoy.lb"].CopyFrom(lb)
        logs.append(al.HTTPAccessLogEntry(common_properties=common,
                                          request=al.HTTPRequestProperties(request_id=request_id),
                                          response=al.HTTPResponseProperties(
                                              response_code={"value": status} if status else None)))
    return als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(
        log_entry=logs)).SerializeToString()
