"""Turns a training run into a model file for users:
``python -m training.release --run runs/tiny --out dagan_fast/weights/dagan_tiny_synthetic.safetensors``.

Takes the run's ``checkpoint.safetensors`` (written by ``training.train``), drops what only training needs
(the discriminator), records the image size the model was trained at (``Animator`` and ``dagan-fast animate``
then run it at that size by default) and writes a plain DaGAN / DaGAN++ file that ``dagan_fast.checkpoints.load``
reads. The weights are copied bit for bit.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from dagan_fast import checkpoints

from .train import MODEL_FILE


def release(checkpoint: str, out: str, image_size: int) -> str:
    """Writes the user model of ``checkpoint`` (a training model file) to ``out``; returns ``out``.
    ``image_size``: the side (pixels) the model was trained at, recorded in the file."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"release: image_size must be a positive int, got {image_size!r}")
    trained = checkpoints.load(checkpoint)
    config = dict(trained.config)
    if "discriminator" in config:
        config["discriminator"] = None
    model = type(trained)(config)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("discriminator.")}
    checkpoints.load_checked(model, state, checkpoint, "model")
    model.image_size = image_size
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    checkpoints.save(model, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``python -m training.release``; returns the exit code."""
    from .configs import load_config

    p = argparse.ArgumentParser(prog="python -m training.release", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory of `python -m training.train` (its --out)")
    p.add_argument("--config", default="tiny", help="the run's config, for its image size (default: tiny)")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    args = p.parse_args(argv)
    size = int(load_config(args.config)["data"]["size"])
    path = release(os.path.join(args.run, MODEL_FILE), args.out, size)
    print(f"{path}: {os.path.getsize(path) / 2 ** 20:.2f} MiB, trained at {size}x{size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
