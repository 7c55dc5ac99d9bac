"""Image and video metrics of the talking-head papers, for ``training.evaluate``.

Images are float tensors in [0,1] (data range 1), (B,3,H,W) or a single (3,H,W); per-image metrics
return float64 values of shape (B,) (0-d for a single image). Inputs with mismatched shapes, NaN/inf
or values outside [0,1] raise ValueError naming the argument.

- ``l1``: mean absolute difference over channels and pixels.
- ``psnr``: 10 log10(1 / MSE); +inf for identical images (as skimage's ``peak_signal_noise_ratio``).
- ``ssim``: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  (co)variances, per channel then averaged; the mean is taken over the pixels whose window lies inside
  the image. Equal to skimage's ``structural_similarity(gaussian_weights=True,
  use_sample_covariance=False, data_range=1, channel_axis=...)``.
- ``tcm`` / ``TemporalConsistency``: the temporal consistency metric of DaGAN++ (eq. 18), see ``tcm``.
- ``LPIPS``: Zhang et al. 2018 (v0.1) from user-supplied weights: a torchvision AlexNet or VGG16
  state_dict for the backbone and the ``lpips`` package's ``weights/v0.1/alex.pth`` / ``vgg.pth`` for
  the linear layers.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast.checkpoints.io import _torch_load, check_state_dict

Tensor = torch.Tensor

RANGE_TOLERANCE = 1e-4

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5            # int(3.5 * sigma + 0.5): scipy's truncation, an 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03

# Farneback parameters: OpenCV's documented example values (pyramid halving, 3 levels, 15x15 averaging
# window, 3 iterations per level, degree-5 polynomial neighbourhood with sigma 1.2).
FARNEBACK_PARAMS = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def check_images(name: str, x, *, min_size: int = 1) -> Tensor:
    """``x`` as a (B,3,H,W) float tensor in [0,1]; ValueError/TypeError naming ``name`` otherwise.
    (3,H,W) becomes (1,3,H,W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B,3,H,W) or (3,H,W) float in [0,1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; metrics need float images in [0,1] (convert with .float() / 255)")
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"{name} must be (B,3,H,W) or (3,H,W), got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name} is {x.shape[-2]}x{x.shape[-1]}; this metric needs images of at least "
                         f"{min_size}x{min_size}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must be in [0,1] (data range 1), got values in [{lo:.4g}, {hi:.4g}]")
    return x if x.dim() == 4 else x.unsqueeze(0)


def _check_pair(a, b, names: Tuple[str, str] = ("a", "b"), min_size: int = 1) -> Tuple[Tensor, Tensor, bool]:
    """(a, b) as (B,3,H,W) of equal shape, and whether the inputs were single images."""
    single = isinstance(a, torch.Tensor) and a.dim() == 3
    a4 = check_images(names[0], a, min_size=min_size)
    b4 = check_images(names[1], b, min_size=min_size)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a4, b4, single


def _per_image(values: Tensor, single: bool) -> Tensor:
    return values[0] if single else values


