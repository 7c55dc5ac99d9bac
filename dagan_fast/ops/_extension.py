"""Loads the compiled op library (``dagan_fast/_C*.so``) once and remembers why when it cannot.

The library registers ``torch.ops.dagan_fast.*_fwd/_bwd`` kernels for the CPU and, when nvcc built
them, the CUDA dispatch key. Set ``DAGAN_FAST_NO_EXTENSION=1`` to run without it (reference path).
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExtensionState:
    """What the compiled library offers in this process."""

    loaded: bool
    path: Optional[str]
    error: Optional[str]
    cuda_compiled: bool
    cuda_archs: str


@functools.lru_cache(maxsize=None)
def extension() -> ExtensionState:
    """Loads the library on first call; never raises (the reason goes into ``error``)."""
    if os.environ.get("DAGAN_FAST_NO_EXTENSION", "").strip() not in ("", "0"):
        return ExtensionState(False, None, "disabled by DAGAN_FAST_NO_EXTENSION", False, "")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package root, where the build puts it
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not candidates:
        return ExtensionState(
            False, None,
            "compiled library dagan_fast/_C*.so not found (package not built: "
            "`pip install --no-build-isolation .` builds it)",
            False, "",
        )
    path = candidates[0]
    try:
        torch.ops.load_library(path)
        info = str(torch.ops.dagan_fast.build_info())
    except Exception as exc:  # an ABI mismatch with the installed torch, a missing symbol, ...
        return ExtensionState(False, path, f"could not load {path}: {exc}", False, "")
    parts = dict(p.split(":", 1) if ":" in p else (p, "") for p in info.split(";"))
    return ExtensionState(True, path, None, "cuda" in parts, parts.get("cuda", ""))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered ``dagan_fast::<op>`` for ``dispatch_key`` ("CPU"/"CUDA")."""
    if not extension().loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dagan_fast::{op}", dispatch_key)


@functools.lru_cache(maxsize=None)
def attention_simt_max_features() -> Optional[int]:
    """Largest Dqk + Dv the CUDA attention forward takes outside tensor cores (from the compiled library,
    through its C entry point, which needs no GPU), or None when the library has no CUDA kernels."""
    state = extension()
    if not (state.loaded and state.cuda_compiled):
        return None
    import ctypes

    try:
        return int(ctypes.CDLL(state.path).dagan_fast_attention_simt_max_features())
    except (OSError, AttributeError):
        return None


def cpu_capability(detail: bool = False) -> Optional[str]:
    """The vector level the compiled C++ CPU kernels use in this process: "default", "avx2" or
    "avx512" (ATen's names). It is DAGAN_FAST_CPU_CAPABILITY, or ATEN_CPU_CAPABILITY when that is
    unset (one setting forces both libraries), capped by what the CPU offers, read once per process.
    ``detail=True`` adds the bfloat16 rounding mode: "avx512+bf16" when AVX512-BF16 instructions
    round float32 to bfloat16. None without the compiled library (or with a build older than the
    switch); ValueError names a bad DAGAN_FAST_CPU_CAPABILITY value.
    """
    if not extension().loaded or not has_kernel("cpu_capability", "CompositeExplicitAutograd"):
        return None
    try:
        level = str(torch.ops.dagan_fast.cpu_capability())
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None
    return level if detail else level.split("+", 1)[0]
