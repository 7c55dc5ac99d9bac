"""The reference backend: plain PyTorch, any device, float16 to float64. It is the spec of every op
(the compiled and Triton kernels are tested against it) and the fallback when nothing faster runs.

Each op has a forward and an explicit backward (the formulas the kernels implement). The forwards
are also ordinary differentiable PyTorch, which the tests use to check the explicit backwards.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Driving Jacobians with |det| below this are treated as if |det| were this, sign kept (a zero
# determinant counts as positive). Official DaGAN calls torch.inverse, which returns inf/NaN or
# raises there; this keeps every output finite and is what every backend does.
JACOBIAN_DET_FLOOR = 1e-6

# Elements of one (B*H, rows, Nk) score block in the chunked attention: 2**22 floats = 16 MiB.
ATTENTION_BLOCK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _upcast(*tensors: Optional[Tensor]):
    return [t.float() if t is not None else None for t in tensors]


def _grads_to(grads: Sequence[Tensor], image: Tensor, keypoints: Tensor) -> Tuple[Tensor, ...]:
    """Float32 motion gradients (image, kp_source, jac_source, kp_driving, jac_driving) back to the
    image's dtype and the keypoints' dtype (float32 keypoints may go with a float16/bfloat16 image)."""
    return tuple(_to_finite(g, image.dtype if i == 0 else keypoints.dtype) for i, g in enumerate(grads))


def _to_finite(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Casts to ``dtype``, clamping to its finite range: far-away motion coordinates (a near-singular
    Jacobian gives ~1e6) must not become inf in float16."""
    if t.dtype == dtype:
        return t
    limit = torch.finfo(dtype).max
    return t.clamp(-limit, limit).to(dtype)


# --------------------------------------------------------------------------------------------
# warp_occlusion
# --------------------------------------------------------------------------------------------
def _bounded_grid(grid: Tensor) -> Tensor:
    # Any |coordinate| > 1 + 2/size already reads zeros with zero gradient, so clamping to +-3 changes
    # nothing there, but makes +-inf read zeros too (grid_sample itself returns NaN for inf).
    return grid.clamp(-3.0, 3.0)


def warp_occlusion(input: Tensor, grid: Tensor, occlusion: Optional[Tensor] = None) -> Tensor:
    """``F.grid_sample(input, grid, bilinear, zeros, align_corners=False) * occlusion``.

    input (B,C,Hi,Wi), grid (B,Ho,Wo,2) in [-1,1] (points outside, inf included, read zeros),
    occlusion (B,1,Ho,Wo) or None -> (B,C,Ho,Wo), contiguous.
    """
    grid = _bounded_grid(grid)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if occlusion is not None:
        out = out * occlusion
    return out.contiguous()


