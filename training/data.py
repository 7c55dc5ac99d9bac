"""Datasets of face videos for training.

Clip sources (``VideoClips`` over folders of frames or video files read with ``dagan_fast.media.video``, and
``training.synthetic.SyntheticClips``) share one interface: ``len(source)``, ``source.num_frames(i)``,
``source.frames(i, indices)`` -> (n,3,S,S) float32 in [0,1]. On top of them:

- ``PairDataset``: (source, driving) frames of one clip, for keypoint + generator training;
- ``TripletDataset``: consecutive frames (t-s, t, t+s), for depth training;
- ``Augment``: the official augmentation (FOMM's ``AllAugmentationTransform``): horizontal flip of all
  frames, time flip, colour jitter (brightness, contrast, saturation, hue 0.1) with one draw per sample;
- ``StepBatchSampler``: batches chosen from (seed, step) alone, so a resumed run sees exactly the
  batches an uninterrupted one would, and each rank of a distributed run gets its own slice.

Samples are addressed by ``(index, sample_seed)`` keys (a plain int index means sample_seed 0): all the
randomness of a sample (frame choice, augmentation) comes from (dataset seed, index, sample_seed).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dagan_fast.media.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, iter_frames, read_image, to_tensor

Tensor = torch.Tensor
Key = Union[int, Tuple[int, int]]


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


class VideoClips:
    """Face videos under ``root``: every sub-folder holding image frames (.png/.jpg/.jpeg/.bmp, natural
    order) and every video file (OpenCV-decodable: .mp4, .avi, ...) directly in ``root`` is one clip.
    Frames are centre-cropped to a square and resized to ``size`` (``dagan_fast.media.video.to_tensor``); the
    videos should be face crops already, as the official VoxCeleb preprocessing makes them.
    Clips with fewer than ``min_frames`` frames are skipped. Frame folders are read lazily (only the
    frames asked for); a video file is decoded once fully at construction to count its frames exactly
    (container counts can be off), then up to the last frame asked for on each read."""

    def __init__(self, root: str, size: int = 256, min_frames: int = 3):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"VideoClips: {root} is not a folder of videos")
        self.root, self.size = root, size
        self.clips: List[str] = []
        self._files: Dict[int, List[str]] = {}
        self._counts: Dict[int, int] = {}
        for name in sorted(os.listdir(root), key=_natural_key):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if os.path.isdir(path):
                files = [os.path.join(path, f) for f in sorted(os.listdir(path), key=_natural_key)
                         if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
                if len(files) >= min_frames:
                    self._files[len(self.clips)] = files
                    self._counts[len(self.clips)] = len(files)
                    self.clips.append(path)
            elif os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                index = len(self.clips)
                self.clips.append(path)
                if self.num_frames(index) < min_frames:
                    self.clips.pop()
                    self._counts.pop(index)
        if not self.clips:
            raise ValueError(f"VideoClips: no clip with at least {min_frames} frames in {root} (expected sub-folders "
                             f"of {'/'.join(IMAGE_EXTENSIONS)} frames or video files)")

    def __len__(self) -> int:
        return len(self.clips)

    def num_frames(self, index: int) -> int:
        """Frames in clip ``index``."""
        if index not in self._counts:
            self._counts[index] = sum(1 for _ in iter_frames(self.clips[index]))
        return self._counts[index]

    def frames(self, index: int, indices: Sequence[int]) -> Tensor:
        """Frames ``indices`` of clip ``index`` -> (n,3,size,size) float32 in [0,1]."""
        indices = [int(i) for i in indices]
        n = self.num_frames(index)
        if any(not 0 <= i < n for i in indices):
            raise IndexError(f"VideoClips: frames {indices} out of range for {self.clips[index]} ({n} frames)")
        if index in self._files:
            images = {i: read_image(self._files[index][i]) for i in set(indices)}
        else:
            wanted, images = set(indices), {}
            for i, frame in enumerate(iter_frames(self.clips[index])):
                if i in wanted:
                    images[i] = frame
                    if len(images) == len(wanted):
                        break
        return torch.cat([to_tensor(images[i], size=self.size) for i in indices], dim=0)


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """(...,3,H,W) RGB in [0,1] -> HSV, hue in [0,1)."""
    r, g, b = rgb.unbind(-3)
    maxc, _ = rgb.max(-3)
    minc, _ = rgb.min(-3)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], -3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv.unbind(-3)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -3)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class Augment:
    """The official training augmentation on the frames of one sample, (T,3,H,W) in [0,1]: horizontal
    flip of every frame (p=0.5), time flip (reversed frame order, p=0.5), and colour jitter with one
    draw for all frames: brightness, contrast and saturation factors in [1-j, 1+j], hue shifted by up
    to ``hue`` of the colour circle, applied in a random order (as torchvision's ColorJitter)."""

    def __init__(self, horizontal_flip: bool = True, time_flip: bool = True, brightness: float = 0.1,
                 contrast: float = 0.1, saturation: float = 0.1, hue: float = 0.1):
        self.horizontal_flip, self.time_flip = horizontal_flip, time_flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, frames: Tensor, rng: np.random.Generator) -> Tensor:
        """frames (T,3,H,W) -> augmented (T,3,H,W), randomness from ``rng``."""
        if self.horizontal_flip and rng.random() < 0.5:
            frames = frames.flip(-1)
        if self.time_flip and rng.random() < 0.5:
            frames = frames.flip(0)
        ops = []
        if self.brightness > 0:
            f = rng.uniform(1 - self.brightness, 1 + self.brightness)
            ops.append(lambda x, f=f: (x * f).clamp(0, 1))
        if self.contrast > 0:
            f = rng.uniform(1 - self.contrast, 1 + self.contrast)
            ops.append(lambda x, f=f: (x * f + (1 - f) * _gray(x).mean((-2, -1), keepdim=True)).clamp(0, 1))
        if self.saturation > 0:
            f = rng.uniform(1 - self.saturation, 1 + self.saturation)
            ops.append(lambda x, f=f: (x * f + (1 - f) * _gray(x)).clamp(0, 1))
        if self.hue > 0:
            shift = rng.uniform(-self.hue, self.hue)
            ops.append(lambda x, s=shift: _hue_shift(x, s))
        for i in rng.permutation(len(ops)):
            frames = ops[i](frames)
        return frames.contiguous()


