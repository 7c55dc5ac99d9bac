"""Stand-ins for the modules people run, written from ``shared/docs/official-interfaces.md`` (test helper,
no tests here; it does not import ``dagan_fast``): FOMM's ``DenseMotionNetwork`` and
``OcclusionAwareGenerator``, and DaGAN's ``DepthAwareGenerator`` / ``SPADEDepthAwareGenerator`` with the
official class names, attributes, forward signatures and output dicts, at small sizes. The building blocks
(Hourglass, SameBlock2d, ..., DaGAN's DenseMotionNetwork and DepthAwareAttention, SPADEResnetBlock) are the
ones of ``official_dagan`` (the independent transcription of the official code); DaGAN's dense motion there
also returns its ``sparse_motion``, FOMM's here does not.

- ``fomm_generator(seed)`` / ``dagan_generator(kind, seed)``: calibrated random weights, eval mode.
- ``GeneratorFullModel``: a minimal training wrapper (as the official train scripts have).
- ``keypoints(batch, num_kp, seed)``: a random keypoint dict with well-conditioned Jacobians.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_dagan as od  # noqa: E402

SIZE = 64
FOMM_KP = 10
DAGAN_KP = 15
DENSE_MOTION_SMALL = dict(block_expansion=16, max_features=64, num_blocks=3, scale_factor=0.25)


class DenseMotionNetwork(od.DenseMotionNetwork):
    """FOMM's ``modules/dense_motion.py``: the same module; its forward returns sparse_deformed, mask,
    deformation and occlusion_map (no sparse_motion)."""

    def forward(self, source_image, kp_driving, kp_source):
        if self.scale_factor != 1:
            source_image = self.down(source_image)
        bs, _, h, w = source_image.shape
        out_dict = dict()
        heatmap_representation = self.create_heatmap_representations(source_image, kp_driving, kp_source)
        sparse_motion = self.create_sparse_motions(source_image, kp_driving, kp_source)
        deformed_source = self.create_deformed_source_image(source_image, sparse_motion)
        out_dict['sparse_deformed'] = deformed_source
        input = torch.cat([heatmap_representation, deformed_source], dim=2)
        input = input.view(bs, -1, h, w)
        prediction = self.hourglass(input)
        mask = self.mask(prediction)
        mask = F.softmax(mask, dim=1)
        out_dict['mask'] = mask
        mask = mask.unsqueeze(2)
        sparse_motion = sparse_motion.permute(0, 1, 4, 2, 3)
        deformation = (sparse_motion * mask).sum(dim=1)
        deformation = deformation.permute(0, 2, 3, 1)
        out_dict['deformation'] = deformation
        if self.occlusion:
            occlusion_map = torch.sigmoid(self.occlusion(prediction))
            out_dict['occlusion_map'] = occlusion_map
        return out_dict


def _down_blocks(block_expansion, max_features, num_down_blocks):
    return nn.ModuleList([od.DownBlock2d(min(max_features, block_expansion * (2 ** i)),
                                         min(max_features, block_expansion * (2 ** (i + 1))),
                                         kernel_size=(3, 3), padding=(1, 1)) for i in range(num_down_blocks)])


class OcclusionAwareGenerator(nn.Module):
    """FOMM's generator (``modules/generator.py``)."""

    def __init__(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                 num_bottleneck_blocks, estimate_occlusion_map=False, dense_motion_params=None,
                 estimate_jacobian=False, dense_motion_class=DenseMotionNetwork):
        super().__init__()
        if dense_motion_params is not None:
            self.dense_motion_network = dense_motion_class(num_kp=num_kp, num_channels=num_channels,
                                                           estimate_occlusion_map=estimate_occlusion_map,
                                                           **dense_motion_params)
        else:
            self.dense_motion_network = None
        self.first = od.SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        self.down_blocks = _down_blocks(block_expansion, max_features, num_down_blocks)
        up_blocks = []
        for i in range(num_down_blocks):
            in_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i)))
            out_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1)))
            up_blocks.append(od.UpBlock2d(in_features, out_features, kernel_size=(3, 3), padding=(1, 1)))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.bottleneck = torch.nn.Sequential()
        in_features = min(max_features, block_expansion * (2 ** num_down_blocks))
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module('r' + str(i), od.ResBlock2d(in_features, kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))
        self.estimate_occlusion_map = estimate_occlusion_map
        self.num_channels = num_channels

    def deform_input(self, inp, deformation):
        _, h_old, w_old, _ = deformation.shape
        _, _, h, w = inp.shape
        if h_old != h or w_old != w:
            deformation = deformation.permute(0, 3, 1, 2)
            deformation = F.interpolate(deformation, size=(h, w), mode='bilinear')
            deformation = deformation.permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation)

    def forward(self, source_image, kp_driving, kp_source):
        out = self.first(source_image)
        for i in range(len(self.down_blocks)):
            out = self.down_blocks[i](out)
        output_dict = {}
        if self.dense_motion_network is not None:
            dense_motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving,
                                                     kp_source=kp_source)
            output_dict['mask'] = dense_motion['mask']
            output_dict['sparse_deformed'] = dense_motion['sparse_deformed']
            if 'occlusion_map' in dense_motion:
                occlusion_map = dense_motion['occlusion_map']
                output_dict['occlusion_map'] = occlusion_map
            else:
                occlusion_map = None
            deformation = dense_motion['deformation']
            out = self.deform_input(out, deformation)
            if occlusion_map is not None:
                if out.shape[2] != occlusion_map.shape[2] or out.shape[3] != occlusion_map.shape[3]:
                    occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode='bilinear')
                out = out * occlusion_map
            output_dict["deformed"] = self.deform_input(source_image, deformation)
        out = self.bottleneck(out)
        for i in range(len(self.up_blocks)):
            out = self.up_blocks[i](out)
        out = self.final(out)
        out = torch.sigmoid(out)
        output_dict["prediction"] = out
        return output_dict