def warp_occlusion_backward(grad_output: Tensor, input: Tensor, grid: Tensor, occlusion: Optional[Tensor],
                            output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo)); the ones not asked
    for in ``output_mask`` (and the occlusion one when there is no occlusion) are empty tensors."""
    want_input, want_grid, want_occ = output_mask
    want_occ = want_occ and occlusion is not None
    grid = _bounded_grid(grid)
    grad_sample = grad_output if occlusion is None else grad_output * occlusion
    grad_input, grad_grid = _empty_grad(input), _empty_grad(grid)
    if want_input or want_grid:
        gi, gg = torch.ops.aten.grid_sampler_2d_backward(
            grad_sample, input, grid, 0, 0, False, [want_input, want_grid])  # bilinear, zeros
        grad_input = gi.contiguous() if want_input else grad_input
        grad_grid = gg.contiguous() if want_grid else grad_grid
    grad_occ = _empty_grad(grid)
    if want_occ:
        sampled = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        grad_occ = (grad_output * sampled).sum(1, keepdim=True).contiguous()
    return grad_input, grad_grid, grad_occ


# --------------------------------------------------------------------------------------------
# cross_modal_attention
# --------------------------------------------------------------------------------------------
def _query_rows(bh: int, nq: int, nk: int) -> int:
    return max(1, min(nq, ATTENTION_BLOCK_ELEMENTS // max(1, bh * nk)))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale) v`` without an Nq x Nk matrix: query blocks, fp32 (fp64) math.

    q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv) -> (out (B,H,Nq,Dv) in q's dtype,
    logsumexp (B,H,Nq) of the scaled scores in float32, float64 for float64 inputs).
    """
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    acc = _acc_dtype(q.dtype)
    kt = k.to(acc).transpose(-1, -2)
    va = v.to(acc)
    out = q.new_empty((B, H, Nq, Dv))
    lse = q.new_empty((B, H, Nq), dtype=acc)
    rows = _query_rows(B * H, Nq, Nk)
    for start in range(0, Nq, rows):
        stop = min(Nq, start + rows)
        scores = torch.matmul(q[:, :, start:stop].to(acc), kt).mul_(scale)
        block_lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(block_lse.unsqueeze(-1)).exp_()
        out[:, :, start:stop] = torch.matmul(probs, va).to(out.dtype)
        lse[:, :, start:stop] = block_lse
    return out, lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       output_mask: Sequence[bool] = (True, True, True)) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) recomputed block by block from the saved logsumexp (O(N) memory).

    With P = exp(S - lse): dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = scale dS K;
    dK = scale dS^T Q. Gradients not asked for in ``output_mask`` are empty tensors.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    ka, va = k.to(acc), v.to(acc)
    go_all = grad_out.to(acc)
    delta = (go_all * out.to(acc)).sum(-1)  # (B,H,Nq)
    dq = torch.empty_like(q, dtype=acc) if output_mask[0] else None
    dk = torch.zeros_like(k, dtype=acc) if output_mask[1] else None
    dv = torch.zeros_like(v, dtype=acc) if output_mask[2] else None
    rows = _query_rows(B * H, Nq, Nk)
    for start in range(0, Nq, rows):
        stop = min(Nq, start + rows)
        qb = q[:, :, start:stop].to(acc)
        go = go_all[:, :, start:stop]
        probs = torch.matmul(qb, ka.transpose(-1, -2)).mul_(scale).sub_(lse[:, :, start:stop].unsqueeze(-1)).exp_()
        if dv is not None:
            dv += torch.matmul(probs.transpose(-1, -2), go)
        if dq is None and dk is None:
            continue
        dscores = probs.mul_(torch.matmul(go, va.transpose(-1, -2)).sub_(delta[:, :, start:stop].unsqueeze(-1)))
        if dq is not None:
            dq[:, :, start:stop] = torch.matmul(dscores, ka).mul_(scale)
        if dk is not None:
            dk += torch.matmul(dscores.transpose(-1, -2), qb).mul_(scale)
    return (dq.to(q.dtype) if dq is not None else _empty_grad(q),
            dk.to(k.dtype) if dk is not None else _empty_grad(k),
            dv.to(v.dtype) if dv is not None else _empty_grad(v))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.needs_input_grad[:3])
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dv if ctx.needs_input_grad[2] else None, None)


def cross_modal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Differentiable ``softmax(q k^T * scale) v`` with O(N) memory in forward and backward.

    q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv) -> (B,H,Nq,Dv); scale defaults to 1/sqrt(Dqk).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _ChunkedAttention.apply(q, k, v, scale)


def attention_residual(attention: Tensor, residual: Optional[Tensor] = None, gamma: Optional[Tensor] = None) -> Tensor:
    """The attention epilogue of the models: ``gamma * attention + residual`` (DaGAN; gamma a one-element
    tensor) or ``attention + residual`` (DaGAN++), each term optional. attention (B,H,Nq,Dv), residual
    (B,H,Nq,Dv) any strides -> (B,H,Nq,Dv) in attention's dtype; differentiable in all three."""
    out = attention
    if gamma is not None:
        g = gamma.reshape(()).to(attention.dtype)
        return out * g if residual is None else torch.addcmul(residual, g, out)
    return out if residual is None else out + residual


