"""The keypoint-conditioned patch discriminator of DaGAN (FOMM's ``MultiScaleDiscriminator``), with
the official attribute names (``discs.<scale>.down_blocks.<i>.conv/norm``, ``discs.<scale>.conv``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.reference import make_coordinate_grid
from .blocks import SpectralNormConv2d

Tensor = torch.Tensor


def kp2gaussian(kp_value: Tensor, spatial_size, kp_variance: float) -> Tensor:
    """Keypoints (B,K,2) -> gaussian heatmaps (B,K,H,W) = exp(-0.5 ||z - kp||^2 / variance)."""
    h, w = spatial_size
    grid = make_coordinate_grid(h, w, kp_value.dtype, kp_value.device)
    diff = grid.view(1, 1, h, w, 2) - kp_value.view(*kp_value.shape[:2], 1, 1, 2)
    return torch.exp(-0.5 * (diff ** 2).sum(-1) / kp_variance)


class DiscriminatorBlock(nn.Module):
    """Unpadded 4x4 conv -> InstanceNorm (affine, optional) -> LeakyReLU 0.2 -> AvgPool2 (optional).
    (B,Cin,H,W) -> (B,Cout,(H-3)/p,(W-3)/p)."""

    def __init__(self, in_features: int, out_features: int, norm: bool = False, kernel_size: int = 4,
                 pool: bool = False, sn: bool = False):
        super().__init__()
        self.conv = (SpectralNormConv2d(in_features, out_features, kernel_size) if sn
                     else nn.Conv2d(in_features, out_features, kernel_size))
        self.norm = nn.InstanceNorm2d(out_features, affine=True) if norm else None
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.norm is not None:
            out = self.norm(out)
        out = F.leaky_relu(out, 0.2)
        return F.avg_pool2d(out, 2) if self.pool else out


class Discriminator(nn.Module):
    """Patch discriminator on cat(image, K keypoint heatmaps) when ``use_kp``.
    x (B,C,H,W), kp {"value": (B,K,2)} -> (feature maps [one per block], prediction map (B,1,h,w))."""

    def __init__(self, num_channels: int = 3, block_expansion: int = 32, num_blocks: int = 4, max_features: int = 512,
                 sn: bool = False, use_kp: bool = True, num_kp: int = 15, kp_variance: float = 0.01, **_unused):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            cin = num_channels + num_kp * use_kp if i == 0 else min(max_features, block_expansion * (2 ** i))
            blocks.append(DiscriminatorBlock(cin, min(max_features, block_expansion * (2 ** (i + 1))), norm=i != 0,
                                             kernel_size=4, pool=i != num_blocks - 1, sn=sn))
        self.down_blocks = nn.ModuleList(blocks)
        cout = min(max_features, block_expansion * (2 ** num_blocks))
        self.conv = SpectralNormConv2d(cout, 1, 1) if sn else nn.Conv2d(cout, 1, kernel_size=1)
        self.use_kp, self.kp_variance = use_kp, kp_variance

    def forward(self, x: Tensor, kp: Optional[Dict[str, Tensor]] = None) -> Tuple[List[Tensor], Tensor]:
        out = x
        if self.use_kp:
            if kp is None:
                raise ValueError("Discriminator: this discriminator is keypoint-conditioned (use_kp); pass kp")
            out = torch.cat([out, kp2gaussian(kp["value"], x.shape[2:], self.kp_variance)], dim=1)
        feature_maps = []
        for block in self.down_blocks:
            out = block(out)
            feature_maps.append(out)
        return feature_maps, self.conv(out)


class MultiScaleDiscriminator(nn.Module):
    """One Discriminator per scale, stored as ``discs[str(scale).replace('.', '-')]`` (DaGAN: scale 1 ->
    ``discs.1``). x: {"prediction_<scale>": (B,C,H,W)} (an image pyramid) or a tensor for scale 1 alone
    -> {"feature_maps_<scale>": [...], "prediction_map_<scale>": (B,1,h,w)}."""

    def __init__(self, scales: Sequence[float] = (1,), **kwargs):
        super().__init__()
        self.scales = tuple(scales)
        self.discs = nn.ModuleDict({str(s).replace(".", "-"): Discriminator(**kwargs) for s in self.scales})

    def forward(self, x: Union[Tensor, Dict[str, Tensor]], kp: Optional[Dict[str, Tensor]] = None) -> Dict[str, object]:
        if isinstance(x, Tensor):
            if len(self.discs) != 1:
                raise ValueError(f"MultiScaleDiscriminator: scales {self.scales} need a pyramid dict "
                                 "{'prediction_<scale>': image}, got one tensor")
            x = {f"prediction_{str(self.scales[0])}": x}
        out = {}
        for key, disc in self.discs.items():
            scale = key.replace("-", ".")
            name = f"prediction_{scale}"
            if name not in x:
                raise KeyError(f"MultiScaleDiscriminator: missing pyramid level {name!r} (have {sorted(x)})")
            feature_maps, prediction = disc(x[name], kp)
            out[f"feature_maps_{scale}"] = feature_maps
            out[f"prediction_map_{scale}"] = prediction
        return out
