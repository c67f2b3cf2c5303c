"""Sweeps: a grid of scenarios x policies x seeds through the simulator, in parallel.

Each cell is one :class:`geoserve.sim.Simulation` (a scenario with its seed
replaced, one routing policy) and comes back as one row of headline figures. Cells
run on local processes (``concurrent.futures``, the default) or, given an address,
as tasks on an existing Ray cluster (``ray.init(address=...)``; ``"local"`` starts
one in-process). Nothing is distributed by hand: the executor does it, rows come
back in grid order whatever finishes first, and a failing cell fails the sweep
with its coordinates.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import msgspec

from ..sim.engine import Simulation
from ..sim.policies import POLICIES
from ..sim.report import report
from ..sim.scenario import Scenario, default_scenario, load_scenario

__all__ = ["Cell", "grid", "run_cell", "sweep"]

FIGURES = ("sla_attainment", "sla_attainment_interactive", "ttft_p50_ms", "ttft_p99_ms", "kv_hit_rate",
           "cross_region_fraction", "shed", "lost", "requests")


@dataclass(frozen=True)
class Cell:
    scenario: str  # a TOML path, or "default"
    policy: str
    seed: int
    duration_s: Optional[float] = None  # override (a shorter run)


def grid(scenarios: Sequence[str], policies: Sequence[str], seeds: Sequence[int], duration_s: Optional[float] = None) -> list[Cell]:
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    for s in scenarios:  # fail before anything runs
        _scenario(Cell(s, policies[0] if policies else "geoserve", 0))
    return [Cell(s, p, int(seed), duration_s) for s, p, seed in itertools.product(scenarios, policies, seeds)]


def _scenario(cell: Cell) -> Scenario:
    base = default_scenario() if cell.scenario == "default" else load_scenario(cell.scenario)
    changes = {"seed": cell.seed}
    if cell.duration_s is not None:
        changes["duration_s"] = float(cell.duration_s)
        changes["faults"] = tuple(f for f in base.faults if f.start_s < cell.duration_s)
        changes["windows"] = {k: w for k, w in base.windows.items() if w[0] < cell.duration_s}
    return msgspec.structs.replace(base, **changes).validate()


def run_cell(cell: Cell) -> dict:
    """One simulation; a row of the sweep (picklable in and out)."""
    scenario = _scenario(cell)
    sim = Simulation(scenario, cell.policy)
    sim.run()
    figures = report(scenario, {cell.policy: sim})["policies"][cell.policy]
    row = {"scenario": cell.scenario, "policy": cell.policy, "seed": cell.seed}
    row.update({k: figures[k] for k in FIGURES})
    return row


def sweep(cells: Sequence[Cell], *, workers: Optional[int] = None, ray_address: Optional[str] = None) -> list[dict]:
    """Rows in the order of ``cells``."""
    if ray_address is not None:
        return _on_ray(cells, ray_address)
    workers = workers or max(1, min(len(cells), os.cpu_count() or 1))
    if workers == 1:
        return [run_cell(c) for c in cells]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_cell, cells))


def _on_ray(cells: Sequence[Cell], address: str) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise RuntimeError("a Ray sweep needs Ray (pip install 'geoserve[ray]')") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_cell)
        return ray.get([remote.remote(c) for c in cells])
    finally:
        if started_here:
            ray.shutdown()
