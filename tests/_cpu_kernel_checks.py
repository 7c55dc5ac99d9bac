"""Accuracy checks of the C++ CPU kernels (torch.ops.dagan_fast.*, forward and backward) in float32 and
bfloat16, shared by test_cpu_bf16_kernels.py and test_cpu_capabilities.py (which runs them in
subprocesses under each CPU capability; ``python tests/_cpu_kernel_checks.py`` runs them all).

The tolerance of every output is derived, never tuned:
  * the truth is the float64 reference evaluated on the very values the kernel got (inputs rounded to
    the tested dtype first, then widened exactly), so only the kernel's own rounding is measured;
  * the kernel may be off by twice the error of the reference computed in the tested dtype (the
    reference backend on the same rounded inputs, against the same truth), plus
  * a floor of 4 units of the dtype's rounding (2^-8 for bfloat16, 2^-24 for float32) times the
    magnitude of what enters each element (e.g. sum_k w_k |x_k| |occlusion| for a warped value,
    scale |dO| |V| |K| summed over keys for dQ): the rounding of the output itself and of float32
    sums, which the reference's luck may not show. The magnitude is that of the inputs, never the
    maximum of an expected value that may be zero.
  * bfloat16 kernels accumulate in float32, so the same bound must also hold with the reference
    computed in float32 (on the same values) in place of the bfloat16 one: a kernel cannot hide
    behind a poor bfloat16 reference (ATen's bfloat16 grid_sample computes coordinates in bfloat16
    and is off by ~0.5 where the kernel is off by ~0.01).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Dict, List, Optional

import torch

from dagan_fast.ops import reference as R

EPS = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}

# (B, C, Hi, Wi, Ho, Wo, layout): primes, 1x1, channels not a multiple of 8 or 16, channels_last,
# non-contiguous views; grids reach past the border.
WARP_CASES = [
    (1, 1, 1, 1, 1, 1, "nchw"),
    (2, 3, 7, 11, 5, 13, "nchw"),
    (1, 13, 17, 23, 19, 67, "nchw"),
    (1, 37, 9, 10, 8, 71, "channels_last"),
    (2, 8, 5, 6, 7, 9, "channels_last"),
    (1, 19, 11, 13, 6, 17, "sliced"),       # input[:, ::2]: planes of a strided view
    (1, 5, 6, 7, 5, 9, "transposed"),       # input with W and H swapped (row stride 1)
]
# (B, H, Nq, Nk, Dqk, Dv, layout)
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, 1, "contiguous"),
    (2, 3, 37, 53, 7, 11, "contiguous"),
    (1, 2, 131, 257, 32, 17, "contiguous"),
    (1, 2, 67, 29, 16, 16, "bnhd"),          # (B,N,H,D) transposed to (B,H,N,D), Dqk == Dv
]
# (B, K, C, H, W, layout)
MOTION_CASES = [
    (1, 1, 1, 1, 1, "contiguous"),
    (2, 5, 3, 17, 19, "contiguous"),
    (1, 10, 3, 23, 29, "channels_last"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, scale=1.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _uniform(shape, g, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def check(name: str, got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor, magnitude, dtype,
          case: str = "", ref32: Optional[torch.Tensor] = None) -> Dict:
    """Asserts |got - truth| <= 2 max|ref - truth| + 4 eps magnitude element-wise, and the same with
    ``ref32`` (the float32 reference) in place of ``ref`` when given; returns the errors."""
    assert got.shape == truth.shape, (name, tuple(got.shape), tuple(truth.shape))
    assert got.dtype == ref.dtype, (name, got.dtype, ref.dtype)
    got64 = got.detach().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    err = (got64 - truth).abs()
    mag = torch.as_tensor(magnitude, dtype=torch.float64)
    out = {"name": name, "case": case, "dtype": str(dtype), "err": float(err.max()) if err.numel() else 0.0}
    for label, r in (("ref_err", ref), ("ref32_err", ref32)):
        if r is None:
            continue
        if label == "ref32_err":  # float32 math rounded once to the output dtype: the best float32 accumulation gives
            r = r.to(got.dtype)
        ref_err = float((r.detach().double() - truth).abs().max()) if truth.numel() else 0.0
        bound = 2 * ref_err + 4 * EPS[dtype] * mag
        worst = float((err - bound).max()) if err.numel() else -1.0
        assert worst <= 0, (f"{name} ({dtype}{', ' + case if case else ''}): error {float(err.max()):.3e} exceeds "
                            f"its bound by {worst:.3e} ({label} {ref_err:.3e}, eps {EPS[dtype]:.1e}, max magnitude "
                            f"{float(mag.max()):.3e})")
        out[label] = ref_err
    return out


def _as_dtype(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


# ------------------------------------------------------------------------------------------ warp
def warp_inputs(case, dtype, seed=0):
    """Random (input, grid, occlusion, grad_output) in ``dtype`` with the case's layout."""
    B, C, Hi, Wi, Ho, Wo, layout = case
    g = _gen(seed)
    if layout == "sliced":
        x = _randn((B, 2 * C, Hi, Wi), g, 2.0).to(dtype)[:, ::2]
    elif layout == "transposed":
        x = _randn((B, C, Wi, Hi), g, 2.0).to(dtype).transpose(2, 3)
    else:
        x = _randn((B, C, Hi, Wi), g, 2.0).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    grid = _uniform((B, Ho, Wo, 2), g, -1.15, 1.15).to(dtype)
    occ = _uniform((B, 1, Ho, Wo), g, 0.0, 1.0).to(dtype)
    go = _randn((B, C, Ho, Wo), g).to(dtype)
    return x, grid, occ, go


