"""dagan_fast.nn: drop-in modules built on ``dagan_fast.ops`` (the fastest backend runs them)."""
from .attention import CrossModalAttention

__all__ = ["CrossModalAttention"]
