"""Triton kernels for the sparse-to-dense Taylor motion ops (``sparse_motion_inputs``, ``dense_motion``).

The per-keypoint affine T_k(z) = A_k z + b_k (A_k = J_s inv(J_d) with the determinant floor) is O(B*K)
work and is computed once in a torch prologue by ``reference.keypoint_affine``; its backward reuses
``reference``'s closed form the same way. Everything per pixel runs in the kernels below: one program
per tile of pixels of one image, looping over the K+1 motions (row 0 of every parameter table is the
identity motion, so the background needs no special case).

Math runs in float32 (float64 for float64 inputs); float16/bfloat16 outputs are rounded once at the
end. Keypoint/Jacobian gradients are per-program partial sums written to a (B, K+1, tiles, n) buffer
and summed in torch (deterministic); the source gradient is scattered with atomics into a float32
(float64) buffer, so on a GPU its last bits may differ from run to run.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _backends
from .. import reference
from ._support import GPU_DTYPES, flag_variants, launch_spec, poison_enabled, ptr_types

Tensor = torch.Tensor

# The parameter tables are (B, K+1, n) per-motion rows, row 0 the identity motion: sparse n = 11
# (A (4), b (2), kp_driving (2), kp_source (2), variance), dense n = 6 (A, b). Partial sums per
# (b, k, tile): sparse dA (4), db (2), sum g G_d (z - kp_d) (2), sum g G_s (z - kp_s) (2); dense dA, db.
_SPARSE_PARTS = 10
_DENSE_PARTS = 6


# ------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _load_affine(p):
    """The motion's affine (A row-major, then b) from the first six entries of its parameter row."""
    return tl.load(p + 0), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4), tl.load(p + 5)


@triton.jit
def _pixel_coords(pix, W, wden, hden, xs, xo, ys, yo, ct: tl.constexpr):
    """(x, y) of make_coordinate_grid at flat pixel indices: xs * (col / wden) - xo with (xs, xo) =
    (2, 1), or (0, 0) for a size-1 axis (whose single coordinate is 0)."""
    row = pix // W
    col = pix - row * W
    x = xs * (col.to(ct) / wden) - xo
    y = ys * (row.to(ct) / hden) - yo
    return x, y


@triton.jit
def _bilinear_setup(tx, ty, W, H, valid):
    """grid_sample (bilinear, zeros padding, align_corners=False) taps of the point (tx, ty): the
    top-left corner, its fractions, and which of the four corners lie inside the image.
    Any coordinate beyond +-(1 + 2/size) reads only zero padding; clamping to +-3 (as the reference
    warp does) changes nothing there but keeps the ~1e6 motions of near-singular Jacobians from
    overflowing the integer corner indices."""
    tx = tl.minimum(tl.maximum(tx, -3.0), 3.0)
    ty = tl.minimum(tl.maximum(ty, -3.0), 3.0)
    ix = ((tx + 1.0) * W - 1.0) / 2.0
    iy = ((ty + 1.0) * H - 1.0) / 2.0
    ix0f = tl.floor(ix)
    iy0f = tl.floor(iy)
    fx = ix - ix0f
    fy = iy - iy0f
    gx = (ix0f + 1.0) - ix      # ix_se - ix, as PyTorch forms the weight
    gy = (iy0f + 1.0) - iy
    ix0 = ix0f.to(tl.int32)
    iy0 = iy0f.to(tl.int32)
    in_x0 = (ix0 >= 0) & (ix0 < W)
    in_x1 = (ix0 >= -1) & (ix0 < W - 1)
    in_y0 = (iy0 >= 0) & (iy0 < H)
    in_y1 = (iy0 >= -1) & (iy0 < H - 1)
    m00 = valid & in_x0 & in_y0
    m01 = valid & in_x1 & in_y0
    m10 = valid & in_x0 & in_y1
    m11 = valid & in_x1 & in_y1
    return ix0, iy0, fx, fy, gx, gy, m00, m01, m10, m11


