"""dagan_fast.nn: drop-in modules built on ``dagan_fast.ops`` (the fastest backend runs them)."""
from .attention import CrossModalAttention
from .warp import FusedWarp

__all__ = ["CrossModalAttention", "FusedWarp"]
