"""``Animator``: animate one source portrait with a stream of driving frames, lazily, one output per input.

    from dagan_fast import Animator
    animator = Animator("dagan.safetensors", "portrait.jpg")          # source work done once, here
    for out in animator.stream(VideoReader("talk.mp4")):               # (256, 256, 3) uint8 RGB each
        ...

What happens where:

* ``__init__`` / :meth:`Animator.set_source` run everything that depends on the source only, once: the
  source depth, the source keypoints, the generator's encoder features, the depth-feature encoding and the
  attention's source-side projections (queries; for DaGAN++ the depth-feature keys/values of every layer),
  and the downsampled source of the dense-motion network (``DaGAN.prepare_source``-equivalent; see
  ``generator.encode_source``).
* per driving frame (``stream``): the frame is validated and converted (numpy uint8 RGB, grayscale,
  RGBA or tensors, by ``dagan_fast.media.video``'s rules; non-square frames are centre-cropped, then resized to
  the model's size), then only driving work runs: depth and keypoints of the frame, optional One-Euro
  smoothing, the relative-motion transfer against the reference frame, and the generator with the cached
  source features. Model calls run under ``torch.inference_mode()`` and ``skip_value_checks()`` (the
  frame was checked here already).
* ``animate_video(frames, batch_size=B)`` runs the same computation with B driving frames per network
  call (throughput mode); it yields the same frames as ``stream`` (to float32 rounding, ~1e-6).

Reference frame for relative motion (``relative=True``, the official default; the keypoint motion between
the reference frame and each frame is added to the source keypoints, Jacobians likewise):

* ``reference="first"``: frame 0. Its output reproduces the source pose exactly (kp_norm == kp_source).
* ``reference=k`` (int): frame k, as the official demo with a chosen initial frame. Causality needs frame
  k before frames 0..k-1 can be generated, so the outputs of frames 0..k are delayed until frame k has
  arrived (their driving depth and keypoints are kept meanwhile, not the frames); a stream with k or
  fewer frames raises ``ValueError`` at its end.
* ``reference="best"``: the frame whose keypoints best match the source's, the official
  ``find_best_frame`` score (keypoints centred and divided by the square root of their convex hull area,
  then the squared distance; the official demo uses face-alignment landmarks, we use the model's own
  keypoints) computed causally over the first ``best_frames`` frames (default 10): frame i < best_frames
  is animated against the best of frames 0..i (so frame 0 always against itself, and the reference can
  switch during the first ``best_frames`` outputs, ties keep the earlier frame); from frame
  ``best_frames`` on the reference is frozen. No output is delayed.
* :meth:`Animator.reset_reference` re-anchors: the next frame becomes the reference (the avatarify "X
  key"); it also ends a "best" search still running.

Devices and precision: ``dtype="auto"`` by default: bfloat16 on a CPU with AMX or AVX512-BF16, float32 on
other CPUs and on CUDA (``streaming.precision``; ``DAGAN_FAST_DTYPE`` overrides the pick);
``dtype=torch.float64`` converts the whole model. ``dtype=torch.bfloat16`` (CPU or CUDA) or
``torch.float16`` (CUDA) runs the depth network and the generator (convolutions, normalisations,
attention) with low-precision weights and activations while the keypoint detector, the Jacobians, the
relative-motion transfer, the Taylor motion and the mask softmax stay float32 (``models.dense_motion``).
On the CPU (float32 and bfloat16) the convolutions run channels_last through oneDNN with their weights
packed once (``models.packed_conv``). On CUDA the per-frame work is also captured in CUDA
graphs (one pair per input shape; ``cuda_graphs=False`` to disable), uploads go through pinned host
buffers (``non_blocking``), ``animate_video`` downloads asynchronously and overlaps the host work of the
next batch with the GPU, and ``compile=True`` wraps the per-frame functions in ``torch.compile``.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import sys
from collections import deque
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..ops._validate import skip_value_checks

__all__ = ["Animator", "DEFAULT_SIZE", "DEFAULT_BEST_FRAMES", "MODEL_REQUIRED_MESSAGE", "keep_freed_memory"]

Tensor = torch.Tensor
KP = Dict[str, Tensor]

#: Model input size used when neither ``size`` nor a float-tensor source says otherwise (DaGAN's native 256).
DEFAULT_SIZE = 256
#: Frames scanned by ``reference="best"``.
DEFAULT_BEST_FRAMES = 10

MODEL_REQUIRED_MESSAGE = (
    "without a model the bundled tiny 64x64 model (trained on synthetic clips) runs; for real videos convert the "
    "DaGAN authors' release once with `dagan-fast convert --checkpoint DaGAN_vox_adv_256.pth.tar "
    "--depth-encoder encoder.pth --depth-decoder depth.pth --out dagan.safetensors` and pass that file, or pass a "
    "loaded model "
    "(dagan_fast.DaGAN.load(path) or DaGAN.from_official(checkpoint, encoder, decoder)), or the official "
    ".pth.tar with depth_encoder=... and depth_decoder=...")

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOAT_SLACK = 0.1          # as dagan_fast.media.video: floats this far outside [0, 1] are clamped


# --------------------------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------------------------
def load_model(model, *, depth_encoder=None, depth_decoder=None, map_location="cpu") -> nn.Module:
    """A model object from ``model``: a loaded model (returned as is), a dagan_fast safetensors file
    (``checkpoints.load``: DaGAN or DaGAN++, as the file says), or the authors' ``.pth.tar`` checkpoint
    with ``depth_encoder`` (encoder.pth) and ``depth_decoder`` (depth.pth) (``DaGAN.from_official``).
    ``None``: the bundled tiny model (``dagan_fast.checkpoints.pretrained``); a missing file raises ``FileNotFoundError``."""
    if model is None:
        from ..checkpoints.pretrained import load_default
        return load_default(map_location=map_location)
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"Animator: model must be a loaded model (e.g. dagan_fast.DaGAN) or a path, got "
                        f"{type(model).__name__}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Animator: model file not found: {path} ({MODEL_REQUIRED_MESSAGE})")
    if os.path.isdir(path):
        raise ValueError(f"Animator: model {path} is a folder; pass the .safetensors file (or the .pth.tar)")
    from .. import checkpoints
    from ..models.dagan import DaGAN

    lower = path.lower()
    official = lower.endswith((".pth.tar", ".pth", ".tar", ".pt", ".ckpt"))
    if depth_encoder is not None or depth_decoder is not None or official:
        if depth_encoder is None or depth_decoder is None:
            raise ValueError(f"Animator: model {path} looks like an official DaGAN checkpoint; it needs the depth "
                             "network's files too: pass depth_encoder='encoder.pth' and depth_decoder='depth.pth' "
                             "(or convert once with `dagan-fast convert` and pass the .safetensors file)")
        return DaGAN.from_official(path, depth_encoder, depth_decoder, map_location=map_location)
    return checkpoints.load(path, map_location=map_location)  # DaGAN or DaGAN++, as the file says


_MALLOC_KEPT: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Stops glibc from returning large freed blocks to the kernel, once per process (CPU animators call it).

    By default glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh
    ``mmap``s and unmaps them on free, so every frame faults its large activations in again page by page
    (float32 DaGAN 256: 18401 minor faults = 72 MiB per streamed frame, measured with getrusage; bfloat16
    halves the tensors below the threshold: ~0). ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and
    ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` keep those blocks in the heap for reuse: 0 faults per frame, ~6%
    less CPU time per float32 frame on this project's VM; the process keeps its peak heap instead of
    shrinking between frames. ``DAGAN_FAST_MALLOC_KEEP=0`` leaves the allocator alone. Returns whether the
    setting is in effect (False off glibc)."""
    global _MALLOC_KEPT
    if _MALLOC_KEPT is None:
        _MALLOC_KEPT = False
        if os.environ.get("DAGAN_FAST_MALLOC_KEEP", "1").strip() != "0" and sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL("libc.so.6")
                m_trim_threshold, m_mmap_threshold = -1, -3
                _MALLOC_KEPT = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and \
                    bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
            except (OSError, AttributeError):
                _MALLOC_KEPT = False
    return _MALLOC_KEPT


