"""dagan_fast: a fast, faithful runtime for depth-aware talking-head generation (DaGAN, DaGAN++).

Imports with no GPU, no Triton and no compiled library; the ops then run their PyTorch reference.
"""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
from . import checkpoints  # noqa: E402  (safetensors is imported lazily, inside its functions)
from .models import DaGAN, DaGANpp  # noqa: E402

__all__ += ["DaGAN", "DaGANpp", "checkpoints"]
from .streaming import Animator  # noqa: E402  (cv2, face detection and tqdm are imported lazily)

__all__ += ["Animator"]
