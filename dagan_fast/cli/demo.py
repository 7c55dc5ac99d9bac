"""The ``dagan-fast demo`` job, README's main job: the bundled trained model animating the bundled portrait.

Offline and self-contained: the source is the astronaut portrait that ships with scikit-image, the driving
video a synthetic talking-head clip (``dagan_fast.media.synthetic``) of a face the bundled model never saw in
training, and the model the bundled tiny DaGAN (``dagan_fast.checkpoints.pretrained``), run through ``Animator.stream``
frame by frame as a live user would. A second pass drives the astronaut with a synthetic clip of herself,
where the ground truth is known, and compares the result with the trivial answer "return the source frame".
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .ops_demo import DemoError, _label, prepare_out_dir, write_animation

__all__ = ["run_demo", "summary_text", "DemoError", "DRIVING_FACE", "DISPLAY_SIZE"]

#: Which held-out face drives the portrait: an index into ``split_faces(face_images(size), "test")``, the faces
#: the bundled model never saw in training.
DRIVING_FACE = -1
#: Side of each panel in the written animation (the tiny model runs at 64x64; panels are upscaled to show).
DISPLAY_SIZE = 192
DRIVING_SEED = 2024
SELF_SEED = 7


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T,3,S,S) floats in [0,1] -> (T,S,S,3) uint8, by ``media.video.to_uint8``'s rules."""
    from ..media.video import to_uint8

    return np.stack([to_uint8(frame) for frame in frames])


def _show(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(image, (DISPLAY_SIZE, DISPLAY_SIZE), interpolation=cv2.INTER_CUBIC)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image stacks of one shape (data range 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def _stream(animator, frames: np.ndarray, progress: bool, desc: str):
    from tqdm.auto import tqdm

    outputs, seconds = [], []
    began = time.perf_counter()
    for out in tqdm(animator.stream(iter(frames)), total=len(frames), desc=desc, unit="frame", disable=not progress):
        now = time.perf_counter()
        seconds.append(now - began)
        began = now
        outputs.append(out)
    return np.stack(outputs), seconds


def run_demo(out_dir: str = "demo_out", frames: int = 48, checkpoint: Optional[str] = None,
             progress: bool = True) -> Dict[str, object]:
    """Runs the demo and writes ``animation.gif`` (source | driving | result, each DISPLAY_SIZE wide),
    ``frames.png`` (a few frames of the same) and ``summary.txt`` into ``out_dir``.

    ``frames``: driving frames (>= 2). ``checkpoint``: a dagan_fast model file instead of the bundled model
    (it must run at the size it records, or 256). Returns a dict with the paths, ``size``, ``frames``,
    ``per_frame_ms`` (median streaming time per frame after the first), ``fps``, and the self-reenactment
    check ``self_psnr`` (result vs ground truth) and ``baseline_psnr`` (source frame vs ground truth), in dB.
    Raises DemoError for bad arguments or an unwritable ``out_dir``."""
    from ..streaming import Animator, load_model
    from ..media.synthetic import face_images, make_clip, split_faces

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise DemoError(f"frames must be an integer >= 2, got {frames!r}")
    path = prepare_out_dir(out_dir)
    model = load_model(checkpoint)
    size = int(getattr(model, "image_size", None) or 256)
    faces = face_images(size)
    source_face, driving_face = faces[0], split_faces(faces, "test")[DRIVING_FACE]
    source = _to_uint8(source_face.image[None])[0]

    driving = _to_uint8(make_clip(driving_face, frames, DRIVING_SEED)["frames"])
    animator = Animator(model, source, size=size, reference="first")
    result, seconds = _stream(animator, driving, progress, "demo")

    # Self-reenactment: the astronaut driven by her own clip; its frame 0 is her neutral pose, the source.
    truth = _to_uint8(make_clip(source_face, frames, SELF_SEED)["frames"])
    animator.set_source(truth[0])
    rebuilt, _ = _stream(animator, truth, progress, "self-reenactment")

    panels = [np.concatenate([_show(source), _show(d), _show(r)], axis=1) for d, r in zip(driving, result)]
    info: Dict[str, object] = {
        "out_dir": path, "size": size, "frames": frames, "model": checkpoint or "bundled tiny DaGAN",
        "driving_face": driving_face.name,
        "per_frame_ms": 1000.0 * float(np.median(seconds[1:])), "first_frame_ms": 1000.0 * seconds[0],
        "threads": torch.get_num_threads(),
        "self_psnr": psnr(rebuilt[1:], truth[1:]),
        "baseline_psnr": psnr(np.broadcast_to(truth[0], truth[1:].shape), truth[1:]),
    }
    info["fps"] = 1000.0 / max(info["per_frame_ms"], 1e-9)
    try:
        import imageio.v3 as iio

        info["animation"], info["animation_format"] = write_animation(panels, path)
        shown = sorted({int(round(f * (frames - 1))) for f in (0.2, 0.4, 0.6, 0.8)})
        label_h = 16
        rows = [_label(panels[i], f"frame {i}: source | driving | result", label_h) for i in shown]
        info["frames_png"] = f"{path}/frames.png"
        iio.imwrite(info["frames_png"], np.concatenate(rows, axis=0))
        info["summary"] = f"{path}/summary.txt"
        with open(info["summary"], "w", encoding="utf-8") as fh:
            fh.write(summary_text(info) + "\n")
    except OSError as exc:
        raise DemoError(f"cannot write the outputs to {path!r}: {exc.strerror or exc}") from None
    return info


def summary_text(info: Dict[str, object]) -> str:
    """The lines ``dagan-fast demo`` prints and writes to summary.txt, from ``run_demo``'s result."""
    lines: List[str] = [
        f"dagan-fast demo: {info['model']} at {info['size']}x{info['size']}, {info['frames']} frames",
        f"  source: the astronaut (skimage.data.astronaut); driving: a synthetic clip of {info['driving_face']} "
        "(a face outside the bundled model's training set)",
        f"  streaming: {info['per_frame_ms']:.1f} ms per frame median ({info['fps']:.1f} fps; first frame "
        f"{info['first_frame_ms']:.0f} ms), CPU threads: {info['threads']}",
        f"  self-reenactment (astronaut driven by her own synthetic clip): PSNR {info['self_psnr']:.2f} dB vs "
        f"{info['baseline_psnr']:.2f} dB for returning the source frame",
    ]
    for key, what in (("animation", "source | driving | result"), ("frames_png", "a few frames"),
                      ("summary", "this summary")):
        if key in info:
            lines.append(f"  {info[key]}  ({what})")
    return "\n".join(lines)
