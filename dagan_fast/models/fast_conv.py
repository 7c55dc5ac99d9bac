"""Fast float32 CPU convolutions for inference: Winograd F(4x4, 3x3) (``dagan_fast::winograd_conv3x3``).

The 3x3 stride-1 convolutions are ~85% of a DaGAN 256 frame's FLOPs (the bottleneck res-blocks alone 58 of
109 GFLOP). Winograd's F(4x4, 3x3) computes each 4x4 output tile with 36 products per channel pair instead of
144, as 36 matrix products (MKL) between C++ transforms (``csrc/cpu/winograd.cpp``). Measured on this
project's AVX2 VM (2 threads, batch 1): 256->256 at 64x64 in 18 ms against 35 ms for the pre-packed oneDNN
convolution; on narrow maps (128->64 at 256x256) the transforms' memory traffic eats most of the gain.

``FastConv2d`` therefore times both on the first call of each input shape (one measurement per shape for
the whole process) and keeps the faster (``policy "auto"``; ``"always"`` forces Winograd, for tests).
Everything it does not run as Winograd goes to ``PackedConv2d`` (oneDNN, weights packed once) or, with
autograd, to ``nn.Conv2d``. The rounding differs from a direct convolution: measured errors against float64
are ~4x those of oneDNN's float32 (~4e-5 on outputs of magnitude 7), far inside the model's own float32 noise
(the official float32 output is ~1e-3 from float64).

The same kernel fuses what surrounds these convolutions in DaGAN's blocks: the nearest 2x upsampling before
an UpBlock2d's convolution, the pre-activation BatchNorm + ReLU before a ResBlock2d's first one, and the
residual add after its second (``FastConv2d.winograd``).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..ops._extension import extension
from .packed_conv import PackedConv2d, TransientCache, _version
from .retype import retype_modules

__all__ = ["FastConv2d", "fast_convolutions_available", "use_fast_convolutions", "winograd_weight"]

Tensor = torch.Tensor
POLICIES = ("auto", "always")

# G of F(4x4, 3x3) (Lavin & Gray), with points 0, +-1, +-2 and infinity.
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_TIMING_RUNS = 2


def fast_convolutions_available() -> bool:
    """Whether the compiled op library with the Winograd kernel is loaded."""
    return extension().loaded and hasattr(torch.ops.dagan_fast, "winograd_conv3x3")


_FLOPS_REGISTERED = []


def _register_flops() -> None:
    """torch.utils.flop_counter counts a Winograd convolution as the direct one it replaces (2 C Co 9 per
    output pixel), so FLOP rates stay comparable across the two paths. Done on first use, not at import:
    the flop counter imports Triton, which ``import dagan_fast`` must not."""
    if _FLOPS_REGISTERED:
        return
    _FLOPS_REGISTERED.append(True)
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.dagan_fast.winograd_conv3x3)
    def _flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        batch, _, out_h, out_w = out_shape
        return 2 * weight_shape[1] * weight_shape[2] * 9 * batch * out_h * out_w


def winograd_weight(weight: Tensor) -> Tensor:
    """(Co,C,3,3) filters -> (36,C,Co) float32: G g G^T per filter (computed in float64), laid out for the
    kernel's 36 matrix products."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,ocab,jb->ijco", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).float().contiguous()


