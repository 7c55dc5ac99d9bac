"""Pre-packed oneDNN convolutions for CPU inference (float32 and bfloat16).

``F.conv2d`` on a CPU re-derives oneDNN's blocked weight layout on every call, and for small batch-1 inputs
(numel <= 20480, e.g. the hourglasses' 1024-channel 3x3 convolutions at 4x4) it leaves oneDNN for ATen's
``slow_conv2d``, which also copies the weight per call. ``PackedConv2d`` reorders the weight once into the
layout oneDNN picks for the first input it sees (``torch._C._nn.mkldnn_reorder_conv2d_weight``, as
``torch.compile``'s CPU freezing pass does) and calls ``torch.ops.mkldnn._convolution_pointwise`` with it,
optionally with the following ReLU fused into the convolution.

Measured on this project's Sapphire-Rapids-class VM (1 thread, CPU time, batch 1, channels_last, best of 7):

=====================  ==================  ===================
convolution            float32 F / packed  bfloat16 F / packed
=====================  ==================  ===================
256->256 3x3 @64x64    26.6 / 25.3 ms      3.11 / 3.04 ms
1024->1024 3x3 @4x4    6.19 / 5.24 ms      6.11 / 1.21 ms
1024->512 3x3 @4x4     2.48 / 1.50 ms      2.10 / 0.60 ms
1024->1024 3x3 @8x8    28.7 / 10.1 ms      6.08 / 2.15 ms
=====================  ==================  ===================

Results equal ``F.conv2d``'s to float rounding (the same oneDNN kernels: bitwise where F.conv2d takes oneDNN
too, ~3e-6 relative where it took ``slow_conv2d``). Used only without autograd on CPU tensors; anything
else (training, CUDA, float64) runs ``nn.Conv2d.forward``. The packed weight is a cache, not state: the
state_dict is unchanged, and a weight changed after packing (``.to(dtype)``, ``load_state_dict``) is
repacked on the next call (its version counter and dtype are checked).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .retype import retype_modules

__all__ = ["PackedConv2d", "packed_convolutions_available", "use_packed_convolutions", "conv_relu"]

Tensor = torch.Tensor
_DTYPES = (torch.float32, torch.bfloat16)


def packed_convolutions_available() -> bool:
    """Whether this PyTorch build has oneDNN and its pointwise-fused convolution op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _version(t: Tensor) -> int:
    """The in-place version counter (-1 for inference tensors, which have none)."""
    return -1 if t.is_inference() else t._version


class TransientCache:
    """A per-module cache that is not state: deep copies and pickles start empty (``__init__`` again; a
    oneDNN tensor cannot be deep-copied or pickled)."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _PackCache(TransientCache):
    """The packed oneDNN weight of one PackedConv2d and what it was packed from."""

    def __init__(self):
        self.weight: Optional[Tensor] = None
        self.key: Optional[tuple] = None
        self.refused: set = set()   # dtypes whose packing oneDNN refused on this CPU


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state_dict) running inference on CPU float32/bfloat16 tensors with
    a weight packed once for oneDNN. input (B,Cin,H,W) -> (B,Cout,H',W'), channels_last (the input is
    converted to channels_last when it is not)."""

    @property
    def _cache(self) -> "_PackCache":
        cache = self.__dict__.get("_pack_cache")
        if cache is None:
            cache = self.__dict__["_pack_cache"] = _PackCache()
        return cache

    def _usable(self, x: Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dtype == self.weight.dtype and x.dim() == 4
                and not torch.is_grad_enabled() and self.padding_mode == "zeros" and isinstance(self.padding, tuple))

    def _weight_for(self, x: Tensor) -> Tensor:
        key = (self.weight.dtype, _version(self.weight), self.weight.data_ptr(),
               None if self.bias is None else (_version(self.bias), self.bias.data_ptr()))
        cache = self._cache
        if cache.weight is None or cache.key != key:
            with torch.no_grad():
                w = self.weight.detach().contiguous(memory_format=torch.channels_last)
                cache.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    list(x.shape))
            cache.key = key
        return cache.weight

    def _pointwise(self, x: Tensor, attr: str) -> Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._weight_for(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, attr, [], "")

    def _packed(self, x: Tensor, attr: str) -> Optional[Tensor]:
        """The packed convolution, or None where it does not run: unusable inputs, or a dtype oneDNN refuses
        to pack on this CPU (bfloat16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; remembered per module)."""
        if not self._usable(x) or x.dtype in self._cache.refused:
            return None
        try:
            return self._pointwise(x, attr)
        except RuntimeError:
            self._cache.refused.add(x.dtype)
            return None

    def forward(self, x: Tensor) -> Tensor:
        out = self._packed(x, "none")
        return super().forward(x) if out is None else out

    def forward_relu(self, x: Tensor) -> Tensor:
        """``relu(self(x))`` with the ReLU fused into the convolution where the packed path runs."""
        out = self._packed(x, "relu")
        return F.relu(super().forward(x), inplace=True) if out is None else out


def conv_relu(conv: nn.Module, x: Tensor) -> Tensor:
    """``relu(conv(x))``, fused when ``conv`` is a ``PackedConv2d``. (B,Cin,H,W) -> (B,Cout,H',W')."""
    if isinstance(conv, PackedConv2d):
        return conv.forward_relu(x)
    return F.relu(conv(x), inplace=True)


def _eligible(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def use_packed_convolutions(module: nn.Module) -> int:
    """Turns every plain ``nn.Conv2d`` of ``module`` with zero padding into a ``PackedConv2d`` in place
    (weights shared, state_dict unchanged); returns how many. RuntimeError when oneDNN is unavailable."""
    if not packed_convolutions_available():
        raise RuntimeError("packed convolutions need oneDNN (torch.backends.mkldnn), which this PyTorch build "
                           "lacks; run without them")
    return retype_modules(module, _eligible, PackedConv2d)
