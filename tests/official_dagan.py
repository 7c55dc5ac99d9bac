"""Independent PyTorch transcription of the OFFICIAL DaGAN forward path (test oracle, no tests here).

Written only from ``shared/docs/official-dagan-spec.md`` and the key lists in ``shared/docs/official-keys``;
it deliberately does not import ``dagan_fast``. The modules are plain ``nn.Module``s with the authors'
attribute names, so their ``state_dict()`` keys are exactly the official ones, and the numerics are the
authors' ones: ``F.grid_sample`` with default arguments, ``torch.inverse`` for the Jacobians, materialised
sparse motions (B, K+1, H, W, 2), the materialised (B, N, N) attention (``torch.bmm`` + softmax),
``F.interpolate`` as the official code calls it, ``torch.nn.utils.spectral_norm`` for the SPADE block convs,
a torchvision-style ResNet and the monodepth2 depth encoder / decoder.

Public helpers:
- ``build_official_models(generator_kind, depth_layers, seed)``: all modules with random, non-trivial,
  calibrated weights (eval mode).
- ``official_forward(models, source, driving)`` / ``official_animate(models, source, driving,
  driving_initial, relative, adapt_scale)``: the official generator output dict plus depth maps and keypoints.
- ``save_official_layout(tmpdir, generator_kind, depth_layers, seed)``: writes ``ckpt.pth.tar``,
  ``encoder.pth`` and ``depth.pth`` in the released layout.
- ``check_keys_against_files(keys_dir)``: compares every module's state_dict with the official key files.
- ``face_images()`` / ``random_images()``: test inputs (B, 3, 256, 256) in [0, 1].
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Hyper-parameters (config vox-adv-256, released num_kp = 15)
# ---------------------------------------------------------------------------------------------------------
NUM_KP = 15
NUM_CHANNELS = 3
KP_PARAMS = dict(temperature=0.1, block_expansion=32, max_features=1024, scale_factor=0.25, num_blocks=5)
GEN_PARAMS = dict(block_expansion=64, max_features=512, num_down_blocks=2, num_bottleneck_blocks=6,
                  estimate_occlusion_map=True)
DENSE_MOTION_PARAMS = dict(block_expansion=64, max_features=1024, num_blocks=5, scale_factor=0.25)
KP_VARIANCE = 0.01


# ---------------------------------------------------------------------------------------------------------
# FOMM / DaGAN utilities
# ---------------------------------------------------------------------------------------------------------
def make_coordinate_grid(spatial_size, dtype=torch.float32, device=None):
    """(h, w, 2) grid of (x, y) in [-1, 1], endpoints included."""
    h, w = spatial_size
    x = torch.arange(w, dtype=dtype, device=device)
    y = torch.arange(h, dtype=dtype, device=device)
    x = 2 * (x / (w - 1)) - 1
    y = 2 * (y / (h - 1)) - 1
    yy = y.view(-1, 1).repeat(1, w)
    xx = x.view(1, -1).repeat(h, 1)
    return torch.cat([xx.unsqueeze(2), yy.unsqueeze(2)], 2)


def kp2gaussian(kp, spatial_size, kp_variance):
    mean = kp["value"]
    coordinate_grid = make_coordinate_grid(spatial_size, mean.dtype, mean.device)
    number_of_leading_dimensions = len(mean.shape) - 1
    shape = (1,) * number_of_leading_dimensions + coordinate_grid.shape
    coordinate_grid = coordinate_grid.view(*shape)
    repeats = mean.shape[:number_of_leading_dimensions] + (1, 1, 1)
    coordinate_grid = coordinate_grid.repeat(*repeats)
    shape = mean.shape[:number_of_leading_dimensions] + (1, 1, 2)
    mean = mean.view(*shape)
    mean_sub = coordinate_grid - mean
    return torch.exp(-0.5 * (mean_sub ** 2).sum(-1) / kp_variance)


class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1)/2) then keep every (1/scale)-th pixel."""

    def __init__(self, channels, scale):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        kernel_size = 2 * round(sigma * 4) + 1
        self.ka = kernel_size // 2
        self.kb = self.ka - 1 if kernel_size % 2 == 0 else self.ka
        kernel_size = [kernel_size, kernel_size]
        sigma = [sigma, sigma]
        kernel = 1
        meshgrids = torch.meshgrid([torch.arange(size, dtype=torch.float32) for size in kernel_size],
                                   indexing="ij")
        for size, std, mgrid in zip(kernel_size, sigma, meshgrids):
            mean = (size - 1) / 2
            kernel = kernel * torch.exp(-((mgrid - mean) ** 2) / (2 * std ** 2))
        kernel = kernel / torch.sum(kernel)
        kernel = kernel.view(1, 1, *kernel.size())
        kernel = kernel.repeat(channels, *[1] * (kernel.dim() - 1))
        self.register_buffer("weight", kernel)
        self.groups = channels
        self.scale = scale
        self.int_inv_scale = int(1 / scale)

    def forward(self, input):
        if self.scale == 1.0:
            return input
        out = F.pad(input, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight, groups=self.groups)
        out = out[:, :, :: self.int_inv_scale, :: self.int_inv_scale]
        return out


