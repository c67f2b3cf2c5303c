"""Scenarios as files (TOML, via msgspec): fleet, demand, faults, windows.

The built-in default (:func:`default_scenario`; every field of :class:`Scenario`
defaults to it, so an empty TOML file is the default scenario) is the seed's
service scaled down and compressed in time:

* regions us-east / eu-west / ap-northeast in the seed's 600:300:150 GPU ratio,
  kept as 16:8:4 Llama-70B replicas (TP4, 64 decode slots) plus a 2:1:1 Llama-8B
  fallback; RTT 80 / 150 / 220 ms;
* 24 hours compressed into 240 s: demand shares US 45 %, EU 30 %, APAC 25 %, each
  peaking at 14:00 local (UTC-5, +1, +9), 100 requests/s on average - enough that
  APAC's local demand exceeds its local capacity at its peak (~40 req/s against
  ~27 req/s of capacity), so the peak rotates and overflow is needed;
* an APAC outage from 40 s to 70 s (around APAC's peak);
* synthetic prompts (Azure conversation means, shared system prompts, multi-turn
  sessions, 80/15/5 % interactive/batch/best-effort), so it needs no data file.
"""

from __future__ import annotations

import math
from typing import Optional

import msgspec

from ..config import load_toml_file
from ..errors import ConfigError
from ..resilience import EjectionPolicy, HealthPolicy, SlowPolicy

__all__ = ["Scenario", "FleetSpec", "DemandSpec", "Fault", "ResilienceSpec", "SpillCaps", "CanarySpec", "default_scenario", "load_scenario"]


class FleetSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    regions: tuple[str, ...] = ("us-east", "eu-west", "ap-northeast")
    rtt_ms: tuple[tuple[float, ...], ...] = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))
    utc_offsets_h: tuple[float, ...] = (-5.0, 1.0, 9.0)
    replicas: tuple[int, ...] = (16, 8, 4)
    fallback_replicas: tuple[int, ...] = (2, 1, 1)
    decode_slots: int = 64
    fallback_decode_slots: int = 128
    kv_blocks: int = 918
    kv_block_tokens: int = 512


class DemandSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str = "synthetic"  # synthetic | mooncake | azure
    path: str = ""
    limit: int = 0
    shares: tuple[float, ...] = (0.45, 0.30, 0.25)
    mean_rate: float = 70.0  # requests/s over the whole run, all regions
    follow_the_sun: bool = False
    trough: float = 0.3  # synthetic: demand twelve hours from the local peak, relative to it (1.0: flat)
    prompt_mean: float = 1155.0
    output_mean: float = 211.0
    block_tokens: int = 64
    prefix_groups: int = 64
    prefix_share: float = 0.6
    follow_up_share: float = 0.3
    priorities: dict[str, float] = msgspec.field(default_factory=lambda: {"interactive": 0.8, "batch": 0.15, "best_effort": 0.05})


