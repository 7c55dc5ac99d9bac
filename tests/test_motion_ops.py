"""sparse_motion_inputs and dense_motion: every backend that has them against a plain Python-loop oracle
and against the official DaGAN/FOMM formulation (torch.inverse, materialised sparse motions, one
grid_sample), forward and backward, plus gradcheck, opcheck, awkward inputs and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dagan_fast
from dagan_fast.ops import _backends
from dagan_fast.ops import BackendError, available_backends, dense_motion, reference, sparse_motion_inputs
from conftest import backends_for, rel_err
from _tolerance import DEFAULT_ULPS, assert_motion_accurate
from _inputs import make_inputs

SPARSE = "sparse_motion_inputs"
DENSE = "dense_motion"
FLOOR = reference.JACOBIAN_DET_FLOOR


SPARSE_BACKENDS = backends_for(SPARSE)
DENSE_BACKENDS = backends_for(DENSE)
# gradcheck/opcheck cost hundreds of interpreter launches: triton gradients are compared with the
# reference in tests/test_motion_triton.py instead
SPARSE_GRADCHECK_BACKENDS = [b for b in SPARSE_BACKENDS if b != "triton"]
DENSE_GRADCHECK_BACKENDS = [b for b in DENSE_BACKENDS if b != "triton"]


@pytest.fixture(autouse=True)
def _poison_and_check_values(monkeypatch):
    # Compiled kernels fill fresh outputs with NaN first (the isfinite checks then catch unwritten
    # elements); value checks must be on for the NaN-input tests.
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    monkeypatch.delenv("DAGAN_FAST_BACKEND", raising=False)
    monkeypatch.delenv("DAGAN_FAST_CHECK_VALUES", raising=False)


# ------------------------------------------------------------------------------------- inputs
# ------------------------------------------------------------------- official-style formulation
def official_grid(h, w, dtype):
    """make_coordinate_grid of FOMM/DaGAN; a size-1 axis gets coordinate 0 (the official 0/0 is NaN)."""
    x = torch.arange(w, dtype=dtype)
    y = torch.arange(h, dtype=dtype)
    x = 2 * (x / (w - 1)) - 1 if w > 1 else torch.zeros_like(x)
    y = 2 * (y / (h - 1)) - 1 if h > 1 else torch.zeros_like(y)
    yy = y.view(-1, 1).repeat(1, w)
    xx = x.view(1, -1).repeat(h, 1)
    return torch.cat([xx.unsqueeze(2), yy.unsqueeze(2)], 2)


def kp2gaussian(mean, spatial_size, kp_variance):
    coordinate_grid = official_grid(*spatial_size, mean.dtype)
    lead = len(mean.shape) - 1
    coordinate_grid = coordinate_grid.view(*((1,) * lead + coordinate_grid.shape))
    coordinate_grid = coordinate_grid.repeat(*(mean.shape[:lead] + (1, 1, 1)))
    mean = mean.view(*(mean.shape[:lead] + (1, 1, 2)))
    mean_sub = coordinate_grid - mean
    return torch.exp(-0.5 * (mean_sub ** 2).sum(-1) / kp_variance)


def official_sparse_motions(B, H, W, kp_s, jac_s, kp_d, jac_d, inverse=torch.inverse):
    """(B,K+1,H,W,2) as DenseMotionNetwork.create_sparse_motions; None Jacobians are the identity."""
    K = kp_s.shape[1]
    identity_grid = official_grid(H, W, kp_s.dtype).view(1, 1, H, W, 2)
    coordinate_grid = identity_grid - kp_d.view(B, K, 1, 1, 2)
    if jac_s is not None or jac_d is not None:
        eye = torch.eye(2, dtype=kp_s.dtype).expand(B, K, 2, 2)
        js = jac_s if jac_s is not None else eye
        inv_d = inverse(jac_d) if jac_d is not None else eye
        jacobian = torch.matmul(js, inv_d)
        jacobian = jacobian.unsqueeze(-3).unsqueeze(-3).repeat(1, 1, H, W, 1, 1)
        coordinate_grid = torch.matmul(jacobian, coordinate_grid.unsqueeze(-1)).squeeze(-1)
    driving_to_source = coordinate_grid + kp_s.view(B, K, 1, 1, 2)
    identity_grid = identity_grid.repeat(B, 1, 1, 1, 1)
    return torch.cat([identity_grid, driving_to_source], dim=1)


def official_sparse_inputs(source, kp_s, jac_s, kp_d, jac_d, variance=0.01, inverse=torch.inverse):
    B, C, H, W = source.shape
    K = kp_s.shape[1]
    heatmap = kp2gaussian(kp_d, (H, W), variance) - kp2gaussian(kp_s, (H, W), variance)
    zeros = torch.zeros(B, 1, H, W, dtype=heatmap.dtype)
    heatmap = torch.cat([zeros, heatmap], dim=1).unsqueeze(2)
    sparse_motion = official_sparse_motions(B, H, W, kp_s, jac_s, kp_d, jac_d, inverse)
    source_repeat = source.unsqueeze(1).unsqueeze(1).repeat(1, K + 1, 1, 1, 1, 1).view(B * (K + 1), -1, H, W)
    deformed = F.grid_sample(source_repeat, sparse_motion.view(B * (K + 1), H, W, -1), mode="bilinear",
                             padding_mode="zeros", align_corners=False).view(B, K + 1, -1, H, W)
    return torch.cat([heatmap, deformed], dim=2).view(B, -1, H, W)


def official_dense(mask_logits, kp_s, jac_s, kp_d, jac_d, inverse=torch.inverse):
    B, _, H, W = mask_logits.shape
    sparse_motion = official_sparse_motions(B, H, W, kp_s, jac_s, kp_d, jac_d, inverse)
    mask = F.softmax(mask_logits, dim=1)
    deformation = (sparse_motion.permute(0, 1, 4, 2, 3) * mask.unsqueeze(2)).sum(dim=1).permute(0, 2, 3, 1)
    return deformation, mask


def floored_inverse(jac):
    """The documented floor by hand: |det| < FLOOR is inverted as if |det| were FLOOR, sign kept, 0
    positive; torch.where makes the det path's gradient zero where floored."""
    a, b, c, d = jac[..., 0, 0], jac[..., 0, 1], jac[..., 1, 0], jac[..., 1, 1]
    det = a * d - b * c
    floored = torch.where(det < 0, -FLOOR * torch.ones_like(det), FLOOR * torch.ones_like(det))
    det = torch.where(det.abs() < FLOOR, floored, det)
    adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    return adj / det[..., None, None]


