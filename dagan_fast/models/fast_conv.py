"""Fast float32 CPU convolutions: Winograd F(4x4, 3x3) (``dagan_fast::winograd_conv3x3``), for inference and
training.

The 3x3 stride-1 convolutions are ~85% of a DaGAN 256 frame's FLOPs (the bottleneck res-blocks alone 58 of
109 GFLOP). Winograd's F(4x4, 3x3) computes each 4x4 output tile with 36 products per channel pair instead of
144, as 36 matrix products (MKL) between C++ transforms (``csrc/cpu/winograd.cpp``). Measured on this
project's AVX2 VM (2 threads, batch 1): 256->256 at 64x64 in 18 ms against 35 ms for the pre-packed oneDNN
convolution; on narrow maps (128->64 at 256x256) the transforms' memory traffic eats most of the gain.

``FastConv2d`` therefore times both on the first call of each input shape (one measurement per shape for
the whole process) and keeps the faster (``policy "auto"``; ``"always"`` forces Winograd, for tests).
Everything it does not run as Winograd goes to ``PackedConv2d`` (oneDNN, weights packed once). The rounding
differs from a direct convolution: measured errors against float64 are ~4x those of oneDNN's float32 (~4e-5
on outputs of magnitude 7), far inside the model's own float32 noise (the official float32 output is ~1e-3
from float64).

With autograd (training), each of the three products of a convolution step chooses, per shape, between
Winograd and oneDNN's direct convolution by timing both once: the forward; the input's gradient (a Winograd
convolution of the output's gradient with the flipped, transposed filters); the filters' gradient (the
adjoint of the forward's transforms, ``dagan_fast::winograd_conv3x3_weight_grad``). Measured on the AVX2 VM
(2 threads), 256->256 at 64x64: forward 18 / 30 ms, input gradient 17 / 31 ms, filter gradient 17 / 38 ms.
Outputs and input gradients keep the input's memory format (NCHW stays NCHW, so a following train-mode
BatchNorm rounds as it does unpatched; the kernels transpose NCHW maps in cache-sized blocks, each input and
output gradient once). A backward that builds a graph (``create_graph=True``) runs the direct,
differentiable convolution gradients instead.

The same kernel fuses what surrounds these convolutions in DaGAN's blocks: the nearest 2x upsampling before
an UpBlock2d's convolution, the pre-activation BatchNorm + ReLU before a ResBlock2d's first one, and the
residual add after its second (``FastConv2d.winograd``).

Convolutions to 1-4 channels (the last 7x7 to RGB, the occlusion and disparity heads) are oneDNN's weakest
shapes (its kernels vectorise over output channels: 64 -> 3 at 256x256 runs at ~30% of its 3x3 rate).
``NarrowConv2d`` runs them on ``dagan_fast::narrow_conv2d`` (``csrc/cpu/narrow_conv.cpp``), vectorised over
input channels instead, where it measures faster per shape: 10 ms instead of 21 ms (channels_last) and 44 ms
(NCHW) for that convolution on the AVX2 VM; its gradients stay oneDNN's.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._extension import extension
from .packed_conv import PackedConv2d, TransientCache, _version
from .retype import retype_modules

__all__ = ["FastConv2d", "NarrowConv2d", "fast_convolutions_available", "use_fast_convolutions"]

Tensor = torch.Tensor
POLICIES = ("auto", "always")

_TIMING_RUNS = 2


def fast_convolutions_available() -> bool:
    """Whether the compiled op library with the Winograd and narrow convolution kernels is loaded."""
    return extension().loaded and all(hasattr(torch.ops.dagan_fast, op)
                                      for op in ("winograd_conv3x3", "narrow_conv2d"))


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

    @register_flop_formula(torch.ops.dagan_fast.narrow_conv2d)
    def _narrow_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        batch, out_channels, out_h, out_w = out_shape
        return 2 * weight_shape[1] * weight_shape[2] * weight_shape[3] * out_channels * batch * out_h * out_w


def _best_seconds(fn: Callable[[], Tensor]) -> float:
    best = float("inf")
    for _ in range(_TIMING_RUNS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# Winograd or not, per (part, input shape, output channels, padding, options, threads), part one of "inference",
# "forward", "input grad", "filter grad": timing depends on the shapes only, so every convolution of a shape
# shares one measurement (DaGAN's 12 bottleneck convolutions: one)
_CHOICES: Dict[tuple, bool] = {}


def _chosen(key: tuple, policy: str, fast: Callable[[], Tensor], direct: Callable[[], Tensor]) -> bool:
    """Whether Winograd (``fast``) runs for ``key``: always under policy "always"; else measured once per
    process against ``direct`` (each run once first: page in, pack, warm caches)."""
    if policy == "always":
        return True
    choice = _CHOICES.get(key)
    if choice is None:
        fast(), direct()
        choice = _CHOICES[key] = _best_seconds(fast) < _best_seconds(direct)
    return choice


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s memory format (channels_last or contiguous NCHW)."""
    return t.contiguous(memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)


