"""GPU kernels compiled and checked without a GPU (runs on every CPU machine, in CI).

Triton: every LaunchSpec the launchers list (``launch_specs()`` of dagan_fast.ops.triton.attention, motion,
warp: each tile of their tile tables, fp32/fp16/bf16) is compiled ahead of time for sm_80 and sm_90 by
Triton's own compiler and bundled ptxas, in a subprocess without TRITON_INTERPRET and with an empty
cache. Fails on a compile error, a register spill, or shared memory above the chip's per-block limit.

CUDA: the resource usage of every kernel in the built op library (cuobjdump on its sm_80 and sm_90
cubins) is checked against the occupancy plan in the kernel's comment ("occupancy plan: T threads/block,
N blocks/SM, <= R registers/thread"): no stack frame or local memory (so no spills), registers <= R,
the plan itself within the SM (R * T * N <= 65536 registers, T * N threads), and static shared memory
of N blocks within the SM.

Both write their rows to benchmarks/results/gpu-compile.csv.
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = ROOT / "benchmarks" / "results" / "gpu-compile.csv"
CUDA_DIR = ROOT / "csrc" / "cuda"
ARCHS = (80, 90)

triton = pytest.importorskip("triton")

from dagan_fast.ops.triton import aot  # noqa: E402  (imports no kernel of its own; the subprocess compiles)

_ROWS = {}


@pytest.fixture(scope="module", autouse=True)
def _write_csv():
    """Writes the rows the tests of this module produced (Triton first, then CUDA) once they ran; a
    source whose tests did not run (-k) keeps its rows from the file."""
    yield
    if not _ROWS:
        return
    kept = {}
    if CSV_PATH.exists():
        with open(CSV_PATH) as f:
            for row in csv.DictReader(f):
                kept.setdefault(row["source"], []).append(row)
    rows = []
    for source in ("triton", "cuda"):
        rows += _ROWS.get(source, kept.get(source, []))
    aot.write_csv(rows, str(CSV_PATH))


@pytest.fixture(scope="module")
def triton_rows():
    """Compiles every Triton LaunchSpec for sm_80 and sm_90 in a fresh process (no interpreter, empty
    cache) and returns its CSV rows; the compile time is part of each row and printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch-time default, without 3.9's warning
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        out = os.path.join(tmp, "triton.csv")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dagan_fast.ops.triton.aot", "--csv", out,
                               "--arch", *map(str, ARCHS)], env=env, cwd=str(ROOT), capture_output=True,
                              text=True, timeout=1800)
        elapsed = time.perf_counter() - start
        assert os.path.exists(out), proc.stdout + proc.stderr
        with open(out) as f:
            rows = list(csv.DictReader(f))
    print(f"\nTriton ahead-of-time compile: {len(rows)} configurations in {elapsed:.0f} s")
    _ROWS["triton"] = rows
    return rows


def test_every_triton_launch_compiles_without_spills(triton_rows):
    bad = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['status']}" for r in triton_rows if r["status"] != "ok"]
    assert not bad, "\n".join(bad)
    assert {r["arch"] for r in triton_rows} == {f"sm_{a}" for a in ARCHS}
    for r in triton_rows:
        assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0
        assert int(r["shared_bytes"]) <= int(r["shared_limit"])
        assert int(r["blocks_per_sm"]) >= 1, r


def test_specs_cover_every_kernel_and_dtype(triton_rows):
    """Every @triton.jit kernel of the launcher modules is launched by some spec, in every GPU dtype."""
    import dagan_fast.ops.triton as pkg

    kernels = set()
    for name in ("attention", "motion", "warp"):
        source = (Path(pkg.__file__).parent / f"{name}.py").read_text()
        kernels |= set(re.findall(r"@triton\.jit\ndef (_\w+_kernel)\(", source))
    compiled = {r["kernel"] for r in triton_rows}
    assert kernels and kernels <= compiled, sorted(kernels - compiled)
    for kernel in kernels:
        dtypes = {r["config"].split(":")[0] for r in triton_rows if r["kernel"] == kernel}
        assert dtypes == {"fp32", "fp16", "bf16"}, (kernel, dtypes)