# ---------------------------------------------------------------------------- Python-loop oracle
def loop_inverse(m):
    (a, b), (c, d) = m
    det = a * d - b * c
    if abs(det) < FLOOR:
        det = -FLOOR if det < 0 else FLOOR
    return [[d / det, -b / det], [-c / det, a / det]]


def loop_coord(n, i):
    return 0.0 if n == 1 else 2.0 * i / (n - 1) - 1.0


def loop_transforms(b, K, kp_s, jac_s, kp_d, jac_d):
    """Per keypoint k = 1..K: (A, t) with T_k(z) = A z + t, from nested lists."""
    eye = [[1.0, 0.0], [0.0, 1.0]]
    out = []
    for k in range(K):
        js = jac_s[b][k] if jac_s is not None else eye
        inv = loop_inverse(jac_d[b][k]) if jac_d is not None else eye
        A = [[sum(js[i][m] * inv[m][j] for m in range(2)) for j in range(2)] for i in range(2)]
        out.append((A, kp_s[b][k], kp_d[b][k]))
    return out


def loop_apply(transform, x, y):
    A, s, d = transform
    dx, dy = x - d[0], y - d[1]
    return s[0] + A[0][0] * dx + A[0][1] * dy, s[1] + A[1][0] * dx + A[1][1] * dy


def loop_bilinear(img, x, y, H, W):
    """grid_sample(bilinear, zeros, align_corners=False) at one point of a [C][H][W] list."""
    ix = ((x + 1) * W - 1) / 2
    iy = ((y + 1) * H - 1) / 2
    x0, y0 = math.floor(ix), math.floor(iy)
    tx, ty = ix - x0, iy - y0
    out = []
    for plane in img:
        acc = 0.0
        for xi, yi, w in ((x0, y0, (1 - tx) * (1 - ty)), (x0 + 1, y0, tx * (1 - ty)),
                          (x0, y0 + 1, (1 - tx) * ty), (x0 + 1, y0 + 1, tx * ty)):
            if 0 <= xi < W and 0 <= yi < H:
                acc += w * plane[yi][xi]
        out.append(acc)
    return out


def loop_sparse_inputs(source, kp_s, jac_s, kp_d, jac_d, variance):
    B, C, H, W = source.shape
    K = kp_s.shape[1]
    src, ks, kd = source.tolist(), kp_s.tolist(), kp_d.tolist()
    js = jac_s.tolist() if jac_s is not None else None
    jd = jac_d.tolist() if jac_d is not None else None
    out = torch.empty(B, (K + 1) * (C + 1), H, W, dtype=torch.float64)
    for b in range(B):
        transforms = loop_transforms(b, K, ks, js, kd, jd)
        for k in range(K + 1):
            for i in range(H):
                for j in range(W):
                    x, y = loop_coord(W, j), loop_coord(H, i)
                    if k == 0:
                        heat, (sx, sy) = 0.0, (x, y)
                    else:
                        gd = math.exp(-0.5 * ((x - kd[b][k - 1][0]) ** 2 + (y - kd[b][k - 1][1]) ** 2) / variance)
                        gs = math.exp(-0.5 * ((x - ks[b][k - 1][0]) ** 2 + (y - ks[b][k - 1][1]) ** 2) / variance)
                        heat = gd - gs
                        sx, sy = loop_apply(transforms[k - 1], x, y)
                    out[b, k * (C + 1), i, j] = heat
                    for c, v in enumerate(loop_bilinear(src[b], sx, sy, H, W)):
                        out[b, k * (C + 1) + 1 + c, i, j] = v
    return out


def loop_dense(mask_logits, kp_s, jac_s, kp_d, jac_d):
    B, K1, H, W = mask_logits.shape
    K = K1 - 1
    ml, ks, kd = mask_logits.tolist(), kp_s.tolist(), kp_d.tolist()
    js = jac_s.tolist() if jac_s is not None else None
    jd = jac_d.tolist() if jac_d is not None else None
    deformation = torch.empty(B, H, W, 2, dtype=torch.float64)
    mask = torch.empty(B, K1, H, W, dtype=torch.float64)
    for b in range(B):
        transforms = loop_transforms(b, K, ks, js, kd, jd)
        for i in range(H):
            for j in range(W):
                x, y = loop_coord(W, j), loop_coord(H, i)
                logits = [ml[b][k][i][j] for k in range(K1)]
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                total = sum(e)
                dx = dy = 0.0
                for k in range(K1):
                    m = e[k] / total
                    mask[b, k, i, j] = m
                    tx, ty = (x, y) if k == 0 else loop_apply(transforms[k - 1], x, y)
                    dx += m * tx
                    dy += m * ty
                deformation[b, i, j, 0] = dx
                deformation[b, i, j, 1] = dy
    return deformation, mask


# ================================================================================ the tests
def test_reference_backend_is_listed_for_both_ops():
    info = available_backends()["reference"]
    assert info.available and SPARSE in info.ops and DENSE in info.ops
    assert "reference" in SPARSE_BACKENDS and "reference" in DENSE_BACKENDS


def test_default_dispatch_matches_reference():
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 3, 2, 5, 6, dtype=torch.float32)
    args = (source, kp_s, jac_s, kp_d, jac_d)
    assert_motion_accurate("sparse", args, None, [sparse_motion_inputs(*args)] + [None] * 5)
    d, m = dense_motion(logits, kp_s, jac_s, kp_d, jac_d)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), None, [d, m] + [None] * 5)


# ------------------------------------------------------------------ 1. Python-loop oracle, float64
LOOP_CASES = [
    # B, K, C, H, W, spread, jacobians
    (2, 3, 2, 4, 5, 1.0, True),
    (1, 2, 3, 3, 1, 1.5, True),     # W = 1, keypoints partly outside [-1,1]: zero padding is read
    (2, 2, 1, 1, 1, 1.0, True),     # 1x1
    (2, 3, 2, 5, 4, 1.2, False),    # Jacobians None
]


def singular_driving(jac_d):
    """Replaces keypoint 0's driving Jacobian with a rank-1 one (det exactly 0) and keypoint 1's with
    det -1e-9, so the loop oracle also covers the floor (zero counts as positive)."""
    jac_d = jac_d.clone()
    jac_d[:, 0] = torch.tensor([[0.5, 1.0], [0.25, 0.5]], dtype=jac_d.dtype)
    if jac_d.shape[1] > 1:
        jac_d[:, 1] = torch.tensor([[-1e-4, 0.3], [0.0, 1e-5]], dtype=jac_d.dtype)
    return jac_d


