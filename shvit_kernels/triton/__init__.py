"""Triton kernels, one file per op (imported lazily by the ops layer: triton is optional)."""
