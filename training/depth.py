"""Self-supervised face depth learning with uncertainty (DaGAN++ section 3.2, eq. 1-8): the pose
network with its three heads, the reprojection of a source frame into the target view, and the losses.

Conventions. Images are (B,3,H,W) in [0,1]. Pixel coordinates are continuous with pixel centres at
(i + 0.5, j + 0.5), so that the principal point (W/2, H/2) is the image centre and a pixel coordinate
u maps to the [-1,1] grid coordinate 2u/W - 1 of ``grid_sample(align_corners=False)``. The pose
[R|t] maps target-camera points to source-camera points: X_s = R X_t + t.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast.models.blocks import UpBlock2d
from dagan_fast.models.depth import RESNET_LAYOUTS, ResNetTrunk
from dagan_fast.ops import warp_occlusion

Tensor = torch.Tensor

# monodepth2 scales the pose output so that the initial motion is tiny (near-identity warps).
POSE_SCALE = 0.01
# Floor of the uncertainty map: log U and M_a * Pe / U stay bounded (U in [UNCERTAINTY_FLOOR, 1)).
UNCERTAINTY_FLOOR = 1e-3
# Points closer than this to the source camera plane are kept in front of it (no sign flip in the projection).
MIN_PROJECTED_DEPTH = 1e-3


def _check_image(name: str, value, channels: Optional[int] = 3) -> Tensor:
    """``value`` must be a floating (B,channels,H,W) tensor (any channel count when ``channels`` is None)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 4 \
            or (channels is not None and value.shape[1] != channels):
        got = (f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise ValueError(f"{name} must be a floating (B,{channels or 'C'},H,W) tensor, got {got}")
    return value


def _check_same_shape(named: Sequence[Tuple[str, Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                             "they must match")


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues' formula: axis-angle vectors (B,3) (direction = axis, norm = angle in radians) ->
    rotation matrices (B,3,3)."""
    if axis_angle.dim() != 2 or axis_angle.shape[1] != 3:
        raise ValueError(f"axis_angle must be (B,3), got shape {tuple(axis_angle.shape)}")
    # The epsilon keeps the gradient finite at angle 0, where the network starts.
    angle = axis_angle.norm(dim=1, keepdim=True).clamp_min(1e-7)
    x, y, z = (axis_angle / angle).unbind(1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)
    s = torch.sin(angle).view(-1, 1, 1)
    c = torch.cos(angle).view(-1, 1, 1)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(cross)
    return eye + s * cross + (1 - c) * (cross @ cross)


def disp_to_depth(disp: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """monodepth2's disparity (sigmoid output in [0,1], any shape) -> depth in [min_depth, max_depth]:
    the disparity is mapped linearly onto [1/max_depth, 1/min_depth] and inverted."""
    if not 0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    return 1.0 / (min_disp + (max_disp - min_disp) * disp)


def reprojection_grid(depth: Tensor, K: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """Eq. 3: where each target pixel lands in the source view. depth (B,1,H,W) of the target,
    intrinsics K (B,3,3) in pixels, pose R (B,3,3), t (B,3) -> grid (B,H,W,2) of (x, y) in [-1,1]
    (``grid_sample`` convention, align_corners=False)."""
    _check_image("depth", depth, channels=1)
    b, _, h, w = depth.shape
    for name, value, shape in (("K", K, (b, 3, 3)), ("R", R, (b, 3, 3)), ("t", t, (b, 3))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for depth {tuple(depth.shape)}, got {tuple(value.shape)}")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=depth.dtype, device=depth.device) + 0.5,
                            torch.arange(w, dtype=depth.dtype, device=depth.device) + 0.5, indexing="ij")
    pixels = torch.stack([xs, ys, torch.ones_like(xs)]).view(1, 3, h * w)
    points = (torch.linalg.inv(K) @ pixels) * depth.view(b, 1, h * w)
    # K (R X + t) in one product: the projection of the transformed camera points.
    projected = K @ (R @ points + t.unsqueeze(2))
    z = projected[:, 2:3].clamp_min(MIN_PROJECTED_DEPTH)
    uv = projected[:, :2] / z
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=depth.dtype, device=depth.device).view(1, 2, 1)
    return (uv * scale - 1).view(b, 2, h, w).permute(0, 2, 3, 1)


def reproject(source: Tensor, depth: Tensor, K: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """Eq. 3-4: the source frame (B,C,H,W) seen from the target camera, using the target's depth
    (B,1,H,W), intrinsics K (B,3,3) and pose [R|t] (B,3,3), (B,3) -> (B,C,H,W); points that land
    outside the source read zeros. Differentiable in every input (fused bilinear warp kernel)."""
    _check_image("source", source, channels=None)
    if source.shape[0] != depth.shape[0] or source.shape[2:] != depth.shape[2:]:
        raise ValueError(f"source {tuple(source.shape)} and depth {tuple(depth.shape)} must share B, H and W")
    return warp_occlusion(source.contiguous(), reprojection_grid(depth, K, R, t).contiguous(), None)


# --------------------------------------------------------------------------------------------
# the pose network
# --------------------------------------------------------------------------------------------
class PoseNetwork(nn.Module):
    """monodepth2-style pose network on two stacked frames, with the three heads of DaGAN++ (Fig. 3):
    relative pose, per-pair intrinsics (Gordon et al. 2019) and the uncertainty map (eq. 8).

    ``num_layers``/``width``: the ResNet backbone (``ResNetTrunk`` with 6 input channels); the head
    widths scale with ``width`` (monodepth2's 256-channel pose decoder at width 64).
    forward(target (B,3,H,W), source (B,3,H,W), H and W multiples of 32) -> {"R": (B,3,3),
    "t": (B,3), "K": (B,3,3) in pixels, "uncertainty": (B,1,H,W) in [UNCERTAINTY_FLOOR, 1)}."""

    def __init__(self, num_layers: int = 18, width: int = 64):
        super().__init__()
        self.config = {"pose_layers": num_layers, "pose_width": width}
        self.encoder = ResNetTrunk(num_layers, width, in_channels=6)
        expansion = 4 if RESNET_LAYOUTS[num_layers][0] == "bottleneck" else 1
        bottleneck = 8 * width * expansion
        hidden = 4 * width
        self.squeeze = nn.Conv2d(bottleneck, hidden, 1)
        self.pose = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 6, 1))
        # Gordon et al.: focal lengths (softplus, in units of the image size) and principal point offsets
        # from the image centre, from the spatially pooled bottleneck.
        self.focal = nn.Conv2d(bottleneck, 2, 1)
        self.offset = nn.Conv2d(bottleneck, 2, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        # Five x2 up-blocks take the 1/32 bottleneck back to full resolution (paper Fig. 5f).
        channels = [bottleneck] + [max(bottleneck // 2 ** (i + 1), 8) for i in range(5)]
        self.uncertainty = nn.Sequential(*[UpBlock2d(channels[i], channels[i + 1]) for i in range(5)])
        self.uncertainty_out = nn.Conv2d(channels[-1], 1, 3, padding=1)

    def forward(self, target: Tensor, source: Tensor) -> Dict[str, Tensor]:
        _check_image("target", target)
        _check_image("source", source)
        _check_same_shape([("target", target), ("source", source)])
        b, _, h, w = target.shape
        if h % 32 or w % 32:
            raise ValueError(f"PoseNetwork: H and W must be multiples of 32, got {h}x{w}")
        e = self.encoder
        x = (torch.cat([target, source], dim=1) - 0.45) / 0.225
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        features = e.layer4(e.layer3(e.layer2(e.layer1(x))))

        motion = POSE_SCALE * self.pose(self.squeeze(features)).mean((2, 3))
        pooled = features.mean((2, 3), keepdim=True)
        size = torch.tensor([w, h], dtype=target.dtype, device=target.device)
        focal = F.softplus(self.focal(pooled).flatten(1)) * size
        centre = (0.5 + self.offset(pooled).flatten(1)) * size
        zero = torch.zeros_like(focal[:, 0])
        K = torch.stack([
            torch.stack([focal[:, 0], zero, centre[:, 0]], 1),
            torch.stack([zero, focal[:, 1], centre[:, 1]], 1),
            torch.stack([zero, zero, torch.ones_like(zero)], 1),
        ], dim=1)
        logits = self.uncertainty_out(self.uncertainty(features))
        uncertainty = UNCERTAINTY_FLOOR + (1 - UNCERTAINTY_FLOOR) * torch.sigmoid(logits)
        return {"R": axis_angle_to_matrix(motion[:, :3]), "t": motion[:, 3:], "K": K, "uncertainty": uncertainty}


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def ssim(x: Tensor, y: Tensor) -> Tensor:
    """monodepth2's SSIM: 3x3 mean windows on reflection-padded images. x, y (B,C,H,W) -> per-pixel
    SSIM (B,C,H,W) in [-1,1] (1 where the images agree)."""
    _check_image("x", x, channels=None)
    _check_image("y", y, channels=None)
    _check_same_shape([("x", x), ("y", y)])
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x ** 2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y ** 2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x ** 2 + mu_y ** 2 + c1) * (sigma_x + sigma_y + c2)
    return (numerator / denominator).clamp(-1, 1)


def photometric_error(target: Tensor, reconstructed: Tensor, alpha: float = 0.85) -> Tensor:
    """Eq. 5 per pixel: Pe = alpha (1 - SSIM)/2 + (1 - alpha) |I - I~|, both averaged over the colour
    channels. target, reconstructed (B,C,H,W) -> (B,1,H,W). (The paper sets alpha = 0.8; monodepth2,
    whose SSIM term carries the /2, uses 0.85.)"""
    _check_same_shape([("target", target), ("reconstructed", reconstructed)])
    structural = ((1 - ssim(target, reconstructed)) / 2).mean(1, keepdim=True)
    absolute = (target - reconstructed).abs().mean(1, keepdim=True)
    return alpha * structural + (1 - alpha) * absolute


def auto_mask(reprojection_error: Tensor, identity_error: Tensor) -> Tensor:
    """monodepth2's auto-masking M_a: 1 where the reprojected source explains the target better than the
    unwarped source does (pixels that move), 0 on static pixels. Errors (B,1,H,W) -> mask (B,1,H,W)."""
    _check_same_shape([("reprojection_error", reprojection_error), ("identity_error", identity_error)])
    return (reprojection_error < identity_error).to(reprojection_error.dtype)


def smoothness_loss(disp: Tensor, image: Tensor) -> Tensor:
    """Eq. 6, edge-aware smoothness on the mean-normalised disparity (monodepth2):
    mean |d_x D*| e^{-|d_x I|} + mean |d_y D*| e^{-|d_y I|} with D* = D / mean(D) per image and the
    image gradients averaged over colours. disp (B,1,H,W), image (B,C,H,W) at the same size -> scalar."""
    _check_image("disp", disp, channels=1)
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image must be (B,C,H,W) with the size of disp {tuple(disp.shape)}, got "
                         f"{getattr(image, 'shape', type(image))}")
    disp = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    grad_disp_x = (disp[..., :, :-1] - disp[..., :, 1:]).abs()
    grad_disp_y = (disp[..., :-1, :] - disp[..., 1:, :]).abs()
    grad_image_x = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    grad_image_y = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (grad_disp_x * torch.exp(-grad_image_x)).mean() + (grad_disp_y * torch.exp(-grad_image_y)).mean()


def uncertainty_loss(error: Tensor, uncertainty: Tensor, mask: Tensor, lambda_photometric: float,
                     lambda_uncertainty: float) -> Tuple[Tensor, Tensor]:
    """The photometric and uncertainty terms of eq. 7: (lambda1 mean(M_a Pe / U), lambda3 mean(M_a log U)).
    error Pe, uncertainty U in (0,1], mask M_a: (B,1,H,W) -> two scalars (means over all pixels).
    log U carries the mask too: on masked (static) pixels nothing opposes it, so U would sink to its floor
    there and blow up Pe / U the moment such a pixel starts moving."""
    _check_same_shape([("error", error), ("uncertainty", uncertainty), ("mask", mask)])
    return (lambda_photometric * (mask * error / uncertainty).mean(),
            lambda_uncertainty * (mask * torch.log(uncertainty)).mean())


def select_min_reprojection(errors: Sequence[Tensor], uncertainties: Sequence[Tensor],
                            identity_errors: Sequence[Tensor],
                            identity_noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Combines the source frames of a triplet as monodepth2: per pixel the source with the smallest
    reprojection error Pe (chosen on Pe, so the uncertainty cannot pick the frame) and that pair's
    uncertainty; the auto-mask compares it with the smallest identity (unwarped) error, plus
    ``identity_noise`` (B,1,H,W) that breaks ties on flat regions as monodepth2's 1e-5 noise does.
    Lists of (B,1,H,W) -> (error, uncertainty, mask), each (B,1,H,W)."""
    if not errors or len(errors) != len(uncertainties) or len(errors) != len(identity_errors):
        raise ValueError(f"need one uncertainty and one identity error per reprojection error, got "
                         f"{len(errors)}, {len(uncertainties)}, {len(identity_errors)}")
    stacked = torch.cat(list(errors), dim=1)
    error, index = stacked.min(dim=1, keepdim=True)
    uncertainty = torch.cat(list(uncertainties), dim=1).gather(1, index)
    identity = torch.cat(list(identity_errors), dim=1).min(dim=1, keepdim=True).values
    if identity_noise is not None:
        identity = identity + identity_noise
    return error, uncertainty, auto_mask(error, identity)
