"""Triton kernels of sparse_motion_inputs and dense_motion (dagan_fast/ops/triton/motion.py) against the
reference backend: every output and every gradient, float32/float64/float16, awkward shapes, keypoints far
outside the image, singular driving Jacobians, None Jacobians, strided inputs and NaN-poisoned outputs.
Without a GPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations


import pytest
import torch

from dagan_fast.ops import _backends
from dagan_fast.ops import dense_motion, reference, sparse_motion_inputs
from conftest import gpu
from _tolerance import DEFAULT_ULPS, assert_as_accurate, assert_motion_accurate, motion_references
from _inputs import make_inputs

SPARSE = "sparse_motion_inputs"
DENSE = "dense_motion"


def _triton_kernels(op, device="cpu"):
    backend = _backends.get_backend("triton")
    reasons = backend.not_supported_reasons(op, [torch.zeros(1, device=device)])
    if reasons:
        pytest.skip("triton backend cannot run here: " + "; ".join(reasons))
    return backend.kernels[op]


def _inputs(*shape, dtype=torch.float32, **kwargs):
    """tests/test_motion_ops.py's random inputs (never zeros), float32 by default."""
    return make_inputs(*shape, dtype=dtype, **kwargs)


def _upstream(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _check_all(source, kp_s, jac_s, kp_d, jac_d, logits, variance=0.01):
    """Every output and gradient of both ops from the triton kernels, all finite, in the inputs' dtype and layout,
    as accurate as PyTorch's reference formulation in that precision (float16/bfloat16: PyTorch in float32
    rounded once, the kernels' own recipe); returns nothing, asserts."""
    sp, de = _triton_kernels(SPARSE, source.device), _triton_kernels(DENSE, source.device)
    mask = [True] * 5
    keys = (kp_s, jac_s, kp_d, jac_d)
    H, W = source.shape[2:]
    # float64: the truth is the same-precision run, the floor carries the rounding of the pixel coordinate,
    # eps (1 + max(H, W)) (see test_motion_cpu_kernel)
    ulps = DEFAULT_ULPS * (1 + max(H, W)) if source.dtype == torch.float64 else DEFAULT_ULPS
    out = sp.forward(source, *keys, variance)
    assert out.shape == (source.shape[0], (kp_s.shape[1] + 1) * (source.shape[1] + 1), H, W)
    assert out.dtype == source.dtype and out.is_contiguous() and torch.isfinite(out).all()
    grad = _upstream(out.shape, source.dtype, 1)
    got = sp.backward(grad, source, *keys, variance, mask)
    for t, a in zip((source, *keys), got):
        assert (t is None and a.numel() == 0) or (a.shape == t.shape and a.dtype == t.dtype), a.shape
        assert torch.isfinite(a).all()
    assert_motion_accurate("sparse", (source, *keys), grad, [out] + [a for t, a in zip((source, *keys), got) if t is not None],
                           variance=variance, ulps=ulps, name="triton")
    d, m = de.forward(logits, *keys)
    assert d.shape == (*logits.shape[:1], H, W, 2) and m.shape == logits.shape and d.dtype == m.dtype == logits.dtype
    assert torch.isfinite(d).all() and torch.isfinite(m).all()
    gd, gm = _upstream(d.shape, logits.dtype, 2), _upstream(m.shape, logits.dtype, 3)
    got = de.backward(gd, gm, logits, *keys, mask)
    for t, a in zip((logits, *keys), got):
        assert (t is None and a.numel() == 0) or (a.shape == t.shape and a.dtype == t.dtype), a.shape
        assert torch.isfinite(a).all()
    assert_motion_accurate("dense", (logits, *keys), (gd, gm), [d, m] + [a for t, a in zip((logits, *keys), got) if t is not None],
                           ulps=ulps, name="triton")


# B, K, C, H, W: every K in {1,10,15,20} and every H, W in {1,7,64,65}, not the full cross product
SHAPES = [
    (2, 1, 3, 1, 1),
    (1, 10, 3, 7, 65),
    (1, 15, 3, 64, 64),
    (2, 20, 2, 65, 7),
    (1, 1, 3, 64, 1),
    (1, 15, 2, 1, 65),
    (2, 10, 3, 7, 7),
    (1, 20, 1, 65, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape):
    _check_all(*_inputs(*shape, seed=sum(shape)))


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 13), (1, 1, 2, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_jacobians_none(shape):
    for dtype in (torch.float32, torch.float64):
        source, kp_s, _, kp_d, _, logits = _inputs(*shape, dtype=dtype, seed=5)
        _check_all(source, kp_s, None, kp_d, None, logits)
        # One of the two: the other keeps its full gradient path.
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, dtype=dtype, seed=6)
        _check_all(source, kp_s, jac_s, kp_d, None, logits)
        _check_all(source, kp_s, None, kp_d, jac_d, logits)


@pytest.mark.parametrize("shape", [(2, 3, 3, 9, 11), (1, 10, 2, 7, 65), (1, 1, 1, 1, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(shape):
    _check_all(*_inputs(*shape, dtype=torch.float64, seed=7))


@pytest.mark.parametrize("shape", [(2, 10, 3, 7, 65), (1, 15, 3, 64, 64), (1, 1, 2, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float16_matches_reference(shape):
    # Math in float32 and one rounding at the end: as accurate as PyTorch doing the same.
    _check_all(*_inputs(*shape, dtype=torch.float16, seed=8))
    # The dense forward of the reference itself runs in float16: the kernels are no less accurate than it.
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, dtype=torch.float16, seed=8)
    args = (logits, kp_s, jac_s, kp_d, jac_d)
    d, m = _triton_kernels(DENSE).forward(*args)
    truth, _, mags = motion_references("dense", args, None, with_grads=False)
    for name, got, t, ref, mag in zip(("deformation", "mask"), (d, m), truth, reference.dense_motion(*args), mags):
        assert_as_accurate(got, t, ref, magnitude=mag, name=name)


def test_keypoints_outside_the_image():
    for spread, seed in ((3.0, 9), (1.5, 10)):
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 10, 3, 9, 13, seed=seed, spread=spread)
        assert (kp_s.abs() > 1).any() and (kp_d.abs() > 1).any()
        _check_all(source, kp_s, jac_s, kp_d, jac_d, logits)
    # All source keypoints far out with identity Jacobians: every warped sample is zero padding.
    source, _, _, _, _, logits = _inputs(1, 4, 2, 8, 9, seed=11)
    kp_s = torch.full((1, 4, 2), 5.0)
    kp_d = torch.rand(1, 4, 2, generator=torch.Generator().manual_seed(12)) * 0.2 - 0.1
    out = _triton_kernels(SPARSE).forward(source, kp_s, None, kp_d, None, 0.01).view(1, 5, 3, 8, 9)
    assert (out[:, 1:, 1:] == 0).all() and (out[:, 1:, 0] > 0).any()


# Driving Jacobians whose |det| is 0 or below the floor (1e-6), and one just above it.
SINGULAR = {
    "rank1": [[0.5, 1.0], [0.25, 0.5]],
    "zero": [[0.0, 0.0], [0.0, 0.0]],
    "det-1e-9": [[-1e-3, 0.0], [0.0, 1e-6]],
    "det+1e-8": [[1e-4, 0.3], [0.0, 1e-4]],
    "det-2e-6": [[0.0, 2e-3], [1e-3, 0.0]],
}


@pytest.mark.parametrize("name", list(SINGULAR))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_driving_jacobians(name, dtype):
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 3, 2, 6, 7, dtype=dtype, seed=13)
    jac_d = jac_d.clone()
    jac_d[:, 1] = torch.tensor(SINGULAR[name], dtype=dtype)
    # A source Jacobian of the same scale keeps A = J_s inv(J_d) of order one, so the warp stays inside.
    jac_s = jac_s.clone()
    jac_s[:, 1] = torch.tensor(SINGULAR[name], dtype=dtype) + torch.tensor([[0.0, 0.0], [1e-3, 0.0]], dtype=dtype)
    _check_all(source, kp_s, jac_s, kp_d, jac_d, logits)
    # With identity source Jacobians the motion reaches the floored inverse itself (~1e6): still finite.
    _check_all(source, kp_s, None, kp_d, jac_d, logits)


def test_singular_driving_jacobian_float16_stays_finite():
    source, kp_s, _, kp_d, jac_d, logits = _inputs(2, 3, 2, 6, 7, dtype=torch.float16, seed=14)
    jac_d = jac_d.clone()
    jac_d[:, 1] = torch.tensor(SINGULAR["rank1"], dtype=torch.float16)
    sp, de = _triton_kernels(SPARSE), _triton_kernels(DENSE)
    out = sp.forward(source, kp_s, None, kp_d, jac_d, 0.01)
    d, m = de.forward(logits, kp_s, None, kp_d, jac_d)
    grads = de.backward(torch.ones_like(d), torch.ones_like(m), logits, kp_s, None, kp_d, jac_d, [True] * 5)
    grads += sp.backward(torch.ones_like(out), source, kp_s, None, kp_d, jac_d, 0.01, [True] * 5)
    for t in (out, d, m, *grads):
        assert torch.isfinite(t).all()
    # The ~1e6 motion saturates at the float16 maximum instead of becoming inf, as in the reference.
    assert d.abs().max() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("op", [SPARSE, DENSE])
def test_output_mask_subsets(op):
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 4, 2, 5, 9, seed=15)
    kern = _triton_kernels(op)
    keys = (kp_s, jac_s, kp_d, jac_d)
    if op == SPARSE:
        grad = _upstream((2, 15, 5, 9), torch.float32, 16)
        call = lambda m: kern.backward(grad, source, *keys, 0.01, m)  # noqa: E731
    else:
        gd, gm = _upstream((2, 5, 9, 2), torch.float32, 17), _upstream((2, 5, 5, 9), torch.float32, 18)
        call = lambda m: kern.backward(gd, gm, logits, *keys, m)  # noqa: E731
    full = call([True] * 5)
    for i in range(5):
        only = [j == i for j in range(5)]
        got = call(only)
        for j in range(5):
            if j == i:
                assert torch.equal(got[j], full[j]), (i, j)
            else:
                assert got[j].numel() == 0, (i, j)
    none = call([False] * 5)
    assert all(g.numel() == 0 for g in none)


def test_strided_inputs():
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 3, 3, 7, 11, seed=19)
    cl_source = source.contiguous(memory_format=torch.channels_last)
    cl_logits = logits.contiguous(memory_format=torch.channels_last)
    sp, de = _triton_kernels(SPARSE), _triton_kernels(DENSE)
    keys = (kp_s, jac_s, kp_d, jac_d)
    assert torch.equal(sp.forward(cl_source, *keys, 0.01), sp.forward(source, *keys, 0.01))
    grad = _upstream((2, 16, 7, 22), torch.float32, 20)[..., ::2]          # non-contiguous upstream
    got = sp.backward(grad, cl_source, *keys, 0.01, [True] * 5)
    assert_motion_accurate("sparse", (source, *keys), grad, [None, *got])
    d, m = de.forward(cl_logits, *keys)
    d2, m2 = de.forward(logits, *keys)
    assert torch.equal(d, d2) and torch.equal(m, m2)
    gd = _upstream((2, 2, 7, 11), torch.float32, 21).permute(0, 2, 3, 1)   # (B,H,W,2), strided
    gm = _upstream((2, 4, 11, 7), torch.float32, 22).transpose(2, 3)
    got = de.backward(gd, gm, cl_logits, *keys, [True] * 5)
    assert_motion_accurate("dense", (logits, *keys), (gd, gm), [None, None, *got])


def test_poisoned_outputs_are_fully_written(monkeypatch):
    from dagan_fast.ops.triton import motion as triton_motion

    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    assert torch.isnan(triton_motion._new_output((3,), torch.zeros(1))).all()     # the poison is real
    # Pixel counts that are not multiples of any block size, and one pixel.
    for shape in [(2, 3, 2, 5, 13), (1, 2, 3, 1, 1), (1, 5, 1, 31, 3)]:
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, seed=23)
        _check_all(source, kp_s, jac_s, kp_d, jac_d, logits)


def test_autograd_through_the_public_ops():
    # The registered kernels behind the custom ops and their autograd, against the reference backend.
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 4, 3, 9, 10, seed=24)

    def run(backend):
        ins = [t.clone().requires_grad_(True) for t in (source, kp_s, jac_s, kp_d, jac_d, logits)]
        out = sparse_motion_inputs(*ins[:5], 0.02, backend=backend)
        ins_d = [ins[5]] + [t.clone().detach().requires_grad_(True) for t in ins[1:5]]  # the two ops apart
        d, m = dense_motion(*ins_d, backend=backend)
        ups = [_upstream(t.shape, t.dtype, seed) for t, seed in ((out, 25), (d, 26), (m, 27))]
        ((out * ups[0]).sum() + (d * ups[1]).sum() + (m * ups[2]).sum()).backward()
        return [out, *[t.grad for t in ins[:5]]], [d, m, *[t.grad for t in ins_d]], ups

    sparse, dense, ups = run("triton")
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), ups[0], sparse, variance=0.02)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups[1:], dense)