def test_launcher_tile_choices_are_in_the_specs(monkeypatch):
    """The GPU tile choices of the launchers, for many shapes and SM counts, are among the compiled specs
    (the plan functions run here on meta tensors with the device treated as a GPU)."""
    import torch

    from dagan_fast.ops.triton import attention, motion, warp

    monkeypatch.setattr(attention, "sm_count", lambda device: 132)
    monkeypatch.setattr(attention, "interpreting", lambda t: False)
    monkeypatch.setattr(warp, "_target_programs", lambda device: 4 * 132)
    monkeypatch.setattr(warp, "_interpreting", lambda t: False)
    warp_tiles = {(s.constexprs["BLOCK_P"], s.constexprs["BLOCK_C"], s.num_warps) for s in warp.launch_specs()}
    for B, C, H, W, cl in [(1, 3, 7, 5, False), (1, 256, 64, 64, False), (8, 64, 64, 64, True), (2, 4, 256, 256, True),
                           (1, 17, 1, 1, True), (32, 512, 16, 16, False)]:
        x = torch.empty(B, C, H, W, device="meta")
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        grid = torch.empty(B, H, W, 2, device="meta")
        for split in (True, False):
            plan = warp._Plan(x, grid, split_channels=split)
            assert (plan.block_p, plan.block_c, plan.num_warps) in warp_tiles, (B, C, H, W, cl, split)
    fwd = {tuple(sorted((k, str(v)) for k, v in s.constexprs.items() if k.startswith("BLOCK")))
           for s in attention.launch_specs() if s.name == "_attn_fwd_kernel"}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for nq, dqk, dv, bh in [(4096, 32, 256, 1), (77, 16, 48, 1), (1000, 64, 64, 2), (64, 256, 512, 8),
                                (5, 100, 3, 1), (8192, 128, 128, 16)]:
            q = torch.empty(1, 1, nq, dqk, device="meta", dtype=dtype)
            if dtype == torch.float32 and dqk > 128:  # no fp32 tile holds it: refused, not launched
                with pytest.raises(ValueError, match="Dqk <= 128"):
                    attention._fwd_tiles(q, nq, dqk, dv, bh)
                continue
            t = attention._fwd_tiles(q, nq, dqk, dv, bh)
            key = tuple(sorted([("BLOCK_D", str(t.block_d)), ("BLOCK_DV", str(t.block_dv)),
                                ("BLOCK_M", str(t.block_m)), ("BLOCK_N", str(t.block_n))]))
            assert key in fwd, (dtype, nq, dqk, dv, bh, t)
    blocks = {s.constexprs["BLOCK"] for s in motion.launch_specs()}
    for hw in (1, 49, 100, 4096, 65536):
        assert motion._block(hw, torch.device("cuda"))[0] in blocks


# ------------------------------------------------------------------------------------------- CUDA
_PLAN = re.compile(r"occupancy plan: (\d+) threads/block, (\d+) blocks/SM, <= (\d+) registers/thread")
_KERNEL = re.compile(r"__global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(")
_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuda_plans():
    """kernel name -> (threads/block, blocks/SM, register budget) from the .cu files' plan comments; every
    __global__ kernel must have one in the ten lines above it."""
    plans, missing = {}, []
    for path in sorted(CUDA_DIR.glob("*.cu")):
        lines = path.read_text().splitlines()
        text = "\n".join(lines)
        for m in _KERNEL.finditer(text):
            line = text.count("\n", 0, m.start())
            found = None
            for back in range(line, max(-1, line - 10), -1):
                found = _PLAN.search(lines[back])
                if found:
                    break
            if found is None:
                missing.append(f"{path.name}:{m.group(1)}")
            else:
                plans[m.group(1)] = tuple(int(g) for g in found.groups())
    assert not missing, f"kernels without an occupancy plan comment: {missing}"
    return plans