LOOP_PARAMS = [(case, floor) for case in LOOP_CASES for floor in (False, True) if case[-1] or not floor]


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("case, floor", LOOP_PARAMS)
def test_sparse_forward_matches_python_loop(backend, case, floor):
    B, K, C, H, W, spread, jac = case
    source, kp_s, jac_s, kp_d, jac_d, _ = make_inputs(B, K, C, H, W, spread=spread, jacobians=jac, seed=1)
    if floor:
        jac_d = singular_driving(jac_d)
    variance = 0.01 if H > 3 else 0.3
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, variance, backend=backend)
    expected = loop_sparse_inputs(source, kp_s, jac_s, kp_d, jac_d, variance)
    assert out.shape == expected.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 1e-10


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@pytest.mark.parametrize("case, floor", LOOP_PARAMS)
def test_dense_forward_matches_python_loop(backend, case, floor):
    B, K, C, H, W, spread, jac = case
    _, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(B, K, C, H, W, spread=spread, jacobians=jac, seed=2)
    if floor:
        jac_d = singular_driving(jac_d)
    deformation, mask = dense_motion(logits, kp_s, jac_s, kp_d, jac_d, backend=backend)
    d_exp, m_exp = loop_dense(logits, kp_s, jac_s, kp_d, jac_d)
    assert deformation.shape == (B, H, W, 2) and mask.shape == (B, K + 1, H, W)
    assert torch.isfinite(deformation).all() and torch.isfinite(mask).all()
    assert rel_err(deformation, d_exp) < 1e-10
    assert rel_err(mask, m_exp) < 1e-10


# -------------------------------------------------------- 2. official formulation, float32 forward
OFFICIAL_SHAPES = [
    # B, K, C, H, W: every K in {1,10,15,20} and every H, W in {1,7,64,65}
    (2, 1, 3, 1, 1),
    (2, 10, 3, 7, 65),
    (1, 15, 3, 64, 64),
    (2, 20, 3, 65, 7),
    (1, 1, 3, 64, 1),
    (1, 15, 3, 1, 65),
    (2, 10, 3, 7, 7),
]


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("shape", OFFICIAL_SHAPES)
@pytest.mark.parametrize("jacobians", [True, False])
def test_sparse_forward_matches_official(backend, shape, jacobians):
    source, kp_s, jac_s, kp_d, jac_d, _ = make_inputs(*shape, dtype=torch.float32, seed=3, jacobians=jacobians)
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, backend=backend)
    B, K, C, H, W = shape
    assert out.shape == (B, (K + 1) * (C + 1), H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The same float32 inputs through the float64 official formulation are the exact answer; PyTorch's float32
    # warps at 64-65 px are ~1e-5 off it (a 1-ulp motion moves a sample by ~W/2 ulps): the yardstick.
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), None, [out] + [None] * 5,
                           truth_fns=(official_sparse_inputs,))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("shape", OFFICIAL_SHAPES)
def test_sparse_forward_matches_official_float64(backend, shape):
    # In float64 the rounding noise above vanishes: the op and the official formulation agree to 1e-10.
    source, kp_s, jac_s, kp_d, jac_d, _ = make_inputs(*shape, dtype=torch.float64, seed=3)
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, backend=backend)
    assert rel_err(out, official_sparse_inputs(source, kp_s, jac_s, kp_d, jac_d)) < 1e-10


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@pytest.mark.parametrize("shape", OFFICIAL_SHAPES)
@pytest.mark.parametrize("jacobians", [True, False])
def test_dense_forward_matches_official(backend, shape, jacobians):
    _, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(*shape, dtype=torch.float32, seed=4, jacobians=jacobians)
    deformation, mask = dense_motion(logits, kp_s, jac_s, kp_d, jac_d, backend=backend)
    assert torch.isfinite(deformation).all() and torch.isfinite(mask).all()
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), None, [deformation, mask] + [None] * 5,
                           truth_fns=(official_dense,))


def test_official_order_is_heat_then_channels_per_keypoint():
    # Independent of any formulation: channel k*(C+1) is heat_k, the next C are the warped source.
    source, kp_s, _, kp_d, _, _ = make_inputs(1, 2, 3, 6, 6, seed=5)
    out = sparse_motion_inputs(source, kp_s, None, kp_d, None, backend="reference").view(1, 3, 4, 6, 6)
    assert (out[:, 0, 0] == 0).all()                                    # heat_0 = 0
    # T_0 = the coordinate grid (endpoints included, so with align_corners=False not the identity warp)
    t0 = F.grid_sample(source, official_grid(6, 6, source.dtype)[None], align_corners=False)
    assert torch.allclose(out[:, 0, 1:], t0, atol=1e-12)
    assert not torch.allclose(out[:, 0, 1:], source, atol=1e-3)
    heat1 = kp2gaussian(kp_d, (6, 6), 0.01)[:, 0] - kp2gaussian(kp_s, (6, 6), 0.01)[:, 0]
    assert torch.allclose(out[:, 1, 0], heat1, atol=1e-12)


# ---------------------------------------------------------------------------- 3. backward
def _inputs_requiring_grad(tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _grads(outputs, inputs, upstream):
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(outputs, present, upstream, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]


GRAD_SHAPES = [(2, 3, 3, 9, 11), (1, 10, 3, 7, 65), (2, 15, 3, 16, 16), (1, 1, 3, 1, 1), (1, 20, 2, 65, 7)]


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("jacobians", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_backward_matches_official_autograd(backend, shape, jacobians, dtype):
    source, kp_s, jac_s, kp_d, jac_d, _ = make_inputs(*shape, dtype=dtype, seed=6, jacobians=jacobians)
    g = torch.Generator().manual_seed(7)
    B, K, C, H, W = shape
    upstream = torch.randn(B, (K + 1) * (C + 1), H, W, generator=g, dtype=torch.float64).to(dtype)
    ins = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])
    got = _grads(sparse_motion_inputs(*ins, backend=backend), ins, upstream)
    # float64: the truth is the same-precision run, so the floor carries the pixel coordinate's rounding,
    # eps (1 + max(H, W)), which moves a bilinear sample by as many roundings (see test_motion_cpu_kernel)
    ulps = DEFAULT_ULPS * (1 + max(H, W)) if dtype == torch.float64 else DEFAULT_ULPS
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), upstream, [None, *got],
                           truth_fns=(official_sparse_inputs,), ulps=ulps, name=backend)


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("jacobians", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_backward_matches_official_autograd(backend, shape, jacobians, dtype):
    _, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(*shape, dtype=dtype, seed=8, jacobians=jacobians)
    g = torch.Generator().manual_seed(9)
    B, K, C, H, W = shape
    up_d = torch.randn(B, H, W, 2, generator=g, dtype=torch.float64).to(dtype)
    up_m = torch.randn(B, K + 1, H, W, generator=g, dtype=torch.float64).to(dtype)
    ins = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
    got = _grads(dense_motion(*ins, backend=backend), ins, (up_d, up_m))
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), (up_d, up_m), [None, None, *got],
                           truth_fns=(official_dense,), name=backend)