class Fault(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str  # outage | brownout | flap | signal_delay
    start_s: float
    end_s: float
    region: str = ""
    replica: str = ""  # flap: one replica id
    factor: float = 3.0  # brownout: durations x factor
    period_s: float = 2.0  # flap: up/down every period
    delay_ms: float = 0.0  # signal_delay


class SpillCaps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Token buckets on overflow: per (origin -> rescuer) pair and per rescuer."""

    pair_rate_per_s: float = 25.0
    pair_burst: float = 50.0
    rescuer_rate_per_s: float = 40.0
    rescuer_burst: float = 80.0


class ResilienceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The machines geoserve's policy runs around its router (``geoserve.resilience``):
    health with hysteresis fed by each signal round's liveness, outlier ejection fed
    by request results, and spill caps. Absent (the default scenario): the bare router."""

    # One failed scrape marks a replica down: the simulated scrape has no false
    # negatives (a dead replica never answers), so waiting for three only sends
    # requests into a dead region; coming back still takes two good rounds.
    health: HealthPolicy = HealthPolicy(fail_threshold=1, recover_threshold=2)
    # soft failure from the engines' measured step times (needs engine_timings)
    slow: Optional[SlowPolicy] = SlowPolicy()
    ejection: EjectionPolicy = EjectionPolicy()
    spill: Optional[SpillCaps] = SpillCaps()
    retry_budget_share: float = 0.2  # Envoy's retry budget: retries in flight <= 20 % of requests in flight
    retry_min_concurrency: int = 3


class CanarySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new version of the 70B rolled out region by region (``resilience.Rollout``):
    ``replicas[g]`` of each region's 70B replicas are pre-staged on it (draining
    until their region's stage); ``slow_factor`` > 1 makes it a bad build."""

    version: str = "v2"
    replicas: tuple[int, ...] = (4, 2, 2)
    regions: tuple[str, ...] = ("ap-northeast", "eu-west", "us-east")  # switch order: smallest first
    window_s: float = 20.0
    min_requests: int = 50
    max_error_rate: float = 0.01
    max_p99_ttft_ms: float = 1200.0
    slow_factor: float = 1.0


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = "seed-compressed"
    seed: int = 7
    duration_s: float = 240.0
    day_s: float = 240.0
    start_hour_utc: float = 0.0
    signal_interval_ms: float = 100.0
    max_attempts: int = 3
    fleet: FleetSpec = FleetSpec()
    demand: DemandSpec = DemandSpec()
    faults: tuple[Fault, ...] = (Fault(kind="outage", region="ap-northeast", start_s=40.0, end_s=70.0),)
    windows: dict[str, tuple[float, float]] = msgspec.field(default_factory=lambda: {"apac_outage": (40.0, 70.0)})
    resilience: Optional[ResilienceSpec] = None
    # Engines report their measured step time and prefill rate with the load (vLLM's
    # time-per-output-token and prefill histograms): a slowed replica shows in the
    # next signal round instead of only through the queues it builds.
    engine_timings: bool = False
    canary: Optional[CanarySpec] = None
    # per priority class: the output cap of a request degraded to the fallback model
    # (PriorityClass.degrade_max_tokens); absent: degraded requests keep their length
    degrade_max_tokens: dict[str, int] = msgspec.field(default_factory=dict)

    def validate(self) -> "Scenario":
        f = self.fleet
        n = len(f.regions)
        for name, value in (("fleet.rtt_ms", len(f.rtt_ms)), ("fleet.utc_offsets_h", len(f.utc_offsets_h)),
                            ("fleet.replicas", len(f.replicas)), ("fleet.fallback_replicas", len(f.fallback_replicas)),
                            ("demand.shares", len(self.demand.shares))):
            if value != n:
                raise ConfigError(name, f"needs one entry per region ({n}), got {value}")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ConfigError("duration_s", "must be a finite number > 0")
        if self.signal_interval_ms <= 0:
            raise ConfigError("signal_interval_ms", "must be > 0")
        if not 0.0 < self.demand.trough <= 1.0:
            raise ConfigError("demand.trough", "must be in (0, 1]")
        for name, cap in self.degrade_max_tokens.items():
            if name not in self.demand.priorities:
                raise ConfigError(f"degrade_max_tokens.{name}", f"unknown priority class {name!r}")
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ConfigError(f"degrade_max_tokens.{name}", f"must be an integer >= 1, got {cap!r}")
        if self.demand.kind not in ("synthetic", "mooncake", "azure"):
            raise ConfigError("demand.kind", f"must be synthetic, mooncake or azure, got {self.demand.kind!r}")
        for i, fault in enumerate(self.faults):
            if fault.kind not in ("outage", "brownout", "flap", "signal_delay"):
                raise ConfigError(f"faults[{i}].kind", f"unknown fault {fault.kind!r}")
            if fault.region and fault.region not in f.regions:
                raise ConfigError(f"faults[{i}].region", f"unknown region {fault.region!r}")
            if not fault.end_s > fault.start_s:
                raise ConfigError(f"faults[{i}].end_s", "must be after start_s")
        if self.canary is not None:
            if len(self.canary.replicas) != n:
                raise ConfigError("canary.replicas", f"needs one entry per region ({n}), got {len(self.canary.replicas)}")
            for i, region in enumerate(self.canary.regions):
                if region not in f.regions:
                    raise ConfigError(f"canary.regions[{i}]", f"unknown region {region!r}")
        return self


def default_scenario() -> Scenario:
    return Scenario().validate()


def load_scenario(path: str) -> Scenario:
    return load_toml_file(path, Scenario)


def scenario_topology(s: Scenario):
    """The router's topology for a scenario: 70B everywhere, the 8B fallback beside it."""
    from ..config import SEED_MODELS
    from ..types import DEFAULT_PRIORITIES, Deployment, ReplicaSpec, Topology

    f = s.fleet
    deployments = []
    for g, region in enumerate(f.regions):
        for model, count, slots in (("llama-70b", f.replicas[g], f.decode_slots), ("llama-8b", f.fallback_replicas[g], f.fallback_decode_slots)):
            new = min(count, s.canary.replicas[g]) if s.canary is not None and model == "llama-70b" else 0
            for version, ks in (("v1", range(count - new)), (s.canary.version if new else "", range(count - new, count))):
                if len(ks):
                    reps = tuple(ReplicaSpec(id=f"{region}/{model}/{k}", endpoint=f"sim://{region}/{model}/{k}") for k in ks)
                    deployments.append(Deployment(model=model, version=version, region=region, replicas=reps,
                                                  decode_slots=slots, kv_blocks=f.kv_blocks, kv_block_tokens=f.kv_block_tokens))
    priorities = {name: msgspec.structs.replace(c, degrade_max_tokens=s.degrade_max_tokens[name])
                  for name, c in DEFAULT_PRIORITIES.items() if name in s.degrade_max_tokens}
    return Topology(regions=f.regions, rtt_ms=f.rtt_ms, deployments=tuple(deployments), models=dict(SEED_MODELS),
                    aliases={"chat": "llama-70b"}, fallbacks={"llama-70b": "llama-8b"} if any(f.fallback_replicas) else {},
                    priorities=priorities)

