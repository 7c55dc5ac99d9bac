"""Shared test helpers: which backends can run an op here, and error measures."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are defined at first use; with no GPU they then run through the interpreter,
    # only where a test asks for backend="triton" (automatic dispatch never picks it for CPU tensors).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Animator(dtype="auto") picks bfloat16 on AMX/AVX512-BF16 CPUs; the suite's parity tests compare float32
# paths, so "auto" means float32 here (tests/test_cpu_bf16_runtime.py checks the real pick with this unset).
os.environ.setdefault("DAGAN_FAST_DTYPE", "float32")

import dagan_fast


def backends_for(op: str):
    """Backends that implement ``op`` and accept CPU tensors in this process (triton too under
    TRITON_INTERPRET=1); the reference always does."""
    from dagan_fast.ops import _backends

    probe = torch.zeros(1)
    return [name for name, info in dagan_fast.ops.available_backends().items()
            if info.available and op in info.ops and not _backends.get_backend(name).not_supported_reasons(op, [probe])]


def compiled_backends_for(op: str):
    """Backends other than the reference that can run ``op`` on CPU tensors here."""
    return [name for name in backends_for(op) if name != "reference"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(|expected|, tiny), computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def assert_every_parameter_has_gradient(nets) -> None:
    """Every parameter of each (name, module) in ``nets`` has a finite, nonzero gradient."""
    for name, net in nets:
        for pname, p in net.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all() and float(p.grad.abs().max()) > 0, f"{name}.{pname}"


@pytest.fixture(scope="module")
def one_thread():
    """One PyTorch thread for a test module: on the shared 2-core test machine the tiny training models' small
    convolutions spend most of their time in OpenMP barriers with two threads (measured ~5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Compiled kernels fill fresh outputs with NaN first (DAGAN_FAST_POISON=1)."""
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    yield


#: marks a test that needs a CUDA device; without one, pytest_collection_modifyitems skips it (``-m gpu`` selects
#: exactly these, ``-m "not gpu"`` leaves them out)
gpu = pytest.mark.gpu


def pytest_collection_modifyitems(config, items):
    """Skips every gpu-marked test when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
