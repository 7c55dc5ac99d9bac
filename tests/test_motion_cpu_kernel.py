"""The C++ CPU kernels of sparse_motion_inputs and dense_motion (csrc/cpu/motion.cpp, math shared with
CUDA through csrc/common/motion_math.h): against the reference backend and the official DaGAN/FOMM
formulation, forward and backward, float64 gradcheck, half types, awkward keypoints and Jacobians,
poisoned outputs, bitwise reproducibility (also across thread counts) and bad shapes through
torch.ops.dagan_fast.* directly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dagan_fast.ops import available_backends, dense_motion, reference, sparse_motion_inputs
from _tolerance import DEFAULT_ULPS, assert_motion_accurate

_info = available_backends()["cpu"]
pytestmark = pytest.mark.skipif(
    not (_info.available and "sparse_motion_inputs" in _info.ops and "dense_motion" in _info.ops),
    reason=f"the C++ CPU motion kernels are not built here: {_info.detail}")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    monkeypatch.delenv("DAGAN_FAST_BACKEND", raising=False)


def jacobians(B, K, g, scale=(0.6, 1.5)):
    """Well-conditioned (B,K,2,2) rotation-scale-rotation products with determinants of both signs."""
    t, u = (torch.rand(B, K, generator=g, dtype=torch.float64) * 2 * math.pi for _ in range(2))
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(B, K, 2, generator=g, dtype=torch.float64)
    s[..., 1] *= torch.where(torch.rand(B, K, generator=g, dtype=torch.float64) < 0.3, -1.0, 1.0)

    def rot(a):
        return torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)

    return rot(t) @ torch.diag_embed(s) @ rot(u)


def inputs(B, K, C, H, W, dtype=torch.float32, seed=0, spread=1.0, jac=True):
    """(source (B,C,H,W), kp_s, jac_s, kp_d, jac_d, mask_logits (B,K+1,H,W)), random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    kp_s = (torch.rand(B, K, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread
    kp_d = (torch.rand(B, K, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread
    jac_s = jacobians(B, K, g) if jac else None
    jac_d = jacobians(B, K, g) if jac else None
    logits = 2 * torch.randn(B, K + 1, H, W, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return tuple(cast(t) for t in (source, kp_s, jac_s, kp_d, jac_d, logits))


# -------------------------------------------------- the official DaGAN/FOMM formulation, written out
def official_motions(B, H, W, kp_s, jac_s, kp_d, jac_d):
    """(B,K+1,H,W,2) create_sparse_motions: per-pixel repeated Jacobians, torch.inverse."""
    K = kp_s.shape[1]
    grid = reference.make_coordinate_grid(H, W, kp_s.dtype).view(1, 1, H, W, 2)
    coords = grid - kp_d.view(B, K, 1, 1, 2)
    if jac_s is not None or jac_d is not None:
        eye = torch.eye(2, dtype=kp_s.dtype).expand(B, K, 2, 2)
        jac = torch.matmul(jac_s if jac_s is not None else eye, torch.inverse(jac_d) if jac_d is not None else eye)
        jac = jac.unsqueeze(-3).unsqueeze(-3).repeat(1, 1, H, W, 1, 1)
        coords = torch.matmul(jac, coords.unsqueeze(-1)).squeeze(-1)
    return torch.cat([grid.repeat(B, 1, 1, 1, 1), coords + kp_s.view(B, K, 1, 1, 2)], 1)


def official_sparse(source, kp_s, jac_s, kp_d, jac_d, variance=0.01):
    B, C, H, W = source.shape
    K = kp_s.shape[1]
    grid = reference.make_coordinate_grid(H, W, source.dtype).view(1, 1, H, W, 2)

    def gaussian(kp):
        return torch.exp(-0.5 * ((grid - kp.view(B, K, 1, 1, 2)) ** 2).sum(-1) / variance)

    heat = torch.cat([torch.zeros(B, 1, H, W, dtype=source.dtype), gaussian(kp_d) - gaussian(kp_s)], 1)
    motions = official_motions(B, H, W, kp_s, jac_s, kp_d, jac_d)
    rep = source.unsqueeze(1).repeat(1, K + 1, 1, 1, 1).view(B * (K + 1), C, H, W)
    warped = F.grid_sample(rep, motions.view(B * (K + 1), H, W, 2), align_corners=False).view(B, K + 1, C, H, W)
    return torch.cat([heat.unsqueeze(2), warped], 2).view(B, -1, H, W)


def official_dense(logits, kp_s, jac_s, kp_d, jac_d):
    B, _, H, W = logits.shape
    mask = F.softmax(logits, dim=1)
    motions = official_motions(B, H, W, kp_s, jac_s, kp_d, jac_d)
    return (motions * mask.unsqueeze(-1)).sum(1), mask


# ------------------------------------------------------------------------------------ helpers
def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def grads_of(outputs, ins, upstream):
    present = [t for t in ins if t is not None]
    got = torch.autograd.grad(outputs, present, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(present, got)]


def run_sparse(fn, args, up):
    ins = leaves(args)
    out = fn(*ins)
    return out, grads_of(out, ins, up)


def run_dense(fn, args, ups):
    ins = leaves(args)
    d, m = fn(*ins)
    return (d, m), grads_of((d, m), ins, ups)


SHAPES = [  # B, K, C, H, W: every K in {1,10,15,20} and every H, W in {1,7,64,65}
    (2, 1, 3, 1, 1), (2, 10, 3, 7, 65), (1, 15, 3, 64, 64), (2, 20, 3, 65, 7), (1, 1, 3, 64, 1),
    (1, 15, 3, 1, 65), (3, 10, 2, 7, 7), (1, 20, 3, 65, 65),
]


# ------------------------------------------------------------ 1. against the reference, float32
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("jac", [True, False])
def test_sparse_matches_reference_and_official_float32(shape, jac):
    B, K, C, H, W = shape
    args = inputs(*shape, seed=1, jac=jac)[:5]
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=torch.Generator().manual_seed(2))
    out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, backend="cpu"), args, up)
    assert out.shape == (B, (K + 1) * (C + 1), H, W) and out.dtype == torch.float32
    # float32 warps at 64-65 px: a 1-ulp motion difference moves a sample by ~W/2 ulps, PyTorch's too
    assert_motion_accurate("sparse", args, up, [out, *grads], truth_fns=(None, official_sparse))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("jac", [True, False])
def test_dense_matches_reference_and_official_float32(shape, jac):
    B, K, C, H, W = shape
    args = (inputs(*shape, seed=3, jac=jac)[5],) + inputs(*shape, seed=3, jac=jac)[1:5]
    g = torch.Generator().manual_seed(4)
    ups = (torch.randn(B, H, W, 2, generator=g), torch.randn(B, K + 1, H, W, generator=g))
    (d, m), grads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), args, ups)
    assert_motion_accurate("dense", args, ups, [d, m, *grads], truth_fns=(None, official_dense))


