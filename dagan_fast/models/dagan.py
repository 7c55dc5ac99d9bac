"""``DaGAN``: the whole official model (depth network, keypoint detector, generator, optionally the
discriminator) behind one call, loadable from the authors' checkpoints (``from_official``) or from our
safetensors format (``load``).

Image sizes: H and W must be multiples of 128 (with the official hyper-parameters the keypoint and
dense-motion hourglasses run at 1/4 resolution through 5 halvings, and their skips must line up);
256x256 is the native size of the released weights, other sizes run but are outside their training.
"""
from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..ops._validate import _value_checks_enabled
from ..ops.reference import inverse_2x2
from .official_motion import official_inverse
from .blocks import SPADEResnetBlock, fold_module
from .dense_motion import DenseMotionNetwork
from .depth import RESNET_LAYOUTS, DepthDecoder, ResnetEncoder
from .discriminator import MultiScaleDiscriminator
from .generator import GENERATOR_KINDS, DepthAwareGenerator, SPADEDepthAwareGenerator
from .keypoints import KPDetector
from .registry import register_model

Tensor = torch.Tensor
KP = Dict[str, Tensor]


# The official vox-adv-256 configuration (DaGAN's released checkpoints).
DEFAULT_CONFIG: Dict[str, Any] = {
    "generator": "plain",            # "plain" = DepthAwareGenerator, "spade" = SPADEDepthAwareGenerator
    "depth_layers": 18,              # ResNet depth of the monodepth2 encoder
    "depth_width": 64,               # its stem width (64 as released; smaller for tiny CPU models)
    "num_kp": 15,
    "num_channels": 3,
    "estimate_jacobian": True,
    "single_jacobian_map": False,
    "kp_detector": {"block_expansion": 32, "max_features": 1024, "num_blocks": 5, "temperature": 0.1,
                    "scale_factor": 0.25, "pad": 0},
    "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
                         "num_bottleneck_blocks": 6, "estimate_occlusion_map": True},
    "dense_motion_params": {"block_expansion": 64, "max_features": 1024, "num_blocks": 5, "scale_factor": 0.25,
                            "kp_variance": 0.01},
    "discriminator": None,           # None, or the discriminator parameters (DEFAULT_DISCRIMINATOR)
}
DEFAULT_DISCRIMINATOR: Dict[str, Any] = {"scales": [1], "block_expansion": 32, "num_blocks": 4, "max_features": 512,
                                         "sn": False, "use_kp": True, "kp_variance": 0.01}


def make_config(config: Optional[Dict[str, Any]] = None, **overrides) -> Dict[str, Any]:
    """DEFAULT_CONFIG updated by ``config`` then ``overrides`` (nested dicts merged), validated.
    ``discriminator=True`` means DEFAULT_DISCRIMINATOR."""
    merged = copy.deepcopy(DEFAULT_CONFIG)
    for source in (config or {}, overrides):
        for key, value in source.items():
            if key not in merged:
                raise ValueError(f"DaGAN config: unknown key {key!r} (known: {', '.join(sorted(merged))})")
            if isinstance(merged[key], dict) and isinstance(value, dict):
                unknown = set(value) - set(merged[key])
                if unknown:
                    raise ValueError(f"DaGAN config: unknown {key} keys {sorted(unknown)}")
                merged[key].update(copy.deepcopy(value))
            else:
                merged[key] = copy.deepcopy(value)
    disc = merged["discriminator"]
    if disc is True:
        merged["discriminator"] = copy.deepcopy(DEFAULT_DISCRIMINATOR)
    elif disc is False:
        merged["discriminator"] = None
    elif isinstance(disc, dict):
        merged["discriminator"] = {**copy.deepcopy(DEFAULT_DISCRIMINATOR), **disc}
    if merged["generator"] not in GENERATOR_KINDS:
        raise ValueError(f"DaGAN config: generator must be one of {GENERATOR_KINDS}, got {merged['generator']!r}")
    if merged["depth_layers"] not in RESNET_LAYOUTS:
        raise ValueError(f"DaGAN config: depth_layers must be one of {sorted(RESNET_LAYOUTS)}, "
                         f"got {merged['depth_layers']!r}")
    if not isinstance(merged["num_kp"], int) or merged["num_kp"] < 1:
        raise ValueError(f"DaGAN config: num_kp must be a positive int, got {merged['num_kp']!r}")
    return merged


