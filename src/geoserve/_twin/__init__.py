"""Pure-Python twins of the Cython kernels: the readable reference and the test oracle."""