def _gray(x: Tensor) -> Tensor:
    """(...,3,H,W) -> (...,1,H,W) luma (ITU-R 601, as torchvision)."""
    return (0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def _hue_shift(x: Tensor, shift: float) -> Tensor:
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([(hsv[..., 0:1, :, :] + shift) % 1.0, hsv[..., 1:, :, :]], dim=-3)
    return hsv_to_rgb(hsv).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def _split_key(key: Key) -> Tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


class _ClipDataset(torch.utils.data.Dataset):
    def __init__(self, clips, augment: Optional[Augment] = None, seed: int = 0, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.clips, self.augment, self.seed, self.repeats = clips, augment, seed, repeats

    def __len__(self) -> int:
        return len(self.clips) * self.repeats

    def _rng(self, key: Key) -> Tuple[int, np.random.Generator]:
        index, sample_seed = _split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range (0..{len(self) - 1})")
        return index % len(self.clips), np.random.default_rng([self.seed, index, sample_seed])


class PairDataset(_ClipDataset):
    """(source, driving) frames of one clip: two frame indices drawn uniformly (with replacement, sorted,
    as the official FramesDataset), then ``augment``. ``len`` = clips x ``repeats``. Item ``key``
    (index or (index, sample_seed)) -> {"source": (3,S,S), "driving": (3,S,S), "clip": int,
    "frame_index": (2,) int64 (before a time flip)}."""

    def __getitem__(self, key: Key) -> Dict[str, Tensor]:
        clip, rng = self._rng(key)
        indices = np.sort(rng.choice(self.clips.num_frames(clip), size=2, replace=True))
        frames = self.clips.frames(clip, indices.tolist())
        if self.augment is not None:
            frames = self.augment(frames, rng)
        return {"source": frames[0], "driving": frames[1], "clip": clip,
                "frame_index": torch.from_numpy(indices.astype(np.int64))}


class TripletDataset(_ClipDataset):
    """Consecutive frames (t-stride, t, t+stride) of one clip for depth training, t uniform over the
    valid range, then ``augment`` (a time flip reverses the triplet). Item -> {"frames": (3,3,S,S)
    (previous, target, next), "clip": int, "frame_index": (3,) int64}."""

    def __init__(self, clips, augment: Optional[Augment] = None, seed: int = 0, repeats: int = 1, stride: int = 1):
        super().__init__(clips, augment, seed, repeats)
        if stride < 1:
            raise ValueError(f"TripletDataset: stride must be >= 1, got {stride}")
        self.stride = stride

    def __getitem__(self, key: Key) -> Dict[str, Tensor]:
        clip, rng = self._rng(key)
        n = self.clips.num_frames(clip)
        if n < 2 * self.stride + 1:
            raise ValueError(f"TripletDataset: clip {clip} has {n} frames, fewer than 2 * stride + 1")
        t = int(rng.integers(self.stride, n - self.stride))
        indices = np.array([t - self.stride, t, t + self.stride])
        frames = self.clips.frames(clip, indices.tolist())
        if self.augment is not None:
            frames = self.augment(frames, rng)
        return {"frames": frames, "clip": clip, "frame_index": torch.from_numpy(indices.astype(np.int64))}


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for ``DataLoader(batch_sampler=...)``: step s draws ``batch_size * world_size`` keys
    (index, sample_seed) from a generator seeded with (seed, s); rank r takes its ``batch_size`` slice.
    Steps ``start_step`` .. ``num_steps - 1`` are yielded, so resuming at step s reproduces the batches
    of an uninterrupted run."""

    def __init__(self, dataset_len: int, batch_size: int, num_steps: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if dataset_len < 1 or batch_size < 1:
            raise ValueError("StepBatchSampler: need a non-empty dataset and batch_size >= 1")
        self.dataset_len, self.batch_size, self.num_steps = dataset_len, batch_size, num_steps
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size

    def keys_for_step(self, step: int) -> List[Tuple[int, int]]:
        """This rank's keys for ``step``."""
        rng = np.random.default_rng([self.seed, step])
        total = self.batch_size * self.world_size
        indices = rng.integers(self.dataset_len, size=total)
        seeds = rng.integers(2 ** 31, size=total)
        lo = self.rank * self.batch_size
        return [(int(i), int(s)) for i, s in zip(indices[lo:lo + self.batch_size], seeds[lo:lo + self.batch_size])]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start_step, self.num_steps):
            yield self.keys_for_step(step)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)