GC_SHAPE = (2, 3, 2, 5, 6)


def _gradcheck_inputs(jacobians, seed=10):
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(*GC_SHAPE, seed=seed, jacobians=jacobians)
    return _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d, logits])


@pytest.mark.parametrize("backend", SPARSE_GRADCHECK_BACKENDS)
@pytest.mark.parametrize("jacobians", [True, False])
@pytest.mark.parametrize("variance", [0.01, 0.2])
def test_sparse_gradcheck(backend, jacobians, variance):
    source, kp_s, jac_s, kp_d, jac_d, _ = _gradcheck_inputs(jacobians)
    ins = [t for t in (source, kp_s, jac_s, kp_d, jac_d) if t is not None]

    def fn(*args):
        it = iter(args)
        s, ks = next(it), next(it)
        js = next(it) if jacobians else None
        kd = next(it)
        jd = next(it) if jacobians else None
        return sparse_motion_inputs(s, ks, js, kd, jd, variance, backend=backend)

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", SPARSE_GRADCHECK_BACKENDS)
@pytest.mark.parametrize("which", ["source", "kp_source", "jac_source", "kp_driving", "jac_driving"])
def test_sparse_gradcheck_one_input_at_a_time(backend, which):
    # Exercises the output_mask paths where only one gradient is asked for.
    names = ["source", "kp_source", "jac_source", "kp_driving", "jac_driving"]
    ins = _gradcheck_inputs(True)[:5]
    idx = names.index(which)
    fixed = [t.detach() for t in ins]

    def fn(x):
        args = list(fixed)
        args[idx] = x
        return sparse_motion_inputs(*args, backend=backend)

    assert torch.autograd.gradcheck(fn, (ins[idx],), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", DENSE_GRADCHECK_BACKENDS)
@pytest.mark.parametrize("jacobians", [True, False])
@pytest.mark.parametrize("outputs", ["both", "deformation", "mask"])
def test_dense_gradcheck(backend, jacobians, outputs):
    _, kp_s, jac_s, kp_d, jac_d, logits = _gradcheck_inputs(jacobians, seed=11)
    ins = [t for t in (logits, kp_s, jac_s, kp_d, jac_d) if t is not None]

    def fn(*args):
        it = iter(args)
        ml, ks = next(it), next(it)
        js = next(it) if jacobians else None
        kd = next(it)
        jd = next(it) if jacobians else None
        deformation, mask = dense_motion(ml, ks, js, kd, jd, backend=backend)
        return {"both": (deformation, mask), "deformation": deformation, "mask": mask}[outputs]

    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", DENSE_GRADCHECK_BACKENDS)
@pytest.mark.parametrize("which", ["mask_logits", "kp_source", "jac_source", "kp_driving", "jac_driving"])
def test_dense_gradcheck_one_input_at_a_time(backend, which):
    names = ["mask_logits", "kp_source", "jac_source", "kp_driving", "jac_driving"]
    source, kp_s, jac_s, kp_d, jac_d, logits = _gradcheck_inputs(True, seed=12)
    ins = [logits, kp_s, jac_s, kp_d, jac_d]
    idx = names.index(which)
    fixed = [t.detach() for t in ins]

    def fn(x):
        args = list(fixed)
        args[idx] = x
        return dense_motion(*args, backend=backend)

    assert torch.autograd.gradcheck(fn, (ins[idx],), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", sorted(set(SPARSE_GRADCHECK_BACKENDS) & set(DENSE_GRADCHECK_BACKENDS)))
@pytest.mark.parametrize("jacobians", [True, False])
def test_full_jacobian_gradcheck_tiny(backend, jacobians):
    # Slow-mode gradcheck (every Jacobian entry, not a random projection) at a tiny shape.
    source, kp_s, jac_s, kp_d, jac_d, logits = _inputs_requiring_grad(
        make_inputs(1, 2, 1, 3, 4, seed=27, jacobians=jacobians))
    present = [t for t in (source, kp_s, jac_s, kp_d, jac_d) if t is not None]

    def unpack(args):
        it = iter(args)
        first, ks = next(it), next(it)
        js = next(it) if jacobians else None
        kd = next(it)
        jd = next(it) if jacobians else None
        return first, ks, js, kd, jd

    assert torch.autograd.gradcheck(lambda *a: sparse_motion_inputs(*unpack(a), 0.3, backend=backend), present,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    present = [logits] + present[1:]
    assert torch.autograd.gradcheck(lambda *a: dense_motion(*unpack(a), backend=backend), present,
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mask_only_leaves_keypoint_gradients_zero():
    _, kp_s, jac_s, kp_d, jac_d, logits = _gradcheck_inputs(True, seed=13)
    _, mask = dense_motion(logits, kp_s, jac_s, kp_d, jac_d, backend="reference")
    grads = torch.autograd.grad((mask * torch.randn_like(mask)).sum(), [logits, kp_s, jac_s, kp_d, jac_d],
                                allow_unused=True)
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        assert g is None or (g == 0).all()


# ---------------------------------------------------------------------------- 4. opcheck
def _opcheck_samples(dtype=torch.float64):
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 3, 2, 5, 6, dtype=dtype, seed=14)
    cl = source.contiguous(memory_format=torch.channels_last)
    return [
        (source, kp_s, jac_s, kp_d, jac_d, logits),
        (cl, kp_s, None, kp_d, None, logits.contiguous(memory_format=torch.channels_last)),
        (source, kp_s, jac_s, kp_d, None, logits),
        (source, kp_s, None, kp_d, jac_d, logits),
    ]


MASKS = [[True] * 5, [False] * 5, [True, False, False, False, False], [False, True, True, True, True],
         [False, False, True, False, True]]


@pytest.mark.parametrize("backend", SPARSE_GRADCHECK_BACKENDS)
def test_opcheck_sparse_motion_inputs(backend):
    for source, kp_s, jac_s, kp_d, jac_d, _ in _opcheck_samples():
        args = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])   # exercises the autograd path
        torch.library.opcheck(torch.ops.dagan_fast.sparse_motion_inputs, (*args, 0.01, backend))


@pytest.mark.parametrize("backend", SPARSE_GRADCHECK_BACKENDS)
def test_opcheck_sparse_motion_inputs_backward(backend):
    for source, kp_s, jac_s, kp_d, jac_d, _ in _opcheck_samples():
        B, C, H, W = source.shape
        grad = torch.randn(B, (kp_s.shape[1] + 1) * (C + 1), H, W, dtype=source.dtype)
        for mask in MASKS:
            torch.library.opcheck(torch.ops.dagan_fast.sparse_motion_inputs_backward,
                                  (grad, source, kp_s, jac_s, kp_d, jac_d, 0.01, backend, mask))


@pytest.mark.parametrize("backend", DENSE_GRADCHECK_BACKENDS)
def test_opcheck_dense_motion(backend):
    for _, kp_s, jac_s, kp_d, jac_d, logits in _opcheck_samples():
        args = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
        torch.library.opcheck(torch.ops.dagan_fast.dense_motion, (*args, backend))


@pytest.mark.parametrize("backend", DENSE_GRADCHECK_BACKENDS)
def test_opcheck_dense_motion_backward(backend):
    for _, kp_s, jac_s, kp_d, jac_d, logits in _opcheck_samples():
        B, K1, H, W = logits.shape
        grad_d = torch.randn(B, H, W, 2, dtype=logits.dtype)
        grad_m = torch.randn(B, K1, H, W, dtype=logits.dtype)
        for mask in MASKS:
            torch.library.opcheck(torch.ops.dagan_fast.dense_motion_backward,
                                  (grad_d, grad_m, logits, kp_s, jac_s, kp_d, jac_d, backend, mask))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_backward_with_only_source_or_only_logits_requiring_grad(backend):
    # The common training case (keypoints detached): the backward ops then return four empty
    # gradients, which must be distinct tensors (a custom op's outputs may not alias each other).
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 3, 2, 5, 6, dtype=torch.float32, seed=15)
    s = source.clone().requires_grad_(True)
    out = sparse_motion_inputs(s, kp_s, jac_s, kp_d, jac_d, backend=backend)
    out.square().sum().backward()
    # d(out^2)/d source = the backward of 2 out: the upstream is 2 out (the kernel's own, as autograd used it)
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), 2 * out.detach(),
                           [None, s.grad, None, None, None, None], truth_fns=(official_sparse_inputs,))
    ml = logits.clone().requires_grad_(True)
    d, m = dense_motion(ml, kp_s, jac_s, kp_d, jac_d, backend="reference")
    (d.sum() + m.square().sum()).backward()
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), (torch.ones_like(d), 2 * m.detach()),
                           [None, None, ml.grad, None, None, None, None], truth_fns=(official_dense,))