def _differentiable_gradients(x: Tensor, weight: Tensor, grad: Tensor, padding, needs) -> Tuple:
    """(input gradient or None, filter gradient or None) of conv2d(x, weight, padding=padding) for ``grad``,
    as differentiable direct convolutions (a backward with create_graph=True builds a graph through them)."""
    grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=padding) if needs[0] else None
    grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=padding) if needs[1] else None
    return grad_x, grad_w


class _Once:
    """A value made on first call (``make()``) and held; ``value`` is None until then. ``fresh``: made anew
    and not held (a timing run that must pay for it, as the steady state will)."""

    def __init__(self, make: Callable[[], Tensor], value: Optional[Tensor] = None):
        self.make, self.value = make, value

    def __call__(self, fresh: bool = False) -> Tensor:
        if fresh:
            return self.make()
        if self.value is None:
            self.value = self.make()
        return self.value


class _WinogradCache(TransientCache):
    """The Winograd-domain filters of one FastConv2d, each with the weight version it was made from."""

    def __init__(self):
        self.filters: Dict[bool, Tuple[tuple, Tensor]] = {}

    def get(self, weight: Tensor, transposed: bool = False, fresh: bool = False) -> Tensor:
        """G g G^T of ``weight`` (Co,C,3,3) as (36,C,Co) float32, or for ``transposed`` that of its flipped
        transpose (the input gradient's filters) as (36,Co,C); made again when the weight changed (optimizer
        steps bump its version), so frozen weights, gradient accumulation and repeated forwards reuse it.
        ``fresh``: made anew and not kept (training's timing runs: a step after an optimizer step pays for
        the transform, which for 1024x1024 filters at 4x4 maps costs more than the convolution)."""
        if fresh:
            return torch.ops.dagan_fast.winograd_filter(weight.detach(), transposed)
        key = (_version(weight), weight.data_ptr())
        held = self.filters.get(transposed)
        if held is None or held[0] != key:
            held = self.filters[transposed] = (key, torch.ops.dagan_fast.winograd_filter(weight.detach(), transposed))
        return held[1]


