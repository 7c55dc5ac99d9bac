"""Frames in and out: images, videos, image folders and cameras, streamed one frame at a time.

Every frame this module hands out is a NumPy array of shape (H, W, 3), dtype uint8, RGB channel order
(OpenCV decodes BGR; the conversion happens here, once). Inputs are normalised by one set of rules,
shared by :func:`read_image`, :func:`iter_frames`, :class:`VideoWriter`, :func:`to_uint8` and the face
cropper (``dagan_fast.media.face``):

Accepted (converted to (H, W, 3) uint8 RGB):
  * NumPy arrays, channels last: (H, W, 3) RGB; (H, W) or (H, W, 1) grayscale (replicated to 3 channels);
    (H, W, 4) RGBA (alpha dropped, not composited); a leading batch axis of size 1 is squeezed.
  * torch tensors: (3, H, W), (1, 3, H, W) (channels first: the torch convention, preferred when a shape
    could be read both ways), (1 or 4, H, W), or channels last (H, W, 1/3/4); (H, W) grayscale.
    Tensors may live on any device; they are converted there and only uint8 data is copied to the CPU.
  * dtypes: uint8 as is; float16/32/64 in [0, 1] (scaled by 255 and rounded; values within 0.1 of the
    range are clamped, e.g. interpolation overshoot); uint16 as 16-bit images (divided by 257);
    other integer types when every value is within [0, 255].
  * anything ``numpy.asarray`` turns into such an array (PIL images, for instance).
Rejected with a ``ValueError`` that names the argument and the shape/dtype it got:
  * empty arrays, other channel counts (2, 5, ...), channels-first NumPy arrays, batches of more
    than one frame where one frame is expected, bool/complex/object dtypes, floats with NaN/inf or
    outside [-0.1, 1.1] (a [0, 255] float image: divide by 255 first), integers outside [0, 255].

Videos are read with OpenCV (FFmpeg backend). They are written with PyAV where it is installed (a
dependency): .mp4/.m4v/.mov/.mkv as H.264 + AAC, .webm as VP9 + Opus, .gif as a looping GIF, with the sound of
another file (the driving video) when asked (``dagan_fast.media.audio`` says why PyAV and what each output
holds); .avi with OpenCV's 'MJPG'; without PyAV, .mp4 falls back to OpenCV's 'mp4v' with a warning ('avc1'/H.264
does not open with the opencv-python wheels). Image folders hold numbered PNG files.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "DEFAULT_FPS",
    "read_image",
    "VideoReader",
    "VideoWriter",
    "iter_frames",
    "to_tensor",
    "to_uint8",
    "as_rgb_uint8",
    "describe",
    "is_path",
    "center_square",
    "resize_square",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Image files an image folder may hold (read in natural order: 2.png before 10.png).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
#: Extra single-image formats :class:`VideoReader` and :func:`read_image` accept (one frame).
_SINGLE_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + (".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Video containers :class:`VideoReader` opens with OpenCV (anything else not an image is tried too).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
#: OpenCV codec per output extension (.avi always; .mp4/.m4v/.mov/.mkv only without PyAV, see VideoWriter).
_WRITE_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
#: Extensions :class:`VideoWriter` writes (besides image folders).
_WRITE_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".gif", ".avi")
#: Frame rate assumed for image folders, single images and videos that report none (VoxCeleb's rate).
DEFAULT_FPS = 25.0

# Floats this far outside [0, 1] are clamped (interpolation overshoot); further out they are rejected.
_FLOAT_SLACK = 0.1


# --------------------------------------------------------------------------------------------
# normalising one frame
# --------------------------------------------------------------------------------------------
def describe(x) -> str:
    """``"shape (H, W, 3), dtype uint8"``-style text for error messages about an array or tensor ``x``."""
    shape = tuple(x.shape) if hasattr(x, "shape") else "?"
    dtype = str(x.dtype).replace("torch.", "") if hasattr(x, "dtype") else type(x).__name__
    return f"shape {shape}, dtype {dtype}"


def _tensor_to_hwc(t: torch.Tensor, what: str) -> torch.Tensor:
    """(3,H,W) / (1,3,H,W) / (H,W,3) / (H,W) tensor -> (H, W, C) tensor (no dtype change)."""
    t = t.detach()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: expected one frame, got a batch of {t.shape[0]} ({describe(t)}); "
                             "index one frame first")
        t = t[0]
    if t.ndim == 3:
        if t.shape[0] in (1, 3, 4):          # channels first, the torch convention, wins when ambiguous
            t = t.permute(1, 2, 0)
        elif t.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{what}: expected a (3, H, W) or (H, W, 3) image tensor, got {describe(t)}")
    elif t.ndim != 2:
        raise ValueError(f"{what}: expected a (3, H, W) or (H, W, 3) image tensor, got {describe(t)}")
    return t


def _float_to_uint8(x, what: str, original):
    """Float array/tensor in [0, 1] -> uint8 of the same kind (NumPy or torch)."""
    if isinstance(x, torch.Tensor):
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what}: float image contains NaN or inf ({describe(original)})")
    if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
        raise ValueError(f"{what}: float images must hold values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         f"({describe(original)}); divide a [0, 255] image by 255 or pass uint8")
    if isinstance(x, torch.Tensor):
        return (x.float().clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return np.rint(np.clip(x.astype(np.float32, copy=False), 0.0, 1.0) * 255.0).astype(np.uint8)


def as_rgb_uint8(x, what: str = "frame") -> np.ndarray:
    """Any accepted image (see the module docstring) -> contiguous (H, W, 3) uint8 RGB NumPy array.

    A uint8 (H, W, 3) C-contiguous NumPy input is returned as is (no copy).
    """
    original = x
    if isinstance(x, torch.Tensor):
        if x.numel() == 0:
            raise ValueError(f"{what}: empty image ({describe(x)})")
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{what}: not an image dtype ({describe(x)}); pass uint8 or float in [0, 1]")
        t = _tensor_to_hwc(x, what)
        if t.is_floating_point():
            t = _float_to_uint8(t, what, original)
        elif t.dtype == torch.uint8:
            pass
        else:                                # other integer tensors: checked and converted in NumPy
            t = t.to(torch.int64)
        x = t.cpu().numpy()
    elif not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes, os.PathLike)) or x is None or np.isscalar(x):
            raise TypeError(f"{what}: expected an image array or tensor, got {type(x).__name__}")
        try:
            x = np.asarray(x)
        except Exception as exc:             # noqa: BLE001 - reported with context below
            raise TypeError(f"{what}: cannot convert {type(original).__name__} to an image array: {exc}") from exc
        if x.dtype == object:
            raise TypeError(f"{what}: cannot convert {type(original).__name__} to an image array")
    else:
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 3 and x.shape[-1] not in (1, 3, 4) and x.shape[0] in (1, 3, 4):
            raise ValueError(f"{what}: NumPy images are channels-last (H, W, C), got {describe(x)} which looks "
                             "channels-first; transpose it with x.transpose(1, 2, 0)")

    if x.size == 0:
        raise ValueError(f"{what}: empty image ({describe(original)})")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"{what}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got {describe(original)}")
    channels = x.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(f"{what}: expected 1 (gray), 3 (RGB) or 4 (RGBA) channels, got {channels} "
                         f"({describe(original)})")

    if x.dtype == np.uint8:
        pass
    elif x.dtype == np.bool_ or x.dtype.kind in "cOUSV":
        raise ValueError(f"{what}: not an image dtype ({describe(original)}); pass uint8 or float in [0, 1]")
    elif x.dtype.kind == "f":
        x = _float_to_uint8(x, what, original)
    elif x.dtype == np.uint16:
        x = ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)   # 16-bit image: x / 257
    elif x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{what}: integer images must hold values in [0, 255], got [{lo}, {hi}] "
                             f"({describe(original)})")
        x = x.astype(np.uint8)
    else:                                    # pragma: no cover - every NumPy kind is handled above
        raise ValueError(f"{what}: unsupported dtype ({describe(original)})")

    if channels == 1:
        x = np.repeat(x, 3, axis=2)
    elif channels == 4:
        x = x[:, :, :3]
    return np.ascontiguousarray(x)


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """An OpenCV-decoded frame (BGR, BGRA or gray) -> (H, W, 3) uint8 RGB."""
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def is_path(x) -> bool:
    """Whether ``x`` names a file or folder (str or os.PathLike) rather than holding pixels."""
    return isinstance(x, (str, os.PathLike))


def _decode_image_file(path: str) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB; errors name the path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an image file (VideoReader reads image folders)")
    try:
        data = np.fromfile(path, dtype=np.uint8)   # imdecode also handles non-ASCII paths on Windows
    except OSError as exc:
        raise ValueError(f"cannot read image file {path}: {exc}") from exc
    # IMREAD_COLOR: 8-bit BGR, EXIF orientation applied, gray replicated, alpha dropped.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is not None:
        return _bgr_to_rgb(image)
    try:                                          # formats this OpenCV build lacks (imageio's Pillow plugin)
        import imageio.v3 as iio

        image = iio.imread(path, index=0, plugin="pillow")
    except Exception:                              # noqa: BLE001 - any failure means "not an image"
        image = None
    if image is None:
        raise ValueError(f"cannot read {path} as an image: it is empty, corrupt or not an image format that "
                         "OpenCV or imageio can decode")
    return as_rgb_uint8(image, what=f"image {path}")


def read_image(path_or_array, what: Optional[str] = None) -> np.ndarray:
    """Load or normalise one image -> (H, W, 3) uint8 RGB NumPy array.

    ``path_or_array``: a path to any image file OpenCV (or imageio) decodes (alpha dropped, 16-bit
    reduced to 8-bit, grayscale replicated, EXIF orientation applied), or an array/tensor following the
    module's rules (gray -> replicated, RGBA -> alpha dropped, float [0, 1] -> scaled, (3, H, W) tensors
    -> channels last). ``what`` names the input in error messages (default: the path or "image").
    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a non-image file or an array of
    the wrong shape/dtype (the message gives the shape and dtype), ``TypeError`` for other objects.
    An input that is already (H, W, 3) uint8 and contiguous is returned without a copy.
    """
    if is_path(path_or_array):
        return _decode_image_file(os.fspath(path_or_array))
    return as_rgb_uint8(path_or_array, what or "image")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _list_image_folder(folder: str) -> List[str]:
    names = [n for n in os.listdir(folder)
             if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _check_fps(fps, what: str = "fps") -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {fps!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {fps!r}")
    return value


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
class VideoReader:
    """Lazy frame reader for a video file, an image folder, a single image or a camera.

    ``source``: a video path (.mp4, .avi, .mov, .mkv, .webm, .gif, ... anything OpenCV's FFmpeg backend
    decodes), a folder of .png/.jpg/.jpeg/.bmp files (natural order: 2.png before 10.png; hidden files
    skipped), a single image file (one frame), or an int camera index (live: no frame count).
    ``fps``: the frame rate for folders and single images, and for videos that report none (default 25).

    Iterating yields (H, W, 3) uint8 RGB frames one at a time: a frame is decoded only when asked for
    (nothing is read ahead). Each new iteration of a file starts again from its first frame; a camera
    continues live. Attributes: ``fps`` (float), ``frame_count`` (int, or None when unknown; for videos
    it is the container's count, which may be approximate), ``size`` ((W, H), or None until a frame has
    been read when the container does not say), ``kind`` ("video", "folder", "image" or "camera").

    Errors: a missing path -> ``FileNotFoundError``; a file OpenCV cannot open (not a video, truncated,
    empty), an empty image folder or an unopenable camera -> ``ValueError`` raised here, at construction;
    a video that opens but decodes no frame -> ``ValueError("... contains no frames")`` when iterated;
    image-folder frames of different sizes -> ``ValueError`` at the first odd one.
    A context manager: leaving the ``with`` block (or ``close()``) releases the capture.
    """

    def __init__(self, source: Union[PathLike, int], fps: Optional[float] = None):
        self._fps_arg = None if fps is None else _check_fps(fps)
        self._capture = None
        self._files: List[str] = []
        self._image: Optional[np.ndarray] = None
        self._used = False
        self._closed = False
        self.size: Optional[Tuple[int, int]] = None
        self.frame_count: Optional[int] = None
        self.fps: float = self._fps_arg or DEFAULT_FPS

        if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
            self.kind = "camera"
            self.source = int(source)
            self.name = f"camera {self.source}"
            self._open_capture()
            return
        if not is_path(source):
            raise TypeError(f"VideoReader: expected a path or a camera index, got {type(source).__name__}")
        path = os.fspath(source)
        self.source = path
        self.name = path
        if not os.path.exists(path):
            raise FileNotFoundError(f"video source not found: {path}")
        if os.path.isdir(path):
            self.kind = "folder"
            self._files = _list_image_folder(path)
            if not self._files:
                raise ValueError(f"image folder {path} contains no frames (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            first = read_image(self._files[0])
            self.size = (first.shape[1], first.shape[0])
            self.frame_count = len(self._files)
        elif os.path.splitext(path)[1].lower() in _SINGLE_IMAGE_EXTENSIONS:
            self.kind = "image"
            self._image = read_image(path)
            self.size = (self._image.shape[1], self._image.shape[0])
            self.frame_count = 1
        else:
            self.kind = "video"
            self._open_capture()

    # -- capture handling -----------------------------------------------------------------
    def _open_capture(self) -> None:
        capture = cv2.VideoCapture(self.source)
        if not capture.isOpened():
            capture.release()
            if self.kind == "camera":
                raise ValueError(f"cannot open {self.name}: no such camera, or it is busy")
            size = os.path.getsize(self.source)
            detail = "the file is empty" if size == 0 else (
                "it is not a video OpenCV can decode (corrupt, truncated, or another kind of file)")
            raise ValueError(f"cannot open video {self.source}: {detail}")
        self._capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        if self._fps_arg is None and np.isfinite(fps) and 0 < fps <= 1000:
            self.fps = float(fps)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (width, height) if width > 0 and height > 0 else None
        if self.kind == "video":
            count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
            self.frame_count = int(count) if np.isfinite(count) and count > 0 else None

    def close(self) -> None:
        """Release the capture (idempotent). Iterating a closed reader raises ``ValueError``."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._closed = True

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VideoReader({self.name!r}, kind={self.kind}, fps={self.fps:g}, "
                f"frame_count={self.frame_count}, size={self.size})")

    # -- frames -----------------------------------------------------------------------------
    def _frames(self) -> Iterator[np.ndarray]:
        """Frames of one pass, with no check for an empty pass (the caller does that)."""
        if self._closed:
            raise ValueError(f"VideoReader({self.name!r}) is closed")
        if self.kind == "image":
            yield self._image
            return
        if self.kind == "folder":
            for index, path in enumerate(self._files):
                frame = read_image(path)
                size = (frame.shape[1], frame.shape[0])
                if size != self.size:
                    raise ValueError(f"image folder {self.source}: frame {index} ({os.path.basename(path)}) is "
                                     f"{size[0]}x{size[1]} but the first frame is {self.size[0]}x{self.size[1]}; "
                                     "all frames must have one size")
                yield frame
            return
        if self.kind == "video" and self._used:       # a new pass over a file starts from its beginning
            self._capture.release()
            self._capture = None
            self._open_capture()
        self._used = True
        while True:
            if self._capture is None:                 # closed while iterating
                return
            ok, frame = self._capture.read()
            if not ok or frame is None:
                return
            frame = _bgr_to_rgb(frame)
            if self.size is None:
                self.size = (frame.shape[1], frame.shape[0])
            yield frame

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield (H, W, 3) uint8 RGB frames lazily; ``ValueError`` if the pass yields none."""
        count = 0
        for frame in self._frames():
            count += 1
            yield frame
        if count == 0:
            raise ValueError(f"{'video ' if self.kind == 'video' else ''}{self.name} contains no frames "
                             "(empty or corrupt)")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
class VideoWriter:
    """Write (H, W, 3) uint8 RGB frames (or any image :func:`read_image` accepts, e.g. float tensors in
    [0, 1] of shape (3, H, W), (1, 3, H, W) or (H, W, 3)) to a video file, an animated GIF or an image folder,
    optionally with the sound of another file.

    ``path`` decides the output (``dagan_fast.media.audio`` has the table): .mp4/.m4v/.mov/.mkv: H.264 with
    AAC sound (PyAV); .webm: VP9 with Opus sound (PyAV); .gif: looping animated GIF (PyAV; no sound); .avi:
    Motion JPEG (OpenCV; no sound); a path ending in '/', an existing folder or a path with no extension:
    an image folder (000000.png, 000001.png, ...; lossless; existing files of the same names are
    overwritten; the sound goes to audio.wav beside them). Other extensions raise ``ValueError``.
    Without PyAV (or without libx264 in it), .mp4/.m4v/.mov/.mkv are written by OpenCV with 'mp4v'
    (MPEG-4 Part 2: many browsers and phones do not play it) and no sound, with a :class:`MediaWarning`.
    ``fps``: frames per second (> 0). ``size``: (W, H); if None, the first frame fixes it. A later frame
    of another size raises ``ValueError`` (resize frames yourself: the writer never does silently).
    ``fourcc``: force OpenCV's writer with this codec (4 characters), e.g. "mp4v" (no sound).
    ``audio``: a media file (the driving video) whose sound the output carries, aligned to its first video
    frame and cut to exactly ``frames_written / fps`` seconds (``dagan_fast.media.audio.AudioTrack``); a file
    without sound, an image or a folder adds none. Outputs that cannot hold sound (.gif, .avi, ``fourcc``)
    warn that it is dropped.

    Codecs that store yuv420 (H.264, VP9, mp4v, MJPG) need even sizes (OpenCV would silently crop odd
    ones): an odd width/height is padded by one replicated pixel column/row, so the file is
    (W + W%2, H + H%2) and nothing is lost.
    The parent folder is created if needed; a location that cannot be written raises ``OSError`` (at
    construction when possible, else at the first frame, when the encoder opens). If no frame was written
    and no size was given, no file is created.
    Attributes after opening: ``codec`` (what the video is written with: "h264", "vp9", "gif", "png",
    "mp4v", "MJPG", ...), ``audio_codec`` ("aac", "opus", "pcm_s16le" or None), ``backend`` ("pyav",
    "opencv" or "png"), ``frames_written``, ``size``.
    A context manager: leaving the ``with`` block (or ``close()``) finalises the file (and the sound).
    """

    def __init__(self, path: PathLike, fps: float = DEFAULT_FPS, size: Optional[Tuple[int, int]] = None,
                 fourcc: Optional[str] = None, audio=None):
        from . import audio as _audio

        if not is_path(path):
            raise TypeError(f"VideoWriter: expected an output path, got {type(path).__name__}")
        raw = os.fspath(path)
        self.path = raw.rstrip("/" + os.sep) or raw
        self.fps = _check_fps(fps)
        self.size: Optional[Tuple[int, int]] = None
        self.frames_written = 0
        self.audio_codec: Optional[str] = None
        self._writer = None                  # OpenCV writer
        self._container = None               # PyAV output container (video files and GIFs)
        self._stream = None
        self._graph = None                   # GIF palette filter graph
        self._audio_encoder = None
        self._track = None
        self._closed = False
        ext = os.path.splitext(self.path)[1].lower()
        folder_like = raw.endswith(("/", os.sep)) or os.path.isdir(raw) or ext == ""
        self._ext = ext
        if folder_like:
            self.kind = "folder"
            self.fourcc = None
            self.backend, self.codec = "png", "png"
            self._make_dirs(self.path, "output folder")
        else:
            if ext in _SINGLE_IMAGE_EXTENSIONS:
                raise ValueError(f"VideoWriter({raw!r}): {ext} is an image extension; write a video "
                                 f"({', '.join(_WRITE_EXTENSIONS)}) or an image folder (a path ending in '/')")
            if fourcc is None and ext not in _WRITE_EXTENSIONS:
                raise ValueError(f"VideoWriter({raw!r}): unsupported video extension {ext!r}; use one of "
                                 f"{', '.join(_WRITE_EXTENSIONS)}, or a path ending in '/' for an image folder")
            self.kind = "video"
            if os.path.isdir(self.path):
                raise ValueError(f"VideoWriter: {self.path} is an existing folder, not a video file name")
            self._make_dirs(os.path.dirname(os.path.abspath(self.path)), "folder for the video")
            wanted = _audio.OUTPUT_FORMATS.get(ext, (None, None))[0]
            if fourcc is not None or wanted == "MJPG":
                self.backend, self.fourcc = "opencv", fourcc or _WRITE_FOURCC[ext]
            elif _audio.has_encoder(wanted):
                self.backend, self.fourcc = "pyav", None
            elif ext in _WRITE_FOURCC:
                self.backend, self.fourcc = "opencv", _WRITE_FOURCC[ext]
                why = _audio.PYAV_MISSING if _audio.pyav() is None else f"this PyAV's FFmpeg has no {wanted} encoder"
                warnings.warn(f"{self.path}: written as MPEG-4 Part 2 ('mp4v') without sound, which many browsers and "
                              f"phones do not play: {why}", _audio.MediaWarning, stacklevel=2)
            else:
                why = _audio.PYAV_MISSING if _audio.pyav() is None else f"this PyAV's FFmpeg has no {wanted} encoder"
                raise ValueError(f"VideoWriter({raw!r}): cannot write {ext} here: {why}; write .mp4 or .avi instead")
            if self.backend == "opencv" and len(self.fourcc) != 4:
                raise ValueError(f"VideoWriter: fourcc must have 4 characters, got {self.fourcc!r}")
            self.codec = {"libx264": "h264", "libvpx-vp9": "vp9", "gif": "gif"}.get(wanted) \
                if self.backend == "pyav" else self.fourcc
        if audio is not None:
            if isinstance(audio, _audio.AudioTrack):
                self._track = audio
            elif is_path(audio):
                rate = 48000 if ext == ".webm" else None
                self._track = _audio.AudioTrack.open(audio, rate=rate,
                                                     warn_missing_pyav=self.backend != "opencv")
            else:
                raise TypeError(f"VideoWriter: audio must be a path or an AudioTrack, got {type(audio).__name__}")
            holds_sound = self.kind == "folder" or (self.backend == "pyav" and ext != ".gif")
            if self._track is not None and not holds_sound:
                what = "GIF has no sound" if ext == ".gif" else f"{self.codec!r} via OpenCV is written without sound"
                warnings.warn(f"{self.path}: the sound of {self._track.path} is dropped ({what}); write .mp4, .webm "
                              "or an image folder to keep it", _audio.MediaWarning, stacklevel=2)
                self._track.close()
                self._track = None
            if self._track is not None and self.kind == "folder" and _audio.pyav() is None:
                self._track = None
        if size is not None:
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size)):
                raise ValueError(f"VideoWriter: size must be (width, height) positive ints, got {size!r}")
            self.size = (int(size[0]), int(size[1]))
            if self.kind == "video":
                self._open()

    @staticmethod
    def _make_dirs(folder: str, what: str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the {what} {folder}: {exc.strerror or exc}") from exc
        if not os.access(folder, os.W_OK):
            raise OSError(f"cannot write to the {what} {folder}: permission denied")

    def _open(self) -> None:
        if self.backend == "pyav":
            self._open_pyav()
            return
        width, height = self.size
        padded = (width + width % 2, height + height % 2)
        writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, padded)
        if not writer.isOpened():
            writer.release()
            raise OSError(f"cannot create video {self.path}: OpenCV's VideoWriter did not open with codec "
                          f"{self.fourcc!r} (is the location writable? 'mp4v' for .mp4, 'MJPG' for .avi work "
                          "with the opencv-python wheels)")
        self._writer = writer

    def _open_pyav(self) -> None:
        import av
        from fractions import Fraction

        from .audio import AudioEncoder, OUTPUT_FORMATS

        width, height = self.size
        rate = Fraction(self.fps).limit_denominator(1001 * 1000)
        try:
            container = av.open(self.path, "w")
        except Exception as exc:                  # noqa: BLE001 - av.error.* (permissions, bad path)
            raise OSError(f"cannot create video {self.path}: {exc}") from None
        video_codec, audio_codec = OUTPUT_FORMATS[self._ext]
        try:
            if video_codec == "gif":
                stream = container.add_stream("gif", rate=rate)
                stream.width, stream.height = width, height
                stream.pix_fmt = "pal8"
                self._graph = self._gif_palette_graph(width, height, rate)
            else:
                options = ({"crf": "18", "preset": "fast"} if video_codec == "libx264" else
                           {"crf": "32", "b": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"})
                stream = container.add_stream(video_codec, rate=rate, options=options)
                stream.width, stream.height = width + width % 2, height + height % 2
                stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / rate
            if self._track is not None and audio_codec is not None:
                self._audio_encoder = AudioEncoder(container, audio_codec, self._track,
                                                   bit_rate=160_000 if audio_codec == "aac" else 128_000)
                self.audio_codec = "opus" if audio_codec == "libopus" else audio_codec
        except Exception:
            container.close()
            raise
        self._container, self._stream = container, stream

    @staticmethod
    def _gif_palette_graph(width: int, height: int, rate):
        """rgb24 -> pal8 with a palette computed per frame (palettegen stats_mode=single, paletteuse new=1)."""
        import av.filter

        graph = av.filter.Graph()
        src = graph.add_buffer(width=width, height=height, format="rgb24", time_base=1 / rate)
        split = graph.add("split")
        palette = graph.add("palettegen", "stats_mode=single")
        use = graph.add("paletteuse", "new=1")
        sink = graph.add("buffersink")
        src.link_to(split)
        split.link_to(use, 0, 0)
        split.link_to(palette, 1, 0)
        palette.link_to(use, 0, 1)
        use.link_to(sink)
        graph.configure()
        return graph

    def _encode(self, frame) -> None:
        """Encode one av.VideoFrame (None flushes), through the GIF palette graph when there is one."""
        import av

        frames = [frame]
        if self._graph is not None:
            self._graph.push(frame)
            frames = []
            while True:
                try:
                    frames.append(self._graph.pull())
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
            if frame is None:
                frames.append(None)
        for item in frames:
            for packet in self._stream.encode(item):
                self._container.mux(packet)

    def write(self, frame) -> None:
        """Append one frame: (H, W, 3) uint8 RGB or anything :func:`read_image` accepts."""
        if self._closed:
            raise ValueError(f"VideoWriter({self.path!r}) is closed")
        image = as_rgb_uint8(frame, what=f"frame {self.frames_written} written to {self.path}")
        size = (image.shape[1], image.shape[0])
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise ValueError(f"frame {self.frames_written} written to {self.path} is {size[0]}x{size[1]} (WxH) "
                             f"but the output is {self.size[0]}x{self.size[1]}; all frames must have one size "
                             "(resize them first)")
        if self.kind == "folder":
            name = os.path.join(self.path, f"{self.frames_written:06d}.png")
            if not cv2.imwrite(name, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {name}")
        elif self.backend == "pyav":
            import av

            if self._container is None:
                self._open()
            if self._graph is None and (size[0] % 2 or size[1] % 2):
                image = cv2.copyMakeBorder(image, 0, size[1] % 2, 0, size[0] % 2, cv2.BORDER_REPLICATE)
            video_frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            video_frame.pts = self.frames_written
            self._encode(video_frame)
            if self._audio_encoder is not None:       # interleave: the sound up to the end of this frame
                self._audio_encoder.until((self.frames_written + 1) / self.fps)
        else:
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            if self._writer is None:
                self._open()
            if size[0] % 2 or size[1] % 2:
                bgr = cv2.copyMakeBorder(bgr, 0, size[1] % 2, 0, size[0] % 2, cv2.BORDER_REPLICATE)
            self._writer.write(bgr)
        self.frames_written += 1

    def write_all(self, frames) -> int:
        """Write every frame of ``frames`` (anything :func:`iter_frames` accepts); returns the count."""
        count = 0
        for frame in iter_frames(frames):
            self.write(frame)
            count += 1
        return count

    def close(self) -> None:
        """Finalise and release the file, with its sound cut to ``frames_written / fps`` seconds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        duration = self.frames_written / self.fps
        try:
            if self._writer is not None:
                self._writer.release()
                self._writer = None
            if self._container is not None:
                try:
                    self._encode(None)
                    if self._audio_encoder is not None:
                        self._audio_encoder.finish(duration)
                finally:
                    self._container.close()
                    self._container = None
            elif self.kind == "folder" and self._track is not None and self.frames_written:
                from .audio import write_wav

                write_wav(self._track, os.path.join(self.path, "audio.wav"), duration)
                self.audio_codec = "pcm_s16le"
        finally:
            if self._track is not None:
                self._track.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VideoWriter({self.path!r}, kind={self.kind}, codec={self.codec}, audio={self.audio_codec}, "
                f"fps={self.fps:g}, size={self.size})")


