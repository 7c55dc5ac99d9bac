"""Triton kernels of sparse_motion_inputs and dense_motion (dagan_fast/ops/triton/motion.py) against the
reference backend: every output and every gradient, float32/float64/float16, awkward shapes, keypoints far
outside the image, singular driving Jacobians, None Jacobians, strided inputs and NaN-poisoned outputs.
Without a GPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations


import pytest
import torch

from dagan_fast import _backends
from dagan_fast.ops import dense_motion, reference, sparse_motion_inputs
from conftest import gpu, rel_err
from _inputs import make_inputs

SPARSE = "sparse_motion_inputs"
DENSE = "dense_motion"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


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


def _check_all(source, kp_s, jac_s, kp_d, jac_d, logits, tol, variance=0.01, oracle=None):
    """Every output and gradient of both ops from the triton kernels against ``oracle`` (the reference
    kernels, by default), all finite; returns nothing, asserts."""
    sp, de = _triton_kernels(SPARSE, source.device), _triton_kernels(DENSE, source.device)
    oracle = oracle or (reference.sparse_motion_inputs, reference.sparse_motion_inputs_backward,
                        reference.dense_motion, reference.dense_motion_backward)
    mask = [True] * 5
    keys = (kp_s, jac_s, kp_d, jac_d)
    out = sp.forward(source, *keys, variance)
    expected = oracle[0](source, *keys, variance)
    assert out.shape == expected.shape and out.dtype == source.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < tol, ("sparse forward", rel_err(out, expected))
    grad = _upstream(out.shape, source.dtype, 1)
    got = sp.backward(grad, source, *keys, variance, mask)
    want = oracle[1](grad, source, *keys, variance, mask)
    names = ["source", "kp_source", "jac_source", "kp_driving", "jac_driving"]
    for name, a, e in zip(names, got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype)
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) < tol, ("sparse backward", name, rel_err(a, e))
    d, m = de.forward(logits, *keys)
    d_exp, m_exp = oracle[2](logits, *keys)
    assert d.shape == d_exp.shape and m.shape == m_exp.shape and d.dtype == m.dtype == logits.dtype
    assert torch.isfinite(d).all() and torch.isfinite(m).all()
    assert rel_err(d, d_exp) < tol, ("deformation", rel_err(d, d_exp))
    assert rel_err(m, m_exp) < tol, ("mask", rel_err(m, m_exp))
    gd, gm = _upstream(d.shape, logits.dtype, 2), _upstream(m.shape, logits.dtype, 3)
    got = de.backward(gd, gm, logits, *keys, mask)
    want = oracle[3](gd, gm, logits, *keys, mask)
    names[0] = "mask_logits"
    for name, a, e in zip(names, got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype)
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) < tol, ("dense backward", name, rel_err(a, e))


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
    _check_all(*_inputs(*shape, seed=sum(shape)), TOL[torch.float32])


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 13), (1, 1, 2, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_jacobians_none(shape):
    for dtype in (torch.float32, torch.float64):
        source, kp_s, _, kp_d, _, logits = _inputs(*shape, dtype=dtype, seed=5)
        _check_all(source, kp_s, None, kp_d, None, logits, TOL[dtype])
        # One of the two: the other keeps its full gradient path.
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, dtype=dtype, seed=6)
        _check_all(source, kp_s, jac_s, kp_d, None, logits, TOL[dtype])
        _check_all(source, kp_s, None, kp_d, jac_d, logits, TOL[dtype])


@pytest.mark.parametrize("shape", [(2, 3, 3, 9, 11), (1, 10, 2, 7, 65), (1, 1, 1, 1, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(shape):
    _check_all(*_inputs(*shape, dtype=torch.float64, seed=7), TOL[torch.float64])


def _upcast_oracle():
    """The reference on float32 copies of float16 inputs, rounded to float16: the reference's own
    recipe for the sparse op and its backwards; for the dense forward (computed in float16 by the
    reference) this is the better-rounded answer the kernels aim at."""
    def up(args):
        return [a.float() if isinstance(a, torch.Tensor) else a for a in args]

    def down(outs, dtype):
        return reference._to_finite(outs, dtype) if isinstance(outs, torch.Tensor) else \
            type(outs)(reference._to_finite(o, dtype) if o.numel() else o.to(dtype) for o in outs)

    def wrap(fn):
        return lambda *args: down(fn(*up(args)), args[0].dtype)

    return tuple(wrap(f) for f in (reference.sparse_motion_inputs, reference.sparse_motion_inputs_backward,
                                   reference.dense_motion, reference.dense_motion_backward))


@pytest.mark.parametrize("shape", [(2, 10, 3, 7, 65), (1, 15, 3, 64, 64), (1, 1, 2, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float16_matches_reference(shape):
    # Math in float32 and one rounding at the end, as in the reference: within a float16 ulp or two
    # of the largest value (the float32 oracle's last bits can round the other way).
    _check_all(*_inputs(*shape, dtype=torch.float16, seed=8), 2e-3, oracle=_upcast_oracle())
    # The dense forward of the reference itself runs in float16: within float16 noise of it too.
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, dtype=torch.float16, seed=8)
    d, m = _triton_kernels(DENSE).forward(logits, kp_s, jac_s, kp_d, jac_d)
    d_ref, m_ref = reference.dense_motion(logits, kp_s, jac_s, kp_d, jac_d)
    assert rel_err(d, d_ref) < 1e-2 and rel_err(m, m_ref) < 1e-2


def test_keypoints_outside_the_image():
    for spread, seed in ((3.0, 9), (1.5, 10)):
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 10, 3, 9, 13, seed=seed, spread=spread)
        assert (kp_s.abs() > 1).any() and (kp_d.abs() > 1).any()
        _check_all(source, kp_s, jac_s, kp_d, jac_d, logits, TOL[torch.float32])
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
    _check_all(source, kp_s, jac_s, kp_d, jac_d, logits, TOL[dtype])
    # With identity source Jacobians the motion reaches the floored inverse itself (~1e6): still finite.
    _check_all(source, kp_s, None, kp_d, jac_d, logits, TOL[dtype])


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
    want = reference.sparse_motion_inputs_backward(grad, source, *keys, 0.01, [True] * 5)
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-5
    d, m = de.forward(cl_logits, *keys)
    d2, m2 = de.forward(logits, *keys)
    assert torch.equal(d, d2) and torch.equal(m, m2)
    gd = _upstream((2, 2, 7, 11), torch.float32, 21).permute(0, 2, 3, 1)   # (B,H,W,2), strided
    gm = _upstream((2, 4, 11, 7), torch.float32, 22).transpose(2, 3)
    got = de.backward(gd, gm, cl_logits, *keys, [True] * 5)
    want = reference.dense_motion_backward(gd, gm, logits, *keys, [True] * 5)
    for a, e in zip(got, want):
        assert rel_err(a, e) < 1e-5


def test_poisoned_outputs_are_fully_written(monkeypatch):
    from dagan_fast.ops.triton import motion as triton_motion

    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    assert torch.isnan(triton_motion._new_output((3,), torch.zeros(1))).all()     # the poison is real
    # Pixel counts that are not multiples of any block size, and one pixel.
    for shape in [(2, 3, 2, 5, 13), (1, 2, 3, 1, 1), (1, 5, 1, 31, 3)]:
        source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(*shape, seed=23)
        _check_all(source, kp_s, jac_s, kp_d, jac_d, logits, TOL[torch.float32])


def test_autograd_through_the_public_ops():
    # The registered kernels behind the custom ops and their autograd, against the reference backend.
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs(2, 4, 3, 9, 10, seed=24)

    def run(backend):
        ins = [t.clone().requires_grad_(True) for t in (source, kp_s, jac_s, kp_d, jac_d, logits)]
        out = sparse_motion_inputs(*ins[:5], 0.02, backend=backend)
        d, m = dense_motion(ins[5], *ins[1:5], backend=backend)
        loss = (out * _upstream(out.shape, out.dtype, 25)).sum() + (d * _upstream(d.shape, d.dtype, 26)).sum() \
            + (m * _upstream(m.shape, m.dtype, 27)).sum()
        loss.backward()
        return [out, d, m] + [t.grad for t in ins]

    for a, e in zip(run("triton"), run("reference")):
        assert torch.isfinite(a).all() and rel_err(a, e) < 1e-5


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
    tol = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for shape in [(2, 10, 3, 64, 64), (3, 15, 3, 65, 7), (1, 1, 1, 1, 1)]:
        ins = [t.cuda() if t is not None else None for t in _inputs(*shape, dtype=dtype, seed=28)]
        oracle = _upcast_oracle() if dtype != torch.float32 else None
        _check_all(*ins, tol, oracle=oracle)
