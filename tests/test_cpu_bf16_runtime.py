"""bfloat16 on the CPU: ``dtype="auto"`` (mocked capability), bf16 quality against float32 on a real face, the
float32 path unchanged, clear dtype errors, and the pre-packed oneDNN convolutions (``models.packed_conv``).

Model: the bundled tiny DaGAN (64x64); source: scikit-image's astronaut; driving: a synthetic talking-head clip
of an LFW face (``dagan_fast.media.synthetic``). Speed is measured in benchmarks/, not here.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast import Animator
from dagan_fast.models.packed_conv import PackedConv2d, packed_convolutions_available, use_packed_convolutions
from dagan_fast.streaming import precision

FRAMES = 4


@pytest.fixture(autouse=True)
def _no_dtype_override(monkeypatch):
    """conftest pins "auto" to float32 for the parity tests; these tests look at the real pick."""
    monkeypatch.delenv("DAGAN_FAST_DTYPE", raising=False)


def _mock_cpu(monkeypatch, capability: str, flags: set):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))


@pytest.fixture(scope="module")
def tiny():
    from dagan_fast.checkpoints.pretrained import load_default

    return load_default()


@pytest.fixture(scope="module")
def source():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[0:224, 114:338])


@pytest.fixture(scope="module")
def clip():
    from dagan_fast.media.synthetic import face_images, make_clip

    frames = make_clip(face_images(64)[3], FRAMES, seed=1)["frames"]          # (T,3,64,64) in [0,1]
    return [(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in frames]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()) / 255.0 ** 2
    return 10 * np.log10(1.0 / max(mse, 1e-12))


# ------------------------------------------------------------------ dtype="auto"
@pytest.mark.parametrize("capability, flags, expected", [
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}, torch.bfloat16),   # Sapphire Rapids
    ("AVX512", {"avx512f", "avx512_bf16"}, torch.bfloat16),                            # Cooper Lake / Zen 4
    ("AVX512", {"avx512f", "avx2"}, torch.float32),                                    # Skylake-SP
    ("AVX2", {"avx2", "fma"}, torch.float32),                                          # AVX2-only
    ("AVX2", {"avx512f", "amx_bf16"}, torch.float32),                                  # ATEN_CPU_CAPABILITY=avx2
    ("DEFAULT", set(), torch.float32),
])
def test_auto_picks_by_cpu_capability(monkeypatch, capability, flags, expected):
    _mock_cpu(monkeypatch, capability, flags)
    dtype, why = precision.resolve_dtype("auto", torch.device("cpu"))
    assert dtype == expected and why.startswith("auto")
    assert precision.resolve_dtype(None, "cpu")[0] == expected
    assert precision.resolve_dtype("auto", "cuda")[0] == torch.float32      # opt-in on CUDA


def test_auto_env_override_and_explicit_dtypes(monkeypatch):
    _mock_cpu(monkeypatch, "AVX512", {"amx_bf16"})
    monkeypatch.setenv("DAGAN_FAST_DTYPE", "fp32")
    assert precision.resolve_dtype("auto", "cpu")[0] == torch.float32
    assert precision.resolve_dtype(torch.bfloat16, "cpu")[0] == torch.bfloat16     # explicit wins
    monkeypatch.setenv("DAGAN_FAST_DTYPE", "nonsense")
    with pytest.raises(ValueError, match="DAGAN_FAST_DTYPE.*'nonsense'"):
        precision.resolve_dtype("auto", "cpu")
    assert precision.resolve_dtype("bf16", "cpu")[0] == torch.bfloat16
    assert precision.resolve_dtype("float64", "cpu")[0] == torch.float64


def test_animator_auto_and_describe(monkeypatch, tiny, source):
    _mock_cpu(monkeypatch, "AVX512", {"amx_bf16", "avx512_bf16"})
    a = Animator(tiny, source)
    assert a.dtype == torch.bfloat16 and "amx_bf16" in a.dtype_reason
    text = a.describe()
    for word in ("DaGAN", "64x64", "cpu", "bfloat16", "amx_bf16", "float32", "warp_occlusion ->", "pre-packed"):
        assert word in text, (word, text)
    assert len(text.splitlines()) >= 5
    assert isinstance(a.malloc_keep, bool) and f"keeps freed memory (no fresh pages per frame): {a.malloc_keep}" in text
    _mock_cpu(monkeypatch, "AVX2", {"avx2"})
    a = Animator(tiny, source)
    assert a.dtype == torch.float32 and "float32" in a.describe()


@pytest.mark.parametrize("dtype, error, match", [
    ("fp8", ValueError, r"dtype must be 'auto', torch.float32.*got the string 'fp8'"),
    (torch.int32, ValueError, r"dtype must be .*got torch.int32"),
    (3, TypeError, r"dtype must be .*got int 3"),
    (torch.float16, ValueError, r"dtype=torch.float16 runs on a CUDA device only.*torch.bfloat16"),
])
def test_bad_dtype_errors(tiny, source, dtype, error, match):
    with pytest.raises(error, match=match):
        Animator(tiny, source, dtype=dtype)


# ------------------------------------------------------------------ quality and the float32 path
def test_bf16_stream_close_to_float32_on_a_real_face(tiny, source, clip):
    ref = list(Animator(tiny, source, dtype=torch.float32).stream(clip))
    bf16 = Animator(tiny, source, dtype="bf16")
    low = list(bf16.stream(clip))
    assert bf16.dtype == torch.bfloat16
    assert bf16.model.kp_detector.kp.weight.dtype == torch.float32                # keypoints stay float32
    assert bf16.model.generator.final.weight.dtype == torch.bfloat16
    assert bf16.prepared.kp["value"].dtype == torch.float32
    psnr = [_psnr(r, l) for r, l in zip(ref, low)]
    assert min(psnr) >= 40.0, psnr
    # the batched mode (depth and keypoints of 3 frames per call) is as close
    bf16.reset()
    batched = list(bf16.animate_video(clip, batch_size=3))
    assert min(_psnr(r, b) for r, b in zip(ref, batched)) >= 40.0


def test_float32_path_unchanged(monkeypatch, tiny, source, clip):
    _mock_cpu(monkeypatch, "AVX2", {"avx2"})              # auto -> float32
    auto = list(Animator(tiny, source).stream(clip))
    explicit = list(Animator(tiny, source, dtype=torch.float32).stream(clip))
    for a, e in zip(auto, explicit):
        assert np.array_equal(a, e)
    # the pre-packed convolutions compute F.conv2d's function: float rounding only
    plain = list(Animator(tiny, source, dtype=torch.float32, prepack=False).stream(clip))
    for e, p in zip(explicit, plain):
        assert np.abs(e.astype(int) - p.astype(int)).max() <= 1


# ------------------------------------------------------------------ packed convolutions
@pytest.mark.skipif(not packed_convolutions_available(), reason="no oneDNN in this PyTorch build")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_conv_matches_conv2d(dtype, tol):
    torch.manual_seed(0)
    convs = [nn.Conv2d(24, 40, 3, padding=1), nn.Conv2d(40, 8, 7, padding=3), nn.Conv2d(8, 16, 3, stride=2,
                                                                                         padding=1)]
    for conv in convs:
        conv = conv.to(dtype)
        packed = copy.deepcopy(conv)
        assert use_packed_convolutions(packed) == 1 and isinstance(packed, PackedConv2d)
        assert set(packed.state_dict()) == set(conv.state_dict())
        for shape in ((1, conv.in_channels, 16, 16), (3, conv.in_channels, 8, 12)):   # packed for the first
            x = torch.randn(shape, dtype=dtype)
            with torch.inference_mode():
                ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), conv.stride, conv.padding)
                out = packed(x)
                fused = packed.forward_relu(x)
            scale = float(ref.abs().max())
            assert out.dtype == dtype and out.shape == ref.shape
            assert float((out.float() - ref).abs().max()) <= tol * scale
            assert float((fused.float() - ref.relu()).abs().max()) <= tol * scale
        # a changed weight is repacked; a deep copy repacks on its own; autograd uses nn.Conv2d
        with torch.no_grad():
            packed.weight.mul_(2.0)
        x = torch.randn(1, conv.in_channels, 16, 16, dtype=dtype)
        with torch.inference_mode():
            doubled = F.conv2d(x.float(), 2 * conv.weight.float(), conv.bias.float(), conv.stride, conv.padding)
            assert float((packed(x).float() - doubled).abs().max()) <= 2 * tol * float(doubled.abs().max())
            clone = copy.deepcopy(packed)
            assert torch.equal(clone(x), packed(x))
        y = packed(x.requires_grad_()) if dtype == torch.float32 else None
        if y is not None:
            y.sum().backward()
            assert x.grad is not None