class _WinogradConvFunction(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=pad) for a 3x3 stride-1 convolution, each of forward, input gradient
    and filter gradient through Winograd or oneDNN (``_chosen``). x (B,C,H,W), weight (Co,C,3,3), bias (Co,)
    or None -> (B,Co,H',W') in x's memory format; ``filters``: the module's transformed-filter cache.

    Each part's timing runs pay for what that part would make itself in a training step (its transformed
    filters, which change every optimizer step; the NCHW -> channels_last transpositions no earlier Winograd
    part made), so the choice holds for the steady state."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: int, policy: str,
                filters: _WinogradCache) -> Tensor:
        ctx.pad, ctx.policy, ctx.has_bias, ctx.filters = pad, policy, bias is not None, filters
        # the input transposed (NCHW -> channels_last) at most once, for the forward and the filter gradient
        x_cl = _Once(lambda: torch.ops.dagan_fast.as_channels_last(x))

        def fast(fresh: bool = False) -> Tensor:
            return torch.ops.dagan_fast.winograd_conv3x3(x_cl(fresh), filters.get(weight, False, fresh), bias, None,
                                                         None, False, pad, False, None, _is_channels_last(x))

        def direct() -> Tensor:
            return F.conv2d(x, weight, bias, 1, pad)

        key = ("forward", tuple(x.shape), weight.shape[0], pad, bias is not None, torch.get_num_threads())
        out = fast() if _chosen(key, policy, lambda: fast(fresh=True), direct) else direct()
        ctx.save_for_backward(x, weight, x_cl.value if ctx.needs_input_grad[1] else None)
        return _like(out, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, saved_x_cl = ctx.saved_tensors
        pad, needs = ctx.pad, ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if ctx.has_bias and needs[2]:
            grad_b = grad.sum((0, 2, 3))
        if torch.is_grad_enabled():     # create_graph
            return (*_differentiable_gradients(x, weight, grad, pad, needs), grad_b, None, None, None)
        shape = (tuple(x.shape), weight.shape[0], pad, torch.get_num_threads())
        # one NCHW -> channels_last transposition of the output gradient serves both Winograd gradients
        grad_cl = _Once(lambda: torch.ops.dagan_fast.as_channels_last(grad))

        def direct(mask) -> Tensor:
            return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False,
                                                       [0, 0], 1, mask)

        grad_x_fast = False
        if needs[0]:
            def fast_x(fresh: bool = False) -> Tensor:
                return torch.ops.dagan_fast.winograd_conv3x3(grad_cl(fresh), ctx.filters.get(weight, True, fresh),
                                                             None, None, None, False, 2 - pad, False, None,
                                                             _is_channels_last(x))

            def direct_x() -> Tensor:
                return direct([True, False, False])[0]

            grad_x_fast = _chosen(("input grad",) + shape, ctx.policy, lambda: fast_x(fresh=True), direct_x)
            grad_x = _like(fast_x() if grad_x_fast else direct_x(), x)
        if needs[1]:
            x_cl = _Once(lambda: torch.ops.dagan_fast.as_channels_last(x), saved_x_cl)

            def fast_w(fresh: bool = False) -> Tensor:
                return torch.ops.dagan_fast.winograd_conv3x3_weight_grad(
                    x_cl(fresh and saved_x_cl is None), grad_cl(fresh and not grad_x_fast), pad)

            def direct_w() -> Tensor:
                return direct([False, True, False])[1]

            chosen = _chosen(("filter grad",) + shape, ctx.policy, lambda: fast_w(fresh=True), direct_w)
            grad_w = fast_w() if chosen else direct_w()
        return grad_x, grad_w, grad_b, None, None, None


class _KernelConv2d(PackedConv2d):
    """What FastConv2d and NarrowConv2d share: when their float32 CPU kernels apply, and the timing policy."""

    policy = "auto"

    def _applies(self, x: Tensor, training: bool = False) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.dim() == 4 and torch.is_grad_enabled() == training and fast_convolutions_available()
                and (self.bias is None or self.bias.dtype == torch.float32))

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))


class FastConv2d(_KernelConv2d):
    """``nn.Conv2d`` (same parameters and state_dict) whose float32 CPU inference runs Winograd F(4x4, 3x3)
    where that is faster: input (B,Cin,H,W) -> (B,Cout,H',W') channels_last. Only 3x3, stride 1, no
    dilation or groups, zero padding <= 2, Cout > 4 (``use_fast_convolutions`` converts only those)."""

    @property
    def _wino(self) -> _WinogradCache:
        cache = self.__dict__.get("_winograd_cache")
        if cache is None:
            cache = self.__dict__["_winograd_cache"] = _WinogradCache()
        return cache

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
        weight = self._wino.get(self.weight)

        def fast() -> Tensor:
            return torch.ops.dagan_fast.winograd_conv3x3(x, weight, self.bias, None if pre is None else pre[0],
                                                         None if pre is None else pre[1], upsample,
                                                         self.padding[0], relu, residual)

        shape = ("inference", tuple(x.shape), self.out_channels, self.padding[0], upsample, pre is not None,
                 residual is not None, relu, torch.get_num_threads())
        if direct is None:
            def direct():
                return PackedConv2d.forward_relu(self, x) if relu else PackedConv2d.forward(self, x)
        return fast() if _chosen(shape, self.policy, fast, direct) else None

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_grad(x):
            if self._applies(x, training=True):
                return _WinogradConvFunction.apply(x, self.weight, self.bias, self.padding[0], self.policy,
                                                   self._wino)
            return super().forward(x)
        out = self.winograd(x)
        return super().forward(x) if out is None else out

    def forward_relu(self, x: Tensor) -> Tensor:
        """``relu(self(x))``, fused into the convolution (Winograd or packed oneDNN) without autograd."""
        if self._needs_grad(x):
            return F.relu(self.forward(x))
        out = self.winograd(x, relu=True)
        return super().forward_relu(x) if out is None else out