class _DaGANFront(nn.Module):
    def _build(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks, estimate_occlusion_map,
               dense_motion_params):
        self.dense_motion_network = od.DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                          estimate_occlusion_map=estimate_occlusion_map,
                                                          **dense_motion_params)
        self.first = od.SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        self.down_blocks = _down_blocks(block_expansion, max_features, num_down_blocks)
        self.src_first = od.SameBlock2d(1, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        self.src_down_blocks = _down_blocks(block_expansion, max_features, num_down_blocks)
        self.AttnModule = od.DepthAwareAttention(block_expansion * (2 ** num_down_blocks), nn.ReLU())
        self.estimate_occlusion_map = estimate_occlusion_map
        self.num_channels = num_channels

    def deform_input(self, inp, deformation):
        _, h_old, w_old, _ = deformation.shape
        _, _, h, w = inp.shape
        if h_old != h or w_old != w:
            deformation = deformation.permute(0, 3, 1, 2)
            deformation = F.interpolate(deformation, size=(h, w), mode='bilinear')
            deformation = deformation.permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation)


class DepthAwareGenerator(_DaGANFront):
    """DaGAN's generator: FOMM's plus the source-depth encoder and the depth-aware attention."""

    def __init__(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                 num_bottleneck_blocks, estimate_occlusion_map=False, dense_motion_params=None,
                 estimate_jacobian=False):
        super().__init__()
        self._build(num_channels, num_kp, block_expansion, max_features, num_down_blocks, estimate_occlusion_map,
                    dense_motion_params)
        up_blocks = []
        for i in range(num_down_blocks):
            in_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i)))
            out_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1)))
            up_blocks.append(od.UpBlock2d(in_features, out_features, kernel_size=(3, 3), padding=(1, 1)))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.bottleneck = torch.nn.Sequential()
        in_features = min(max_features, block_expansion * (2 ** num_down_blocks))
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module('r' + str(i), od.ResBlock2d(in_features, kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))

    def forward(self, source_image, kp_driving, kp_source, source_depth, driving_depth):
        out = self.first(source_image)
        for i in range(len(self.down_blocks)):
            out = self.down_blocks[i](out)
        src_out = self.src_first(source_depth)
        for i in range(len(self.src_down_blocks)):
            src_out = self.src_down_blocks[i](src_out)
        output_dict = {}
        dense_motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving,
                                                 kp_source=kp_source)
        output_dict['mask'] = dense_motion['mask']
        output_dict['sparse_deformed'] = dense_motion['sparse_deformed']
        if 'occlusion_map' in dense_motion:
            occlusion_map = dense_motion['occlusion_map']
            output_dict['occlusion_map'] = occlusion_map
        else:
            occlusion_map = None
        deformation = dense_motion['deformation']
        out = self.deform_input(out, deformation)
        if occlusion_map is not None:
            if out.shape[2] != occlusion_map.shape[2] or out.shape[3] != occlusion_map.shape[3]:
                occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode='bilinear')
            out = out * occlusion_map
        out, attention = self.AttnModule(src_out, out)
        output_dict["deformed"] = self.deform_input(source_image, deformation)
        output_dict["attention"] = attention
        out = self.bottleneck(out)
        for i in range(len(self.up_blocks)):
            out = self.up_blocks[i](out)
        out = self.final(out)
        out = torch.sigmoid(out)
        output_dict["prediction"] = out
        return output_dict


