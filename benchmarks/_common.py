"""Timing and provenance helpers shared by the benchmarks (not a test: no assertions on speed)."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def malloc_keep() -> bool:
    """Keeps freed memory in glibc's heap (mallopt M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 2 GiB - 1):
    large tensors are then carved from the heap and reuse pages instead of being mmap'ed fresh (and faulted
    in page by page) and unmapped per tensor. False where mallopt is unavailable (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def versions() -> Dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu_capability": cpu_capability()}


def cpu_capability() -> str:
    """The CPU vector paths in use, one CSV cell: dagan_fast.ops.cpu_capability_summary(), e.g.
    ``aten=AVX512;kernels=avx512+bf16;cpu=avx2+avx512+avx512_bf16+amx`` (ATEN_CPU_CAPABILITY lowers aten=)."""
    try:
        from dagan_fast.ops import cpu_capability_summary
    except ImportError:  # an older package: ATen's alone
        return f"aten={torch.backends.cpu.get_cpu_capability()}"
    return cpu_capability_summary()


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10,
            min_seconds: float = 0.0) -> float:
    """Wall time of ``fn`` in milliseconds: the median of CUDA-event timings on a GPU; on the CPU the
    minimum, because other processes on a shared machine only ever add time (preemption comes in
    scheduler slices of several ms, which would otherwise dominate a median of short calls)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        return statistics.median(samples)
    began = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - began < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return min(samples)


def append_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """Appends rows (dicts) to ``path``, writing the header for a new file. Rows with columns the file
    lacks (or that other rows lack, e.g. GB/s next to TFLOP/s) rewrite it with the widened header; missing
    cells are empty. Every row gets a ``cpu_capability`` cell (see cpu_capability()) unless it has one."""
    if not rows:
        return
    # every row says which CPU vector paths produced it (issue 14); rows built without versions() get this process's
    capability = cpu_capability()
    rows = [row if "cpu_capability" in row else {**row, "cpu_capability": capability} for row in rows]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns, first-seen order
    old_rows: List[Dict[str, object]] = []
    if os.path.exists(path):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            old_fields = list(reader.fieldnames or [])
            if set(fields) <= set(old_fields):
                fields = old_fields
            else:
                old_rows = list(reader)
                fields = old_fields + [f for f in fields if f not in old_fields]
    rewrite = bool(old_rows) or not os.path.exists(path)
    with open(path, "w" if rewrite else "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows(rows)