# ------------------------------------------------------------------------------------ sparse kernels
@triton.jit
def _sparse_fwd_kernel(
    src_ptr,    # pointer, (B, C, H, W) any strides: the source image
    prm_ptr,    # pointer, (B, K+1, 11) contiguous, compute dtype: A, b, kp_d, kp_s, variance; row 0 identity
    out_ptr,    # pointer, (B, (K+1)(C+1), H, W) contiguous: [heat_k, warped channels] for k = 0..K
    C, H, W, K1,                    # channels, height, width, K+1
    s_sb, s_sc, s_sh, s_sw,         # source strides (elements)
    wden, hden, xs, xo, ys, yo,     # coordinate grid: x = xs * (col / wden) - xo (see _pixel_coords)
    BLOCK: tl.constexpr,            # pixels per program
):
    ct = prm_ptr.dtype.element_ty
    ot = out_ptr.dtype.element_ty
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    x, y = _pixel_coords(pix, W, wden, hden, xs, xo, ys, yo, ct)
    src_b = src_ptr + b * s_sb
    out_b = out_ptr + b * K1 * (C + 1) * HW
    for k in range(0, K1):
        p = prm_ptr + (b * K1 + k) * 11
        a00, a01, a10, a11, b0, b1 = _load_affine(p)
        kdx = tl.load(p + 6)
        kdy = tl.load(p + 7)
        ksx = tl.load(p + 8)
        ksy = tl.load(p + 9)
        var = tl.load(p + 10)
        # Row 0 has kp_d = kp_s, so the two Gaussians are bitwise equal and heat_0 is exactly 0.
        dxd = x - kdx
        dyd = y - kdy
        dxs = x - ksx
        dys = y - ksy
        heat = tl.exp(-0.5 * (dxd * dxd + dyd * dyd) / var) - tl.exp(-0.5 * (dxs * dxs + dys * dys) / var)
        out_k = out_b + k * (C + 1) * HW
        tl.store(out_k + pix, heat.to(ot), mask=valid)
        tx = tl.fma(a01, y, a00 * x) + b0
        ty = tl.fma(a11, y, a10 * x) + b1
        ix0, iy0, fx, fy, gx, gy, m00, m01, m10, m11 = _bilinear_setup(tx, ty, W, H, valid)
        w00 = gx * gy
        w01 = fx * gy
        w10 = gx * fy
        w11 = fx * fy
        off = iy0.to(tl.int64) * s_sh + ix0.to(tl.int64) * s_sw
        for c in range(0, C):
            sc = src_b + c * s_sc + off
            v00 = tl.load(sc, mask=m00, other=0.0).to(ct)
            v01 = tl.load(sc + s_sw, mask=m01, other=0.0).to(ct)
            v10 = tl.load(sc + s_sh, mask=m10, other=0.0).to(ct)
            v11 = tl.load(sc + s_sh + s_sw, mask=m11, other=0.0).to(ct)
            val = v00 * w00 + v01 * w01 + v10 * w10 + v11 * w11
            tl.store(out_k + (1 + c) * HW + pix, val.to(ot), mask=valid)


