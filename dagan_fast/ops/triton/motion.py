"""Triton kernels for motion (in progress)."""
