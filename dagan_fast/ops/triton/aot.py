"""Ahead-of-time compilation of every Triton kernel configuration the launchers can launch on a GPU.

``python -m dagan_fast.ops.triton.aot --csv out.csv`` compiles each ``LaunchSpec`` that the launcher
modules list (``attention``, ``motion``, ``warp``: ``launch_specs()``) with Triton's own compiler and
bundled ptxas for sm_80 and sm_90 (no GPU needed), and reports per spec and architecture: registers,
spill stores/loads, stack frame and shared memory, against the chip's limits. It exits non-zero on a
compile error, a spill, or shared memory above the chip's per-block limit.

Run it with TRITON_INTERPRET unset (the kernels must be defined as JITFunctions, not interpreted
functions) and, for a check that caches nothing, with a fresh TRITON_CACHE_DIR;
tests/test_gpu_compile.py does both.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Sequence

# Largest shared memory one block may opt in to, per compute capability (CUDA programming guide,
# "Technical specifications per compute capability").
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048}
CSV_FIELDS = ("source", "kernel", "config", "arch", "threads", "registers", "spill_stores", "spill_loads",
              "stack_bytes", "shared_bytes", "shared_limit", "blocks_per_sm", "status", "compile_s")


def kernel_modules():
    """The launcher modules, imported (kernels defined as JITFunctions when TRITON_INTERPRET is unset)."""
    from . import attention, motion, warp
    return (warp, attention, motion)


def all_specs():
    """Every LaunchSpec of every launcher module, in a stable order."""
    specs = []
    for module in kernel_modules():
        specs.extend(module.launch_specs())
    return specs


def blocks_per_sm(registers: int, threads: int, shared: int, arch: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), threads and
    shared memory; 0 when the block does not fit at all."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * warps)
    by_threads = MAX_THREADS_PER_SM[arch] // threads
    by_shared = SHARED_LIMIT[arch] // shared if shared else by_threads
    return max(0, min(by_regs, by_threads, by_shared, 32))


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_CUOBJ = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or "")


def _resources_from_cubin(cubin: bytes) -> Dict[str, int]:
    """Registers and stack of a cubin through cuobjdump (used when ptxas's log is not available)."""
    tool = _cuobjdump()
    if not tool:
        raise RuntimeError("neither ptxas's log nor cuobjdump is available to read the resource usage")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = _CUOBJ.search(text)
    stack = int(m.group(2)) + int(m.group(4))
    # cuobjdump does not separate spills from other local memory: any counts as a spill here
    return {"registers": int(m.group(1)), "stack_bytes": stack, "spill_stores": stack, "spill_loads": stack}


def compile_spec(spec, arch: int) -> Dict[str, object]:
    """Compiles ``spec`` for sm_``arch`` and returns its CSV row (status "ok", "spills", "shared" or
    "error: ...")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: Dict[str, object] = {"source": "triton", "kernel": spec.name, "config": spec.label, "arch": f"sm_{arch}",
                              "threads": 32 * spec.num_warps, "shared_limit": SHARED_LIMIT[arch]}
    start = time.perf_counter()
    names = list(spec.signature)
    aligned = {(names.index(p),): [["tt.divisibility", 16]] for p in (*spec.pointer_args, *spec.aligned_args)}
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    nvidia_knobs = getattr(knobs, "nvidia", None)
    can_log = nvidia_knobs is not None and hasattr(nvidia_knobs, "dump_ptxas_log")
    try:
        if can_log:
            nvidia_knobs.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            try:
                src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                                attrs=aligned)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            except TypeError:  # a Triton without attrs in this form: compile without the alignment hints
                src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # a compile error is a result, reported per spec
        message = " ".join(str(exc).split())[:300]
        row.update(status=f"error: {exc.__class__.__name__}: {message}", compile_s=round(time.perf_counter() - start, 2))
        return row
    finally:
        if can_log:
            nvidia_knobs.dump_ptxas_log = False
    text = log.getvalue()
    spills, regs = _PTXAS_SPILLS.search(text), _PTXAS_REGS.search(text)
    if spills and regs:
        row.update(registers=int(regs.group(1)), stack_bytes=int(spills.group(1)), spill_stores=int(spills.group(2)),
                   spill_loads=int(spills.group(3)))
    else:
        row.update(_resources_from_cubin(compiled.asm["cubin"]))
    shared = int(compiled.metadata.shared)
    row.update(shared_bytes=shared, blocks_per_sm=blocks_per_sm(int(row["registers"]), int(row["threads"]), shared, arch),
               compile_s=round(time.perf_counter() - start, 2))
    if int(row["spill_stores"]) or int(row["spill_loads"]):
        row["status"] = "spills"
    elif shared > SHARED_LIMIT[arch]:
        row["status"] = "shared"
    else:
        row["status"] = "ok"
    return row


def _compile_index(args):
    index, arch = args
    return compile_spec(all_specs()[index], arch)


def run(archs: Sequence[int] = (80, 90), jobs: int = 1, pattern: str = "", progress=None) -> List[Dict[str, object]]:
    """Compiles every spec (whose "kernel-name label" matches the regex ``pattern``) for every architecture in
    ``archs`` with ``jobs`` processes; returns the rows in spec order. ``progress(row)`` is called as
    each row arrives."""
    specs = all_specs()
    work = [(i, arch) for i, spec in enumerate(specs) if re.search(pattern, f"{spec.name} {spec.label}")
            for arch in archs]
    rows: List[Dict[str, object]] = [{} for _ in work]
    if jobs <= 1:
        results = ((n, compile_spec(specs[i], arch)) for n, (i, arch) in enumerate(work))
        for n, row in results:
            rows[n] = row
            if progress:
                progress(row)
        return rows
    with futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(_compile_index, w): n for n, w in enumerate(work)}
        for done in futures.as_completed(pending):
            rows[pending[done]] = done.result()
            if progress:
                progress(rows[pending[done]])
    return rows


def write_csv(rows: Iterable[Dict[str, object]], path: str, append: bool = False) -> None:
    """Writes ``rows`` with the columns CSV_FIELDS (appends without a header when ``append``)."""
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if not append:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--csv", help="write the rows here")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--kernels", default="", help="only specs whose 'kernel label' matches this regex")
    parser.add_argument("--verbose", action="store_true", help="print each row as it is compiled")
    args = parser.parse_args(list(argv))
    from triton.runtime.jit import JITFunction
    kernel = all_specs()[0].kernel
    if not isinstance(kernel, JITFunction):
        print("the kernels are interpreted (TRITON_INTERPRET is set): unset it to compile them", file=sys.stderr)
        return 2
    start = time.perf_counter()
    def show(row):
        if args.verbose or row["status"] != "ok":
            print(f"{row['kernel']} [{row['config']}] {row['arch']}: {row['status']} regs={row.get('registers')} "
                  f"spills={row.get('spill_stores')} shared={row.get('shared_bytes')} {row['compile_s']} s", flush=True)

    rows = run(args.arch, args.jobs, args.kernels, show)
    if args.csv:
        write_csv(rows, args.csv)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"compiled {len(rows)} kernel configurations in {time.perf_counter() - start:.1f} s, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
