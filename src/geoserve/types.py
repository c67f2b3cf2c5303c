"""The typed vocabulary of geoserve: topology, policy, signals, requests, decisions.

All are msgspec Structs: cheap to build, strict to decode (unknown fields are
errors), and one wire format (JSON, MessagePack, TOML, YAML) for config files,
snapshots and replay logs. Units are in the field names (``_ms``, ``_tokens``).
Defaults come from ``docs/api.md`` (Llama-2-70B on H100, tensor parallel 4; the
seed's budgets and priority classes).
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec

__all__ = [
    "ModelProfile",
    "ReplicaSpec",
    "Deployment",
    "PriorityClass",
    "Topology",
    "Policy",
    "ReplicaSignal",
    "SpillAllowance",
    "Signals",
    "SignalColumns",
    "Request",
    "Decision",
    "DEFAULT_PRIORITIES",
    "ACTIONS",
]


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ModelProfile(_Strict):
    """Latency model of one replica of a model.

    prefill_ms = prefill_base_ms + prefill_ms_per_token * uncached prompt tokens;
    one decode step = tpot_base_ms + tpot_ms_per_batch * batch. The defaults are the
    least-squares fit of Splitwise's Llama-2-70B h100 TP4 rows (contexts <= 8k).
    ``mean_service_ms`` is the mean time a request holds a decode slot; it turns a
    queue depth into a wait. When absent it is derived from the profile at the
    Azure 2023 conversation trace's means (1,155 prompt / 211 output tokens) and
    a half-full batch of ``decode_slots``.
    """

    prefill_base_ms: float = 7.7
    prefill_ms_per_token: float = 0.107
    tpot_base_ms: float = 28.4
    tpot_ms_per_batch: float = 0.35
    mean_service_ms: Optional[float] = None

    def prefill_ms(self, tokens: int) -> float:
        return self.prefill_base_ms + self.prefill_ms_per_token * tokens

    def tpot_ms(self, batch: int) -> float:
        return self.tpot_base_ms + self.tpot_ms_per_batch * batch

    def service_ms(self, decode_slots: int) -> float:
        if self.mean_service_ms is not None:
            return self.mean_service_ms
        return self.prefill_ms(1155) + 211 * self.tpot_ms(max(1, decode_slots // 2))


class ReplicaSpec(_Strict):
    """One replica: a stable id, the address a proxy dials, optional overrides."""

    id: str
    endpoint: str = ""
    decode_slots: Optional[int] = None
    kv_blocks: Optional[int] = None


class Deployment(_Strict):
    """A model version served by a set of replicas in one region."""

    model: str
    version: str
    region: str
    replicas: tuple[ReplicaSpec, ...]
    decode_slots: int = 64
    kv_blocks: int = 918
    kv_block_tokens: int = 512


class PriorityClass(_Strict):
    """Budgets on time to first token and the share of decode slots a class may fill.

    A replica admits a request of this class while its slot utilization (in-flight
    plus the router's optimistic count, over decode slots) is below
    ``slot_ceiling``; lower ceilings make a class yield first. A class overflows to
    another region only while the spill allowance left (per pair and per rescuer)
    exceeds ``spill_reserve`` - tokens kept for the classes above it, so that when
    the caps bind, the lower classes stop spilling first. A request of this class
    that the router degrades to the fallback model is also capped at
    ``degrade_max_tokens`` output tokens when set (``Decision.max_tokens``): a
    shorter answer holds the small fallback pool's slots for less time.
    """

    local_budget_ms: float
    cross_budget_ms: float
    slot_ceiling: float
    sheddable: bool = False
    spill_reserve: float = 0.0
    degrade_max_tokens: Optional[int] = None


DEFAULT_PRIORITIES: dict[str, PriorityClass] = {
    "interactive": PriorityClass(800.0, 1200.0, 1.0, False),
    "batch": PriorityClass(10_000.0, 10_000.0, 0.8, True, spill_reserve=5.0),
    "best_effort": PriorityClass(60_000.0, 60_000.0, 0.6, True, spill_reserve=10.0),
}


class Topology(_Strict):
    """The fleet as it rarely changes: where, what, how far.

    ``rtt_ms`` is a square matrix over ``regions + edges`` in that order (row =
    from). A request's origin is a region or an edge point of presence; an edge's
    home region is its nearest region. Priorities given here replace the default
    class of the same name; the others keep their defaults.
    """

    regions: tuple[str, ...]
    rtt_ms: tuple[tuple[float, ...], ...]
    deployments: tuple[Deployment, ...]
    edges: tuple[str, ...] = ()
    models: dict[str, ModelProfile] = {}
    aliases: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    priorities: dict[str, PriorityClass] = {}

    @property
    def locations(self) -> tuple[str, ...]:
        return self.regions + self.edges

    def priority_classes(self) -> dict[str, PriorityClass]:
        return {**DEFAULT_PRIORITIES, **self.priorities}

    def profile(self, model: str) -> ModelProfile:
        return self.models.get(model) or ModelProfile()

    def replicas_by_region(self) -> dict[str, list[str]]:
        """Replica ids per region, in deployment order."""
        out: dict[str, list[str]] = {r: [] for r in self.regions}
        for d in self.deployments:
            out[d.region].extend(rep.id for rep in d.replicas)
        return out

    # Loading lives in config.py; these are the public spellings.
    @classmethod
    def from_file(cls, path: Any) -> "Topology":
        from .config import load_topology

        return load_topology(path)

    @classmethod
    def from_dict(cls, data: Any) -> "Topology":
        from .config import topology_from_dict

        return topology_from_dict(data)

    @classmethod
    def seed(cls, scale: float = 1.0, *, endpoint_base: str = "127.0.0.1") -> "Topology":
        from .config import seed_topology

        return seed_topology(scale, endpoint_base=endpoint_base)


class Policy(_Strict):
    """Knobs of the decision; the defaults are the design guide's."""

    load_bound: float = 1.25  # c of bounded-load consistent hashing
    ring_key_tokens: int = 256  # prefix tokens that make the affinity key
    ring_vnodes: int = 64  # points per replica on a ring
    max_fallbacks: int = 2  # retry targets listed after the primary
    spill_ceiling: float = 0.9  # a rescuer admits spill below this slot utilization
    inference_share_ms: float = 600.0  # the budget's inference slice (stretched budgets)
    signal_max_age_ms: float = 2000.0  # older signals mark a replica stale
    prefix_index_entries: int = 1 << 16  # block hashes the approximate index holds
    min_retry_after_ms: int = 10
    default_retry_after_ms: int = 1000


class ReplicaSignal(_Strict):
    """What a replica reported, and when (ms on the gateway's clock)."""

    replica: str
    observed_ms: float
    healthy: bool = True
    draining: bool = False
    degraded: bool = False  # soft failure (Envoy's degraded host): used only when no healthy replica will do
    queue_depth: int = 0
    in_flight: int = 0
    kv_free_blocks: Optional[int] = None
    prefill_ms_per_token: Optional[float] = None
    tpot_ms: Optional[float] = None
    mean_service_ms: Optional[float] = None


class SpillAllowance(_Strict):
    """Overflow requests a rescuer region may still take (from origin, or in total)."""

    rescuer: str
    tokens: float
    origin: Optional[str] = None


class Signals(_Strict):
    """One update of the fleet's live state; replicas without a signal are unusable."""

    now_ms: float
    replicas: tuple[ReplicaSignal, ...] = ()
    regions_down: tuple[str, ...] = ()
    spill: tuple[SpillAllowance, ...] = ()


class SignalColumns(msgspec.Struct, frozen=True):
    """One update as columns, one value per replica in ``router.fleet.replica_ids`` order.

    The fast way to feed a large fleet (a poller that keeps arrays). ``observed_ms``
    NaN means no signal for that replica; NaN in an override column keeps the
    profile's value; ``None`` columns take their defaults (healthy, not draining, not degraded,
    the deployment's KV blocks, the profile).
    """

    now_ms: float
    observed_ms: Any
    in_flight: Any
    queue_depth: Any
    healthy: Any = None
    draining: Any = None
    degraded: Any = None
    kv_free_blocks: Any = None
    prefill_ms_per_token: Any = None
    tpot_ms: Any = None
    mean_service_ms: Any = None
    regions_down: tuple[str, ...] = ()
    spill: tuple[SpillAllowance, ...] = ()


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One request to route.

    ``model`` is a model, ``model@version`` or an alias; ``version`` pins a version
    (a session's pin wins over an alias's). ``prefix`` is the prompt's chained
    block hashes (see :mod:`geoserve.prefix`), ``block_tokens`` tokens each; a NumPy
    uint64 array is accepted as is. ``exclude`` lists replica ids already tried;
    ``waited_ms`` is the time the request already spent queued (it comes out of
    the budget). Not tracked by the cyclic GC (``gc=False``): a request refers to
    strings, ints and a hash array, never back to anything that refers to it.
    """

    model: str
    origin: str
    priority: str = "interactive"
    version: Optional[str] = None
    prompt_tokens: int = 0
    max_tokens: int = 256
    session: Optional[str] = None
    prefix: Any = ()
    block_tokens: int = 64
    exclude: tuple[str, ...] = ()
    waited_ms: float = 0.0


ACTIONS = ("serve", "overflow", "queue", "degrade", "shed")


class Decision(msgspec.Struct, frozen=True, gc=False):
    """Where a request goes and why.

    ``action`` is one of ``serve``, ``overflow``, ``queue``, ``degrade``, ``shed``;
    ``reason`` is machine-readable (see docs/api.md). The predicted split adds up to
    ``ttft_ms`` (network + queue + prefill + one decode step); ``budget_ms`` is the
    budget it was checked against. ``fallbacks`` are replica ids to try, in order,
    if the primary fails before its first byte. ``epoch`` and ``replica_index`` let
    :meth:`Router.complete` release exactly what :meth:`Router.route` recorded.
    ``max_tokens`` is set when the router shortens the answer (a degrade of a class
    with ``degrade_max_tokens``): the gateway rewrites the body's limit.
    Not tracked by the cyclic GC (``gc=False``): a gateway makes one per request,
    and a decision refers only to its request, strings and tuples - no cycles.
    """

    action: str
    reason: str
    request: Request
    model: Optional[str] = None
    version: Optional[str] = None
    region: Optional[str] = None
    replica: Optional[str] = None
    endpoint: Optional[str] = None
    fallbacks: tuple[str, ...] = ()
    fallback_endpoints: tuple[str, ...] = ()
    network_ms: float = 0.0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0
    budget_ms: float = 0.0
    cached_tokens: int = 0
    retry_after_ms: Optional[int] = None
    epoch: int = 0
    replica_index: int = -1
    max_tokens: Optional[int] = None  # the output limit the caller must apply; None: the request's own

    @property
    def http_status(self) -> int:
        """200 when the request goes somewhere; 429 on shed; 503 when nothing exists."""
        if self.action != "shed":
            return 200
        return 503 if self.reason == "no_replica" else 429

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The primary then the fallbacks: Envoy's retry order."""
        if self.endpoint is None:
            return ()
        return (self.endpoint,) + self.fallback_endpoints
