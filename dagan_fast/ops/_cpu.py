"""Which CPU vector paths are in use: ATen's, and what the processor offers (issue 14)."""
from __future__ import annotations

import functools
import os
from typing import Dict, FrozenSet, Optional

import torch

#: /proc/cpuinfo flag per feature reported by cpu_capability()
_FLAGS = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16", "amx": "amx_tile"}


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[FrozenSet[str]]:
    """The processor's feature flags (the ``flags`` line of /proc/cpuinfo), or None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_capability() -> Dict[str, object]:
    """The CPU capability in use, as a dict:

    - ``"aten"``: str, the vector path ATen's CPU kernels dispatch to (torch.backends.cpu.get_cpu_capability():
      "AVX512", "AVX2", "DEFAULT", ...; environment ATEN_CPU_CAPABILITY, read at startup, can lower it);
    - ``"aten_requested"``: the ATEN_CPU_CAPABILITY setting, or None;
    - ``"cpu"``: {"avx2", "avx512", "avx512_bf16", "amx"} -> bool, what the processor offers (/proc/cpuinfo flags
      avx2, avx512f, avx512_bf16, amx_tile), or None where /proc/cpuinfo cannot be read (not Linux);
    - ``"kernels"``: the vector path of dagan_fast's own C++ CPU kernels ("default", "avx2", "avx512", with
      "+bf16" when AVX512-BF16 instructions round to bfloat16; DAGAN_FAST_CPU_CAPABILITY, else
      ATEN_CPU_CAPABILITY, capped by the processor), or None without the compiled library;
    - ``"kernels_requested"``: the DAGAN_FAST_CPU_CAPABILITY setting, or None.
    """
    flags = cpu_flags()
    from ._extension import cpu_capability as kernel_capability

    try:
        kernels = kernel_capability(detail=True)
    except ValueError:  # a DAGAN_FAST_CPU_CAPABILITY value the kernels refuse: the ops raise it when they run
        kernels = None
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "aten_requested": os.environ.get("ATEN_CPU_CAPABILITY") or None,
        "cpu": None if flags is None else {name: flag in flags for name, flag in _FLAGS.items()},
        "kernels": kernels,
        "kernels_requested": os.environ.get("DAGAN_FAST_CPU_CAPABILITY") or None,
    }


def cpu_capability_summary(cap: Optional[Dict[str, object]] = None) -> str:
    """cpu_capability() in one CSV-safe word: ``aten=AVX512;kernels=...;cpu=avx2+avx512+amx`` (kernels only when
    reported; cpu=? where the flags are unknown)."""
    cap = cpu_capability() if cap is None else cap
    parts = [f"aten={cap['aten']}"]
    if cap.get("kernels"):
        parts.append(f"kernels={cap['kernels']}")
    cpu = cap.get("cpu")
    parts.append("cpu=" + ("?" if cpu is None else "+".join(k for k, v in cpu.items() if v) or "none"))
    return ";".join(parts)