# ---------------------------------------------------------------------------- 5. awkward cases
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparse_keypoints_far_outside(backend):
    B, K, C, H, W = 2, 4, 3, 9, 10
    source, _, jac_s, _, jac_d, _ = make_inputs(B, K, C, H, W, dtype=torch.float32, seed=16)
    g = torch.Generator().manual_seed(17)
    kp_s = ((torch.rand(B, K, 2, generator=g) * 2 - 1) * 5).to(torch.float32)
    kp_d = ((torch.rand(B, K, 2, generator=g) * 2 - 1) * 5).to(torch.float32)
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, backend=backend)
    assert out.shape == (B, (K + 1) * (C + 1), H, W) and torch.isfinite(out).all()
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), None, [out] + [None] * 5,
                           truth_fns=(official_sparse_inputs,))
    # Source keypoints at +5 with identity Jacobians: T_k(z) = (5,5) + z - kp_d lies entirely beyond
    # the image when kp_d is inside, so those samples read zero padding; the source Gaussian is 0.
    kp_s5 = torch.full((B, K, 2), 5.0)
    kp_d_in = torch.rand(B, K, 2, generator=g) * 0.2 - 0.1
    out = sparse_motion_inputs(source, kp_s5, None, kp_d_in, None, backend=backend).view(B, K + 1, C + 1, H, W)
    assert (out[:, 1:, 1:] == 0).all()
    assert torch.allclose(out[:, 1:, 0], kp2gaussian(kp_d_in, (H, W), 0.01), atol=1e-6)
    # Gradients with far-out keypoints: finite and equal to autograd through the official formulation.
    ins = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])
    out = sparse_motion_inputs(*ins, backend=backend)
    up = torch.randn(out.shape, generator=g)
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), up, [None, *_grads(out, ins, up)],
                           truth_fns=(official_sparse_inputs,))


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
def test_dense_keypoints_far_outside(backend):
    _, _, jac_s, _, jac_d, logits = make_inputs(2, 4, 1, 9, 10, dtype=torch.float32, seed=18)
    g = torch.Generator().manual_seed(19)
    kp_s = (torch.rand(2, 4, 2, generator=g) * 2 - 1) * 5
    kp_d = (torch.rand(2, 4, 2, generator=g) * 2 - 1) * 5
    ins = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
    d, m = dense_motion(*ins, backend=backend)
    ups = (torch.randn(d.shape, generator=g), torch.randn(m.shape, generator=g))
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [d, m, *_grads((d, m), ins, ups)],
                           truth_fns=(official_dense,))


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
@pytest.mark.parametrize("jacobians", [True, False])
def test_batch_zero(backend, jacobians):
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(0, 3, 2, 5, 6, dtype=torch.float32, jacobians=jacobians)
    ins = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])
    out = sparse_motion_inputs(*ins, backend=backend)
    assert out.shape == (0, 12, 5, 6)
    grads = _grads(out, ins, torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in ins if t is not None]
    ins = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
    d, m = dense_motion(*ins, backend=backend)
    assert d.shape == (0, 5, 6, 2) and m.shape == (0, 4, 5, 6)
    grads = _grads((d, m), ins, (torch.ones_like(d), torch.ones_like(m)))
    assert [g.shape for g in grads] == [t.shape for t in ins if t is not None]


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
def test_one_by_one(backend):
    # A 1x1 grid is the single point z = (0, 0): T_0 samples the centre, i.e. the pixel itself.
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 3, 2, 1, 1, seed=20)
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, backend=backend).view(2, 4, 3)
    assert torch.equal(out[:, 0, 0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(out[:, 0, 1:], source.view(2, 2), atol=1e-12)
    d, m = dense_motion(logits, kp_s, jac_s, kp_d, jac_d, backend=backend)
    motions = official_sparse_motions(2, 1, 1, kp_s, jac_s, kp_d, jac_d)    # (2,4,1,1,2)
    expected = (torch.softmax(logits, 1).unsqueeze(-1) * motions).sum(1)
    assert rel_err(d, expected) < 1e-12


def _noncontiguous(B, K, C, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "source": r(B, C, W, H).transpose(2, 3),                        # transposed spatial axes
        "kp_source": torch.tanh(r(B, 2, K)).transpose(1, 2),             # (B,K,2) with stride(2) != 1
        "jac_source": (torch.eye(2, dtype=torch.float64) + 0.2 * r(B, K, 2, 2)).transpose(-1, -2),
        "kp_driving": torch.tanh(r(B, 2 * K, 3))[:, ::2, 1:],            # sliced
        "jac_driving": torch.tensor([[1.3, 0.1], [-0.2, 0.8]], dtype=torch.float64).expand(B, K, 2, 2),
        "mask_logits": r(B, H, W, K + 1).permute(0, 3, 1, 2),            # channels_last-like
    }


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last", "expanded_jacobians"])
def test_layouts(backend, layout):
    B, K, C, H, W = 2, 3, 3, 7, 9
    t = _noncontiguous(B, K, C, H, W, seed=21)
    if layout == "channels_last":
        t = {k: v.contiguous() for k, v in t.items()}
        t["source"] = t["source"].contiguous(memory_format=torch.channels_last)
        t["mask_logits"] = t["mask_logits"].contiguous(memory_format=torch.channels_last)
        assert not t["source"].is_contiguous()
    elif layout == "expanded_jacobians":
        t = {k: v.contiguous() for k, v in t.items()}
        t["jac_source"] = (torch.eye(2, dtype=torch.float64) * 0.8).expand(B, K, 2, 2)
        t["jac_driving"] = torch.tensor([[1.1, 0.2], [-0.3, 0.9]], dtype=torch.float64).expand(B, K, 2, 2)
    else:
        assert not any(v.is_contiguous() for v in t.values())
    names = ["source", "kp_source", "jac_source", "kp_driving", "jac_driving"]
    dense_names = ["mask_logits"] + names[1:]
    for op, keys in ((sparse_motion_inputs, names), (dense_motion, dense_names)):
        ins = [t[k].detach().requires_grad_(True) for k in keys]   # the strided views themselves
        ref_ins = [t[k].detach().contiguous().requires_grad_(True) for k in keys]
        out, ref = op(*ins, backend=backend), op(*ref_ins, backend=backend)
        outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        for a, e in zip(outs, refs):
            assert a.shape == e.shape and torch.isfinite(a).all()
            assert rel_err(a, e) < 1e-12
        ups = [torch.randn(e.shape, dtype=e.dtype, generator=torch.Generator().manual_seed(22)) for e in refs]
        for name, a, e in zip(keys, _grads(outs, ins, ups), _grads(refs, ref_ins, ups)):
            assert a.shape == e.shape and torch.isfinite(a).all(), name
            assert rel_err(a, e) < 1e-12, name


# Singular and near-singular driving Jacobians, with their floored inverses written out by hand.
SINGULAR = {
    # name: (jac_driving, floored inverse = adj / (+-1e-6))
    "zeros": ([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]),
    "rank1": ([[1.0, 2.0], [2.0, 4.0]], [[4e6, -2e6], [-2e6, 1e6]]),                   # det 0 counts as +
    "det+1e-9": ([[1e-3, 0.0], [0.0, 1e-6]], [[1.0, 0.0], [0.0, 1e3]]),
    "det-1e-9": ([[-1e-3, 0.0], [0.0, 1e-6]], [[-1.0, 0.0], [0.0, 1e3]]),                # adj / (-1e-6)
    "rank1_offdiag-": ([[0.0, 1e-4], [1e-5, 0.0]], [[0.0, 1e2], [10.0, 0.0]]),         # det -1e-9: -adj/1e-6
}


def _singular_inputs(name, dtype=torch.float64, seed=23):
    B, K, C, H, W = 2, 3, 2, 6, 7
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(B, K, C, H, W, dtype=dtype, seed=seed)
    jd, inv = SINGULAR[name]
    jac_d = jac_d.clone()
    jac_d[:, 1] = torch.tensor(jd, dtype=dtype)           # keypoint 1 singular, the others regular
    # Keep A = J_s inv(J_d) of order 1 so the warped source stays inside the image: J_s = J_d-ish.
    jac_s = jac_s.clone()
    jac_s[:, 1] = torch.tensor([[0.7, 0.1], [0.0, 1e-3]], dtype=dtype)
    regular = jac_d.detach().clone()
    regular[:, 1] = torch.eye(2, dtype=dtype)
    hand_inv = torch.linalg.inv(regular)
    hand_inv[:, 1] = torch.tensor(inv, dtype=dtype)
    return source, kp_s, jac_s, kp_d, jac_d, logits, hand_inv


def test_singular_table_is_the_floor_definition():
    for name, (jd, inv) in SINGULAR.items():
        got = floored_inverse(torch.tensor(jd, dtype=torch.float64))
        assert torch.allclose(got, torch.tensor(inv, dtype=torch.float64), rtol=1e-12, atol=0), name
        assert torch.allclose(reference.inverse_2x2(torch.tensor(jd, dtype=torch.float64)), got, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
@pytest.mark.parametrize("name", list(SINGULAR))
def test_singular_driving_jacobians_forward(backend, name):
    source, kp_s, jac_s, kp_d, jac_d, logits, hand_inv = _singular_inputs(name)
    given = lambda j: hand_inv  # noqa: E731  (the hand-computed floored inverse)
    out = sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, backend=backend)
    assert out.shape == (2, 4 * 3, 6, 7) and torch.isfinite(out).all()
    assert rel_err(out, official_sparse_inputs(source, kp_s, jac_s, kp_d, jac_d, inverse=given)) < 1e-10
    d, m = dense_motion(logits, kp_s, jac_s, kp_d, jac_d, backend=backend)
    assert torch.isfinite(d).all() and torch.isfinite(m).all()
    d_exp, m_exp = official_dense(logits, kp_s, jac_s, kp_d, jac_d, inverse=given)
    assert rel_err(d, d_exp) < 1e-10 and rel_err(m, m_exp) < 1e-12
    # Also with identity source Jacobians: the motions then reach the inverse itself (~1e6).
    d, _ = dense_motion(logits, kp_s, None, kp_d, jac_d, backend=backend)
    assert torch.isfinite(d).all()
    assert rel_err(d, official_dense(logits, kp_s, None, kp_d, jac_d, inverse=given)[0]) < 1e-10
    out = sparse_motion_inputs(source, kp_s, None, kp_d, jac_d, backend=backend)
    assert torch.isfinite(out).all()
    assert rel_err(out, official_sparse_inputs(source, kp_s, None, kp_d, jac_d, inverse=given)) < 1e-10


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
@pytest.mark.parametrize("name", list(SINGULAR))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_driving_jacobians_backward(backend, name, dtype):
    # Gradients are finite and equal autograd through the hand floor (zero through a floored det).
    source, kp_s, jac_s, kp_d, jac_d, logits, _ = _singular_inputs(name, dtype=dtype)
    H, W = source.shape[2:]
    ulps = DEFAULT_ULPS * (1 + max(H, W)) if dtype == torch.float64 else DEFAULT_ULPS  # see the official tests
    g = torch.Generator().manual_seed(24)
    ins = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])
    out = sparse_motion_inputs(*ins, backend=backend)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    got = _grads(out, ins, up)
    assert_motion_accurate("sparse", (source, kp_s, jac_s, kp_d, jac_d), up, [None, *got], ulps=ulps,
                           truth_fns=(lambda *a: official_sparse_inputs(*a, inverse=floored_inverse),))
    ins = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
    d, m = dense_motion(*ins, backend=backend)
    ups = (torch.randn(d.shape, generator=g, dtype=torch.float64).to(dtype),
           torch.randn(m.shape, generator=g, dtype=torch.float64).to(dtype))
    got = _grads((d, m), ins, ups)
    assert_motion_accurate("dense", (logits, kp_s, jac_s, kp_d, jac_d), ups, [None, None, *got], ulps=ulps,
                           truth_fns=(lambda *a: official_dense(*a, inverse=floored_inverse),))


