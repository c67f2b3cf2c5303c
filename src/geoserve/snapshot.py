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

import functools
import math
from typing import Callable, Optional, Union

import numpy as np

from ._compat import kernels
from .config import split_model_ref, validate_topology
from .errors import ConfigError, SignalError, count
from .types import Policy, SignalColumns, Signals, Topology

__all__ = ["Fleet", "Snapshot", "STATUS_NAMES", "derive_columns"]

# Replica status codes (the kernels test ``status == OK``).
OK, UNHEALTHY, DRAINING, STALE, NO_SIGNAL, DEGRADED = 0, 1, 2, 3, 4, 5
STATUS_NAMES = ("ok", "unhealthy", "draining", "stale", "no_signal", "degraded")


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

        # Flatten replicas ordered by (model, region, deployment order, replica order):
        # sort the deployments, then lay each one's replicas out as a block.
        region_index = {r: i for i, r in enumerate(topology.regions)}
        self.region_index = region_index
        keyed = sorted(
            ((self.model_index[d.model], region_index[d.region], order), d) for order, d in enumerate(topology.deployments)
        )
        self.replica_ids, self.endpoints = [], []
        model_col, region_col, version_col, slots_col, kv_col, block_col = [], [], [], [], [], []
        for (m, g, _), d in keyed:
            v = version_ids[d.version]
            self.model_versions[m].add(v)
            k = len(d.replicas)
            self.replica_ids.extend(rep.id for rep in d.replicas)
            self.endpoints.extend(rep.endpoint for rep in d.replicas)
            model_col.append(np.full(k, m, np.int32))
            region_col.append(np.full(k, g, np.int32))
            version_col.append(np.full(k, v, np.int32))
            slots_col.append(np.array([d.decode_slots if r.decode_slots is None else r.decode_slots for r in d.replicas], np.int32))
            kv_col.append(np.array([d.kv_blocks if r.kv_blocks is None else r.kv_blocks for r in d.replicas], np.int32))
            block_col.append(np.full(k, d.kv_block_tokens, np.int32))
        self.n_replicas = len(self.replica_ids)
        self.replica_index = {rid: i for i, rid in enumerate(self.replica_ids)}
        self.replica_model = np.concatenate(model_col)
        self.replica_region = np.concatenate(region_col)
        self.replica_version = np.concatenate(version_col)
        self.decode_slots = np.concatenate(slots_col)
        self.kv_blocks = np.concatenate(kv_col)
        self.kv_block_tokens = np.concatenate(block_col)

        # Latency profile columns: per model, then gathered per replica.
        profiles = [topology.profile(m) for m in self.models]

        def per_model(field: str) -> np.ndarray:
            return np.array([getattr(p, field) for p in profiles], dtype=np.float64)

        self.model_prefill_base_ms = per_model("prefill_base_ms")
        self.model_prefill_ms_per_token = per_model("prefill_ms_per_token")
        of = self.replica_model
        self.prefill_base_ms = self.model_prefill_base_ms[of]
        self.default_prefill_ms_per_token = self.model_prefill_ms_per_token[of]
        self.default_tpot_base_ms = per_model("tpot_base_ms")[of]
        self.default_tpot_ms_per_batch = per_model("tpot_ms_per_batch")[of]
        # ModelProfile.service_ms, vectorized (same operations, same order). A signal
        # round that measures the prefill rate or the step time but not the service
        # time scales it by the same formula over the measured rates (service_ms()).
        self.service_batch = np.maximum(1, self.decode_slots // 2).astype(np.float64)
        self.service_basis_ms = service_basis(self, self.default_prefill_ms_per_token, self.default_tpot_base_ms,
                                              self.default_tpot_ms_per_batch)
        given = np.array([math.nan if p.mean_service_ms is None else p.mean_service_ms for p in profiles])[of]
        self.default_service_ms = np.where(np.isnan(given), self.service_basis_ms, given)
        # What an update that measures nothing (no KV, rate, step or service column)
        # derives for every replica, shared by all such snapshots (read only): KV
        # blocks, prefill rate, step time and its batch term, service time, ms per
        # departure from a full replica.
        unmeasured = service_ms(self, self.default_service_ms, np.zeros(len(given), dtype=bool),
                                self.default_prefill_ms_per_token, self.default_tpot_base_ms, self.default_tpot_ms_per_batch)
        self.unmeasured = tuple(np.array(a) for a in (
            self.kv_blocks, self.default_prefill_ms_per_token, self.default_tpot_base_ms, self.default_tpot_ms_per_batch,
            unmeasured, unmeasured / self.decode_slots))
        for arr in self.unmeasured:
            arr.flags.writeable = False

        n_models = len(self.models)
        n_groups = n_models * self.n_regions
        group_of = self.replica_model.astype(np.int64) * self.n_regions + self.replica_region
        self.group_start = np.zeros(n_groups + 1, dtype=np.int32)
        np.cumsum(np.bincount(group_of, minlength=n_groups), out=self.group_start[1:])
        self.model_start = np.ascontiguousarray(self.group_start[:: self.n_regions])
        self.region_slots = np.bincount(
            self.replica_region, weights=self.decode_slots, minlength=self.n_regions
        ).astype(np.int32)
        # an update without region signals: every region up, no spill limit (read only)
        self.no_region_signals = (
            np.ones(self.n_regions, dtype=np.uint8),
            np.full(self.n_regions * self.n_regions, math.inf),
            np.full(self.n_regions, math.inf),
        )
        for arr in self.no_region_signals:
            arr.flags.writeable = False
        self._native: object = None  # the kernel's pointer view, built on first use

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
        self.class_spill_reserve = np.array([c.spill_reserve for c in classes.values()], dtype=np.float64)
        # output cap on a degrade, per class (0: none)
        self.class_degrade_max_tokens = np.array([c.degrade_max_tokens or 0 for c in classes.values()], dtype=np.int64)

        self._build_rings()

    def _build_rings(self) -> None:
        hashing = kernels(which="hashing")
        vnodes = self.policy.ring_vnodes
        points = hashing.ring_points(self.replica_ids, vnodes)
        owners = np.repeat(np.arange(self.n_replicas, dtype=np.int32), vnodes)
        # Replicas are grouped already, so each group's points are one slice.
        self.ring_start = np.ascontiguousarray(self.group_start * vnodes).astype(np.int32)
        self.ring_points, self.ring_owner = hashing.sort_ring(points, owners, self.ring_start)

    def budgets(self, model: int, priority: int, prompt_tokens: int) -> tuple[float, float]:
        """Local and cross-region TTFT budgets of a class for a prompt, before time
        waited: ``max(B, cold prefill + B - inference share)`` (docs/api.md). The twin
        subtracts ``waited_ms``; the kernel computes the same expression."""
        share = self.policy.inference_share_ms
        cold = float(self.model_prefill_base_ms[model]) + float(self.model_prefill_ms_per_token[model]) * prompt_tokens
        local = float(self.class_local_budget_ms[priority])
        cross = float(self.class_cross_budget_ms[priority])
        stretched_local = cold + (local - share)
        stretched_cross = cold + (cross - share)
        return (local if local >= stretched_local else stretched_local), (cross if cross >= stretched_cross else stretched_cross)

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
    return count(value, field, SignalError)


def _duration(value: object, field: str, *, positive: bool = False) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SignalError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise SignalError(field, f"must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _now(value: object) -> float:
    try:
        now = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        now = math.nan
    if not math.isfinite(now):
        raise SignalError("now_ms", f"must be a finite number, got {value!r}")
    return now


# ---- columnar input, validated vectorized: errors name the column and replica index
def _column(values: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise SignalError(name, f"must have one value per replica of the fleet ({n}), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise SignalError(name, f"must be numeric, got dtype {arr.dtype}")
    return arr


def _first_bad(bad: np.ndarray, arr: np.ndarray, name: str, need: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise SignalError(f"{name}[{i}]", f"{need}, got {arr[i]!r}")


def _count_column(values: object, n: int, name: str) -> np.ndarray:
    arr = _column(values, n, name)
    if arr.dtype.kind == "b":
        raise SignalError(name, "must hold integer counts, not booleans")
    if arr.dtype.kind == "f":
        _first_bad(~np.isfinite(arr) | (arr != np.floor(arr)), arr, name, "must be a whole number")
    # the common case costs two reductions; the index of a bad value only when there is one
    if arr.size and (arr.min() < 0 or arr.max() > 2**31 - 1):
        _first_bad((arr < 0) | (arr > 2**31 - 1), arr, name, "must be an integer >= 0")
    return arr if arr.dtype == np.int32 else arr.astype(np.int32)


def _override_column(values: object, n: int, name: str, default: np.ndarray, *, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A float column where NaN means 'keep the profile's value'; -> (values, given mask)."""
    if values is None:
        return default, np.zeros(n, dtype=bool)
    arr = _column(values, n, name).astype(np.float64)
    given = ~np.isnan(arr)
    bad = given & (~np.isfinite(arr) | (arr < 0) | ((arr == 0) if positive else False))
    _first_bad(bad, arr, name, f"must be NaN (profile) or a finite number {'> 0' if positive else '>= 0'}")
    return np.where(given, arr, default), given


def _flag_column(values: object, n: int, name: str, default: bool) -> np.ndarray:
    if values is None:
        return np.full(n, default, dtype=bool)
    arr = _column(values, n, name)
    if arr.dtype.kind != "b":
        raise SignalError(name, f"must be booleans, got dtype {arr.dtype}")
    return arr


def service_basis(fleet: "Fleet", prefill_per_token, tpot_base, tpot_per_batch):
    """ModelProfile.service_ms's formula per replica over the given rates: a prefill
    of the mean prompt (1,155 tokens) and 211 output tokens at half the slots."""
    return (fleet.prefill_base_ms + prefill_per_token * 1155) + 211 * (tpot_base + tpot_per_batch * fleet.service_batch)


def service_ms(fleet: "Fleet", service, measured, prefill_per_token, tpot_base, tpot_per_batch):
    """Mean service time (what turns queue depth into wait): measured where given,
    else the profile's, scaled by the measured rates - a replica reporting a step
    time three times the profile's drains its slots about three times slower. With
    nothing measured the scale is exactly 1."""
    scaled = fleet.default_service_ms * (service_basis(fleet, prefill_per_token, tpot_base, tpot_per_batch) / fleet.service_basis_ms)
    return np.where(measured, service, scaled)


def derive_columns(fleet: Fleet, now_ms: float, c: SignalColumns) -> tuple:
    """The reference derivation of a columnar update (validated vectorized, errors
    name ``field[r]``) -> ``(status, in_flight, queue_depth, kv_free_blocks,
    prefill_ms_per_token, tpot_base_ms, tpot_ms_per_batch, service_ms, slot_ms)``.
    An update without KV, rate, step or service columns measures nothing of them:
    its last six are the fleet's shared ``unmeasured`` columns (read only).
    ``_core/decide.pyx`` has its compiled twin for the common dtypes."""
    n = fleet.n_replicas
    observed = _column(c.observed_ms, n, "observed_ms").astype(np.float64, copy=False)
    if np.isinf(observed).any():
        _first_bad(np.isinf(observed), observed, "observed_ms", "must be finite (NaN: no signal)")
    in_flight = _count_column(c.in_flight, n, "in_flight")
    queue_depth = _count_column(c.queue_depth, n, "queue_depth")
    unmeasured = c.kv_free_blocks is None and c.prefill_ms_per_token is None and c.tpot_ms is None and c.mean_service_ms is None
    if unmeasured:
        kv_free, prefill_per_token, tpot_base, tpot_per_batch, service, slot = fleet.unmeasured
    else:
        kv_free = fleet.kv_blocks.copy() if c.kv_free_blocks is None else _count_column(c.kv_free_blocks, n, "kv_free_blocks")
        prefill_per_token, _ = _override_column(c.prefill_ms_per_token, n, "prefill_ms_per_token", fleet.default_prefill_ms_per_token)
        tpot_base, measured = _override_column(c.tpot_ms, n, "tpot_ms", fleet.default_tpot_base_ms, positive=True)
        tpot_per_batch = np.where(measured, 0.0, fleet.default_tpot_ms_per_batch)
        service, given = _override_column(c.mean_service_ms, n, "mean_service_ms", fleet.default_service_ms, positive=True)
        service = service_ms(fleet, service, given, prefill_per_token, tpot_base, tpot_per_batch)
        slot = None
    healthy = _flag_column(c.healthy, n, "healthy", True)
    draining = _flag_column(c.draining, n, "draining", False)
    degraded = _flag_column(c.degraded, n, "degraded", False)
    missing = np.isnan(observed)
    if missing.any():  # no signal, nothing known: as if the struct were absent
        in_flight, queue_depth = np.where(missing, 0, in_flight).astype(np.int32), np.where(missing, 0, queue_depth).astype(np.int32)
        healthy, draining = healthy | missing, draining & ~missing
        if not unmeasured:  # (the unmeasured columns are the defaults already)
            kv_free = np.where(missing, fleet.kv_blocks, kv_free).astype(np.int32)
            prefill_per_token = np.where(missing, fleet.default_prefill_ms_per_token, prefill_per_token)
            tpot_base = np.where(missing, fleet.default_tpot_base_ms, tpot_base)
            tpot_per_batch = np.where(missing, fleet.default_tpot_ms_per_batch, tpot_per_batch)
            service = np.where(missing, fleet.default_service_ms, service)
    return _finish(fleet, now_ms, observed, healthy, draining, degraded, in_flight, queue_depth, kv_free,
                   prefill_per_token, tpot_base, tpot_per_batch, service, slot)


def _finish(fleet: Fleet, now_ms: float, observed, healthy, draining, degraded, in_flight, queue_depth, kv_free,
            prefill_per_token, tpot_base, tpot_per_batch, service, slot=None) -> tuple:
    """Status codes (later rules win: degraded < stale < draining < unhealthy < no
    signal) and the ms between two departures from a full replica (turns queue
    depth into wait), unless given."""
    status = np.full(len(observed), OK, dtype=np.uint8)
    status[degraded] = DEGRADED
    status[now_ms - observed > fleet.policy.signal_max_age_ms] = STALE
    status[draining] = DRAINING
    status[~healthy] = UNHEALTHY
    status[np.isnan(observed)] = NO_SIGNAL
    service = np.ascontiguousarray(service, dtype=np.float64)  # (no copy of a contiguous float64 column)
    return (status, in_flight, queue_depth, kv_free, np.ascontiguousarray(prefill_per_token, dtype=np.float64),
            np.ascontiguousarray(tpot_base, dtype=np.float64), np.ascontiguousarray(tpot_per_batch, dtype=np.float64),
            service, service / fleet.decode_slots if slot is None else slot)


class Snapshot:
    """Validated signals as columns over a :class:`Fleet`. Immutable; build a new one per update.

    Two inputs, one derivation: :class:`Signals` (a struct per replica, validated in a
    loop so errors name ``replicas[i].field``) and :class:`SignalColumns` (one array
    per field in fleet order, validated vectorized so errors name ``field[r]``).
    """

    def __init__(self, fleet: Fleet, signals: Union[Signals, SignalColumns], epoch: int,
                 derive: Optional[Callable] = None) -> None:
        """``derive``: a compiled twin of :func:`derive_columns` that returns ``None``
        for input outside its fast path (the reference then validates it and names
        the error); the router passes its kernels' one."""
        self.fleet = fleet
        self.epoch = epoch
        self.now_ms = _now(signals.now_ms)
        if isinstance(signals, SignalColumns):
            derived = derive(fleet, self.now_ms, signals) if derive is not None else None
            if derived is None:
                derived = derive_columns(fleet, self.now_ms, signals)
        else:
            derived = _finish(fleet, self.now_ms, *self._from_structs(signals))
        (self.status, self.in_flight, self.queue_depth, self.kv_free_blocks, self.prefill_ms_per_token,
         self.tpot_base_ms, self.tpot_ms_per_batch, self.service_ms, self.slot_ms) = derived
        self._regions(signals.regions_down, signals.spill)
        self._native: object = None  # the kernel's pointer view, built on first use

    @functools.cached_property
    def any_degraded(self) -> bool:
        """Any replica in soft failure: decisions then look at the healthy ones first
        (the twin asks; the kernel's view finds it while packing its rows)."""
        return bool((self.status == DEGRADED).any())

    def _from_structs(self, signals: Signals) -> tuple:
        fleet = self.fleet
        n = fleet.n_replicas
        observed = np.full(n, math.nan)
        healthy = np.ones(n, dtype=bool)
        draining = np.zeros(n, dtype=bool)
        degraded = np.zeros(n, dtype=bool)
        in_flight = np.zeros(n, dtype=np.int32)
        queue_depth = np.zeros(n, dtype=np.int32)
        kv_free = fleet.kv_blocks.copy()
        prefill_per_token = fleet.default_prefill_ms_per_token.copy()
        tpot_base = fleet.default_tpot_base_ms.copy()
        tpot_per_batch = fleet.default_tpot_ms_per_batch.copy()
        service = fleet.default_service_ms.copy()
        given = np.zeros(n, dtype=bool)
        for i, s in enumerate(signals.replicas):
            where = f"replicas[{i}]"
            r = fleet.replica_index.get(s.replica)
            if r is None:
                raise SignalError(f"{where}.replica", f"unknown replica {s.replica!r}")
            if not math.isnan(observed[r]):
                raise SignalError(f"{where}.replica", f"duplicate signal for replica {s.replica!r}")
            try:
                seen_at = float(s.observed_ms)
            except (TypeError, ValueError):
                seen_at = math.nan
            if not math.isfinite(seen_at):
                raise SignalError(f"{where}.observed_ms", f"must be a finite number, got {s.observed_ms!r}")
            observed[r] = seen_at
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
                given[r] = True
            healthy[r] = bool(s.healthy)
            draining[r] = bool(s.draining)
            degraded[r] = bool(s.degraded)
        service = service_ms(fleet, service, given, prefill_per_token, tpot_base, tpot_per_batch)
        return (observed, healthy, draining, degraded, in_flight, queue_depth, kv_free, prefill_per_token, tpot_base,
                tpot_per_batch, service)

    def _regions(self, regions_down, spill) -> None:
        fleet = self.fleet
        if not regions_down and not spill:  # the common update: shared read-only arrays
            self.region_up, self.spill_pair, self.spill_total = fleet.no_region_signals
            return
        n_regions = fleet.n_regions
        region_up = np.ones(n_regions, dtype=np.uint8)
        for i, name in enumerate(regions_down):
            g = fleet.region_index.get(name)
            if g is None:
                raise SignalError(f"regions_down[{i}]", f"unknown region {name!r}")
            region_up[g] = 0
        spill_pair = np.full(n_regions * n_regions, math.inf, dtype=np.float64)
        spill_total = np.full(n_regions, math.inf, dtype=np.float64)
        for i, a in enumerate(spill):
            where = f"spill[{i}]"
            g = fleet.region_index.get(a.rescuer)
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
                o = fleet.region_index.get(a.origin)
                if o is None:
                    raise SignalError(f"{where}.origin", f"unknown region {a.origin!r}")
                spill_pair[o * n_regions + g] = tokens
        self.region_up = region_up
        self.spill_pair = spill_pair
        self.spill_total = spill_total

    def replica_status(self, replica: str) -> str:
        """``ok``, ``degraded``, ``unhealthy``, ``draining``, ``stale`` or ``no_signal``."""
        return STATUS_NAMES[self.status[self.fleet.replica_index[replica]]]