def _best_seconds(fn: Callable[[], Tensor]) -> float:
    best = float("inf")
    for _ in range(_TIMING_RUNS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# Winograd or not, per (input shape, output channels, padding, fused options, threads): timing depends on the
# shapes only, so every convolution of a shape shares one measurement (DaGAN's 12 bottleneck convolutions: one)
_CHOICES: Dict[tuple, bool] = {}


class _WinogradCache(TransientCache):
    """The transformed weight of one FastConv2d and what it came from."""

    def __init__(self):
        self.weight: Optional[Tensor] = None
        self.key: Optional[tuple] = None


class FastConv2d(PackedConv2d):
    """``nn.Conv2d`` (same parameters and state_dict) whose float32 CPU inference runs Winograd F(4x4, 3x3)
    where that is faster: input (B,Cin,H,W) -> (B,Cout,H',W') channels_last. Only 3x3, stride 1, no
    dilation or groups, zero padding <= 2 (``use_fast_convolutions`` converts only those)."""

    policy = "auto"

    @property
    def _wino(self) -> _WinogradCache:
        cache = self.__dict__.get("_winograd_cache")
        if cache is None:
            cache = self.__dict__["_winograd_cache"] = _WinogradCache()
        return cache

    def _applies(self, x: Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.dim() == 4 and not torch.is_grad_enabled() and fast_convolutions_available())

    def _transformed(self) -> Tensor:
        key = (_version(self.weight), self.weight.data_ptr())
        cache = self._wino
        if cache.weight is None or cache.key != key:
            cache.weight, cache.key = winograd_weight(self.weight), key
        return cache.weight

    def winograd(self, x: Tensor, *, relu: bool = False, upsample: bool = False,
                 pre: Optional[Tuple[Tensor, Tensor]] = None, residual: Optional[Tensor] = None,
                 direct: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """``self(x')`` through the Winograd kernel, or None where it does not apply or (policy "auto") the
        direct path was faster for this input shape. x (B,Cin,H,W); x' = x enlarged 2x by nearest neighbour
        when ``upsample``, then relu(x' * scale + shift) per channel for ``pre = (scale, shift)`` (C,);
        ``residual`` (B,Cout,H',W') is added, then ReLU when ``relu``. ``direct``: what the caller would run
        otherwise, timed against it on the first call of each shape (default: the packed convolution)."""
        if not self._applies(x):
            return None
        weight = self._transformed()

        def fast() -> Tensor:
            return torch.ops.dagan_fast.winograd_conv3x3(x, weight, self.bias, None if pre is None else pre[0],
                                                         None if pre is None else pre[1], upsample,
                                                         self.padding[0], relu, residual)

        if self.policy == "always":
            return fast()
        shape = (tuple(x.shape), self.out_channels, self.padding[0], upsample, pre is not None,
                 residual is not None, relu, torch.get_num_threads())
        choice = _CHOICES.get(shape)
        if choice is None:
            if direct is None:
                def direct():
                    return PackedConv2d.forward_relu(self, x) if relu else PackedConv2d.forward(self, x)
            fast(), direct()                                    # first runs: page in, pack, warm caches
            choice = _CHOICES[shape] = _best_seconds(fast) < _best_seconds(direct)
        return fast() if choice else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.winograd(x)
        return super().forward(x) if out is None else out

    def forward_relu(self, x: Tensor) -> Tensor:
        """``relu(self(x))``, fused into the convolution (Winograd or packed oneDNN)."""
        out = self.winograd(x, relu=True)
        return super().forward_relu(x) if out is None else out


def _eligible(conv: nn.Module) -> bool:
    return (type(conv) in (nn.Conv2d, PackedConv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1] and 0 <= conv.padding[0] <= 2)


def use_fast_convolutions(module: nn.Module, policy: str = "auto") -> int:
    """Turns every eligible convolution of ``module`` (plain or packed; 3x3, stride 1, no dilation or groups,
    equal zero padding <= 2) into a ``FastConv2d`` in place (weights shared, state_dict unchanged); returns
    how many. ``policy``: "auto" (Winograd where it measures faster per input shape) or "always".
    RuntimeError when the compiled kernel is not loaded."""
    if policy not in POLICIES:
        raise ValueError(f"use_fast_convolutions: policy must be one of {POLICIES}, got {policy!r}")
    if not fast_convolutions_available():
        raise RuntimeError("fast convolutions need dagan_fast's compiled op library (dagan_fast::winograd_conv3x3), "
                           "which is not loaded here; run without fast_conv")
    _register_flops()
    count = retype_modules(module, _eligible, FastConv2d)
    for m in module.modules():
        if isinstance(m, FastConv2d):
            if policy != FastConv2d.policy:
                m.policy = policy
            elif "policy" in m.__dict__:
                del m.policy
    return count
