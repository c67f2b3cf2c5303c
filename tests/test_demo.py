"""`geoserve demo`, short: it runs, loses APAC half-way, prints its summary, and
leaves nothing running."""

import threading

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from geoserve.demo import REGIONS, print_summary, run_demo  # noqa: E402


def test_a_short_demo_runs_and_stops_everything(capsys):
    threads_before = threading.active_count()
    result = run_demo(duration_s=8.0, rate=15.0, live=False)
    rows = {(r["origin"], r["window"]): r for r in result.table()}
    for origin in REGIONS:
        assert rows[(origin, "whole run")]["requests"] > 5
    for origin in ("us-east", "eu-west"):
        assert rows[(origin, "whole run")]["answered"] == 1.0
    assert rows[("ap-northeast", "whole run")]["answered"] >= 0.8
    down = rows[("ap-northeast", "APAC down")]
    assert down["requests"] > 0 and down["answered"] > 0
    assert down["served_at_home"] < 1.0  # rescued elsewhere while its replica failed
    print_summary(result)
    out = capsys.readouterr().out
    assert "APAC down" in out and "ap-northeast" in out
    assert threading.active_count() <= threads_before + 1  # the poller's threads are gone