class ResBlock2d(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-conv + x."""

    def __init__(self, in_features, kernel_size, padding):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=kernel_size, padding=padding)
        self.norm1 = nn.BatchNorm2d(in_features, affine=True)
        self.norm2 = nn.BatchNorm2d(in_features, affine=True)

    def forward(self, x):
        out = self.norm1(x)
        out = F.relu(out)
        out = self.conv1(out)
        out = self.norm2(out)
        out = F.relu(out)
        out = self.conv2(out)
        return out + x


class UpBlock2d(nn.Module):
    def __init__(self, in_features, out_features, kernel_size=3, padding=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x):
        out = F.interpolate(x, scale_factor=2)
        out = self.conv(out)
        out = self.norm(out)
        return F.relu(out)


class DownBlock2d(nn.Module):
    def __init__(self, in_features, out_features, kernel_size=3, padding=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x):
        out = self.conv(x)
        out = self.norm(out)
        out = F.relu(out)
        return self.pool(out)


class SameBlock2d(nn.Module):
    def __init__(self, in_features, out_features, groups=1, kernel_size=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding, groups=groups)
        self.norm = nn.BatchNorm2d(out_features, affine=True)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class Encoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        down_blocks = []
        for i in range(num_blocks):
            down_blocks.append(DownBlock2d(in_features if i == 0 else min(max_features, block_expansion * (2 ** i)),
                                           min(max_features, block_expansion * (2 ** (i + 1))),
                                           kernel_size=3, padding=1))
        self.down_blocks = nn.ModuleList(down_blocks)

    def forward(self, x):
        outs = [x]
        for down_block in self.down_blocks:
            outs.append(down_block(outs[-1]))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        up_blocks = []
        for i in range(num_blocks)[::-1]:
            in_filters = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            out_filters = min(max_features, block_expansion * (2 ** i))
            up_blocks.append(UpBlock2d(in_filters, out_filters, kernel_size=3, padding=1))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.out_filters = block_expansion + in_features

    def forward(self, x):
        out = x.pop()
        for up_block in self.up_blocks:
            out = up_block(out)
            skip = x.pop()
            out = torch.cat([out, skip], dim=1)
        return out


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks=3, max_features=256):
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------------------------------------
# Keypoint detector
# ---------------------------------------------------------------------------------------------------------
class KPDetector(nn.Module):
    def __init__(self, block_expansion=32, num_kp=NUM_KP, num_channels=4, max_features=1024, num_blocks=5,
                 temperature=0.1, estimate_jacobian=True, scale_factor=0.25, single_jacobian_map=False, pad=0):
        super().__init__()
        self.predictor = Hourglass(block_expansion, in_features=num_channels, max_features=max_features,
                                   num_blocks=num_blocks)
        self.kp = nn.Conv2d(self.predictor.out_filters, num_kp, kernel_size=(7, 7), padding=pad)
        if estimate_jacobian:
            self.num_jacobian_maps = 1 if single_jacobian_map else num_kp
            self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * self.num_jacobian_maps,
                                      kernel_size=(7, 7), padding=pad)
            self.jacobian.weight.data.zero_()
            self.jacobian.bias.data.copy_(torch.tensor([1, 0, 0, 1] * self.num_jacobian_maps, dtype=torch.float))
        else:
            self.jacobian = None
        self.temperature = temperature
        self.scale_factor = scale_factor
        if self.scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, self.scale_factor)

    def gaussian2kp(self, heatmap):
        shape = heatmap.shape
        heatmap = heatmap.unsqueeze(-1)
        grid = make_coordinate_grid(shape[2:], heatmap.dtype, heatmap.device).unsqueeze(0).unsqueeze(0)
        value = (heatmap * grid).sum(dim=(2, 3))
        return {"value": value}

    def forward(self, x):
        if self.scale_factor != 1:
            x = self.down(x)
        feature_map = self.predictor(x)
        prediction = self.kp(feature_map)
        final_shape = prediction.shape
        heatmap = prediction.view(final_shape[0], final_shape[1], -1)
        heatmap = F.softmax(heatmap / self.temperature, dim=2)
        heatmap = heatmap.view(*final_shape)
        out = self.gaussian2kp(heatmap)
        out["heatmap"] = heatmap
        if self.jacobian is not None:
            jacobian_map = self.jacobian(feature_map)
            jacobian_map = jacobian_map.reshape(final_shape[0], self.num_jacobian_maps, 4, final_shape[2],
                                                final_shape[3])
            heatmap = heatmap.unsqueeze(2)
            jacobian = heatmap * jacobian_map
            jacobian = jacobian.view(final_shape[0], final_shape[1], 4, -1)
            jacobian = jacobian.sum(dim=-1)
            jacobian = jacobian.view(jacobian.shape[0], jacobian.shape[1], 2, 2)
            out["jacobian"] = jacobian
        return out


# ---------------------------------------------------------------------------------------------------------
# Dense motion
# ---------------------------------------------------------------------------------------------------------
class DenseMotionNetwork(nn.Module):
    def __init__(self, block_expansion, num_blocks, max_features, num_kp, num_channels,
                 estimate_occlusion_map=False, scale_factor=1, kp_variance=0.01):
        super().__init__()
        self.hourglass = Hourglass(block_expansion=block_expansion, in_features=(num_kp + 1) * (num_channels + 1),
                                   max_features=max_features, num_blocks=num_blocks)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, kernel_size=(7, 7), padding=(3, 3))
        if estimate_occlusion_map:
            self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, kernel_size=(7, 7), padding=(3, 3))
        else:
            self.occlusion = None
        self.num_kp = num_kp
        self.scale_factor = scale_factor
        self.kp_variance = kp_variance
        if self.scale_factor != 1:
            self.down = AntiAliasInterpolation2d(num_channels, self.scale_factor)

    def create_heatmap_representations(self, source_image, kp_driving, kp_source):
        spatial_size = source_image.shape[2:]
        gaussian_driving = kp2gaussian(kp_driving, spatial_size=spatial_size, kp_variance=self.kp_variance)
        gaussian_source = kp2gaussian(kp_source, spatial_size=spatial_size, kp_variance=self.kp_variance)
        heatmap = gaussian_driving - gaussian_source
        zeros = torch.zeros(heatmap.shape[0], 1, spatial_size[0], spatial_size[1], dtype=heatmap.dtype,
                            device=heatmap.device)
        heatmap = torch.cat([zeros, heatmap], dim=1)
        return heatmap.unsqueeze(2)

    def create_sparse_motions(self, source_image, kp_driving, kp_source):
        bs, _, h, w = source_image.shape
        identity_grid = make_coordinate_grid((h, w), kp_source["value"].dtype, kp_source["value"].device)
        identity_grid = identity_grid.view(1, 1, h, w, 2)
        coordinate_grid = identity_grid - kp_driving["value"].view(bs, self.num_kp, 1, 1, 2)
        if "jacobian" in kp_driving:
            jacobian = torch.matmul(kp_source["jacobian"], torch.inverse(kp_driving["jacobian"]))
            jacobian = jacobian.unsqueeze(-3).unsqueeze(-3)
            jacobian = jacobian.repeat(1, 1, h, w, 1, 1)
            coordinate_grid = torch.matmul(jacobian, coordinate_grid.unsqueeze(-1))
            coordinate_grid = coordinate_grid.squeeze(-1)
        driving_to_source = coordinate_grid + kp_source["value"].view(bs, self.num_kp, 1, 1, 2)
        identity_grid = identity_grid.repeat(bs, 1, 1, 1, 1)
        return torch.cat([identity_grid, driving_to_source], dim=1)

    def create_deformed_source_image(self, source_image, sparse_motions):
        bs, _, h, w = source_image.shape
        source_repeat = source_image.unsqueeze(1).unsqueeze(1).repeat(1, self.num_kp + 1, 1, 1, 1, 1)
        source_repeat = source_repeat.view(bs * (self.num_kp + 1), -1, h, w)
        sparse_motions = sparse_motions.view((bs * (self.num_kp + 1), h, w, -1))
        sparse_deformed = F.grid_sample(source_repeat, sparse_motions)
        return sparse_deformed.view((bs, self.num_kp + 1, -1, h, w))

    def forward(self, source_image, kp_driving, kp_source):
        if self.scale_factor != 1:
            source_image = self.down(source_image)
        bs, _, h, w = source_image.shape
        out_dict = dict()
        heatmap_representation = self.create_heatmap_representations(source_image, kp_driving, kp_source)
        sparse_motion = self.create_sparse_motions(source_image, kp_driving, kp_source)
        deformed_source = self.create_deformed_source_image(source_image, sparse_motion)
        out_dict["sparse_deformed"] = deformed_source
        out_dict["sparse_motion"] = sparse_motion
        inp = torch.cat([heatmap_representation, deformed_source], dim=2)
        inp = inp.view(bs, -1, h, w)
        prediction = self.hourglass(inp)
        mask = self.mask(prediction)
        mask = F.softmax(mask, dim=1)
        out_dict["mask"] = mask
        mask = mask.unsqueeze(2)
        sparse_motion = sparse_motion.permute(0, 1, 4, 2, 3)
        deformation = (sparse_motion * mask).sum(dim=1)
        deformation = deformation.permute(0, 2, 3, 1)
        out_dict["deformation"] = deformation
        if self.occlusion is not None:
            out_dict["occlusion_map"] = torch.sigmoid(self.occlusion(prediction))
        return out_dict


# ---------------------------------------------------------------------------------------------------------
# Depth-aware attention and generators
# ---------------------------------------------------------------------------------------------------------
class DepthAwareAttention(nn.Module):
    """Q from the source-depth features, K and V from the warped features, no 1/sqrt(d) scaling."""

    def __init__(self, in_dim, activation=None):
        super().__init__()
        self.chanel_in = in_dim
        self.activation = activation if activation is not None else nn.ReLU()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, source, feat):
        m_batchsize, C, width, height = source.size()
        proj_query = self.activation(self.query_conv(source)).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.activation(self.key_conv(feat)).view(m_batchsize, -1, width * height)
        energy = torch.bmm(proj_query, proj_key)  # (B, N, N)
        attention = self.softmax(energy)
        proj_value = self.activation(self.value_conv(feat)).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        out = out.view(m_batchsize, C, width, height)
        out = self.gamma * out + feat
        return out, attention


class _DepthAwareEncoderMixin:
    """The parts shared by both official generators (same attribute names)."""

    def _build_common(self, num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                      estimate_occlusion_map, dense_motion_params):
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                       estimate_occlusion_map=estimate_occlusion_map,
                                                       kp_variance=KP_VARIANCE, **dense_motion_params)
        self.first = SameBlock2d(num_channels, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        down_blocks = []
        for i in range(num_down_blocks):
            in_features = min(max_features, block_expansion * (2 ** i))
            out_features = min(max_features, block_expansion * (2 ** (i + 1)))
            down_blocks.append(DownBlock2d(in_features, out_features, kernel_size=(3, 3), padding=(1, 1)))
        self.down_blocks = nn.ModuleList(down_blocks)
        self.src_first = SameBlock2d(1, block_expansion, kernel_size=(7, 7), padding=(3, 3))
        src_down_blocks = []
        for i in range(num_down_blocks):
            in_features = min(max_features, block_expansion * (2 ** i))
            out_features = min(max_features, block_expansion * (2 ** (i + 1)))
            src_down_blocks.append(DownBlock2d(in_features, out_features, kernel_size=(3, 3), padding=(1, 1)))
        self.src_down_blocks = nn.ModuleList(src_down_blocks)
        self.AttnModule = DepthAwareAttention(block_expansion * (2 ** num_down_blocks), nn.ReLU())

    @staticmethod
    def deform_input(inp, deformation):
        _, h_old, w_old, _ = deformation.shape
        _, _, h, w = inp.shape
        if h_old != h or w_old != w:
            deformation = deformation.permute(0, 3, 1, 2)
            deformation = F.interpolate(deformation, size=(h, w), mode="bilinear")
            deformation = deformation.permute(0, 2, 3, 1)
        return F.grid_sample(inp, deformation)

    def _encode_and_warp(self, source_image, kp_driving, kp_source, source_depth, dense_motion_override=None):
        out = self.first(source_image)
        for i in range(len(self.down_blocks)):
            out = self.down_blocks[i](out)
        src_out = self.src_first(source_depth)
        for i in range(len(self.src_down_blocks)):
            src_out = self.src_down_blocks[i](src_out)

        output_dict = {}
        dense_motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving,
                                                 kp_source=kp_source)
        if dense_motion_override is not None:
            # test hook: continue from given dense-motion outputs (e.g. another implementation's), to
            # check the stages after the warp without the float32 rounding of the motion field
            dense_motion = dict(dense_motion, **dense_motion_override)
        output_dict["mask"] = dense_motion["mask"]
        output_dict["sparse_deformed"] = dense_motion["sparse_deformed"]
        output_dict["sparse_motion"] = dense_motion["sparse_motion"]
        output_dict["deformation"] = dense_motion["deformation"]
        occlusion_map = dense_motion["occlusion_map"]
        output_dict["occlusion_map"] = occlusion_map
        deformation = dense_motion["deformation"]
        out = self.deform_input(out, deformation)
        if out.shape[2] != occlusion_map.shape[2] or out.shape[3] != occlusion_map.shape[3]:
            occlusion_map = F.interpolate(occlusion_map, size=out.shape[2:], mode="bilinear")
        out = out * occlusion_map
        output_dict["warped_features"] = out
        output_dict["source_depth_features"] = src_out
        out, attention = self.AttnModule(src_out, out)
        output_dict["attention"] = attention
        output_dict["attended_features"] = out
        output_dict["deformed"] = self.deform_input(source_image, deformation)
        return out, output_dict


class DepthAwareGenerator(nn.Module, _DepthAwareEncoderMixin):
    def __init__(self, num_channels=NUM_CHANNELS, num_kp=NUM_KP, block_expansion=64, max_features=512,
                 num_down_blocks=2, num_bottleneck_blocks=6, estimate_occlusion_map=True,
                 dense_motion_params=None, estimate_jacobian=True):
        super().__init__()
        dense_motion_params = dict(DENSE_MOTION_PARAMS if dense_motion_params is None else dense_motion_params)
        self._build_common(num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                           estimate_occlusion_map, dense_motion_params)
        up_blocks = []
        for i in range(num_down_blocks):
            in_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i)))
            out_features = min(max_features, block_expansion * (2 ** (num_down_blocks - i - 1)))
            up_blocks.append(UpBlock2d(in_features, out_features, kernel_size=(3, 3), padding=(1, 1)))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.bottleneck = torch.nn.Sequential()
        in_features = min(max_features, block_expansion * (2 ** num_down_blocks))
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module("r" + str(i), ResBlock2d(in_features, kernel_size=(3, 3), padding=(1, 1)))
        self.final = nn.Conv2d(block_expansion, num_channels, kernel_size=(7, 7), padding=(3, 3))
        self.estimate_occlusion_map = estimate_occlusion_map
        self.num_channels = num_channels

    def forward(self, source_image, kp_driving, kp_source, source_depth, driving_depth=None,
                dense_motion_override=None):
        out, output_dict = self._encode_and_warp(source_image, kp_driving, kp_source, source_depth,
                                                 dense_motion_override)
        out = self.bottleneck(out)
        for i in range(len(self.up_blocks)):
            out = self.up_blocks[i](out)
        out = self.final(out)
        out = torch.sigmoid(out)
        output_dict["prediction"] = out
        return output_dict


class SPADE(nn.Module):
    def __init__(self, norm_nc, label_nc):
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        nhidden = 128
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, kernel_size=3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x, segmap):
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        gamma = self.mlp_gamma(actv)
        beta = self.mlp_beta(actv)
        return normalized * (1 + gamma) + beta


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin, fout, label_nc=7, dilation=1):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, kernel_size=3, padding=dilation, dilation=dilation)
        self.conv_1 = nn.Conv2d(fmiddle, fout, kernel_size=3, padding=dilation, dilation=dilation)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False)
        self.conv_0 = torch.nn.utils.spectral_norm(self.conv_0)
        self.conv_1 = torch.nn.utils.spectral_norm(self.conv_1)
        if self.learned_shortcut:
            self.conv_s = torch.nn.utils.spectral_norm(self.conv_s)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmiddle, label_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc)

    def forward(self, x, seg1):
        x_s = self.shortcut(x, seg1)
        dx = self.conv_0(self.actvn(self.norm_0(x, seg1)))
        dx = self.conv_1(self.actvn(self.norm_1(dx, seg1)))
        return x_s + dx

    def shortcut(self, x, seg1):
        if self.learned_shortcut:
            return self.conv_s(self.norm_s(x, seg1))
        return x

    @staticmethod
    def actvn(x):
        return F.leaky_relu(x, 2e-1)


class SPADEGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        ic = 256
        oc = 64
        label_nc = 3 + 4
        self.compress = nn.Conv2d(ic, 4, 3, padding=1)
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        self.G_middle_0 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.G_middle_1 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.G_middle_2 = SPADEResnetBlock(2 * ic, 2 * ic, label_nc)
        self.up_0 = SPADEResnetBlock(2 * ic, ic, label_nc)
        self.up_1 = SPADEResnetBlock(ic, oc, label_nc)
        self.conv_img = nn.Conv2d(oc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, feature, image):
        cp = self.compress(feature)
        seg = torch.cat((F.interpolate(cp, size=(image.shape[2], image.shape[3])), image), dim=1)
        x = feature
        x = self.fc(x)
        x = self.G_middle_0(x, seg)
        x = self.G_middle_1(x, seg)
        x = self.G_middle_2(x, seg)
        x = self.up(x)
        x = self.up_0(x, seg)
        x = self.up(x)
        x = self.up_1(x, seg)
        x = self.conv_img(F.leaky_relu(x, 2e-1))
        return torch.sigmoid(x)


class SPADEDepthAwareGenerator(nn.Module, _DepthAwareEncoderMixin):
    def __init__(self, num_channels=NUM_CHANNELS, num_kp=NUM_KP, block_expansion=64, max_features=512,
                 num_down_blocks=2, num_bottleneck_blocks=6, estimate_occlusion_map=True,
                 dense_motion_params=None, estimate_jacobian=True):
        super().__init__()
        dense_motion_params = dict(DENSE_MOTION_PARAMS if dense_motion_params is None else dense_motion_params)
        self._build_common(num_channels, num_kp, block_expansion, max_features, num_down_blocks,
                           estimate_occlusion_map, dense_motion_params)
        self.decoder = SPADEGenerator()
        self.estimate_occlusion_map = estimate_occlusion_map
        self.num_channels = num_channels

    def forward(self, source_image, kp_driving, kp_source, source_depth, driving_depth=None,
                dense_motion_override=None):
        out, output_dict = self._encode_and_warp(source_image, kp_driving, kp_source, source_depth,
                                                 dense_motion_override)
        deformed_image = output_dict["deformed"]
        occlusion_map = output_dict["occlusion_map"]
        if deformed_image.shape[2] != occlusion_map.shape[2] or deformed_image.shape[3] != occlusion_map.shape[3]:
            occlusion_map = F.interpolate(occlusion_map, size=deformed_image.shape[2:], mode="bilinear")
        deformed_image = deformed_image * occlusion_map
        output_dict["prediction"] = self.decoder(out, deformed_image)
        return output_dict


# ---------------------------------------------------------------------------------------------------------
# Discriminator (keys only: written into the checkpoint like the released files)
# ---------------------------------------------------------------------------------------------------------
class _DiscDownBlock2d(nn.Module):
    def __init__(self, in_features, out_features, norm=False, kernel_size=4):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size)
        self.norm = nn.InstanceNorm2d(out_features, affine=True) if norm else None


class _Discriminator(nn.Module):
    def __init__(self, num_channels=3, block_expansion=32, num_blocks=4, max_features=512, num_kp=NUM_KP):
        super().__init__()
        down_blocks = []
        for i in range(num_blocks):
            down_blocks.append(_DiscDownBlock2d(
                num_channels + num_kp if i == 0 else min(max_features, block_expansion * (2 ** i)),
                min(max_features, block_expansion * (2 ** (i + 1))), norm=(i != 0)))
        self.down_blocks = nn.ModuleList(down_blocks)
        self.conv = nn.Conv2d(self.down_blocks[-1].conv.out_channels, 1, kernel_size=1)


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, scales=(1,)):
        super().__init__()
        self.discs = nn.ModuleDict({str(s).replace(".", "-"): _Discriminator() for s in scales})


# ---------------------------------------------------------------------------------------------------------
# Depth network: torchvision-style ResNet + monodepth2 ResnetEncoder / DepthDecoder
# ---------------------------------------------------------------------------------------------------------
def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision (v1.5) bottleneck: the stride is on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)


class ResnetEncoder(nn.Module):
    """monodepth2 ResnetEncoder: features 64@H/2, 64(256)@H/4, 128(512)@H/8, 256(1024)@H/16, 512(2048)@H/32."""

    def __init__(self, num_layers=18):
        super().__init__()
        self.num_ch_enc = np.array([64, 64, 128, 256, 512])
        if num_layers == 18:
            self.encoder = ResNet(BasicBlock, [2, 2, 2, 2])
        elif num_layers == 50:
            self.encoder = ResNet(Bottleneck, [3, 4, 6, 3])
        else:
            raise ValueError(f"{num_layers} is not a valid number of resnet layers")
        if num_layers > 34:
            self.num_ch_enc[1:] *= 4

    def forward(self, input_image):
        features = []
        x = (input_image - 0.45) / 0.225
        x = self.encoder.conv1(x)
        x = self.encoder.bn1(x)
        features.append(self.encoder.relu(x))
        features.append(self.encoder.layer1(self.encoder.maxpool(features[-1])))
        features.append(self.encoder.layer2(features[-1]))
        features.append(self.encoder.layer3(features[-1]))
        features.append(self.encoder.layer4(features[-1]))
        return features


class Conv3x3(nn.Module):
    def __init__(self, in_channels, out_channels, use_refl=True):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1) if use_refl else nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(int(in_channels), int(out_channels), 3)

    def forward(self, x):
        return self.conv(self.pad(x))


class ConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = Conv3x3(in_channels, out_channels)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x):
        return self.nonlin(self.conv(x))


def upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class DepthDecoder(nn.Module):
    def __init__(self, num_ch_enc, scales=range(4), num_output_channels=1, use_skips=True):
        super().__init__()
        self.num_output_channels = num_output_channels
        self.use_skips = use_skips
        self.scales = scales
        self.num_ch_enc = num_ch_enc
        self.num_ch_dec = np.array([16, 32, 64, 128, 256])
        self.convs = OrderedDict()
        for i in range(4, -1, -1):
            num_ch_in = self.num_ch_enc[-1] if i == 4 else self.num_ch_dec[i + 1]
            num_ch_out = self.num_ch_dec[i]
            self.convs[("upconv", i, 0)] = ConvBlock(num_ch_in, num_ch_out)
            num_ch_in = self.num_ch_dec[i]
            if self.use_skips and i > 0:
                num_ch_in += self.num_ch_enc[i - 1]
            num_ch_out = self.num_ch_dec[i]
            self.convs[("upconv", i, 1)] = ConvBlock(num_ch_in, num_ch_out)
        for s in self.scales:
            self.convs[("dispconv", s)] = Conv3x3(self.num_ch_dec[s], self.num_output_channels)
        self.decoder = nn.ModuleList(list(self.convs.values()))
        self.sigmoid = nn.Sigmoid()

    def forward(self, input_features):
        outputs = {}
        x = input_features[-1]
        for i in range(4, -1, -1):
            x = self.convs[("upconv", i, 0)](x)
            x = [upsample(x)]
            if self.use_skips and i > 0:
                x += [input_features[i - 1]]
            x = torch.cat(x, 1)
            x = self.convs[("upconv", i, 1)](x)
            if i in self.scales:
                outputs[("disp", i)] = self.sigmoid(self.convs[("dispconv", i)](x))
        return outputs


# ---------------------------------------------------------------------------------------------------------
# Official inference path
# ---------------------------------------------------------------------------------------------------------
def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (scipy's ConvexHull(...).volume when available)."""
    try:
        from scipy.spatial import ConvexHull
        return float(ConvexHull(points).volume)
    except ImportError:  # pragma: no cover - monotone chain fallback
        pts = sorted(map(tuple, points.astype(np.float64)))

        def cross(o, a, b):
            return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

        lower, upper = [], []
        for p in pts:
            while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
                lower.pop()
            lower.append(p)
        for p in reversed(pts):
            while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
                upper.pop()
            upper.append(p)
        hull = lower[:-1] + upper[:-1]
        return 0.5 * abs(sum(hull[i][0] * hull[(i + 1) % len(hull)][1] - hull[(i + 1) % len(hull)][0] * hull[i][1]
                             for i in range(len(hull))))


def normalize_kp(kp_source, kp_driving, kp_driving_initial, adapt_movement_scale=False,
                 use_relative_movement=False, use_relative_jacobian=False):
    """Official normalize_kp. The authors compute the hull of batch element 0 only (they animate with
    B = 1); here each batch element uses its own hulls, which is the same for B = 1."""
    bs = kp_source["value"].shape[0]
    if adapt_movement_scale:
        scales = []
        for b in range(bs):
            source_area = _convex_hull_area(kp_source["value"][b].detach().cpu().numpy())
            driving_area = _convex_hull_area(kp_driving_initial["value"][b].detach().cpu().numpy())
            scales.append(np.sqrt(source_area) / np.sqrt(driving_area))
        scale = torch.tensor(scales, dtype=kp_source["value"].dtype).view(bs, 1, 1)
    else:
        scale = 1

    kp_new = {k: v for k, v in kp_driving.items()}
    if use_relative_movement:
        kp_value_diff = kp_driving["value"] - kp_driving_initial["value"]
        kp_value_diff = kp_value_diff * scale
        kp_new["value"] = kp_value_diff + kp_source["value"]
        if use_relative_jacobian:
            jacobian_diff = torch.matmul(kp_driving["jacobian"], torch.inverse(kp_driving_initial["jacobian"]))
            kp_new["jacobian"] = torch.matmul(jacobian_diff, kp_source["jacobian"])
    kp_new["scale"] = scale
    return kp_new


def official_depth(models, image):
    """("disp", 0) of the depth decoder: (B, 1, H, W) in (0, 1), used directly as depth."""
    return models["depth_decoder"](models["depth_encoder"](image))[("disp", 0)]


def official_kp(models, image, depth):
    return models["kp_detector"](torch.cat((image, depth), 1))


def _kp_only(kp):
    return {"value": kp["value"], "jacobian": kp["jacobian"]}


@torch.no_grad()
def official_forward(models, source, driving, dense_motion_override=None):
    """Absolute motion: generator(source, kp_source, kp_driving). Returns the generator dict + depth + kps.

    ``dense_motion_override``: optional dict (``deformation``, ``occlusion_map``, ...) replacing the dense
    motion network's outputs (a test hook; the official path is ``None``)."""
    depth_source = official_depth(models, source)
    depth_driving = official_depth(models, driving)
    kp_source = official_kp(models, source, depth_source)
    kp_driving = official_kp(models, driving, depth_driving)
    out = models["generator"](source, kp_driving=_kp_only(kp_driving), kp_source=_kp_only(kp_source),
                              source_depth=depth_source, driving_depth=depth_driving,
                              dense_motion_override=dense_motion_override)
    out.update(kp_source=kp_source, kp_driving=kp_driving, depth_source=depth_source, depth_driving=depth_driving)
    return out


@torch.no_grad()
def official_animate(models, source, driving, driving_initial, relative=True, adapt_scale=False,
                     dense_motion_override=None):
    """The authors' make_animation step: relative keypoints and Jacobians (normalize_kp)."""
    depth_source = official_depth(models, source)
    depth_driving = official_depth(models, driving)
    depth_initial = official_depth(models, driving_initial)
    kp_source = official_kp(models, source, depth_source)
    kp_driving = official_kp(models, driving, depth_driving)
    kp_driving_initial = official_kp(models, driving_initial, depth_initial)
    kp_norm = normalize_kp(kp_source=_kp_only(kp_source), kp_driving=_kp_only(kp_driving),
                           kp_driving_initial=_kp_only(kp_driving_initial), use_relative_movement=relative,
                           use_relative_jacobian=relative, adapt_movement_scale=adapt_scale)
    out = models["generator"](source, kp_driving=_kp_only(kp_norm), kp_source=_kp_only(kp_source),
                              source_depth=depth_source, driving_depth=depth_driving,
                              dense_motion_override=dense_motion_override)
    out.update(kp_source=kp_source, kp_driving=kp_driving, kp_driving_initial=kp_driving_initial, kp_norm=kp_norm,
               depth_source=depth_source, depth_driving=depth_driving, depth_driving_initial=depth_initial)
    return out


# ---------------------------------------------------------------------------------------------------------
# Random, non-trivial, calibrated weights
# ---------------------------------------------------------------------------------------------------------
def _smooth_random_images(n, size, generator):
    """Smooth random colour images in [0, 1] (a few octaves of bilinearly upsampled noise)."""
    img = torch.zeros(n, 3, size, size)
    for res, amp in ((4, 0.5), (16, 0.3), (64, 0.15), (size, 0.05)):
        noise = torch.randn(n, 3, res, res, generator=generator)
        img += amp * F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return torch.sigmoid(1.5 * img)


class _Calibrator:
    """Forward hooks that set data-dependent, randomly perturbed statistics on the first call:
    - BatchNorm2d: running_mean = batch mean + N(0, 0.1) * batch std, running_var = batch var * U(0.5, 1.5)
      (affine weight and bias are already random), so eval-mode activations stay O(1) at any depth.
    - selected Conv2d: rescale weight and shift bias so the output has a target std and random channel means.
    """

    def __init__(self, generator):
        self.g = generator
        self.handles = []

    def _rand(self, *shape):
        return torch.rand(*shape, generator=self.g)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def bn(self, module):
        def hook(mod, inputs, output):
            if getattr(mod, "_calibrated", False):
                return None
            mod._calibrated = True
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3)).clamp_min(1e-4)
            c = mean.numel()
            mod.running_mean.copy_(mean + 0.1 * self._randn(c) * var.sqrt())
            mod.running_var.copy_(var * (0.5 + self._rand(c)))
            return F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

        self.handles.append(module.register_forward_hook(hook))

    def center(self, module):
        """Shift the conv bias so that the output has zero mean per channel on the calibration batch."""

        def hook(mod, inputs, output):
            if getattr(mod, "_centered", False):
                return None
            mod._centered = True
            m = output.mean(dim=(0, 2, 3))
            mod.bias.sub_(m)
            return output - m.view(1, -1, 1, 1)

        self.handles.append(module.register_forward_hook(hook))

    def conv(self, module, target_std, target_mean=0.0, channel_spread=0.3, channel_means=None):
        """Output rescaled to a global std of ``target_std`` around per-channel means ``channel_means``
        (default: target_mean + channel_spread * target_std * N(0, 1))."""

        def hook(mod, inputs, output):
            if getattr(mod, "_calibrated", False):
                return None
            mod._calibrated = True
            c = output.shape[1]
            m = output.mean(dim=(0, 2, 3))
            s = (output - m.view(1, -1, 1, 1)).std().clamp_min(1e-8)
            k = target_std / float(s)
            if channel_means is not None:
                t = channel_means
            else:
                t = target_mean + channel_spread * target_std * self._randn(c)
            # new output = k * (W x + b - m) + t  ->  W' = k W, b' = k (b - m) + t
            mod.weight.mul_(k)
            mod.bias.copy_(k * (mod.bias - m) + t)
            return k * (output - m.view(1, -1, 1, 1)) + t.view(1, -1, 1, 1)

        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _randomize_basic(module, g):
    """Random BN affine parameters, counters and SPADE spectral-norm vectors."""
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.copy_(0.5 + torch.rand(c, generator=g))
            mod.bias.copy_(0.1 * torch.randn(c, generator=g))
            mod.num_batches_tracked.fill_(int(torch.randint(1000, 100000, (1,), generator=g)))
        if isinstance(mod, nn.InstanceNorm2d) and mod.affine:
            mod.weight.copy_(0.5 + torch.rand(mod.num_features, generator=g))
            mod.bias.copy_(0.1 * torch.randn(mod.num_features, generator=g))
        if hasattr(mod, "weight_orig") and hasattr(mod, "weight_u"):
            w = mod.weight_orig.reshape(mod.weight_orig.shape[0], -1)
            u = F.normalize(torch.randn(w.shape[0], generator=g), dim=0)
            v = F.normalize(torch.randn(w.shape[1], generator=g), dim=0)
            for _ in range(3):  # a few power iterations: a realistic (unconverged) stored u, v
                v = F.normalize(w.t() @ u, dim=0)
                u = F.normalize(w @ v, dim=0)
            u = F.normalize(u + 0.05 * torch.randn(u.shape, generator=g) / math.sqrt(u.numel()), dim=0)
            v = F.normalize(v + 0.05 * torch.randn(v.shape, generator=g) / math.sqrt(v.numel()), dim=0)
            mod.weight_u.copy_(u)
            mod.weight_v.copy_(v)


