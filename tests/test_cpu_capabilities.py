"""Every C++ CPU kernel (forward and backward, float32 and bfloat16) under every vector level this CPU
offers: each level runs tests/_cpu_kernel_checks.py in a subprocess with ATEN_CPU_CAPABILITY and
DAGAN_FAST_CPU_CAPABILITY set (both are read once per process), against the float64 reference with
the derived tolerances described there. Levels the CPU lacks are skipped with the reason. Also: the
switch itself (ATen's variable alone forces ours, ours wins over ATen's, a bad value is named) and
the warp forward returning the same bits at every level (the vector paths reproduce the scalar
definition)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dagan_fast.ops._extension import extension, has_kernel

ROOT = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).resolve().parent / "_cpu_kernel_checks.py"
LEVELS = ("default", "avx2", "avx512")

pytestmark = pytest.mark.skipif(
    not (extension().loaded and has_kernel("cpu_capability", "CompositeExplicitAutograd")),
    reason="needs the compiled op library with the cpu_capability op")


def _run(code_or_path, env_extra, timeout=600):
    """Runs a script file or ``-c`` code in a fresh interpreter with only ``env_extra``'s CPU switches."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "DAGAN_FAST_CPU_CAPABILITY", "DAGAN_FAST_CPU_AVX512BF16",
                        "DAGAN_FAST_WARP_SCALAR", "DAGAN_FAST_BACKEND")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(code_or_path)] if isinstance(code_or_path, Path) else \
        [sys.executable, "-c", code_or_path]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


PROBE = "import dagan_fast, torch; print(torch.ops.dagan_fast.cpu_capability()); print(torch.backends.cpu.get_cpu_capability())"


def _probe(env_extra):
    proc = _run(PROBE, env_extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, aten = proc.stdout.split()[-2:]
    return ours, aten


@functools.lru_cache(maxsize=None)
def hardware_level() -> str:
    """The highest level this CPU offers (what our kernels pick with no variable set)."""
    return _probe({})[0].split("+")[0]


def _skip_unless_offered(level: str) -> None:
    if LEVELS.index(level) > LEVELS.index(hardware_level()):
        pytest.skip(f"this CPU offers {hardware_level()} at most, not {level}")


@pytest.mark.slow
@pytest.mark.parametrize("level, bf16_native", [("default", None), ("avx2", None), ("avx512", True),
                                                ("avx512", False)],
                         ids=["default", "avx2", "avx512", "avx512-shift-rounding"])
def test_kernels_match_reference_under_capability(level, bf16_native):
    _skip_unless_offered(level)
    env = {"ATEN_CPU_CAPABILITY": level, "DAGAN_FAST_CPU_CAPABILITY": level}
    if bf16_native is False:
        env["DAGAN_FAST_CPU_AVX512BF16"] = "0"
    elif bf16_native:
        if "+bf16" not in _probe(env)[0]:
            pytest.skip("this CPU has AVX-512 but not AVX512-BF16")
    proc = _run(CHECKS, env)
    assert proc.returncode == 0, f"under {env}:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["capability"].split("+")[0] == level
    assert ("+bf16" in report["capability"]) == bool(bf16_native and level == "avx512")
    assert report["aten"] == level.upper()
    names = {(r["name"], r["dtype"]) for r in report["results"]}
    for dtype in ("torch.float32", "torch.bfloat16"):
        for name in ("warp out", "warp grad_input", "warp grad_grid", "attention out", "attention dq",
                     "attention dk", "attention dv", "motion sparse out", "motion sparse grad_source",
                     "motion dense deformation", "motion dense grad_logits"):
            assert (name, dtype) in names, (name, dtype)
    assert ("winograd out", "torch.float32") in names


def test_aten_variable_alone_sets_ours_and_ours_wins():
    _skip_unless_offered("avx2")
    assert _probe({"ATEN_CPU_CAPABILITY": "avx2"}) == ("avx2", "AVX2")
    assert _probe({"ATEN_CPU_CAPABILITY": "avx2", "DAGAN_FAST_CPU_CAPABILITY": "default"}) == ("default", "AVX2")
    # A value only ATen knows leaves ours at the CPU's level.
    assert _probe({"ATEN_CPU_CAPABILITY": "zvector"})[0].split("+")[0] == hardware_level()


def test_unknown_level_is_named():
    proc = _run(PROBE, {"DAGAN_FAST_CPU_CAPABILITY": "avx9"})
    assert proc.returncode != 0
    assert "DAGAN_FAST_CPU_CAPABILITY must be default, avx2 or avx512, got 'avx9'" in proc.stderr
    proc = _run("from dagan_fast.ops._extension import cpu_capability; cpu_capability()",
                {"DAGAN_FAST_CPU_CAPABILITY": "avx9"})
    assert "ValueError: DAGAN_FAST_CPU_CAPABILITY must be" in proc.stderr


WARP_BITS = """
import hashlib, torch, dagan_fast
import _cpu_kernel_checks as C
h = hashlib.sha256()
for dtype in (torch.float32, torch.bfloat16):
    for case in C.WARP_CASES:
        x, grid, occ, _ = C.warp_inputs(case, dtype, seed=11)
        out = torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ)
        h.update(out.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_warp_forward_same_bits_at_every_level():
    digests = {}
    for level in LEVELS:
        if LEVELS.index(level) > LEVELS.index(hardware_level()):
            continue
        proc = _run(WARP_BITS, {"DAGAN_FAST_CPU_CAPABILITY": level, "PYTHONPATH": str(ROOT / "tests")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests[level] = proc.stdout.split()[-1]
    assert len(set(digests.values())) == 1, digests
