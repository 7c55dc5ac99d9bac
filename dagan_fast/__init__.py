"""dagan_fast: a fast, faithful runtime for depth-aware talking-head generation (DaGAN, DaGAN++).

Imports with no GPU, no Triton and no compiled library; the ops then run their PyTorch reference.
"""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