def test_batch_zero():
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(0, 3, 2, 5, 6)
    sp, de = _triton_kernels(SPARSE), _triton_kernels(DENSE)
    assert sp.forward(source, kp_s, jac_s, kp_d, jac_d, 0.01).shape == (0, 12, 5, 6)
    grads = sp.backward(torch.zeros(0, 12, 5, 6), source, kp_s, jac_s, kp_d, jac_d, 0.01, [True] * 5)
    assert [g.shape for g in grads] == [t.shape for t in (source, kp_s, jac_s, kp_d, jac_d)]
    d, m = de.forward(logits, kp_s, jac_s, kp_d, jac_d)
    assert d.shape == (0, 5, 6, 2) and m.shape == (0, 4, 5, 6)
    grads = de.backward(d, m, logits, kp_s, jac_s, kp_d, jac_d, [True] * 5)
    assert [g.shape for g in grads] == [t.shape for t in (logits, kp_s, jac_s, kp_d, jac_d)]


def test_registered_with_the_triton_backend():
    from dagan_fast.ops.triton import motion as triton_motion

    sp, de = _triton_kernels(SPARSE), _triton_kernels(DENSE)
    assert (sp.forward, sp.backward) == (triton_motion.sparse_forward, triton_motion.sparse_backward)
    assert (de.forward, de.backward) == (triton_motion.dense_forward, triton_motion.dense_backward)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(dtype):
    for shape in [(2, 10, 3, 64, 64), (3, 15, 3, 65, 7), (1, 1, 1, 1, 1)]:
        ins = [t.cuda() if t is not None else None for t in _inputs(*shape, dtype=dtype, seed=28)]
        _check_all(*ins)  # against float64 on the device, PyTorch's same-precision error as the yardstick
