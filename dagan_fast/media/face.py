"""Face detection and the fixed face crop used to prepare source portraits and driving videos.

DaGAN (like FOMM) is trained on VoxCeleb clips cropped to a fixed square around the head: the official
preprocessing detects the face in every frame, joins the boxes of the clip into one "tube" box, enlarges
it and cuts the same window out of every frame. This module does the same with a detector that ships
offline: the frontal-face Haar cascade bundled with OpenCV 4.x (``cv2.data.haarcascades``; OpenCV 5
removed it, hence ``opencv-python-headless<5``). The window is fixed for a whole video on purpose: a
window that followed the face would move the background and confuse the motion model.

    window = crop_window("driving.mp4")            # detect over the first frames, one square window
    for frame in iter_frames("driving.mp4"):
        face = window.apply(frame, size=256)       # (256, 256, 3) uint8 RGB

Images without a detectable face raise :class:`NoFaceError` (a ``ValueError``) with what to do instead.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from .video import VideoReader, as_rgb_uint8, describe, is_path, read_image, resize_square

__all__ = ["NoFaceError", "FaceDetector", "CropWindow", "FaceTracker", "crop_window", "window_from_box",
           "box_iou", "DEFAULT_MARGIN", "DRIVING_MIN_SUPPORT", "NO_FACE_HINT"]

Box = Tuple[int, int, int, int]

#: Side of the crop window relative to the detected face box (see :func:`crop_window`).
DEFAULT_MARGIN = 1.8
#: Detections with less support (merged cascade hits) are ignored in driving videos: real faces gather
#: tens (17-39 on this project's test faces), false positives on textures a handful (9 on
#: scikit-image's immunohistochemistry slide).
DRIVING_MIN_SUPPORT = 12


#: What to do when no face is found (the command line's and the API's names of the same switches).
NO_FACE_HINT = ("use an image or video in which a frontal face is clearly visible, or animate without face "
                "cropping (leave out --crop on the command line, face_crop=False in the API: the centre square "
                "is used)")


class NoFaceError(ValueError):
    """No face was found where one was required (a non-face image, or no frames at all).

    ``what`` names the input (e.g. "--driving talk.mp4"), ``detail`` says what was looked at, ``hint``
    what to do instead (default :data:`NO_FACE_HINT`)."""

    def __init__(self, what: str, detail: str = "", hint: Optional[str] = None):
        self.what = what
        self.detail = detail
        super().__init__(f"no face found in {what}{detail}; {hint or NO_FACE_HINT}")


def _cascade_path() -> str:
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", None)
    if not hasattr(cv2, "CascadeClassifier") or folder is None:
        raise ImportError(f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 removed them); "
                          "install 'opencv-python-headless<5' for face cropping")
    return os.path.join(folder, "haarcascade_frontalface_default.xml")


class FaceDetector:
    """Frontal-face detector: OpenCV's bundled Haar cascade (offline, CPU, ~10-200 ms a frame).

    ``scale_factor`` and ``min_neighbors`` are ``detectMultiScale``'s (higher ``min_neighbors``: fewer
    false positives, more misses). ``min_face``: smallest face side searched, as a fraction of the
    frame's shorter side (0.1: faces smaller than a tenth of the frame are ignored; also keeps the
    search fast). Frames are analysed in gray, histogram-equalised, downscaled so the longer side is at
    most ``max_side`` and upscaled so the shorter side is at least ``min_side`` (the cascade's window is
    24x24: a 25x25 face thumbnail is too small for it), and padded by ``pad`` (fraction of each side,
    border replicated) so that faces touching the frame edge, as in tight portrait crops, are still
    found. Measured on scikit-image's 25x25 LFW thumbnails: 0/100 faces found at native size, 82/100
    upscaled to 128 without padding, 97/100 with the defaults (upscaled, padded 0.125), and 0/100 of
    its non-face patches.
    """

    def __init__(self, cascade: Optional[str] = None, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face: float = 0.1, max_side: int = 640, min_side: int = 128, pad: float = 0.125):
        path = cascade or _cascade_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Haar cascade file not found: {path}")
        self.classifier = cv2.CascadeClassifier(path)
        if self.classifier.empty():
            raise ValueError(f"cannot load the Haar cascade {path}")
        if not scale_factor > 1.0:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if not 0.0 < min_face <= 1.0:
            raise ValueError(f"min_face must be in (0, 1], got {min_face}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_face = float(min_face)
        self.max_side = int(max_side)
        self.min_side = int(min_side)
        self.pad = float(pad)

    def detect_scored(self, frame) -> Tuple[np.ndarray, np.ndarray]:
        """Faces in ``frame`` with their support: ((N, 4) float64 (x0, y0, x1, y1) boxes in frame pixels,
        not clipped to the frame (a face cut by the frame edge extends past it); (N,) int64 support, the
        number of overlapping cascade hits merged into each box: real faces gather tens, false positives
        a handful), largest area first."""
        image = read_image(frame, what="frame given to FaceDetector.detect")
        h, w = image.shape[:2]
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        scale = 1.0
        if max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
        elif min(h, w) < self.min_side:       # upscale small frames, never past max_side
            scale = min(self.min_side / min(h, w), self.max_side / max(h, w))
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        gray = cv2.equalizeHist(gray)
        p = int(round(self.pad * min(gray.shape)))
        if p:
            gray = cv2.copyMakeBorder(gray, p, p, p, p, cv2.BORDER_REPLICATE)
        smallest = max(24, int(self.min_face * (min(gray.shape) - 2 * p)))
        found, support = self.classifier.detectMultiScale2(gray, scaleFactor=self.scale_factor,
                                                           minNeighbors=self.min_neighbors,
                                                           minSize=(smallest, smallest))
        boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4)
        support = np.asarray(support, dtype=np.int64).reshape(-1)
        boxes[:, 0:2] -= p
        boxes[:, 2:4] += boxes[:, 0:2]
        boxes /= scale
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        return boxes[order], support[order]

    def detect_float(self, frame) -> np.ndarray:
        """Faces as an (N, 4) float64 array of unclipped (x0, y0, x1, y1) boxes, largest area first
        (see :meth:`detect_scored`)."""
        return self.detect_scored(frame)[0]

    def best_face(self, frame) -> Optional[np.ndarray]:
        """The main face of ``frame``: the (4,) float64 unclipped box with the most support (ties: the
        larger), or None. Preferred over "the largest" because Haar false positives on clothes or
        background can be larger than the face but gather far less support."""
        boxes, support = self.detect_scored(frame)
        if len(boxes) == 0:
            return None
        return boxes[int(np.argmax(support))]       # argmax keeps the first (largest) among ties

    def best_face_supported(self, frame, min_support: int = 0,
                            near: Optional[Sequence[float]] = None) -> Optional[np.ndarray]:
        """Like :meth:`best_face`, ignoring detections with support below ``min_support``; with ``near``
        (an (x0, y0, x1, y1) box), the detection overlapping it most (IoU) wins, then support. None when
        nothing is left."""
        boxes, support = self.detect_scored(frame)
        keep = support >= int(min_support)
        boxes, support = boxes[keep], support[keep]
        if len(boxes) == 0:
            return None
        if near is not None:
            ious = np.array([box_iou(b, near) for b in boxes])
            if ious.max() > 0:
                return boxes[int(np.lexsort((-support, -ious))[0])]
        return boxes[int(np.argmax(support))]

    def detect(self, frame) -> List[Box]:
        """Faces in ``frame`` ((H, W, 3) uint8 RGB, or anything ``read_image`` accepts) as a list of
        (x0, y0, x1, y1) int boxes (x1, y1 exclusive) clipped to the frame, largest area first;
        empty when there is none."""
        image = read_image(frame, what="frame given to FaceDetector.detect")
        h, w = image.shape[:2]
        out = []
        for x0, y0, x1, y1 in self.detect_float(image):
            box = (max(0, int(round(x0))), max(0, int(round(y0))), min(w, int(round(x1))), min(h, int(round(y1))))
            if box[2] > box[0] and box[3] > box[1]:
                out.append(box)
        return out


@dataclass(frozen=True)
class CropWindow:
    """A fixed square window (x0, y0, x1, y1; x1, y1 exclusive) in frames of ``frame_size`` (W, H).

    ``face`` is the (x0, y0, x1, y1) float face box it was built from (None if given by hand).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    frame_size: Tuple[int, int]
    face: Optional[Tuple[float, float, float, float]] = None

    @property
    def side(self) -> int:
        """Side of the square window in pixels."""
        return self.x1 - self.x0

    @property
    def box(self) -> Box:
        """(x0, y0, x1, y1)."""
        return (self.x0, self.y0, self.x1, self.y1)

    def apply(self, frame, size: Optional[int] = None) -> np.ndarray:
        """Cut the window out of ``frame`` ((H, W, 3) uint8 RGB of this window's ``frame_size``, or
        anything ``read_image`` accepts) -> (side, side, 3) uint8 RGB, or (size, size, 3) when ``size``
        is given (INTER_AREA to shrink, INTER_LINEAR to enlarge). A frame of another size raises
        ``ValueError``."""
        image = read_image(frame, what="frame given to CropWindow.apply")
        got = (image.shape[1], image.shape[0])
        if got != tuple(self.frame_size):
            raise ValueError(f"CropWindow.apply: the window was computed for {self.frame_size[0]}x"
                             f"{self.frame_size[1]} frames, got a {got[0]}x{got[1]} frame")
        crop = np.ascontiguousarray(image[self.y0:self.y1, self.x0:self.x1])
        if size is not None:
            if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
                raise ValueError(f"CropWindow.apply: size must be a positive int, got {size!r}")
            crop = resize_square(crop, int(size))
        return crop


