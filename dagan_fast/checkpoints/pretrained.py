"""The trained model that ships inside the package, used when no checkpoint is given.

``dagan_tiny_synthetic.safetensors``: the ``tiny`` training configuration of DaGAN (64x64, 10 keypoints,
depth network of width 16) trained on this machine's CPU with ``training.train_depth`` and ``training.train``
on synthetic talking-head clips of the faces scikit-image ships (see README, "The bundled model"). It is small
and low-resolution: it makes the library work out of the box; animating real videos well needs the authors'
checkpoints or a model trained on real face videos.
"""
from __future__ import annotations

import os

import torch.nn as nn

__all__ = ["DEFAULT_MODEL_FILE", "default_model_path", "load_default"]

DEFAULT_MODEL_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                                  "dagan_tiny_synthetic.safetensors")


def default_model_path() -> str:
    """Path of the bundled model file; FileNotFoundError (saying how to get a model) when the install lacks it."""
    if not os.path.isfile(DEFAULT_MODEL_FILE):
        raise FileNotFoundError(
            f"the bundled model {DEFAULT_MODEL_FILE} is missing from this install (reinstall dagan_fast from its "
            "repository), or pass a model: a dagan_fast .safetensors file, or the DaGAN authors' .pth.tar with "
            "its encoder.pth and depth.pth")
    return DEFAULT_MODEL_FILE


def load_default(map_location="cpu") -> nn.Module:
    """The bundled tiny DaGAN in eval mode; its ``image_size`` (64) is the side it runs at. Input and output
    images are (B,3,64,64) floats in [0,1]."""
    from .io import load

    return load(default_model_path(), map_location=map_location, model="DaGAN")