@triton.jit
def _sparse_bwd_kernel(
    grad_ptr,   # pointer, (B, (K+1)(C+1), H, W) any strides: upstream gradient
    src_ptr,    # pointer, (B, C, H, W) any strides: the source image
    prm_ptr,    # pointer, (B, K+1, 11) contiguous, compute dtype: as in _sparse_fwd_kernel
    gsrc_ptr,   # pointer, (B, C, H, W) contiguous, compute dtype, zero-filled: source gradient (atomics)
    part_ptr,   # pointer, (B, K+1, tiles, 10) contiguous, compute dtype: per-program keypoint partial sums
    C, H, W, K1, n_tiles,           # channels, height, width, K+1, programs per image
    g_sb, g_sc, g_sh, g_sw,         # upstream gradient strides (elements)
    s_sb, s_sc, s_sh, s_sw,         # source strides (elements)
    wden, hden, xs, xo, ys, yo,     # coordinate grid (see _pixel_coords)
    NEED_SRC: tl.constexpr,         # scatter the source gradient
    NEED_KP: tl.constexpr,          # write the keypoint partial sums
    BLOCK: tl.constexpr,            # pixels per program
):
    ct = prm_ptr.dtype.element_ty
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    x, y = _pixel_coords(pix, W, wden, hden, xs, xo, ys, yo, ct)
    row = pix // W
    g_pix = row.to(tl.int64) * g_sh + (pix - row * W).to(tl.int64) * g_sw
    src_b = src_ptr + b * s_sb
    gsrc_b = gsrc_ptr + b * C * HW
    grad_b = grad_ptr + b * g_sb
    for k in range(0, K1):
        p = prm_ptr + (b * K1 + k) * 11
        a00, a01, a10, a11, b0, b1 = _load_affine(p)
        tx = tl.fma(a01, y, a00 * x) + b0
        ty = tl.fma(a11, y, a10 * x) + b1
        ix0, iy0, fx, fy, gx, gy, m00, m01, m10, m11 = _bilinear_setup(tx, ty, W, H, valid)
        w00 = gx * gy
        w01 = fx * gy
        w10 = gx * fy
        w11 = fx * fy
        off_s = iy0.to(tl.int64) * s_sh + ix0.to(tl.int64) * s_sw
        off_g = iy0.to(tl.int64) * W + ix0.to(tl.int64)
        gix = tl.zeros([BLOCK], dtype=ct)
        giy = tl.zeros([BLOCK], dtype=ct)
        for c in range(0, C):
            g = tl.load(grad_b + (k * (C + 1) + 1 + c) * g_sc + g_pix, mask=valid, other=0.0).to(ct)
            if NEED_SRC:
                gs = gsrc_b + c * HW + off_g
                tl.atomic_add(gs, g * w00, mask=m00, sem="relaxed")
                tl.atomic_add(gs + 1, g * w01, mask=m01, sem="relaxed")
                tl.atomic_add(gs + W, g * w10, mask=m10, sem="relaxed")
                tl.atomic_add(gs + W + 1, g * w11, mask=m11, sem="relaxed")
            if NEED_KP:
                sc = src_b + c * s_sc + off_s
                v00 = tl.load(sc, mask=m00, other=0.0).to(ct)
                v01 = tl.load(sc + s_sw, mask=m01, other=0.0).to(ct)
                v10 = tl.load(sc + s_sh, mask=m10, other=0.0).to(ct)
                v11 = tl.load(sc + s_sh + s_sw, mask=m11, other=0.0).to(ct)
                gix += g * ((v01 - v00) * gy + (v11 - v10) * fy)
                giy += g * ((v10 - v00) * gx + (v11 - v01) * fx)
        if NEED_KP:
            kdx = tl.load(p + 6)
            kdy = tl.load(p + 7)
            ksx = tl.load(p + 8)
            ksy = tl.load(p + 9)
            var = tl.load(p + 10)
            gh = tl.load(grad_b + (k * (C + 1)) * g_sc + g_pix, mask=valid, other=0.0).to(ct)
            dxd = x - kdx
            dyd = y - kdy
            dxs = x - ksx
            dys = y - ksy
            wd = gh * tl.exp(-0.5 * (dxd * dxd + dyd * dyd) / var)
            ws = gh * tl.exp(-0.5 * (dxs * dxs + dys * dys) / var)
            # d(pixel)/d(normalised coordinate) = size / 2 for align_corners=False.
            mx = gix * (W / 2.0)
            my = giy * (H / 2.0)
            q = part_ptr + ((b * K1 + k) * n_tiles + tile) * 10
            tl.store(q + 0, tl.sum(mx * x, axis=0))
            tl.store(q + 1, tl.sum(mx * y, axis=0))
            tl.store(q + 2, tl.sum(my * x, axis=0))
            tl.store(q + 3, tl.sum(my * y, axis=0))
            tl.store(q + 4, tl.sum(mx, axis=0))
            tl.store(q + 5, tl.sum(my, axis=0))
            tl.store(q + 6, tl.sum(wd * dxd, axis=0))
            tl.store(q + 7, tl.sum(wd * dyd, axis=0))
            tl.store(q + 8, tl.sum(ws * dxs, axis=0))
            tl.store(q + 9, tl.sum(ws * dys, axis=0))


