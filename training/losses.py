"""DaGAN's training losses (paper eq. 10; official code = FOMM's ``GeneratorFullModel`` plus the
keypoint-distance term), written for this package:

- ``PerceptualLoss``: L1 between VGG19 relu1_1..relu5_1 features of an image pyramid (ImageNet
  normalisation), weighted per layer, summed over scales;
- ``lsgan_generator_loss`` / ``lsgan_discriminator_loss`` / ``feature_matching_loss`` for the
  keypoint-conditioned discriminator (``dagan_fast.models.discriminator``);
- ``Transform`` (random affine + thin-plate-spline) and ``equivariance_losses`` on keypoint values and
  Jacobians;
- ``keypoint_distance_loss``: a smooth hinge on pairwise keypoint distances (the official one applies
  sign() to the distances and so has no gradient at all).

VGG19 weights: pass a torchvision-format VGG19 state_dict file (``features.<i>.weight/bias``, e.g. the
``vgg19-dcbb9e9d.pth`` file torchvision downloads) to ``VGG19Features(weights=...)``. Without one, the
perceptual loss uses a documented substitute: the same VGG19 layers with fixed random weights (He
initialisation from seed 0, zero bias). Random convolutional features still compare local structure at
five receptive-field sizes, so training runs and improves, but they are a weaker perceptual measure than
ImageNet features; a warning says so once per process.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast.models.blocks import AntiAliasInterpolation2d
from dagan_fast.ops.reference import inverse_2x2, make_coordinate_grid

Tensor = torch.Tensor
KP = Dict[str, Tensor]

# torchvision's VGG19 ``features``: conv channel counts and "M" max-pools; index i of the Sequential
# follows from this list (each conv is followed by its ReLU).
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
# ``features`` indices after which relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 are taken.
VGG19_SLICE_ENDS = (2, 7, 12, 21, 30)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_warned_random_vgg = False


class VGG19Features(nn.Module):
    """Frozen VGG19 up to relu5_1: x (B,3,H,W) in [0,1] -> [relu1_1 (B,64,H,W), relu2_1 (B,128,H/2,W/2),
    relu3_1 (B,256,H/4,W/4), relu4_1 (B,512,H/8,W/8), relu5_1 (B,512,H/16,W/16)], after ImageNet
    normalisation. ``weights``: a torchvision-format VGG19 state_dict file (loaded with
    weights_only=True; keys beyond relu5_1 and the classifier are ignored), or None for the fixed random
    substitute (see the module docstring; warns once)."""

    def __init__(self, weights: Optional[str] = None):
        super().__init__()
        layers: List[nn.Module] = []
        cin = 3
        for item in VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers[:VGG19_SLICE_ENDS[-1]])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.pretrained = weights is not None
        if weights is not None:
            self._load(weights)
        else:
            global _warned_random_vgg
            if not _warned_random_vgg:
                warnings.warn("VGG19Features: no VGG19 weights given; the perceptual loss uses fixed random VGG19 "
                              "features instead of ImageNet ones (training runs, but pass a torchvision vgg19 "
                              "state_dict file, e.g. --vgg vgg19-dcbb9e9d.pth, for the official loss)", stacklevel=2)
                _warned_random_vgg = True
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for m in self.features:
                    if isinstance(m, nn.Conv2d):
                        fan_in = m.in_channels * 9
                        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                        m.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"VGG19 weights not found: {path}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        ours = {}
        for name in self.features.state_dict():
            key = f"features.{name}"
            if key not in sd:
                raise ValueError(f"{path} is not a torchvision VGG19 state_dict: missing {key!r}")
            ours[name] = sd[key]
        self.features.load_state_dict(ours)

    def train(self, mode: bool = True) -> "VGG19Features":
        """Always eval: the network is a fixed feature extractor."""
        return super().train(False)

    def forward(self, x: Tensor) -> List[Tensor]:
        out = []
        h = (x - self.mean) / self.std
        start = 0
        for end in VGG19_SLICE_ENDS:
            for layer in self.features[start:end]:
                h = layer(h)
            out.append(h)
            start = end
        return out


class ImagePyramid(nn.Module):
    """x (B,C,H,W) -> {"prediction_<scale>": anti-aliased downsampling of x} for each scale (the
    official ImagePyramide; the keys match ``MultiScaleDiscriminator``'s)."""

    def __init__(self, scales: Sequence[float], num_channels: int = 3):
        super().__init__()
        self.scales = tuple(scales)
        self.downs = nn.ModuleDict({str(s).replace(".", "-"): AntiAliasInterpolation2d(num_channels, s)
                                    for s in self.scales})

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {f"prediction_{key.replace('-', '.')}": down(x) for key, down in self.downs.items()}


class PerceptualLoss(nn.Module):
    """sum over scales s and layers i of weights[i] * mean |vgg_i(gen_s) - vgg_i(real_s)| (real side
    detached), gen/real (B,3,H,W) -> scalar. ``vgg``: a ``VGG19Features``; ``scales`` the pyramid."""

    def __init__(self, vgg: VGG19Features, scales: Sequence[float] = (1, 0.5, 0.25, 0.125),
                 weights: Sequence[float] = (10, 10, 10, 10, 10)):
        super().__init__()
        self.vgg, self.pyramid, self.weights = vgg, ImagePyramid(scales), tuple(weights)

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        gen_pyr, real_pyr = self.pyramid(generated), self.pyramid(real)
        total = generated.new_zeros(())
        for key in gen_pyr:
            x_vgg = self.vgg(gen_pyr[key])
            with torch.no_grad():
                y_vgg = self.vgg(real_pyr[key])
            for w, a, b in zip(self.weights, x_vgg, y_vgg):
                if w:
                    total = total + w * (a - b).abs().mean()
        return total


# --------------------------------------------------------------------------------------------
# adversarial
# --------------------------------------------------------------------------------------------
def _prediction_maps(disc_out: Dict[str, object]) -> List[Tensor]:
    return [v for k, v in sorted(disc_out.items()) if k.startswith("prediction_map_")]


def lsgan_generator_loss(disc_fake: Dict[str, object], weight: float = 1.0) -> Tensor:
    """LSGAN generator term: weight * sum over scales of mean (1 - D(fake))^2; ``disc_fake`` is the
    ``MultiScaleDiscriminator`` output on the generated pyramid."""
    return sum(weight * ((1 - p) ** 2).mean() for p in _prediction_maps(disc_fake))


def lsgan_discriminator_loss(disc_real: Dict[str, object], disc_fake: Dict[str, object],
                             weight: float = 1.0) -> Tensor:
    """LSGAN discriminator term: weight * sum over scales of mean ((1 - D(real))^2 + D(fake)^2), the
    fake pyramid detached by the caller."""
    return sum(weight * ((1 - r) ** 2 + f ** 2).mean()
               for r, f in zip(_prediction_maps(disc_real), _prediction_maps(disc_fake)))


def feature_matching_loss(disc_real: Dict[str, object], disc_fake: Dict[str, object],
                          weights: Sequence[float] = (10, 10, 10, 10)) -> Tensor:
    """sum over scales and discriminator blocks i of weights[i] * mean |feat_i(real) - feat_i(fake)|."""
    total = None
    for key in sorted(k for k in disc_fake if k.startswith("feature_maps_")):
        for w, a, b in zip(weights, disc_real[key], disc_fake[key]):
            if w:
                term = w * (a - b).abs().mean()
                total = term if total is None else total + term
    if total is None:
        raise ValueError("feature_matching_loss: no feature maps (or all weights zero)")
    return total


# --------------------------------------------------------------------------------------------
# equivariance
# --------------------------------------------------------------------------------------------
class Transform:
    """A random smooth warp of the [-1,1] plane per batch element (the official equivariance transform):
    affine theta = I + N(0, sigma_affine) (B,2,3) plus, with ``points_tps``, a thin-plate-spline-like
    term sum_k w_k r_k^2 log(r_k + 1e-6) over a points_tps x points_tps control grid, r_k the L1 distance
    to control point k, w ~ N(0, sigma_tps). ``generator``: the torch.Generator drawing the noise."""

    def __init__(self, batch: int, sigma_affine: float = 0.05, sigma_tps: float = 0.005, points_tps: int = 5,
                 generator: Optional[torch.Generator] = None, dtype=torch.float32, device=None):
        noise = torch.randn(batch, 2, 3, generator=generator, dtype=torch.float64) * sigma_affine
        self.theta = (noise + torch.eye(2, 3, dtype=torch.float64)).to(dtype=dtype, device=device)
        self.batch = batch
        if points_tps:
            self.control_points = make_coordinate_grid(points_tps, points_tps, dtype, device).view(-1, 2)
            params = torch.randn(batch, points_tps ** 2, generator=generator, dtype=torch.float64) * sigma_tps
            self.control_params = params.to(dtype=dtype, device=device)
        else:
            self.control_points = self.control_params = None

    def warp_coordinates(self, coords: Tensor) -> Tensor:
        """coords (B,N,2) -> T(coords) (B,N,2)."""
        theta = self.theta.to(coords.dtype)
        out = coords @ theta[:, :, :2].transpose(1, 2) + theta[:, :, 2].unsqueeze(1)
        if self.control_points is not None:
            diff = coords.unsqueeze(2) - self.control_points.to(coords.dtype).view(1, 1, -1, 2)
            r = diff.abs().sum(-1)
            tps = (self.control_params.to(coords.dtype).unsqueeze(1) * r ** 2 * torch.log(r + 1e-6)).sum(-1)
            out = out + tps.unsqueeze(-1)
        return out

    def jacobian(self, coords: Tensor) -> Tensor:
        """dT/dcoords at coords (B,N,2) -> (B,N,2,2) (row = output x/y, column = d/dx, d/dy), analytic:
        d/dc [r^2 log(r + eps)] = (2 r log(r + eps) + r^2 / (r + eps)) sign(c - p)."""
        theta = self.theta.to(coords.dtype)
        jac = theta[:, :, :2].unsqueeze(1).expand(coords.shape[0], coords.shape[1], 2, 2)
        if self.control_points is not None:
            diff = coords.unsqueeze(2) - self.control_points.to(coords.dtype).view(1, 1, -1, 2)
            r = diff.abs().sum(-1)
            dr = 2 * r * torch.log(r + 1e-6) + r ** 2 / (r + 1e-6)
            grad = ((self.control_params.to(coords.dtype).unsqueeze(1) * dr).unsqueeze(-1) * torch.sign(diff)).sum(2)
            # the TPS term adds the same scalar to x and y, so both rows gain its gradient
            jac = jac + grad.unsqueeze(2)
        return jac

    def transform_frame(self, frame: Tensor) -> Tensor:
        """frame (B,C,H,W) -> frame sampled at T(grid) (reflection padding, align_corners=True as the
        [-1,1] grid's endpoints are pixel centres)."""
        B, _, H, W = frame.shape
        grid = make_coordinate_grid(H, W, frame.dtype, frame.device).view(1, H * W, 2).expand(B, H * W, 2)
        warped = self.warp_coordinates(grid).view(B, H, W, 2)
        return F.grid_sample(frame, warped, mode="bilinear", padding_mode="reflection", align_corners=True)


def equivariance_losses(kp_driving: KP, kp_transformed: KP, transform: Transform) -> Tuple[Tensor, Optional[Tensor]]:
    """Keypoints of ``transform.transform_frame(driving)`` must map back onto the driving keypoints:
    value = mean |kp_d - T(kp_t)|; jacobian = mean |I - inv(J_d) dT(kp_t) J_t| (None without
    Jacobians). kp dicts {"value": (B,K,2), "jacobian": (B,K,2,2)} -> (value, jacobian) unweighted."""
    value = (kp_driving["value"] - transform.warp_coordinates(kp_transformed["value"])).abs().mean()
    if "jacobian" not in kp_driving:
        return value, None
    jac_t = transform.jacobian(kp_transformed["value"]) @ kp_transformed["jacobian"]
    product = inverse_2x2(kp_driving["jacobian"]) @ jac_t
    eye = torch.eye(2, dtype=product.dtype, device=product.device)
    return value, (eye - product).abs().mean()


# --------------------------------------------------------------------------------------------
# keypoint distance
# --------------------------------------------------------------------------------------------
def keypoint_distance_loss(kp_value: Tensor, margin: float = 0.2) -> Tensor:
    """Penalty on keypoints closer than ``margin``: mean over all K x K pairs (i != j contribute) of
    2 (1 - d_ij / margin)_+^2, d_ij = sqrt(||k_i - k_j||^2 + 1e-8). kp_value (B,K,2) -> scalar.
    Two coincident keypoints cost 2 per ordered pair, as in the official sign() version (whose value
    it matches at d = 0 and for d >= margin), but the squared hinge has a gradient pushing close
    keypoints apart, vanishing smoothly at the margin."""
    K = kp_value.shape[1]
    diff = kp_value.unsqueeze(2) - kp_value.unsqueeze(1)
    dist = torch.sqrt((diff ** 2).sum(-1) + 1e-8)
    off_diag = 1 - torch.eye(K, dtype=kp_value.dtype, device=kp_value.device)
    return (2 * F.relu(1 - dist / margin) ** 2 * off_diag).mean()
