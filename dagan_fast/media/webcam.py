"""Live animation: camera in, animated portrait out to a preview window and/or a virtual camera.

    camera = open_camera(0)                                   # frames (H, W, 3) uint8 RGB
    with open_virtual_camera(512, 512, 30) as vcam:           # what a video call sees (pyvirtualcam)
        stats = run_live(animator, camera, virtual_camera=vcam, display=OpenCVWindow("dagan-fast"))

* A capture thread (:class:`LatestFrameGrabber`) reads the camera as fast as it delivers and keeps only the
  newest frame: the model always animates the most recent frame, older ones are dropped (counted), so
  latency never accumulates however slow the model is (there is no queue to grow: one slot).
* The preview window shows an overlay (FPS of the loop, capture-to-output latency, smoothing on/off); the
  virtual camera gets clean frames (no overlay), resized to its size.
* Keys (preview window): ``x`` re-anchors (:meth:`Animator.reset_reference`: look straight at the camera and
  press x), ``s`` toggles One-Euro keypoint smoothing, ``q`` or Esc quits. Without a window, Ctrl+C quits.
* Everything the loop talks to is an argument (capture, display, virtual camera, clock), so it runs without a
  camera: the tests drive it with a fake capture source and a fake virtual camera.

``pyvirtualcam`` is an optional extra (``pip install pyvirtualcam`` or ``pip install 'dagan_fast[webcam]'``); it
needs a virtual-camera device: v4l2loopback on Linux, OBS Studio's virtual camera on Windows and macOS.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Tuple

import cv2
import numpy as np

from .video import as_rgb_uint8

__all__ = ["LatestFrameGrabber", "OpenCVCamera", "open_camera", "VirtualCameraError", "VirtualCamera",
           "open_virtual_camera", "OpenCVWindow", "draw_overlay", "LiveFaceCrop", "toggle_smoothing", "run_live",
           "VIRTUAL_CAMERA_HELP"]

#: What to do when no virtual camera can be opened.
VIRTUAL_CAMERA_HELP = ("Linux: load v4l2loopback (sudo modprobe v4l2loopback devices=1 exclusive_caps=1 "
                       "card_label=dagan-fast); Windows or macOS: install OBS Studio and start its virtual camera "
                       "once")


class OpenCVCamera:
    """A camera opened with OpenCV, read as (H, W, 3) uint8 RGB: ``read() -> (ok, frame)``, ``release()``.
    ``ValueError`` naming the index when it does not open."""

    def __init__(self, index: int = 0, size: Optional[Tuple[int, int]] = None):
        self.index = int(index)
        self._capture = cv2.VideoCapture(self.index)
        if not self._capture.isOpened():
            self._capture.release()
            raise ValueError(f"cannot open camera {self.index} (no such device, or it is in use)")
        if size is not None:
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else None

    def read(self):
        ok, frame = self._capture.read()
        if not ok or frame is None:
            return False, None
        return True, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def release(self) -> None:
        self._capture.release()


def open_camera(index: int = 0, size: Optional[Tuple[int, int]] = None) -> OpenCVCamera:
    """:class:`OpenCVCamera` ``index`` (``size``: (W, H) to ask the camera for)."""
    return OpenCVCamera(index, size)


class LatestFrameGrabber:
    """Read ``capture`` (``read() -> (ok, (H, W, 3) uint8 RGB frame)``) on a thread, keeping only the newest frame.

    :meth:`get` returns ``(frame, frame_id, captured_at)`` for the newest frame not handed out yet (waiting for
    one if needed; ``frame_id`` counts frames read from 0, ``captured_at`` is ``clock()`` when it was read), or
    None once the capture has ended and nothing newer is left. Frames replaced before anyone took them are
    counted in ``dropped``; ``captured`` counts all frames read; ``max_held`` is the most frames ever held at
    once (1: there is no queue). ``clock``: a function returning seconds (``time.perf_counter``). Use as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, capture, clock: Callable[[], float] = time.perf_counter):
        self.capture = capture
        self.clock = clock
        self._cond = threading.Condition()
        self._slot = None                       # (frame, id, time) or None: the one frame held
        self._last_given = -1
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dagan-fast-capture", daemon=True)
        self.captured = 0
        self.dropped = 0
        self.max_held = 0
        self.error: Optional[BaseException] = None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                ok, frame = self.capture.read()
                if not ok or frame is None:
                    break
                stamp = self.clock()
                with self._cond:
                    if self._slot is not None and self._slot[1] > self._last_given:
                        self.dropped += 1           # never handed out: replaced by a newer frame
                    self._slot = (frame, self.captured, stamp)
                    self.captured += 1
                    self.max_held = max(self.max_held, 1)
                    self._cond.notify_all()
        except BaseException as exc:            # noqa: BLE001 - reported by get()
            self.error = exc
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def start(self) -> "LatestFrameGrabber":
        self._thread.start()
        return self

    def get(self, timeout: Optional[float] = None):
        """The newest frame not handed out yet: ``(frame, frame_id, captured_at)``; None when the capture
        ended (or ``timeout`` seconds passed). Re-raises an error of the capture thread."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: (self._slot is not None and self._slot[1] > self._last_given) or self._ended, timeout)
            if self.error is not None:
                raise RuntimeError(f"the camera failed: {self.error}") from self.error
            if not ready or self._slot is None or self._slot[1] <= self._last_given:
                return None
            self._last_given = self._slot[1]
            return self._slot

    def stop(self) -> None:
        """Stop reading (the thread ends after its current ``read()``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def __enter__(self) -> "LatestFrameGrabber":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VirtualCameraError(RuntimeError):
    """No virtual camera: pyvirtualcam missing, or no virtual-camera device (the message says what to do)."""


class VirtualCamera:
    """Frames to a virtual camera (pyvirtualcam, RGB): ``send(frame)`` resizes (H, W, 3) uint8 RGB frames to
    ``size`` (W, H) when needed. ``device`` names the device; a context manager (``close()``)."""

    def __init__(self, camera):
        self._camera = camera
        self.size = (int(camera.width), int(camera.height))
        self.device = getattr(camera, "device", "virtual camera")
        self.frames_sent = 0

    def send(self, frame) -> None:
        image = as_rgb_uint8(frame, what="frame sent to the virtual camera")
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA
                               if image.shape[1] > self.size[0] else cv2.INTER_LINEAR)
        self._camera.send(image)
        self.frames_sent += 1

    def close(self) -> None:
        self._camera.close()

    def __enter__(self) -> "VirtualCamera":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_virtual_camera(width: int, height: int, fps: float = 30.0, device: Optional[str] = None) -> VirtualCamera:
    """A :class:`VirtualCamera` of ``width`` x ``height`` at ``fps``. Raises :class:`VirtualCameraError` when
    pyvirtualcam is not installed or no virtual-camera device exists, saying how to get one."""
    try:
        import pyvirtualcam
    except ImportError:
        raise VirtualCameraError("--virtual-camera needs the pyvirtualcam package: pip install pyvirtualcam (or "
                                 "pip install 'dagan_fast[webcam]'), and a virtual-camera device: "
                                 + VIRTUAL_CAMERA_HELP) from None
    try:
        camera = pyvirtualcam.Camera(width=int(width), height=int(height), fps=float(fps),
                                     fmt=pyvirtualcam.PixelFormat.RGB, device=device)
    except Exception as exc:                    # noqa: BLE001 - RuntimeError('... not found') and friends
        raise VirtualCameraError(f"no virtual camera could be opened ({exc}); {VIRTUAL_CAMERA_HELP}") from None
    return VirtualCamera(camera)


