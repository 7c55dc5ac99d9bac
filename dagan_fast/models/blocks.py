"""Building blocks of the official DaGAN networks (FOMM-style), with the official attribute names so
the released state_dicts load strictly, plus the eval-time folding helpers.

Folding (``fold_batchnorm``) is exact algebra: an eval BatchNorm right after a convolution is an affine
map per output channel, so it merges into that convolution's weight and bias. Blocks whose BatchNorm
comes before a ReLU or a residual add (pre-activation ``ResBlock2d.norm1``) keep it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast_conv import FastConv2d
from .packed_conv import conv_relu

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# folding helpers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` with ``bn`` in eval mode (running statistics).

    The folded weight is computed in float64 and cast back, so the only difference from the unfolded
    pair is float32 rounding of the result.
    """
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                      device=w.device)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(b)
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    scale = gamma * inv_std
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_((w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    fused.bias.copy_(((b - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))
    return fused


def _eval_affine(norm: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """(scale, shift) (C,) float32 with norm(x) = x * scale + shift for an eval-mode BatchNorm2d with running
    statistics, else None."""
    if type(norm) is not nn.BatchNorm2d or norm.training or norm.running_mean is None:
        return None
    weight = norm.weight if norm.affine else torch.ones_like(norm.running_var)
    bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    scale = weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    return scale.float(), (bias.double() - norm.running_mean.double() * scale).float()


class _ConvNorm(nn.Module):
    """Shared folding for blocks that apply ``norm`` right after ``conv``."""

    conv: nn.Conv2d
    norm: nn.Module

    def fold_batchnorm(self) -> None:
        """Merges the eval BatchNorm ``norm`` into ``conv`` (``norm`` becomes Identity)."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.conv = fold_conv_bn(self.conv, self.norm)
            self.norm = nn.Identity()


# --------------------------------------------------------------------------------------------
# FOMM blocks
# --------------------------------------------------------------------------------------------
class SameBlock2d(_ConvNorm):
    """conv -> BatchNorm -> ReLU at the same resolution: (B,Cin,H,W) -> (B,Cout,H,W)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, nn.Identity):             # folded: the ReLU fuses into a packed conv
            return conv_relu(self.conv, x)
        return F.relu(self.norm(self.conv(x)), inplace=True)


class DownBlock2d(_ConvNorm):
    """conv -> BatchNorm -> ReLU -> AvgPool2d(2): (B,Cin,H,W) -> (B,Cout,H/2,W/2)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, nn.Identity):
            return F.avg_pool2d(conv_relu(self.conv, x), 2)
        return F.avg_pool2d(F.relu(self.norm(self.conv(x)), inplace=True), 2)


class UpBlock2d(_ConvNorm):
    """nearest x2 -> conv -> BatchNorm -> ReLU: (B,Cin,H,W) -> (B,Cout,2H,2W)."""

    def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, nn.Identity) and isinstance(self.conv, FastConv2d):
            out = self.conv.winograd(x, relu=True, upsample=True, direct=lambda: self._direct(x))
            if out is not None:
                return out
        return self._direct(x)

    def _direct(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if isinstance(self.norm, nn.Identity):
            return conv_relu(self.conv, x)
        return F.relu(self.norm(self.conv(x)), inplace=True)


class ResBlock2d(nn.Module):
    """Pre-activation residual block BN-ReLU-conv-BN-ReLU-conv + x: (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, in_features: int, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(in_features, affine=True)
        self.norm2 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm2, nn.Identity) and isinstance(self.conv1, FastConv2d) \
                and isinstance(self.conv2, FastConv2d):
            out = self._winograd(x)
            if out is not None:
                return out
        return self._direct(x)

    def _winograd(self, x: Tensor) -> Optional[Tensor]:
        """The folded block as two Winograd convolutions: norm1 + ReLU inside the first one's input
        transform, the residual add inside the second one's output transform; None where they do not run."""
        pre = _eval_affine(self.norm1)
        if pre is None:
            return None
        hidden = self.conv1.winograd(x, relu=True, pre=pre,
                                     direct=lambda: conv_relu(self.conv1, F.relu(self.norm1(x))))
        if hidden is None:
            return None
        out = self.conv2.winograd(hidden, residual=x, direct=lambda: self.conv2(hidden) + x)
        return self.conv2(hidden) + x if out is None else out

    def _direct(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x), inplace=True)
        if isinstance(self.norm2, nn.Identity):
            out = conv_relu(self.conv1, out)
        else:
            out = F.relu(self.norm2(self.conv1(out)), inplace=True)
        return self.conv2(out) + x

    def fold_batchnorm(self) -> None:
        """Merges ``norm2`` into ``conv1`` (it follows it directly). ``norm1`` stays: it acts on the
        residual input before a ReLU, so no convolution can absorb it."""
        if isinstance(self.norm2, nn.BatchNorm2d):
            self.conv1 = fold_conv_bn(self.conv1, self.norm2)
            self.norm2 = nn.Identity()


class Encoder(nn.Module):
    """Hourglass encoder: ``down_blocks`` of DownBlock2d. (B,Cin,H,W) -> list of num_blocks+1 maps,
    the input first, each next one at half the resolution."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            cin = in_features if i == 0 else min(max_features, block_expansion * (2 ** i))
            blocks.append(DownBlock2d(cin, min(max_features, block_expansion * (2 ** (i + 1)))))
        self.down_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> List[Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    """Hourglass decoder: ``up_blocks`` of UpBlock2d, each output concatenated with the matching skip;
    the last skip is the hourglass input, so the result has block_expansion + in_features channels."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            cin = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            blocks.append(UpBlock2d(cin, min(max_features, block_expansion * (2 ** i))))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        out = features[-1]
        for block, skip in zip(self.up_blocks, reversed(features[:-1])):
            out = torch.cat([block(out), skip], dim=1)
        return out


class Hourglass(nn.Module):
    """U-Net of the official code: (B,in_features,H,W) -> (B,block_expansion+in_features,H,W).
    H and W must be divisible by 2**num_blocks (the skips are concatenated)."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur then subsampling (official): sigma = (1/scale - 1)/2, kernel 2*round(4 sigma)+1,
    zero padding, depthwise; keeps every (1/scale)-th pixel from index 0.
    (B,C,H,W) -> (B,C,ceil(H*scale),ceil(W*scale)). The kernel is the buffer ``weight`` (C,1,k,k),
    stored in the official state_dicts."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.ka = kernel_size // 2
        self.kb = self.ka - 1 if kernel_size % 2 == 0 else self.ka
        coords = torch.arange(kernel_size, dtype=torch.float32)
        mean = (kernel_size - 1) / 2
        g = torch.exp(-((coords - mean) ** 2) / (2 * sigma ** 2))
        kernel = g.view(-1, 1) * g.view(1, -1)
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1))
        self.groups = channels
        self.scale = scale
        self.int_inv_scale = int(1 / scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale == 1.0:
            return x
        if self.ka == self.kb:
            # A strided convolution computes exactly the kept pixels (the official code convolves every
            # pixel, then drops 15 of 16).
            return F.conv2d(x, self.weight, padding=self.ka, stride=self.int_inv_scale, groups=self.groups)
        out = F.conv2d(F.pad(x, (self.ka, self.kb, self.ka, self.kb)), self.weight, groups=self.groups)
        return out[:, :, ::self.int_inv_scale, ::self.int_inv_scale]


# --------------------------------------------------------------------------------------------
# spectral norm and SPADE
# --------------------------------------------------------------------------------------------
class SpectralNormConv2d(nn.Module):
    """Conv2d with spectral normalisation, state_dict-compatible with ``torch.nn.utils.spectral_norm``
    (``weight_orig``, ``weight_u``, ``weight_v``, ``bias``). Eval: weight = weight_orig / (u^T W v) with
    the stored u, v (no power iteration). Training: one power iteration per call updates u, v first.
    (B,Cin,H,W) -> (B,Cout,H',W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True,
                 dilation: int = 1, eps: float = 1e-12):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.dilation, self.eps = kernel_size, padding, dilation, eps
        weight = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_orig = nn.Parameter(weight)
        u = F.normalize(torch.randn(out_channels), dim=0, eps=eps)
        v = F.normalize(torch.randn(in_channels * kernel_size * kernel_size), dim=0, eps=eps)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def normalized_weight(self) -> Tensor:
        """weight_orig / sigma, (Cout,Cin,k,k); in training mode updates u and v first."""
        w_mat = self.weight_orig.flatten(1)
        u, v = self.weight_u, self.weight_v
        if self.training:
            with torch.no_grad():
                v = F.normalize(torch.mv(w_mat.t(), u), dim=0, eps=self.eps, out=v)
                u = F.normalize(torch.mv(w_mat, v), dim=0, eps=self.eps, out=u)
            u, v = u.clone(), v.clone()
        sigma = torch.dot(u, torch.mv(w_mat, v))
        return self.weight_orig / sigma

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding, dilation=self.dilation)

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A plain Conv2d holding the eval weight (stored u, v; for inference only)."""
        w_mat = self.weight_orig.flatten(1)
        w = self.weight_orig / torch.dot(self.weight_u, torch.mv(w_mat, self.weight_v))
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                         dilation=self.dilation, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        conv.weight.copy_(w)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: InstanceNorm2d(affine=False)(x) * (1 + gamma) + beta, gamma and
    beta from ``mlp_shared`` (conv label_nc->128, ReLU) then ``mlp_gamma``/``mlp_beta`` (3x3) on the
    segmap nearest-resized to x. x (B,C,H,W), segmap (B,label_nc,Hs,Ws) -> (B,C,H,W)."""

    def __init__(self, norm_nc: int, label_nc: int, nhidden: int = 128):
        super().__init__()
        self.norm_nc = norm_nc
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, 3, padding=1)
        self.mlp_gamma_beta = None  # set by fuse(): gamma and beta in one convolution

    def modulation(self, segmap: Tensor) -> tuple:
        """(gamma, beta), each (B,C,Hs,Ws), from a segmap already at x's size."""
        actv = self.mlp_shared(segmap)
        if self.mlp_gamma_beta is not None:
            return self.mlp_gamma_beta(actv).split(self.norm_nc, dim=1)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x: Tensor, segmap: Tensor, normalized: Tensor = None) -> Tensor:
        if normalized is None:
            normalized = F.instance_norm(x, eps=self.param_free_norm.eps)
        if segmap.shape[2:] != x.shape[2:]:
            segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        gamma, beta = self.modulation(segmap)
        return torch.addcmul(beta, normalized, gamma + 1)

    @torch.no_grad()
    def fuse(self) -> None:
        """Inference only: one convolution for gamma and beta (same values, one pass over the hidden map)."""
        if self.mlp_gamma_beta is not None:
            return
        g, b = self.mlp_gamma, self.mlp_beta
        conv = nn.Conv2d(g.in_channels, 2 * self.norm_nc, 3, padding=1, device=g.weight.device, dtype=g.weight.dtype)
        conv.weight.copy_(torch.cat([g.weight, b.weight]))
        conv.bias.copy_(torch.cat([g.bias, b.bias]))
        self.mlp_gamma_beta = conv
        del self.mlp_gamma, self.mlp_beta