def warp_run(x, grid, occ, go):
    out = torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ)
    grads = torch.ops.dagan_fast.warp_occlusion_bwd(go, x, grid, occ, [True, True, occ is not None])
    return (out, *grads)


def check_warp(case, dtype, seed=0, with_occlusion=True):
    x, grid, occ, go = warp_inputs(case, dtype, seed)
    occ = occ if with_occlusion else None
    got = warp_run(x, grid, occ, go)
    x64, g64, o64, go64 = (_as_dtype(t, torch.float64) for t in (x, grid, occ, go))
    truth = (R.warp_occlusion(x64, g64, o64), *R.warp_occlusion_backward(go64, x64, g64, o64, [True, True, True]))
    ref = (R.warp_occlusion(x, grid, occ), *R.warp_occlusion_backward(go, x, grid, occ, [True, True, True]))
    x32, g32, o32, go32 = (_as_dtype(t, torch.float32) for t in (x, grid, occ, go))
    ref32 = (R.warp_occlusion(x32, g32, o32), *R.warp_occlusion_backward(go32, x32, g32, o32, [True, True, True]))
    # Magnitudes: the same sums with absolute values (bilinear weights are >= 0).
    o_abs = o64.abs() if o64 is not None else None
    C, Hi, Wi = x.shape[1:]
    mag_out = R.warp_occlusion(x64.abs(), g64, o_abs)
    mag_gin = R.warp_occlusion_backward(go64.abs(), x64, g64, o_abs, [True, False, False])[0]
    go_occ = (go64.abs() * (o_abs if o_abs is not None else 1.0)).sum(1)            # (B,Ho,Wo)
    mag_grid = (4 * x64.abs().max() * max(Hi, Wi) / 2 * go_occ).unsqueeze(-1)     # per pixel, both coordinates
    mag_occ = (go64.abs() * R.warp_occlusion(x64.abs(), g64, None)).sum(1, keepdim=True)
    results = [check("warp out", got[0], truth[0], ref[0], mag_out, dtype, str(case), ref32[0]),
               check("warp grad_input", got[1], truth[1], ref[1], mag_gin, dtype, str(case), ref32[1]),
               check("warp grad_grid", got[2], truth[2], ref[2], mag_grid, dtype, str(case), ref32[2])]
    if occ is not None:
        results.append(check("warp grad_occlusion", got[3], truth[3], ref[3], mag_occ, dtype, str(case), ref32[3]))
    return results


