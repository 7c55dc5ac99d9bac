"""Triton kernels of ``warp_occlusion``: ``grid_sample(bilinear, zeros, align_corners=False) * occlusion``.

Layout of the work: program (tile, b, channel group) owns BLOCK_P output pixels of image b. It computes
the four bilinear taps of its pixels (offsets, weights, validity) and their occlusion factor once, then
walks its channels BLOCK_C at a time, so every channel reuses them. The backward runs the same walk and
does all three gradients in one pass: per-pixel sums over channels for the grid and occlusion gradients
(kept in registers, no atomics) and atomic adds into an fp32 (fp64) buffer for the input gradient.

Any strides are read in place (NCHW, channels_last, sliced views). Math is fp32 for fp16/bf16/fp32 and
fp64 for fp64. Coordinates are computed with the same expressions as ATen's grid sampler and clamped
like ``csrc/common/warp_math.h`` (far-out and inf coordinates read zeros with zero gradient).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _backends
from ._support import (GPU_DTYPES, acc_dtype, flag_variants, interpreting, launch_spec, poison_enabled,
                       ptr_types, sm_count)

Tensor = torch.Tensor
OP = "warp_occlusion"


@triton.jit
def _source_coord(g, size):
    """Grid coordinate (align_corners=False) -> clamped pixel coordinate; ``g``: (BLOCK_P,) fp32/fp64."""
    sizef = size * 1.0
    # Multiplying by 0.5 is exact, like ATen's division by 2, and avoids Triton's approximate fp32 divide.
    v = ((g + 1.0) * sizef - 1.0) * 0.5
    # Beyond [-2, size + 1] every tap is outside anyway: clamping changes no value and no gradient, but
    # keeps the float -> int conversion defined for inf (and maps NaN to -2).
    v = tl.where(v >= -2.0, v, -2.0)
    return tl.minimum(v, sizef + 1.0)


@triton.jit
def _pixel_taps(grid_ptr, b64, y, x, pmask, Hi, Wi, sgb, sgh, sgw, sgk, ACC: tl.constexpr):
    """Bilinear taps of BLOCK_P output pixels of image ``b64``: the north-west corner (x0, y0), the
    fractions and their complements, and the validity of the four taps (nw, ne, sw, se)."""
    g_ptr = grid_ptr + b64 * sgb + y.to(tl.int64) * sgh + x.to(tl.int64) * sgw
    gx = tl.load(g_ptr, mask=pmask, other=0.0).to(ACC)
    gy = tl.load(g_ptr + sgk, mask=pmask, other=0.0).to(ACC)
    ix = _source_coord(gx, Wi)
    iy = _source_coord(gy, Hi)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    x0 = x0f.to(tl.int32)  # exact: the coordinates are clamped to [-2, size + 1]
    y0 = y0f.to(tl.int32)
    fx = ix - x0f
    fy = iy - y0f
    east = (x0f + 1.0) - ix
    south = (y0f + 1.0) - iy
    vx0 = (x0 >= 0) & (x0 < Wi)
    vx1 = (x0 + 1 >= 0) & (x0 + 1 < Wi)
    vy0 = pmask & (y0 >= 0) & (y0 < Hi)
    vy1 = pmask & (y0 + 1 >= 0) & (y0 + 1 < Hi)
    return x0, y0, fx, fy, east, south, vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1


@triton.jit
def _tap_weights(fx, fy, east, south, v00, v01, v10, v11):
    """Bilinear weights of the four taps; invalid taps get weight zero and are not loaded (masked), so
    they contribute exact zeros."""
    return (tl.where(v00, east * south, 0.0), tl.where(v01, fx * south, 0.0),
            tl.where(v10, east * fy, 0.0), tl.where(v11, fx * fy, 0.0))


@triton.jit
def _tap_offsets(x0, y0, v00, v01, v10, v11, sh, sw):
    """Element offsets of the four taps in a plane with strides (sh, sw); invalid taps point at 0 so
    that no address outside the tensor is ever formed."""
    base = y0.to(tl.int64) * sh + x0.to(tl.int64) * sw
    o00 = tl.where(v00, base, 0)
    o01 = tl.where(v01, base + sw, 0)
    o10 = tl.where(v10, base + sh, 0)
    o11 = tl.where(v11, base + sh + sw, 0)
    return o00, o01, o10, o11


@triton.jit
def _warp_fwd_kernel(
    x_ptr,        # pointer, (B, C, Hi, Wi) any strides
    grid_ptr,     # pointer, (B, Ho, Wo, 2) any strides, (x, y) last
    occ_ptr,      # pointer, (B, 1, Ho, Wo) any strides; unread when not HAS_OCC
    out_ptr,      # pointer, (B, C, Ho, Wo) contiguous
    C, Hi, Wi, Wo, HWo,          # int: channels, input size, output width, Ho * Wo
    sxb, sxc, sxh, sxw,          # int: input strides (elements)
    sgb, sgh, sgw, sgk,          # int: grid strides
    sob, soh, sow,               # int: occlusion strides (its channel dim has size 1)
    c_per_prog,                  # int: channels per program along axis 2, a multiple of BLOCK_C
    HAS_OCC: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HWo
    y = p // Wo
    x = p - y * Wo
    x0, y0, fx, fy, east, south, v00, v01, v10, v11 = _pixel_taps(
        grid_ptr, b64, y, x, pmask, Hi, Wi, sgb, sgh, sgw, sgk, ACC)
    w00, w01, w10, w11 = _tap_weights(fx, fy, east, south, v00, v01, v10, v11)
    o00, o01, o10, o11 = _tap_offsets(x0, y0, v00, v01, v10, v11, sxh, sxw)
    if HAS_OCC:
        occ = tl.load(occ_ptr + b64 * sob + y.to(tl.int64) * soh + x.to(tl.int64) * sow,
                      mask=pmask, other=0.0).to(ACC)
    x_b = x_ptr + b64 * sxb
    out_b = out_ptr + b64 * C * HWo
    c_begin = pid_c * c_per_prog
    c_end = tl.minimum(c_begin + c_per_prog, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < c_end
        plane = x_b + cs.to(tl.int64)[:, None] * sxc
        cm = cmask[:, None]
        a00 = tl.load(plane + o00[None, :], mask=cm & v00[None, :], other=0.0).to(ACC)
        a01 = tl.load(plane + o01[None, :], mask=cm & v01[None, :], other=0.0).to(ACC)
        a10 = tl.load(plane + o10[None, :], mask=cm & v10[None, :], other=0.0).to(ACC)
        a11 = tl.load(plane + o11[None, :], mask=cm & v11[None, :], other=0.0).to(ACC)
        val = w00[None, :] * a00 + w01[None, :] * a01 + w10[None, :] * a10 + w11[None, :] * a11
        if HAS_OCC:
            val = val * occ[None, :]
        out_ptrs = out_b + cs.to(tl.int64)[:, None] * HWo + p[None, :]
        tl.store(out_ptrs, val.to(out_ptr.dtype.element_ty), mask=cm & pmask[None, :])


@triton.jit
def _warp_bwd_kernel(
    go_ptr,       # pointer, (B, C, Ho, Wo) any strides: grad of the output
    x_ptr,        # pointer, (B, C, Hi, Wi) any strides; unread when not NEED_TAPS
    grid_ptr,     # pointer, (B, Ho, Wo, 2) any strides
    occ_ptr,      # pointer, (B, 1, Ho, Wo) any strides; unread when not HAS_OCC
    gi_ptr,       # pointer, (B, C, Hi, Wi) contiguous fp32/fp64, zeroed: grad_input accumulator
    gg_ptr,       # pointer, (B, Ho, Wo, 2) contiguous: grad_grid; unwritten when not NEED_GRID
    gocc_ptr,     # pointer, (B, 1, Ho, Wo) contiguous: grad_occlusion; unwritten when not NEED_OCC
    C, Hi, Wi, Wo, HWo,          # int: channels, input size, output width, Ho * Wo
    sgob, sgoc, sgoh, sgow,      # int: grad_output strides
    sxb, sxc, sxh, sxw,          # int: input strides
    sgb, sgh, sgw, sgk,          # int: grid strides
    sob, soh, sow,               # int: occlusion strides
    c_per_prog,                  # int: channels per program along axis 2 (all of them when NEED_TAPS)
    HAS_OCC: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_GRID: tl.constexpr, NEED_OCC: tl.constexpr,
    NEED_TAPS: tl.constexpr,     # NEED_GRID or NEED_OCC: the input tap values are read
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HWo
    y = p // Wo
    x = p - y * Wo
    x0, y0, fx, fy, east, south, v00, v01, v10, v11 = _pixel_taps(
        grid_ptr, b64, y, x, pmask, Hi, Wi, sgb, sgh, sgw, sgk, ACC)
    w00, w01, w10, w11 = _tap_weights(fx, fy, east, south, v00, v01, v10, v11)
    if HAS_OCC:
        occ = tl.load(occ_ptr + b64 * sob + y.to(tl.int64) * soh + x.to(tl.int64) * sow,
                      mask=pmask, other=0.0).to(ACC)
    go_pix = go_ptr + b64 * sgob + (y.to(tl.int64) * sgoh + x.to(tl.int64) * sgow)[None, :]
    if NEED_TAPS:
        o00, o01, o10, o11 = _tap_offsets(x0, y0, v00, v01, v10, v11, sxh, sxw)
        x_b = x_ptr + b64 * sxb
    if NEED_INPUT:
        q00, q01, q10, q11 = _tap_offsets(x0, y0, v00, v01, v10, v11, Wi, 1)
        gi_b = gi_ptr + b64 * C * Hi * Wi
    acc_gx = tl.zeros([BLOCK_P], dtype=ACC)
    acc_gy = tl.zeros([BLOCK_P], dtype=ACC)
    acc_go = tl.zeros([BLOCK_P], dtype=ACC)
    c_begin = pid_c * c_per_prog
    c_end = tl.minimum(c_begin + c_per_prog, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = (cs < c_end)[:, None]
        cs64 = cs.to(tl.int64)[:, None]
        g = tl.load(go_pix + cs64 * sgoc, mask=cm & pmask[None, :], other=0.0).to(ACC)
        if HAS_OCC:
            gs = g * occ[None, :]
        else:
            gs = g
        if NEED_TAPS:
            plane = x_b + cs64 * sxc
            a00 = tl.load(plane + o00[None, :], mask=cm & v00[None, :], other=0.0).to(ACC)
            a01 = tl.load(plane + o01[None, :], mask=cm & v01[None, :], other=0.0).to(ACC)
            a10 = tl.load(plane + o10[None, :], mask=cm & v10[None, :], other=0.0).to(ACC)
            a11 = tl.load(plane + o11[None, :], mask=cm & v11[None, :], other=0.0).to(ACC)
            if NEED_OCC:
                sampled = w00[None, :] * a00 + w01[None, :] * a01 + w10[None, :] * a10 + w11[None, :] * a11
                acc_go += tl.sum(g * sampled, axis=0)
            if NEED_GRID:
                # d(sample)/d(ix, iy) in ATen's form: invalid taps read zero, the bilinear slope stays.
                dx = (a01 - a00) * south[None, :] + (a11 - a10) * fy[None, :]
                dy = (a10 - a00) * east[None, :] + (a11 - a01) * fx[None, :]
                acc_gx += tl.sum(dx * gs, axis=0)
                acc_gy += tl.sum(dy * gs, axis=0)
        if NEED_INPUT:
            gi_plane = gi_b + cs64 * Hi * Wi
            tl.atomic_add(gi_plane + q00[None, :], gs * w00[None, :], mask=cm & v00[None, :], sem="relaxed")
            tl.atomic_add(gi_plane + q01[None, :], gs * w01[None, :], mask=cm & v01[None, :], sem="relaxed")
            tl.atomic_add(gi_plane + q10[None, :], gs * w10[None, :], mask=cm & v10[None, :], sem="relaxed")
            tl.atomic_add(gi_plane + q11[None, :], gs * w11[None, :], mask=cm & v11[None, :], sem="relaxed")
    pix = b64 * HWo + p
    if NEED_GRID:
        # d(ix)/d(grid_x) = Wi / 2 for align_corners=False
        tl.store(gg_ptr + 2 * pix, (acc_gx * (Wi * 0.5)).to(gg_ptr.dtype.element_ty), mask=pmask)
        tl.store(gg_ptr + 2 * pix + 1, (acc_gy * (Hi * 0.5)).to(gg_ptr.dtype.element_ty), mask=pmask)
    if NEED_OCC:
        tl.store(gocc_ptr + pix, acc_go.to(gocc_ptr.dtype.element_ty), mask=pmask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _occ_strides(occlusion: Optional[Tensor]) -> Tuple[int, int, int]:
    if occlusion is None:
        return 0, 0, 0
    return occlusion.stride(0), occlusion.stride(2), occlusion.stride(3)


def _alert_not_deterministic() -> None:
    """Like ATen's grid_sampler_2d_backward_cuda: the input gradient's atomic adds sum in no fixed
    order, so under torch.use_deterministic_algorithms(True) this raises (warns with warn_only=True)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = ("warp_occlusion backward on the triton backend computes grad_input with atomic adds and is "
               "not deterministic; use backend='cuda' or 'cpu', or warn_only=True")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message)
    else:
        raise RuntimeError(message)


