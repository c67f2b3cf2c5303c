"""``geoserve plan``: the strategies side by side, the recommendation, and - with
``check`` - the simulator's verdict on it (sampled hours, a compressed day under
each scaler)."""

from __future__ import annotations

import sys
import time
from typing import Optional

from .check import SCALERS, check_hours, run_day
from .placement import STRATEGIES, all_plans, recommend, region_loss, services
from .scenario import PlanScenario

BASELINE = "replicate_everywhere"


def plan_report(ps: PlanScenario, *, check: bool = False, hours=(0, 4, 8, 12, 16, 20), hour_scale: float = 1.0,
                hour_s: float = 300.0, day_scale: float = 0.2, compression: float = 30.0, seed: int = 7,
                log=None) -> dict:
    log = log or (lambda msg: None)
    svc = services(ps)
    plans = all_plans(ps)
    best = recommend(ps, plans)
    base = plans[BASELINE]
    out = {
        "scenario": ps.name,
        "sla_target": ps.sla_target,
        "strategies": {name: p.summary() for name, p in plans.items()},
        "recommended": best,
        "versus_replicate_everywhere": {name: round(p.gpu_hours / base.gpu_hours - 1.0, 4) for name, p in plans.items()},
    }
    if best is None:
        return out
    plan = plans[best]
    log(f"region loss for {best}")
    out["region_loss"] = region_loss(ps, plan, svc=svc)
    if check:
        checks = {}
        for name in (best, BASELINE):
            log(f"sampled hours of {name} in the simulator")
            rows = check_hours(ps, plans[name], hours, scale=hour_scale, duration_s=hour_s, seed=seed)
            checks[name] = [{"hour": c.hour, "analytic": round(float(c.analytic), 5), "simulated": c.simulated,
                             "error_points": round(100 * float(c.error), 2), "requests": c.requests} for c in rows]
        out["sampled_hours"] = checks
        days = {}
        for controller in SCALERS:
            log(f"compressed day: {controller}")
            days[controller] = run_day(ps, plan, controller, scale=day_scale, compression=compression, seed=seed).summary()
        log(f"compressed day: {BASELINE} static")
        days["replicate_everywhere_static"] = run_day(ps, base, "static_peak", scale=day_scale, compression=compression,
                                                      seed=seed).summary()
        ref = days["replicate_everywhere_static"]["gpu_hours"]
        oracle = days["oracle"]["gpu_hours"]
        out["simulated_day"] = {"scale": day_scale, "compression": compression, "runs": days,
                                "plan_vs_replicate_everywhere": round(days["plan"]["gpu_hours"] / ref - 1.0, 4),
                                "autoscaler_vs_oracle": round(days["autoscaler"]["gpu_hours"] / oracle - 1.0, 4)}
    return out


def print_report(out: dict, file=None) -> None:
    w = (file or sys.stdout).write
    w(f"capacity plan for {out['scenario']} (interactive SLA target {out['sla_target']:.1%})\n\n")
    w(f"{'strategy':<22}{'GPU-h/day':>11}{'cost/day':>11}{'vs repl.':>9}{'pred. SLA':>10}{'worst h':>9}{'cross':>7}  peak GPUs\n")
    for name, s in out["strategies"].items():
        peaks = " ".join(f"{r.split('-')[0]}:{v}" for r, v in s["peak_gpus"].items())
        w(f"{name:<22}{s['gpu_hours']:>11,.0f}{s['cost']:>11,.0f}{out['versus_replicate_everywhere'][name]:>+9.1%}"
          f"{s['predicted_attainment']:>10.2%}{s['worst_hour_attainment']:>9.2%}{s['cross_region_share']:>7.1%}  {peaks}\n")
        for note in s["notes"]:
            w(f"{'':<22}note: {note}\n")
    w(f"\nrecommended: {out['recommended'] or 'none keeps the target within the inventory'}\n")
    loss = out.get("region_loss")
    if loss:
        w(f"N+1 regional headroom: +{loss['headroom_extra_cost']:,.0f}/day ({loss['headroom_extra_share']:+.0%})"
          f"{' - more GPUs than the inventory has' if loss['headroom_over_inventory'] else ''}; without it:\n")
        for region, c in loss["without_headroom"].items():
            w(f"  {region} lost: worst hour {c['worst_hour_utc']:02d}:00 UTC at {c['worst_hour_attainment']:.1%} interactive; "
              f"{c['peak_unserved_rps']:.0f} req/s unserved -> {c['fallback_gpus_needed']} GPUs of the fallback model degrade instead\n")
    for name, rows in out.get("sampled_hours", {}).items():
        worst = max(r["error_points"] for r in rows)
        w(f"\nsimulated hours of {name} (analytic vs simulator, worst {worst:.2f} points):\n")
        for r in rows:
            w(f"  {r['hour']:02d}:00  {r['analytic']:.2%}  {r['simulated']:.2%}  ({r['requests']:,} requests)\n")
    day = out.get("simulated_day")
    if day:
        w(f"\ncompressed day in the simulator (fleet x{day['scale']}, {day['compression']:.0f}x faster; GPU-hours at full scale):\n")
        for name, r in day["runs"].items():
            w(f"  {name:<28}{r['sla_attainment_interactive']:>8.2%}{r['gpu_hours']:>10,.0f} GPU-h  {r['replica_starts']:>4} starts\n")
        w(f"  plan vs replicate everywhere: {day['plan_vs_replicate_everywhere']:+.1%} GPU-hours; "
          f"autoscaler vs oracle: {day['autoscaler_vs_oracle']:+.1%}\n")