# ------------------------------------------------------------------------------------- attention
def attention_inputs(case, dtype, seed=0):
    """(q, k, v, grad_out, scale) in ``dtype``; scores of order one (exp spans a useful range)."""
    B, H, Nq, Nk, Dqk, Dv, layout = case
    g = _gen(seed)
    if layout == "bnhd":
        q = _randn((B, Nq, H, Dqk), g).to(dtype).transpose(1, 2)
        k = _randn((B, Nk, H, Dqk), g).to(dtype).transpose(1, 2)
        v = _randn((B, Nk, H, Dv), g).to(dtype).transpose(1, 2)
    else:
        q, k, v = (_randn(s, g).to(dtype) for s in ((B, H, Nq, Dqk), (B, H, Nk, Dqk), (B, H, Nk, Dv)))
    go = _randn((B, H, Nq, Dv), g).to(dtype)
    return q, k, v, go, 1.5 / math.sqrt(Dqk)


def attention_run(q, k, v, go, scale, forward=None):
    """Our compiled forward (the cpu backend hands Dqk == Dv forwards, and bf16/fp16 ones with Dqk < Dv, to
    ATen's flash kernel: pass that backend forward as ``forward`` to check it) and backward."""
    out, lse = (forward or torch.ops.dagan_fast.cross_modal_attention_fwd)(q, k, v, scale)
    grads = torch.ops.dagan_fast.cross_modal_attention_bwd(go, q, k, v, out, lse, scale, [True, True, True])
    return (out, lse, *grads)


def check_attention(case, dtype, seed=0, forward=None, lse_dtype=torch.float32):
    """Checks forward (out, lse) and backward against float64; ``lse_dtype``: the precision whose rounding
    bounds the lse (float32: our kernels keep it in float32; the lse of ATen's bf16 flash kernel carries
    bfloat16-level rounding, measured 4.8e-5 at |scores| 7.4, harmless since it only feeds bf16 gradients)."""
    q, k, v, go, scale = attention_inputs(case, dtype, seed)
    got = attention_run(q, k, v, go, scale, forward)
    q64, k64, v64, go64 = (t.double() for t in (q, k, v, go))
    out64, lse64 = R.attention_forward(q64, k64, v64, scale)
    truth = (out64, lse64, *R.attention_backward(go64, q64, k64, v64, out64, lse64, scale))
    out_r, lse_r = R.attention_forward(q, k, v, scale)
    ref = (out_r, lse_r.to(torch.float32), *R.attention_backward(go, q, k, v, out_r, lse_r, scale))
    q32, k32, v32, go32 = (t.float() for t in (q, k, v, go))
    out32, lse32 = R.attention_forward(q32, k32, v32, scale)
    ref32 = tuple(t.to(r.dtype) for t, r in zip((out32, lse32, *R.attention_backward(go32, q32, k32, v32, out32,
                                                                                      lse32, scale)), ref))
    # Magnitudes: |out| <= max|v| (P sums to one); lse moves by |S| rounding; for the gradients
    # |dP_ij - delta_i| <= 2 sum_c |dO_ic| max|v|, so dQ_i <= scale 2 (sum_c |dO_ic|) max|v| max|k|,
    # dK_j <= scale 2 max|v| max|q| sum_i P_ij sum_c |dO_ic|, dV_j <= sum_i P_ij |dO_i|.
    P = torch.softmax(q64 @ k64.transpose(-1, -2) * scale, dim=-1)
    go_rows = go64.abs().sum(-1, keepdim=True)                                  # (B,H,Nq,1)
    mag_out = v64.abs().amax(dim=(-2, -1), keepdim=True).expand_as(out64)
    mag_lse = (q64.abs() @ k64.abs().transpose(-1, -2)).amax(-1) * scale + 1.0
    mag_dq = (2 * scale * go_rows * v64.abs().amax((-2, -1), keepdim=True) * k64.abs().amax((-2, -1), keepdim=True)
              ).expand_as(q64)
    mag_dk = (2 * scale * (P.transpose(-1, -2) @ go_rows) * v64.abs().amax((-2, -1), keepdim=True)
              * q64.abs().amax((-2, -1), keepdim=True)).expand_as(k64)
    mag_dv = P.transpose(-1, -2) @ go64.abs()
    # lse is float32 for every input dtype: its floor is float32's.
    return [check("attention out", got[0], truth[0], ref[0], mag_out, dtype, str(case), ref32[0]),
            check("attention lse", got[1], truth[1], ref[1], mag_lse, lse_dtype, str(case), ref32[1]),
            check("attention dq", got[2], truth[2], ref[2], mag_dq, dtype, str(case), ref32[2]),
            check("attention dk", got[3], truth[3], ref[3], mag_dk, dtype, str(case), ref32[3]),
            check("attention dv", got[4], truth[4], ref[4], mag_dv, dtype, str(case), ref32[4])]


