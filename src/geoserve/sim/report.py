"""What a simulation reports, per policy (the definitions of docs/api.md):

* terminal states ``served + overflowed + degraded + shed + lost = requests``;
  ``queued`` counts detours (queue decisions), not an end;
* **SLA attainment** = requests whose TTFT met their cross-region budget (the
  class's, stretched for long prompts: ``max(B, cold prefill + B - 600)``) over all
  requests - shed and lost count as misses; reported overall, for interactive
  traffic, per class, per origin region, per serving region and per window;
  ``local_within_local_budget`` is the share of locally served requests that also
  met the local (routing-target) budget;
* TTFT and completion percentiles over answered requests; **KV hit rate** is
  token-weighted (cached prompt tokens / prompt tokens of answered requests);
* **GPU utilization** per region = the share of replica-time with at least one
  request prefilling or decoding.

Floats are rounded to 6 significant digits and keys sorted, so a seed gives
byte-identical JSON.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Optional

import numpy as np


ANSWERED = ("served", "overflowed", "degraded")
def budgets(req, fleet) -> tuple[float, float]:
    """The request's budgets by the router's own rule (``Fleet.budgets``): its class,
    the requested model's profile, the policy's inference share."""
    model, _ = fleet.resolve_model(req.model)
    return fleet.budgets(model, fleet.priority_index[req.priority], req.prompt_tokens)


def _r(x: Optional[float]):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.6g}")


def figures(reqs: list, fleet) -> dict:
    """The figures for a set of requests (every map of the report holds these)."""
    n = len(reqs)
    counts = {k: 0 for k in ("served", "overflowed", "degraded", "shed", "lost")}
    queued = met = met_i = n_i = local = local_met = cached = prompt = cross = 0
    ttft, done = [], []
    for q in reqs:
        counts[q.outcome] += 1
        queued += q.queued
        interactive = q.priority == "interactive"
        n_i += interactive
        if q.outcome in ANSWERED:
            b_local, b_cross = budgets(q, fleet)
            ok = q.ttft_ms <= b_cross
            met += ok
            met_i += ok and interactive
            ttft.append(q.ttft_ms)
            done.append(q.completion_ms)
            cached += q.cached_tokens
            prompt += q.prompt_tokens
            if q.region != q.origin:
                cross += 1
            elif q.outcome == "served":
                local += 1
                local_met += q.ttft_ms <= b_local
    answered = len(ttft)
    return {
        "requests": n, **counts, "queued": queued,
        "sla_attainment": _r(met / n) if n else None,
        "sla_attainment_interactive": _r(met_i / n_i) if n_i else None,
        "local_within_local_budget": _r(local_met / local) if local else None,
        "ttft_p50_ms": _r(float(np.percentile(ttft, 50))) if ttft else None,
        "ttft_p99_ms": _r(float(np.percentile(ttft, 99))) if ttft else None,
        "completion_p99_ms": _r(float(np.percentile(done, 99))) if done else None,
        "kv_hit_rate": _r(cached / prompt) if prompt else None,
        "cross_region_fraction": _r(cross / answered) if answered else None,
    }


def policy_report(scenario, sim) -> dict:
    reqs = sim.requests
    regions = list(scenario.fleet.regions)
    fleet = sim.fleet
    out = figures(reqs, fleet)
    span = sim.end_ms
    util = {}
    for g, region in enumerate(regions):
        members = [r for r in sim.replicas if r.region == g]
        busy = sum(r.busy_until(span) for r in members)
        util[region] = _r(busy / (len(members) * span)) if members else None
    out["gpu_utilization"] = util
    out["per_class"] = {c: figures([q for q in reqs if q.priority == c], fleet) for c in sorted({q.priority for q in reqs})}
    out["per_origin"] = {g: figures([q for q in reqs if q.origin == g], fleet) for g in regions}
    out["per_serving_region"] = {g: figures([q for q in reqs if q.region == g], fleet) for g in regions}
    windows = {"peak": figures([q for q in reqs if q.peak], fleet)}
    for name, (start, end) in sorted(scenario.windows.items()):
        windows[name] = figures([q for q in reqs if start * 1000.0 <= q.arrival_ms < end * 1000.0], fleet)
        windows[name]["by_origin"] = {g: figures([q for q in reqs if q.origin == g and start * 1000.0 <= q.arrival_ms < end * 1000.0], fleet) for g in regions}
        windows[name]["by_serving_region"] = {g: figures([q for q in reqs if q.region == g and start * 1000.0 <= q.arrival_ms < end * 1000.0], fleet) for g in regions}
    out["windows"] = windows
    out["wall_s"] = _r(getattr(sim, "wall_s", 0.0))
    return out


def report(scenario, sims: dict) -> dict:
    import msgspec

    return {
        "scenario": msgspec.to_builtins(scenario),
        "policies": {name: policy_report(scenario, sim) for name, sim in sims.items()},
        "_sims": sims,  # not serialized: for plots and tests
    }


def to_json(result: dict, *, include_wall: bool = False) -> str:
    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "_sims" and (include_wall or k != "wall_s")}
        return d

    return json.dumps(strip(result), sort_keys=True, indent=1) + "\n"


def print_table(result: dict, out=sys.stdout) -> None:
    policies = result["policies"]
    regions = list(result["scenario"]["fleet"]["regions"])
    head = (f"{'policy':24s} {'SLA':>7s} {'inter.':>7s} {'peak i.':>7s} {'outage':>7s} {'p50':>6s} {'p99 TTFT':>9s} {'KV hit':>7s} "
            f"{'cross':>6s} {'shed':>6s} {'lost':>5s} " + " ".join(f"{'util ' + g[:7]:>12s}" for g in regions))
    print(head, file=out)
    print("-" * len(head), file=out)

    def pct(x):
        return "   -   " if x is None else f"{100 * x:6.2f}%"

    for name, p in policies.items():
        peak = p["windows"]["peak"]["sla_attainment_interactive"]
        outage = next((w["sla_attainment_interactive"] for k, w in p["windows"].items() if "outage" in k), None)
        util = " ".join(f"{pct(p['gpu_utilization'][g]):>12s}" for g in regions)
        p50 = p["ttft_p50_ms"] or 0
        p99 = p["ttft_p99_ms"] or 0
        print(f"{name:24s} {pct(p['sla_attainment'])} {pct(p['sla_attainment_interactive'])} {pct(peak)} {pct(outage)} "
              f"{p50:6.0f} {p99:9.0f} {pct(p['kv_hit_rate'])} {pct(p['cross_region_fraction'])} {p['shed']:6d} {p['lost']:5d} {util}",
              file=out)
    print("SLA: TTFT within the cross-region budget over all requests (shed and lost are misses); "
          "inter.: interactive only; peak i.: interactive at the origin's local peak; outage: interactive in outage windows.", file=out)


def plot(result: dict, directory: str) -> list[str]:
    """PNG charts (needs the [sim] extra): p99 TTFT and slot utilization per region over time."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    sims = result["_sims"]
    regions = list(result["scenario"]["fleet"]["regions"])
    written = []
    bin_ms = 5000.0
    for name, sim in sims.items():
        fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for g, region in enumerate(regions):
            reqs = [q for q in sim.requests if q.region == region and q.ttft_ms == q.ttft_ms]
            if reqs:
                bins = {}
                for q in reqs:
                    bins.setdefault(int(q.arrival_ms // bin_ms), []).append(q.ttft_ms)
                xs = sorted(bins)
                a.plot([x * bin_ms / 1000 for x in xs], [np.percentile(bins[x], 99) for x in xs], label=region)
            slots = sum(r.slots for r in sim.replicas if r.region == g)
            ts = [t / 1000 for t, _ in sim.slot_samples]
            b.plot(ts, [used[g] / slots for _, used in sim.slot_samples], label=region)
        a.axhline(1200, color="grey", linestyle="--", linewidth=0.8)
        a.set_ylabel("p99 TTFT (ms), by serving region")
        a.set_yscale("log")
        b.set_ylabel("decode slots in use (share)")
        b.set_xlabel("simulated time (s)")
        a.legend()
        a.set_title(f"{result['scenario']['name']}: {name}")
        path = os.path.join(directory, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
