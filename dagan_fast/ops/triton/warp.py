"""Triton kernels for warp (in progress)."""