class SPADEGenerator(nn.Module):
    """DaGAN's SPADE decoder (official-dagan-spec.md), with ``ic`` feature channels (256 in the release)."""

    def __init__(self, ic=256, oc=64, num_channels=3):
        super().__init__()
        label_nc = num_channels + 4
        self.compress = nn.Conv2d(ic, 4, 3, padding=1)
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        self.G_middle_0 = od.SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.G_middle_1 = od.SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.G_middle_2 = od.SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.up_0 = od.SPADEResnetBlock(2 * ic, ic, label_nc)
        self.up_1 = od.SPADEResnetBlock(ic, oc, label_nc)
        self.conv_img = nn.Conv2d(oc, num_channels, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, feature, image):
        cp = self.compress(feature)
        seg = torch.cat((F.interpolate(cp, size=(image.shape[2], image.shape[3])), image), dim=1)
        x = self.fc(feature)
        x = self.G_middle_0(x, seg)
        x = self.G_middle_1(x, seg)
        x = self.G_middle_2(x, seg)
        x = self.up(x)
        x = self.up_0(x, seg)
        x = self.up(x)
        x = self.up_1(x, seg)
        x = self.conv_img(F.leaky_relu(x, 2e-1))
        return torch.sigmoid(x)


class SPADEDepthAwareGenerator(_DaGANFront):
    """DaGAN's SPADE generator: the DepthAwareGenerator front and a SPADE ``decoder``."""

    def __init__(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                 num_bottleneck_blocks, estimate_occlusion_map=False, dense_motion_params=None,
                 estimate_jacobian=False):
        super().__init__()
        self._build(num_channels, num_kp, block_expansion, max_features, num_down_blocks, estimate_occlusion_map,
                    dense_motion_params)
        self.decoder = SPADEGenerator(ic=block_expansion * (2 ** num_down_blocks), oc=block_expansion,
                                      num_channels=num_channels)

    def forward(self, source_image, kp_driving, kp_source, source_depth, driving_depth):
        out = self.first(source_image)
        for i in range(len(self.down_blocks)):
            out = self.down_blocks[i](out)
        src_out = self.src_first(source_depth)
        for i in range(len(self.src_down_blocks)):
            src_out = self.src_down_blocks[i](src_out)
        output_dict = {}
        dense_motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving,
                                                 kp_source=kp_source)
        output_dict['mask'] = dense_motion['mask']
        output_dict['sparse_deformed'] = dense_motion['sparse_deformed']
        occlusion_map = dense_motion['occlusion_map']
        output_dict['occlusion_map'] = occlusion_map
        deformation = dense_motion['deformation']
        out = self.deform_input(out, deformation)
        if out.shape[2] != occlusion_map.shape[2] or out.shape[3] != occlusion_map.shape[3]:
            occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode='bilinear')
        out = out * occlusion_map
        out, attention = self.AttnModule(src_out, out)
        deformed_image = self.deform_input(source_image, deformation)
        output_dict["deformed"] = deformed_image
        output_dict["attention"] = attention
        occlusion_map = dense_motion['occlusion_map']
        if deformed_image.shape[2] != occlusion_map.shape[2] or deformed_image.shape[3] != occlusion_map.shape[3]:
            occlusion_map = F.interpolate(occlusion_map, size=deformed_image.shape[2:], mode='bilinear')
        deformed_image = deformed_image * occlusion_map
        output_dict["prediction"] = self.decoder(out, deformed_image)
        return output_dict


class GeneratorFullModel(nn.Module):
    """The shape of the official training wrapper: generator + an L1 reconstruction loss."""

    def __init__(self, generator, depth=False):
        super().__init__()
        self.generator = generator
        self.depth = depth

    def forward(self, source, driving, kp_source, kp_driving, source_depth=None):
        if self.depth:
            generated = self.generator(source, kp_driving=kp_driving, kp_source=kp_source, source_depth=source_depth,
                                       driving_depth=source_depth)
        else:
            generated = self.generator(source, kp_driving=kp_driving, kp_source=kp_source)
        loss = (generated["prediction"] - driving).square().mean()
        return loss, generated