def _combine(boxes: np.ndarray, combine: str) -> np.ndarray:
    """(N, 4) boxes of one video -> one (4,) box. "union" joins the boxes (the official tube box) after
    dropping outliers (boxes whose centre lies outside the median box: a stray false detection would
    otherwise blow the union up); "median" takes the elementwise median box."""
    median = np.median(boxes, axis=0)
    if combine == "median" or len(boxes) == 1:
        return median
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    keep = (cx >= median[0]) & (cx <= median[2]) & (cy >= median[1]) & (cy <= median[3])
    kept = boxes[keep] if keep.any() else median[None]
    return np.concatenate([kept[:, :2].min(axis=0), kept[:, 2:].max(axis=0)])


def window_from_box(face: Sequence[float], frame_size: Tuple[int, int], margin: float = DEFAULT_MARGIN) -> CropWindow:
    """Square crop window of side ``margin`` x the face box's longer side, centred on the box, inside a
    frame of ``frame_size`` (W, H). Near an edge the window is shifted (not shrunk) to stay inside;
    it is shrunk only when it is larger than the frame's shorter side. The side is even when possible
    (mp4v/MJPG need even sizes)."""
    width, height = int(frame_size[0]), int(frame_size[1])
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in face)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    side = int(round(margin * max(x1 - x0, y1 - y0)))
    side = max(1, min(side, width, height))
    if side > 1 and side % 2:
        side -= 1
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return CropWindow(left, top, left + side, top + side, (width, height),
                      face=(x0, y0, x1, y1))