# Tiles a GPU launch picks from, (BLOCK_P, BLOCK_C) -> num_warps; launch_specs() compiles every one.
# BLOCK_C: 32 channels per step for channel-contiguous inputs (channels_last: one tap of 32 channels is
# one 64/128-byte line), else 8 (4 for C <= 4). BLOCK_P: 32 pixels with 32 channels; else 128, halved
# (down to 32) when one program sums all channels of its pixels and the grid would leave SMs idle.
_GPU_BLOCK_C = (4, 8, 32)
_GPU_BLOCK_P = {4: (128, 64, 32), 8: (128, 64, 32), 32: (32,)}


def _gpu_warps(block_p: int, block_c: int) -> int:
    return 4 if block_p * block_c >= 512 else 2


def _gpu_bwd_warps(block_p: int, block_c: int) -> int:
    """The backward keeps four taps' offsets, weights and values per element: 1024-element tiles take 8
    warps (with 4, fp16/bf16 need more than 255 registers per thread and spill)."""
    return 8 if block_p * block_c >= 1024 else _gpu_warps(block_p, block_c)


GPU_TILES = tuple((p, c, _gpu_warps(p, c)) for c in _GPU_BLOCK_C for p in _GPU_BLOCK_P[c])


def _interpreting(t: Tensor) -> bool:
    """Whether the plan is the interpreter's (CPU tensors); tests patch it to run the GPU plan."""
    return interpreting(t)


