"""The monodepth2 depth network DaGAN uses: ``ResnetEncoder`` (a ResNet trunk under the attribute
``encoder`` with torchvision's attribute names, written here without torchvision) and ``DepthDecoder``
(a ``decoder`` ModuleList in monodepth2's order). Attribute names match ``encoder.pth`` / ``depth.pth``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import fold_conv_bn
from .registry import register_model

Tensor = torch.Tensor

# layers -> (block kind, blocks per stage)
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _check_width(width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width < 4 or width % 4:
        raise ValueError(f"depth network width must be a multiple of 4 and >= 4, got {width!r}")


def _conv_bn_fold(owner: nn.Module, conv_name: str, bn_name: str) -> None:
    bn = getattr(owner, bn_name)
    if isinstance(bn, nn.BatchNorm2d):
        setattr(owner, conv_name, fold_conv_bn(getattr(owner, conv_name), bn))
        setattr(owner, bn_name, nn.Identity())


class BasicBlock(nn.Module):
    """torchvision BasicBlock: two 3x3 convs (stride on the first) + shortcut. (B,Cin,H,W) -> (B,C,H/s,W/s)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def fold_batchnorm(self) -> None:
        _conv_bn_fold(self, "conv1", "bn1")
        _conv_bn_fold(self, "conv2", "bn2")


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: stride on the 3x3 conv): 1x1, 3x3, 1x1 (x4) + shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def fold_batchnorm(self) -> None:
        _conv_bn_fold(self, "conv1", "bn1")
        _conv_bn_fold(self, "conv2", "bn2")
        _conv_bn_fold(self, "conv3", "bn3")


class _Downsample(nn.Sequential):
    """Shortcut projection ``downsample.0`` (1x1 conv, stride) + ``downsample.1`` (BatchNorm)."""

    def fold_batchnorm(self) -> None:
        if isinstance(self[1], nn.BatchNorm2d):
            self[0] = fold_conv_bn(self[0], self[1])
            self[1] = nn.Identity()