# --------------------------------------------------------------------------------------------
# per-image metrics
# --------------------------------------------------------------------------------------------
def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean |a - b| over channels and pixels: (B,3,H,W) x2 -> (B,) float64 ((3,H,W) -> 0-d)."""
    a4, b4, single = _check_pair(a, b)
    return _per_image((a4.double() - b4.double()).abs().mean((1, 2, 3)), single)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """10 log10(1 / MSE) in dB, data range 1: (B,3,H,W) x2 -> (B,) float64; +inf where a == b."""
    a4, b4, single = _check_pair(a, b)
    mse = (a4.double() - b4.double()).pow(2).mean((1, 2, 3))
    return _per_image(10 * torch.log10(1.0 / mse), single)


def _gaussian_taps(device) -> Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def _blur_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian without padding, (...,H,W) -> (...,H-10,W-10): exactly the pixels skimage keeps
    after cropping the window radius (its reflect-padded border never enters the mean)."""
    flat = x.reshape(-1, 1, *x.shape[-2:])
    flat = F.conv2d(F.conv2d(flat, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
    return flat.view(*x.shape[:-2], *flat.shape[-2:])


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM (Wang et al. 2004; Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, data range 1), per
    channel then averaged: (B,3,H,W) x2 with H, W >= 11 -> (B,) float64 ((3,H,W) -> 0-d)."""
    a4, b4, single = _check_pair(a, b, min_size=2 * SSIM_RADIUS + 1)
    B, C = a4.shape[:2]
    x, y = a4.double(), b4.double()
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.stack([x, y, x * x, y * y, x * y]), _gaussian_taps(x.device))
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return _per_image(s.reshape(B, C, -1).mean(2).mean(1), single)


# --------------------------------------------------------------------------------------------
# temporal consistency (DaGAN++ eq. 18)
# --------------------------------------------------------------------------------------------
def _to_hwc(frame: Tensor) -> np.ndarray:
    return np.ascontiguousarray(frame.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy())


def _gray_uint8(frame_hwc: np.ndarray) -> np.ndarray:
    rgb = np.clip(np.rint(frame_hwc * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def farneback_flow(current: Tensor, previous: Tensor) -> np.ndarray:
    """The motion T_{t-1<-t} between two ground-truth frames (3,H,W) in [0,1]: a (H,W,2) float32 flow
    (dx, dy) in pixels with current(x) ~ previous(x + flow(x)), from cv2.calcOpticalFlowFarneback on the
    uint8 grayscale frames with ``FARNEBACK_PARAMS``."""
    cur = _gray_uint8(_to_hwc(check_images("current", current)[0]))
    prev = _gray_uint8(_to_hwc(check_images("previous", previous)[0]))
    # OpenCV's flow maps its first image onto its second: first(y,x) ~ second(y+fy, x+fx).
    return cv2.calcOpticalFlowFarneback(cur, prev, None, **FARNEBACK_PARAMS)


def warp_previous(previous_hwc: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """W_p(I^{t-1}, T_{t-1<-t}): ``previous_hwc`` (H,W,C) float32 sampled at x + flow(x) with
    cv2.remap (bilinear, OpenCV's 1/32-pixel sub-pixel grid; replicated border) -> (H,W,C)."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(previous_hwc, xs + flow[..., 0], ys + flow[..., 1], interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


class TemporalConsistency:
    """DaGAN++'s TCM (eq. 18), accumulated frame by frame so that long videos need not be held in
    memory: ``update(gt (N,3,H,W), result (N,3,H,W))`` for consecutive chunks of the two videos, then
    ``value()``. For each pair of consecutive frames (t-1, t):

        g_t = || I_gt^t  - W(I_gt^{t-1},  T_{t-1<-t}) ||_2
        r_t = || I_rst^t - W(I_rst^{t-1}, T_{t-1<-t}) ||_2
        TCM = mean_t exp(-| g_t / r_t - 1 |)

    with the flow T_{t-1<-t} from the ground-truth frames only (``farneback_flow``) and used to warp
    both videos (``warp_previous``); ||.||_2 is the Euclidean norm over all pixels and channels of the
    [0,1] frames. The paper's typeset formula lost the absolute value (exp(-g/r - 1) would not be 1 for a
    perfect result). TCM is 1 when the generated video changes between frames exactly as the ground truth
    does. The ratio is ground truth over result, as in the paper, so the two ways of failing score
    differently: a result residual much larger than the ground truth's (flicker, or a frozen video that
    ignores the motion) gives terms near exp(-1) ~ 0.37 and never below; a much smaller one (a result
    steadier than the motion says, e.g. a nearly flat image) gives terms near 0. A video of T frames has
    T-1 pairs (the paper's sum runs over them). r_t = 0: the term is 1 if g_t = 0 too, else 0."""

    def __init__(self):
        self.terms: List[float] = []
        self.gt_norms: List[float] = []
        self.result_norms: List[float] = []
        self._previous: Optional[Tuple[Tensor, np.ndarray]] = None

    def update(self, gt_frames: Tensor, result_frames: Tensor) -> None:
        """Adds the next frames of both videos: (N,3,H,W) or (3,H,W) each, float in [0,1]."""
        gt, result, _ = _check_pair(gt_frames, result_frames, ("gt_frames", "result_frames"))
        if self._previous is not None and tuple(self._previous[0].shape) != tuple(gt.shape[1:]):
            raise ValueError(f"gt_frames are {tuple(gt.shape[1:])} but earlier frames were "
                             f"{tuple(self._previous[0].shape)}; all frames of a video must have one size")
        for gt_t, result_t in zip(gt, result):
            result_hwc = _to_hwc(result_t)
            if self._previous is not None:
                gt_prev, result_prev_hwc = self._previous
                flow = farneback_flow(gt_t, gt_prev)
                g = float(np.linalg.norm((_to_hwc(gt_t) - warp_previous(_to_hwc(gt_prev), flow)).astype(np.float64)))
                r = float(np.linalg.norm((result_hwc - warp_previous(result_prev_hwc, flow)).astype(np.float64)))
                self.gt_norms.append(g)
                self.result_norms.append(r)
                if r > 0:
                    self.terms.append(math.exp(-abs(g / r - 1.0)))
                else:
                    self.terms.append(1.0 if g == 0 else 0.0)
            self._previous = (gt_t, result_hwc)

    def value(self) -> float:
        """The TCM of the frames seen so far (needs at least two)."""
        if not self.terms:
            raise ValueError("TemporalConsistency: TCM needs at least 2 frames of each video")
        return float(np.mean(self.terms))


def tcm(gt_frames: Tensor, result_frames: Tensor) -> float:
    """DaGAN++'s temporal consistency metric of a generated video against its ground truth (see
    ``TemporalConsistency``): gt_frames, result_frames (T,3,H,W) float in [0,1], T >= 2 -> float in
    [0,1], 1 for a perfectly consistent result."""
    if isinstance(gt_frames, torch.Tensor) and gt_frames.dim() != 4:
        raise ValueError(f"gt_frames must be a video (T,3,H,W), got shape {tuple(gt_frames.shape)}")
    if isinstance(gt_frames, torch.Tensor) and gt_frames.shape[0] < 2:
        raise ValueError(f"gt_frames must hold at least 2 frames (T,3,H,W), got shape {tuple(gt_frames.shape)}")
    acc = TemporalConsistency()
    acc.update(gt_frames, result_frames)
    return acc.value()


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------
# torchvision ``features`` layouts: (out_channels, kernel, stride, padding) convolutions, each followed by
# a ReLU, and "M" max-pools (AlexNet: 3x3 stride 2; VGG: 2x2 stride 2). Sequential indices follow.
ALEXNET_LAYOUT = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
VGG16_LAYOUT = ((64, 3, 1, 1), (64, 3, 1, 1), "M", (128, 3, 1, 1), (128, 3, 1, 1), "M",
                (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M", (512, 3, 1, 1), (512, 3, 1, 1),
                (512, 3, 1, 1), "M", (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1))
# ``features`` indices after which LPIPS taps its five layers (relu1..relu5 of AlexNet, relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 of VGG16) and their channel counts.
LPIPS_NETS = {
    "alex": {"layout": ALEXNET_LAYOUT, "pool": 3, "taps": (2, 5, 8, 10, 12), "channels": (64, 192, 384, 256, 256),
             "torchvision": "alexnet", "lpips_file": "weights/v0.1/alex.pth"},
    "vgg": {"layout": VGG16_LAYOUT, "pool": 2, "taps": (4, 9, 16, 23, 30), "channels": (64, 128, 256, 512, 512),
            "torchvision": "vgg16", "lpips_file": "weights/v0.1/vgg.pth"},
}
# LPIPS's ScalingLayer: inputs in [-1,1] shifted and scaled to roughly ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10


class LPIPSBackbone(nn.Module):
    """The convolutional ``features`` of torchvision's AlexNet (``net="alex"``) or VGG16 (``"vgg"``), up to
    LPIPS's last tap: x (B,3,H,W) (already scaled) -> the five tapped activations [(B,C_l,H_l,W_l)]."""

    def __init__(self, net: str):
        super().__init__()
        spec = LPIPS_NETS[net]
        layers: List[nn.Module] = []
        cin = 3
        for item in spec["layout"]:
            if item == "M":
                layers.append(nn.MaxPool2d(spec["pool"], 2))
            else:
                cout, kernel, stride, padding = item
                layers += [nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers[:spec["taps"][-1]])
        self.taps = spec["taps"]

    def forward(self, x: Tensor) -> List[Tensor]:
        """x (B,3,H,W) -> five activations (B,C_l,H_l,W_l)."""
        out, start = [], 0
        for end in self.taps:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out


class LPIPSLinearLayers(nn.Module):
    """LPIPS's five 1x1 channel weightings, named as the ``lpips`` package saves them
    (``lin<l>.model.1.weight``, (1,C_l,1,1)); ``model.0`` is LPIPS's dropout, inactive when evaluating."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        for index, c in enumerate(channels):
            self.add_module(f"lin{index}", nn.Module())
            getattr(self, f"lin{index}").model = nn.Sequential(nn.Identity(), nn.Conv2d(c, 1, 1, bias=False))

    def forward(self, diffs: Sequence[Tensor]) -> Tensor:
        """Squared normalised feature differences [(B,C_l,H_l,W_l)] -> (B,) summed spatial means."""
        return sum(getattr(self, f"lin{i}").model(d).mean((1, 2, 3)) for i, d in enumerate(diffs))


def _read_state_dict(path: str, what: str) -> dict:
    obj = _torch_load(path, "cpu", what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, not a state_dict")
    return {str(k): v for k, v in obj.items()}


def _guess_net(backbone_sd: dict, path: str) -> str:
    w = backbone_sd.get("features.0.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        if w.shape[-1] == 11:
            return "alex"
        if w.shape[-1] == 3:
            return "vgg"
    if any(k.startswith("lin0.") for k in backbone_sd):
        raise ValueError(f"LPIPS backbone {path} is an LPIPS linear-layer file (lin0.model.1.weight, ...); pass it "
                         "as the linear file and a torchvision alexnet/vgg16 state_dict as the backbone")
    keys = sorted(backbone_sd)
    raise ValueError(f"LPIPS backbone {path} is not a torchvision AlexNet or VGG16 state_dict: no "
                     f"'features.0.weight' of shape (64,3,11,11) or (64,3,3,3); its keys start with "
                     f"{', '.join(keys[:8]) or 'nothing'}")


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018, v0.1, ``lpips.LPIPS(net=...)`` with its default settings).

    ``backbone``: a torchvision-format state_dict file of ``alexnet`` or ``vgg16`` (``features.<i>.*``;
    ``classifier.*`` keys are ignored); ``linear``: the matching LPIPS linear-layer file (the ``lpips``
    package's ``weights/v0.1/alex.pth`` or ``vgg.pth``: ``lin0.model.1.weight`` ... ``lin4``). Both are
    read with ``torch.load(weights_only=True)``; ``net``: "auto" (from the backbone's first convolution),
    "alex" or "vgg". A file that does not fit raises ``dagan_fast.checkpoints.CheckpointMismatchError``
    listing missing, unexpected and mis-shaped keys.

    forward(a, b): images (B,3,H,W) or (3,H,W) in [0,1] -> (B,) distances (0-d for single images), >= 0,
    0 for identical images; computed on the module's device and dtype.
    """

    def __init__(self, backbone: str, linear: str, net: str = "auto"):
        super().__init__()
        backbone, linear = os.fspath(backbone), os.fspath(linear)
        if net not in ("auto", *LPIPS_NETS):
            raise ValueError(f"net must be 'auto', 'alex' or 'vgg', got {net!r}")
        backbone_sd = _read_state_dict(backbone, "LPIPS backbone")
        found = _guess_net(backbone_sd, backbone)
        if net != "auto" and net != found:
            raise ValueError(f"LPIPS backbone {backbone} holds {LPIPS_NETS[found]['torchvision']} weights but "
                             f"net={net!r} was asked for; use net='auto' or the {LPIPS_NETS[net]['torchvision']} file")
        self.net = found
        spec = LPIPS_NETS[found]
        self.backbone = LPIPSBackbone(found)
        used = {k: v for k, v in backbone_sd.items() if not k.startswith("classifier.")}
        # torchvision's features run past LPIPS's last tap (a final max-pool, no weights): nothing to drop.
        check_state_dict(self.backbone, used, backbone, f"LPIPS {spec['torchvision']} backbone",
                         f"expected a torchvision {spec['torchvision']} state_dict")
        self.backbone.load_state_dict(used, strict=True)

        linear_sd = _read_state_dict(linear, "LPIPS linear layers")
        if "features.0.weight" in linear_sd:
            raise ValueError(f"LPIPS linear file {linear} is a torchvision backbone state_dict; pass it as the "
                             f"backbone and LPIPS's {spec['lpips_file']} as the linear file")
        self.linear = LPIPSLinearLayers(spec["channels"])
        check_state_dict(self.linear, linear_sd, linear, f"LPIPS {found} linear-layer",
                         f"the {spec['torchvision']} backbone goes with the lpips package's {spec['lpips_file']}")
        self.linear.load_state_dict(linear_sd, strict=True)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: a fixed metric network."""
        return super().train(False)

    def _normalized_features(self, x: Tensor) -> List[Tensor]:
        feats = self.backbone(((2 * x - 1) - self.shift) / self.scale)
        return [f / (f.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_EPS) for f in feats]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b (B,3,H,W) or (3,H,W) in [0,1] -> (B,) (or 0-d) distances."""
        a4, b4, single = _check_pair(a, b)
        ref = self.shift
        fa = self._normalized_features(a4.to(ref.device, ref.dtype))
        fb = self._normalized_features(b4.to(ref.device, ref.dtype))
        return _per_image(self.linear([(x - y) ** 2 for x, y in zip(fa, fb)]), single)

    def extra_repr(self) -> str:
        return f"net={self.net!r}"