# C = 5 and 7 cross the kernel's 4-channel vector groups; C = 0 leaves only the heatmaps
@pytest.mark.parametrize("shape", [(2, 3, 2, 5, 6), (1, 10, 3, 7, 65), (2, 1, 1, 1, 1), (1, 4, 5, 9, 11),
                                   (2, 3, 7, 6, 5), (1, 2, 0, 5, 5)])
@pytest.mark.parametrize("jac", [True, False])
def test_float64_matches_reference_tightly(shape, jac):
    B, K, C, H, W = shape
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(*shape, dtype=torch.float64, seed=5, spread=1.3, jac=jac)
    g = torch.Generator().manual_seed(6)
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g, dtype=torch.float64)
    out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, 0.05, backend="cpu"), (src, kp_s, jac_s, kp_d, jac_d), up)
    # float64 throughout: the truth and the same-precision run coincide, so the floor alone bounds the error, and
    # it must carry the conditioning the same-precision run would otherwise measure: the pixel coordinate
    # ((x + 1) W - 1) / 2 rounds by eps (1 + max(H, W)), moving a bilinear sample by as many roundings of |source|
    ulps = DEFAULT_ULPS * (1 + max(H, W))
    assert_motion_accurate("sparse", (src, kp_s, jac_s, kp_d, jac_d), up, [out, *grads], variance=0.05, ulps=ulps)
    ups = (torch.randn(B, H, W, 2, generator=g, dtype=torch.float64),
           torch.randn(B, K + 1, H, W, generator=g, dtype=torch.float64))
    (d, m), grads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), (logits, kp_s, jac_s, kp_d, jac_d), ups)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [d, m, *grads], ulps=ulps)


