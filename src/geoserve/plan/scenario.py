"""What a capacity plan is asked: regions, inventory, prices, models, demand, SLA.

The built-in :func:`default_plan_scenario` is the seed's fleet over one day (the
design guide's capacity defaults): US 600 / EU 300 / APAC 150 GPUs at 3.00 / 3.30
/ 3.60 per GPU-hour, demand shares 45 / 30 / 25 % each peaking at 14:00 local
(UTC-5 / +1 / +9) with a trough of 0.3 of the peak, and the 70B tier of the service
at 700 requests/s on average - the rate at which APAC's own peak needs more GPUs
than APAC has, on purpose. A model's cold start is its weights pulled at
``pull_gb_per_s`` plus ``warmup_s`` (140 GB / 2.5 GB/s + 60 s = 116 s for the 70B).

An empty TOML file is this scenario; every field names itself in errors.
"""

from __future__ import annotations

import math

import msgspec

from ..config import load_toml_file
from ..errors import ConfigError

__all__ = ["RegionSpec", "ModelSpec", "DayDemand", "PlanScenario", "default_plan_scenario", "load_plan_scenario",
           "SMALL_MODEL_SPEED"]

SMALL_MODEL_SPEED = (8 / 1) / (70 / 4)  # 8B on one GPU vs 70B on four, by parameters per GPU (no measured profile)


class RegionSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    gpus: int
    price_per_gpu_hour: float
    utc_offset_h: float


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``speed``: time per token relative to the 70B on four H100s (the measured
    profile); 0.457 for an 8B on one GPU, scaled by parameters per GPU."""

    name: str
    weights_gb: float
    gpus: int
    decode_slots: int = 64
    speed: float = 1.0


class DayDemand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Requests/s per region over a day: a diurnal curve, or ``hourly`` given outright
    (24 rows of one rate per region, UTC hours)."""

    mean_rate: float = 500.0
    shares: tuple[float, ...] = (0.45, 0.30, 0.25)
    peak_hour_local: float = 14.0
    trough: float = 0.3
    hourly: tuple[tuple[float, ...], ...] = ()
    prompt_mean: float = 1155.0
    output_mean: float = 211.0
    priorities: dict[str, float] = msgspec.field(default_factory=lambda: {"interactive": 0.8, "batch": 0.15, "best_effort": 0.05})


class PlanScenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = "seed-day"
    regions: tuple[RegionSpec, ...] = (
        RegionSpec("us-east", 600, 3.00, -5.0),
        RegionSpec("eu-west", 300, 3.30, 1.0),
        RegionSpec("ap-northeast", 150, 3.60, 9.0),
    )
    rtt_ms: tuple[tuple[float, ...], ...] = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))
    models: tuple[ModelSpec, ...] = (
        ModelSpec("llama-70b", 140.0, 4, 64, 1.0),
        ModelSpec("llama-8b", 16.0, 1, 128, SMALL_MODEL_SPEED),
    )
    large: str = "llama-70b"  # the model the demand asks for
    small: str = "llama-8b"  # the tiered strategy's local model
    tiered_share: float = 0.5  # share of requests a small model may answer (tiered strategy only; an assumption)
    recommend_tiered: bool = False  # may the recommendation answer that share with the small model?
    hubs: tuple[str, ...] = ("us-east", "eu-west")
    demand: DayDemand = DayDemand()
    sla_target: float = 0.99  # interactive requests within their TTFT budget
    planning_margin: float = 0.002  # the plan aims this far above the target (the model's own error)
    kv_hit_rate: float = 0.4  # token-weighted prefix-cache hits (the simulator measures 0.38-0.49 on its demand)
    pull_gb_per_s: float = 2.5
    warmup_s: float = 60.0
    step_h: float = 1.0  # the plan's time step

    def validate(self) -> "PlanScenario":
        n = len(self.regions)
        if n == 0:
            raise ConfigError("regions", "needs at least one region")
        names = [r.name for r in self.regions]
        if len(set(names)) != n:
            raise ConfigError("regions", "region names must be unique")
        for i, r in enumerate(self.regions):
            if r.gpus < 0:
                raise ConfigError(f"regions[{i}].gpus", "must be >= 0")
            if not (r.price_per_gpu_hour >= 0 and math.isfinite(r.price_per_gpu_hour)):
                raise ConfigError(f"regions[{i}].price_per_gpu_hour", "must be a finite number >= 0")
        if len(self.rtt_ms) != n or any(len(row) != n for row in self.rtt_ms):
            raise ConfigError("rtt_ms", f"must be {n} x {n}")
        if any(not (v >= 0 and math.isfinite(v)) for row in self.rtt_ms for v in row):
            raise ConfigError("rtt_ms", "entries must be finite and >= 0")
        models = [m.name for m in self.models]
        for field, name in (("large", self.large), ("small", self.small)):
            if name not in models:
                raise ConfigError(field, f"unknown model {name!r} (catalog: {', '.join(models)})")
        for i, m in enumerate(self.models):
            if m.gpus <= 0 or m.decode_slots <= 0 or not m.speed > 0 or not m.weights_gb > 0:
                raise ConfigError(f"models[{i}]", "gpus, decode_slots, speed and weights_gb must be > 0")
        for i, hub in enumerate(self.hubs):
            if hub not in names:
                raise ConfigError(f"hubs[{i}]", f"unknown region {hub!r}")
        d = self.demand
        if len(d.shares) != n:
            raise ConfigError("demand.shares", f"needs one entry per region ({n}), got {len(d.shares)}")
        if d.hourly:
            if len(d.hourly) != 24 or any(len(row) != n for row in d.hourly):
                raise ConfigError("demand.hourly", f"must be 24 rows of {n} rates")
            if any(not (v >= 0 and math.isfinite(v)) for row in d.hourly for v in row):
                raise ConfigError("demand.hourly", "rates must be finite and >= 0")
        elif not (d.mean_rate >= 0 and math.isfinite(d.mean_rate)):
            raise ConfigError("demand.mean_rate", "must be a finite number >= 0")
        if not 0 < d.trough <= 1:
            raise ConfigError("demand.trough", "must be in (0, 1]")
        if not 0 < self.sla_target < 1:
            raise ConfigError("sla_target", "must be in (0, 1)")
        if not 0 <= self.tiered_share < 1:
            raise ConfigError("tiered_share", "must be in [0, 1)")
        if not 0 <= self.kv_hit_rate < 1:
            raise ConfigError("kv_hit_rate", "must be in [0, 1)")
        if not (self.step_h > 0 and (24 / self.step_h).is_integer()):
            raise ConfigError("step_h", "must divide 24 hours")
        return self

    # ------------------------------------------------------------ lookups
    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def cold_start_s(self, model: str) -> float:
        m = self.model(model)
        return m.weights_gb / self.pull_gb_per_s + self.warmup_s


def default_plan_scenario() -> PlanScenario:
    return PlanScenario().validate()


def load_plan_scenario(path: str) -> PlanScenario:
    return load_toml_file(path, PlanScenario)
