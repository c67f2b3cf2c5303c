"""TOML / JSON / YAML -> a validated :class:`Topology`, with errors that name the field.

Decoding is msgspec's (strict: wrong types and unknown fields are errors); its
messages carry a JSON path, which becomes the :class:`ConfigError` field. The
checks that a schema cannot express (a square RTT matrix, known regions, unique
replica ids, aliases that resolve) follow in :func:`validate_topology`, which the
router runs on every topology, including ones built in code.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Union

import msgspec

from .errors import ConfigError
from .types import Deployment, ModelProfile, ReplicaSpec, Topology

__all__ = ["load_topology", "topology_from_dict", "validate_topology", "seed_topology", "split_model_ref"]

_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_RE = re.compile(r"unknown field `(?P<name>[^`]+)`")


def _field_of(err: msgspec.ValidationError) -> str:
    text = str(err)
    m = _PATH_RE.search(text)
    path = m.group("path").lstrip(".") if m else ""
    u = _UNKNOWN_RE.search(text)
    if u:
        path = f"{path}.{u.group('name')}" if path else u.group("name")
    m_req = re.search(r"missing required field `(?P<name>[^`]+)`", text)
    if m_req:
        path = f"{path}.{m_req.group('name')}" if path else m_req.group("name")
    return path or "<root>"


def _message_of(err: msgspec.ValidationError) -> str:
    return _PATH_RE.sub("", str(err))


def topology_from_dict(data: Any) -> Topology:
    """Build and validate a topology from plain data (as parsed from any format)."""
    try:
        topology = msgspec.convert(data, type=Topology)
    except msgspec.ValidationError as err:
        raise ConfigError(_field_of(err), _message_of(err)) from None
    validate_topology(topology)
    return topology


def load_topology(path: Union[str, "os.PathLike[str]"]) -> Topology:
    """Read a topology file; the format follows the suffix (.toml, .json, .yaml/.yml)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError("path", f"cannot read {p}: {err.strerror}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            topology = msgspec.toml.decode(raw, type=Topology)
        elif suffix == ".json":
            topology = msgspec.json.decode(raw, type=Topology)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml  # noqa: F401  (msgspec.yaml needs PyYAML)
            except ImportError:
                raise ConfigError("path", "YAML topologies need the [yaml] extra (pip install 'geoserve[yaml]')") from None
            topology = msgspec.yaml.decode(raw, type=Topology)
        else:
            raise ConfigError("path", f"unknown topology format {suffix!r} (use .toml, .json, .yaml)")
    except msgspec.ValidationError as err:
        raise ConfigError(_field_of(err), _message_of(err)) from None
    except msgspec.DecodeError as err:
        raise ConfigError("<file>", f"malformed {suffix[1:]} in {p.name}: {err}") from None
    validate_topology(topology)
    return topology


def split_model_ref(ref: str) -> tuple[str, Union[str, None]]:
    """``"llama-70b@v7"`` -> ``("llama-70b", "v7")``; ``"llama-70b"`` -> ``("llama-70b", None)``."""
    model, sep, version = ref.partition("@")
    return model, (version if sep else None)


def _finite_nonneg(value: float, field: str, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigError(field, f"must be {need}, got {value!r}")


def _unique_names(names: tuple[str, ...], field: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise ConfigError(f"{field}[{i}]", "must be a non-empty name")
        if name in seen:
            raise ConfigError(f"{field}[{i}]", f"duplicate name {name!r}")
        seen.add(name)


def validate_topology(t: Topology) -> None:
    """Raise :class:`ConfigError` naming the first field that makes ``t`` unusable."""
    if not t.regions:
        raise ConfigError("regions", "at least one region is required")
    _unique_names(t.regions, "regions")
    _unique_names(t.edges, "edges")
    for i, edge in enumerate(t.edges):
        if edge in t.regions:
            raise ConfigError(f"edges[{i}]", f"{edge!r} is already a region")

    n = len(t.regions) + len(t.edges)
    if len(t.rtt_ms) != n:
        raise ConfigError("rtt_ms", f"must have {n} rows (regions + edges), got {len(t.rtt_ms)}")
    for i, row in enumerate(t.rtt_ms):
        if len(row) != n:
            raise ConfigError(f"rtt_ms[{i}]", f"must have {n} columns (regions + edges), got {len(row)}")
        for j, v in enumerate(row):
            _finite_nonneg(v, f"rtt_ms[{i}][{j}]")

    for name, prof in t.models.items():
        if "@" in name:
            raise ConfigError(f"models.{name}", "a model name cannot contain '@'")
        for fld in ("prefill_base_ms", "prefill_ms_per_token", "tpot_base_ms", "tpot_ms_per_batch"):
            _finite_nonneg(getattr(prof, fld), f"models.{name}.{fld}")
        if prof.mean_service_ms is not None:
            _finite_nonneg(prof.mean_service_ms, f"models.{name}.mean_service_ms", positive=True)

    if not t.deployments:
        raise ConfigError("deployments", "at least one deployment is required")
    regions = set(t.regions)
    replica_ids: set[str] = set()
    versions: dict[str, set[str]] = {}
    for i, d in enumerate(t.deployments):
        where = f"deployments[{i}]"
        if not d.model or "@" in d.model:
            raise ConfigError(f"{where}.model", f"must be a model name without '@', got {d.model!r}")
        if not d.version or "@" in d.version:
            raise ConfigError(f"{where}.version", f"must be a non-empty version without '@', got {d.version!r}")
        if d.region not in regions:
            raise ConfigError(f"{where}.region", f"unknown region {d.region!r} (regions: {', '.join(t.regions)})")
        if not d.replicas:
            raise ConfigError(f"{where}.replicas", "a deployment needs at least one replica")
        if d.decode_slots < 1:
            raise ConfigError(f"{where}.decode_slots", f"must be >= 1, got {d.decode_slots}")
        if d.kv_blocks < 0:
            raise ConfigError(f"{where}.kv_blocks", f"must be >= 0, got {d.kv_blocks}")
        if d.kv_block_tokens < 1:
            raise ConfigError(f"{where}.kv_block_tokens", f"must be >= 1, got {d.kv_block_tokens}")
        for j, r in enumerate(d.replicas):
            rwhere = f"{where}.replicas[{j}]"
            if not r.id:
                raise ConfigError(f"{rwhere}.id", "must be a non-empty id")
            if r.id in replica_ids:
                raise ConfigError(f"{rwhere}.id", f"duplicate replica id {r.id!r}")
            replica_ids.add(r.id)
            if r.decode_slots is not None and r.decode_slots < 1:
                raise ConfigError(f"{rwhere}.decode_slots", f"must be >= 1, got {r.decode_slots}")
            if r.kv_blocks is not None and r.kv_blocks < 0:
                raise ConfigError(f"{rwhere}.kv_blocks", f"must be >= 0, got {r.kv_blocks}")
        versions.setdefault(d.model, set()).add(d.version)

    for alias, target in t.aliases.items():
        if alias in versions:
            raise ConfigError(f"aliases.{alias}", f"alias {alias!r} shadows a deployed model")
        model, version = split_model_ref(target)
        if model not in versions:
            raise ConfigError(f"aliases.{alias}", f"target model {model!r} is not deployed")
        if version is not None and version not in versions[model]:
            raise ConfigError(f"aliases.{alias}", f"version {version!r} of {model!r} is not deployed")

    for model, fallback in t.fallbacks.items():
        if model not in versions:
            raise ConfigError(f"fallbacks.{model}", f"model {model!r} is not deployed")
        if fallback not in versions:
            raise ConfigError(f"fallbacks.{model}", f"fallback model {fallback!r} is not deployed")
        if fallback == model:
            raise ConfigError(f"fallbacks.{model}", "a model cannot fall back to itself")

    for name, pc in t.priorities.items():
        where = f"priorities.{name}"
        _finite_nonneg(pc.local_budget_ms, f"{where}.local_budget_ms", positive=True)
        _finite_nonneg(pc.cross_budget_ms, f"{where}.cross_budget_ms", positive=True)
        if pc.cross_budget_ms < pc.local_budget_ms:
            raise ConfigError(f"{where}.cross_budget_ms", "must be >= local_budget_ms")
        if not (0.0 < pc.slot_ceiling <= 1.0):
            raise ConfigError(f"{where}.slot_ceiling", f"must be in (0, 1], got {pc.slot_ceiling!r}")
        _finite_nonneg(pc.spill_reserve, f"{where}.spill_reserve")
        cap = pc.degrade_max_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"{where}.degrade_max_tokens", f"must be an integer >= 1 or absent, got {cap!r}")


# The seed's fleet (docs/api.md, "Defaults"): 600 / 300 / 150 H100s in the US, EU and
# APAC running Llama-2-70B at tensor parallel 4, plus a small Llama-3-8B fallback on
# one GPU per replica. The 8B profile has no measured data here: it is the 70B fit
# scaled by parameters per GPU (8B/1 GPU vs 70B/4 GPUs = 0.457).
SEED_REGIONS = ("us-east", "eu-west", "ap-northeast")
SEED_RTT_MS = ((2.0, 80.0, 150.0), (80.0, 2.0, 220.0), (150.0, 220.0, 2.0))
SEED_REPLICAS_70B = (150, 75, 37)
SEED_REPLICAS_8B = (16, 8, 4)
_SCALE_8B = (8 / 1) / (70 / 4)
SEED_MODELS = {
    "llama-70b": ModelProfile(),
    "llama-8b": ModelProfile(
        prefill_base_ms=round(7.7 * _SCALE_8B, 3),
        prefill_ms_per_token=round(0.107 * _SCALE_8B, 4),
        tpot_base_ms=round(28.4 * _SCALE_8B, 3),
        tpot_ms_per_batch=round(0.35 * _SCALE_8B, 4),
    ),
}


def seed_topology(scale: float = 1.0, *, endpoint_base: str = "127.0.0.1") -> Topology:
    """The seed's three-region fleet; ``scale`` shrinks replica counts (at least 1 each)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError("scale", f"must be a finite number > 0, got {scale!r}")
    deployments = []
    port = 10000
    for model, version, counts in (("llama-70b", "v7", SEED_REPLICAS_70B), ("llama-8b", "v1", SEED_REPLICAS_8B)):
        for region, count in zip(SEED_REGIONS, counts):
            n = max(1, round(count * scale))
            replicas = []
            for k in range(n):
                replicas.append(ReplicaSpec(id=f"{region}/{model}/{k}", endpoint=f"{endpoint_base}:{port}"))
                port += 1
            deployments.append(Deployment(model=model, version=version, region=region, replicas=tuple(replicas)))
    return Topology(
        regions=SEED_REGIONS,
        rtt_ms=SEED_RTT_MS,
        deployments=tuple(deployments),
        models=dict(SEED_MODELS),
        aliases={"chat": "llama-70b"},
        fallbacks={"llama-70b": "llama-8b"},
    )


def load_toml_file(path: str, kind: type):
    """A TOML file decoded into ``kind`` (a msgspec Struct with ``validate()``),
    every failure a ConfigError that names the field (or ``path`` / ``<file>``)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError("path", f"cannot read {p}: {err.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=kind).validate()
    except msgspec.ValidationError as err:
        raise ConfigError(_field_of(err), _message_of(err)) from None
    except msgspec.DecodeError as err:
        raise ConfigError("<file>", f"malformed TOML in {p.name}: {err}") from None