# ------------------------------------------------------------------------------------ dense kernels
@triton.jit
def _softmax_stats(lg_ptr, l_off, l_sk, valid, K1, ct: tl.constexpr, BLOCK: tl.constexpr):
    """Per-pixel max and sum of exp(logit - max) over the K+1 logits."""
    mx = tl.full([BLOCK], float("-inf"), dtype=ct)
    for k in range(0, K1):
        lk = tl.load(lg_ptr + k * l_sk + l_off, mask=valid, other=0.0).to(ct)
        mx = tl.maximum(mx, lk)
    s = tl.zeros([BLOCK], dtype=ct)
    for k in range(0, K1):
        lk = tl.load(lg_ptr + k * l_sk + l_off, mask=valid, other=0.0).to(ct)
        s += tl.exp(lk - mx)
    return mx, s


@triton.jit
def _dense_fwd_kernel(
    lg_ptr,     # pointer, (B, K+1, H, W) any strides: mask logits
    prm_ptr,    # pointer, (B, K+1, 6) contiguous, compute dtype: A, b per motion; row 0 identity
    def_ptr,    # pointer, (B, H, W, 2) contiguous: deformation
    mask_ptr,   # pointer, (B, K+1, H, W) contiguous: softmax mask
    H, W, K1,                       # height, width, K+1
    l_sb, l_sk, l_sh, l_sw,         # logit strides (elements)
    wden, hden, xs, xo, ys, yo,     # coordinate grid (see _pixel_coords)
    out_max,                        # finite bound of the output dtype (used when CLAMP)
    CLAMP: tl.constexpr,            # low-precision output: ~1e6 motions must not round to inf
    BLOCK: tl.constexpr,            # pixels per program
):
    ct = prm_ptr.dtype.element_ty
    ot = def_ptr.dtype.element_ty
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    x, y = _pixel_coords(pix, W, wden, hden, xs, xo, ys, yo, ct)
    row = pix // W
    l_off = row.to(tl.int64) * l_sh + (pix - row * W).to(tl.int64) * l_sw
    lg_b = lg_ptr + b * l_sb
    mx, s = _softmax_stats(lg_b, l_off, l_sk, valid, K1, ct, BLOCK)
    dx = tl.zeros([BLOCK], dtype=ct)
    dy = tl.zeros([BLOCK], dtype=ct)
    for k in range(0, K1):
        p = prm_ptr + (b * K1 + k) * 6
        a00, a01, a10, a11, b0, b1 = _load_affine(p)
        lk = tl.load(lg_b + k * l_sk + l_off, mask=valid, other=0.0).to(ct)
        mk = tl.exp(lk - mx) / s
        tl.store(mask_ptr + (b * K1 + k) * HW + pix, mk.to(ot), mask=valid)
        dx += mk * (tl.fma(a01, y, a00 * x) + b0)
        dy += mk * (tl.fma(a11, y, a10 * x) + b1)
    if CLAMP:
        dx = tl.minimum(tl.maximum(dx, -out_max), out_max)
        dy = tl.minimum(tl.maximum(dy, -out_max), out_max)
    d_b = def_ptr + b * HW * 2
    tl.store(d_b + pix * 2, dx.to(ot), mask=valid)
    tl.store(d_b + pix * 2 + 1, dy.to(ot), mask=valid)


