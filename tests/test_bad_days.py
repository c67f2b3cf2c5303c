"""The resilience scenarios (geoserve.sim.bad_days): what docs/resilience.md reports,
held as properties so a regression shows up here (the whole run takes seconds)."""

import pytest

from geoserve.sim.bad_days import bad_day_scenarios, run_bad_days


@pytest.fixture(scope="module")
def report():
    return run_bad_days()


def test_outage_every_apac_interactive_request_is_answered_within_spill_caps(report):
    g = report["outage"]["geoserve"]
    assert g["apac_interactive"] > 300
    assert g["apac_interactive_answered"] == g["apac_interactive"]  # none shed, none lost
    assert g["rescued_within_own_cross_budget"] >= 0.99
    for rescuer in ("us-east", "eu-west"):  # the rescuers' p99 within the SLA (each request's own budget)
        assert g["rescuer_p99_over_own_budget_ms"][rescuer] <= 0.0
    caps = g["spill"]["caps"]
    for pair, sent in g["spill"].items():
        if pair != "caps":
            assert sent["max_per_second"] <= caps["pair_per_second_max"], pair
    by_class = g["all_traffic_by_class"]
    assert by_class["interactive"]["shed"] <= by_class["batch"]["shed"] + by_class["best_effort"]["shed"]


def test_when_the_caps_bind_spill_stays_within_them_and_lower_classes_are_shed_first(report):
    g = report["outage-tight-caps"]["geoserve"]
    caps = g["spill"]["caps"]
    for pair, sent in g["spill"].items():
        if pair != "caps":
            assert sent["max_per_second"] <= caps["pair_per_second_max"], pair
    shed = {cls: v["shed"] / v["requests"] for cls, v in g["all_traffic_by_class"].items()}
    assert shed["batch"] > 2 * shed["interactive"] and shed["best_effort"] > 2 * shed["interactive"]


def test_losing_the_biggest_region_does_not_cascade_onto_the_rescuers_users(report):
    g, e = report["us-outage"]["geoserve"], report["us-outage"]["envoy_priority"]
    assert g["eu-west/interactive"]["within_budget"] >= 0.99  # the rescuer's own users
    assert e["eu-west/interactive"]["within_budget"] < 0.5  # priority failover: the cascade
    assert g["us-east/interactive"]["within_budget"] >= 0.95
    assert g["us-east/interactive"]["degraded"] + g["us-east/batch"]["degraded"] > 0  # on purpose, reported


def test_brownout_halves_the_slowed_regions_share_within_10s_and_keeps_its_users_in_sla(report):
    g, e = report["brownout"]["geoserve"], report["brownout"]["envoy_priority"]
    for window in ("0-10s", "10-20s", "20-60s"):
        assert g[window]["eu_share_of_new_traffic"] <= 0.5 * g["before"]["eu_share_of_new_traffic"]
        assert g[window]["eu_origin_interactive_p99_over_own_budget_ms"] <= 0.0  # p99 within the SLA
        assert g[window]["eu_origin_interactive_sla"] > e[window]["eu_origin_interactive_sla"]


def test_a_flapping_replica_gets_under_five_percent_of_its_steady_traffic(report):
    g, e = report["flapping"]["geoserve"], report["flapping"]["envoy_priority"]
    assert g["steady_run_requests"] > 50
    assert g["share_of_steady"] < 0.05
    assert g["lost"] < e["lost"]


def test_a_bad_canary_is_rolled_back_contained_and_no_session_sees_two_versions(report):
    g, e = report["canary"]["geoserve"], report["canary"]["envoy_priority"]
    assert any("rolled back" in event for event in g["rollout"])
    assert set(g["new_version_served_by_region"]) == {"ap-northeast"}
    assert g["sessions_switched_version_silently"] == 0
    assert e["sessions_switched_version_silently"] > 0 and len(e["new_version_served_by_region"]) == 3


def test_the_scenarios_switch_the_machines_on_and_the_default_does_not():
    from geoserve.sim import default_scenario

    assert default_scenario().resilience is None
    assert default_scenario().canary is None
    assert all(s.resilience is not None for s in bad_day_scenarios().values())


def test_retries_obey_the_retry_budget_and_give_their_slots_back():
    import msgspec

    from geoserve.resilience import HealthPolicy
    from geoserve.sim import Simulation
    from geoserve.sim.scenario import ResilienceSpec

    # a slow health machine (5 failed probes to go down) sends many requests into the
    # dead region: their retries are held to 1 % of requests in flight (at least 1)
    scenario = msgspec.structs.replace(
        bad_day_scenarios()["outage"], duration_s=60.0,
        resilience=ResilienceSpec(health=HealthPolicy(fail_threshold=5, recover_threshold=2),
                                  retry_budget_share=0.01, retry_min_concurrency=1))
    sim = Simulation(scenario, "geoserve")
    sim.run()
    budget = sim.policy.guard.retries
    assert budget.allowed > 0 and budget.refused > 0
    assert budget.active_retries == 0 and budget.active_requests == 0  # every slot given back
    assert not sim.policy.guard.retrying
