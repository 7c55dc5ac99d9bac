"""Bilinear feature warping with occlusion as a module on ``ops.warp_occlusion``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops

Tensor = torch.Tensor


class FusedWarp(nn.Module):
    """Drop-in for ``F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros",
    align_corners=False) * occlusion`` (DaGAN's ``deform_input`` followed by the occlusion product),
    in one kernel: the sampled features are never materialised before the product.

    input (B,C,Hi,Wi), grid (B,Ho,Wo,2) of (x, y) in [-1,1] (points outside, inf included, read zeros),
    occlusion (B,1,Ho,Wo) or None -> (B,C,Ho,Wo). Differentiable in all three. ``backend``: "cuda",
    "triton", "cpu", "reference", or None for the fastest backend that supports the inputs.
    """

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, input: Tensor, grid: Tensor, occlusion: Optional[Tensor] = None) -> Tensor:
        """input (B,C,Hi,Wi), grid (B,Ho,Wo,2), occlusion (B,1,Ho,Wo) or None -> (B,C,Ho,Wo)."""
        return ops.warp_occlusion(input, grid, occlusion, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
