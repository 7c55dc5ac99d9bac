"""Dispatch, forced backends, backend reports, and the package working without its optional parts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dagan_fast
from dagan_fast.ops import _backends
from dagan_fast.ops._extension import extension
from dagan_fast.ops import BackendError

ALL_OPS = ("cross_modal_attention", "dense_motion", "sparse_motion_inputs", "warp_occlusion")


def test_reference_runs_every_op():
    info = dagan_fast.ops.available_backends()["reference"]
    assert info.available and set(ALL_OPS) <= set(info.ops)


def test_report_names_every_backend_with_a_reason():
    report = dagan_fast.ops.available_backends()
    assert list(report) == ["cuda", "triton", "cpu", "reference"]
    for name, info in report.items():
        assert isinstance(info.detail, str) and info.detail, name


@pytest.mark.skipif(not extension().loaded, reason="compiled library not built")
def test_compiled_cpu_warp_is_listed():
    info = dagan_fast.ops.available_backends()["cpu"]
    assert info.available and "warp_occlusion" in info.ops


@pytest.mark.skipif(torch.cuda.is_available() or not extension().cuda_compiled, reason="needs CUDA-built, GPU-less")
def test_cuda_kernels_compiled_but_no_device():
    info = dagan_fast.ops.available_backends()["cuda"]
    assert not info.available
    assert "compiled" in info.detail and "no CUDA device" in info.detail
    assert "warp_occlusion" in info.ops


@pytest.mark.parametrize("op", ["warp_occlusion", "cross_modal_attention", "sparse_motion_inputs", "dense_motion"])
def test_default_dispatch_prefers_compiled_cpu_kernels(op):
    x = torch.randn(1, 2, 3, 3)
    # the triton backend runs CPU tensors (TRITON_INTERPRET=1 in tests) but is never picked automatically for them
    assert _backends.select_backend(op, [x]).name == ("cpu" if extension().loaded else "reference")


def test_environment_variable_forces_a_backend(monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("DAGAN_FAST_BACKEND", "reference")
    assert _backends.select_backend("warp_occlusion", [x]).name == "reference"
    monkeypatch.setenv("DAGAN_FAST_BACKEND", "cuda")
    with pytest.raises(BackendError, match="DAGAN_FAST_BACKEND='cuda' cannot run.*runs on CUDA tensors"):
        _backends.select_backend("warp_occlusion", [x])
    # an explicit backend= wins over the environment
    assert _backends.select_backend("warp_occlusion", [x], "reference").name == "reference"


def test_no_backend_error_lists_every_reason():
    x = torch.randn(2, 2).to(torch.int32)
    with pytest.raises(BackendError) as info:
        _backends.select_backend("warp_occlusion", [x])
    message = str(info.value)
    for name in ("cuda:", "triton:", "cpu:", "reference:"):
        assert name in message
    assert "does not take torch.int32" in message


def test_triton_backend_accepts_cpu_tensors_only_under_the_interpreter(monkeypatch):
    triton = _backends.get_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in triton.device_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton.device_reason(torch.device("cpu")) is None
    assert triton.device_reason(torch.device("meta")) is not None


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_package_works_without_compiled_library():
    code = (
        "import torch, dagan_fast\n"
        "r = dagan_fast.ops.available_backends()\n"
        "assert not r['cpu'].available and 'DAGAN_FAST_NO_EXTENSION' in r['cpu'].detail, r['cpu']\n"
        "x = torch.randn(1, 2, 4, 4); g = torch.rand(1, 3, 3, 2) * 2 - 1\n"
        "print(dagan_fast.ops.warp_occlusion(x, g).shape)\n"
    )
    result = _run(code, DAGAN_FAST_NO_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 2, 3, 3])" in result.stdout


def test_package_imports_without_triton_and_does_not_import_it():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # any `import triton` now raises ImportError\n"
        "import torch, dagan_fast\n"
        "info = dagan_fast.ops.available_backends()['triton']\n"
        "assert not info.available, info\n"
        "x = torch.randn(1, 1, 8, 8); q = torch.randn(1, 1, 10, 4)\n"
        "dagan_fast.ops.cross_modal_attention(q, q, q)\n"
        "print('ok')\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lazy = _run("import sys, dagan_fast; print('triton' in sys.modules)")
    assert lazy.stdout.strip() == "False"


# ------------------------------------------------------------------ per-op capabilities (declared, read by dispatch)
class _ToyBackend(_backends.Backend):
    name = "toy"


def _toy_attention_backend():
    toy = _ToyBackend()
    toy.register("cross_modal_attention", lambda *a: ("toy-forward",), None,
                 not_supported_reasons=lambda q, k, v: [f"Dv {v.shape[-1]} > 8"] if v.shape[-1] > 8 else [],
                 backward_via="cpu")
    return toy


def test_op_specific_reasons_reach_dispatch_with_every_operand():
    toy = _toy_attention_backend()
    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)
    assert toy.not_supported_reasons("cross_modal_attention", [q, k, torch.randn(1, 1, 5, 8)]) == []
    assert toy.not_supported_reasons("cross_modal_attention", [q, k, torch.randn(1, 1, 5, 9)]) == ["Dv 9 > 8"]


def test_backward_via_is_an_explicit_reported_choice():
    toy = _toy_attention_backend()
    q = torch.randn(1, 1, 3, 4)
    name, backward = toy.backward_kernel("cross_modal_attention", [q])
    cpu_ok = not _backends.get_backend("cpu").not_supported_reasons("cross_modal_attention", [q])
    assert name == ("cpu" if cpu_ok else "reference")
    assert backward is _backends.get_backend(name).kernels["cross_modal_attention"].backward
    name, _ = toy.backward_kernel("cross_modal_attention", [q.to(torch.complex64)])  # cpu cannot: the reference
    assert name == "reference"
    assert toy.backward_notes() == ["cross_modal_attention backward runs the cpu kernel (the reference where cpu cannot)"]
    assert _backends.get_backend("cuda").backward_notes() == [
        "cross_modal_attention backward runs the triton kernel (the reference where triton cannot)"]


def test_register_needs_exactly_one_backward():
    toy = _ToyBackend()
    with pytest.raises(ValueError, match="either a backward kernel or backward_via"):
        toy.register("warp_occlusion", lambda *a: None, None)
    with pytest.raises(ValueError, match="either a backward kernel or backward_via"):
        toy.register("warp_occlusion", lambda *a: None, lambda *a: None, backward_via="cpu")


@pytest.mark.skipif(not extension().cuda_compiled, reason="the library was built without CUDA kernels")
def test_cuda_attention_declares_its_feature_limit():
    from dagan_fast.ops._extension import attention_simt_max_features

    limit = attention_simt_max_features()
    assert limit is not None and limit >= 256
    reasons = _backends.get_backend("cuda").kernels["cross_modal_attention"].reasons
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 3, 32)
    assert reasons(q, k, torch.randn(1, 1, 3, limit - 32)) == []
    too_wide = reasons(q, k, torch.randn(1, 1, 3, limit - 31))
    assert len(too_wide) == 1 and str(limit) in too_wide[0] and "Dqk + Dv" in too_wide[0]
    # tensor cores take any Dv in fp16/bf16 with a supported Dqk
    assert reasons(q.half(), k.half(), torch.randn(1, 1, 3, limit).half()) == []


def test_epilogue_is_declared_on_the_backend():
    from dagan_fast.ops import attention

    toy = _ToyBackend()
    toy.register("cross_modal_attention", lambda *a: None, lambda *a: None)
    _backends.BACKENDS["toy"] = toy
    try:
        attention.register_epilogue("toy", lambda *a: ("fused",))
        assert toy.kernels["cross_modal_attention"].epilogue(None) == ("fused",)
    finally:
        del _backends.BACKENDS["toy"]


def test_cpu_capability_reports_aten_and_the_processor(monkeypatch):
    cap = dagan_fast.ops.cpu_capability()
    assert set(cap) == {"aten", "aten_requested", "cpu", "kernels", "kernels_requested"}
    assert cap["aten"] == torch.backends.cpu.get_cpu_capability()
    if cap["cpu"] is not None:  # Linux: every feature named, booleans; AVX-512 implies AVX2
        assert set(cap["cpu"]) == {"avx2", "avx512", "avx512_bf16", "amx"}
        assert all(isinstance(v, bool) for v in cap["cpu"].values())
        assert cap["cpu"]["avx2"] or not cap["cpu"]["avx512"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert dagan_fast.ops.cpu_capability()["aten_requested"] == "avx2"
    summary = dagan_fast.ops.cpu_capability_summary()
    assert summary.startswith(f"aten={cap['aten']};") and "," not in summary
    assert f"aten={cap['aten']}" in dagan_fast.ops.available_backends()["cpu"].detail or \
        not dagan_fast.ops.available_backends()["cpu"].available


def test_cpu_capability_follows_aten_cpu_capability():
    code = "import dagan_fast.ops as o; print(o.cpu_capability()['aten'])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "DEFAULT"


def test_triton_kernels_load_when_triton_is_installed():
    # a broken import inside dagan_fast.ops.triton would otherwise only show up as skipped Triton tests
    pytest.importorskip("triton")
    from dagan_fast.ops._backends import _load_triton_kernels

    assert _load_triton_kernels() is None


def test_triton_attention_declares_its_gpu_head_dims(monkeypatch):
    pytest.importorskip("triton")
    from dagan_fast.ops.triton import attention as triton_attention

    monkeypatch.setattr(triton_attention, "interpreting", lambda t: False)  # as on a GPU
    q32, q16 = torch.randn(1, 1, 2, 200), torch.randn(1, 1, 2, 200).half()
    assert triton_attention.head_dim_reasons(q32) == ["Dqk 200 exceeds the 128 of its GPU tiles for torch.float32"]
    assert triton_attention.head_dim_reasons(q16) == []
    assert triton_attention.head_dim_reasons(torch.randn(1, 1, 2, 300).half())
    assert _backends.get_backend("triton").kernels["cross_modal_attention"].reasons is triton_attention.head_dim_reasons
