import os

import pytest
from hypothesis import HealthCheck, settings

import geoserve
from geoserve import _compat

# Profiles: "dev" for quick local runs, "ci" (set by .ci/run) for >= 1,000 examples.
settings.register_profile("dev", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=1000, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

IMPLEMENTATIONS = ["python"] + (["native"] if _compat.compiled_decide is not None else [])


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """Every decision test runs against the compiled kernel and its pure-Python twin."""
    return request.param


@pytest.fixture(scope="session")
def native_available():
    if _compat.compiled_decide is None:
        pytest.fail("the compiled kernels did not import (pip install . builds them)")
    return True


def pytest_report_header(config):
    return f"geoserve.native={geoserve.native} (GEOSERVE_NO_EXTENSIONS={os.environ.get('GEOSERVE_NO_EXTENSIONS', '')!r})"
