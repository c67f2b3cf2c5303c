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
    assert _compat.compiled_decide is not None, "geoserve._core.decide did not import: was the package built?"
    assert geoserve.native is True
    for module in (_compat.compiled_decide, _compat.compiled_hashing):
        assert module is not None and module.__file__.endswith((".so", ".pyd")), module


def test_kernel_constants_match_the_twin(native_available):
    codes = _compat.compiled_decide.CODES
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


def test_the_compiled_boundary_takes_the_common_case(native_available):
    import numpy as np

    from builders import snapshot, topology

    native = geoserve.Router(topology(), implementation="native")
    twin = geoserve.Router(topology(), implementation="python")
    assert native._boundary is not None and twin._boundary is None
    s_native, s_twin = snapshot(native), snapshot(twin)
    common = [
        geoserve.Request(model="m", origin="eu", prompt_tokens=900),
        geoserve.Request(model="m@v1", origin="ap", session="u-7", exclude=("ap-m-v1-0", "unknown")),
        geoserve.Request(model="m", origin="us", prefix=np.arange(1, 9, dtype=np.uint64), block_tokens=64, waited_ms=120),
    ]
    for request in common:
        fast = native._boundary.fast_decide(request, s_native, native.state)
        assert fast is not None, request
        assert fast == twin.decide(request, s_twin)
        assert native._boundary.fast_route(request, s_native) == twin.route(request, s_twin)
    # anything unusual goes to the Python boundary, which names the field
    assert native._boundary.fast_decide(geoserve.Request(model="m", origin="us", prefix=(1, 2)), s_native, native.state) is None
    assert native._boundary.fast_decide(geoserve.Request(model="nope", origin="us"), s_native, native.state) is None


def test_snapshots_and_states_are_freed_without_the_garbage_collector():
    # A gateway builds a snapshot every few hundred ms: it must not need a GC pass to go.
    import gc
    import weakref

    from builders import snapshot, topology

    for impl in ("python", "native"):
        router = geoserve.Router(topology(), implementation=impl)
        gc.disable()
        try:
            s = snapshot(router)
            router.decide(geoserve.Request(model="m", origin="us"), s)  # builds the kernel's view
            ref = weakref.ref(s)
            del s
            assert ref() is None, impl
            state = geoserve.RouterState.for_fleet(router.fleet)
            router.decide(geoserve.Request(model="m", origin="us"), snapshot(router), state=state)
            ref = weakref.ref(state)
            del state
            assert ref() is None, impl
        finally:
            gc.enable()