def _reinit_default(module, g):
    """Deterministic (seeded by g) default-like init of every conv / linear."""
    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight_orig if hasattr(mod, "weight_orig") else mod.weight
            fan_in = w[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound * math.sqrt(3.0))  # kaiming-ish
            if mod.bias is not None:
                mod.bias.copy_((torch.rand(mod.bias.shape, generator=g) * 2 - 1) * bound)


def new_official_modules(generator_kind="plain", depth_layers=18):
    gen_cls = {"plain": DepthAwareGenerator, "spade": SPADEDepthAwareGenerator}[generator_kind]
    depth_encoder = ResnetEncoder(depth_layers)
    return {
        "generator": gen_cls(),
        "kp_detector": KPDetector(),
        "depth_encoder": depth_encoder,
        "depth_decoder": DepthDecoder(depth_encoder.num_ch_enc, scales=range(4)),
        "discriminator": MultiScaleDiscriminator(),
    }


# Output std targets of the calibrated heads (pre-activation): keypoint logits (softmax at temperature 0.1),
# Jacobian maps (around the perturbed [1, 0, 0, 1] bias), dense-motion mask logits and occlusion logits,
# attention query / key / value projections, and the final (sigmoid) convolution.
CALIBRATION = dict(kp=0.2, jacobian=0.05, mask=1.5, occlusion=1.5, query_key=0.6, value=0.5, final=1.0)