# --------------------------------------------------------------------------------------------
# streams of frames
# --------------------------------------------------------------------------------------------
def _reader_frames(reader: VideoReader, close: bool) -> Iterator[np.ndarray]:
    try:
        yield from reader
    finally:
        if close:
            reader.close()


def _normalised(frames: Iterable, what: str) -> Iterator[np.ndarray]:
    count = 0
    for index, frame in enumerate(frames):
        yield read_image(frame, what=f"frame {index} of {what}")
        count += 1
    if count == 0:
        raise ValueError(f"{what} contains no frames")


def iter_frames(source, fps: Optional[float] = None) -> Iterator[np.ndarray]:
    """Turn any frame source into a lazy iterator of (H, W, 3) uint8 RGB frames.

    ``source``: a path (video, image folder or image: opened with :class:`VideoReader`, closed when the
    iterator ends), an int camera index, a :class:`VideoReader` (not closed here), a NumPy array or
    tensor (4-D: a stack of frames along the first axis, (T, H, W, C) or, for tensors, (T, 3, H, W);
    2-D or 3-D: one frame), or any other iterable of frames/image paths. ``fps`` is passed to
    :class:`VideoReader` for paths. Frames are converted by :func:`read_image`'s rules, one at a time.
    Errors: opening errors are raised by this call; a source that yields no frame raises
    ``ValueError("... contains no frames")`` when iterated; a non-iterable raises ``TypeError``.
    """
    if isinstance(source, VideoReader):
        return _reader_frames(source, close=False)
    if is_path(source) or (isinstance(source, (int, np.integer)) and not isinstance(source, bool)):
        return _reader_frames(VideoReader(source, fps=fps), close=True)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source.ndim == 4:
            return _normalised(iter(source), what=f"the frame stack ({describe(source)})")
        return _normalised(iter([source]), what="the frame")
    try:
        iterator = iter(source)
    except TypeError:
        raise TypeError(f"iter_frames: expected a path, a VideoReader, an array or an iterable of frames, got "
                        f"{type(source).__name__}") from None
    return _normalised(iterator, what=f"the {type(source).__name__} of frames")


