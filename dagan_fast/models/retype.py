"""In-place class swaps of submodules (the fast and packed convolution variants of nn.Conv2d)."""
import torch.nn as nn


def retype_modules(module: nn.Module, eligible, cls: type) -> int:
    """Gives every submodule of ``module`` for which ``eligible(m)`` holds the class ``cls`` in place (a
    subclass adding no state: parameters, buffers and state_dict unchanged); returns how many."""
    count = 0
    for m in module.modules():
        if eligible(m):
            m.__class__ = cls
            count += 1
    return count
