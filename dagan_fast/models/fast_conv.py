"""Opt-in fast CPU convolutions for inference: NNPACK's (Winograd / FFT) algorithm for stride-1 convolutions.

On an AVX2 CPU these run the 3x3 convolutions that dominate a DaGAN frame (the bottleneck res-blocks and the
up-blocks: ~78 of ~109 GFLOP per 256x256 frame) about 3x faster than the direct oneDNN kernels (measured end
to end on a 2-core VM: only ~5-10% per frame, as fresh-buffer page faults and the NCHW layout take the rest
back), at the price of a different rounding: measured differences up to ~3e-5 on DaGAN's outputs, far inside the float32 noise
floor of the model itself (the official code's float32 result differs from its float64 one by ~1e-3). They
are used only without autograd, on float32 CPU tensors, one image at a time (NNPACK is slow on batches);
everything else falls back to ``nn.Conv2d``. Enable with ``Animator(..., fast_conv=True)`` or
``use_fast_convolutions(model)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.layout import is_channels_last
from .retype import retype_modules

__all__ = ["FastConv2d", "fast_convolutions_available", "use_fast_convolutions"]

Tensor = torch.Tensor

# NNPACK transforms the weights on every call; on small maps (the hourglasses' 1024-channel convolutions at 4x4
# to 16x16) that transform outweighs the faster arithmetic, so they stay on oneDNN.
MIN_PIXELS = 32 * 32


def fast_convolutions_available() -> bool:
    """Whether this PyTorch build has NNPACK and it initialises on this CPU."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict) whose inference forward on float32 CPU tensors of at
    least ``MIN_PIXELS`` pixels runs NNPACK per image: input (B,Cin,H,W) -> (B,Cout,H,W), in the input's
    memory format."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled() or x.dim() != 4 \
                or x.shape[2] * x.shape[3] < MIN_PIXELS:
            return super().forward(x)
        channels_last = is_channels_last(x)
        images = [torch._nnpack_spatial_convolution(x[i:i + 1], self.weight, self.bias, list(self.padding),
                                                    list(self.stride)) for i in range(x.shape[0])]
        out = images[0] if len(images) == 1 else torch.cat(images)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))


def use_fast_convolutions(module: nn.Module) -> int:
    """Turns every eligible ``nn.Conv2d`` of ``module`` (stride 1, no dilation, no groups, zero padding) into
    a ``FastConv2d`` in place (weights shared, state_dict unchanged); returns how many. RuntimeError when
    NNPACK is unavailable here."""
    if not fast_convolutions_available():
        raise RuntimeError("fast convolutions need NNPACK, which this PyTorch build or CPU does not provide "
                           "(torch._nnpack_available() is False); run without fast_conv")
    return retype_modules(module, _eligible, FastConv2d)