def materialized_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                           return_map: bool = False):
    """The naive formulation (DaGAN's code): builds the (B,H,Nq,Nk) map. For tests and visualisation
    at small N only. Returns out (B,H,Nq,Dv), or (out, attention map) with ``return_map``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    out = torch.matmul(attn, v)
    return (out, attn) if return_map else out


# --------------------------------------------------------------------------------------------
# Taylor motion: shared pieces
# --------------------------------------------------------------------------------------------
def make_coordinate_grid(height: int, width: int, dtype: torch.dtype = torch.float32,
                         device=None) -> Tensor:
    """(H,W,2) grid of (x, y) in [-1,1], endpoints included (official make_coordinate_grid).
    A size-1 axis has the single coordinate 0 (the official formula would divide 0 by 0)."""
    calc = _acc_dtype(dtype)

    def axis(n: int) -> Tensor:
        if n == 1:
            return torch.zeros(1, dtype=calc, device=device)
        return 2 * (torch.arange(n, dtype=calc, device=device) / (n - 1)) - 1

    ys, xs = axis(height), axis(width)
    grid = torch.stack([xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width)], dim=-1)
    return grid.to(dtype)


def inverse_2x2(jacobian: Tensor) -> Tensor:
    """Closed-form inverse of (...,2,2) matrices with the determinant floor (JACOBIAN_DET_FLOOR)."""
    a, b = jacobian[..., 0, 0], jacobian[..., 0, 1]
    c, d = jacobian[..., 1, 0], jacobian[..., 1, 1]
    det = _floored_det(a * d - b * c)
    adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    return adj / det[..., None, None]


def _floored_det(det: Tensor) -> Tensor:
    sign = torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))
    return torch.where(det.abs() < JACOBIAN_DET_FLOOR, sign * JACOBIAN_DET_FLOOR, det)


def inverse_2x2_backward(grad_inv: Tensor, jacobian: Tensor) -> Tensor:
    """Gradient of inverse_2x2 with respect to its (...,2,2) input (zero through a floored det)."""
    a, b = jacobian[..., 0, 0], jacobian[..., 0, 1]
    c, d = jacobian[..., 1, 0], jacobian[..., 1, 1]
    raw_det = a * d - b * c
    det = _floored_det(raw_det)
    adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    grad_adj = grad_inv / det[..., None, None]
    grad_det = -(grad_inv * adj).sum((-1, -2)) / (det * det)
    grad_det = torch.where(raw_det.abs() < JACOBIAN_DET_FLOOR, torch.zeros_like(grad_det), grad_det)
    ga = grad_det * d + grad_adj[..., 1, 1]
    gd = grad_det * a + grad_adj[..., 0, 0]
    gb = -grad_det * c - grad_adj[..., 0, 1]
    gc = -grad_det * b - grad_adj[..., 1, 0]
    return torch.stack([torch.stack([ga, gb], -1), torch.stack([gc, gd], -1)], -2)


def keypoint_affine(kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                    jac_driving: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per keypoint, T_k(z) = A_k z + b_k with A_k = J_s inv(J_d), b_k = kp_s - A_k kp_d.

    kp (B,K,2), jac (B,K,2,2) or None (identity) -> (A (B,K,2,2), b (B,K,2)).
    """
    B, K = kp_source.shape[:2]
    eye = torch.eye(2, dtype=kp_source.dtype, device=kp_source.device).expand(B, K, 2, 2)
    inv_d = inverse_2x2(jac_driving) if jac_driving is not None else eye
    A = torch.matmul(jac_source, inv_d) if jac_source is not None else inv_d
    b = kp_source - torch.matmul(A, kp_driving.unsqueeze(-1)).squeeze(-1)
    return A, b


def keypoint_affine_backward(grad_A: Tensor, grad_b: Tensor, kp_source: Tensor, jac_source: Optional[Tensor],
                             kp_driving: Tensor, jac_driving: Optional[Tensor]):
    """Chain (dA (B,K,2,2), db (B,K,2)) back to (d kp_s, d jac_s or None, d kp_d, d jac_d or None)."""
    A, _ = keypoint_affine(kp_source, jac_source, kp_driving, jac_driving)
    grad_kp_source = grad_b
    grad_A = grad_A - grad_b.unsqueeze(-1) * kp_driving.unsqueeze(-2)
    grad_kp_driving = -torch.matmul(A.transpose(-1, -2), grad_b.unsqueeze(-1)).squeeze(-1)
    grad_jac_source = grad_jac_driving = None
    if jac_driving is not None:
        inv_d = inverse_2x2(jac_driving)
        grad_inv = torch.matmul(jac_source.transpose(-1, -2), grad_A) if jac_source is not None else grad_A
        grad_jac_driving = inverse_2x2_backward(grad_inv, jac_driving)
    else:
        inv_d = None
    if jac_source is not None:
        grad_jac_source = torch.matmul(grad_A, inv_d.transpose(-1, -2)) if inv_d is not None else grad_A
    return grad_kp_source, grad_jac_source, grad_kp_driving, grad_jac_driving


def taylor_motions(A: Tensor, b: Tensor, grid: Tensor) -> Tensor:
    """(B,K+1,H,W,2): T_0(z) = z (background), T_k(z) = A_k z + b_k for k = 1..K."""
    B = A.shape[0]
    moved = torch.einsum("bkij,hwj->bkhwi", A, grid) + b[:, :, None, None, :]
    identity = grid.unsqueeze(0).unsqueeze(0).expand(B, 1, *grid.shape)
    return torch.cat([identity, moved], dim=1)


def _affine_grads(grad_motions: Tensor, grid: Tensor) -> Tuple[Tensor, Tensor]:
    """(dA (B,K,2,2), db (B,K,2)) from the gradient (B,K,H,W,2) of the keypoint motions (k >= 1)."""
    return torch.einsum("bkhwi,hwj->bkij", grad_motions, grid), grad_motions.sum((2, 3))