class _NarrowConvFunction(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=padding) at stride 1 with 1-4 output channels: the forward through
    ``dagan_fast::narrow_conv2d`` or oneDNN (``_chosen``), the gradients through oneDNN. x (B,C,H,W), weight
    (Co,C,kh,kw), bias (Co,) or None -> (B,Co,H',W') in x's memory format."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Tuple[int, int],
                policy: str) -> Tensor:
        ctx.padding, ctx.has_bias = padding, bias is not None
        ctx.save_for_backward(x, weight)

        def fast() -> Tensor:
            return torch.ops.dagan_fast.narrow_conv2d(x, weight, bias, padding[0], padding[1], _is_channels_last(x))

        def direct() -> Tensor:
            return F.conv2d(x, weight, bias, 1, padding)

        key = ("narrow forward", tuple(x.shape), tuple(weight.shape), padding, bias is not None,
               torch.get_num_threads())
        return _like(fast() if _chosen(key, policy, fast, direct) else direct(), x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        padding, needs = list(ctx.padding), ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if ctx.has_bias and needs[2]:
            grad_b = grad.sum((0, 2, 3))
        if torch.is_grad_enabled():     # create_graph
            grad_x, grad_w = _differentiable_gradients(x, weight, grad, padding, needs)
        elif needs[0] or needs[1]:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], padding, [1, 1],
                                                                    False, [0, 0], 1, [needs[0], needs[1], False])
        return grad_x, grad_w, grad_b, None, None


class NarrowConv2d(_KernelConv2d):
    """``nn.Conv2d`` (same parameters and state_dict) with 1-4 output channels whose float32 CPU forward
    (inference and training) runs ``dagan_fast::narrow_conv2d`` where that is faster than oneDNN (DaGAN's
    last 7x7 convolution to RGB): input (B,Cin,H,W) -> (B,Cout,H',W'), channels_last in inference. Stride 1,
    no dilation or groups, zero padding below the kernel size (``use_fast_convolutions`` converts only
    those)."""

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_grad(x):
            if self._applies(x, training=True):
                return _NarrowConvFunction.apply(x, self.weight, self.bias, tuple(self.padding), self.policy)
            return super().forward(x)
        if self._applies(x):
            def fast() -> Tensor:
                return torch.ops.dagan_fast.narrow_conv2d(x, self.weight, self.bias, self.padding[0],
                                                          self.padding[1], True)

            def direct() -> Tensor:
                return PackedConv2d.forward(self, x)

            key = ("narrow inference", tuple(x.shape), tuple(self.weight.shape), tuple(self.padding),
                   self.bias is not None, torch.get_num_threads())
            if _chosen(key, self.policy, fast, direct):
                return fast()
        return super().forward(x)

    def forward_relu(self, x: Tensor) -> Tensor:
        """``relu(self(x))``."""
        return F.relu(self.forward(x))


def _narrow_eligible(conv: nn.Module) -> bool:
    return (type(conv) in (nn.Conv2d, PackedConv2d) and 1 <= conv.out_channels <= 4 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and all(0 <= p < k for p, k in zip(conv.padding, conv.kernel_size)))


def _eligible(conv: nn.Module) -> bool:
    # 1-4 output channels go to NarrowConv2d, which beats Winograd there (16 -> 1 at 256x256: 0.6 / 3.9 ms)
    return (type(conv) in (nn.Conv2d, PackedConv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.out_channels > 4
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1] and 0 <= conv.padding[0] <= 2)


def use_fast_convolutions(module: nn.Module, policy: str = "auto") -> int:
    """Turns every eligible convolution of ``module`` (plain or packed; 3x3, stride 1, no dilation or groups,
    equal zero padding <= 2, over 4 output channels) into a ``FastConv2d``, and every stride-1 one with 1-4
    output channels into a ``NarrowConv2d``, in place (weights shared, state_dict unchanged); returns how many
    in all. ``policy``: "auto" (the kernels where they measure faster per input shape) or "always".
    RuntimeError when the compiled kernels are not loaded."""
    if policy not in POLICIES:
        raise ValueError(f"use_fast_convolutions: policy must be one of {POLICIES}, got {policy!r}")
    if not fast_convolutions_available():
        raise RuntimeError("fast convolutions need dagan_fast's compiled op library (dagan_fast::winograd_conv3x3, "
                           "dagan_fast::narrow_conv2d), which is not loaded here; run without fast_conv")
    _register_flops()
    count = retype_modules(module, _eligible, FastConv2d) + retype_modules(module, _narrow_eligible, NarrowConv2d)
    for m in module.modules():
        if isinstance(m, _KernelConv2d):
            if policy != _KernelConv2d.policy:
                m.policy = policy
            elif "policy" in m.__dict__:
                del m.policy
    return count
