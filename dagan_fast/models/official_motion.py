"""The dense-motion stage in the authors' own float arithmetic, for bit-level reproduction of their outputs.

The fused ops (``ops.sparse_motion_inputs`` / ``ops.dense_motion``) compute the same function in a closed
form (per-keypoint affine, one pass); their float32 results differ from the official materialised
formulation by about one ulp. DaGAN's hourglass and the warp of sharp image features amplify that ulp to
~1e-4..1e-3 on the prediction, which is the size of float32 itself there (the official code's own float32
result differs from its float64 result by 1.3e-3 on test weights). This module repeats the official
sequence of PyTorch operations (materialised (B,K+1,h,w,2) motions, ``torch.inverse``, ``grid_sample``,
weighted sum), so that a model using it reproduces the official float32 outputs to ~1e-5. It is slower
(several passes and a per-pixel 2x2 matmul) and is opt-in: ``DaGAN.use_official_rounding()``.

The one deliberate difference: driving Jacobians with |det| < ``reference.JACOBIAN_DET_FLOOR`` (where the
official code would divide by ~0, or raise for exactly singular ones) use the floored closed-form inverse
of the fused ops, so no NaN or inf appears.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import reference

Tensor = torch.Tensor


def _gaussian(kp: Tensor, grid: Tensor, variance: float) -> Tensor:
    """kp (B,K,2), grid (h,w,2) -> (B,K,h,w) = exp(-0.5 |z - kp|^2 / variance)."""
    B, K = kp.shape[:2]
    h, w = grid.shape[:2]
    diff = grid.view(1, 1, h, w, 2).repeat(B, K, 1, 1, 1) - kp.view(B, K, 1, 1, 2)
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / variance)


def official_inverse(jac_driving: Tensor) -> Tensor:
    """inv(J) (...,2,2) as the official code computes it (``torch.inverse``), with the fused ops' floored
    closed form where |det| < JACOBIAN_DET_FLOOR."""
    a, b = jac_driving[..., 0, 0], jac_driving[..., 0, 1]
    c, d = jac_driving[..., 1, 0], jac_driving[..., 1, 1]
    det = a * d - b * c
    small = det.abs() < reference.JACOBIAN_DET_FLOOR
    if not bool(small.any()):
        return torch.inverse(jac_driving)
    floored = torch.where(det < 0, -reference.JACOBIAN_DET_FLOOR, reference.JACOBIAN_DET_FLOOR)
    adjugate = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    closed = adjugate / floored.to(det.dtype)[..., None, None]
    safe = torch.where(small[..., None, None], torch.eye(2, dtype=jac_driving.dtype, device=jac_driving.device),
                       jac_driving)
    return torch.where(small[..., None, None], closed, torch.inverse(safe))


def sparse_motions(h: int, w: int, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                   jac_driving: Optional[Tensor]) -> Tensor:
    """The K+1 Taylor motions (B,K+1,h,w,2): identity first, then kp_s + J_s inv(J_d) (z - kp_d)."""
    B, K = kp_source.shape[:2]
    grid = reference.make_coordinate_grid(h, w, kp_source.dtype, kp_source.device).view(1, 1, h, w, 2)
    coords = grid - kp_driving.view(B, K, 1, 1, 2)
    if jac_driving is not None:
        jac_s = jac_source if jac_source is not None else torch.eye(2, dtype=jac_driving.dtype,
                                                                   device=jac_driving.device).expand_as(jac_driving)
        jacobian = torch.matmul(jac_s, official_inverse(jac_driving))
        jacobian = jacobian.unsqueeze(-3).unsqueeze(-3).repeat(1, 1, h, w, 1, 1)
        coords = torch.matmul(jacobian, coords.unsqueeze(-1)).squeeze(-1)
    elif jac_source is not None:
        jacobian = jac_source.unsqueeze(-3).unsqueeze(-3).repeat(1, 1, h, w, 1, 1)
        coords = torch.matmul(jacobian, coords.unsqueeze(-1)).squeeze(-1)
    driving_to_source = coords + kp_source.view(B, K, 1, 1, 2)
    return torch.cat([grid.repeat(B, 1, 1, 1, 1), driving_to_source], dim=1)


def sparse_motion_inputs(source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                         jac_driving: Optional[Tensor], variance: float) -> Tuple[Tensor, Tensor]:
    """Official-arithmetic twin of ``ops.sparse_motion_inputs``: source (B,C,h,w), keypoints (B,K,2),
    Jacobians (B,K,2,2) or None -> (hourglass input (B,(K+1)(C+1),h,w), motions (B,K+1,h,w,2))."""
    B, C, h, w = source.shape
    K = kp_source.shape[1]
    grid = reference.make_coordinate_grid(h, w, source.dtype, source.device)
    heat = _gaussian(kp_driving, grid, variance) - _gaussian(kp_source, grid, variance)
    heat = torch.cat([heat.new_zeros(B, 1, h, w), heat], dim=1).unsqueeze(2)
    motions = sparse_motions(h, w, kp_source, jac_source, kp_driving, jac_driving)
    repeated = source.unsqueeze(1).unsqueeze(1).repeat(1, K + 1, 1, 1, 1, 1).view(B * (K + 1), C, h, w)
    deformed = F.grid_sample(repeated, motions.view(B * (K + 1), h, w, 2), mode="bilinear", padding_mode="zeros",
                             align_corners=False).view(B, K + 1, C, h, w)
    return torch.cat([heat, deformed], dim=2).view(B, -1, h, w), motions


def dense_motion(mask_logits: Tensor, motions: Tensor) -> Tuple[Tensor, Tensor]:
    """Official-arithmetic twin of ``ops.dense_motion``: mask_logits (B,K+1,h,w), motions (B,K+1,h,w,2)
    -> (deformation (B,h,w,2), mask (B,K+1,h,w))."""
    mask = F.softmax(mask_logits, dim=1)
    deformation = (motions.permute(0, 1, 4, 2, 3) * mask.unsqueeze(2)).sum(dim=1)
    return deformation.permute(0, 2, 3, 1), mask