def _gaussians(grid: Tensor, kp: Tensor, variance: float) -> Tensor:
    """(B,K,H,W) of exp(-0.5 ||z - kp||^2 / variance) (official kp2gaussian)."""
    diff = grid.unsqueeze(0).unsqueeze(0) - kp[:, :, None, None, :]
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / variance)


def _keypoint_grads(grad_affine, grad_kp_source, grad_kp_driving, kp_source, jac_source, kp_driving,
                    jac_driving, output_mask):
    """Adds the chained affine gradients to the direct keypoint ones; empty tensors where not asked."""
    g_kps, g_jacs, g_kpd, g_jacd = keypoint_affine_backward(*grad_affine, kp_source, jac_source, kp_driving,
                                                            jac_driving)
    grads = [g_kps + grad_kp_source, g_jacs, g_kpd + grad_kp_driving, g_jacd]
    likes = [kp_source, kp_source, kp_driving, kp_driving]
    return [g.contiguous() if (want and g is not None) else _empty_grad(like)
            for g, want, like in zip(grads, output_mask, likes)]


# --------------------------------------------------------------------------------------------
# sparse_motion_inputs
# --------------------------------------------------------------------------------------------
def sparse_motion_inputs(source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                         jac_driving: Optional[Tensor], variance: float = 0.01) -> Tensor:
    """The dense-motion hourglass input of DaGAN/FOMM.

    source (B,C,H,W), kp (B,K,2), jac (B,K,2,2) or None -> (B,(K+1)(C+1),H,W) ordered, for k = 0..K,
    [heat_k, source_c warped by T_k for c = 0..C-1]; heat_0 = 0, heat_k = G(kp_d_k) - G(kp_s_k).
    Float16/bfloat16 inputs are computed in float32 and rounded once at the end.
    """
    if _low_precision(source.dtype):  # motion math in float32, see _to_finite
        args = _upcast(source, kp_source, jac_source, kp_driving, jac_driving)
        return _to_finite(sparse_motion_inputs(*args, variance), source.dtype)
    B, C, H, W = source.shape
    K = kp_source.shape[1]
    grid = make_coordinate_grid(H, W, source.dtype, source.device)
    heat = _gaussians(grid, kp_driving, variance) - _gaussians(grid, kp_source, variance)
    heat = torch.cat([heat.new_zeros((B, 1, H, W)), heat], dim=1)
    A, b = keypoint_affine(kp_source, jac_source, kp_driving, jac_driving)
    motions = taylor_motions(A, b, grid)
    repeated = source.unsqueeze(1).expand(B, K + 1, C, H, W).reshape(B * (K + 1), C, H, W)
    deformed = F.grid_sample(repeated, motions.reshape(B * (K + 1), H, W, 2), mode="bilinear",
                             padding_mode="zeros", align_corners=False).view(B, K + 1, C, H, W)
    return torch.cat([heat.unsqueeze(2), deformed], dim=2).reshape(B, (K + 1) * (C + 1), H, W)


def sparse_motion_inputs_backward(grad: Tensor, source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor],
                                  kp_driving: Tensor, jac_driving: Optional[Tensor], variance: float,
                                  output_mask: Sequence[bool]) -> Tuple[Tensor, ...]:
    """Gradients (source, kp_source, jac_source, kp_driving, jac_driving); empty where not asked
    for in ``output_mask`` or where the Jacobian is None."""
    if _low_precision(source.dtype):
        args = _upcast(grad, source, kp_source, jac_source, kp_driving, jac_driving)
        grads = sparse_motion_inputs_backward(*args, variance, output_mask)
        return _grads_to(grads, source, kp_source)
    B, C, H, W = source.shape
    K = kp_source.shape[1]
    grid = make_coordinate_grid(H, W, source.dtype, source.device)
    grad = grad.reshape(B, K + 1, C + 1, H, W)
    grad_heat, grad_deformed = grad[:, 1:, 0], grad[:, :, 1:]
    A, b = keypoint_affine(kp_source, jac_source, kp_driving, jac_driving)
    motions = taylor_motions(A, b, grid)
    repeated = source.unsqueeze(1).expand(B, K + 1, C, H, W).reshape(B * (K + 1), C, H, W)
    want_source, want_keypoints = output_mask[0], any(output_mask[1:])
    g_src, g_motion = torch.ops.aten.grid_sampler_2d_backward(
        grad_deformed.reshape(B * (K + 1), C, H, W), repeated, motions.reshape(B * (K + 1), H, W, 2),
        0, 0, False, [want_source, want_keypoints])
    grad_source = g_src.view(B, K + 1, C, H, W).sum(1) if want_source else _empty_grad(source)
    if not want_keypoints:
        # Four distinct empty tensors: a custom op's outputs must not alias each other.
        return (grad_source, *[_empty_grad(kp_source) for _ in range(4)])
    grad_affine = _affine_grads(g_motion.view(B, K + 1, H, W, 2)[:, 1:], grid)
    diff_d = grid.unsqueeze(0).unsqueeze(0) - kp_driving[:, :, None, None, :]
    diff_s = grid.unsqueeze(0).unsqueeze(0) - kp_source[:, :, None, None, :]
    weight_d = (grad_heat * _gaussians(grid, kp_driving, variance)).unsqueeze(-1)
    weight_s = (grad_heat * _gaussians(grid, kp_source, variance)).unsqueeze(-1)
    grad_kp_driving = (weight_d * diff_d).sum((2, 3)) / variance
    grad_kp_source = -(weight_s * diff_s).sum((2, 3)) / variance
    kp_grads = _keypoint_grads(grad_affine, grad_kp_source, grad_kp_driving, kp_source, jac_source, kp_driving,
                               jac_driving, output_mask[1:])
    return (grad_source.contiguous(), *kp_grads)


