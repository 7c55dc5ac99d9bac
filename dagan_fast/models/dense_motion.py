"""DaGAN's dense motion network (FOMM's), on ``dagan_fast.ops``: the hourglass input comes from
``ops.sparse_motion_inputs`` and the mask softmax + motion mixture from ``ops.dense_motion``, so the
fastest backend runs them."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import official_motion
from .blocks import AntiAliasInterpolation2d, Hourglass, concat_conv_heads

Tensor = torch.Tensor


class DenseMotionNetwork(nn.Module):
    """Dense motion from sparse keypoints, at ``scale_factor`` of the image resolution.

    source_image (B,C,H,W), kp dicts {"value": (B,K,2), "jacobian": (B,K,2,2) (optional)} ->
    {"sparse_deformed": (B,K+1,C,h,w), "mask": (B,K+1,h,w) softmax, "deformation": (B,h,w,2),
    "occlusion_map": (B,1,h,w) in (0,1)} with (h,w) = (H,W) * scale_factor (64x64 at 256).
    The keypoint dicts may be float32 while the network runs float16/bfloat16 (mixed precision): the motion
    math and the mask softmax then run in float32 and "deformation" comes back in the network's dtype.
    ``official_rounding = True`` computes the motion stage in the authors' float arithmetic (see
    ``official_motion``) instead of the fused ops: slower, reproduces their float32 outputs to ~1e-5.
    """

    official_rounding = False

    def __init__(self, block_expansion: int = 64, num_blocks: int = 5, max_features: int = 1024, num_kp: int = 15,
                 num_channels: int = 3, estimate_occlusion_map: bool = True, scale_factor: float = 0.25,
                 kp_variance: float = 0.01):
        super().__init__()
        self.num_kp, self.num_channels = num_kp, num_channels
        self.scale_factor, self.kp_variance = scale_factor, kp_variance
        self.hourglass = Hourglass(block_expansion, in_features=(num_kp + 1) * (num_channels + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.occlusion = (nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=7, padding=3)
                          if estimate_occlusion_map else None)
        if scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, scale_factor)
        # mask and occlusion as one convolution, set by fuse_heads(); not part of the state_dict
        self.register_buffer("fused_head_weight", None, persistent=False)
        self.register_buffer("fused_head_bias", None, persistent=False)

    def downsample(self, source_image: Tensor) -> Tensor:
        """(B,C,H,W) -> (B,C,h,w): the source as the network sees it (source-only: reusable)."""
        return self.down(source_image) if self.scale_factor != 1 else source_image

    def forward(self, source_image: Tensor, kp_driving: Dict[str, Tensor], kp_source: Dict[str, Tensor], *,
                source_small: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``source_small``: ``downsample(source_image)`` computed already (then source_image is unused)."""
        if source_small is None:
            source_small = self.downsample(source_image)
        B, C, h, w = source_small.shape
        K = self.num_kp
        jac_s, jac_d = kp_source.get("jacobian"), kp_driving.get("jacobian")
        # Mixed precision (the Animator's float16/bfloat16 mode): the keypoints and Jacobians arrive in float32;
        # the Taylor motion, the heatmaps and the mask softmax run in their dtype, the hourglass in its own.
        motion_dtype, net_dtype = kp_source["value"].dtype, self.mask.weight.dtype
        small = source_small if source_small.dtype == motion_dtype else source_small.to(motion_dtype)
        if self.official_rounding:
            inputs, motions = official_motion.sparse_motion_inputs(small, kp_source["value"], jac_s,
                                                                   kp_driving["value"], jac_d, self.kp_variance)
        else:
            inputs = ops.sparse_motion_inputs(small, kp_source["value"], jac_s, kp_driving["value"], jac_d,
                                              self.kp_variance)
        prediction = self.hourglass(inputs if inputs.dtype == net_dtype else inputs.to(net_dtype))
        if self.fused_head_weight is not None:
            maps = F.conv2d(prediction, self.fused_head_weight, self.fused_head_bias, padding=self.mask.padding)
            mask_logits, occlusion_logits = maps[:, :K + 1].contiguous(), maps[:, K + 1:]
        else:
            mask_logits = self.mask(prediction)
            occlusion_logits = self.occlusion(prediction) if self.occlusion is not None else None
        if mask_logits.dtype != motion_dtype:
            mask_logits = mask_logits.to(motion_dtype)
        if self.official_rounding:
            deformation, mask = official_motion.dense_motion(mask_logits, motions)
        else:
            deformation, mask = ops.dense_motion(mask_logits, kp_source["value"], jac_s, kp_driving["value"], jac_d)
        out = {
            "sparse_deformed": inputs.view(B, K + 1, C + 1, h, w)[:, :, 1:],
            "mask": mask,
            "deformation": deformation,
        }
        if occlusion_logits is not None:
            out["occlusion_map"] = torch.sigmoid(occlusion_logits)
        return out

    @torch.no_grad()
    def fuse_heads(self) -> None:
        """Inference only: ``mask`` and ``occlusion`` run as one 7x7 convolution over the hourglass output."""
        if self.occlusion is None or self.fused_head_weight is not None:
            return
        self.fused_head_weight, self.fused_head_bias = concat_conv_heads(self.mask, self.occlusion)