# ----------------------------------------------------------------------------- 2. half types
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 10, 3, 7, 65), (1, 15, 3, 64, 64)])
def test_half_types_match_reference(dtype, shape):
    # The kernel computes in float32 and rounds once: as accurate as PyTorch doing the same.
    B, K, C, H, W = shape
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(*shape, dtype=dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g).to(dtype)
    out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, backend="cpu"), (src, kp_s, jac_s, kp_d, jac_d), up)
    assert out.dtype == dtype and all(a.dtype == dtype for a in grads)
    assert_motion_accurate("sparse", (src, kp_s, jac_s, kp_d, jac_d), up, [out, *grads])
    ups = (torch.randn(B, H, W, 2, generator=g).to(dtype), torch.randn(B, K + 1, H, W, generator=g).to(dtype))
    (d, m), grads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), (logits, kp_s, jac_s, kp_d, jac_d), ups)
    assert d.dtype == m.dtype == dtype and all(a.dtype == dtype for a in grads)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [d, m, *grads])


# --------------------------------------------------------------------------------- 3. gradcheck
@pytest.mark.parametrize("jac", [True, False])
def test_gradcheck_float64(jac):
    src, kp_s, jac_s, kp_d, jac_d, logits = leaves(inputs(1, 2, 2, 4, 5, dtype=torch.float64, seed=9, spread=1.2,
                                                         jac=jac))
    keys = [t for t in (kp_s, jac_s, kp_d, jac_d)]

    def unpack(args):
        it = iter(args)
        first, ks = next(it), next(it)
        js = next(it) if jac else None
        kd = next(it)
        jd = next(it) if jac else None
        return first, ks, js, kd, jd

    present = [t for t in [src] + keys if t is not None]
    assert torch.autograd.gradcheck(lambda *a: sparse_motion_inputs(*unpack(a), 0.2, backend="cpu"), present,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    present = [t for t in [logits] + keys if t is not None]
    assert torch.autograd.gradcheck(lambda *a: dense_motion(*unpack(a), backend="cpu"), present,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------- 4. awkward inputs
def test_keypoints_outside_the_image():
    B, K, C, H, W = 2, 5, 3, 9, 11
    src, _, jac_s, _, jac_d, logits = inputs(B, K, C, H, W, seed=10)
    g = torch.Generator().manual_seed(11)
    kp_s = (torch.rand(B, K, 2, generator=g) * 2 - 1) * 4
    kp_d = (torch.rand(B, K, 2, generator=g) * 2 - 1) * 4
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g)
    out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, backend="cpu"), (src, kp_s, jac_s, kp_d, jac_d), up)
    assert_motion_accurate("sparse", (src, kp_s, jac_s, kp_d, jac_d), up, [out, *grads], truth_fns=(official_sparse,))
    ups = (torch.randn(B, H, W, 2, generator=g), torch.randn(B, K + 1, H, W, generator=g))
    (d, m), grads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), (logits, kp_s, jac_s, kp_d, jac_d), ups)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [d, m, *grads],
                           truth_fns=(official_dense,))


SINGULAR = [
    [[0.0, 0.0], [0.0, 0.0]],        # det 0 (counts as positive)
    [[1.0, 2.0], [2.0, 4.0]],        # rank 1
    [[1e-3, 0.0], [0.0, 1e-6]],      # det +1e-9
    [[-1e-3, 0.0], [0.0, 1e-6]],     # det -1e-9
    [[0.0, 1e-4], [1e-5, 0.0]],      # det -1e-9, off-diagonal
    [[1.0, 0.0], [0.0, 2e-6]],       # det 2e-6: just above the floor, not floored
]