def _frames_to_scan(source, max_frames: int, stride: int, what: Optional[str]):
    """(iterator of frames to run the detector on, description of the source, reader to close or None)."""
    if is_path(source):
        reader = VideoReader(source)
        name = what or (f"image {os.fspath(source)}" if reader.kind == "image"
                        else f"the first frames of {os.fspath(source)}")
        return itertools.islice(reader._frames(), 0, max_frames * stride, stride), name, reader
    if isinstance(source, VideoReader):
        return (itertools.islice(source._frames(), 0, max_frames * stride, stride),
                what or f"the first frames of {source.name}", None)
    if isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim != 4:
        return iter([source]), what or f"the image ({describe(source)})", None
    try:
        iterator = iter(source)
    except TypeError:
        raise TypeError(f"crop_window: expected an image, a path, a VideoReader or an iterable of frames, got "
                        f"{type(source).__name__}") from None
    return itertools.islice(iterator, 0, max_frames * stride, stride), what or "the first frames", None


def _frame_list(indices: List[int]) -> str:
    """"frames 0, 5, 10, ..., 45 (10 frames)"-style text."""
    text = ", ".join(str(i) for i in indices) if len(indices) <= 6 else \
        ", ".join(str(i) for i in indices[:3]) + ", ..., " + str(indices[-1])
    return f"frames {text} ({len(indices)} frames)" if len(indices) > 1 else f"frame {text}"


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def crop_window(source, margin: float = DEFAULT_MARGIN, detector: Optional[FaceDetector] = None,
                max_frames: int = 10, stride: int = 5, combine: str = "union",
                what: Optional[str] = None, min_support: int = 0, min_hits: Union[int, float] = 1,
                hint: Optional[str] = None) -> CropWindow:
    """Fixed square face window for an image or a video, like the official preprocessing.

    ``source``: one frame ((H, W, 3) array, tensor, or an image path), or a video: a path, a
    :class:`VideoReader`, a 4-D frame stack or an iterable of frames. For a video the detector runs on
    frames 0, ``stride``, 2*``stride``, ... (``max_frames`` of them; an iterator is consumed that far,
    pass a path or a list to read the frames again); the main face of each frame is kept
    (:meth:`FaceDetector.best_face`: the best-supported detection) and the boxes are combined
    (``combine="union"``: the official tube box, joined over the frames after dropping outliers;
    ``"median"``: the median box). Frames without a face are skipped. ``min_support``: detections with
    fewer merged cascade hits are ignored (:data:`DRIVING_MIN_SUPPORT` for driving videos); ``min_hits``:
    how many of the frames looked at must hold a face (an int, or a float fraction of them, at least
    one), else the source counts as having no face (a stray false detection in a video without a face).

    ``margin``: window side / face box side. The Haar box spans roughly eyebrows to chin and cheek to
    cheek; VoxCeleb crops, which DaGAN is trained on, show the whole head with hair, the neck and the
    top of the shoulders, i.e. a window about 1.6-2x the box. The default 1.8 keeps the hair of
    scikit-image's astronaut inside with a little room for head motion (the official script adds 10% to
    each side of a tight landmark-tube box, but that box already spans a whole clip's motion).
    The window is square, centred on the box, shifted (not shrunk) to stay inside the frame; it is
    shrunk only when larger than the frame's shorter side. ``what`` names the source in errors.

    Raises :class:`NoFaceError` (a ``ValueError``) when too few frames hold a face, naming the source and
    the frames looked at (``hint``: what to do, default :data:`NO_FACE_HINT`), or when it has no frames.
    """
    if combine not in ("union", "median"):
        raise ValueError(f"combine must be 'union' or 'median', got {combine!r}")
    if max_frames < 1 or stride < 1:
        raise ValueError(f"max_frames and stride must be >= 1, got {max_frames} and {stride}")
    detector = detector or FaceDetector()
    frames, name, reader = _frames_to_scan(source, max_frames, stride, what)
    boxes, frame_size, count, looked = [], None, 0, []
    try:
        for index, frame in enumerate(frames):
            looked.append(index * stride)
            image = as_rgb_uint8(frame, what=f"frame {index * stride} of {name}")
            size = (image.shape[1], image.shape[0])
            if frame_size is None:
                frame_size = size
            elif size != frame_size:
                raise ValueError(f"crop_window: frames of {name} change size ({frame_size[0]}x{frame_size[1]} "
                                 f"then {size[0]}x{size[1]}); one window needs one frame size")
            count += 1
            face = detector.best_face_supported(image, min_support) if min_support else detector.best_face(image)
            if face is not None:
                boxes.append(face)
    finally:
        if reader is not None:
            reader.close()
    if count == 0:
        raise NoFaceError(name, ": it contains no frames", hint)
    needed = max(1, int(np.ceil(min_hits * count)) if isinstance(min_hits, float) else int(min_hits))
    if len(boxes) < needed:
        seen = "" if count == 1 else f" (looked at {_frame_list(looked)}; a face in {len(boxes)}, needed {needed})"
        raise NoFaceError(name, seen, hint)
    face = _combine(np.stack(boxes), combine)
    return window_from_box(face, frame_size, margin)