class SPADEResnetBlock(nn.Module):
    """SPADE residual block (fin -> fout): shortcut + conv_1(actvn(norm_1(conv_0(actvn(norm_0(x)))))),
    learned shortcut conv_s(norm_s(x)) when fin != fout; spectral-normed convs; leaky ReLU 0.2.
    x (B,fin,H,W), segmap (B,label_nc,Hs,Ws) -> (B,fout,H,W)."""

    def __init__(self, fin: int, fout: int, label_nc: int, spectral: bool = True):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)

        def conv(cin, cout, k, pad, bias=True):
            if spectral:
                return SpectralNormConv2d(cin, cout, k, padding=pad, bias=bias)
            return nn.Conv2d(cin, cout, k, padding=pad, bias=bias)

        self.conv_0 = conv(fin, fmiddle, 3, 1)
        self.conv_1 = conv(fmiddle, fout, 3, 1)
        if self.learned_shortcut:
            self.conv_s = conv(fin, fout, 1, 0, bias=False)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmiddle, label_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc)

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:
        if segmap.shape[2:] != x.shape[2:]:
            segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        # norm_0 and norm_s normalise the same x: compute the instance norm once.
        normalized = F.instance_norm(x, eps=self.norm_0.param_free_norm.eps)
        if self.learned_shortcut:
            x_s = self.conv_s(self.norm_s(x, segmap, normalized))
        else:
            x_s = x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap, normalized), 0.2, inplace=True))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2, inplace=True))
        return x_s + dx

    def to_inference(self) -> None:
        """Spectral-norm convs become plain convs with the precomputed weight; SPADE convs fused."""
        for name in ("conv_0", "conv_1", "conv_s"):
            module = getattr(self, name, None)
            if isinstance(module, SpectralNormConv2d):
                setattr(self, name, module.to_conv2d())
        for name in ("norm_0", "norm_1", "norm_s"):
            module = getattr(self, name, None)
            if module is not None:
                module.fuse()


def fold_module(module: nn.Module) -> None:
    """Folds every foldable BatchNorm in ``module`` (blocks with ``fold_batchnorm``), in place."""
    for sub in list(module.modules()):
        fold = getattr(sub, "fold_batchnorm", None)
        if callable(fold):
            fold()


def concat_conv_heads(*convs: nn.Conv2d):
    """(weight, bias) of one convolution computing all ``convs`` (same input, kernel and padding) at
    once, their output channels stacked in order: two heads over one feature map cost one pass."""
    weight = torch.cat([c.weight for c in convs]).contiguous()
    bias = torch.cat([c.bias for c in convs]).contiguous()
    return weight, bias