@pytest.mark.parametrize("jd", SINGULAR)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("with_jac_s", [True, False])
def test_singular_driving_jacobians(jd, dtype, with_jac_s):
    B, K, C, H, W = 2, 3, 2, 6, 7
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(B, K, C, H, W, dtype=dtype, seed=12)
    jac_d = jac_d.clone()
    jac_d[:, 1] = torch.tensor(jd, dtype=dtype)
    jac_s = jac_s if with_jac_s else None
    g = torch.Generator().manual_seed(13)
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g).to(dtype)
    ups = (torch.randn(B, H, W, 2, generator=g).to(dtype), torch.randn(B, K + 1, H, W, generator=g).to(dtype))
    out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, backend="cpu"), (src, kp_s, jac_s, kp_d, jac_d), up)
    (d, m), dgrads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), (logits, kp_s, jac_s, kp_d, jac_d), ups)
    for t in [out, d, m, *grads, *dgrads]:
        assert torch.isfinite(t).all()
    if dtype == torch.float16:
        return  # the float16 reference itself rounds ~1e6-sized motions differently: finiteness is the point
    # float64: the truth is the same-precision run, the floor carries the coordinate rounding (see above)
    ulps = DEFAULT_ULPS * (1 + max(H, W)) if dtype == torch.float64 else DEFAULT_ULPS
    assert_motion_accurate("sparse", (src, kp_s, jac_s, kp_d, jac_d), up, [out, *grads], ulps=ulps)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [d, m, *dgrads], ulps=ulps)


# ---------------------------------------------------------- 5. poisoned outputs, direct op calls
MASKS = [[True] * 5, [True, False, False, False, False], [False, True, False, False, False],
         [False, False, True, False, True], [False, False, False, True, False], [False] * 5]


@pytest.mark.parametrize("jac", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_poisoned_outputs_are_fully_written(jac, dtype):
    B, K, C, H, W = 2, 4, 3, 13, 11
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(B, K, C, H, W, dtype=dtype, seed=14, jac=jac)
    ops = torch.ops.dagan_fast
    out = ops.sparse_motion_inputs_fwd(src, kp_s, jac_s, kp_d, jac_d, 0.01)
    assert out.shape == (B, (K + 1) * (C + 1), H, W) and out.is_contiguous() and torch.isfinite(out).all()
    d, m = ops.dense_motion_fwd(logits, kp_s, jac_s, kp_d, jac_d)
    assert torch.isfinite(d).all() and torch.isfinite(m).all()
    grad = torch.randn(out.shape).to(dtype)
    gd, gm = torch.randn(d.shape).to(dtype), torch.randn(m.shape).to(dtype)
    present = [True, True, jac, True, jac]
    for mask in MASKS:
        sparse = ops.sparse_motion_inputs_bwd(grad, src, kp_s, jac_s, kp_d, jac_d, 0.01, mask)
        dense = ops.dense_motion_bwd(gd, gm, logits, kp_s, jac_s, kp_d, jac_d, mask)
        for grads, likes in ((sparse, (src, kp_s, jac_s, kp_d, jac_d)), (dense, (logits, kp_s, jac_s, kp_d, jac_d))):
            assert len({t.data_ptr() for t in grads if t.numel() > 0}) == sum(t.numel() > 0 for t in grads)
            for want, here, g, like in zip(mask, present, grads, likes):
                if want and here:
                    assert g.shape == like.shape and torch.isfinite(g).all()
                else:
                    assert g.numel() == 0


def test_batch_zero_and_channel_zero():
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(0, 3, 2, 5, 6, seed=15)
    ops = torch.ops.dagan_fast
    assert ops.sparse_motion_inputs_fwd(src, kp_s, jac_s, kp_d, jac_d, 0.01).shape == (0, 12, 5, 6)
    grads = ops.sparse_motion_inputs_bwd(torch.zeros(0, 12, 5, 6), src, kp_s, jac_s, kp_d, jac_d, 0.01, [True] * 5)
    assert [g.shape for g in grads] == [src.shape, kp_s.shape, jac_s.shape, kp_d.shape, jac_d.shape]
    # C = 0: only the heatmaps.
    src, kp_s, jac_s, kp_d, jac_d, _ = inputs(2, 3, 0, 5, 6, seed=16)
    out = ops.sparse_motion_inputs_fwd(src, kp_s, jac_s, kp_d, jac_d, 0.01)
    assert out.shape == (2, 4, 5, 6)
    assert_motion_accurate("sparse", (src, kp_s, jac_s, kp_d, jac_d), torch.zeros_like(out),
                           [out, None, None, None, None, None])


# --------------------------------------------------------------------------- 6. reproducibility
def test_two_runs_bitwise_equal_across_thread_counts():
    B, K, C, H, W = 3, 7, 3, 23, 19
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(B, K, C, H, W, seed=17)
    g = torch.Generator().manual_seed(18)
    up = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g)
    ups = (torch.randn(B, H, W, 2, generator=g), torch.randn(B, K + 1, H, W, generator=g))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            out, grads = run_sparse(lambda *a: sparse_motion_inputs(*a, backend="cpu"), (src, kp_s, jac_s, kp_d, jac_d),
                                    up)
            (d, m), dgrads = run_dense(lambda *a: dense_motion(*a, backend="cpu"), (logits, kp_s, jac_s, kp_d, jac_d),
                                       ups)
            runs.append([out, d, m, *grads, *dgrads])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.isfinite(a).all() and torch.equal(a, b)


