"""DaGAN++ (Hong, Shen, Xu: "DaGAN++: Depth-Aware Generative Adversarial Network for Talking Head Video
Generation", 2023), built from the paper (sections 3.2-3.5, Fig. 4-5): no code or checkpoint of it is public.

Pieces and where they come from:

* depth network: DaGAN's (monodepth2 ``ResnetEncoder`` + ``DepthDecoder``, section 3.5: "consistent with
  DaGAN"); the uncertainty head of section 3.2.2 belongs to the pose network used only to train it.
* geometry-guided keypoint detector (eq. 9): DaGAN's ``KPDetector`` on RGB + depth, K = 15, with Jacobians.
* Taylor motion (eq. 10) and the dense motion module with occlusion (eq. 11): DaGAN's
  ``DenseMotionNetwork`` (``ops.sparse_motion_inputs`` + ``ops.dense_motion``).
* ``DaGANppGenerator`` (3.3, 3.5): a feature encoder of three down-blocks giving four scales and a depth
  encoder of identical structure; at every scale i the encoder feature is warped by the motion field and
  multiplied by the occlusion map, both resized to that scale (eq. 12, ``ops.warp_occlusion``), then
  enhanced by cross-modal attention, query from the warped appearance feature, key and value from the
  depth feature of that scale, plus the warped feature (eq. 13, ``ops.cross_modal_attention`` with its
  residual epilogue: flash attention, the N x N matrix is never built; 65536 tokens at 256x256). The
  decoder (3.3.3, Fig. 5e) runs res-blocks on the coarsest enhanced feature, then per finer scale: an
  up-block, concatenation with that scale's enhanced feature, a 3x3 conv block; a final 7x7 conv + sigmoid.

Choices the paper leaves open, made here: projections are plain 1x1 convolutions (eq. 13 has no ReLU and
no learnable gamma), Dqk = C / 8 as in DaGAN, and the scores are scaled by 1/sqrt(Dqk) (eq. 13 shows none;
``attention_scale`` sets it). With the default configuration (5 middle res-blocks at 512 channels) the
keypoint detector and generator hold 82.3M parameters; with DaGAN's discriminator (2.8M) that is the 85.2M
of the paper, counted as the paper counts DaGAN's 63.1M (keypoint detector + generator + discriminator;
the depth network is trained beforehand and frozen). ``parameter_table`` prints the breakdown.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.layout import is_channels_last as _is_channels_last
from ..ops.reference import materialized_attention
from .blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d
from .dagan import DaGAN, _lcm
from .dense_motion import DenseMotionNetwork
from .depth import RESNET_LAYOUTS, DepthDecoder, ResnetEncoder
from .generator import _match_batch, _match_kp, _resize_deformation, _resize_map, warp_features
from .keypoints import KPDetector
from .registry import register_model

Tensor = torch.Tensor
KP = Dict[str, Tensor]

#: The paper's parameter count of DaGAN++ (section 3.5), trainable parameters with the depth network frozen.
PAPER_PARAMETERS = 85.2e6


def _kp_defaults() -> Dict[str, Any]:
    return {"block_expansion": 32, "max_features": 1024, "num_blocks": 5, "temperature": 0.1, "scale_factor": 0.25,
            "pad": 0}


def _dense_motion_defaults() -> Dict[str, Any]:
    return {"block_expansion": 64, "max_features": 1024, "num_blocks": 5, "scale_factor": 0.25, "kp_variance": 0.01}


@dataclass
class DaGANppConfig:
    """DaGAN++ hyper-parameters; the defaults are the paper's model at 256x256.

    ``kp_detector`` / ``dense_motion_params``: as in DaGAN's config (same keys). ``block_expansion`` and
    ``max_features``: channels of the feature and depth encoders, min(max_features, block_expansion * 2^i)
    at scale 1/2^i, i = 0..``num_down_blocks`` (64, 128, 256, 512). ``num_bottleneck_blocks``: res-blocks in
    the middle of the decoder. ``qk_ratio``: Dqk = C // qk_ratio per attention layer. ``attention_scale``:
    None for 1/sqrt(Dqk). ``max_kv_tokens``: None (the paper: every depth-feature pixel is a key), or a cap
    on the keys/values per layer, taken from an average-pooled depth feature where it has more pixels.
    """

    num_kp: int = 15
    num_channels: int = 3
    depth_layers: int = 18
    depth_width: int = 64
    estimate_jacobian: bool = True
    estimate_occlusion_map: bool = True
    kp_detector: Dict[str, Any] = field(default_factory=_kp_defaults)
    dense_motion_params: Dict[str, Any] = field(default_factory=_dense_motion_defaults)
    block_expansion: int = 64
    max_features: int = 512
    num_down_blocks: int = 3
    num_bottleneck_blocks: int = 5
    qk_ratio: int = 8
    attention_scale: Optional[float] = None
    max_kv_tokens: Optional[int] = None


def make_daganpp_config(config: Union[None, DaGANppConfig, Dict[str, Any]] = None, **overrides) -> DaGANppConfig:
    """A validated DaGANppConfig: the defaults updated by ``config`` (a DaGANppConfig or a dict) then
    ``overrides``; ``kp_detector`` and ``dense_motion_params`` dicts are merged key by key."""
    merged = dataclasses.asdict(DaGANppConfig())
    names = set(merged)
    if isinstance(config, DaGANppConfig):
        config = dataclasses.asdict(config)
    for source in (config or {}, overrides):
        for key, value in source.items():
            if key not in names:
                raise ValueError(f"DaGANpp config: unknown key {key!r} (known: {', '.join(sorted(names))})")
            if isinstance(merged[key], dict):
                if not isinstance(value, dict):
                    raise TypeError(f"DaGANpp config: {key} must be a dict, got {type(value).__name__}")
                unknown = set(value) - set(merged[key])
                if unknown:
                    raise ValueError(f"DaGANpp config: unknown {key} keys {sorted(unknown)}")
                merged[key].update(value)
            else:
                merged[key] = value
    cfg = DaGANppConfig(**merged)
    positive = ("num_kp", "num_channels", "block_expansion", "max_features", "num_down_blocks", "qk_ratio")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"DaGANpp config: {name} must be a positive int, got {value!r}")
    if not isinstance(cfg.num_bottleneck_blocks, int) or cfg.num_bottleneck_blocks < 0:
        raise ValueError(f"DaGANpp config: num_bottleneck_blocks must be an int >= 0, "
                         f"got {cfg.num_bottleneck_blocks!r}")
    if cfg.depth_layers not in RESNET_LAYOUTS:
        raise ValueError(f"DaGANpp config: depth_layers must be one of {sorted(RESNET_LAYOUTS)}, "
                         f"got {cfg.depth_layers!r}")
    if cfg.max_kv_tokens is not None and (not isinstance(cfg.max_kv_tokens, int) or cfg.max_kv_tokens < 1):
        raise ValueError(f"DaGANpp config: max_kv_tokens must be None or an int >= 1, got {cfg.max_kv_tokens!r}")
    if cfg.attention_scale is not None and not (isinstance(cfg.attention_scale, (int, float))
                                                and math.isfinite(cfg.attention_scale)):
        raise ValueError(f"DaGANpp config: attention_scale must be None or a finite number, "
                         f"got {cfg.attention_scale!r}")
    return cfg


def pooled_size(h: int, w: int, max_tokens: Optional[int]) -> Tuple[int, int]:
    """The (h', w') a depth feature (h, w) is average-pooled to so that h' * w' <= ``max_tokens``: the
    smallest integer factor f with ceil(h/f) * ceil(w/f) <= max_tokens; (h, w) when it fits or no cap."""
    if max_tokens is None or h * w <= max_tokens:
        return h, w
    f = max(1, math.floor(math.sqrt(h * w / max_tokens)))
    while math.ceil(h / f) * math.ceil(w / f) > max_tokens:
        f += 1
    return math.ceil(h / f), math.ceil(w / f)


def _tokens(x: Tensor) -> Tensor:
    """(B,C,H,W) -> (B,H*W,C), a view when x is NCHW-contiguous."""
    return x.flatten(2).transpose(1, 2)


def _project(tokens: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 conv in token layout: (B,N,Cin) -> (B,1,N,Cout) contiguous, one GEMM."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias).unsqueeze(1)


class GeometryAttention(nn.Module):
    """Cross-modal geometry enhancement of one layer (eq. 13): F_en = softmax(Q K^T * scale) V + F_w with
    Q = query_conv(F_w) (the warped appearance feature), K = key_conv(F_depth), V = value_conv(F_depth),
    1x1 convolutions, one head.

    warped (B,C,H,W), depth feature (B,Cd,Hd,Wd) -> (B,C,H,W). Dqk = C // qk_ratio. ``max_kv_tokens``:
    keys/values from the depth feature average-pooled to at most that many pixels (None: all Hd*Wd).
    Runs ``ops.cross_modal_attention`` (never an N x Nk matrix) unless ``materialize`` is set (the naive
    matmul-softmax-matmul, for tests and as the plain-PyTorch baseline at sizes where it fits).
    """

    def __init__(self, channels: int, depth_channels: Optional[int] = None, qk_ratio: int = 8,
                 scale: Optional[float] = None, max_kv_tokens: Optional[int] = None):
        super().__init__()
        depth_channels = channels if depth_channels is None else depth_channels
        qk_dim = max(1, channels // qk_ratio)
        self.scale = 1.0 / math.sqrt(qk_dim) if scale is None else float(scale)
        self.max_kv_tokens = max_kv_tokens
        self.query_conv = nn.Conv2d(channels, qk_dim, kernel_size=1)
        self.key_conv = nn.Conv2d(depth_channels, qk_dim, kernel_size=1)
        self.value_conv = nn.Conv2d(depth_channels, channels, kernel_size=1)
        self.materialize = False

    def keys_values(self, depth_feature: Tensor) -> Tuple[Tensor, Tensor]:
        """(K (B,1,Nk,Dqk), V (B,1,Nk,C)) of a depth feature (B,Cd,Hd,Wd); depends on the source only,
        so callers cache it (``DaGANppGenerator.encode_source``)."""
        size = pooled_size(depth_feature.shape[2], depth_feature.shape[3], self.max_kv_tokens)
        if size != tuple(depth_feature.shape[2:]):
            depth_feature = F.adaptive_avg_pool2d(depth_feature, size)
        tokens = _tokens(depth_feature)
        return _project(tokens, self.key_conv), _project(tokens, self.value_conv)

    def forward(self, warped: Tensor, depth_feature: Optional[Tensor] = None, *,
                kv: Optional[Tuple[Tensor, Tensor]] = None,
                return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """warped (B,C,H,W); ``depth_feature`` (B,Cd,Hd,Wd), or ``kv`` = ``keys_values(depth_feature)``
        computed already (batch 1 or B). ``return_attention``: also return the (B,N,Nk) map (materialised:
        small sizes only)."""
        if kv is None:
            if depth_feature is None:
                raise ValueError("GeometryAttention: pass depth_feature or kv=keys_values(depth_feature)")
            kv = self.keys_values(depth_feature)
        B, C, H, W = warped.shape
        k, v = (_match_batch(t, B) for t in kv)
        residual = _tokens(warped).unsqueeze(1)                # (B,1,N,C), a view of warped
        q = _project(residual.squeeze(1), self.query_conv)
        fmt = torch.channels_last if _is_channels_last(warped) else torch.contiguous_format
        attention = None
        if self.materialize or return_attention:
            out, attention = materialized_attention(q, k, v, self.scale, return_map=True)
            out = out + residual
        else:
            # the op adds the residual in its epilogue and lays the result out like it (NCHW), so the
            # view back to (B,C,H,W) below needs no copy
            out = ops.cross_modal_attention(q, k, v, self.scale, residual=residual)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W).contiguous(memory_format=fmt)
        if return_attention:
            return out, attention.squeeze(1)
        return out

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, max_kv_tokens={self.max_kv_tokens}"


class DaGANppGenerator(nn.Module):
    """The geometry-enhanced multi-layer generator (section 3.3, Fig. 4-5), same call as DaGAN's generators.

    Submodules: ``dense_motion_network``; the feature encoder ``first`` (7x7 SameBlock2d) + ``down_blocks``
    and the depth encoder ``depth_first`` + ``depth_down_blocks`` (identical structure; scales 1, 1/2, ...,
    1/2^num_down_blocks); ``attention`` (one GeometryAttention per scale, finest first); decoder
    ``bottleneck`` (ResBlock2d at the coarsest scale), ``up_blocks`` (UpBlock2d) and ``fuse_blocks``
    (3x3 SameBlock2d on the concatenation with the next finer enhanced feature), ``final`` (7x7 conv).

    forward(source_image (B or 1,3,H,W), kp_driving, kp_source, source_depth (B or 1,1,H,W)) ->
    {"prediction": (B,3,H,W) in (0,1), "deformation": (B,h,w,2), "occlusion_map": (B,1,h,w), "mask":
    (B,K+1,h,w), "sparse_deformed": (B,K+1,3,h,w), "deformed": (B,3,H,W)} (+ "attention": a list of
    (B,N_i,Nk_i) maps, finest first, with ``return_attention``). H, W multiples of 2^num_down_blocks.
    """

    def __init__(self, num_channels: int = 3, num_kp: int = 15, block_expansion: int = 64, max_features: int = 512,
                 num_down_blocks: int = 3, num_bottleneck_blocks: int = 5, estimate_occlusion_map: bool = True,
                 dense_motion_params: Optional[dict] = None, estimate_jacobian: bool = True, qk_ratio: int = 8,
                 attention_scale: Optional[float] = None, max_kv_tokens: Optional[int] = None):
        super().__init__()
        self.num_channels, self.num_kp, self.estimate_jacobian = num_channels, num_kp, estimate_jacobian
        params = _dense_motion_defaults()
        params.update(dense_motion_params or {})
        self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, num_channels=num_channels,
                                                       estimate_occlusion_map=estimate_occlusion_map, **params)
        ch = [min(max_features, block_expansion * (2 ** i)) for i in range(num_down_blocks + 1)]
        self.channels = ch
        self.first = SameBlock2d(num_channels, ch[0], kernel_size=7, padding=3)
        self.down_blocks = nn.ModuleList(DownBlock2d(ch[i], ch[i + 1]) for i in range(num_down_blocks))
        self.depth_first = SameBlock2d(1, ch[0], kernel_size=7, padding=3)
        self.depth_down_blocks = nn.ModuleList(DownBlock2d(ch[i], ch[i + 1]) for i in range(num_down_blocks))
        self.attention = nn.ModuleList(GeometryAttention(c, c, qk_ratio, attention_scale, max_kv_tokens) for c in ch)
        self.bottleneck = nn.Sequential()
        for i in range(num_bottleneck_blocks):
            self.bottleneck.add_module(f"r{i}", ResBlock2d(ch[-1], kernel_size=3, padding=1))
        self.up_blocks = nn.ModuleList(UpBlock2d(ch[i + 1], ch[i]) for i in reversed(range(num_down_blocks)))
        self.fuse_blocks = nn.ModuleList(SameBlock2d(2 * ch[i], ch[i], kernel_size=3, padding=1)
                                         for i in reversed(range(num_down_blocks)))
        self.final = nn.Conv2d(ch[0], num_channels, kernel_size=7, padding=3)

    @staticmethod
    def _pyramid(x: Tensor, first: nn.Module, blocks: nn.ModuleList) -> List[Tensor]:
        out = [first(x)]
        for block in blocks:
            out.append(block(out[-1]))
        return out

    def encode_source(self, source_image: Tensor, source_depth: Tensor) -> Dict[str, Any]:
        """Source-only work, reusable for every driving frame. source_image (B,3,H,W), source_depth
        (B,1,H,W) -> {"image": source_image, "small": (B,3,h,w) for the dense motion, "features": the
        encoder features [(B,C_i,H/2^i,W/2^i)], "kv": per layer (K (B,1,Nk_i,Dqk_i), V (B,1,Nk_i,C_i)) of
        the depth features}."""
        features = self._pyramid(source_image, self.first, self.down_blocks)
        depth_features = self._pyramid(source_depth, self.depth_first, self.depth_down_blocks)
        kv = [attn.keys_values(d) for attn, d in zip(self.attention, depth_features)]
        return {"image": source_image, "small": self.dense_motion_network.downsample(source_image),
                "features": features, "kv": kv}

    def forward(self, source_image: Optional[Tensor], kp_driving: KP, kp_source: KP,
                source_depth: Optional[Tensor] = None, driving_depth: Optional[Tensor] = None, *,
                source_features: Optional[Dict[str, Any]] = None, return_attention: bool = False) -> Dict[str, Any]:
        """See the class docstring. ``source_features``: ``encode_source(...)`` computed already (batch 1
        or B; then source_image and source_depth may be None). ``driving_depth`` is not used (the paper's
        generator sees the source depth only)."""
        if source_features is None:
            if source_image is None or source_depth is None:
                raise ValueError("DaGANppGenerator: pass source_image and source_depth, or source_features")
            source_features = self.encode_source(source_image, source_depth)
        src = source_features
        batch = kp_driving["value"].shape[0]
        kp_source = _match_kp(kp_source, batch)
        image = _match_batch(src["image"], batch)
        motion = self.dense_motion_network(image, kp_driving=kp_driving, kp_source=kp_source,
                                           source_small=_match_batch(src["small"], batch))
        deformation = motion["deformation"]
        occlusion = motion.get("occlusion_map")
        out: Dict[str, Any] = {"mask": motion["mask"].contiguous(), "sparse_deformed": motion["sparse_deformed"],
                               "deformation": deformation}
        if occlusion is not None:
            out["occlusion_map"] = occlusion
        grids: Dict[tuple, Tensor] = {}
        enhanced, maps = [], []
        for attn, feature, kv in zip(self.attention, src["features"], src["kv"]):
            feature = _match_batch(feature, batch)
            size = tuple(feature.shape[2:])
            grids[size] = grid = _resize_deformation(deformation, size)
            occ = _resize_map(occlusion, size) if occlusion is not None else None
            warped = warp_features(feature, grid, occ)                               # eq. 12
            result = attn(warped, kv=kv, return_attention=return_attention)           # eq. 13
            if return_attention:
                result, attention_map = result
                maps.append(attention_map)
            enhanced.append(result)
        x = self.bottleneck(enhanced[-1])
        for up, fuse, skip in zip(self.up_blocks, self.fuse_blocks, reversed(enhanced[:-1])):
            x = fuse(torch.cat([up(x), skip], dim=1))
        out["prediction"] = torch.sigmoid(self.final(x)).contiguous()
        size = tuple(image.shape[2:])
        grid = grids.get(size)
        if grid is None:
            grid = _resize_deformation(deformation, size)
        out["deformed"] = warp_features(image, grid).contiguous()
        if return_attention:
            out["attention"] = maps
        return out


@register_model
class DaGANpp(DaGAN):
    """DaGAN++ (see the module docstring), with DaGAN's interface.

    Submodules: ``depth_encoder``/``depth_decoder`` (DaGAN's depth network), ``kp_detector`` (KPDetector on
    RGB + depth), ``generator`` (DaGANppGenerator); ``discriminator`` is None. ``config``: a DaGANppConfig,
    a dict of its fields, or None, updated by ``overrides``; ``model.cfg`` is the DaGANppConfig and
    ``model.config`` its dict (stored in saved files). Images are float (B,3,H,W) in [0,1], H and W
    multiples of ``size_multiple`` (128 with the defaults).

    - ``model(source, driving)``: absolute motion -> {"prediction", "deformation", "occlusion_map", "mask",
      "sparse_deformed", "deformed", "kp_source", "kp_driving", "depth_source", "depth_driving"}.
    - ``model.animate(source, driving, driving_initial)``: DaGAN's relative motion transfer.
    - ``model.prepare_source(source)``: source depth, keypoints, encoder features and depth K/V, once.
    - ``model.save(path)``, ``DaGANpp.load(path)``: safetensors with the config in the metadata.
    - ``model.optimize_for_inference()``: BatchNorm folding, fused heads (as DaGAN).
    """

    def __init__(self, config: Union[None, DaGANppConfig, Dict[str, Any]] = None, **overrides):
        nn.Module.__init__(self)           # DaGAN.__init__ builds DaGAN's generator; the shared parts are built here
        cfg = make_daganpp_config(config, **overrides)
        self.cfg = cfg
        self.config = dataclasses.asdict(cfg)
        self.depth_encoder = ResnetEncoder(cfg.depth_layers, cfg.depth_width)
        self.depth_decoder = DepthDecoder(self.depth_encoder.num_ch_enc, width=cfg.depth_width)
        kp = cfg.kp_detector
        self.kp_detector = KPDetector(num_kp=cfg.num_kp, num_channels=cfg.num_channels + 1,
                                      estimate_jacobian=cfg.estimate_jacobian, **kp)
        self.generator = DaGANppGenerator(
            num_channels=cfg.num_channels, num_kp=cfg.num_kp, block_expansion=cfg.block_expansion,
            max_features=cfg.max_features, num_down_blocks=cfg.num_down_blocks,
            num_bottleneck_blocks=cfg.num_bottleneck_blocks, estimate_occlusion_map=cfg.estimate_occlusion_map,
            dense_motion_params=dict(cfg.dense_motion_params), estimate_jacobian=cfg.estimate_jacobian,
            qk_ratio=cfg.qk_ratio, attention_scale=cfg.attention_scale, max_kv_tokens=cfg.max_kv_tokens)
        self.discriminator = None
        dm = cfg.dense_motion_params
        self.size_multiple = _lcm(round(2 ** kp["num_blocks"] / kp["scale_factor"]),
                                  round(2 ** dm["num_blocks"] / dm["scale_factor"]), 32, 2 ** cfg.num_down_blocks)
        # the depth encoder reaches 1/32 and its decoder reflection-pads by 1 there: 2x2 at least
        self.min_size = max(self.size_multiple, 64)
        self.inference_only = False
        self.eval()

    @classmethod
    def from_official(cls, *args, **kwargs):
        """Not available: the DaGAN++ authors released no checkpoint (train one, or use ``DaGAN``)."""
        raise TypeError("DaGANpp.from_official: no official DaGAN++ checkpoint exists; DaGAN's release loads with "
                        "dagan_fast.DaGAN.from_official, and DaGAN++ files written by DaGANpp.save load with "
                        "DaGANpp.load")

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_kp={c.num_kp}, scales={c.num_down_blocks + 1}, max_kv_tokens={c.max_kv_tokens}, "
                f"inference_only={self.inference_only}")


# --------------------------------------------------------------------------------------------
# parameter breakdown
# --------------------------------------------------------------------------------------------
_FROZEN = ("depth_encoder", "depth_decoder")


def parameter_breakdown(model: nn.Module) -> List[Tuple[str, int, bool]]:
    """Per-module parameter counts of a DaGAN/DaGAN++ model: [(name, count, in_paper_count)], one row per
    child of the model and, for ``generator``, per child of the generator (``generator.<name>``).
    ``in_paper_count`` is False for the depth network, which the paper trains first and keeps frozen, and
    so leaves out of its trainable count (DaGAN: keypoint detector + generator + discriminator = 63.1M)."""
    rows: List[Tuple[str, int, bool]] = []
    for name, child in model.named_children():
        if child is None:
            continue
        if name == "generator":
            for sub_name, sub in child.named_children():
                rows.append((f"generator.{sub_name}", sum(p.numel() for p in sub.parameters()), True))
            own = sum(p.numel() for p in child.parameters(recurse=False))
            if own:
                rows.append(("generator (own)", own, True))
        else:
            rows.append((name, sum(p.numel() for p in child.parameters()), name not in _FROZEN))
    return rows


def parameter_table(model: nn.Module) -> str:
    """``parameter_breakdown`` as a printable table with the totals and the paper's 85.2M for comparison."""
    rows = parameter_breakdown(model)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'module':<{width}}{'parameters':>14}  counted"]
    for name, count, counted in rows:
        lines.append(f"{name:<{width}}{count:>14,}  {'yes' if counted else 'no (frozen)'}")
    total = sum(r[1] for r in rows)
    counted = sum(r[1] for r in rows if r[2])
    lines.append("-" * (width + 24))
    lines.append(f"{'total':<{width}}{total:>14,}")
    lines.append(f"{'trainable (paper count)':<{width}}{counted:>14,}  "
                 f"({counted / 1e6:.1f}M vs the paper's {PAPER_PARAMETERS / 1e6:.1f}M: "
                 f"{100 * (counted / PAPER_PARAMETERS - 1):+.1f}%)")
    return "\n".join(lines)
