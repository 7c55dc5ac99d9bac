"""dagan_fast: a fast, faithful runtime for depth-aware talking-head generation (DaGAN, DaGAN++).

Imports with no GPU, no Triton and no compiled library; the ops then run their PyTorch reference.

Core: ``ops`` (the fused kernels and their reference), ``models``, ``nn`` (drop-in modules), ``checkpoints``,
``streaming`` (``Animator``). User-facing: ``media`` (video, faces) and ``cli`` (the ``dagan-fast`` command).
"""
from . import _compat, ops

from ._version import __version__  # noqa: E402

from . import checkpoints  # noqa: E402  (safetensors is imported lazily, inside its functions)
from .models import DaGAN, DaGANpp  # noqa: E402
from .nn import PatchReport, patch, unpatch  # noqa: E402
from .streaming import Animator  # noqa: E402  (cv2, face detection and tqdm are imported lazily)

__all__ = ["ops", "checkpoints", "DaGAN", "DaGANpp", "Animator", "patch", "unpatch", "PatchReport", "__version__"]

_compat.install()


def __getattr__(name: str):
    # `from dagan_fast import video` (an old path) resolves through the moved-module aliases
    module = _compat.moved_attribute(name)
    if module is None:
        raise AttributeError(f"module 'dagan_fast' has no attribute {name!r}")
    return module
