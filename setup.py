"""Declares the Cython kernels; everything else lives in pyproject.toml.

GEOSERVE_DEBUG_BUILD=1 turns bounds and wraparound checks back on (for tests that
hunt memory errors); the default build has them off, as the kernels validate
their inputs at the Python boundary.
"""
import os

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
    for name, language in (("decide", "c"), ("hashing", "c"), ("simcore", "c++"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