@triton.jit
def _dense_bwd_kernel(
    gd_ptr,     # pointer, (B, H, W, 2) any strides: gradient of the deformation
    gm_ptr,     # pointer, (B, K+1, H, W) any strides: gradient of the mask
    lg_ptr,     # pointer, (B, K+1, H, W) any strides: mask logits
    prm_ptr,    # pointer, (B, K+1, 6) contiguous, compute dtype: A, b per motion; row 0 identity
    glg_ptr,    # pointer, (B, K+1, H, W) contiguous: gradient of the logits (written when NEED_LOGITS)
    part_ptr,   # pointer, (B, K+1, tiles, 6) contiguous, compute dtype: per-program dA, db partial sums
    H, W, K1, n_tiles,              # height, width, K+1, programs per image
    d_sb, d_sh, d_sw, d_s2,         # deformation-gradient strides (elements)
    m_sb, m_sk, m_sh, m_sw,         # mask-gradient strides (elements)
    l_sb, l_sk, l_sh, l_sw,         # logit strides (elements)
    wden, hden, xs, xo, ys, yo,     # coordinate grid (see _pixel_coords)
    out_max,                        # finite bound of the output dtype (used when CLAMP)
    NEED_LOGITS: tl.constexpr,      # write the logit gradient
    NEED_KP: tl.constexpr,          # write the keypoint partial sums
    CLAMP: tl.constexpr,            # low-precision output: clamp to its finite range
    BLOCK: tl.constexpr,            # pixels per program
):
    ct = prm_ptr.dtype.element_ty
    ot = glg_ptr.dtype.element_ty
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HW = H * W
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    valid = pix < HW
    x, y = _pixel_coords(pix, W, wden, hden, xs, xo, ys, yo, ct)
    row = pix // W
    r64 = row.to(tl.int64)
    c64 = (pix - row * W).to(tl.int64)
    l_off = r64 * l_sh + c64 * l_sw
    m_off = r64 * m_sh + c64 * m_sw
    lg_b = lg_ptr + b * l_sb
    gm_b = gm_ptr + b * m_sb
    d_off = gd_ptr + b * d_sb + r64 * d_sh + c64 * d_sw
    gdx = tl.load(d_off, mask=valid, other=0.0).to(ct)
    gdy = tl.load(d_off + d_s2, mask=valid, other=0.0).to(ct)
    mx, s = _softmax_stats(lg_b, l_off, l_sk, valid, K1, ct, BLOCK)
    # sum_k mask_k grad_m_k with grad_m_k = grad_mask_k + <grad_deformation, T_k(z)>
    dot = tl.zeros([BLOCK], dtype=ct)
    for k in range(0, K1):
        p = prm_ptr + (b * K1 + k) * 6
        a00, a01, a10, a11, b0, b1 = _load_affine(p)
        lk = tl.load(lg_b + k * l_sk + l_off, mask=valid, other=0.0).to(ct)
        mk = tl.exp(lk - mx) / s
        if NEED_LOGITS:
            gmk = tl.load(gm_b + k * m_sk + m_off, mask=valid, other=0.0).to(ct)
            gmk = gmk + (gdx * (tl.fma(a01, y, a00 * x) + b0) + gdy * (tl.fma(a11, y, a10 * x) + b1))
            dot += mk * gmk
        if NEED_KP:
            # Masked-off pixels have zero upstream gradient, so they add nothing to the sums.
            mgx = mk * gdx
            mgy = mk * gdy
            q = part_ptr + ((b * K1 + k) * n_tiles + tile) * 6
            tl.store(q + 0, tl.sum(mgx * x, axis=0))
            tl.store(q + 1, tl.sum(mgx * y, axis=0))
            tl.store(q + 2, tl.sum(mgy * x, axis=0))
            tl.store(q + 3, tl.sum(mgy * y, axis=0))
            tl.store(q + 4, tl.sum(mgx, axis=0))
            tl.store(q + 5, tl.sum(mgy, axis=0))
    if NEED_LOGITS:
        for k in range(0, K1):
            p = prm_ptr + (b * K1 + k) * 6
            a00, a01, a10, a11, b0, b1 = _load_affine(p)
            lk = tl.load(lg_b + k * l_sk + l_off, mask=valid, other=0.0).to(ct)
            mk = tl.exp(lk - mx) / s
            gmk = tl.load(gm_b + k * m_sk + m_off, mask=valid, other=0.0).to(ct)
            gmk = gmk + (gdx * (tl.fma(a01, y, a00 * x) + b0) + gdy * (tl.fma(a11, y, a10 * x) + b1))
            gl = mk * (gmk - dot)
            if CLAMP:
                gl = tl.minimum(tl.maximum(gl, -out_max), out_max)
            tl.store(glg_ptr + (b * K1 + k) * HW + pix, gl.to(ot), mask=valid)


