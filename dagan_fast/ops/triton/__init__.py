"""Triton kernels (``@triton.jit`` functions and their launchers), one module per op. Importing a
module registers its kernels with the ``triton`` backend; ``dagan_fast.ops._backends`` imports this
package lazily, on first use, so that ``import dagan_fast`` never imports Triton."""
from . import attention, motion, warp  # noqa: F401