def test_singular_driving_jacobian_float16_stays_finite():
    source, kp_s, jac_s, kp_d, jac_d, _ = make_inputs(2, 3, 2, 6, 7, dtype=torch.float16, seed=28)
    jac_d = jac_d.clone()
    jac_d[:, 1] = torch.tensor(SINGULAR["rank1"][0], dtype=torch.float16)
    out = sparse_motion_inputs(source, kp_s, None, kp_d, jac_d, backend="reference")
    assert torch.isfinite(out).all()


def test_floored_det_path_has_zero_gradient():
    # d inv / d J through the det is zero when floored: for J = diag(1e-3, 1e-6) the floored inverse
    # is adj(J) / 1e-6, linear in J, so its gradient is exactly the adjugate's.
    jac = torch.tensor([[1e-3, 0.0], [0.0, 1e-6]], dtype=torch.float64)
    up = torch.tensor([[0.3, -0.7], [1.1, 0.4]], dtype=torch.float64)
    grad = reference.inverse_2x2_backward(up, jac)
    # inv = [[d, -b], [-c, a]] / 1e-6  ->  dL/da = up[1,1], dL/db = -up[0,1], dL/dc = -up[1,0], dL/dd = up[0,0]
    expected = torch.tensor([[0.4, 0.7], [-1.1, 0.3]], dtype=torch.float64) / FLOOR
    assert torch.allclose(grad, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", sorted(set(SPARSE_BACKENDS) & set(DENSE_BACKENDS)))
def test_two_runs_bitwise_equal(backend):
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 5, 3, 17, 13, dtype=torch.float32, seed=25)
    runs = []
    for _ in range(2):
        ins = _inputs_requiring_grad([source, kp_s, jac_s, kp_d, jac_d])
        out = sparse_motion_inputs(*ins, backend=backend)
        grads = _grads(out, ins, torch.ones_like(out))
        ins_d = _inputs_requiring_grad([logits, kp_s, jac_s, kp_d, jac_d])
        d, m = dense_motion(*ins_d, backend=backend)
        grads_d = _grads((d, m), ins_d, (torch.ones_like(d), torch.ones_like(m)))
        runs.append([out, d, m, *grads, *grads_d])
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- 6. bad input
def _good(dtype=torch.float32):
    source, kp_s, jac_s, kp_d, jac_d, logits = make_inputs(2, 3, 2, 5, 6, dtype=dtype, seed=26)
    return dict(source=source, kp_source=kp_s, jac_source=jac_s, kp_driving=kp_d, jac_driving=jac_d,
                mask_logits=logits)