# ------------------------------------------------------------------------------------ launchers
def _new_output(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A fresh contiguous output; NaN-filled under DAGAN_FAST_POISON so unwritten elements show."""
    dtype = dtype or like.dtype
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _to_finite(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Rounds a float32 result to ``dtype``, clamping to its finite range (as the reference does)."""
    if t.dtype == dtype:
        return t
    limit = torch.finfo(dtype).max
    return t.clamp(-limit, limit).to(dtype)


# Pixels per program a GPU launch picks from (launch_specs() compiles each): 256, or the image rounded
# up to a power of two for images of fewer pixels, at least 64.
GPU_BLOCKS = (64, 128, 256)


def _warps(block: int) -> int:
    return 4 if block >= 128 else 1


def _block(hw: int, device: torch.device) -> Tuple[int, int]:
    """(pixels per program, warps): big blocks under the interpreter, whose cost is per program."""
    if device.type == "cpu":
        block = max(16, min(4096, triton.next_power_of_2(hw)))
    else:
        block = max(GPU_BLOCKS[0], min(GPU_BLOCKS[-1], triton.next_power_of_2(hw)))
    return block, _warps(block)


def _grid_args(H: int, W: int) -> Tuple[int, int, int, int, int, int]:
    """(wden, hden, xs, xo, ys, yo) so that x = xs * (col / wden) - xo is make_coordinate_grid's x:
    2 * (col / (W-1)) - 1, or 0 on a size-1 axis."""
    return max(W - 1, 1), max(H - 1, 1), 2 if W > 1 else 0, 1 if W > 1 else 0, 2 if H > 1 else 0, \
        1 if H > 1 else 0


def _keypoint_tensors(kp_s, jac_s, kp_d, jac_d, ct):
    up = lambda t: t.to(ct) if t is not None else None  # noqa: E731
    return up(kp_s), up(jac_s), up(kp_d), up(jac_d)


def _affine_table(kp_s, jac_s, kp_d, jac_d, extra: Sequence[Tensor] = ()) -> Tensor:
    """(B, K+1, 6 + extra columns): row 0 the identity motion (zeros in the extra columns), then A_k, b_k."""
    A, bvec = reference.keypoint_affine(kp_s, jac_s, kp_d, jac_d)
    B, K = kp_s.shape[:2]
    rows = torch.cat([A.reshape(B, K, 4), bvec, *extra], dim=-1)
    first = torch.zeros((B, 1, rows.shape[-1]), dtype=rows.dtype, device=rows.device)
    first[..., 0] = 1.0
    first[..., 3] = 1.0
    return torch.cat([first, rows], dim=1).contiguous()


def _sparse_table(kp_s, jac_s, kp_d, jac_d, variance: float) -> Tensor:
    B, K = kp_s.shape[:2]
    var = torch.full((B, K, 1), variance, dtype=kp_s.dtype, device=kp_s.device)
    table = _affine_table(kp_s, jac_s, kp_d, jac_d, (kp_d, kp_s, var))
    table[:, 0, 10] = variance   # row 0: kp_d = kp_s = 0, so heat_0 = G - G = 0 exactly
    return table


def _cast_grads(grads, likes, want, empty_like: Tensor) -> List[Tensor]:
    """Rounds the asked-for keypoint gradients to their input's dtype; distinct empties elsewhere."""
    return [_to_finite(g, like.dtype).contiguous() if w else empty_like.new_empty((0,))
            for g, like, w in zip(grads, likes, want)]


def sparse_forward(source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                   jac_driving: Optional[Tensor], variance: float) -> Tensor:
    """source (B,C,H,W), kp (B,K,2), jac (B,K,2,2) or None -> (B,(K+1)(C+1),H,W), [heat_k, warped
    source channels] for k = 0..K (see ``dagan_fast.ops.sparse_motion_inputs``)."""
    B, C, H, W = source.shape
    K = kp_source.shape[1]
    out = _new_output((B, (K + 1) * (C + 1), H, W), source)
    if out.numel() == 0:
        return out
    ct = _compute_dtype(source.dtype)
    table = _sparse_table(*_keypoint_tensors(kp_source, jac_source, kp_driving, jac_driving, ct), float(variance))
    block, warps = _block(H * W, source.device)
    grid = (triton.cdiv(H * W, block), B)
    _sparse_fwd_kernel[grid](source, table, out, C, H, W, K + 1, *source.stride(), *_grid_args(H, W),
                             BLOCK=block, num_warps=warps)
    return out


def sparse_backward(grad: Tensor, source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor],
                    kp_driving: Tensor, jac_driving: Optional[Tensor], variance: float,
                    output_mask: Sequence[bool]) -> Tuple[Tensor, ...]:
    """Gradients (source (B,C,H,W), kp_source (B,K,2), jac_source (B,K,2,2), kp_driving, jac_driving)
    from grad (B,(K+1)(C+1),H,W); empty tensors where not asked for or where the Jacobian is None."""
    B, C, H, W = source.shape
    K = kp_source.shape[1]
    want_src = bool(output_mask[0])
    want = [bool(output_mask[1]), bool(output_mask[2]) and jac_source is not None, bool(output_mask[3]),
            bool(output_mask[4]) and jac_driving is not None]
    want_kp = any(want)
    ct = _compute_dtype(source.dtype)
    kps, jacs, kpd, jacd = _keypoint_tensors(kp_source, jac_source, kp_driving, jac_driving, ct)
    gsrc = torch.zeros((B, C, H, W), dtype=ct, device=source.device)
    block, warps = _block(H * W, source.device)
    n_tiles = triton.cdiv(H * W, block)
    parts = _new_output((B, K + 1, n_tiles, _SPARSE_PARTS), source, ct) if want_kp else gsrc.new_empty((0,))
    if (want_src or want_kp) and B * H * W > 0:
        table = _sparse_table(kps, jacs, kpd, jacd, float(variance))
        _sparse_bwd_kernel[(n_tiles, B)](grad, source, table, gsrc, parts, C, H, W, K + 1, n_tiles,
                                         *grad.stride(), *source.stride(), *_grid_args(H, W),
                                         NEED_SRC=want_src, NEED_KP=want_kp, BLOCK=block, num_warps=warps)
    grad_source = _to_finite(gsrc, source.dtype).contiguous() if want_src else source.new_empty((0,))
    if not want_kp:
        return (grad_source, *[kp_source.new_empty((0,)) for _ in range(4)])
    sums = parts.sum(2)[:, 1:]      # (B, K, 10): row 0 is the constant identity motion
    grad_A = sums[..., 0:4].reshape(B, K, 2, 2)
    grad_b = sums[..., 4:6]
    grad_kpd = sums[..., 6:8] / variance
    grad_kps = -sums[..., 8:10] / variance
    kp_grads = reference._keypoint_grads((grad_A, grad_b), grad_kps, grad_kpd, kps, jacs, kpd, jacd, want)
    likes = [kp_source, jac_source, kp_driving, jac_driving]
    return (grad_source, *_cast_grads(kp_grads, likes, want, kp_source))


