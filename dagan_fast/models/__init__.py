"""dagan_fast.models: the official DaGAN networks (attribute names match the released state_dicts)
and the ``DaGAN`` wrapper, plus ``DaGANpp`` (built from the DaGAN++ paper). The warp, attention and
motion run through ``dagan_fast.ops``."""
from .blocks import (AntiAliasInterpolation2d, DownBlock2d, Hourglass, ResBlock2d, SameBlock2d, SPADE,
                     SPADEResnetBlock, SpectralNormConv2d, UpBlock2d)
from .dagan import DEFAULT_CONFIG, DaGAN, PreparedSource, convex_hull_area, make_config, normalize_kp, relative_motion
from .daganpp import DaGANpp, DaGANppConfig, DaGANppGenerator, GeometryAttention, parameter_breakdown, parameter_table
from .dense_motion import DenseMotionNetwork
from .depth import DepthDecoder, ResnetEncoder
from .discriminator import Discriminator, MultiScaleDiscriminator, kp2gaussian
from .generator import DepthAwareGenerator, SPADEDepthAwareGenerator, SPADEGenerator
from .keypoints import KPDetector

__all__ = [
    "AntiAliasInterpolation2d", "DEFAULT_CONFIG", "DaGAN", "DaGANpp", "DaGANppConfig", "DaGANppGenerator",
    "DenseMotionNetwork", "GeometryAttention", "parameter_breakdown", "parameter_table", "DepthAwareGenerator",
    "DepthDecoder", "Discriminator", "DownBlock2d", "Hourglass", "KPDetector", "MultiScaleDiscriminator",
    "PreparedSource", "ResBlock2d", "ResnetEncoder", "SameBlock2d", "SPADE", "SPADEDepthAwareGenerator",
    "SPADEGenerator", "SPADEResnetBlock", "SpectralNormConv2d", "UpBlock2d", "convex_hull_area", "kp2gaussian",
    "make_config", "normalize_kp", "relative_motion",
]
