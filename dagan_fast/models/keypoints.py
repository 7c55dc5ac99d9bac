"""DaGAN's keypoint detector (FOMM's, on RGB + depth), with the official attribute names."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.reference import make_coordinate_grid
from .blocks import AntiAliasInterpolation2d, Hourglass, concat_conv_heads

Tensor = torch.Tensor


class KPDetector(nn.Module):
    """Unsupervised keypoints with local affine Jacobians.

    x (B,num_channels,H,W) (DaGAN: cat(RGB, depth), 4 channels; H and W multiples of
    2**num_blocks / scale_factor, i.e. 128) -> {"value": (B,K,2) in [-1,1] as (x, y),
    "jacobian": (B,K,2,2)} (no "jacobian" without ``estimate_jacobian``). The heatmap is a softmax of
    ``kp`` logits / temperature over the (h,w) map left by the unpadded 7x7 conv (58x58 at 256).
    """

    def __init__(self, block_expansion: int = 32, num_kp: int = 15, num_channels: int = 4, max_features: int = 1024,
                 num_blocks: int = 5, temperature: float = 0.1, estimate_jacobian: bool = True,
                 scale_factor: float = 0.25, single_jacobian_map: bool = False, pad: int = 0):
        super().__init__()
        self.num_kp, self.temperature, self.scale_factor = num_kp, temperature, scale_factor
        self.predictor = Hourglass(block_expansion, in_features=num_channels, max_features=max_features,
                                   num_blocks=num_blocks)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=7, padding=pad)
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * self.num_jacobian_maps, kernel_size=7,
                                      padding=pad)
            with torch.no_grad():
                self.jacobian.weight.zero_()
                self.jacobian.bias.copy_(torch.tensor([1, 0, 0, 1], dtype=torch.float32).repeat(self.num_jacobian_maps))
        else:
            self.jacobian = None
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)
        # kp and jacobian as one convolution, set by fuse_heads(); not part of the state_dict
        self.register_buffer("fused_head_weight", None, persistent=False)
        self.register_buffer("fused_head_bias", None, persistent=False)

    def _head_maps(self, feature_map: Tensor):
        if self.fused_head_weight is not None:
            maps = F.conv2d(feature_map, self.fused_head_weight, self.fused_head_bias, padding=self.kp.padding)
            return maps[:, :self.num_kp], maps[:, self.num_kp:]
        logits = self.kp(feature_map)
        return logits, (self.jacobian(feature_map) if self.jacobian is not None else None)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if self.scale_factor != 1:
            x = self.down(x)
        logits, jacobian_map = self._head_maps(self.predictor(x))
        B, K, h, w = logits.shape
        heatmap = F.softmax(logits.reshape(B, K, h * w) / self.temperature, dim=2).view(B, K, h, w)
        grid = make_coordinate_grid(h, w, heatmap.dtype, heatmap.device)
        # The official reductions (broadcast product + sum) on these small maps keep the keypoints
        # bit-identical to the authors' code; a matmul reorders the sums (~1e-6 apart).
        out = {"value": (heatmap.unsqueeze(-1) * grid).sum(dim=(2, 3))}
        if jacobian_map is not None:
            maps = jacobian_map.reshape(B, self.num_jacobian_maps, 4, h, w)
            jac = (heatmap.unsqueeze(2) * maps).view(B, K, 4, h * w).sum(dim=-1)
            out["jacobian"] = jac.view(B, K, 2, 2)
        return out

    @torch.no_grad()
    def fuse_heads(self) -> None:
        """Inference only: ``kp`` and ``jacobian`` run as one convolution over the hourglass output."""
        if self.jacobian is None or self.fused_head_weight is not None:
            return
        self.fused_head_weight, self.fused_head_bias = concat_conv_heads(self.kp, self.jacobian)
