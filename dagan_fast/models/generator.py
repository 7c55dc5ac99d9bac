"""DaGAN's generators, ``DepthAwareGenerator`` and ``SPADEDepthAwareGenerator``, with the official
attribute names. The warp, the attention and the motion run through ``dagan_fast.ops``.

Both split into ``encode_source`` (work that depends on the source only: image and depth features,
the attention queries, the downsampled source) and the driving-dependent rest, so callers animating
many frames of one source can encode it once (``forward(..., source_features=...)``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.layout import is_channels_last as _is_channels_last
from ..nn.attention import CrossModalAttention
from .blocks import DownBlock2d, ResBlock2d, SameBlock2d, SPADEResnetBlock, UpBlock2d
from .dense_motion import DenseMotionNetwork

Tensor = torch.Tensor
KP = Dict[str, Tensor]

#: The two DaGAN generators: DepthAwareGenerator ("plain") and SPADEDepthAwareGenerator ("spade").
GENERATOR_KINDS = ("plain", "spade")


def _match_batch(t: Tensor, batch: int) -> Tensor:
    """Broadcasts a batch-1 tensor to ``batch`` (dense, memory format kept, as the ops' kernels want)."""
    if t.shape[0] == batch:
        return t
    channels_last = _is_channels_last(t)
    return t.expand(batch, *t.shape[1:]).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _match_kp(kp: KP, batch: int) -> KP:
    return {k: _match_batch(v, batch) for k, v in kp.items()}


def _resize_deformation(deformation: Tensor, size) -> Tensor:
    """(B,h,w,2) -> (B,H,W,2), bilinear (align_corners=False) as the official ``deform_input``."""
    if tuple(deformation.shape[1:3]) == tuple(size):
        return deformation
    resized = F.interpolate(deformation.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def _resize_map(m: Tensor, size) -> Tensor:
    if tuple(m.shape[2:]) == tuple(size):
        return m
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)


def warp_features(features: Tensor, grid: Tensor, occlusion: Optional[Tensor] = None) -> Tensor:
    """``ops.warp_occlusion(features, grid, occlusion)`` -> (B,C,Ho,Wo) in the features' dtype. In mixed
    precision the grid stays float32 while the features are float16/bfloat16: a bfloat16 grid would place
    samples only to ~0.4% of the image (0.25 px at 64x64), so the warp then runs in the grid's dtype."""
    if grid.dtype == features.dtype:
        return ops.warp_occlusion(features, grid, occlusion)
    wide = grid.dtype
    occlusion = occlusion if occlusion is None or occlusion.dtype == wide else occlusion.to(wide)
    return ops.warp_occlusion(features.to(wide), grid, occlusion).to(features.dtype)


class _DepthAwareBase(nn.Module):
    """The shared front of both generators: image encoder (``first``, ``down_blocks``), source-depth
    encoder (``src_first``, ``src_down_blocks``), ``dense_motion_network`` and ``AttnModule``."""

    def __init__(self, num_channels: int = 3, num_kp: int = 15, block_expansion: int = 64, max_features: int = 512,
                 num_down_blocks: int = 2, estimate_occlusion_map: bool = True,
                 dense_motion_params: Optional[dict] = None, estimate_jacobian: bool = True):
        super().__init__()
        self.num_channels, self.num_kp = num_channels, num_kp
        self.estimate_jacobian = estimate_jacobian
        params = dict(block_expansion=64, max_features=1024, num_blocks=5, scale_factor=0.25, kp_variance=0.01)
        params.update(dense_motion_params or {})
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                       estimate_occlusion_map=estimate_occlusion_map, **params)
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=7, padding=3)
        self.down_blocks = nn.ModuleList(self._down(block_expansion, max_features, num_down_blocks))
        self.src_first = SameBlock2d(1, block_expansion, kernel_size=7, padding=3)
        self.src_down_blocks = nn.ModuleList(self._down(block_expansion, max_features, num_down_blocks))
        self.feature_channels = min(max_features, block_expansion * (2 ** num_down_blocks))
        self.AttnModule = CrossModalAttention(self.feature_channels, scale=1.0)

    @staticmethod
    def _down(block_expansion, max_features, num_down_blocks):
        return [DownBlock2d(min(max_features, block_expansion * (2 ** i)),
                            min(max_features, block_expansion * (2 ** (i + 1))))
                for i in range(num_down_blocks)]

    def encode_source(self, source_image: Tensor, source_depth: Tensor) -> Dict[str, Tensor]:
        """Source-only work. source_image (B,3,H,W), source_depth (B,1,H,W) -> {"image": source_image,
        "features": (B,C,H/4,W/4), "query": attention queries (B,1,N,32), "small": (B,3,h,w) for the
        dense motion}."""
        out = self.first(source_image)
        for block in self.down_blocks:
            out = block(out)
        src = self.src_first(source_depth)
        for block in self.src_down_blocks:
            src = block(src)
        return {"image": source_image, "features": out, "query": self.AttnModule.query(src),
                "small": self.dense_motion_network.downsample(source_image)}

    def forward(self, source_image: Optional[Tensor], kp_driving: KP, kp_source: KP,
                source_depth: Optional[Tensor] = None, driving_depth: Optional[Tensor] = None, *,
                source_features: Optional[Dict[str, Tensor]] = None,
                return_attention: bool = False) -> Dict[str, Tensor]:
        """The official generator output dict for source (B or 1,3,H,W) driven by the keypoint dicts.
        ``source_features``: ``encode_source(source_image, source_depth)`` computed already (batch 1 or B);
        ``driving_depth`` is unused, as in the official code."""
        if source_features is None:
            source_features = self.encode_source(source_image, source_depth)
        out = self._motion_and_attention(source_features, kp_driving, kp_source, return_attention)
        return self._decode(out)

    def _decode(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Adds "prediction" from the attention-refined ``out["features"]`` (subclasses)."""
        raise NotImplementedError

    @staticmethod
    def _per_image(decoder, *inputs: Tensor) -> Tensor:
        """``decoder(*inputs)`` on (B,...) tensors -> (B,3,H,W) prediction, contiguous. On a CPU at inference the
        decoder runs one image at a time: its convolutions are at the GEMM roofline already at batch 1
        (4096+ pixels), and a batch-1 working set (4 MiB per 256-channel 64x64 map) stays in cache where a
        batch of 4 does not (measured: the plain decoder 5-10% faster per frame at batch 4, one thread).
        The results are those of batch 1 exactly, as ``Animator.stream`` computes them."""
        batch = inputs[0].shape[0]
        if batch == 1 or inputs[0].device.type != "cpu" or torch.is_grad_enabled():
            return decoder(*inputs).contiguous()
        return torch.cat([decoder(*(t[i:i + 1] for t in inputs)) for i in range(batch)])

    def _motion_and_attention(self, source: Dict[str, Tensor], kp_driving: KP, kp_source: KP,
                              return_attention: bool) -> Dict[str, Tensor]:
        batch = kp_driving["value"].shape[0]
        kp_source = _match_kp(kp_source, batch)
        image = _match_batch(source["image"], batch)
        motion = self.dense_motion_network(image, kp_driving=kp_driving, kp_source=kp_source,
                                           source_small=_match_batch(source["small"], batch))
        out = {"mask": motion["mask"].contiguous(), "sparse_deformed": motion["sparse_deformed"],
               "deformation": motion["deformation"]}
        features = _match_batch(source["features"], batch)
        size = features.shape[2:]
        deformation = _resize_deformation(motion["deformation"], size)
        occlusion = motion.get("occlusion_map")
        if occlusion is not None:
            out["occlusion_map"] = occlusion
            occlusion = _resize_map(occlusion, size)
        warped = warp_features(features, deformation, occlusion)
        if _is_channels_last(features):
            # the warp writes NCHW; back in the features' layout, the attention reads its tokens without a
            # transposing copy (~20% of the attention at batch 4 on a CPU) and the bottleneck's first
            # residual add and BatchNorm see one layout
            warped = warped.contiguous(memory_format=torch.channels_last)
        attended = self.AttnModule(None, warped, query=source["query"], return_attention=return_attention)
        if return_attention:
            attended, out["attention"] = attended
        out["features"] = attended
        out["deformed"] = warp_features(image, _resize_deformation(motion["deformation"],
                                                                   image.shape[2:])).contiguous()
        return out


class DepthAwareGenerator(_DepthAwareBase):
    """DaGAN's generator: encoder, dense motion, warp x occlusion, depth-aware attention, ``bottleneck``
    (``r0..r{n-1}`` pre-activation ResBlock2d), ``up_blocks``, ``final`` 7x7 conv + sigmoid.

    forward(source_image (B,3,H,W), kp_driving, kp_source, source_depth (B,1,H,W), driving_depth (unused,
    as in the official code)) -> {"prediction": (B,3,H,W), "deformation": (B,h,w,2), "occlusion_map":
    (B,1,h,w), "mask": (B,K+1,h,w), "sparse_deformed": (B,K+1,3,h,w), "deformed": (B,3,H,W)} (+
    "attention" (B,N,N) with ``return_attention``). kp dicts: {"value": (B,K,2), "jacobian": (B,K,2,2)}.
    """

    def __init__(self, num_channels: int = 3, num_kp: int = 15, block_expansion: int = 64, max_features: int = 512,
                 num_down_blocks: int = 2, num_bottleneck_blocks: int = 6, estimate_occlusion_map: bool = True,
                 dense_motion_params: Optional[dict] = None, estimate_jacobian: bool = True):
        super().__init__(num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                         estimate_occlusion_map, dense_motion_params, estimate_jacobian)
        up = []
        for i in range(num_down_blocks):
            up.append(UpBlock2d(min(max_features, block_expansion * (2 ** (num_down_blocks - i))),
                                min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1)))))
        self.up_blocks = nn.ModuleList(up)
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(self.feature_channels, kernel_size=3, padding=1))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=7, padding=3)

    def _decode(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out["prediction"] = self._per_image(self._decode_features, out.pop("features"))
        return out

    def _decode_features(self, features: Tensor) -> Tensor:
        """(B,C,h,w) attention-refined features -> (B,3,H,W) prediction in (0,1)."""
        x = self.bottleneck(features)
        for block in self.up_blocks:
            x = block(x)
        return torch.sigmoid(self.final(x))


class SPADEGenerator(nn.Module):
    """DaGAN's SPADE decoder. feature (B,256,h,w), image (B,3,H,W) (the deformed source x occlusion)
    -> (B,3,4h,4w) in (0,1). segmap = cat(nearest-resize(``compress``(feature), (H,W)), image)."""

    def __init__(self, ic: int = 256, cc: int = 4, oc: int = 64, num_channels: int = 3, spectral: bool = True):
        super().__init__()
        label_nc = num_channels + cc
        self.compress = nn.Conv2d(ic, cc, 3, padding=1)
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        self.G_middle_0 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc, spectral)
        self.G_middle_1 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc, spectral)
        self.G_middle_2 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc, spectral)
        self.up_0 = SPADEResnetBlock(2 * ic, ic, label_nc, spectral)
        self.up_1 = SPADEResnetBlock(ic, oc, label_nc, spectral)
        self.conv_img = nn.Conv2d(oc, num_channels, 3, padding=1)

    def forward(self, feature: Tensor, image: Tensor) -> Tensor:
        compressed = F.interpolate(self.compress(feature), size=image.shape[2:], mode="nearest")
        seg = torch.cat([compressed, image], dim=1)
        x = self.fc(feature)
        # nearest resizing: resize the segmap once per resolution, not once per SPADE layer
        seg_small = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        x = self.G_middle_0(x, seg_small)
        x = self.G_middle_1(x, seg_small)
        x = self.G_middle_2(x, seg_small)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.up_0(x, F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.up_1(x, seg)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


class SPADEDepthAwareGenerator(_DepthAwareBase):
    """DaGAN's SPADE generator: the DepthAwareGenerator front (encoder, dense motion, warp, attention)
    and a SPADE ``decoder`` conditioned on the deformed source image x occlusion. Same call and outputs
    as ``DepthAwareGenerator``."""

    def __init__(self, num_channels: int = 3, num_kp: int = 15, block_expansion: int = 64, max_features: int = 512,
                 num_down_blocks: int = 2, num_bottleneck_blocks: int = 6, estimate_occlusion_map: bool = True,
                 dense_motion_params: Optional[dict] = None, estimate_jacobian: bool = True):
        super().__init__(num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                         estimate_occlusion_map, dense_motion_params, estimate_jacobian)
        self.decoder = SPADEGenerator(ic=self.feature_channels, num_channels=num_channels)

    def _decode(self, out: Dict[str, Tensor]) -> Dict[str, Tensor]:
        deformed = out["deformed"]
        if "occlusion_map" in out:
            deformed = deformed * _resize_map(out["occlusion_map"], deformed.shape[2:])
        out["prediction"] = self._per_image(self.decoder, out.pop("features"), deformed)
        return out