# --------------------------------------------------------------------------------------------
# model side
# --------------------------------------------------------------------------------------------
def center_square(frame: np.ndarray) -> np.ndarray:
    """The largest centred square of an (H, W, C) array (a view; odd leftovers go to the bottom/right)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return frame[y0:y0 + side, x0:x0 + side]


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Resize a square (S, S, C) uint8 frame to (size, size, C): INTER_AREA to shrink, INTER_LINEAR to enlarge."""
    side = frame.shape[0]
    if side == size:
        return frame
    interpolation = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    return cv2.resize(frame, (size, size), interpolation=interpolation)


def to_tensor(frame, size: Optional[int] = None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One frame -> model input of shape (1, 3, S, S), ``dtype`` (float32) RGB in [0, 1].

    ``frame``: anything :func:`read_image` accepts (paths included). A non-square frame is first
    centre-cropped to its largest square (the aspect ratio is kept; the sides are cut, as for a
    landscape webcam frame whose face is near the middle: use ``dagan_fast.media.face`` for a face-centred
    crop), then resized to ``size`` x ``size`` (cv2.INTER_AREA when shrinking, INTER_LINEAR when
    enlarging); ``size=None`` keeps the square's side S = min(H, W). ``device``: where the tensor goes
    (the uint8 frame is moved first, then converted there).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"to_tensor: dtype must be a floating type, got {dtype}")
    image = read_image(frame, what="to_tensor frame")
    square = center_square(image)
    if size is not None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"to_tensor: size must be a positive int, got {size!r}")
        square = resize_square(np.ascontiguousarray(square), int(size))
    tensor = torch.from_numpy(np.ascontiguousarray(square))
    if device is not None:
        tensor = tensor.to(device)
    return tensor.permute(2, 0, 1).unsqueeze(0).to(dtype).div_(255.0).contiguous()


def to_uint8(tensor) -> np.ndarray:
    """Model output (1, 3, H, W), (3, H, W) or (H, W, 3) float in [0, 1] (or uint8) -> (H, W, 3) uint8 RGB.

    Values within 0.1 outside [0, 1] are clamped; NaN/inf, values further out and batches of more than
    one frame raise ``ValueError``. The conversion runs on the tensor's device; only uint8 data moves.
    """
    return as_rgb_uint8(tensor, what="to_uint8 input")