def _call(op, a, **kw):
    if op == SPARSE:
        return sparse_motion_inputs(a["source"], a["kp_source"], a["jac_source"], a["kp_driving"],
                                    a["jac_driving"], **kw)
    return dense_motion(a["mask_logits"], a["kp_source"], a["jac_source"], a["kp_driving"], a["jac_driving"], **kw)


BAD_SHAPES = [
    # (op, argument, replacement factory (good dict -> tensor), exception, message pattern)
    (SPARSE, "source", lambda a: a["source"][0], ValueError, r"source must be 4-D"),
    (SPARSE, "source", lambda a: a["source"][:, :, :0], ValueError, r"source must be at least 1x1"),
    (DENSE, "mask_logits", lambda a: a["mask_logits"][0], ValueError, r"mask_logits must be 4-D"),
    (DENSE, "mask_logits", lambda a: a["mask_logits"][:, :3], ValueError, r"mask_logits must have K\+1 = 4"),
    (DENSE, "mask_logits", lambda a: torch.cat([a["mask_logits"]] * 2, 1), ValueError, r"mask_logits must have K\+1"),
    (DENSE, "mask_logits", lambda a: a["mask_logits"][:, :, :, :0], ValueError, r"mask_logits must be at least 1x1"),
]
for _op in (SPARSE, DENSE):
    BAD_SHAPES += [
        (_op, "kp_source", lambda a: a["kp_source"][0], ValueError, r"kp_source must be 3-D"),
        (_op, "kp_driving", lambda a: a["kp_driving"].unsqueeze(0), ValueError, r"kp_driving must be 3-D"),
        (_op, "jac_source", lambda a: a["jac_source"][..., 0], ValueError, r"jac_source must be 4-D"),
        (_op, "jac_driving", lambda a: a["jac_driving"].unsqueeze(0), ValueError, r"jac_driving must be 4-D"),
        (_op, "kp_source", lambda a: a["kp_source"][:1], ValueError, r"kp_source must be \(B,K,2\) with B = 2"),
        (_op, "kp_source", lambda a: torch.cat([a["kp_source"], a["kp_source"][..., :1]], -1), ValueError,
         r"kp_source must be \(B,K,2\)"),
        (_op, "kp_driving", lambda a: a["kp_driving"][:, :2], ValueError, r"kp_driving must have kp_source's shape"),
        (_op, "kp_driving", lambda a: a["kp_driving"][:1], ValueError, r"kp_driving must have kp_source's shape"),
        (_op, "jac_source", lambda a: a["jac_source"][:, :2], ValueError, r"jac_source must be \(B,K,2,2\).*K = 3"),
        (_op, "jac_driving", lambda a: torch.cat([a["jac_driving"]] * 2, 1), ValueError,
         r"jac_driving must be \(B,K,2,2\)"),
        (_op, "jac_driving", lambda a: a["jac_driving"][:1], ValueError, r"jac_driving must be \(B,K,2,2\)"),
        (_op, "jac_source", lambda a: a["jac_source"][..., :1], ValueError, r"jac_source must be \(B,K,2,2\)"),
        (_op, "kp_source", lambda a: a["kp_source"][:, :0], ValueError, r"at least one keypoint"),
    ]