def dense_forward(mask_logits: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                  jac_driving: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """mask_logits (B,K+1,H,W), kp (B,K,2), jac (B,K,2,2) or None -> (deformation (B,H,W,2),
    mask (B,K+1,H,W)) (see ``dagan_fast.ops.dense_motion``)."""
    B, K1, H, W = mask_logits.shape
    deformation = _new_output((B, H, W, 2), mask_logits)
    mask = _new_output((B, K1, H, W), mask_logits)
    if mask.numel() == 0:
        return deformation, mask
    ct = _compute_dtype(mask_logits.dtype)
    table = _affine_table(*_keypoint_tensors(kp_source, jac_source, kp_driving, jac_driving, ct))
    block, warps = _block(H * W, mask_logits.device)
    clamp = _low_precision(mask_logits.dtype)
    _dense_fwd_kernel[(triton.cdiv(H * W, block), B)](
        mask_logits, table, deformation, mask, H, W, K1, *mask_logits.stride(), *_grid_args(H, W),
        float(torch.finfo(mask_logits.dtype).max) if clamp else 0.0, CLAMP=clamp, BLOCK=block, num_warps=warps)
    return deformation, mask


def dense_backward(grad_deformation: Tensor, grad_mask: Tensor, mask_logits: Tensor, kp_source: Tensor,
                   jac_source: Optional[Tensor], kp_driving: Tensor, jac_driving: Optional[Tensor],
                   output_mask: Sequence[bool]) -> Tuple[Tensor, ...]:
    """Gradients (mask_logits (B,K+1,H,W), kp_source (B,K,2), jac_source (B,K,2,2), kp_driving,
    jac_driving) from those of deformation (B,H,W,2) and mask (B,K+1,H,W); empty where not asked
    for or where the Jacobian is None."""
    B, K1, H, W = mask_logits.shape
    K = K1 - 1
    want_logits = bool(output_mask[0])
    want = [bool(output_mask[1]), bool(output_mask[2]) and jac_source is not None, bool(output_mask[3]),
            bool(output_mask[4]) and jac_driving is not None]
    want_kp = any(want)
    ct = _compute_dtype(mask_logits.dtype)
    kps, jacs, kpd, jacd = _keypoint_tensors(kp_source, jac_source, kp_driving, jac_driving, ct)
    grad_logits = _new_output((B, K1, H, W), mask_logits) if want_logits else mask_logits.new_empty((0,))
    block, warps = _block(H * W, mask_logits.device)
    n_tiles = triton.cdiv(H * W, block)
    parts = _new_output((B, K1, n_tiles, _DENSE_PARTS), mask_logits, ct) if want_kp else \
        mask_logits.new_empty((0,), dtype=ct)
    if (want_logits or want_kp) and B * H * W > 0:
        table = _affine_table(kps, jacs, kpd, jacd)
        clamp = _low_precision(mask_logits.dtype)
        out = grad_logits if want_logits else mask_logits   # never written when not NEED_LOGITS
        _dense_bwd_kernel[(n_tiles, B)](
            grad_deformation, grad_mask, mask_logits, table, out, parts, H, W, K1, n_tiles,
            *grad_deformation.stride(), *grad_mask.stride(), *mask_logits.stride(), *_grid_args(H, W),
            float(torch.finfo(mask_logits.dtype).max) if clamp else 0.0,
            NEED_LOGITS=want_logits, NEED_KP=want_kp, CLAMP=clamp, BLOCK=block, num_warps=warps)
    if not want_kp:
        return (grad_logits, *[kp_source.new_empty((0,)) for _ in range(4)])
    sums = parts.sum(2)[:, 1:]      # (B, K, 6): row 0 is the constant identity motion
    grad_A = sums[..., 0:4].reshape(B, K, 2, 2)
    grad_b = sums[..., 4:6]
    zeros = torch.zeros_like(kps)
    kp_grads = reference._keypoint_grads((grad_A, grad_b), zeros, zeros, kps, jacs, kpd, jacd, want)
    likes = [kp_source, jac_source, kp_driving, jac_driving]
    return (grad_logits, *_cast_grads(kp_grads, likes, want, kp_source))


def launch_specs():
    """Every kernel configuration the motion launchers can launch on a GPU: each block of GPU_BLOCKS in
    each GPU dtype with every gradient asked for, and the other flag sets once per kernel (256 pixels,
    float32) so that each code path compiles. CLAMP follows the dtype, as in the launchers; innermost
    strides are 1 (contiguous inputs; other strides are runtime values of the same kernels)."""
    specs = []
    compute = {"prm_ptr": "fp32", "gsrc_ptr": "fp32", "part_ptr": "fp32"}
    kernels = (
        (_sparse_fwd_kernel, (), (), ("s_sw",)),
        (_sparse_bwd_kernel, ("NEED_SRC", "NEED_KP"), (), ("g_sw", "s_sw")),
        (_dense_fwd_kernel, (), ("out_max",), ("l_sw",)),
        (_dense_bwd_kernel, ("NEED_LOGITS", "NEED_KP"), ("out_max",), ("d_s2", "m_sw", "l_sw")),
    )
    for kernel, flag_names, floats, units in kernels:
        pointers = [n for n in kernel.arg_names if n.endswith("_ptr")]
        variants = flag_variants(flag_names, lambda f: any(f.values()) or not f)
        for dtype in GPU_DTYPES:
            for block in GPU_BLOCKS:
                for flags in variants if (dtype, block) == (torch.float32, GPU_BLOCKS[-1]) else variants[:1]:
                    constexprs = dict(flags, BLOCK=block)
                    if "CLAMP" in kernel.arg_names:
                        constexprs["CLAMP"] = _low_precision(dtype)
                    specs.append(launch_spec(kernel, dtype, ptr_types(pointers, dtype, compute), constexprs,
                                             _warps(block), floats=floats, units=units))
    return specs


_backends.get_backend("triton").register("sparse_motion_inputs", sparse_forward, sparse_backward)
_backends.get_backend("triton").register("dense_motion", dense_forward, dense_backward)
