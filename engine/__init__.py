"""Inference engine: weight layouts, Numba kernels, forward pass, sampling, the Engine API, `ternary-run`."""
