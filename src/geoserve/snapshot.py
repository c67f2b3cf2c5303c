"""Topology and signals -> the columnar tables the decision kernels read.

Two builds with two rates, as in Envoy's load balancers (all work at refresh,
none at pick time):

* :class:`Fleet` - on membership change: replicas flattened into arrays grouped by
  model, then by region (so a model's candidates are one contiguous range and a
  (model, region) group is a sub-range); the RTT matrix; each location's home
  region; priority classes and policy as scalars; and one consistent-hash ring per
  (model, region) with ``Policy.ring_vnodes`` points per replica.
* :class:`Snapshot` - on every signal update: the validated per-replica signals
  (status, load, service-time estimates) and per-region state (up/down, spill
  allowance) as arrays, referencing the fleet it was built against.

Neither is mutated after construction; decisions only read them. Rings place each
replica at ``mix64(xxh3_64(id) + k * golden)`` for k < vnodes (the point set of a
replica depends on its id only, so removing one replica moves only the keys it
owned: consistent hashing, Karger et al. STOC'97).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import xxhash

from ._hashing import GOLDEN64, mix64_array
from .config import split_model_ref, validate_topology
from .errors import ConfigError, SignalError
from .types import Policy, Signals, Topology

__all__ = ["Fleet", "Snapshot", "STATUS_NAMES"]

# Replica status codes (the kernels test ``status == OK``).
OK, UNHEALTHY, DRAINING, STALE, NO_SIGNAL = 0, 1, 2, 3, 4
STATUS_NAMES = ("ok", "unhealthy", "draining", "stale", "no_signal")


class Fleet:
    """The compiled topology: membership tables and rings. Rebuild on membership change."""

    def __init__(self, topology: Topology, policy: Optional[Policy] = None) -> None:
        policy = policy if policy is not None else Policy()
        validate_topology(topology)
        _validate_policy(policy)
        self.topology = topology
        self.policy = policy

        self.locations: list[str] = list(topology.locations)
        self.location_index = {name: i for i, name in enumerate(self.locations)}
        self.n_regions = len(topology.regions)
        self.rtt_ms = np.ascontiguousarray(np.array(topology.rtt_ms, dtype=np.float64))
        region_rtt = self.rtt_ms[:, : self.n_regions]
        # argmin takes the first minimum: ties go to the lower region index.
        self.home = np.ascontiguousarray(np.argmin(region_rtt, axis=1).astype(np.int32))
        self.home[: self.n_regions] = np.arange(self.n_regions, dtype=np.int32)

        # Models in order of first deployment; versions interned globally.
        self.models: list[str] = []
        self.versions: list[str] = []
        version_ids: dict[str, int] = {}
        for d in topology.deployments:
            if d.model not in self.models:
                self.models.append(d.model)
            if d.version not in version_ids:
                version_ids[d.version] = len(self.versions)
                self.versions.append(d.version)
        self.model_index = {m: i for i, m in enumerate(self.models)}
        self.version_index = version_ids
        self.model_versions: dict[int, set[int]] = {i: set() for i in range(len(self.models))}

        # Flatten replicas ordered by (model, region, deployment, replica).
        region_index = {r: i for i, r in enumerate(topology.regions)}
        self.region_index = region_index
        rows = []
        for order, d in enumerate(topology.deployments):
            m, g, v = self.model_index[d.model], region_index[d.region], version_ids[d.version]
            self.model_versions[m].add(v)
            for k, rep in enumerate(d.replicas):
                rows.append((m, g, order, k, v, d, rep))
        rows.sort(key=lambda row: row[:4])
        n = len(rows)
        self.n_replicas = n
        self.replica_ids = [row[6].id for row in rows]
        self.endpoints = [row[6].endpoint for row in rows]
        self.replica_index = {rid: i for i, rid in enumerate(self.replica_ids)}
        self.replica_model = np.array([row[0] for row in rows], dtype=np.int32)
        self.replica_region = np.array([row[1] for row in rows], dtype=np.int32)
        self.replica_version = np.array([row[4] for row in rows], dtype=np.int32)
        self.decode_slots = np.array(
            [row[6].decode_slots if row[6].decode_slots is not None else row[5].decode_slots for row in rows],
            dtype=np.int32,
        )
        self.kv_blocks = np.array(
            [row[6].kv_blocks if row[6].kv_blocks is not None else row[5].kv_blocks for row in rows], dtype=np.int32
        )
        self.kv_block_tokens = np.array([row[5].kv_block_tokens for row in rows], dtype=np.int32)

        profiles = [topology.profile(m) for m in self.models]
        self.model_prefill_base_ms = np.array([p.prefill_base_ms for p in profiles], dtype=np.float64)
        self.model_prefill_ms_per_token = np.array([p.prefill_ms_per_token for p in profiles], dtype=np.float64)
        prof_of = [profiles[row[0]] for row in rows]
        self.prefill_base_ms = np.array([p.prefill_base_ms for p in prof_of], dtype=np.float64)
        self.default_prefill_ms_per_token = np.array([p.prefill_ms_per_token for p in prof_of], dtype=np.float64)
        self.default_tpot_base_ms = np.array([p.tpot_base_ms for p in prof_of], dtype=np.float64)
        self.default_tpot_ms_per_batch = np.array([p.tpot_ms_per_batch for p in prof_of], dtype=np.float64)
        self.default_service_ms = np.array(
            [p.service_ms(int(s)) for p, s in zip(prof_of, self.decode_slots)], dtype=np.float64
        )

        n_models = len(self.models)
        n_groups = n_models * self.n_regions
        group_of = self.replica_model.astype(np.int64) * self.n_regions + self.replica_region
        self.group_start = np.zeros(n_groups + 1, dtype=np.int32)
        np.cumsum(np.bincount(group_of, minlength=n_groups), out=self.group_start[1:])
        self.model_start = np.ascontiguousarray(self.group_start[:: self.n_regions])
        self.region_slots = np.bincount(
            self.replica_region, weights=self.decode_slots, minlength=self.n_regions
        ).astype(np.int32)

        self.fallback_model = np.full(n_models, -1, dtype=np.int32)
        for model, fb in topology.fallbacks.items():
            self.fallback_model[self.model_index[model]] = self.model_index[fb]
        self.aliases: dict[str, tuple[int, int]] = {}
        for alias, target in topology.aliases.items():
            model, version = split_model_ref(target)
            self.aliases[alias] = (self.model_index[model], -1 if version is None else version_ids[version])

        classes = topology.priority_classes()
        self.priorities = list(classes)
        self.priority_index = {name: i for i, name in enumerate(self.priorities)}
        self.class_local_budget_ms = np.array([c.local_budget_ms for c in classes.values()], dtype=np.float64)
        self.class_cross_budget_ms = np.array([c.cross_budget_ms for c in classes.values()], dtype=np.float64)
        self.class_slot_ceiling = np.array([c.slot_ceiling for c in classes.values()], dtype=np.float64)

        self._build_rings(group_of, n_groups)

    def _build_rings(self, group_of: np.ndarray, n_groups: int) -> None:
        vnodes = self.policy.ring_vnodes
        base = np.array([xxhash.xxh3_64_intdigest(rid.encode()) for rid in self.replica_ids], dtype=np.uint64)
        steps = np.arange(vnodes, dtype=np.uint64) * np.uint64(GOLDEN64)
        points = mix64_array((base[:, None] + steps[None, :]).ravel()) if self.n_replicas else np.zeros(0, np.uint64)
        owners = np.repeat(np.arange(self.n_replicas, dtype=np.int32), vnodes)
        groups = np.repeat(group_of, vnodes)
        order = np.lexsort((owners, points, groups))  # by group, then point, then owner
        self.ring_points = np.ascontiguousarray(points[order])
        self.ring_owner = np.ascontiguousarray(owners[order])
        self.ring_start = np.ascontiguousarray(self.group_start * vnodes).astype(np.int32)

    # Lookups used at the boundary (never inside a kernel).
    def resolve_model(self, name: str) -> tuple[int, int]:
        """A model, ``model@version`` or alias -> (model index, version index or -1)."""
        if name in self.aliases:
            return self.aliases[name]
        model, version = split_model_ref(name)
        m = self.model_index.get(model)
        if m is None:
            from .errors import UnknownModel

            raise UnknownModel("model", f"unknown model or alias {name!r}")
        if version is None:
            return m, -1
        return m, self.version_of(m, version, "model")

    def version_of(self, model: int, version: str, field: str) -> int:
        v = self.version_index.get(version)
        if v is None or v not in self.model_versions[model]:
            from .errors import UnknownVersion

            raise UnknownVersion(field, f"version {version!r} of {self.models[model]!r} is not deployed")
        return v


def _validate_policy(p: Policy) -> None:
    checks = (
        ("load_bound", p.load_bound >= 1.0 and math.isfinite(p.load_bound), "must be a finite number >= 1"),
        ("ring_key_tokens", p.ring_key_tokens >= 1, "must be >= 1"),
        ("ring_vnodes", 1 <= p.ring_vnodes <= 4096, "must be in [1, 4096]"),
        ("max_fallbacks", 0 <= p.max_fallbacks <= 16, "must be in [0, 16]"),
        ("spill_ceiling", 0.0 < p.spill_ceiling <= 1.0, "must be in (0, 1]"),
        ("inference_share_ms", p.inference_share_ms >= 0 and math.isfinite(p.inference_share_ms), "must be >= 0"),
        ("signal_max_age_ms", p.signal_max_age_ms > 0, "must be > 0"),
        (
            "prefix_index_entries",
            p.prefix_index_entries >= 16 and p.prefix_index_entries & (p.prefix_index_entries - 1) == 0,
            "must be a power of two >= 16",
        ),
        ("min_retry_after_ms", p.min_retry_after_ms >= 0, "must be >= 0"),
        ("default_retry_after_ms", p.default_retry_after_ms >= 0, "must be >= 0"),
    )
    for name, ok, need in checks:
        if not ok:
            raise ConfigError(f"policy.{name}", f"{need}, got {getattr(p, name)!r}")


def _count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SignalError(field, f"must be an integer >= 0, got {value!r}")
    return int(value)


def _duration(value: object, field: str, *, positive: bool = False) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SignalError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise SignalError(field, f"must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


class Snapshot:
    """Validated signals as columns over a :class:`Fleet`. Immutable; build a new one per update."""

    def __init__(self, fleet: Fleet, signals: Signals, epoch: int) -> None:
        self.fleet = fleet
        self.epoch = epoch
        now = signals.now_ms
        try:
            now_ok = math.isfinite(float(now))
        except (TypeError, ValueError):
            now_ok = False
        if not now_ok:
            raise SignalError("now_ms", f"must be a finite number, got {now!r}")
        self.now_ms = float(now)
        n, n_regions = fleet.n_replicas, fleet.n_regions
        max_age = fleet.policy.signal_max_age_ms

        status = np.full(n, NO_SIGNAL, dtype=np.uint8)
        in_flight = np.zeros(n, dtype=np.int32)
        queue_depth = np.zeros(n, dtype=np.int32)
        kv_free = fleet.kv_blocks.copy()
        prefill_per_token = fleet.default_prefill_ms_per_token.copy()
        tpot_base = fleet.default_tpot_base_ms.copy()
        tpot_per_batch = fleet.default_tpot_ms_per_batch.copy()
        service = fleet.default_service_ms.copy()
        seen = np.zeros(n, dtype=bool)
        for i, s in enumerate(signals.replicas):
            where = f"replicas[{i}]"
            r = fleet.replica_index.get(s.replica)
            if r is None:
                raise SignalError(f"{where}.replica", f"unknown replica {s.replica!r}")
            if seen[r]:
                raise SignalError(f"{where}.replica", f"duplicate signal for replica {s.replica!r}")
            seen[r] = True
            try:
                observed = float(s.observed_ms)
            except (TypeError, ValueError):
                observed = math.nan
            if not math.isfinite(observed):
                raise SignalError(f"{where}.observed_ms", f"must be a finite number, got {s.observed_ms!r}")
            in_flight[r] = _count(s.in_flight, f"{where}.in_flight")
            queue_depth[r] = _count(s.queue_depth, f"{where}.queue_depth")
            if s.kv_free_blocks is not None:
                kv_free[r] = _count(s.kv_free_blocks, f"{where}.kv_free_blocks")
            if s.prefill_ms_per_token is not None:
                prefill_per_token[r] = _duration(s.prefill_ms_per_token, f"{where}.prefill_ms_per_token")
            if s.tpot_ms is not None:
                # A measured step time replaces the profile's batch-size model.
                tpot_base[r] = _duration(s.tpot_ms, f"{where}.tpot_ms", positive=True)
                tpot_per_batch[r] = 0.0
            if s.mean_service_ms is not None:
                service[r] = _duration(s.mean_service_ms, f"{where}.mean_service_ms", positive=True)
            if not s.healthy:
                status[r] = UNHEALTHY
            elif s.draining:
                status[r] = DRAINING
            elif now - observed > max_age:
                status[r] = STALE
            else:
                status[r] = OK

        region_up = np.ones(n_regions, dtype=np.uint8)
        region_of = {name: i for i, name in enumerate(fleet.topology.regions)}
        for i, name in enumerate(signals.regions_down):
            g = region_of.get(name)
            if g is None:
                raise SignalError(f"regions_down[{i}]", f"unknown region {name!r}")
            region_up[g] = 0

        spill_pair = np.full(n_regions * n_regions, math.inf, dtype=np.float64)
        spill_total = np.full(n_regions, math.inf, dtype=np.float64)
        for i, a in enumerate(signals.spill):
            where = f"spill[{i}]"
            g = region_of.get(a.rescuer)
            if g is None:
                raise SignalError(f"{where}.rescuer", f"unknown region {a.rescuer!r}")
            try:
                tokens = float(a.tokens)
            except (TypeError, ValueError):
                tokens = math.nan
            if math.isnan(tokens) or tokens < 0:
                raise SignalError(f"{where}.tokens", f"must be a number >= 0 (inf: unlimited), got {a.tokens!r}")
            if a.origin is None:
                spill_total[g] = tokens
            else:
                o = region_of.get(a.origin)
                if o is None:
                    raise SignalError(f"{where}.origin", f"unknown region {a.origin!r}")
                spill_pair[o * n_regions + g] = tokens

        self.status = status
        self.in_flight = in_flight
        self.queue_depth = queue_depth
        self.kv_free_blocks = kv_free
        self.prefill_ms_per_token = prefill_per_token
        self.tpot_base_ms = tpot_base
        self.tpot_ms_per_batch = tpot_per_batch
        self.service_ms = service
        # ms between two departures from a full replica: turns queue depth into wait
        self.slot_ms = service / fleet.decode_slots
        self.region_up = region_up
        self.spill_pair = spill_pair
        self.spill_total = spill_total
        self._native: object = None  # the kernel's pointer view, built on first use

    def replica_status(self, replica: str) -> str:
        """``ok``, ``unhealthy``, ``draining``, ``stale`` or ``no_signal``."""
        return STATUS_NAMES[self.status[self.fleet.replica_index[replica]]]
