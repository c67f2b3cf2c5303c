"""The compiled kernels load when they should, and agree with the twin on constants."""

import os
import subprocess
import sys

import pytest

import geoserve
from geoserve import _codes, _compat, state


@pytest.mark.skipif(os.environ.get("GEOSERVE_NO_EXTENSIONS", "") not in ("", "0"), reason="twin forced on purpose")
def test_the_compiled_extension_is_in_use():
    # Fails loudly when an install silently fell back to pure Python.
    assert _compat.compiled is not None, "geoserve._core.decide did not import: was the package built?"
    assert geoserve.native is True
    assert _compat.compiled.__file__.endswith((".so", ".pyd"))


def test_kernel_constants_match_the_twin(native_available):
    codes = _compat.compiled.CODES
    for name in ("SERVE", "OVERFLOW", "QUEUE", "DEGRADE", "SHED"):
        assert codes[name] == getattr(_codes, name)
    for name in [n for n in dir(_codes) if n.startswith("R_")]:
        assert codes[name] == getattr(_codes, name), name
    assert codes["PROBE"] == state.PROBE and codes["WAYS"] == state.WAYS


def test_the_environment_variable_forces_the_twin():
    code = "import geoserve; print(geoserve.native)"
    env = {**os.environ, "GEOSERVE_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_router_reports_its_implementation(native_available):
    from builders import topology

    assert geoserve.Router(topology(), implementation="native").native is True
    assert geoserve.Router(topology(), implementation="python").native is False
    with pytest.raises(ValueError):
        geoserve.Router(topology(), implementation="fortran")