# ---------------------------------------------------------------------------------------- motion
def motion_inputs(case, dtype, seed=0):
    """(source, logits, kp_s, jac_s, kp_d, jac_d, grad_sparse, grad_def, grad_mask): the image-like
    tensors in ``dtype``, keypoints and Jacobians float32 (the model's contract)."""
    B, K, C, H, W, layout = case
    g = _gen(seed)
    src = _randn((B, C, H, W), g).to(dtype)
    logits = _randn((B, K + 1, H, W), g, 2.0).to(dtype)
    if layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
        logits = logits.contiguous(memory_format=torch.channels_last)
    kp_s, kp_d = (_uniform((B, K, 2), g, -0.9, 0.9).float() for _ in range(2))
    eye = torch.eye(2, dtype=torch.float64)
    jac_s, jac_d = ((eye + 0.3 * _randn((B, K, 2, 2), g)).float() for _ in range(2))
    grad_sparse = _randn((B, (K + 1) * (C + 1), H, W), g).to(dtype)
    grad_def = _randn((B, H, W, 2), g).to(dtype)
    grad_mask = _randn((B, K + 1, H, W), g).to(dtype)
    return src, logits, kp_s, jac_s, kp_d, jac_d, grad_sparse, grad_def, grad_mask


def motion_run(src, logits, kp_s, jac_s, kp_d, jac_d, grad_sparse, grad_def, grad_mask, variance=0.01):
    ops = torch.ops.dagan_fast
    sparse = ops.sparse_motion_inputs_fwd(src, kp_s, jac_s, kp_d, jac_d, variance)
    sparse_grads = ops.sparse_motion_inputs_bwd(grad_sparse, src, kp_s, jac_s, kp_d, jac_d, variance, [True] * 5)
    deformation, mask = ops.dense_motion_fwd(logits, kp_s, jac_s, kp_d, jac_d)
    dense_grads = ops.dense_motion_bwd(grad_def, grad_mask, logits, kp_s, jac_s, kp_d, jac_d, [True] * 5)
    return (sparse, *sparse_grads, deformation, mask, *dense_grads)


def _motions(kp_s, jac_s, kp_d, jac_d, H, W):
    grid = R.make_coordinate_grid(H, W, torch.float64, kp_s.device)
    A, b = R.keypoint_affine(kp_s, jac_s, kp_d, jac_d)
    return grid, R.taylor_motions(A, b, grid)  # (B,K+1,H,W,2)