@pytest.mark.parametrize("op, arg, make, exc, pattern", BAD_SHAPES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(BAD_SHAPES)])
def test_bad_shapes(op, arg, make, exc, pattern):
    a = _good()
    a[arg] = make(a)
    if arg == "kp_source" and "at least one" in pattern:
        a["kp_driving"], a["jac_source"], a["jac_driving"] = a["kp_driving"][:, :0], None, None
        a["mask_logits"] = a["mask_logits"][:, :1]
    with pytest.raises(exc, match=pattern):
        _call(op, a, backend="reference")
    with pytest.raises(exc, match=pattern):      # also on the default dispatch path
        _call(op, a)


OP_ARGS = [(SPARSE, a) for a in ("source", "kp_source", "jac_source", "kp_driving", "jac_driving")] + \
    [(DENSE, a) for a in ("mask_logits", "kp_source", "jac_source", "kp_driving", "jac_driving")]


@pytest.mark.parametrize("op, arg", OP_ARGS)
def test_bad_dtypes(op, arg):
    a = _good()
    a[arg] = (a[arg] * 100).to(torch.int64)
    with pytest.raises(TypeError, match=rf"{arg} must be a floating tensor"):
        _call(op, a)
    a = _good()
    a[arg] = a[arg].double()
    first = "source" if op == SPARSE else "mask_logits"
    pattern = rf"{arg} has dtype torch.float64 but {first}" if arg != first else \
        r"kp_source has dtype torch.float32 but " + first
    with pytest.raises(TypeError, match=pattern):
        _call(op, a)
    a = _good()
    a[arg] = "not a tensor"
    with pytest.raises(TypeError, match=rf"{arg} must be a torch.Tensor"):
        _call(op, a)


@pytest.mark.parametrize("op, arg", OP_ARGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(op, arg, value):
    a = _good()
    bad = a[arg].clone()
    bad.view(-1)[bad.numel() // 2] = value
    a[arg] = bad
    with pytest.raises(ValueError, match=rf"{arg} contains 1 NaN or inf"):
        _call(op, a)


def test_device_mismatch():
    a = _good()
    a["kp_driving"] = a["kp_driving"].to("meta")
    with pytest.raises(ValueError, match=r"kp_driving is on meta but source is on cpu"):
        _call(SPARSE, a)
    with pytest.raises(ValueError, match=r"kp_driving is on meta but mask_logits is on cpu"):
        _call(DENSE, a)


@pytest.mark.parametrize("variance, error, match", [
    (0, ValueError, "positive finite"), (0.0, ValueError, "positive finite"), (-0.01, ValueError, "positive finite"),
    (float("nan"), ValueError, "positive finite"), (float("inf"), ValueError, "positive finite"),
    (-float("inf"), ValueError, "positive finite"), ("0.01", TypeError, "finite real number"),
    (None, TypeError, "finite real number"), (torch.tensor(0.01), TypeError, "finite real number"),
    (True, TypeError, "finite real number"),
])
def test_bad_variance(variance, error, match):
    a = _good()
    with pytest.raises(error, match=rf"variance must be a {match}"):
        sparse_motion_inputs(a["source"], a["kp_source"], a["jac_source"], a["kp_driving"], a["jac_driving"],
                             variance)


def test_numpy_variance_is_accepted():
    import numpy as np
    a = _good()
    args = (a["source"], a["kp_source"], a["jac_source"], a["kp_driving"], a["jac_driving"])
    assert torch.equal(sparse_motion_inputs(*args, np.float64(0.02)), sparse_motion_inputs(*args, 0.02))


@pytest.mark.parametrize("op", [SPARSE, DENSE])
def test_unknown_backend(op, monkeypatch):
    a = _good()
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; choose one of cuda, triton, cpu, reference"):
        _call(op, a, backend="nope")
    monkeypatch.setenv("DAGAN_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        _call(op, a)


def _backends_lacking(op):
    return [n for n in _backends.PRIORITY if n not in backends_for(op)]


@pytest.mark.parametrize("op", [SPARSE, DENSE])
def test_forced_backend_without_the_op(op, monkeypatch):
    a = _good()
    lacking = _backends_lacking(op)
    assert lacking, "every backend runs this op: nothing to test"
    for name in lacking:
        info = available_backends()[name]
        with pytest.raises(BackendError, match=rf"{op}: backend='{name}' cannot run these inputs: \S") as err:
            _call(op, a, backend=name)
        msg = str(err.value)
        if op not in info.ops:
            assert f"has no '{op}' kernel" in msg, msg
        if not info.available:
            assert info.detail in msg, msg
        monkeypatch.setenv("DAGAN_FAST_BACKEND", name)
        with pytest.raises(BackendError, match=rf"DAGAN_FAST_BACKEND='{name}' cannot run"):
            _call(op, a)
        monkeypatch.delenv("DAGAN_FAST_BACKEND")


@pytest.mark.parametrize("op", [SPARSE, DENSE])
def test_forced_cpu_backend_says_why(op):
    info = available_backends()["cpu"]
    if info.available and op in info.ops:
        pytest.skip("the C++ CPU backend implements this op now (covered by the parametrized tests)")
    with pytest.raises(BackendError, match=rf"{op}: backend='cpu' cannot run these inputs") as err:
        _call(op, _good(), backend="cpu")
    why = f"has no '{op}' kernel" if info.available else info.detail
    assert why in str(err.value)


def test_value_checks_can_be_skipped_but_shape_checks_cannot():
    a = _good()
    a["kp_source"] = a["kp_source"].clone()
    a["kp_source"][0, 0, 0] = float("nan")
    with dagan_fast.ops.skip_value_checks():
        out = _call(SPARSE, a, backend="reference")            # no scan: runs, NaN flows through
        assert out.shape == (2, 12, 5, 6)
        a["kp_driving"] = a["kp_driving"][:, :2]
        with pytest.raises(ValueError, match="kp_driving must have kp_source's shape"):
            _call(SPARSE, a)
