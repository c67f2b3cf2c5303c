"""geoserve.plan: where each model lives, how many replicas per region per hour,
what that costs and whether it keeps the SLA (docs/capacity.md).

* :mod:`.scenario` - the question (regions, inventory, prices, models, demand, SLA);
* :mod:`.analytic` - the fast queueing model a whole day goes through;
* :mod:`.placement` - the four strategies as one sizing mechanism, the
  recommendation, N+1 headroom versus degradation;
* :mod:`.pool`, :mod:`.autoscale` - replicas that come and go, and the scalers that
  move them;
* :mod:`.check` - the simulator's verdict on sampled hours and compressed days;
* :mod:`.sweep` - grids of simulations on local processes or a Ray cluster.
"""

from .analytic import ServiceModel, evaluate_hour, replicas_needed
from .autoscale import AutoscalePolicy, Autoscaler, UtilizationScaler
from .placement import STRATEGIES, Plan, all_plans, hourly_demand, make_plan, recommend, region_loss
from .report import plan_report
from .scenario import PlanScenario, default_plan_scenario, load_plan_scenario

__all__ = ["ServiceModel", "evaluate_hour", "replicas_needed", "AutoscalePolicy", "Autoscaler", "UtilizationScaler",
           "STRATEGIES", "Plan", "all_plans", "hourly_demand", "make_plan", "recommend", "region_loss", "plan_report",
           "PlanScenario", "default_plan_scenario", "load_plan_scenario"]
