"""``geoserve sweep`` on Ray: the same grid as on local processes, run as Ray tasks
on a local ``ray.init`` (a cluster address goes the same way). Needs the Ray venv
and a loopback-only namespace, like tests/test_ray_serve.py (.ci/run runs both)."""

import os
import warnings

import pytest

if os.environ.get("GEOSERVE_RAY") != "1":
    pytest.importorskip("ray")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import ray

from geoserve.plan.sweep import grid, run_cell, sweep

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_a_sweep_on_ray_gives_the_local_rows_in_grid_order(cluster):
    cells = grid(["default"], ["geoserve", "nearest_region_only"], [3, 4], duration_s=12.0)
    rows = sweep(cells, ray_address=cluster)
    assert [(r["policy"], r["seed"]) for r in rows] == [(c.policy, c.seed) for c in cells]
    assert rows == [run_cell(c) for c in cells]  # deterministic: Ray changes where, not what
    assert ray.is_initialized()  # a cluster it did not start is left running