def _make_smoother(smoothing, fps: Optional[float]):
    from .smoothing import KeypointSmoother

    if smoothing is None or smoothing is False:
        return None
    if smoothing is True:
        return KeypointSmoother(freq=fps)
    if isinstance(smoothing, KeypointSmoother):
        return smoothing
    if isinstance(smoothing, dict):
        params = dict(smoothing)
        params.setdefault("freq", fps)
        try:
            return KeypointSmoother(**params)
        except TypeError as exc:
            raise ValueError(f"Animator: smoothing parameters {sorted(smoothing)} are not KeypointSmoother's "
                             f"(min_cutoff, beta, d_cutoff, freq): {exc}") from None
    raise TypeError(f"Animator: smoothing must be None, True, a dict of One-Euro parameters (min_cutoff, beta, "
                    f"d_cutoff, freq) or a KeypointSmoother, got {type(smoothing).__name__}")


def _hull_normalised(value: Tensor) -> np.ndarray:
    """(K,2) keypoints -> centred and divided by sqrt(convex hull area) (the official find_best_frame
    normalisation); a degenerate hull divides by 1."""
    from ..models.dagan import convex_hull_area

    kp = value.detach().double().cpu().numpy().reshape(-1, 2)
    kp = kp - kp.mean(axis=0, keepdims=True)
    area = convex_hull_area(kp)
    return kp / math.sqrt(area) if area > 0 else kp


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------
class _GraphedFunction:
    """``fn(*tensors) -> tuple of tensors`` replayed from a CUDA graph captured once per input shape/dtype.

    Inputs are copied into static buffers; the returned tensors are the graph's static outputs (valid until
    the next call: callers consume or copy them first)."""

    def __init__(self, fn: Callable[..., Tuple[Tensor, ...]], warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.graphs: Dict[tuple, tuple] = {}

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            static_in = tuple(t.clone() for t in inputs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            entry = (graph, static_in, static_out)
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        for buf, t in zip(static_in, inputs):
            buf.copy_(t, non_blocking=True)
        graph.replay()
        return static_out


# --------------------------------------------------------------------------------------------
# the animator
# --------------------------------------------------------------------------------------------
class Animator:
    """Animate one source image with driving frames (see the module docstring for the full behaviour).

    ``model``: a loaded model (``dagan_fast.DaGAN`` or ``dagan_fast.DaGANpp``; anything with ``depth``,
    ``kp_detector``, ``generator`` (with ``encode_source``) and ``size_multiple``) or a path: a dagan_fast
    ``.safetensors`` file, or the authors' ``.pth.tar`` with ``depth_encoder=``/``depth_decoder=`` given, or None
    for the bundled tiny 64x64 model (``dagan_fast.checkpoints.pretrained``). A model object
    is not modified: unless it went through ``optimize_for_inference()`` already, a folded copy is made
    (``optimize=False``: use it as is, unfolded; it is still moved to ``device``/``dtype``).
    ``source``: the portrait: (H, W, 3) uint8 RGB numpy (gray/RGBA accepted as ``dagan_fast.media.video``
    documents), a float tensor (3, H, W)/(1, 3, H, W) in [0, 1], or an image path. Non-square images are
    centre-cropped to a square (``face_crop=True``: cut around the detected face instead, for the source
    and, from the first driving frame on, one fixed window for the driving frames), then resized to
    ``size`` x ``size``.
    ``size``: the side the model runs at, a multiple of ``model.size_multiple`` (128 for DaGAN); default:
    the side of a float-tensor source that already is a valid (1, 3, S, S), else the size the model file
    records it was trained at (``model.image_size``), else 256.
    ``device``: default the model's device (the CPU for a path). ``dtype``: "auto" (default: bfloat16 on a CPU
    with AMX or AVX512-BF16, float32 elsewhere, see ``streaming.precision``), torch.float32 (the float32 path),
    torch.bfloat16 (CPU or CUDA), torch.float16 (CUDA), torch.float64, or those names as strings ("fp32",
    "bf16", ...). In float16/bfloat16 the keypoint detector, the Jacobians, the Taylor motion and the mask
    softmax stay float32. ``dtype_reason`` and :meth:`describe` say what was picked and why.
    ``prepack`` (default: on for CPU float32/bfloat16 with ``optimize``): oneDNN convolutions with weights
    packed once (``models.packed_conv``; the ReLU after a folded BatchNorm fused in). On the CPU the first
    Animator also tells glibc to keep freed memory for reuse (``keep_freed_memory``; no fresh-page faults
    per frame; ``DAGAN_FAST_MALLOC_KEEP=0`` to leave the allocator alone).
    ``relative`` (default True): relative motion against the reference frame (False: the driving
    keypoints are used as they are). ``adapt_scale``: scale the motion by sqrt(source hull area /
    reference hull area). ``reference``: "first", an int frame index, or "best" (``best_frames`` frames).
    ``smoothing``: None (off), True (``KeypointSmoother`` defaults), a dict of its parameters
    (``min_cutoff``, ``beta``, ``d_cutoff``, ``freq``; ``freq`` defaults to ``fps``) or a
    ``KeypointSmoother``: a causal One-Euro filter on the driving keypoints and Jacobians.
    ``compile``: wrap the per-frame networks in ``torch.compile`` (opt-in; first frames compile).
    ``cuda_graphs``: capture the per-frame work in CUDA graphs (default: on for CUDA devices).
    ``fast_conv`` (default: on for CPU float32 with ``optimize`` where the compiled op library is loaded): the
    3x3 stride-1 convolutions run Winograd F(4x4, 3x3) where it measures faster than oneDNN for the shape
    (``models.fast_conv``; up to 2x per convolution), those to 1-4 channels (the last 7x7 to RGB) a direct
    kernel vectorised over input channels (2x), outputs within ~1e-4 of the direct convolutions. The
    first frame of each batch size times both paths per convolution shape (once per process: ~2-5 s at 256 on
    2 threads). ``fast_conv=False``: the direct (oneDNN) convolutions only.
    ``source_box``: the source window the model sees, (x, y, w, h) in source pixels (made square: side
    max(w, h), centred, shifted inside the image) or a ``dagan_fast.media.face.CropWindow``; default: the
    detected face window with ``face_crop=True``, else the centre square.
    ``paste_back``: every output is the full-resolution source, (H, W, 3) uint8 RGB numpy whatever the
    input kind, with the animated window blended in under a feathered mask
    (``dagan_fast.media.paste_back.PasteBack``; pixels outside the window are the source's exactly).
    The window is found once, in :meth:`set_source`; per frame only the window is resized and blended.

    Attributes: ``model``, ``device``, ``dtype``, ``size``, ``prepared`` (the cached source work:
    ``image`` (1,3,S,S), ``depth`` (1,1,S,S), ``kp`` {"value": (1,K,2), "jacobian": (1,K,2,2)},
    ``features``), ``last_keypoints`` ({"driving", "norm"}: the keypoints of the last frame yielded,
    kp dicts with (1,K,2)/(1,K,2,2) tensors), ``frames_seen``.
    """

    def __init__(self, model, source, *, device=None, dtype: Union[None, str, torch.dtype] = "auto",
                 relative: bool = True,
                 adapt_scale: bool = False, reference: Union[str, int] = "first", smoothing=None,
                 face_crop: bool = False, size: Optional[int] = None, best_frames: int = DEFAULT_BEST_FRAMES,
                 fps: Optional[float] = None, optimize: bool = True, compile: bool = False,
                 cuda_graphs: Optional[bool] = None, fast_conv: Optional[bool] = None, prepack: Optional[bool] = None,
                 depth_encoder=None, depth_decoder=None, paste_back: bool = False, source_box=None):
        loaded = load_model(model, depth_encoder=depth_encoder, depth_decoder=depth_decoder)
        for attr in ("depth", "kp_detector", "generator", "size_multiple"):
            if not hasattr(loaded, attr):
                raise TypeError(f"Animator: model {type(loaded).__name__} lacks .{attr}; pass a dagan_fast model "
                                "(DaGAN) or a checkpoint path")
        if not hasattr(loaded.generator, "encode_source"):
            raise TypeError("Animator: model.generator has no encode_source(); pass a dagan_fast model")

        # ---- device and precision
        param = next(loaded.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Animator: device={device!r} but CUDA is not available here; use device='cpu'")
        from .precision import resolve_dtype

        dtype, self.dtype_reason = resolve_dtype(dtype, self.device)
        self.dtype = dtype
        kp_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        # ---- the model: never modify the caller's object
        owned = not isinstance(model, nn.Module)
        if fast_conv is None:
            from ..models.fast_conv import fast_convolutions_available
            fast_conv = (self.device.type == "cpu" and dtype == torch.float32 and fast_convolutions_available()
                         and (optimize or getattr(loaded, "inference_only", False)))
        if fast_conv and (self.device.type != "cpu" or dtype != torch.float32):
            raise ValueError(f"Animator: fast_conv=True runs float32 on the CPU only (device {self.device}, dtype "
                             f"{dtype}); drop it elsewhere")
        needs_copy = (optimize and not getattr(loaded, "inference_only", False)) or param.device != self.device \
            or param.dtype != kp_dtype or dtype in _LOW_PRECISION or fast_conv
        if needs_copy and not owned:
            loaded = copy.deepcopy(loaded)
        if optimize and hasattr(loaded, "optimize_for_inference") and not getattr(loaded, "inference_only", False):
            loaded.optimize_for_inference()
        loaded.eval()
        loaded.to(device=self.device, dtype=kp_dtype)
        if dtype in _LOW_PRECISION:
            # convolutions and attention in low precision; the keypoint detector (and the motion) in float32
            for name in ("depth_encoder", "depth_decoder", "generator"):
                sub = getattr(loaded, name, None)
                if sub is not None:
                    sub.to(dtype)
        # oneDNN weight prepacking (models.packed_conv): default on for CPU float32/bfloat16 inference of a
        # folded model; fast_conv's Winograd convolutions fall back to it
        cpu_onednn = self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        if prepack is None:
            prepack = cpu_onednn and (optimize or getattr(loaded, "inference_only", False))
        elif prepack and not cpu_onednn:
            raise ValueError(f"Animator: prepack=True packs oneDNN CPU convolutions in float32/bfloat16 (device "
                             f"{self.device}, dtype {dtype}, fast_conv={fast_conv}); drop it here")
        self.prepack = bool(prepack)
        if self.prepack:
            from ..models.packed_conv import packed_convolutions_available, use_packed_convolutions
            if packed_convolutions_available():
                if not owned and not needs_copy:
                    loaded = copy.deepcopy(loaded)
                    needs_copy = True
                use_packed_convolutions(loaded)
            else:
                self.prepack = False
        if fast_conv:
            from ..models.fast_conv import use_fast_convolutions
            try:
                use_fast_convolutions(loaded)
            except RuntimeError as exc:
                raise ValueError(f"Animator: {exc}") from None
        self.fast_conv = bool(fast_conv)
        self.model = loaded
        self.kp_dtype = kp_dtype
        # large per-frame activations reuse heap pages instead of fresh mmaps (see keep_freed_memory)
        self.malloc_keep = keep_freed_memory() if self.device.type == "cpu" else False

        # ---- options
        if reference not in ("first", "best") and not (isinstance(reference, (int, np.integer))
                                                       and not isinstance(reference, bool) and reference >= 0):
            raise ValueError(f"Animator: reference must be 'first', 'best' or a frame index >= 0, got {reference!r}")
        if not isinstance(best_frames, (int, np.integer)) or isinstance(best_frames, bool) or best_frames < 1:
            raise ValueError(f"Animator: best_frames must be an int >= 1, got {best_frames!r}")
        self.relative = bool(relative)
        self.adapt_scale = bool(adapt_scale)
        self.reference = reference if isinstance(reference, str) else int(reference)
        self.best_frames = int(best_frames)
        self.smoother = _make_smoother(smoothing, fps)
        self.face_crop = bool(face_crop)
        self.paste_back = bool(paste_back)
        self.source_box = source_box
        self.paster = None                       # PasteBack, set by set_source when paste_back
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("Animator: cuda_graphs=True needs a CUDA device")
        self._size_arg = size
        self._analyze_fn: Callable = self._analyze_eager
        self._generate_fn: Callable = self._generate_eager
        if compile:
            self._analyze_fn = torch.compile(self._analyze_fn, dynamic=False)
            self._generate_fn = torch.compile(self._generate_fn, dynamic=False)
        self._graph_analyze = _GraphedFunction(self._analyze_fn) if self.cuda_graphs else None
        self._graph_generate = _GraphedFunction(self._generate_fn) if self.cuda_graphs else None
        self._pinned: Dict[tuple, Tensor] = {}
        self._upload_event = None
        self.last_keypoints: Optional[Dict[str, KP]] = None
        self.set_source(source)

    # ------------------------------------------------------------------ source
    def _choose_size(self, source) -> int:
        m = int(self.model.size_multiple)
        size = self._size_arg
        if size is None:
            size = getattr(self.model, "image_size", None) or DEFAULT_SIZE
            if isinstance(source, Tensor) and source.is_floating_point() and source.dim() in (3, 4):
                s = source.shape[-1]
                if source.shape[-3] == 3 and source.shape[-2] == s and s % m == 0 and s > 0:
                    size = int(s)
        low = int(getattr(self.model, "min_size", m))
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < low or size % m:
            raise ValueError(f"Animator: size must be a multiple of {m} (the model's size_multiple) and at least "
                             f"{low}; 256 is DaGAN's native size. Got {size!r}")
        return int(size)

    def set_source(self, source) -> None:
        """Replace the source image and recompute every source-only quantity (depth, keypoints, encoder
        and depth features, attention queries). ``source``: as in the constructor. Resets the stream state
        (reference, smoothing, face window; see :meth:`reset`)."""
        from ..media.video import center_square, read_image, resize_square

        self.size = self._choose_size(source)
        what = "source" if not isinstance(source, (str, os.PathLike)) else f"source {os.fspath(source)}"
        windowed = self.face_crop or self.paste_back or self.source_box is not None
        self.paster = None
        if isinstance(source, Tensor) and source.is_floating_point() and not windowed \
                and tuple(source.shape[-3:]) == (3, self.size, self.size) and source.dim() in (3, 4) \
                and (source.dim() == 3 or source.shape[0] == 1):
            image = self._check_float_frame(source.reshape(1, 3, self.size, self.size), what)
            image = image.to(self.device, self.kp_dtype)
        else:
            array = read_image(source, what=what)
            if windowed:
                window = self._source_window(array, what)
                if self.paste_back:
                    from ..media.paste_back import PasteBack

                    self.paster = PasteBack(array, window)
                array = window.apply(array, size=self.size)
            else:
                array = resize_square(np.ascontiguousarray(center_square(array)), self.size)
            image = torch.from_numpy(np.ascontiguousarray(array)).to(self.device).permute(2, 0, 1)[None]
            image = image.to(self.kp_dtype).div_(255.0)
        if hasattr(self.model, "_check_image"):
            with skip_value_checks():
                self.model._check_image("source", image)
        with torch.inference_mode():
            self.prepared = self._prepare(image)
        if self._graph_analyze is not None:          # captured graphs point at the old source's tensors
            self._graph_analyze.clear()
            self._graph_generate.clear()
        self.reset()

    def _source_window(self, array: np.ndarray, what: str):
        """The CropWindow of the (H, W, 3) source: ``source_box``, else the face window (``face_crop``), else
        the centre square."""
        from ..media.face import CropWindow, crop_window

        h, w = array.shape[:2]
        if self.source_box is not None:
            from ..media.paste_back import window_from_xywh

            return window_from_xywh(self.source_box, (w, h), what="Animator: source_box")
        if self.face_crop:
            return crop_window(array, what=what)
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return CropWindow(x0, y0, x0 + side, y0 + side, (w, h))

    def _prepare(self, image: Tensor):
        from ..models.dagan import PreparedSource

        m = self.model
        low = image.to(self.dtype)
        depth = m.depth(low)
        kp = m.kp_detector(torch.cat([image, depth.to(self.kp_dtype)], dim=1))
        kp = {k: v for k, v in kp.items() if k in ("value", "jacobian")}
        features = m.generator.encode_source(low, depth)
        return PreparedSource(image, depth, kp, features)

    def reset(self) -> None:
        """Start a new driving video: forget the reference, the smoothing state, the face window and the
        frame count (the source work is kept)."""
        self.frames_seen = 0
        self._ref: Optional[Dict[str, Any]] = None
        self._best_score = math.inf
        self._best_done = False
        self._pending_reset = False
        self._window = None
        self._src_normalised = None
        if self.smoother is not None:
            self.smoother.reset()

    def reset_reference(self) -> None:
        """Re-anchor relative motion: the next frame processed becomes the reference (its output takes the
        source pose again). Ends a running ``reference="best"`` search."""
        self._pending_reset = True

    # ------------------------------------------------------------------ frames in
    @staticmethod
    def _check_float_frame(x: Tensor, what: str) -> Tensor:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: float frame contains NaN or inf (shape {tuple(x.shape)})")
        lo, hi = float(x.min()), float(x.max())
        if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
            raise ValueError(f"{what}: float frames must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}] "
                             f"(shape {tuple(x.shape)}); divide a [0, 255] image by 255 or pass uint8")
        if lo < 0 or hi > 1:
            x = x.clamp(0.0, 1.0)
        return x

    def _to_array(self, frame, index: int) -> np.ndarray:
        """One frame -> (S, S, 3) uint8 RGB numpy (validated, face-cropped or centre-cropped, resized)."""
        from ..media.video import center_square, read_image, resize_square

        what = f"frame {index}"
        array = read_image(frame, what=what)
        if self.face_crop:
            if self._window is None:
                from ..media.face import FaceDetector, NoFaceError, window_from_box

                box = FaceDetector().best_face(array)
                if box is None:
                    raise NoFaceError(f"driving frame {index} (the face window is fixed from the first frame)")
                self._window = window_from_box(box, (array.shape[1], array.shape[0]))
            return self._window.apply(array, size=self.size)
        return resize_square(np.ascontiguousarray(center_square(array)), self.size)

    def _convert(self, frames: List[Tuple[int, Any]]) -> Tuple[Tensor, List[str]]:
        """[(index, frame)] -> ((n,3,S,S) float tensor on the device, [kind of each frame])."""
        kinds, tensors, arrays, slots = [], [], [], []
        for index, frame in frames:
            if isinstance(frame, Tensor):
                kinds.append("tensor")
                if (frame.is_floating_point() and not self.face_crop and frame.dim() in (3, 4)
                        and tuple(frame.shape[-3:]) == (3, self.size, self.size)
                        and (frame.dim() == 3 or frame.shape[0] == 1)):
                    x = self._check_float_frame(frame.detach().reshape(1, 3, self.size, self.size), f"frame {index}")
                    tensors.append(x.to(self.device, self.kp_dtype, non_blocking=True))
                    continue
            else:
                kinds.append("numpy")
            arrays.append(self._to_array(frame, index))
            slots.append(len(tensors))
            tensors.append(None)
        if arrays:
            uploaded = self._upload(arrays)
            for slot, x in zip(slots, uploaded):
                tensors[slot] = x
        return torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0], kinds

    def _upload(self, arrays: List[np.ndarray]) -> List[Tensor]:
        """(S,S,3) uint8 arrays -> (1,3,S,S) float tensors on the device (pinned, async on CUDA)."""
        host = torch.from_numpy(np.stack(arrays) if len(arrays) > 1 else arrays[0][None])
        if self.device.type == "cuda":
            key = tuple(host.shape)
            buf = self._pinned.get(key)
            if buf is None:
                buf = self._pinned[key] = torch.empty(key, dtype=torch.uint8, pin_memory=True)
            if self._upload_event is not None:
                self._upload_event.synchronize()           # the previous upload from buf has finished
            buf.copy_(host)
            dev = buf.to(self.device, non_blocking=True)
            self._upload_event = torch.cuda.Event()
            self._upload_event.record()
        else:
            dev = host
        x = dev.permute(0, 3, 1, 2).to(self.kp_dtype).div_(255.0).contiguous()
        return list(x.split(1))

    # ------------------------------------------------------------------ per-frame networks
    def _analyze_eager(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B,3,S,S) -> (depth (B,1,S,S), kp value (B,K,2), kp jacobian (B,K,2,2) or (B,K,0) if absent)."""
        m = self.model
        depth = m.depth(x.to(self.dtype))
        kp = m.kp_detector(torch.cat([x, depth.to(self.kp_dtype)], dim=1))
        jac = kp.get("jacobian")
        if jac is None:
            jac = kp["value"].new_zeros(kp["value"].shape[:2] + (0,))
        return depth, kp["value"], jac

    def _generate_eager(self, value: Tensor, jacobian: Tensor, depth: Tensor) -> Tuple[Tensor]:
        """kp_norm value (B,K,2), jacobian (B,K,2,2), driving depth (B,1,S,S) -> (prediction (B,3,S,S),)."""
        p = self.prepared
        # keypoints and Jacobians stay in kp_dtype (float32 in the float16/bfloat16 modes): the dense motion
        # network computes the Taylor motion and the mask softmax in their dtype (models.dense_motion)
        kp = {"value": value}
        if jacobian.numel():
            kp["jacobian"] = jacobian
        kp_source = p.kp
        out = self.model.generator(None, kp_driving=kp, kp_source=kp_source, source_depth=p.depth,
                                   driving_depth=depth, source_features=p.features)
        return (out["prediction"],)

    def _analyze(self, x: Tensor) -> Tuple[Tensor, KP]:
        if self._graph_analyze is not None:
            depth, value, jac = (t.clone() for t in self._graph_analyze(x))
        else:
            depth, value, jac = self._analyze_fn(x)
        kp = {"value": value}
        if jac.numel():
            kp["jacobian"] = jac
        return depth, kp

    def _generate(self, kp: KP, depth: Tensor) -> Tensor:
        jac = kp.get("jacobian")
        if jac is None:
            jac = kp["value"].new_zeros(kp["value"].shape[:2] + (0,))
        if self._graph_generate is not None:
            return self._graph_generate(kp["value"], jac, depth)[0]
        return self._generate_fn(kp["value"], jac, depth)[0]

    # ------------------------------------------------------------------ motion (host logic, per frame)
    def _set_reference(self, kp: KP) -> None:
        from ..models.dagan import convex_hull_area
        from ..ops.reference import inverse_2x2

        ref: Dict[str, Any] = {"value": kp["value"], "jacobian": kp.get("jacobian"), "scale": None}
        if ref["jacobian"] is not None:
            ref["inverse"] = getattr(self.model, "jacobian_inverse", inverse_2x2)(ref["jacobian"])
        if self.adapt_scale:
            src = self.prepared.kp["value"][0].detach().double().cpu().numpy()
            ini = kp["value"][0].detach().double().cpu().numpy()
            area_ini = convex_hull_area(ini)
            if area_ini <= 0:
                raise ValueError("Animator: adapt_scale needs the reference frame's keypoints to span an area, but "
                                 "their convex hull is degenerate; use adapt_scale=False")
            ref["scale"] = math.sqrt(convex_hull_area(src)) / math.sqrt(area_ini)
        self._ref = ref

    def _relative(self, kp: KP) -> KP:
        """The official normalize_kp (relative movement and Jacobians) against the current reference."""
        from ..models.dagan import relative_motion

        ref = self._ref
        return relative_motion(kp, self.prepared.kp, ref["value"], ref.get("inverse"), ref["scale"])

    def _motion_step(self, kp: KP, index: int) -> str:
        """Updates the reference with frame ``index``'s (smoothed) keypoints. Returns "ready" when frames
        up to this one can be generated now, "wait" while a fixed reference index is still ahead."""
        if not self.relative:
            return "ready"
        if self._pending_reset:
            self._pending_reset = False
            self._best_done = True
            self._set_reference(kp)
            return "ready"
        if self.reference == "first":
            if self._ref is None:
                self._set_reference(kp)
            return "ready"
        if self.reference == "best":
            if not self._best_done and index < self.best_frames:
                if self._src_normalised is None:
                    self._src_normalised = _hull_normalised(self.prepared.kp["value"][0])
                score = float(((self._src_normalised - _hull_normalised(kp["value"][0])) ** 2).sum())
                if score < self._best_score or self._ref is None:
                    self._best_score = score
                    self._set_reference(kp)
            return "ready"
        # a fixed index
        if index == self.reference and self._ref is None:
            self._set_reference(kp)
        return "ready" if self._ref is not None else "wait"

    # ------------------------------------------------------------------ the engine
    def _outputs(self, pred: Tensor, kinds: List[str]) -> List[Any]:
        """(n,3,S,S) predictions -> per-frame outputs (uint8 numpy for numpy inputs, float (3,S,S) tensors)."""
        results: List[Any] = [None] * len(kinds)
        numpy_idx = [i for i, k in enumerate(kinds) if k == "numpy"]
        if numpy_idx:
            sel = pred if len(numpy_idx) == len(kinds) else pred[numpy_idx]
            u8 = (sel.float().clamp(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            host = u8.cpu().numpy() if self.device.type != "cuda" else self._download(u8)
            for j, i in enumerate(numpy_idx):
                results[i] = host[j] if len(numpy_idx) == 1 else host[j].copy()
        for i, k in enumerate(kinds):
            if k == "tensor":
                results[i] = pred[i].float()
        return results

    def _download(self, u8: Tensor) -> np.ndarray:
        host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(u8, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host.numpy()

    def _run(self, frames: Iterable, batch_size: int) -> Iterator[Any]:
        if isinstance(frames, (str, os.PathLike)):
            from ..media.video import iter_frames

            frames = iter_frames(frames)
        elif isinstance(frames, np.ndarray) and frames.ndim == 4 or isinstance(frames, Tensor) and frames.dim() == 4:
            frames = iter(frames)
        try:
            iterator = iter(frames)
        except TypeError:
            raise TypeError(f"Animator: frames must be an iterable of frames (numpy (H,W,3) uint8 or tensors), a "
                            f"video path or a 4-D stack, got {type(frames).__name__}") from None
        pending: deque = deque()            # (kp (smoothed), depth, kind) waiting for their reference
        count = 0
        while True:
            chunk = list(itertools.islice(iterator, batch_size))
            if not chunk:
                break
            indexed = list(enumerate(chunk, start=self.frames_seen))
            with torch.inference_mode(), skip_value_checks():
                x, kinds = self._convert(indexed)
                depth, kp = self._analyze(x)
                for j, (index, _) in enumerate(indexed):
                    kp_j = {k: v[j:j + 1] for k, v in kp.items()}
                    if self.smoother is not None:
                        kp_j = self.smoother(kp_j)
                    self.frames_seen = index + 1
                    state = self._motion_step(kp_j, index)
                    norm = self._relative(kp_j) if self.relative and self._ref is not None else kp_j
                    pending.append([kp_j, norm if state == "ready" else None, depth[j:j + 1], kinds[j]])
                    if state == "ready":
                        for item in pending:   # frames that waited for a fixed reference index
                            if item[1] is None:
                                item[1] = self._relative(item[0])
            count += len(chunk)
            while pending and pending[0][1] is not None:     # ready frames, in order, up to batch_size at once
                take = []
                while pending and pending[0][1] is not None and len(take) < batch_size:
                    take.append(pending.popleft())
                yield from self._emit(take)
        if count == 0:
            raise ValueError("Animator: frames gave no frames (empty iterable)")
        if pending:
            raise ValueError(f"Animator: reference={self.reference} but the driving frames ended after "
                             f"{self.frames_seen} frames (frames are numbered from 0); use reference='first'")

    def _emit(self, items: List[list]) -> Iterator[Any]:
        with torch.inference_mode(), skip_value_checks():
            kp = {k: torch.cat([it[1][k] for it in items]) for k in items[0][1]}
            depth = torch.cat([it[2] for it in items])
            pred = self._generate(kp, depth)
            outputs = self._outputs(pred, [it[3] for it in items])
        for j, (item, out) in enumerate(zip(items, outputs)):
            self.last_keypoints = {"driving": item[0], "norm": item[1]}
            if self.paster is not None:
                if isinstance(out, Tensor):
                    from ..media.video import to_uint8

                    out = to_uint8(out)
                out = self.paster(out)             # (H, W, 3) uint8, the full-resolution source
            elif isinstance(out, Tensor):
                out = out.clone()                  # a normal tensor, not an inference-mode one
            yield out

    # ------------------------------------------------------------------ public
    def stream(self, frames: Iterable) -> Iterator[Any]:
        """Lazily animate ``frames``: an iterable of frames (numpy (H,W,3) uint8 RGB, gray (H,W), RGBA,
        or tensors (3,H,W)/(1,3,H,W) float in [0,1]/uint8), a ``VideoReader``, a video path, or a 4-D
        stack. Yields one output per input, in order: numpy in -> (S,S,3) uint8 RGB numpy; tensor in ->
        float32 (3,S,S) tensor in [0,1] on ``device``; with ``paste_back`` every output is the (H,W,3)
        uint8 RGB numpy full-resolution source with the animated window blended in. Frames of another
        size are centre-cropped and resized to S (``face_crop``: cut from a window fixed at the first
        frame). Nothing is read ahead (with ``reference=k``, the outputs of frames 0..k wait for frame k).
        Raises ``ValueError`` for an unusable frame (naming its index), and at the end when the iterable
        gave no frame. Continuing a stream after another one keeps the reference and smoothing state; call
        :meth:`reset` for a new video."""
        return self._run(frames, 1)

    def animate_video(self, frames: Iterable, batch_size: int = 8, progress: bool = False) -> Iterator[Any]:
        """Throughput mode: like :meth:`stream` (same inputs, same outputs to ~1e-6), but ``batch_size``
        frames go through the networks together. ``progress``: a tqdm bar (frames)."""
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"animate_video: batch_size must be an int >= 1, got {batch_size!r}")
        gen = self._run(frames, int(batch_size))
        if progress:
            from tqdm.auto import tqdm

            return iter(tqdm(gen, unit="frame"))
        return gen

    def __call__(self, frame):
        """Animate one frame (``stream`` of one frame, continuing this stream's state) -> one output."""
        outs = list(self._run([frame], 1))
        if not outs:
            raise ValueError(f"Animator: reference={self.reference}: the output of this frame waits for that frame")
        return outs[0]

    def backends(self) -> Dict[str, str]:
        """Which ``dagan_fast.ops`` backend each op dispatches to for this animator's tensors: the motion ops
        take ``kp_dtype`` (float32 in the low-precision modes), the warp and the attention ``dtype``."""
        from ..ops._backends import select_backend

        chosen = {}
        for op, dtype in (("sparse_motion_inputs", self.kp_dtype), ("dense_motion", self.kp_dtype),
                          ("warp_occlusion", self.dtype), ("cross_modal_attention", self.dtype)):
            probe = torch.zeros(1, 1, 2, 2, dtype=dtype, device=self.device)
            try:
                chosen[op] = select_backend(op, [probe]).name
            except Exception as exc:  # reported, not fatal
                chosen[op] = f"none ({str(exc).splitlines()[0]})"
        return chosen

    def describe(self) -> str:
        """A short multi-line text: model, size, device, compute dtype and why, convolution path, op backends."""
        model = self.model
        params = sum(p.numel() for p in model.parameters())
        kind = getattr(model, "config", {}).get("generator") if isinstance(getattr(model, "config", None), dict) \
            else None
        conv = ("cuDNN" if self.device.type == "cuda" else
                "oneDNN, weights pre-packed" if self.prepack else "oneDNN (F.conv2d)")
        if self.fast_conv:
            conv += ("; 3x3 stride-1: Winograd F(4x4,3x3), to 1-4 channels: narrow direct kernel, where faster "
                     "per shape (fast_conv)")
        low = self.dtype in _LOW_PRECISION
        lines = [
            f"model: {type(model).__name__}{f' ({kind} generator)' if kind else ''}, {params / 1e6:.2f}M parameters",
            f"size: {self.size}x{self.size}",
            f"device: {self.device}" + (f" (capability {torch.backends.cpu.get_cpu_capability()}, "
                                        f"{torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""),
            f"dtype: {str(self.dtype).replace('torch.', '')} ({self.dtype_reason})"
            + ("; keypoints, Jacobians, Taylor motion and mask softmax in float32" if low else ""),
            f"convolutions: {conv}" + (", channels_last" if self.device.type == "cpu" and conv.startswith("oneDNN")
                                       else ""),
            *([f"allocator: glibc keeps freed memory (no fresh pages per frame): {self.malloc_keep}"]
              if self.device.type == "cpu" else []),
            "ops: " + ", ".join(f"{op} -> {name}" for op, name in self.backends().items()),
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Animator({type(self.model).__name__}, size={self.size}, device={self.device}, dtype={self.dtype}, "
                f"relative={self.relative}, reference={self.reference!r})")