@torch.no_grad()
def build_official_models(generator_kind="plain", depth_layers=18, seed=0, calib_size=256):
    """All official modules with random, non-trivial weights, calibrated so activations stay sane.

    Returns a dict with ``generator``, ``kp_detector``, ``depth_encoder``, ``depth_decoder`` (eval mode) and
    ``discriminator`` (random weights, only written to the checkpoint).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    models = new_official_modules(generator_kind, depth_layers)
    for m in models.values():
        m.eval()
        _reinit_default(m, g)
        _randomize_basic(m, g)

    gen, kpd, enc, dec = models["generator"], models["kp_detector"], models["depth_encoder"], models["depth_decoder"]
    gen.AttnModule.gamma.fill_(0.5 + float(torch.rand(1, generator=g)))
    kpd.jacobian.weight.copy_(torch.randn(kpd.jacobian.weight.shape, generator=g) * 1e-3)
    kpd.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0] * NUM_KP) + 0.05 * torch.randn(4 * NUM_KP, generator=g))
    # the official AntiAlias buffers are the Gaussian kernels (kept as the released files hold them)

    cal = _Calibrator(g)
    for m in (enc, kpd, gen):
        for mod in m.modules():
            # conv -> BN pairs: centre the conv output with its bias first (a large mean that BN subtracts
            # again would only amplify float32 rounding, making the random network needlessly ill-conditioned)
            if isinstance(mod, (SameBlock2d, DownBlock2d, UpBlock2d)):
                cal.center(mod.conv)
            if isinstance(mod, ResBlock2d):
                cal.center(mod.conv1)
            if isinstance(mod, nn.BatchNorm2d):
                cal.bn(mod)
    for block in dec.decoder:
        conv = block.conv.conv if isinstance(block, ConvBlock) else block.conv
        cal.conv(conv, 1.0 if isinstance(block, ConvBlock) else 1.2)
    cal.conv(kpd.kp, CALIBRATION['kp'])
    jac_bias = kpd.jacobian.bias.clone()
    cal.conv(kpd.jacobian, CALIBRATION['jacobian'], channel_means=jac_bias)
    dm = gen.dense_motion_network
    cal.conv(dm.mask, CALIBRATION['mask'])
    cal.conv(dm.occlusion, CALIBRATION['occlusion'], target_mean=0.5, channel_spread=0.0)
    cal.conv(gen.AttnModule.query_conv, CALIBRATION['query_key'])
    cal.conv(gen.AttnModule.key_conv, CALIBRATION['query_key'])
    cal.conv(gen.AttnModule.value_conv, CALIBRATION['value'])
    if generator_kind == "plain":
        for blk in gen.bottleneck:
            cal.conv(blk.conv2, 0.5)
        cal.conv(gen.final, CALIBRATION['final'])
    else:
        sp = gen.decoder
        cal.conv(sp.compress, 1.0)
        cal.conv(sp.fc, 1.0)
        for mod in sp.modules():
            if isinstance(mod, SPADE):
                cal.conv(mod.mlp_shared[0], 1.0)
                cal.conv(mod.mlp_gamma, 0.3)
                cal.conv(mod.mlp_beta, 0.3)
        cal.conv(sp.conv_img, CALIBRATION['final'])

    # calibration inputs: sources [real face, uniform noise], drivings [real face, smooth random image]
    smooth = _smooth_random_images(1, calib_size, g)
    noise = torch.rand(1, 3, calib_size, calib_size, generator=g)
    images = torch.cat([astronaut_face(calib_size), noise, lfw_faces([100], calib_size), smooth], 0)
    n = 2
    depth = official_depth(models, images)
    kp = official_kp(models, images, depth)
    kp_source = {k: v[:n] for k, v in kp.items() if k in ("value", "jacobian")}
    kp_driving = {k: v[n:] for k, v in kp.items() if k in ("value", "jacobian")}
    if generator_kind == "plain":
        gen(images[:n], kp_driving=kp_driving, kp_source=kp_source, source_depth=depth[:n])
    else:
        out, d = gen._encode_and_warp(images[:n], kp_driving, kp_source, depth[:n])
        occlusion = F.interpolate(d["occlusion_map"], size=d["deformed"].shape[2:], mode="bilinear")
        # the SPADE decoder is expensive (~600 GFLOP per 256x256 image): its convolutions are calibrated at
        # half resolution (per-pixel statistics barely depend on it)
        gen.decoder(out[:, :, ::2, ::2], F.avg_pool2d(d["deformed"] * occlusion, 2))
    cal.remove()
    for m in models.values():
        for mod in m.modules():
            for attr in ("_calibrated", "_centered"):
                if hasattr(mod, attr):
                    delattr(mod, attr)
        m.eval()
    return models


# ---------------------------------------------------------------------------------------------------------
# Official file layout
# ---------------------------------------------------------------------------------------------------------
def save_official_layout(tmpdir, generator_kind="plain", depth_layers=18, seed=0, models=None):
    """Write ``ckpt.pth.tar``, ``encoder.pth`` and ``depth.pth`` as the released files are laid out.

    Returns ``(paths, models)`` with paths = dict(checkpoint=..., depth_encoder=..., depth_decoder=...).
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = build_official_models(generator_kind, depth_layers, seed)

    def ddp(sd):
        return OrderedDict(("module." + k, v.clone()) for k, v in sd.items())

    ckpt = {
        "generator": ddp(models["generator"].state_dict()),
        "kp_detector": ddp(models["kp_detector"].state_dict()),
        "discriminator": ddp(models["discriminator"].state_dict()),
        "epoch": 10,
    }
    enc_sd = OrderedDict((k, v.clone()) for k, v in models["depth_encoder"].state_dict().items())
    enc_sd["height"] = 256
    enc_sd["width"] = 256
    enc_sd["use_stereo"] = False
    dec_sd = OrderedDict((k, v.clone()) for k, v in models["depth_decoder"].state_dict().items())
    paths = {
        "checkpoint": tmpdir / "ckpt.pth.tar",
        "depth_encoder": tmpdir / "encoder.pth",
        "depth_decoder": tmpdir / "depth.pth",
    }
    torch.save(ckpt, paths["checkpoint"])
    torch.save(enc_sd, paths["depth_encoder"])
    torch.save(dec_sd, paths["depth_decoder"])
    return paths, models


