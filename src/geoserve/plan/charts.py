"""Charts of a plan report (the [sim] extra: matplotlib): replicas per region over
the day for each strategy; SLA against GPU-hours for the scalers of the simulated day."""

from __future__ import annotations

from pathlib import Path

from .placement import all_plans
from .scenario import PlanScenario


def charts(ps: PlanScenario, out: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder_p = Path(folder)
    folder_p.mkdir(parents=True, exist_ok=True)
    written = []
    plans = all_plans(ps)
    fig, axes = plt.subplots(1, len(plans), figsize=(4 * len(plans), 3.2), sharey=True)
    for ax, (name, plan) in zip(axes, plans.items()):
        gpus = plan.gpus
        for g, region in enumerate(plan.regions):
            ax.step(range(24), gpus[:, g], where="post", label=region)
        ax.set_title(f"{name}\n{plan.gpu_hours:,.0f} GPU-h/day", fontsize=9)
        ax.set_xlabel("hour (UTC)")
    axes[0].set_ylabel("GPUs")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = folder_p / "capacity_strategies.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    day = out.get("simulated_day")
    if day:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, r in day["runs"].items():
            ax.scatter(r["gpu_hours"], 100 * r["sla_attainment_interactive"])
            ax.annotate(name, (r["gpu_hours"], 100 * r["sla_attainment_interactive"]), fontsize=7)
        ax.axhline(100 * ps.sla_target, ls="--", lw=0.8, color="grey")
        ax.set_xlabel("GPU-hours per day (full scale)")
        ax.set_ylabel("interactive within SLA (%)")
        fig.tight_layout()
        path = folder_p / "capacity_scalers.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written
