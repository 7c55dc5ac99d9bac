"""dagan_fast.nn: drop-in modules built on ``dagan_fast.ops`` (the fastest backend runs them)."""
from .attention import CrossModalAttention
from .patching import PatchReport, patch, unpatch
from .warp import FusedWarp

__all__ = ["CrossModalAttention", "DenseMotionNetwork", "FusedWarp", "PatchReport", "patch", "unpatch"]


def __getattr__(name):
    # DenseMotionNetwork lives with the models (they import this package, so it is resolved lazily)
    if name == "DenseMotionNetwork":
        from ..models.dense_motion import DenseMotionNetwork
        return DenseMotionNetwork
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
