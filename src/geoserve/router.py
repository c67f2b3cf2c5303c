"""Router: decide / route / complete over an explicit :class:`RouterState`.

The router validates at the boundary (model, version, origin, priority, sizes),
turns a request into indices once, calls the kernel set chosen in ``_compat``, and
turns the kernel's tuple into a :class:`Decision`. ``decide`` reads snapshot and
state and writes nothing; ``route`` is decide plus recording; ``complete`` releases
what ``route`` recorded. Every ``route`` is to be followed by exactly one
``complete`` (for ``queue``, when the caller asks again or gives up; for ``shed``
it is a no-op).
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Union

import numpy as np
import xxhash

from . import _compat
from ._codes import ACTION_NAMES, DEGRADE, OVERFLOW, QUEUE, REASON_NAMES, SERVE

from .errors import RequestError, UnknownLocation, UnknownPriority, count
from .snapshot import Fleet, Snapshot
from .state import RouterState
from .types import Decision, Policy, Request, SignalColumns, Signals, Topology

__all__ = ["Router", "MAX_PREFIX_BLOCKS", "MAX_EXCLUDE"]

MAX_PREFIX_BLOCKS = 1 << 16  # 4M tokens at 64-token blocks: larger is a malformed request
MAX_EXCLUDE = 64
_EMPTY_PREFIX = np.zeros(0, dtype=np.uint64)
_NO_EXCLUDE = np.zeros(0, dtype=np.int32)
_ACTION_CODE = {name: code for code, name in enumerate(ACTION_NAMES)}


class Router:
    """The routing decision for one fleet. Thread-safe: ``decide`` is lock-free."""

    def __init__(
        self,
        topology: Topology,
        policy: Optional[Policy] = None,
        *,
        state: Optional[RouterState] = None,
        implementation: Optional[str] = None,
    ) -> None:
        self.kernels = _compat.kernels(implementation)
        fleet = Fleet(topology, policy)
        self._set_fleet(fleet, state if state is not None else RouterState.for_fleet(fleet))
        self._epoch = 0
        self._epoch_lock = threading.Lock()

    def _set_fleet(self, fleet: Fleet, state: RouterState) -> None:
        self.fleet, self.state = fleet, state
        self._check_state(state)
        # With compiled kernels, the compiled boundary takes decide / route / complete
        # and hands anything unusual back to the _python methods below.
        boundary = getattr(self.kernels, "Boundary", None)
        self._boundary = boundary(self, Decision, ACTION_NAMES, REASON_NAMES) if boundary else None
        if self._boundary is not None:
            self.decide = self._boundary.decide  # type: ignore[method-assign]
            self.route = self._boundary.route  # type: ignore[method-assign]
            self.complete = self._boundary.complete  # type: ignore[method-assign]

    @property
    def topology(self) -> Topology:
        return self.fleet.topology

    @property
    def policy(self) -> Policy:
        return self.fleet.policy

    @property
    def native(self) -> bool:
        """True when this router's kernels are the compiled ones."""
        return self.kernels is _compat.compiled_decide

    # ------------------------------------------------------------ snapshots
    def snapshot(self, signals: Union[Signals, SignalColumns]) -> Snapshot:
        """Validate signals (structs or columns) into a snapshot with a fresh epoch."""
        with self._epoch_lock:
            self._epoch += 1
            epoch = self._epoch
        return Snapshot(self.fleet, signals, epoch, getattr(self.kernels, "derive_columns", None))

    def update_topology(self, topology: Topology, policy: Optional[Policy] = None) -> None:
        """Membership change: rebuild tables and rings; carry the state over by replica id."""
        old_fleet, old_state = self.fleet, self.state
        fleet = Fleet(topology, policy if policy is not None else old_fleet.policy)
        with old_state.lock:
            same_size = fleet.policy.prefix_index_entries == len(old_state.prefix)
            # the old state is retired with the old fleet: its prefix table is adopted
            state = RouterState(fleet.n_replicas, fleet.n_regions, fleet.policy.prefix_index_entries,
                                prefix_table=old_state.prefix if same_size else None)
            remap = np.array([fleet.replica_index.get(rid, -1) for rid in old_fleet.replica_ids] + [-1], dtype=np.int32)
            kept = remap[:-1] >= 0
            for name in ("pending", "pending_prefill_ms", "prefill_until_ms", "prefill_ewma_ms"):
                getattr(state, name)[remap[:-1][kept]] = getattr(old_state, name)[kept]
            old_regions = old_fleet.topology.regions
            for g, name in enumerate(fleet.topology.regions):
                if name in old_regions:
                    state.queued[g] = old_state.queued[old_regions.index(name)]
            if same_size:
                owners = state.prefix["owner"]
                owners[...] = remap[owners]  # -1 stays -1 (the last entry)
                state.clock[:] = old_state.clock
        self._set_fleet(fleet, state)

    # ------------------------------------------------------------ decisions
    def decide(self, request: Request, snapshot: Snapshot, state: Optional[RouterState] = None) -> Decision:
        """The decision for ``request``; reads snapshot and state, writes nothing."""
        return self._decide_python(request, snapshot, self.state if state is None else state)

    def route(self, request: Request, snapshot: Snapshot) -> Decision:
        """Decide and record: optimistic in-flight, prefix index, spill, queue slots."""
        return self._route_python(request, snapshot)

    def complete(self, decision: Decision, replica: Optional[str] = None, ok: bool = True) -> None:
        """Release what :meth:`route` recorded; ``replica`` is who actually served
        (a fallback?), whose prefix cache now holds the prompt when ``ok``."""
        self._complete_python(decision, replica, ok)

    # The Python boundary: the reference for the compiled one, and its fallback.
    def _decide_python(self, request: Request, snapshot: Snapshot, state: RouterState) -> Decision:
        return self._decide(request, snapshot, state)[0]

    def _route_python(self, request: Request, snapshot: Snapshot) -> Decision:
        state = self.state
        with state.lock:
            if snapshot.epoch > state.epoch:
                state.roll(snapshot.epoch)
            decision, (prefix, origin) = self._decide(request, snapshot, state)
            self.kernels.record(snapshot, state, _ACTION_CODE[decision.action], decision.replica_index, origin, prefix,
                                decision.prefill_ms)
        return decision

    def _complete_python(self, decision: Decision, replica: Optional[str], ok: bool) -> None:
        state, fleet = self.state, self.fleet
        with state.lock:
            home = fleet.region_index.get(decision.region or "", -1)
            r = decision.replica_index
            if r >= 0 and (r >= fleet.n_replicas or fleet.replica_ids[r] != decision.replica):
                r = -1  # decided on another fleet (a membership change since): nothing of it is here
            self.kernels.release(state, _ACTION_CODE[decision.action], r, decision.epoch, home, decision.prefill_ms)
            if ok and replica is not None and replica != decision.replica and decision.action != "queue":
                served = fleet.replica_index.get(replica)
                if served is not None:
                    self.kernels.prefix_record(state, self._prefix(decision.request), served)

    # ------------------------------------------------------------ boundary
    def _check_state(self, state: RouterState) -> None:
        if state.n_replicas != self.fleet.n_replicas or state.n_regions != self.fleet.n_regions:
            raise ValueError(
                f"state was made for {state.n_replicas} replicas / {state.n_regions} regions, "
                f"the fleet has {self.fleet.n_replicas} / {self.fleet.n_regions}"
            )

    @staticmethod
    def _prefix(request: Request) -> np.ndarray:
        prefix = request.prefix
        if isinstance(prefix, np.ndarray) and prefix.dtype == np.uint64 and prefix.ndim == 1:
            arr = prefix
        else:
            try:
                arr = np.asarray(prefix if len(prefix) else _EMPTY_PREFIX, dtype=np.uint64)
            except (TypeError, ValueError, OverflowError):
                raise RequestError("prefix", "must be a sequence of 64-bit unsigned block hashes") from None
            if arr.ndim != 1:
                raise RequestError("prefix", "must be one-dimensional")
            if len(prefix) and not isinstance(prefix, np.ndarray):
                # np.asarray wraps negative Python ints silently on some versions; refuse them.
                if any((not isinstance(x, (int, np.integer))) or isinstance(x, bool) or x < 0 for x in prefix):
                    raise RequestError("prefix", "block hashes must be integers in [0, 2**64)")
        if len(arr) > MAX_PREFIX_BLOCKS:
            raise RequestError("prefix", f"{len(arr)} blocks is more than the limit of {MAX_PREFIX_BLOCKS}")
        return np.ascontiguousarray(arr)

    def _decide(self, request: Request, snapshot: Snapshot, state: RouterState) -> tuple[Decision, tuple]:
        fleet = self.fleet
        if snapshot.fleet is not fleet:
            raise ValueError("the snapshot was built for another fleet (the topology changed): build a new one")
        self._check_state(state)
        model, version = fleet.resolve_model(request.model)
        if request.version is not None:
            version = fleet.version_of(model, request.version, "version")
        origin = fleet.location_index.get(request.origin)
        if origin is None:
            raise UnknownLocation("origin", f"unknown region or edge {request.origin!r}")
        priority = fleet.priority_index.get(request.priority)
        if priority is None:
            raise UnknownPriority("priority", f"unknown priority class {request.priority!r} (known: {', '.join(fleet.priorities)})")
        prompt_tokens = _count(request.prompt_tokens, "prompt_tokens")
        _count(request.max_tokens, "max_tokens")
        block_tokens = _count(request.block_tokens, "block_tokens")
        if block_tokens < 1:
            raise RequestError("block_tokens", "must be >= 1")
        waited = request.waited_ms
        if isinstance(waited, bool) or not isinstance(waited, (int, float)) or not math.isfinite(waited) or waited < 0:
            raise RequestError("waited_ms", f"must be a finite number >= 0, got {waited!r}")
        prefix = self._prefix(request)

        if request.session is not None:
            if not isinstance(request.session, str):
                raise RequestError("session", "must be a string")
            try:
                ring_key, has_key = xxhash.xxh3_64_intdigest(request.session.encode("utf-8")), True
            except UnicodeEncodeError:
                raise RequestError("session", "must be encodable as UTF-8") from None
        elif len(prefix):
            k = max(1, -(-fleet.policy.ring_key_tokens // block_tokens))
            ring_key, has_key = int(prefix[min(k, len(prefix)) - 1]), True
        else:
            ring_key, has_key = 0, False

        if request.exclude:
            if len(request.exclude) > MAX_EXCLUDE:
                raise RequestError("exclude", f"at most {MAX_EXCLUDE} replicas can be excluded")
            # Ids unknown to this fleet (a replica that left) exclude nothing.
            idx = [fleet.replica_index[x] for x in request.exclude if x in fleet.replica_index]
            exclude = np.array(idx, dtype=np.int32)
        else:
            exclude = _NO_EXCLUDE

        out = self.kernels.decide(
            snapshot, state, model, version, origin, priority, prompt_tokens,
            ring_key, has_key, prefix, block_tokens, exclude, float(waited),
        )
        return self._decision(request, snapshot, out, origin, priority), (prefix, origin)

    def _decision(self, request: Request, snapshot: Snapshot, out: tuple, origin: int, priority: int) -> Decision:
        (action, reason, model, r, fallbacks, network, queue, prefill, decode, ttft, budget, cached, retry) = out
        f = self.fleet
        regions = f.topology.regions
        if r >= 0:
            region = regions[f.replica_region[r]]
            replica, endpoint, version = f.replica_ids[r], f.endpoints[r], f.versions[f.replica_version[r]]
        else:
            region, replica, endpoint, version = regions[f.home[origin]], None, None, None
        if action == QUEUE:
            # A queued request is not sent anywhere yet: name where it waits, not a target.
            replica, endpoint = None, None
        return Decision(
            action=ACTION_NAMES[action],
            reason=REASON_NAMES[reason],
            request=request,
            model=f.models[model],
            version=version if action in (SERVE, OVERFLOW, DEGRADE) else None,
            region=region,
            replica=replica,
            endpoint=endpoint,
            fallbacks=tuple(f.replica_ids[i] for i in fallbacks),
            fallback_endpoints=tuple(f.endpoints[i] for i in fallbacks),
            network_ms=network,
            queue_ms=queue,
            prefill_ms=prefill,
            decode_ms=decode,
            ttft_ms=ttft,
            budget_ms=budget,
            cached_tokens=cached,
            retry_after_ms=None if retry < 0 else retry,
            epoch=snapshot.epoch,
            replica_index=r if action != QUEUE else -1,
            max_tokens=_shortened(action, int(f.class_degrade_max_tokens[priority]), request.max_tokens),
        )


def _shortened(action: int, cap: int, asked: int) -> Optional[int]:
    """The output limit a degrade applies (the class's cap, when shorter), else None."""
    return cap if action == DEGRADE and 0 < cap < asked else None


def _count(value: object, field: str) -> int:
    return count(value, field, RequestError)