class ResNetTrunk(nn.Module):
    """ResNet without its classifier: ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``.
    ``width``: channels of the stem (64 in torchvision's ResNets; the stages have 1x, 2x, 4x, 8x it).
    ``in_channels``: 3 for an image, 6 for the pose network's two stacked frames."""

    def __init__(self, num_layers: int = 18, width: int = 64, in_channels: int = 3):
        super().__init__()
        if num_layers not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {num_layers!r}")
        _check_width(width)
        kind, counts = RESNET_LAYOUTS[num_layers]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, counts[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, counts[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, counts[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, counts[3], 2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _Downsample(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def fold_batchnorm(self) -> None:
        _conv_bn_fold(self, "conv1", "bn1")


class ResnetEncoder(nn.Module):
    """monodepth2 ResnetEncoder: image (B,3,H,W) in [0,1] -> 5 feature maps at 1/2, 1/4, 1/8, 1/16, 1/32
    with ``num_ch_enc`` channels ([64,64,128,256,512] for ResNet-18, [64,256,512,1024,2048] for 50, at the
    default ``width`` 64; a smaller width scales them all). H and W must be divisible by 32 for the decoder's
    skips to line up."""

    def __init__(self, num_layers: int = 18, width: int = 64):
        super().__init__()
        self.num_layers = num_layers
        self.width = width
        self.encoder = ResNetTrunk(num_layers, width)
        expansion = 4 if RESNET_LAYOUTS[num_layers][0] == "bottleneck" else 1
        self.num_ch_enc = [width] + [m * width * expansion for m in (1, 2, 4, 8)]

    def forward(self, image: Tensor) -> List[Tensor]:
        e = self.encoder
        x = (image - 0.45) / 0.225
        f0 = e.relu(e.bn1(e.conv1(x)))
        f1 = e.layer1(e.maxpool(f0))
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        f4 = e.layer4(f3)
        return [f0, f1, f2, f3, f4]


class Conv3x3(nn.Module):
    """Reflection-padded 3x3 convolution (monodepth2 ``Conv3x3``, attribute ``conv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class ConvBlock(nn.Module):
    """Conv3x3 + ELU (monodepth2 ``ConvBlock``; the weights are at ``conv.conv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv3x3(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(self.conv(x), inplace=True)


class DepthDecoder(nn.Module):
    """monodepth2 DepthDecoder. ``decoder`` holds, in order, upconv (i,0), (i,1) for i = 4..0 then
    dispconv 0..3. features (5 maps from ResnetEncoder) -> {("disp", s): (B,1,H/2^s,W/2^s) in (0,1)}
    for s in ``scales`` (default: the instance's ``scales``, all four as in monodepth2; DaGAN needs 0).
    ``width``: the encoder's width; the decoder's channels (16, 32, 64, 128, 256 at 64) scale with it.
    """

    def __init__(self, num_ch_enc: Sequence[int], scales: Iterable[int] = range(4), width: int = 64):
        super().__init__()
        _check_width(width)
        self.num_ch_dec = tuple(c * width // 64 for c in (16, 32, 64, 128, 256))
        self.num_ch_enc = list(num_ch_enc)
        self.scales = tuple(scales)
        blocks = []
        self._upconv = {}
        for i in range(4, -1, -1):
            cin = self.num_ch_enc[-1] if i == 4 else self.num_ch_dec[i + 1]
            self._upconv[(i, 0)] = len(blocks)
            blocks.append(ConvBlock(cin, self.num_ch_dec[i]))
            cin = self.num_ch_dec[i] + (self.num_ch_enc[i - 1] if i > 0 else 0)
            self._upconv[(i, 1)] = len(blocks)
            blocks.append(ConvBlock(cin, self.num_ch_dec[i]))
        self._dispconv = {}
        for s in range(4):
            self._dispconv[s] = len(blocks)
            blocks.append(Conv3x3(self.num_ch_dec[s], 1))
        self.decoder = nn.ModuleList(blocks)

    def forward(self, features: Sequence[Tensor], scales: Optional[Iterable[int]] = None) -> Dict[Tuple[str, int],
                                                                                                  Tensor]:
        scales = self.scales if scales is None else tuple(scales)
        lowest = min(scales) if scales else 0
        outputs = {}
        x = features[-1]
        for i in range(4, lowest - 1, -1):
            x = self.decoder[self._upconv[(i, 0)]](x)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], dim=1)
            x = self.decoder[self._upconv[(i, 1)]](x)
            if i in scales:
                outputs[("disp", i)] = torch.sigmoid(self.decoder[self._dispconv[i]](x))
        return outputs


@register_model
class FaceDepthNetwork(nn.Module):
    """The face depth network alone (``depth_encoder`` + ``depth_decoder``, the attribute names DaGAN and
    DaGAN++ use), as ``python -m training.train_depth`` trains and saves it. ``config``:
    {"depth_layers": 18, "depth_width": 64}. forward(image (B,3,H,W) in [0,1]) -> depth (B,1,H,W), the
    scale-0 disparity as DaGAN uses it. Saved and loaded by ``dagan_fast.checkpoints`` like the models."""

    def __init__(self, config: Optional[Dict[str, int]] = None, **overrides):
        super().__init__()
        cfg = {"depth_layers": 18, "depth_width": 64}
        for source in (config or {}, overrides):
            unknown = set(source) - set(cfg)
            if unknown:
                raise ValueError(f"FaceDepthNetwork config: unknown keys {sorted(unknown)} (known: depth_layers, "
                                 "depth_width)")
            cfg.update(source)
        self.config = cfg
        self.depth_encoder = ResnetEncoder(cfg["depth_layers"], cfg["depth_width"])
        self.depth_decoder = DepthDecoder(self.depth_encoder.num_ch_enc, width=cfg["depth_width"])

    def forward(self, image: Tensor, scales: Iterable[int] = (0,)) -> Tensor:
        return self.depth_decoder(self.depth_encoder(image), scales=scales)[("disp", min(scales))]

    def disparities(self, image: Tensor, scales: Iterable[int] = range(4)) -> Dict[Tuple[str, int], Tensor]:
        """{("disp", s): (B,1,H/2^s,W/2^s)} for every s in ``scales`` (multi-scale training)."""
        return self.depth_decoder(self.depth_encoder(image), scales=scales)
