"""Cython kernels (compiled by ``pip install .``); their twins live in ``geoserve._twin``."""