# --------------------------------------------------------------------------------------------
# relative motion
# --------------------------------------------------------------------------------------------
def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N,2) points (Andrew's monotone chain + shoelace); 0 if degenerate."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: List[tuple] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: List[tuple] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    if len(hull) < 3:
        return 0.0
    xs = np.array([p[0] for p in hull])
    ys = np.array([p[1] for p in hull])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def normalize_kp(kp_source: KP, kp_driving: KP, kp_driving_initial: KP, adapt_movement_scale: bool = False,
                 use_relative_movement: bool = False, use_relative_jacobian: bool = False,
                 inverse: Callable[[Tensor], Tensor] = inverse_2x2) -> KP:
    """The official relative motion transfer.

    kp_new = kp_source + (kp_driving - kp_driving_initial) * scale, and with ``use_relative_jacobian``
    J_new = J_driving inv(J_driving_initial) J_source; scale = sqrt(hull area(kp_source) /
    hull area(kp_driving_initial)) per batch element when ``adapt_movement_scale``, else 1.
    kp dicts {"value": (B or 1,K,2), "jacobian": (B or 1,K,2,2)} -> the driving batch's kp dict.
    ``inverse``: the 2x2 inverse used (closed form with a determinant floor by default).
    """
    if not use_relative_movement:
        return dict(kp_driving)
    scale = None
    if adapt_movement_scale:
        src = kp_source["value"].detach().cpu().double().numpy()
        ini = kp_driving_initial["value"].detach().cpu().double().numpy()
        n = max(len(src), len(ini))
        scales = []
        for i in range(n):
            area_src = convex_hull_area(src[min(i, len(src) - 1)])
            area_ini = convex_hull_area(ini[min(i, len(ini) - 1)])
            if area_ini <= 0.0:
                raise ValueError("animate: adapt_scale needs the initial driving keypoints to span an area, but their "
                                 "convex hull is degenerate (all keypoints on a line); use adapt_scale=False")
            scales.append(math.sqrt(area_src) / math.sqrt(area_ini))
        value = kp_driving["value"]
        scale = torch.tensor(scales, dtype=value.dtype, device=value.device).view(-1, 1, 1)
    initial_inverse = None
    if use_relative_jacobian and "jacobian" in kp_driving:
        initial_inverse = inverse(kp_driving_initial["jacobian"])
    return relative_motion(kp_driving, kp_source, kp_driving_initial["value"], initial_inverse, scale)


def relative_motion(kp_driving: KP, kp_source: KP, reference_value: Tensor,
                    reference_inverse: Optional[Tensor] = None, scale: Union[None, float, Tensor] = None) -> KP:
    """The keypoint motion between a reference driving frame and ``kp_driving``, applied to the source.

    value = kp_source + (kp_driving - reference_value) * scale; with ``reference_inverse`` (the inverse of the
    reference frame's (B or 1,K,2,2) Jacobians) and driving Jacobians, J = J_driving reference_inverse J_source,
    otherwise the driving Jacobians are kept. ``scale``: None (1), a float, or (B,1,1). Shapes as
    ``normalize_kp``; the Animator calls this per frame with the reference's inverse computed once.
    """
    diff = kp_driving["value"] - reference_value
    if scale is not None:
        diff = diff * scale
    out = dict(kp_driving)
    out["value"] = diff + kp_source["value"]
    if reference_inverse is not None and kp_driving.get("jacobian") is not None:
        out["jacobian"] = torch.matmul(torch.matmul(kp_driving["jacobian"], reference_inverse), kp_source["jacobian"])
    return out


@dataclass
class PreparedSource:
    """Source-only work, reusable across driving frames: ``image`` (B,3,H,W), ``depth`` (B,1,H,W),
    ``kp`` (kp dict) and the generator's ``features`` (see ``encode_source``)."""

    image: Tensor
    depth: Tensor
    kp: KP
    features: Dict[str, Tensor]


def _refuse_training(module: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(f"{type(module).__name__}.train(): this network went through "
                           "DaGAN.optimize_for_inference() and cannot be trained; load the original weights again")
    return type(module).train(module, mode)


def _lcm(*values: int) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@register_model
class DaGAN(nn.Module):
    """DaGAN (CVPR 2022) with the official architecture and attribute names.

    Submodules: ``depth_encoder`` (ResnetEncoder), ``depth_decoder`` (DepthDecoder), ``kp_detector``
    (KPDetector on RGB + depth), ``generator`` (DepthAwareGenerator or SPADEDepthAwareGenerator), and
    ``discriminator`` (MultiScaleDiscriminator) or None. ``config``: the hyper-parameters (see
    DEFAULT_CONFIG). Images are float (B,3,H,W) in [0,1], H and W multiples of ``size_multiple`` (128).

    - ``model(source, driving)``: absolute motion (driving keypoints used as they are).
    - ``model.animate(source, driving, driving_initial)``: the official relative motion transfer.
    - ``DaGAN.from_official(...)``, ``DaGAN.load(path)``, ``model.save(path)``.
    - ``model.optimize_for_inference()``: folded, inference-only.
    """

    def __init__(self, config: Optional[Dict[str, Any]] = None, **overrides):
        super().__init__()
        cfg = make_config(config, **overrides)
        self.config = cfg
        self.depth_encoder = ResnetEncoder(cfg["depth_layers"], cfg["depth_width"])
        self.depth_decoder = DepthDecoder(self.depth_encoder.num_ch_enc, width=cfg["depth_width"])
        kp = cfg["kp_detector"]
        self.kp_detector = KPDetector(num_kp=cfg["num_kp"], num_channels=cfg["num_channels"] + 1,
                                      estimate_jacobian=cfg["estimate_jacobian"],
                                      single_jacobian_map=cfg["single_jacobian_map"], **kp)
        gen_cls = DepthAwareGenerator if cfg["generator"] == "plain" else SPADEDepthAwareGenerator
        self.generator = gen_cls(num_channels=cfg["num_channels"], num_kp=cfg["num_kp"],
                                 estimate_jacobian=cfg["estimate_jacobian"],
                                 dense_motion_params=dict(cfg["dense_motion_params"]), **cfg["generator_params"])
        disc = cfg["discriminator"]
        if disc is not None:
            self.discriminator = MultiScaleDiscriminator(num_kp=cfg["num_kp"], num_channels=cfg["num_channels"],
                                                         **disc)
        else:
            self.discriminator = None
        dm = cfg["dense_motion_params"]
        self.size_multiple = _lcm(round(2 ** kp["num_blocks"] / kp["scale_factor"]),
                                  round(2 ** dm["num_blocks"] / dm["scale_factor"]), 32,
                                  2 ** cfg["generator_params"]["num_down_blocks"])
        # The depth encoder reaches 1/32 and the decoder reflection-pads by 1 there: 2x2 at least.
        self.min_size = max(self.size_multiple, 64)
        self.inference_only = False
        self.eval()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_official(cls, checkpoint, depth_encoder, depth_decoder, *, generator: str = "auto",
                      depth_layers: Union[str, int] = "auto", num_kp: Optional[int] = None,
                      map_location="cpu", load_discriminator: bool = False,
                      official_rounding: bool = False) -> "DaGAN":
        """Loads the authors' files as they are: ``checkpoint`` (``DaGAN_vox_adv_256.pth.tar`` or
        ``SPADE_DaGAN_vox_adv_256.pth.tar``), ``depth_encoder`` (``encoder.pth``), ``depth_decoder``
        (``depth.pth``). Generator kind, depth backbone and num_kp are read from the keys ("auto"/None);
        an explicit choice that disagrees with the files raises ``CheckpointMismatchError``. Returns the
        model in eval mode. ``official_rounding``: see ``use_official_rounding``. See
        ``dagan_fast.checkpoints.load_official``."""
        from ..checkpoints import load_official
        model = load_official(checkpoint, depth_encoder, depth_decoder, generator=generator, depth_layers=depth_layers,
                              num_kp=num_kp, map_location=map_location, load_discriminator=load_discriminator)
        return model.use_official_rounding(official_rounding)

    def use_official_rounding(self, enabled: bool = True) -> "DaGAN":
        """Computes the dense-motion stage in the authors' float arithmetic (``models.official_motion``)
        instead of the fused motion kernels, so that float32 outputs match the official code to ~1e-5
        rather than to float32's own noise on warped sharp images (~1e-3). Slower motion stage; the rest of
        the model still runs the fast kernels. Returns self."""
        self.generator.dense_motion_network.official_rounding = bool(enabled)
        return self

    @property
    def official_rounding(self) -> bool:
        """Whether ``use_official_rounding`` is on."""
        return self.generator.dense_motion_network.official_rounding

    def jacobian_inverse(self, jacobian: Tensor) -> Tensor:
        """The (...,2,2) inverse of relative animation: the official ``torch.inverse`` under
        ``use_official_rounding``, else the closed form (both floor |det| at 1e-6)."""
        return official_inverse(jacobian) if self.official_rounding else inverse_2x2(jacobian)

    @classmethod
    def load(cls, path, map_location="cpu") -> "DaGAN":
        """Reads a file written by ``dagan_fast.checkpoints.save`` (safetensors + config) holding this class
        of model; eval mode."""
        from ..checkpoints import load
        return load(path, map_location=map_location, model=cls.__name__)

    def save(self, path) -> None:
        """Writes this model as one safetensors file (see ``dagan_fast.checkpoints.save``)."""
        from ..checkpoints import save
        save(self, path)

    # ------------------------------------------------------------------ input checks
    def _reference_param(self) -> Tensor:
        return self.kp_detector.kp.weight

    def _check_image(self, name: str, x: Any) -> Tensor:
        """Raises TypeError/ValueError naming ``name`` unless x is float (B,3,H,W) in [0,1] on the model's
        device and dtype with H, W multiples of ``size_multiple``."""
        c = self.config["num_channels"]
        hint = f"float (B,{c},H,W) in [0,1]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {hint}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}; images must be {hint}: convert with {name}.float() / 255")
        if x.dim() != 4:
            extra = f" (a single image: {name}.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(f"{name} must be 4-D {hint}, got shape {tuple(x.shape)}{extra}")
        B, C, H, W = x.shape
        if C != c:
            extra = " (channels last? use .permute(0, 3, 1, 2))" if W == c else ""
            raise ValueError(f"{name} must have {c} channels (RGB), got shape {tuple(x.shape)}{extra}")
        if B < 1:
            raise ValueError(f"{name} has batch size 0; pass at least one image")
        m = self.size_multiple
        if H % m or W % m or min(H, W) < self.min_size:
            raise ValueError(f"{name} is {H}x{W}, but H and W must be multiples of {m} and at least {self.min_size} "
                             f"(e.g. 256, the native size of the released weights): the keypoint and dense-motion "
                             f"hourglasses halve the 1/4-resolution maps {self.config['dense_motion_params']['num_blocks']} "
                             f"times and the depth encoder reaches 1/32. Resize (or pad) the images first.")
        ref = self._reference_param()
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {ref.device}; move one of them "
                             f"({name}.to('{ref.device}') or model.to('{x.device}'))")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the model's weights are {ref.dtype}; "
                            f"use {name}.to({ref.dtype}) (or convert the model)")
        if _value_checks_enabled(x):
            lo, hi = torch.aminmax(x)
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} contains NaN or inf values")
            if lo < -1e-3 or hi > 1 + 1e-3:
                extra = " (0..255 values? divide by 255)" if hi > 2 else ""
                raise ValueError(f"{name} must be in [0,1], got values in [{lo:.4g}, {hi:.4g}]{extra}")
        return x

    @staticmethod
    def _check_batch(name: str, x: Tensor, batch: int) -> None:
        if x.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch size {x.shape[0]} but driving has {batch}; pass 1 (shared) or {batch}")

    # ------------------------------------------------------------------ pieces
    def depth(self, image: Tensor) -> Tensor:
        """Depth as DaGAN uses it: ("disp", 0) of the depth network, (B,1,H,W) in (0,1)."""
        return self.depth_decoder(self.depth_encoder(image), scales=(0,))[("disp", 0)]

    def keypoints(self, image: Tensor, depth: Optional[Tensor] = None) -> KP:
        """{"value": (B,K,2), "jacobian": (B,K,2,2)} of an image (B,3,H,W), computing its depth if not given."""
        if depth is None:
            depth = self.depth(image)
        return self.kp_detector(torch.cat([image, depth], dim=1))

    def _analyze(self, images: Sequence[Tensor]) -> List[Tuple[Tensor, KP]]:
        """(depth, kp) of each image batch; batches of one size run as one batch (one pass per network),
        except under official rounding (a convolution's rounding can depend on the batch size)."""
        same_size = all(im.shape[1:] == images[0].shape[1:] for im in images)
        if len(images) > 1 and same_size and not self.official_rounding:
            sizes = [im.shape[0] for im in images]
            stacked = torch.cat(list(images), dim=0)
            depth = self.depth(stacked)
            kp = self.keypoints(stacked, depth)
            depths = depth.split(sizes)
            kps = [dict(zip(kp, values)) for values in zip(*(v.split(sizes) for v in kp.values()))]
            return list(zip(depths, kps))
        out = []
        for im in images:
            depth = self.depth(im)
            out.append((depth, self.keypoints(im, depth)))
        return out

    def prepare_source(self, source: Tensor) -> PreparedSource:
        """Runs the source-only work once (depth, keypoints, generator features); pass the result as
        ``source`` to ``forward``/``animate`` for every driving frame of that source."""
        self._check_image("source", source)
        depth = self.depth(source)
        kp = self.keypoints(source, depth)
        return PreparedSource(source, depth, kp, self.generator.encode_source(source, depth))

    def _source_and_frames(self, source, frames: Sequence[Tensor]):
        """(PreparedSource-like tuple, [(depth, kp) of each frame]) with one batched pass where possible."""
        if isinstance(source, PreparedSource):
            return source, None, self._analyze(frames)
        results = self._analyze([source, *frames])
        depth, kp = results[0]
        return PreparedSource(source, depth, kp, {}), source, results[1:]

    def _generate(self, prepared: PreparedSource, source_image: Optional[Tensor], kp_driving: KP,
                  driving_depth: Tensor, return_attention: bool) -> Dict[str, Any]:
        out = self.generator(source_image, kp_driving=kp_driving, kp_source=prepared.kp, source_depth=prepared.depth,
                             driving_depth=driving_depth, source_features=prepared.features or None,
                             return_attention=return_attention)
        out["kp_source"] = prepared.kp
        out["depth_source"] = prepared.depth
        out["depth_driving"] = driving_depth
        return out

    # ------------------------------------------------------------------ inference
    def forward(self, source: Union[Tensor, PreparedSource], driving: Tensor, *,
                return_attention: bool = False) -> Dict[str, Any]:
        """Absolute motion: the driving keypoints drive the source as they are.

        source (B or 1,3,H,W) float in [0,1] (or ``prepare_source(source)``), driving (B,3,H',W') ->
        {"prediction": (B,3,H,W), "deformation": (B,h,w,2), "occlusion_map": (B,1,h,w), "mask":
        (B,K+1,h,w), "sparse_deformed", "deformed": (B,3,H,W), "kp_source", "kp_driving" (kp dicts),
        "depth_source": (B or 1,1,H,W), "depth_driving": (B,1,H',W')} (+ "attention" (B,N,N) on request).
        """
        self._check_image("driving", driving)
        if not isinstance(source, PreparedSource):
            self._check_image("source", source)
        self._check_batch("source", source.image if isinstance(source, PreparedSource) else source, driving.shape[0])
        prepared, image, ((depth_d, kp_d),) = self._source_and_frames(source, [driving])
        out = self._generate(prepared, image, kp_d, depth_d, return_attention)
        out["kp_driving"] = kp_d
        return out

    def animate(self, source: Union[Tensor, PreparedSource], driving: Tensor,
                driving_initial: Union[Tensor, KP, None] = None, *, relative: bool = True,
                adapt_scale: bool = False, return_attention: bool = False) -> Dict[str, Any]:
        """The official animation: relative keypoints and relative Jacobians (``normalize_kp``).

        source (B or 1,3,H,W) (or ``prepare_source(source)``), driving (B,3,H,W), driving_initial: the
        reference driving frame (B or 1,3,H,W) (the first frame, or the one whose pose best matches the
        source), or its keypoints (``keypoints(frame)``), needed when ``relative``. ``adapt_scale``:
        scale the motion by sqrt(source hull area / initial hull area). Returns ``forward``'s dict with
        "kp_driving" (detected), "kp_norm" (what drove the generator) and "kp_driving_initial".
        """
        self._check_image("driving", driving)
        batch = driving.shape[0]
        if not isinstance(source, PreparedSource):
            self._check_image("source", source)
        self._check_batch("source", source.image if isinstance(source, PreparedSource) else source, batch)
        frames = [driving]
        kp_initial = None
        if relative:
            if driving_initial is None:
                raise ValueError("animate: relative=True needs driving_initial (the first driving frame, or the "
                                 "driving frame whose pose best matches the source); or pass relative=False")
            if isinstance(driving_initial, dict):
                kp_initial = driving_initial
                if "value" not in kp_initial:
                    raise ValueError("animate: driving_initial as keypoints must be a dict with 'value' "
                                     "(and 'jacobian'), as returned by model.keypoints(frame)")
                self._check_batch("driving_initial keypoints", kp_initial["value"], batch)
            else:
                self._check_image("driving_initial", driving_initial)
                self._check_batch("driving_initial", driving_initial, batch)
                frames.append(driving_initial)
        prepared, image, results = self._source_and_frames(source, frames)
        depth_d, kp_d = results[0]
        if relative and kp_initial is None:
            kp_initial = results[1][1]
        kp_norm = normalize_kp(prepared.kp, kp_d, kp_initial, adapt_movement_scale=adapt_scale,
                               use_relative_movement=relative, use_relative_jacobian=relative,
                               inverse=self.jacobian_inverse)
        out = self._generate(prepared, image, kp_norm, depth_d, return_attention)
        out["kp_driving"] = kp_d
        out["kp_norm"] = kp_norm
        if kp_initial is not None:
            out["kp_driving_initial"] = kp_initial
        return out

    # ------------------------------------------------------------------ inference-time folding
    @torch.no_grad()
    def optimize_for_inference(self, channels_last: Optional[bool] = None) -> "DaGAN":
        """Folds the model for inference, in place; returns self. Equal to the unfolded model up to
        rounding: ~1e-11 in float64; in float32 at 256x256 with random weights 2e-7 (plain) and 1e-5
        (SPADE, whose decoder amplifies the rounding of the motion field; the unfolded float32 model is
        as far from the float64 result).

        - eval BatchNorm merged into the convolution before it (SameBlock2d, DownBlock2d, UpBlock2d,
          ResBlock2d's norm2, every ResNet conv/bn pair); ResBlock2d's pre-activation norm1 stays;
        - spectral-norm convolutions become plain ones with the precomputed weight (stored u, v);
        - heads on one input fused (kp + jacobian, mask + occlusion, SPADE gamma + beta);
        - the depth decoder computes only scale 0;
        - ``channels_last`` (default: when the model is on the CPU): convolution weights in channels-last
          memory format, so the convolutions run NHWC (oneDNN's fast layout; ~15% faster on a CPU).
          Inputs may stay NCHW; the outputs are returned contiguous.
        Training afterwards is not supported: ``train()`` raises. Save (``save``) before optimizing, and
        optimize after loading.
        """
        if self.inference_only:
            return self
        self.eval()
        fold_module(self.depth_encoder)
        fold_module(self.depth_decoder)
        fold_module(self.kp_detector)
        fold_module(self.generator)
        for module in self.modules():
            if isinstance(module, SPADEResnetBlock):
                module.to_inference()
            elif isinstance(module, (KPDetector, DenseMotionNetwork)):
                module.fuse_heads()
        self.depth_decoder.scales = (0,)
        if channels_last is None:
            channels_last = self._reference_param().device.type == "cpu"
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.inference_only = True
        for child in (self.depth_encoder, self.depth_decoder, self.kp_detector, self.generator):
            child.train = types.MethodType(_refuse_training, child)
        return self

    def train(self, mode: bool = True) -> "DaGAN":
        """nn.Module.train, refused (RuntimeError) after ``optimize_for_inference``."""
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError("DaGAN.train(): this model went through optimize_for_inference() (BatchNorm folded, "
                               "spectral norm frozen) and cannot be trained; load the original weights again "
                               "(DaGAN.load / DaGAN.from_official) to train")
        return super().train(mode)

    def extra_repr(self) -> str:
        c = self.config
        return (f"generator={c['generator']!r}, depth_layers={c['depth_layers']}, num_kp={c['num_kp']}, "
                f"inference_only={self.inference_only}")