# --------------------------------------------------------------------------------------------
# dense_motion
# --------------------------------------------------------------------------------------------
def dense_motion(mask_logits: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                 jac_driving: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Softmax over the K+1 motions and their mixture.

    mask_logits (B,K+1,H,W), kp (B,K,2), jac (B,K,2,2) or None -> (deformation (B,H,W,2) =
    sum_k mask_k T_k(z), mask (B,K+1,H,W) = softmax(mask_logits, dim=1)).
    Float16/bfloat16 logits (with keypoints in their dtype or float32) are computed in float32 and
    rounded once at the end.
    """
    if _low_precision(mask_logits.dtype):
        args = _upcast(mask_logits, kp_source, jac_source, kp_driving, jac_driving)
        return tuple(_to_finite(t, mask_logits.dtype) for t in dense_motion(*args))
    B, K1, H, W = mask_logits.shape
    grid = make_coordinate_grid(H, W, mask_logits.dtype, mask_logits.device)
    mask = torch.softmax(mask_logits, dim=1)
    A, b = keypoint_affine(kp_source, jac_source, kp_driving, jac_driving)
    deformation = (mask.unsqueeze(-1) * taylor_motions(A, b, grid)).sum(1)
    return deformation, mask


def dense_motion_backward(grad_deformation: Tensor, grad_mask: Tensor, mask_logits: Tensor, kp_source: Tensor,
                          jac_source: Optional[Tensor], kp_driving: Tensor, jac_driving: Optional[Tensor],
                          output_mask: Sequence[bool]) -> Tuple[Tensor, ...]:
    """Gradients (mask_logits, kp_source, jac_source, kp_driving, jac_driving) given the gradients of
    deformation (B,H,W,2) and mask (B,K+1,H,W); empty where not asked or the Jacobian is None."""
    if _low_precision(mask_logits.dtype):
        args = _upcast(grad_deformation, grad_mask, mask_logits, kp_source, jac_source, kp_driving, jac_driving)
        grads = dense_motion_backward(*args, output_mask)
        return _grads_to(grads, mask_logits, kp_source)
    B, K1, H, W = mask_logits.shape
    grid = make_coordinate_grid(H, W, mask_logits.dtype, mask_logits.device)
    mask = torch.softmax(mask_logits, dim=1)
    A, b = keypoint_affine(kp_source, jac_source, kp_driving, jac_driving)
    motions = taylor_motions(A, b, grid)
    grad_logits = _empty_grad(mask_logits)
    if output_mask[0]:
        grad_m = grad_mask + (grad_deformation.unsqueeze(1) * motions).sum(-1)
        grad_logits = (mask * (grad_m - (mask * grad_m).sum(1, keepdim=True))).contiguous()
    if not any(output_mask[1:]):
        return (grad_logits, *[_empty_grad(kp_source) for _ in range(4)])  # distinct, never aliased
    grad_motions = mask[:, 1:].unsqueeze(-1) * grad_deformation.unsqueeze(1)
    zeros = torch.zeros_like(kp_source)
    kp_grads = _keypoint_grads(_affine_grads(grad_motions, grid), zeros, zeros, kp_source, jac_source, kp_driving,
                               jac_driving, output_mask[1:])
    return (grad_logits, *kp_grads)
