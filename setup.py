"""Declares the Cython kernels; everything else lives in pyproject.toml.

GEOSERVE_DEBUG_BUILD=1 turns bounds and wraparound checks back on (for tests that
hunt memory errors); the default build has them off, as the kernels validate
their inputs at the Python boundary.

The Envoy picker's native transport (``geoserve._core.extproc``) is built where
gRPC C++ is installed (pkg-config ``grpc++``; Debian: ``libgrpc++-dev``), and
skipped elsewhere - the picker then runs on grpc.aio alone. GEOSERVE_NATIVE_PICKER=1
makes it required (CI), =0 skips it.
"""
import os
import shutil
import subprocess

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("GEOSERVE_DEBUG_BUILD") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}
# -ffp-contract=off: no fused multiply-add, so the kernel's float arithmetic is
# bit-for-bit the pure-Python twin's and differential tests can demand equality.
compile_args = ["-O3", "-ffp-contract=off"]

extensions = [
    Extension(
        f"geoserve._core.{name}",
        [f"src/geoserve/_core/{name}.pyx"],
        include_dirs=[numpy.get_include(), "src/geoserve/_core/vendor"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        language=language,
    )
    for name, language in (("decide", "c"), ("hashing", "c"), ("bodyscan", "c"), ("procmsg", "c"), ("pickstream", "c"),
                           ("simcore", "c++"))
]


def grpc_cpp_flags():
    """(cflags, libs) of gRPC C++ from pkg-config, or None where it is missing."""
    if shutil.which("pkg-config") is None:
        return None
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "grpc++"], check=True, capture_output=True, text=True)
        libs = subprocess.run(["pkg-config", "--libs", "grpc++"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError:
        return None
    return cflags.stdout.split(), libs.stdout.split()


native_picker = os.environ.get("GEOSERVE_NATIVE_PICKER", "auto")
flags = grpc_cpp_flags() if native_picker != "0" else None
if flags is None and native_picker == "1":
    raise SystemExit("GEOSERVE_NATIVE_PICKER=1 but gRPC C++ was not found (pkg-config grpc++; "
                     "Debian: apt-get install libgrpc++-dev pkg-config)")
if flags is not None:
    cflags, libs = flags
    extensions.append(Extension(
        "geoserve._core.extproc",
        ["src/geoserve/_core/extproc.pyx"],
        include_dirs=["src/geoserve/_core"],
        depends=["src/geoserve/_core/extproc_pump.h"],
        extra_compile_args=["-O2", "-std=c++17", *cflags],
        extra_link_args=libs,
        language="c++",
    ))

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
