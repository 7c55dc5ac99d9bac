"""Streaming: ``Animator`` (source work once, one output per driving frame) and the One-Euro keypoint
smoothing it applies (``smoothing``)."""
from .animator import DEFAULT_BEST_FRAMES, DEFAULT_SIZE, MODEL_REQUIRED_MESSAGE, Animator, load_model
from .smoothing import KeypointSmoother, OneEuroFilter

__all__ = ["Animator", "load_model", "DEFAULT_SIZE", "DEFAULT_BEST_FRAMES", "MODEL_REQUIRED_MESSAGE",
           "KeypointSmoother", "OneEuroFilter"]