# ------------------------------------------------------------------ 7. bad shapes, direct op calls
def _good():
    src, kp_s, jac_s, kp_d, jac_d, logits = inputs(2, 3, 2, 5, 6, seed=19)
    return dict(source=src, kp_source=kp_s, jac_source=jac_s, kp_driving=kp_d, jac_driving=jac_d,
                mask_logits=logits, grad=torch.randn(2, 12, 5, 6), grad_deformation=torch.randn(2, 5, 6, 2),
                grad_mask=torch.randn(2, 4, 5, 6))


BAD = [
    ("source", lambda a: a["source"][0]),
    ("source", lambda a: a["source"][:, :, :0]),
    ("source", lambda a: a["source"][:1]),
    ("kp_source", lambda a: a["kp_source"][0]),
    ("kp_source", lambda a: a["kp_source"][..., :1]),
    ("kp_source", lambda a: a["kp_source"][:, :0]),
    ("kp_driving", lambda a: a["kp_driving"][:, :2]),
    ("kp_driving", lambda a: a["kp_driving"].double()),
    ("jac_source", lambda a: a["jac_source"][:, :2]),
    ("jac_source", lambda a: a["jac_source"][..., :1]),
    ("jac_driving", lambda a: a["jac_driving"][:1]),
    ("jac_driving", lambda a: a["jac_driving"].reshape(2, 3, 4)),
    ("mask_logits", lambda a: a["mask_logits"][:, :3]),
    ("mask_logits", lambda a: a["mask_logits"][:, :, :, :0]),
    ("mask_logits", lambda a: a["mask_logits"].long()),
    ("grad", lambda a: a["grad"][:, :11]),
    ("grad", lambda a: a["grad"][..., :5]),
    ("grad_deformation", lambda a: a["grad_deformation"][..., :1]),
    ("grad_mask", lambda a: a["grad_mask"][:, :3]),
    ("grad_mask", lambda a: a["grad_mask"].double()),
]


@pytest.mark.parametrize("arg, make", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_shapes_through_torch_ops_raise(arg, make):
    a = _good()
    a[arg] = make(a)
    ops = torch.ops.dagan_fast
    kp = (a["kp_source"], a["jac_source"], a["kp_driving"], a["jac_driving"])
    calls = []
    if arg not in ("mask_logits", "grad_deformation", "grad_mask"):
        calls.append(lambda: ops.sparse_motion_inputs_bwd(a["grad"], a["source"], *kp, 0.01, [True] * 5))
        if arg != "grad":
            calls.append(lambda: ops.sparse_motion_inputs_fwd(a["source"], *kp, 0.01))
    if arg not in ("source", "grad"):
        calls.append(lambda: ops.dense_motion_bwd(a["grad_deformation"], a["grad_mask"], a["mask_logits"], *kp,
                                                  [True] * 5))
        if arg not in ("grad_deformation", "grad_mask"):
            calls.append(lambda: ops.dense_motion_fwd(a["mask_logits"], *kp))
    assert calls
    for call in calls:
        with pytest.raises(RuntimeError):
            call()


@pytest.mark.parametrize("variance", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_variance_through_torch_ops_raises(variance):
    a = _good()
    with pytest.raises(RuntimeError, match="variance"):
        torch.ops.dagan_fast.sparse_motion_inputs_fwd(a["source"], a["kp_source"], a["jac_source"], a["kp_driving"],
                                                      a["jac_driving"], variance)
