"""Triton kernels for attention (in progress)."""
