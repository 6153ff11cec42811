"""Torch-free trainer: NumPy on CPU, numba.cuda on GPU; export to GGUF."""