def _target_programs(device: torch.device) -> int:
    """Programs that keep every SM of ``device`` busy (a few per SM hide the gather latency)."""
    return 4 * sm_count(device)


class _Plan:
    """Block sizes and program grid for one call: (tiles of BLOCK_P pixels, B, channel groups)."""

    def __init__(self, input: Tensor, grid: Tensor, *, split_channels: bool, backward: bool = False):
        B, C = input.shape[:2]
        HWo = grid.shape[1] * grid.shape[2]
        if _interpreting(input):
            # The interpreter pays per program: few, large programs.
            self.block_p = min(triton.next_power_of_2(HWo), 1024)
            self.block_c = min(triton.next_power_of_2(max(C, 1)), max(1, 8192 // self.block_p))
            self.num_warps = 4
            groups = 1
        else:
            self.block_c = 32 if input.stride(1) == 1 and C > 8 else (8 if C > 4 else 4)
            choices = _GPU_BLOCK_P[self.block_c]
            self.block_p = choices[0]
            target = _target_programs(input.device)
            if not split_channels:
                # One program sums all channels of a pixel: get parallelism from smaller pixel tiles.
                for smaller in choices[1:]:
                    if B * triton.cdiv(HWo, self.block_p) >= target:
                        break
                    self.block_p = smaller
                groups = 1
            else:
                chunks = triton.cdiv(C, self.block_c)
                groups = min(chunks, max(1, triton.cdiv(target, B * triton.cdiv(HWo, self.block_p))))
            self.num_warps = (_gpu_bwd_warps if backward else _gpu_warps)(self.block_p, self.block_c)
        chunks = triton.cdiv(C, self.block_c)
        self.c_per_prog = triton.cdiv(chunks, groups) * self.block_c
        self.grid = (triton.cdiv(HWo, self.block_p), B, triton.cdiv(C, self.c_per_prog))


def warp_forward(input: Tensor, grid: Tensor, occlusion: Optional[Tensor]) -> Tensor:
    """``grid_sample(input, grid, bilinear, zeros, align_corners=False) * occlusion`` on Triton.

    input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo) or None, any strides, one dtype
    -> (B,C,Ho,Wo) contiguous, in the input's dtype.
    """
    B, C, Hi, Wi = input.shape
    Ho, Wo = grid.shape[1], grid.shape[2]
    out = torch.empty((B, C, Ho, Wo), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    if poison_enabled():
        out.fill_(float("nan"))
    plan = _Plan(input, grid, split_channels=True)
    _warp_fwd_kernel[plan.grid](
        input, grid, occlusion if occlusion is not None else grid, out,
        C, Hi, Wi, Wo, Ho * Wo,
        *input.stride(), *grid.stride(), *_occ_strides(occlusion),
        plan.c_per_prog,
        HAS_OCC=occlusion is not None, ACC=acc_dtype(input.dtype),
        BLOCK_P=plan.block_p, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
    )
    return out


def warp_backward(grad_output: Tensor, input: Tensor, grid: Tensor, occlusion: Optional[Tensor],
                  output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``warp_forward``: (grad_input (B,C,Hi,Wi), grad_grid (B,Ho,Wo,2), grad_occlusion
    (B,1,Ho,Wo)), each contiguous; those not asked for in ``output_mask`` (and the occlusion one when
    there is no occlusion) are empty tensors. grad_output (B,C,Ho,Wo) may have any strides (even 0).
    The input gradient accumulates in fp32 (fp64 for fp64) and is rounded once.
    """
    want_input, want_grid, want_occ = (bool(m) for m in output_mask)
    want_occ = want_occ and occlusion is not None
    B, C, Hi, Wi = input.shape
    Ho, Wo = grid.shape[1], grid.shape[2]
    if want_input and input.device.type == "cuda":
        _alert_not_deterministic()
    acc_torch = torch.float64 if input.dtype == torch.float64 else torch.float32
    gi_acc = torch.zeros(input.shape, dtype=acc_torch, device=input.device) if want_input else None
    grad_grid = grid.new_empty((B, Ho, Wo, 2)) if want_grid else grid.new_empty((0,))
    grad_occ = grid.new_empty((B, 1, Ho, Wo)) if want_occ else grid.new_empty((0,))
    if poison_enabled():
        grad_grid.fill_(float("nan"))
        grad_occ.fill_(float("nan"))
    if grad_output.numel() == 0:  # no channels (or no pixels): nothing flows back
        grad_grid.zero_()
        grad_occ.zero_()
    elif want_input or want_grid or want_occ:
        need_taps = want_grid or want_occ
        plan = _Plan(input, grid, split_channels=not need_taps, backward=True)
        _warp_bwd_kernel[plan.grid](
            grad_output, input, grid, occlusion if occlusion is not None else grid,
            gi_acc if want_input else grid, grad_grid if want_grid else grid, grad_occ if want_occ else grid,
            C, Hi, Wi, Wo, Ho * Wo,
            *grad_output.stride(), *input.stride(), *grid.stride(), *_occ_strides(occlusion),
            plan.c_per_prog,
            HAS_OCC=occlusion is not None, NEED_INPUT=want_input, NEED_GRID=want_grid, NEED_OCC=want_occ,
            NEED_TAPS=need_taps, ACC=acc_dtype(input.dtype),
            BLOCK_P=plan.block_p, BLOCK_C=plan.block_c, num_warps=plan.num_warps,
        )
    if want_input:
        grad_input = gi_acc if gi_acc.dtype == input.dtype else gi_acc.to(input.dtype)
    else:
        grad_input = input.new_empty((0,))
    return grad_input, grad_grid, grad_occ


def _bwd_flags_valid(f) -> bool:
    """Flag sets warp_backward launches: some gradient, the occlusion one only with an occlusion, and
    NEED_TAPS exactly when the grid or occlusion gradient is asked for."""
    return ((f["NEED_INPUT"] or f["NEED_GRID"] or f["NEED_OCC"]) and (f["HAS_OCC"] or not f["NEED_OCC"])
            and f["NEED_TAPS"] == (f["NEED_GRID"] or f["NEED_OCC"]))


def launch_specs():
    """Every kernel configuration warp_forward / warp_backward can launch on a GPU: each tile of
    GPU_TILES in each GPU dtype with every feature on (the most registers), and every other flag set
    once, at the first tile in float32 (each code path compiles). Strides are those of the layout each
    tile serves (see below); other strides are runtime values of the same kernels."""
    specs = []
    kernels = (
        (_warp_fwd_kernel, ("HAS_OCC",), lambda f: True, {}, ("sgk", "sow"), {}),
        (_warp_bwd_kernel, ("HAS_OCC", "NEED_INPUT", "NEED_GRID", "NEED_OCC", "NEED_TAPS"), _bwd_flags_valid,
         {"gi_ptr": "fp32"}, ("sgk", "sow"), {"sxw": "sgow", "sxc": "sgoc"}),
    )
    for kernel, flag_names, valid, overrides, units, grad_unit in kernels:
        pointers = [n for n in kernel.arg_names if n.endswith("_ptr")]
        variants = flag_variants(flag_names, valid)
        for dtype in GPU_DTYPES:
            for block_p, block_c, warps in GPU_TILES:
                for flags in variants if (dtype, block_p, block_c) == (torch.float32, *GPU_TILES[0][:2]) \
                        else variants[:1]:
                    # the layouts each tile serves: channels_last (unit channel stride) for 32 channels
                    # per step, planar (unit width stride) otherwise; grid and occlusion contiguous
                    inner = "sxc" if block_c == 32 else "sxw"
                    unit = (inner, *units) + ((grad_unit[inner],) if inner in grad_unit else ())
                    if kernel is _warp_bwd_kernel:
                        warps = _gpu_bwd_warps(block_p, block_c)
                    specs.append(launch_spec(kernel, dtype, ptr_types(pointers, dtype, overrides),
                                             dict(flags, ACC=acc_dtype(dtype), BLOCK_P=block_p, BLOCK_C=block_c),
                                             warps, units=unit))
    return specs


_backends.get_backend("triton").register(OP, warp_forward, warp_backward)