def check_motion(case, dtype, seed=0, variance=0.01):
    inputs = motion_inputs(case, dtype, seed)
    src, logits, kp_s, jac_s, kp_d, jac_d, g_sp, g_def, g_mask = inputs
    got = motion_run(*inputs, variance=variance)
    x64 = [t.double() for t in inputs]
    s64, l64, ks64, js64, kd64, jd64, gs64, gd64, gm64 = x64
    truth = (R.sparse_motion_inputs(s64, ks64, js64, kd64, jd64, variance),
             *R.sparse_motion_inputs_backward(gs64, s64, ks64, js64, kd64, jd64, variance, [True] * 5),
             *R.dense_motion(l64, ks64, js64, kd64, jd64),
             *R.dense_motion_backward(gd64, gm64, l64, ks64, js64, kd64, jd64, [True] * 5))
    ref = (R.sparse_motion_inputs(src, kp_s, jac_s, kp_d, jac_d, variance),
           *R.sparse_motion_inputs_backward(g_sp, src, kp_s, jac_s, kp_d, jac_d, variance, [True] * 5),
           *R.dense_motion(logits, kp_s, jac_s, kp_d, jac_d),
           *R.dense_motion_backward(g_def, g_mask, logits, kp_s, jac_s, kp_d, jac_d, [True] * 5))
    x32 = [t.float() for t in inputs]
    s32, l32, ks32, js32, kd32, jd32, gs32, gd32, gm32 = x32
    ref32 = (R.sparse_motion_inputs(s32, ks32, js32, kd32, jd32, variance),
             *R.sparse_motion_inputs_backward(gs32, s32, ks32, js32, kd32, jd32, variance, [True] * 5),
             *R.dense_motion(l32, ks32, js32, kd32, jd32),
             *R.dense_motion_backward(gd32, gm32, l32, ks32, js32, kd32, jd32, [True] * 5))
    ref32 = tuple(t.to(r.dtype) for t, r in zip(ref32, ref))
    B, K, C, H, W, _ = case
    grid, T = _motions(ks64, js64, kd64, jd64, H, W)
    t_max = float(T.abs().max())
    # Sparse: heat values are differences of two Gaussians (<= 1), warped values <= max|source|.
    mag_sparse = max(1.0, float(s64.abs().max()))
    mag_gsrc = R.sparse_motion_inputs_backward(gs64.abs(), s64, ks64, js64, kd64, jd64, variance,
                                               [True, False, False, False, False])[0]
    # Keypoint gradients are sums over the H x W pixels of products of |grad| with coordinate
    # derivatives of the sample (<= 2 max|source| size/2 per unit of motion, times |z| or 1, times the
    # Jacobian factors) and of the heat (<= |z - kp| / variance); a common bound per batch element.
    jac_f = float(torch.cat([js64.abs().flatten(), jd64.abs().flatten(), torch.ones(1, dtype=torch.float64)]).max())
    jd_inv = float(torch.linalg.inv(jd64).abs().max())
    per_pixel = (2 * float(s64.abs().max()) * max(H, W) * (1 + t_max) * jac_f * max(1.0, jd_inv) ** 2
                 + 2 * 2.0 / variance)
    mag_kp_sparse = float(gs64.abs().sum()) * per_pixel
    mag_def = t_max  # a convex combination of the motions
    mag_glog = 2 * (float(gm64.abs().max()) + 2 * float(gd64.abs().max()) * t_max)
    mag_kp_dense = float(gd64.abs().sum()) * (1 + t_max) * jac_f * max(1.0, jd_inv) ** 2 * 4
    names = ["sparse out", "sparse grad_source", "sparse grad_kp_source", "sparse grad_jac_source",
             "sparse grad_kp_driving", "sparse grad_jac_driving", "dense deformation", "dense mask",
             "dense grad_logits", "dense grad_kp_source", "dense grad_jac_source", "dense grad_kp_driving",
             "dense grad_jac_driving"]
    mags = [mag_sparse, mag_gsrc, *[mag_kp_sparse] * 4, mag_def, 1.0, mag_glog, *[mag_kp_dense] * 4]
    results = []
    for i, (name, mag) in enumerate(zip(names, mags)):
        # Keypoint gradients come back in the keypoints' dtype (float32): float32's floor.
        kp_grad = "kp" in name or "jac" in name
        assert got[i].dtype == (torch.float32 if kp_grad else dtype), (name, got[i].dtype)
        results.append(check(f"motion {name}", got[i], truth[i], ref[i], mag, torch.float32 if kp_grad else dtype,
                             str(case), ref32[i]))
    return results


# (batch, C, Co, H, W, pad, upsample, pre-activation, residual, relu): channel counts off the 16-lane steps,
# sizes off the 4x4 tiles
WINOGRAD_CASES = [(1, 19, 21, 13, 6, 1, False, False, False, False), (2, 33, 17, 9, 10, 1, True, True, False, True),
                  (1, 16, 32, 8, 8, 1, False, True, True, True), (1, 5, 3, 7, 11, 0, False, False, True, False),
                  (1, 7, 9, 5, 4, 2, True, False, False, True)]