def _template_args(mangled: str, name: str) -> str:
    """Readable template arguments of an Itanium-mangled kernel name (float, __half, 64, ...)."""
    i = mangled.find(name + "I")
    if i < 0:
        return ""
    s, i, out = mangled, i + len(name) + 1, []
    while i < len(s) and s[i] != "E":
        if s[i].isdigit():
            j = i
            while s[j].isdigit():
                j += 1
            n = int(s[i:j])
            out.append(s[j:j + n])
            i = j + n
        elif s[i] == "L":
            j = s.index("E", i)
            out.append(s[i + 2:j])
            i = j + 1
        else:
            out.append({"f": "float", "d": "double"}.get(s[i], s[i]))
            i += 1
    return ",".join(out)


def _op_library():
    import dagan_fast

    libs = sorted(Path(dagan_fast.__file__).parent.glob("_C*.so"))
    return libs[0] if libs else None


@pytest.fixture(scope="module")
def cuda_rows():
    """Rows (as in the CSV) for every dagan_fast kernel instantiation in the built library's sm_80/sm_90
    cubins; skips when the library was built without CUDA."""
    lib = _op_library()
    tool = aot._cuobjdump()
    if lib is None or not tool:
        pytest.skip("no built op library or no cuobjdump")
    plans = cuda_plans()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = subprocess.run([tool, "--list-elf", str(lib)], capture_output=True, text=True).stdout
        if "sm_" not in listing:
            pytest.skip("the op library was built without CUDA kernels")
        subprocess.run([tool, "-xelf", "all", str(lib)], cwd=tmp, capture_output=True, check=True)
        for cubin in sorted(Path(tmp).glob("*.cubin")):
            arch = int(re.search(r"sm_(\d+)", cubin.name).group(1))
            if arch not in ARCHS:
                continue
            text = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
            for m in _RESOURCE.finditer(text):
                mangled = m.group(1)
                names = [n for n in plans if re.search(rf"\d{n}I", mangled)]
                if not names:
                    continue  # CUB's sort kernels: not ours to plan
                name = max(names, key=len)
                threads = plans[name][0]
                regs, stack, shared, local = (int(g) for g in m.groups()[1:])
                rows.append({"source": "cuda", "kernel": name, "config": _template_args(mangled, name),
                             "arch": f"sm_{arch}", "threads": threads, "registers": regs,
                             "spill_stores": stack + local, "spill_loads": stack + local, "stack_bytes": stack,
                             "shared_bytes": shared, "shared_limit": aot.SHARED_LIMIT[arch],
                             "blocks_per_sm": aot.blocks_per_sm(regs, threads, shared, arch),
                             "status": _cuda_status(regs, stack, local, shared, plans[name], arch),
                             "compile_s": ""})
    _ROWS["cuda"] = rows
    return rows


def _cuda_status(regs, stack, local, shared, plan, arch):
    """"ok", or why a kernel instantiation breaks its plan (threads/block, blocks/SM, register budget)."""
    _, blocks, budget = plan
    if stack or local:
        return f"spills: {stack} bytes stack, {local} bytes local"
    if regs > budget:
        return f"registers: {regs} > budget {budget}"
    if shared * blocks > aot.SHARED_LIMIT[arch]:
        return f"shared: {blocks} x {shared} bytes"
    return "ok"


def test_cuda_plans_fit_the_sm():
    for name, (threads, blocks, budget) in cuda_plans().items():
        assert threads % 32 == 0 and threads * blocks <= 2048, name
        assert budget * threads * blocks <= aot.REGISTERS_PER_SM and budget <= 255, name


def test_every_cuda_kernel_stays_inside_its_plan(cuda_rows):
    plans = cuda_plans()
    assert {r["kernel"] for r in cuda_rows} == set(plans), "a planned kernel is missing from the library"
    assert {r["arch"] for r in cuda_rows} == {f"sm_{a}" for a in ARCHS}
    bad = [f"{r['kernel']}<{r['config']}> {r['arch']}: {r['status']}" for r in cuda_rows if r["status"] != "ok"]
    assert not bad, "\n".join(bad)
