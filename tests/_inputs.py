"""Shared test inputs (imported by several test modules; tests never import another test module)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from dagan_fast import DaGAN


# ----------------------------------------------------------- motion ops (test_motion_ops, test_motion_triton)
def random_jacobians(B, K, g, dtype, scale_range=(0.5, 1.6)):
    """Well-conditioned (B,K,2,2): R(t) diag(s1, s2) R(u), with det of both signs."""
    t = torch.rand(B, K, generator=g, dtype=torch.float64) * 2 * math.pi
    u = torch.rand(B, K, generator=g, dtype=torch.float64) * 2 * math.pi
    lo, hi = scale_range
    s = lo + (hi - lo) * torch.rand(B, K, 2, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(B, K, generator=g, dtype=torch.float64) < 0.3, -1.0, 1.0)
    s[..., 1] *= sign

    def rot(a):
        c, sn = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([c, -sn], -1), torch.stack([sn, c], -1)], -2)

    return (rot(t) @ torch.diag_embed(s) @ rot(u)).to(dtype)


def make_inputs(B, K, C, H, W, *, dtype=torch.float64, seed=0, spread=1.0, jacobians=True):
    """source (B,C,H,W), kp_s, jac_s, kp_d, jac_d, mask_logits (B,K+1,H,W): fresh random, never zeros."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    kp_s = ((torch.rand(B, K, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread).to(dtype)
    kp_d = ((torch.rand(B, K, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread).to(dtype)
    jac_s = random_jacobians(B, K, g, dtype) if jacobians else None
    jac_d = random_jacobians(B, K, g, dtype) if jacobians else None
    logits = (2 * torch.randn(B, K + 1, H, W, generator=g, dtype=torch.float64)).to(dtype)
    return source, kp_s, jac_s, kp_d, jac_d, logits


# ------------------------------------------- a small DaGAN and a moving face (streaming, CLI, fast convolutions)
SIZE = 64
SMALL = dict(num_kp=10, kp_detector={"block_expansion": 8, "max_features": 64, "num_blocks": 3},
             generator_params={"block_expansion": 8, "max_features": 32, "num_bottleneck_blocks": 1},
             dense_motion_params={"block_expansion": 8, "max_features": 64, "num_blocks": 3})


def small_model(seed: int = 0) -> DaGAN:
    torch.manual_seed(seed)
    model = DaGAN(**SMALL)
    with torch.no_grad():
        model.generator.AttnModule.gamma.fill_(0.7)
        model.generator.final.weight.mul_(30.0)      # default init gives a flat grey output
        model.kp_detector.jacobian.weight.normal_(0.0, 0.01)
        model.kp_detector.jacobian.bias.add_(0.05 * torch.randn_like(model.kp_detector.jacobian.bias))
    return model


def face() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[0:224, 114:338])


def head_motion(n: int, size: int = SIZE) -> list:
    """n frames (size, size, 3) uint8: the face rotated/translated/scaled along smooth curves."""
    img = face()
    h, w = img.shape[:2]
    frames = []
    for i in range(n):
        t = 2 * np.pi * i / max(n, 1)
        m = cv2.getRotationMatrix2D((w / 2 + 6 * np.sin(t), h / 2), 8 * np.sin(t), 1.0 + 0.05 * np.cos(t))
        m[:, 2] += (8 * np.sin(2 * t), 5 * np.cos(t) - 5)
        warped = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
        frames.append(cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA))
    return frames