# G of F(4x4, 3x3) (Lavin & Gray), points 0, +-1, +-2 and infinity (6x3)
WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
              (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def winograd_filter_reference(weight: torch.Tensor, transposed: bool = False, magnitude: bool = False):
    """``dagan_fast::winograd_filter`` in float64: G g G^T of (Co,C,3,3) filters as (36,C,Co), or of their
    flipped transpose (the input gradient's filters) as (36,Co,C); ``magnitude``: the same with |G| and |g|
    (what each entry adds up, for rounding bounds)."""
    g = torch.tensor(WINOGRAD_G, dtype=torch.float64)
    w = weight.detach().double()
    if transposed:
        w = w.flip(2, 3).transpose(0, 1)
    if magnitude:
        g, w = g.abs(), w.abs()
    return torch.einsum("ia,ocab,jb->ijco", g, w, g).reshape(36, w.shape[1], w.shape[0])


def check_winograd_filter(seed=0) -> List[Dict]:
    """The float32 filter transform (one (36,9) matrix product per filter) against float64, within 16 units of
    float32 rounding of what each entry adds up, for the forward and the flipped (input gradient) filters."""
    g = _gen(seed)
    w = _randn((7, 13, 3, 3), g).float()
    results = []
    for transposed in (False, True):
        got = torch.ops.dagan_fast.winograd_filter(w, transposed)
        want = winograd_filter_reference(w, transposed)
        err = (got.double() - want).abs()
        bound = 16 * EPS[torch.float32] * winograd_filter_reference(w, transposed, magnitude=True)
        assert got.shape == want.shape and got.dtype == torch.float32 and float((err - bound).max()) <= 0, \
            f"winograd_filter transposed={transposed}: error {float(err.max()):.3e}"
        results.append({"name": "winograd filter", "case": f"transposed={transposed}", "dtype": str(torch.float32),
                        "err": float(err.max())})
    return results


def check_winograd(case, seed=0) -> List[Dict]:
    """The float32 Winograd convolution against float64, within 1e-5 of the sum of |w| |x| each output adds
    up (the transforms amplify rounding ~4x over a direct convolution); for plain cases also its input and
    filter gradients."""
    import torch.nn.functional as F

    B, C, Co, H, W, pad, upsample, pre, residual, relu = case
    g = _gen(seed)
    x, w, b = _randn((B, C, H, W), g), _randn((Co, C, 3, 3), g, 1 / (3 * C ** 0.5)), _randn((Co,), g)
    scale, shift = _uniform((C,), g, 0.5, 1.5), _randn((C,), g)
    src = F.interpolate(x, scale_factor=2.0) if upsample else x
    if pre:
        src = F.relu(src * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    truth = F.conv2d(src, w, b, padding=pad)
    res = _randn(truth.shape, g) if residual else None
    if res is not None:
        truth = truth + res
    if relu:
        truth = F.relu(truth)
    got = torch.ops.dagan_fast.winograd_conv3x3(
        x.float(), torch.ops.dagan_fast.winograd_filter(w.float(), False), b.float(), scale.float() if pre else None,
        shift.float() if pre else None, upsample, pad, relu, None if res is None else res.float())
    magnitude = F.conv2d(src.abs(), w.abs(), b.abs(), padding=pad) + (res.abs() if res is not None else 0)
    err = (got.double() - truth).abs()
    assert got.shape == truth.shape and torch.isfinite(got).all(), ("winograd", case)
    worst = float((err - 1e-5 * magnitude).max())
    assert worst <= 0, f"winograd {case}: error {float(err.max()):.3e} exceeds 1e-5 of |w||x| by {worst:.3e}"
    results = [{"name": "winograd out", "case": str(case), "dtype": str(torch.float32), "err": float(err.max())}]
    if upsample or pre or residual or relu:
        return results
    # the training kernels of a plain convolution: input gradient (flipped filters), filter gradient, both
    # with NCHW (transposed in blocks) and channels_last operands
    gy = _randn(truth.shape, g)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    gx_truth, gw_truth = torch.autograd.grad(F.conv2d(xr, wr, b, padding=pad), [xr, wr], gy)
    ops = torch.ops.dagan_fast
    for channels_last in (False, True):
        gyf = gy.float()
        xf = x.float()
        if channels_last:
            gyf, xf = ops.as_channels_last(gyf), ops.as_channels_last(xf)
            assert torch.equal(gyf, gy.float()) and gyf.is_contiguous(memory_format=torch.channels_last)
        gx = ops.winograd_conv3x3(gyf, ops.winograd_filter(w.float(), True), None, None, None, False, 2 - pad,
                                  False, None, channels_last)
        gw = ops.winograd_conv3x3_weight_grad(xf, gyf, pad)
        bound_x = 1e-5 * F.conv2d(gy.abs(), w.abs().flip(2, 3).transpose(0, 1), padding=2 - pad)
        bound_w = 1e-5 * torch.nn.grad.conv2d_weight(x.abs(), w.shape, gy.abs(), padding=pad)
        for name, got_, want, bound in (("winograd input grad", gx, gx_truth, bound_x),
                                        ("winograd filter grad", gw, gw_truth, bound_w)):
            e = (got_.double() - want).abs()
            assert got_.shape == want.shape and float((e - bound).max()) <= 0, \
                f"{name} {case} channels_last={channels_last}: error {float(e.max()):.3e}"
            results.append({"name": name, "case": str(case), "dtype": str(torch.float32), "err": float(e.max())})
    return results


# (B, C, Co, H, W, kh, kw, pad_h, pad_w, layout): DaGAN's last convolution at a small size, channels not a
# multiple of 8 or 16, 1x1 and rectangular kernels, unequal padding, images narrower than the kernel,
# NCHW / channels_last inputs
NARROW_CASES = [(1, 64, 3, 19, 37, 7, 7, 3, 3, "channels_last"), (2, 5, 1, 13, 17, 3, 3, 1, 1, "nchw"),
                (1, 35, 2, 9, 30, 7, 7, 3, 3, "channels_last"), (1, 17, 4, 9, 11, 5, 3, 0, 2, "nchw"),
                (3, 48, 3, 4, 2, 7, 7, 3, 3, "channels_last"), (1, 3, 4, 6, 5, 1, 1, 0, 0, "nchw"),
                (1, 16, 1, 1, 40, 1, 9, 0, 4, "channels_last")]


def check_narrow_conv(case, seed=0) -> List[Dict]:
    """The float32 narrow convolution (1-4 output channels) against float64, in both output layouts, within
    the first-order rounding bound of its summation order: ceil(C/8) kh kw sequential adds per lane, 8 more
    across lanes and the bias, times 2^-24 times the sum of |w| |x| an output adds up."""
    import torch.nn.functional as F

    B, C, Co, H, W, kh, kw, ph, pw, layout = case
    g = _gen(seed)
    x, w, b = _randn((B, C, H, W), g), _randn((Co, C, kh, kw), g, 1 / (kh * kw * C) ** 0.5), _randn((Co,), g)
    truth = F.conv2d(x, w, b, padding=(ph, pw))
    magnitude = F.conv2d(x.abs(), w.abs(), b.abs(), padding=(ph, pw))
    bound = (-(-C // 8) * kh * kw + 9) * EPS[torch.float32] * magnitude
    xf = x.float().contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.float()
    results = []
    for channels_last in (True, False):
        got = torch.ops.dagan_fast.narrow_conv2d(xf, w.float(), b.float(), ph, pw, channels_last)
        err = (got.double() - truth).abs()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert got.shape == truth.shape and got.is_contiguous(memory_format=fmt), ("narrow conv", case)
        assert torch.isfinite(got).all() and float((err - bound).max()) <= 0, \
            f"narrow conv {case} channels_last={channels_last}: error {float(err.max()):.3e}"
        results.append({"name": "narrow conv", "case": str(case), "dtype": str(torch.float32),
                        "err": float(err.max())})
    return results


def run_all(dtypes=(torch.float32, torch.bfloat16)) -> Dict:
    """Every case of every kernel, forward and backward, in each dtype; raises on the first failure."""
    report = {"capability": torch.ops.dagan_fast.cpu_capability(), "aten": torch.backends.cpu.get_cpu_capability(),
              "results": []}
    for dtype in dtypes:
        for case in WARP_CASES:
            report["results"] += check_warp(case, dtype)
        for case in ATTENTION_CASES:
            report["results"] += check_attention(case, dtype)
        for case in MOTION_CASES:
            report["results"] += check_motion(case, dtype)
    if torch.float32 in dtypes and hasattr(torch.ops.dagan_fast, "narrow_conv2d"):
        report["results"] += check_winograd_filter()
        for case in NARROW_CASES:
            report["results"] += check_narrow_conv(case)
        for case in WINOGRAD_CASES:
            report["results"] += check_winograd(case)
    return report


if __name__ == "__main__":
    import dagan_fast  # noqa: F401  (loads the compiled library)

    print(json.dumps(run_all()))
    sys.exit(0)