# ---------------------------------------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------------------------------------
def find_keys_dir():
    """The official key lists: $DAGAN_OFFICIAL_KEYS, <repo>/shared/docs/official-keys or /work/shared/..."""
    candidates = []
    if os.environ.get("DAGAN_OFFICIAL_KEYS"):
        candidates.append(Path(os.environ["DAGAN_OFFICIAL_KEYS"]))
    here = Path(__file__).resolve()
    candidates += [here.parents[1] / "shared" / "docs" / "official-keys",
                   here.parents[2] / "shared" / "docs" / "official-keys",
                   Path("/work/shared/docs/official-keys")]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def read_key_file(path):
    """[(key, shape tuple, dtype string)] in file order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        rows.append((key, shape, dtype.strip()))
    return rows


KEY_FILE_MODULES = {
    "DepthAwareGenerator": lambda: DepthAwareGenerator(),
    "SPADEDepthAwareGenerator": lambda: SPADEDepthAwareGenerator(),
    "KPDetector": lambda: KPDetector(),
    "ResnetEncoder18": lambda: ResnetEncoder(18),
    "ResnetEncoder50": lambda: ResnetEncoder(50),
    "DepthDecoder18": lambda: DepthDecoder(ResnetEncoder(18).num_ch_enc),
    "DepthDecoder50": lambda: DepthDecoder(ResnetEncoder(50).num_ch_enc),
    "MultiScaleDiscriminator": lambda: MultiScaleDiscriminator(),
}


def check_keys_against_files(keys_dir):
    """{name: list of problems} comparing each module's state_dict (keys, order, shapes, dtypes) with the file."""
    report = {}
    for name, ctor in KEY_FILE_MODULES.items():
        rows = read_key_file(Path(keys_dir) / f"{name}_keys.txt")
        sd = ctor().state_dict()
        problems = []
        want = {k: (s, d) for k, s, d in rows}
        have = {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()}
        for k in sorted(set(want) - set(have)):
            problems.append(f"missing {k}")
        for k in sorted(set(have) - set(want)):
            problems.append(f"unexpected {k}")
        for k in sorted(set(want) & set(have)):
            if want[k] != have[k]:
                problems.append(f"mismatch {k}: file {want[k]} vs module {have[k]}")
        if not problems and [k for k, _, _ in rows] != list(sd.keys()):
            problems.append("same keys, different order")
        report[name] = problems
    return report


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------
def astronaut_face(size=256):
    """skimage astronaut cropped around the face (rows 0:224, cols 114:338), resized to size x size."""
    from skimage import data
    img = torch.from_numpy(data.astronaut()[0:224, 114:338].copy()).float().div(255.0)
    img = img.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def lfw_faces(indices, size=256):
    """skimage lfw_subset faces (25x25 grey), replicated to RGB and bilinearly resized to size x size."""
    from skimage import data
    faces = torch.from_numpy(data.lfw_subset()[list(indices)]).float().unsqueeze(1)
    faces = F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return faces.repeat(1, 3, 1, 1).contiguous()


