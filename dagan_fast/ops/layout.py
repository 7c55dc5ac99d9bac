"""Memory-layout queries shared by the ops and the models."""
import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether the 4-d tensor ``x`` (B,C,H,W) is stored channels_last and not also plain contiguous (so a
    result meant to match its layout must be made channels_last explicitly; C == 1 or H == W == 1 counts as
    contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
