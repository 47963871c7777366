"""Triton kernels and their launchers, one op per file (imported lazily: triton is optional)."""