def face_images(size=256):
    """(source, driving, driving_initial), each (2, 3, size, size): astronaut and LFW faces."""
    astro = astronaut_face(size)
    lfw = lfw_faces([0, 1, 2, 3, 4], size)
    astro_shift = torch.roll(astro, shifts=(6, -9), dims=(2, 3))
    source = torch.cat([astro, lfw[0:1]], 0)
    driving = torch.cat([lfw[1:2], astro_shift], 0)
    driving_initial = torch.cat([lfw[2:3], lfw[3:4]], 0)
    return source, driving, driving_initial


def random_images(batch=2, size=256, seed=123):
    """(source, driving, driving_initial) of uniform random pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, 3, size, size, generator=g) for _ in range(3))


def statistics(out):
    """A few scalars showing the random network is not degenerate."""
    heat = out["kp_source"]["heatmap"]
    return {
        "kp_heatmap_max": float(heat.flatten(2).max(-1).values.max()),
        "kp_value_std": float(out["kp_source"]["value"].std()),
        "kp_value_absmax": float(out["kp_source"]["value"].abs().max()),
        "jac_det_min": float(torch.det(out["kp_source"]["jacobian"]).min()),
        "jac_offidentity": float((out["kp_source"]["jacobian"] - torch.eye(2)).abs().mean()),
        "depth_mean": float(out["depth_source"].mean()),
        "depth_std": float(out["depth_source"].std()),
        "mask_max_mean": float(out["mask"].max(1).values.mean()),
        "occlusion_mean": float(out["occlusion_map"].mean()),
        "occlusion_std": float(out["occlusion_map"].std()),
        "attention_max_mean": float(out["attention"].max(-1).values.mean()),
        "attn_delta_rel": float((out["attended_features"] - out["warped_features"]).norm()
                                / out["warped_features"].norm()),
        "pred_mean": float(out["prediction"].mean()),
        "pred_std": float(out["prediction"].std()),
        "pred_frac_saturated": float(((out["prediction"] < 0.01) | (out["prediction"] > 0.99)).float().mean()),
        "deformation_absmax": float(out["deformation"].abs().max()),
    }