class FaceTracker:
    """Per-frame face window for a driving video: fixed while the head moves little, moved (smoothly) when
    the face leaves it.

    The authors' preprocessing (FOMM/DaGAN ``crop-video.py``) cuts a video into "tubes": a tube continues
    while each frame's face box overlaps the tube's first box with IoU above 0.25, and every frame of a tube
    is cut with one fixed window. This is the causal version: ``window`` (e.g. from :func:`crop_window` over
    the first frames) is kept while the face detected in each frame overlaps the box the window was built
    from (``anchor``) with IoU >= ``iou_threshold`` and lies inside the window. When it does not, a new
    target window is built around the new face (:func:`window_from_box`, ``margin``) and the window glides
    to it: each frame it moves ``smoothing`` of the remaining way (centre and side; 1.0 jumps at once), and
    snaps when within a pixel. Frames where the detector finds no face (support below ``min_support``)
    keep the current window (``missed`` counts them).

    ``detect_every``: run the detector on every n-th frame only (the window is kept in between).
    Attributes: ``window`` (the current :class:`CropWindow`), ``frames`` (frames seen), ``missed``,
    ``moves`` (times the face left the window).

        tracker = FaceTracker(crop_window("talk.mp4", min_support=DRIVING_MIN_SUPPORT))
        for frame in iter_frames("talk.mp4"):
            face = tracker.apply(frame, size=256)      # (256, 256, 3) uint8 RGB
    """

    def __init__(self, window: CropWindow, detector: Optional[FaceDetector] = None, margin: float = DEFAULT_MARGIN,
                 iou_threshold: float = 0.25, smoothing: float = 0.3, min_support: int = DRIVING_MIN_SUPPORT,
                 detect_every: int = 1):
        if not isinstance(window, CropWindow):
            raise TypeError(f"FaceTracker: window must be a CropWindow (from crop_window), got {type(window).__name__}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"FaceTracker: smoothing must be in (0, 1], got {smoothing!r}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"FaceTracker: iou_threshold must be in [0, 1), got {iou_threshold!r}")
        if not isinstance(detect_every, (int, np.integer)) or detect_every < 1:
            raise ValueError(f"FaceTracker: detect_every must be an int >= 1, got {detect_every!r}")
        self.detector = detector or FaceDetector()
        self.margin = float(margin)
        self.iou_threshold = float(iou_threshold)
        self.smoothing = float(smoothing)
        self.min_support = int(min_support)
        self.detect_every = int(detect_every)
        self.window = window
        face = window.face if window.face is not None else window.box
        self.anchor = tuple(float(v) for v in face)
        self._target: Optional[CropWindow] = None
        self._state = np.array([(window.x0 + window.x1) / 2.0, (window.y0 + window.y1) / 2.0, float(window.side)])
        self.frames = 0
        self.missed = 0
        self.moves = 0

    def _inside(self, face: Sequence[float]) -> bool:
        w = self._target or self.window          # while gliding, the window it is gliding to
        return face[0] >= w.x0 and face[1] >= w.y0 and face[2] <= w.x1 and face[3] <= w.y1

    def _place(self, cx: float, cy: float, side: float) -> CropWindow:
        width, height = self.window.frame_size
        side_i = max(1, min(int(round(side)), width, height))
        if side_i > 1 and side_i % 2:
            side_i -= 1
        left = min(max(int(round(cx - side_i / 2.0)), 0), width - side_i)
        top = min(max(int(round(cy - side_i / 2.0)), 0), height - side_i)
        return CropWindow(left, top, left + side_i, top + side_i, (width, height), face=self.anchor)

    def update(self, frame) -> CropWindow:
        """Look at one (H, W, 3) frame (of the window's frame size) and return the window to cut it with."""
        image = read_image(frame, what="frame given to FaceTracker.update")
        got = (image.shape[1], image.shape[0])
        if got != tuple(self.window.frame_size):
            raise ValueError(f"FaceTracker: the window is for {self.window.frame_size[0]}x{self.window.frame_size[1]} "
                             f"frames, frame {self.frames} is {got[0]}x{got[1]}")
        if self.frames % self.detect_every == 0:
            face = self.detector.best_face_supported(image, self.min_support, near=self.anchor)
            if face is None:
                self.missed += 1
            elif box_iou(face, self.anchor) < self.iou_threshold or not self._inside(face):
                self.anchor = tuple(float(v) for v in face)
                self._target = window_from_box(face, got, self.margin)
                self.moves += 1
        self.frames += 1
        if self._target is not None:
            t = self._target
            goal = np.array([(t.x0 + t.x1) / 2.0, (t.y0 + t.y1) / 2.0, float(t.side)])
            self._state = self._state + self.smoothing * (goal - self._state)
            if np.abs(goal - self._state).max() <= 1.0:
                self._state = goal
                self.window = CropWindow(t.x0, t.y0, t.x1, t.y1, t.frame_size, face=self.anchor)
                self._target = None
            else:
                self.window = self._place(*self._state)
        return self.window

    def apply(self, frame, size: Optional[int] = None) -> np.ndarray:
        """:meth:`update` with ``frame``, then cut it: (side, side, 3) uint8, or (size, size, 3) with ``size``."""
        image = read_image(frame, what="frame given to FaceTracker.apply")
        return self.update(image).apply(image, size=size)