class OpenCVWindow:
    """A preview window: ``show((H, W, 3) uint8 RGB)``, ``key() -> int or None`` (``cv2.waitKey(1)``),
    ``close()``. ``RuntimeError`` when this OpenCV cannot open windows (headless build, no display)."""

    def __init__(self, title: str):
        self.title = title
        try:
            cv2.namedWindow(title)
        except cv2.error:
            raise RuntimeError("no display: this OpenCV cannot open windows (headless build, or no $DISPLAY)") from None

    def show(self, frame: np.ndarray) -> None:
        cv2.imshow(self.title, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def key(self) -> Optional[int]:
        code = cv2.waitKey(1)
        return None if code < 0 else code & 0xFF

    def close(self) -> None:
        cv2.destroyWindow(self.title)


def draw_overlay(frame: np.ndarray, fps: float, latency_ms: float, smoothing: bool,
                 status: Optional[str] = None) -> np.ndarray:
    """A copy of the (H, W, 3) uint8 RGB ``frame`` with "12.3 fps  85 ms  smooth on" (and ``status``) in its
    top-left corner (white on a dark box; the text scales with the frame)."""
    out = frame.copy()
    scale = max(0.35, min(out.shape[:2]) / 600.0)
    lines = [f"{fps:.1f} fps  {latency_ms:.0f} ms  smooth {'on' if smoothing else 'off'}"]
    if status:
        lines.append(status)
    y = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, y), (tw + 8, y + th + base + 8), (0, 0, 0), -1)
        cv2.putText(out, text, (4, y + th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        y += th + base + 8
    return out


class LiveFaceCrop:
    """Driving crop for live frames: the face window of :class:`~dagan_fast.media.face.FaceTracker`, found in
    the first frame that shows a face; until then the centre square (``status`` says "looking for a face").
    ``detect_every``: the detector runs on every n-th frame once the face is found (default 3: it costs
    ~10-40 ms a frame on a CPU, the window is kept in between). ``__call__(frame) -> (size, size, 3) uint8``."""

    def __init__(self, size: int, detector=None, detect_every: int = 3):
        from .face import FaceDetector

        self.size = int(size)
        self.detect_every = int(detect_every)
        self.detector = detector or FaceDetector()
        self.tracker = None
        self.status: Optional[str] = "looking for a face"

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        from .face import DRIVING_MIN_SUPPORT, FaceTracker, window_from_box
        from .video import center_square, resize_square

        if self.tracker is None:
            box = self.detector.best_face_supported(frame, DRIVING_MIN_SUPPORT)
            if box is None:
                return resize_square(np.ascontiguousarray(center_square(frame)), self.size)
            self.tracker = FaceTracker(window_from_box(box, (frame.shape[1], frame.shape[0])), detector=self.detector,
                                       detect_every=self.detect_every)
            self.status = None
        return self.tracker.apply(frame, size=self.size)


def toggle_smoothing(animator) -> bool:
    """Turn the Animator's One-Euro keypoint smoothing off (kept for later) or on (the kept one, reset, or a
    new ``KeypointSmoother``); returns whether it is on now."""
    if animator.smoother is not None:
        animator._smoother_off = animator.smoother
        animator.smoother = None
        return False
    from ..streaming.smoothing import KeypointSmoother

    smoother = getattr(animator, "_smoother_off", None) or KeypointSmoother()
    smoother.reset()
    animator.smoother = smoother
    return True


def run_live(animator, capture, *, prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             virtual_camera=None, display=None, overlay: bool = True, out_size: Optional[Tuple[int, int]] = None,
             max_frames: Optional[int] = None, clock: Callable[[], float] = time.perf_counter,
             on_frame: Optional[Callable[[dict], None]] = None) -> dict:
    """Animate ``capture`` live until it ends, ``q``/Esc is pressed, ``max_frames`` outputs were made, or Ctrl+C.

    ``animator``: a :class:`~dagan_fast.Animator` (called once per frame). ``capture``: ``read() -> (ok, (H, W, 3)
    uint8 RGB)`` (:func:`open_camera`, or a fake); read on a :class:`LatestFrameGrabber` thread, so each step
    animates the newest frame. ``prepare``: frame -> model input (e.g. :class:`LiveFaceCrop`; default: the
    Animator's own centre-square handling). ``virtual_camera``: ``send(frame)`` (:func:`open_virtual_camera`,
    or a fake) gets every output, without overlay. ``display``: ``show(frame)`` and ``key()`` (:class:`OpenCVWindow`,
    or a fake) gets every output with the overlay (``overlay``) and supplies the keys x (re-anchor), s
    (smoothing), q/Esc (quit). ``out_size``: (W, H) to resize outputs to. ``on_frame``: called with each step's
    record (below), e.g. for logging.

    Returns ``{"frames": outputs made, "captured", "dropped": camera frames never animated, "max_held": most
    camera frames held at once (1), "latency_ms": list of capture-to-output latencies, "frame_lag": list of
    (newest captured id - animated id) at each output, "resets", "smoothing": final state}``.
    """
    stats = {"frames": 0, "captured": 0, "dropped": 0, "max_held": 0, "latency_ms": [], "frame_lag": [],
             "resets": 0, "smoothing": animator.smoother is not None}
    fps = 0.0
    last = None
    grabber = LatestFrameGrabber(capture, clock=clock)
    with grabber:
        try:
            while max_frames is None or stats["frames"] < max_frames:
                item = grabber.get()
                if item is None:
                    break
                frame, frame_id, captured_at = item
                out = animator(prepare(frame) if prepare is not None else frame)
                if out_size is not None and (out.shape[1], out.shape[0]) != tuple(out_size):
                    out = cv2.resize(out, tuple(out_size), interpolation=cv2.INTER_AREA
                                     if out.shape[1] > out_size[0] else cv2.INTER_LINEAR)
                if virtual_camera is not None:
                    virtual_camera.send(out)
                now = clock()
                if last is not None and now > last:
                    rate = 1.0 / (now - last)
                    fps = rate if fps == 0.0 else 0.9 * fps + 0.1 * rate
                last = now
                record = {"frame_id": frame_id, "latency_ms": 1000.0 * (now - captured_at),
                          "frame_lag": grabber.captured - 1 - frame_id, "fps": fps}
                stats["frames"] += 1
                stats["latency_ms"].append(record["latency_ms"])
                stats["frame_lag"].append(record["frame_lag"])
                if on_frame is not None:
                    on_frame(record)
                if display is not None:
                    shown = out
                    if overlay:
                        shown = draw_overlay(out, fps, record["latency_ms"], animator.smoother is not None,
                                             getattr(prepare, "status", None))
                    display.show(shown)
                    key = display.key()
                    if key in (ord("q"), 27):
                        break
                    if key == ord("x"):
                        animator.reset_reference()
                        stats["resets"] += 1
                    elif key == ord("s"):
                        toggle_smoothing(animator)
        except KeyboardInterrupt:
            pass
    stats.update(captured=grabber.captured, dropped=grabber.dropped, max_held=grabber.max_held,
                 smoothing=animator.smoother is not None)
    return stats
