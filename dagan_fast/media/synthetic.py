"""Synthetic talking-head clips from still faces that ship with scikit-image (the astronaut and the
100 LFW faces of ``skimage.data.lfw_subset()``), so that training, tests and ``dagan-fast demo`` see faces
in motion without any download (``training.synthetic`` re-exports this module).

A clip renders one still face under a smooth random trajectory of 8 parameters per frame
(``POSE_NAMES``): head yaw / pitch / roll (radians), translation tx / ty and zoom (in the [-1,1]
image coordinates), mouth opening and eye closure (0..1).

Rendering model. The face is a height field z(u,v) >= 0 over the image plane (a smooth ellipsoid-like
bump, ``(1 - r^2)^1.5`` over an ellipse, plus a nose bump) seen by a pinhole camera at distance
``CAMERA_DISTANCE``; the still image is the view at the neutral pose, so every pixel (u,v) is
back-projected to the 3D point X(u,v) it shows. A pose rotates X about a pivot behind the face (the
head centre), translates, zooms and projects it again: the forward map F(u,v). Frames are rendered
backwards: for each output pixel the source point F^-1(x,y) is found by fixed-point iteration
g <- g - (F(g) - (x,y)) (F is close to the identity: the bump has bounded slope, so this converges
for the rotations used here; self-occlusion is ignored) and sampled with grid_sample. Mouth and eyes
are local non-rigid warps applied in the source image before the rigid motion (a vertical stretch
around the mouth with a darkened opening, a vertical squeeze of each eye). Everything is
deterministic given the seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..ops.reference import make_coordinate_grid

Tensor = torch.Tensor

POSE_NAMES = ("yaw", "pitch", "roll", "tx", "ty", "zoom", "mouth", "blink")
# Peak amplitude of each trajectory parameter (radians for the angles, [-1,1] units for tx/ty, a
# relative scale for zoom; mouth/blink are 0..1 and handled separately).
POSE_AMPLITUDE = {"yaw": 0.35, "pitch": 0.2, "roll": 0.12, "tx": 0.08, "ty": 0.06, "zoom": 0.05}
CAMERA_DISTANCE = 4.0      # in half-image-widths: mild perspective
PIVOT_DEPTH = -0.6         # the head turns about a point this far behind the image plane
FIXED_POINT_ITERATIONS = 8
# Held-out faces: every TEST_FACE_EVERY-th still face (indices 4, 9, ..., 99: 20 LFW faces), so that an
# evaluation can use people a model trained on the "train" split never saw; the astronaut stays in "train".
TEST_FACE_EVERY = 5
FACE_SPLITS = ("all", "train", "test")


@dataclass
class FaceLayout:
    """Where the face is in a still image, in [-1,1] coordinates (x right, y down): ellipse ``center``
    and semi-axes ``axes`` (x, y), ``height`` of the bump (same units), ``eyes`` ((x, y) each),
    ``mouth`` (x, y)."""

    center: tuple
    axes: tuple
    height: float
    eyes: tuple
    mouth: tuple


# The astronaut crop: face ellipse inside hair and collar; LFW crops are tight on the face.
ASTRONAUT_LAYOUT = FaceLayout(center=(0.0, -0.05), axes=(0.45, 0.62), height=0.35,
                              eyes=((-0.2, -0.2), (0.2, -0.2)), mouth=(0.0, 0.23))
LFW_LAYOUT = FaceLayout(center=(0.0, 0.05), axes=(0.7, 0.9), height=0.45,
                        eyes=((-0.33, -0.22), (0.33, -0.22)), mouth=(0.0, 0.5))


@dataclass
class Face:
    """One still face: ``image`` (3,S,S) float32 RGB in [0,1], its ``layout`` and ``name``."""

    image: Tensor
    layout: FaceLayout
    name: str


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def face_images(size: int = 64, count: Optional[int] = None) -> List[Face]:
    """The still faces at ``size`` x ``size``: the astronaut's face first, then LFW faces (gray, given
    a mild deterministic colour tint so that colour losses see colour). ``count``: how many (default
    all 101)."""
    from skimage import data

    astronaut = data.astronaut()[20:220, 140:340].astype(np.float32) / 255.0
    faces = [Face(torch.from_numpy(np.clip(_resize(astronaut, size), 0, 1)).permute(2, 0, 1).contiguous(),
                  ASTRONAUT_LAYOUT, "astronaut")]
    lfw = data.lfw_subset()[:100]  # the first 100 images of the subset are faces, the rest are not
    tint_rng = np.random.default_rng(1234)
    for index, gray in enumerate(lfw):
        if count is not None and len(faces) >= count:
            break
        tint = 1.0 + tint_rng.uniform(-0.07, 0.07, size=3).astype(np.float32)
        rgb = np.clip(_resize(gray.astype(np.float32), size)[..., None] * tint, 0, 1)
        faces.append(Face(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), LFW_LAYOUT, f"lfw{index}"))
    return faces[:count] if count is not None else faces


def split_faces(faces: Sequence[Face], split: str) -> List[Face]:
    """The faces of ``split`` ("all", "train" or "test") among ``faces`` as ``face_images`` orders them:
    "test" keeps every ``TEST_FACE_EVERY``-th face (index % TEST_FACE_EVERY == TEST_FACE_EVERY - 1),
    "train" the others."""
    if split not in FACE_SPLITS:
        raise ValueError(f"face split must be one of {FACE_SPLITS}, got {split!r}")
    if split == "all":
        return list(faces)
    held_out = [index % TEST_FACE_EVERY == TEST_FACE_EVERY - 1 for index in range(len(faces))]
    return [face for face, test in zip(faces, held_out) if test == (split == "test")]


def height_field(coords: Tensor, layout: FaceLayout) -> Tensor:
    """Face height z >= 0 at image coordinates ``coords`` (...,2) -> (...): (1 - r^2)^1.5 over the
    face ellipse (bounded slope, zero outside) plus a nose bump."""
    cx, cy = layout.center
    ax, ay = layout.axes
    r2 = ((coords[..., 0] - cx) / ax) ** 2 + ((coords[..., 1] - cy) / ay) ** 2
    dome = layout.height * (1 - r2).clamp_min(0) ** 1.5
    nose_y = 0.5 * (layout.eyes[0][1] + layout.mouth[1])
    nose = 0.25 * layout.height * torch.exp(-((coords[..., 0] - cx) ** 2 + (coords[..., 1] - nose_y) ** 2)
                                            / (2 * (0.12 * ax) ** 2))
    return dome + nose


def rotation_matrices(yaw: Tensor, pitch: Tensor, roll: Tensor) -> Tensor:
    """(T,) angles -> (T,3,3) R = Rz(roll) Ry(yaw) Rx(pitch) (x right, y down, z towards the camera)."""
    cy_, sy_ = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    ry = torch.stack([cy_, zero, sy_, zero, one, zero, -sy_, zero, cy_], -1).view(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def forward_map(coords: Tensor, poses: Tensor, layout: FaceLayout) -> Tensor:
    """Where the rigid head motion sends the still image's points: coords (T,N,2) -> (x, y) (T,N,2),
    and their depth after the motion (T,N) as the last channel: returns (T,N,3).
    poses (T,8) as ``POSE_NAMES`` (mouth/blink unused here). The neutral pose maps every point to
    itself with its own height."""
    D = CAMERA_DISTANCE
    cx, cy = layout.center
    z = height_field(coords, layout)
    # Back-projection of the neutral view: the 3D point seen at (u, v) at height z.
    shrink = (D - z) / D
    X = torch.stack([(coords[..., 0] - cx) * shrink, (coords[..., 1] - cy) * shrink, z - PIVOT_DEPTH], -1)
    R = rotation_matrices(poses[:, 0], poses[:, 1], poses[:, 2])
    Xr = X @ R.transpose(1, 2)
    zr = Xr[..., 2] + PIVOT_DEPTH
    scale = (1 + poses[:, 5]).view(-1, 1) * D / (D - zr)
    x = cx + poses[:, 3].view(-1, 1) + Xr[..., 0] * scale
    y = cy + poses[:, 4].view(-1, 1) + Xr[..., 1] * scale
    return torch.stack([x, y, zr], -1)


def inverse_map(targets: Tensor, poses: Tensor, layout: FaceLayout,
                iterations: int = FIXED_POINT_ITERATIONS) -> Tensor:
    """F^-1 by fixed-point iteration: targets (T,N,2) -> source coordinates (T,N,2) with
    F(source) ~= targets."""
    g = targets.clone()
    for _ in range(iterations):
        g = g - (forward_map(g, poses, layout)[..., :2] - targets)
    return g


def _gauss(coords: Tensor, center, sx: float, sy: float) -> Tensor:
    return torch.exp(-((coords[..., 0] - center[0]) ** 2 / (2 * sx ** 2)
                       + (coords[..., 1] - center[1]) ** 2 / (2 * sy ** 2)))


def local_warp(coords: Tensor, mouth: Tensor, blink: Tensor, layout: FaceLayout):
    """Non-rigid expression warp in the still image: coords (T,N,2) -> (where to sample (T,N,2),
    shading (T,N) multiplying the sampled colour). The mouth stretches vertically around its line
    (samples pulled towards it) with a darkened gap; each eye is squeezed vertically (samples pushed
    away from its centre)."""
    ax, ay = layout.axes
    mx, my = layout.mouth
    m = mouth.view(-1, 1)
    b = blink.view(-1, 1)
    g_mouth = _gauss(coords, (mx, my), 0.35 * ax, 0.12 * ay)
    dy = -0.6 * m * (coords[..., 1] - my) * g_mouth
    for eye in layout.eyes:
        g_eye = _gauss(coords, eye, 0.16 * ax, 0.07 * ay)
        dy = dy + 0.9 * b * (coords[..., 1] - eye[1]) * g_eye
    sample = torch.stack([coords[..., 0], coords[..., 1] + dy], -1)
    gap = _gauss(coords, (mx, my), 0.22 * ax, 0.035 * ay)
    shading = 1 - 0.65 * m * gap
    return sample, shading


def render(face: Face, poses: Tensor) -> Dict[str, Tensor]:
    """Frames of ``face`` at each pose: poses (T,8) -> {"frames": (T,3,S,S) in [0,1], "depth":
    (T,1,S,S) the height of the surface seen at each pixel (head coordinates, 0 = image plane),
    "grid": (T,S,S,2) where each pixel was sampled in the still image}."""
    image = face.image
    S = image.shape[-1]
    T = poses.shape[0]
    dtype = image.dtype
    poses = poses.to(dtype)
    targets = make_coordinate_grid(S, S, dtype).view(1, S * S, 2).expand(T, S * S, 2)
    rigid = inverse_map(targets, poses, face.layout)
    depth = forward_map(rigid, poses, face.layout)[..., 2]
    sample, shading = local_warp(rigid, poses[:, 6], poses[:, 7], face.layout)
    grid = sample.view(T, S, S, 2)
    frames = F.grid_sample(image.unsqueeze(0).expand(T, -1, -1, -1), grid, mode="bilinear",
                           padding_mode="border", align_corners=True)
    frames = (frames * shading.view(T, 1, S, S)).clamp(0, 1)
    return {"frames": frames.contiguous(), "depth": depth.view(T, 1, S, S), "grid": grid}


def _smooth_curve(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """A smooth random curve in [-1,1] over ``num_frames`` frames: three sinusoids of 0.3..1.5
    cycles per 32 frames with random phases and weights."""
    t = np.arange(num_frames, dtype=np.float64) / 32.0
    freqs = rng.uniform(0.3, 1.5, size=3)
    phases = rng.uniform(0, 2 * math.pi, size=3)
    weights = rng.dirichlet(np.ones(3))
    return (weights[:, None] * np.sin(2 * math.pi * freqs[:, None] * t[None] + phases[:, None])).sum(0)


def random_trajectory(num_frames: int, seed: int) -> Tensor:
    """(T,8) float64 poses as ``POSE_NAMES``, deterministic given ``seed``: smooth head motion, a
    mouth that opens and closes, and blinks (short bumps of ~3 frames at random times)."""
    rng = np.random.default_rng(seed)
    columns = [POSE_AMPLITUDE[name] * _smooth_curve(rng, num_frames) for name in POSE_NAMES[:6]]
    mouth = np.clip(_smooth_curve(rng, num_frames) * 1.4, 0, 1)
    t = np.arange(num_frames, dtype=np.float64)
    blink = np.zeros(num_frames)
    for when in rng.uniform(0, num_frames, size=max(1, num_frames // 24)):
        blink = np.maximum(blink, np.exp(-0.5 * ((t - when) / 1.2) ** 2))
    return torch.from_numpy(np.stack(columns + [mouth, blink], axis=1))


def make_clip(face: Face, num_frames: int, seed: int) -> Dict[str, Tensor]:
    """One clip: ``render(face, random_trajectory(num_frames, seed))`` plus "poses" (T,8)."""
    poses = random_trajectory(num_frames, seed)
    out = render(face, poses)
    out["poses"] = poses
    return out


class SyntheticClips:
    """A collection of ``num_clips`` synthetic clips of ``num_frames`` frames at ``size`` x ``size``;
    clip i animates face i mod (number of faces) with trajectory seed (``seed``, i). The clip-source
    interface of ``training.data``: ``len``, ``num_frames(i)``, ``frames(i, indices)`` ->
    (n,3,S,S) float32 in [0,1]. Rendered clips are cached (``cache=True``).
    ``face_split``: which bundled faces to animate ("all"; "train" / "test": see ``split_faces``), so
    that a model trained on "train" can be evaluated on people it never saw; applies to ``faces`` when
    given, else to the bundled faces."""

    def __init__(self, num_clips: int = 64, num_frames: int = 32, size: int = 64, seed: int = 0,
                 faces: Optional[Sequence[Face]] = None, cache: bool = True, face_split: str = "all"):
        if num_clips < 1 or num_frames < 3:
            raise ValueError(f"SyntheticClips: need num_clips >= 1 and num_frames >= 3, got {num_clips}, {num_frames}")
        if face_split not in FACE_SPLITS:
            raise ValueError(f"SyntheticClips: face_split must be one of {FACE_SPLITS}, got {face_split!r}")
        if faces is None:
            # "all" loads only the faces the clips use; a split needs every face to pick its share.
            faces = face_images(size, count=min(num_clips, 101) if face_split == "all" else None)
        self.faces = split_faces(faces, face_split)
        if not self.faces:
            raise ValueError(f"SyntheticClips: face_split={face_split!r} leaves no face out of {len(faces)}")
        self.num_clips, self.length, self.size, self.seed = num_clips, num_frames, size, seed
        self._cache: Dict[int, Tensor] = {} if cache else None

    def __len__(self) -> int:
        return self.num_clips

    def num_frames(self, index: int) -> int:
        """Frames in clip ``index``."""
        return self.length

    def clip(self, index: int) -> Dict[str, Tensor]:
        """``make_clip`` of clip ``index`` (uncached)."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"SyntheticClips: clip {index} out of range (0..{self.num_clips - 1})")
        face = self.faces[index % len(self.faces)]
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        return make_clip(face, self.length, seed)

    def frames(self, index: int, indices: Sequence[int]) -> Tensor:
        """Frames ``indices`` of clip ``index`` -> (n,3,S,S) float32."""
        if self._cache is not None:
            if index not in self._cache:
                self._cache[index] = self.clip(index)["frames"]
            clip = self._cache[index]
        else:
            clip = self.clip(index)["frames"]
        return clip[list(indices)]