# ------------------------------------------------------------------------------------------ inputs, weights
def keypoints(batch, num_kp, seed, jacobian=True):
    """{"value": (B,K,2) in [-0.8,0.8], "jacobian": (B,K,2,2) = I + 0.2 N(0,1)} (requires no grad)."""
    g = torch.Generator().manual_seed(seed)
    kp = {"value": torch.rand(batch, num_kp, 2, generator=g) * 1.6 - 0.8}
    if jacobian:
        kp["jacobian"] = torch.eye(2) + 0.2 * torch.randn(batch, num_kp, 2, 2, generator=g)
    return kp


def images(batch, seed, size=SIZE, channels=3):
    """Smooth random images (B,channels,size,size) in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    img = od._smooth_random_images(batch, size, g)
    return img[:, :channels] if channels <= 3 else img


@torch.no_grad()
def _calibrate(gen, run, seed):
    """Random weights with sane activations: default-like init, random BN affine and stats from a batch,
    mask/occlusion logits with a spread, a non-uniform attention, gamma ~ 0.7."""
    g = torch.Generator().manual_seed(seed)
    gen.eval()
    od._reinit_default(gen, g)
    od._randomize_basic(gen, g)
    cal = od._Calibrator(g)
    for mod in gen.modules():
        if isinstance(mod, (od.SameBlock2d, od.DownBlock2d, od.UpBlock2d)):
            cal.center(mod.conv)
        if isinstance(mod, od.ResBlock2d):
            cal.center(mod.conv1)
        if isinstance(mod, nn.BatchNorm2d):
            cal.bn(mod)
    dm = gen.dense_motion_network
    cal.conv(dm.mask, 1.5)
    if dm.occlusion is not None:
        cal.conv(dm.occlusion, 1.5, target_mean=0.5, channel_spread=0.0)
    attn = getattr(gen, "AttnModule", None)
    if attn is not None:
        attn.gamma.fill_(0.7)
        cal.conv(attn.query_conv, 0.6)
        cal.conv(attn.key_conv, 0.6)
        cal.conv(attn.value_conv, 0.5)
    if hasattr(gen, "final"):
        cal.conv(gen.final, 1.0)
    else:
        cal.conv(gen.decoder.conv_img, 1.0)
    run(gen)
    cal.remove()
    for mod in gen.modules():
        for attr in ("_calibrated", "_centered"):
            if hasattr(mod, attr):
                delattr(mod, attr)
    return gen


def fomm_generator(seed=0, num_kp=FOMM_KP):
    """FOMM vox layout, small: 3 channels, K=10, one down block (features 32x32, motion 16x16: the warp
    resizes the deformation and the occlusion map), occlusion on, Jacobians."""
    torch.manual_seed(seed)
    gen = OcclusionAwareGenerator(3, num_kp, block_expansion=16, max_features=64, num_down_blocks=1,
                                  num_bottleneck_blocks=2, estimate_occlusion_map=True,
                                  dense_motion_params=DENSE_MOTION_SMALL, estimate_jacobian=True)
    src = images(2, seed + 1)
    return _calibrate(gen, lambda m: m(src, keypoints(2, num_kp, seed + 2), keypoints(2, num_kp, seed + 3)),
                      seed + 10)


def dagan_generator(kind="plain", seed=0, num_kp=DAGAN_KP):
    """DaGAN layout, small: K=15, two down blocks (features 64 channels at 16x16, as the motion), attention
    over 256 tokens; ``kind`` "plain" (DepthAwareGenerator) or "spade" (SPADEDepthAwareGenerator)."""
    torch.manual_seed(seed)
    cls = {"plain": DepthAwareGenerator, "spade": SPADEDepthAwareGenerator}[kind]
    gen = cls(3, num_kp, block_expansion=16, max_features=64, num_down_blocks=2, num_bottleneck_blocks=2,
              estimate_occlusion_map=True, dense_motion_params=DENSE_MOTION_SMALL, estimate_jacobian=True)
    src, depth = images(2, seed + 1), images(2, seed + 4, channels=1)
    return _calibrate(gen, lambda m: m(src, keypoints(2, num_kp, seed + 2), keypoints(2, num_kp, seed + 3), depth,
                                       depth), seed + 10)
