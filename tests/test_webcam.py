"""The live loop (dagan_fast.media.webcam) without a camera: a fake capture source paced against a stub model
(the camera delivers three frames per model step, by construction, not by timing), a fake virtual camera and a
fake preview window with scripted keys; the CLI's --virtual-camera wiring and its error messages."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from dagan_fast import cli
from dagan_fast.media import webcam
from dagan_fast.streaming.smoothing import KeypointSmoother

WAIT = 10.0          # a safety net against a hang, never a measurement


class PacedCamera:
    """Delivers frames (24, 32, 3) uint8 (frame k filled with k % 256), ``per_step`` of them per model step:
    frame k may be read once the model has started step k // per_step; ``total`` frames, then it ends."""

    def __init__(self, total: int = 40, per_step: int = 3):
        self.total, self.per_step = total, per_step
        self.produced = 0
        self.steps = 0
        self.cond = threading.Condition()
        self.released = False

    def read(self):
        with self.cond:
            if not self.cond.wait_for(lambda: self.produced < self.per_step * (self.steps + 1) or self.released,
                                      WAIT) or self.produced >= self.total or self.released:
                return False, None
            frame = np.full((24, 32, 3), self.produced % 256, np.uint8)
            self.produced += 1
            self.cond.notify_all()
            return True, frame

    def model_step(self):
        """Called by the stub model: start a step, return once the camera delivered its frames for it."""
        with self.cond:
            self.steps += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.produced >= min(self.total, self.per_step * (self.steps + 1)), WAIT)

    def release(self):
        with self.cond:
            self.released = True
            self.cond.notify_all()


class StubAnimator:
    """What run_live needs of an Animator: __call__(frame) -> frame, smoother, reset_reference()."""

    def __init__(self, camera: PacedCamera):
        self.camera = camera
        self.smoother = None
        self.resets = 0
        self.seen = []

    def __call__(self, frame):
        self.seen.append(int(frame[0, 0, 0]))
        self.camera.model_step()                 # slower than the camera: three frames arrive meanwhile
        return np.ascontiguousarray(np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1))

    def reset_reference(self):
        self.resets += 1


class FakeVirtualCamera:
    def __init__(self):
        self.frames = []

    def send(self, frame):
        self.frames.append(frame)


class FakeWindow:
    def __init__(self, keys):
        self.keys = list(keys)
        self.shown = []

    def show(self, frame):
        self.shown.append(frame)

    def key(self):
        key = self.keys.pop(0) if self.keys else None
        return ord(key) if key else None


def test_newest_frame_only_no_queue_growth_when_the_model_is_slower():
    camera = PacedCamera(total=40, per_step=3)
    animator = StubAnimator(camera)
    vcam = FakeVirtualCamera()
    stats = webcam.run_live(animator, camera, virtual_camera=vcam)
    assert stats["frames"] >= 10 and stats["captured"] == 40
    assert stats["max_held"] == 1                                  # one slot: nothing queues up
    assert stats["dropped"] == stats["captured"] - stats["frames"]  # every frame not animated was skipped
    lags = stats["frame_lag"]
    assert max(lags[1:]) <= 3 and lags[-2] <= lags[1]               # the lag stays at what one step lets arrive
    ids = animator.seen
    assert ids == sorted(ids) and all(b - a >= 2 for a, b in zip(ids[1:-1], ids[2:-1]))   # newest frame each time
    assert len(vcam.frames) == stats["frames"] and vcam.frames[0].shape == (48, 64, 3)     # clean frames out


def test_keys_overlay_and_smoothing_toggle():
    camera = PacedCamera(total=12, per_step=1)
    animator = StubAnimator(camera)
    window = FakeWindow([None, "x", "s", "s", "s", "q"])
    vcam = FakeVirtualCamera()
    stats = webcam.run_live(animator, camera, virtual_camera=vcam, display=window, out_size=(40, 30))
    camera.release()
    assert stats["frames"] == 6 and animator.resets == 1 and stats["resets"] == 1   # q stopped it after 6
    assert isinstance(animator.smoother, KeypointSmoother) and stats["smoothing"]  # on, off, on
    assert len(window.shown) == 6 and window.shown[0].shape == (30, 40, 3)
    # the overlay is on the preview only: the virtual camera got the same frame without text
    assert not np.array_equal(window.shown[1][:8, :30], vcam.frames[1][:8, :30])
    assert np.array_equal(window.shown[1][-5:], vcam.frames[1][-5:])
    stats = webcam.run_live(StubAnimator(camera), camera, display=FakeWindow([]), overlay=False, max_frames=2)
    assert stats["frames"] <= 2


def test_overlay_text_and_toggle_keeps_the_smoother():
    frame = np.zeros((60, 80, 3), np.uint8)
    shown = webcam.draw_overlay(frame, 12.3, 85.0, True, status="looking for a face")
    assert shown.shape == frame.shape and shown[:10].max() > 200 and frame.max() == 0    # a copy with text

    class A:
        smoother = KeypointSmoother(min_cutoff=0.5)

    a = A()
    kept = a.smoother
    assert webcam.toggle_smoothing(a) is False and a.smoother is None
    assert webcam.toggle_smoothing(a) is True and a.smoother is kept


def test_virtual_camera_errors_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)         # not installed
    with pytest.raises(webcam.VirtualCameraError, match=r"pip install pyvirtualcam.*v4l2loopback"):
        webcam.open_virtual_camera(64, 64)
    monkeypatch.delitem(sys.modules, "pyvirtualcam")

    class NoDevice:
        class PixelFormat:
            RGB = "RGB"

        class Camera:
            def __init__(self, **kw):
                raise RuntimeError("No v4l2 loopback device found at /dev/video[0-99]")

    monkeypatch.setitem(sys.modules, "pyvirtualcam", NoDevice)
    with pytest.raises(webcam.VirtualCameraError, match=r"no virtual camera could be opened .*OBS"):
        webcam.open_virtual_camera(64, 64)


def test_cli_webcam_virtual_camera_without_a_camera(monkeypatch, tmp_path, capsys):
    from test_streaming import SIZE, face, head_motion, small_model
    import cv2

    model = tmp_path / "small.safetensors"
    small_model().save(str(model))
    source = tmp_path / "portrait.png"
    cv2.imwrite(str(source), cv2.cvtColor(face(), cv2.COLOR_RGB2BGR))
    frames = head_motion(3, 96)

    class Camera:
        fps = 30.0

        def __init__(self):
            self.left = list(frames)

        def read(self):
            return (True, self.left.pop(0)) if self.left else (False, None)

        def release(self):
            pass

    sent = []

    class VCam(FakeVirtualCamera):
        device = "/dev/video-fake"

        def __init__(self, width, height, fps):
            super().__init__()
            self.size = (width, height)
            sent.append(self)

        def close(self):
            pass

    monkeypatch.setattr(webcam, "open_camera", lambda index: Camera())
    monkeypatch.setattr(webcam, "open_virtual_camera", lambda w, h, fps: VCam(w, h, fps))
    rc = cli.main(["webcam", "--source", str(source), "--checkpoint", str(model), "--size", str(SIZE),
                   "--virtual-camera", "--no-window", "--out-size", "80x60"])
    out = capsys.readouterr().out
    assert rc == 0 and "virtual camera /dev/video-fake" in out and "frames animated" in out
    assert sent[0].size == (80, 60) and 1 <= len(sent[0].frames) <= 3 and sent[0].frames[0].shape == (60, 80, 3)
    rc = cli.main(["webcam", "--source", str(source), "--checkpoint", str(model), "--no-window"])
    assert rc == 2 and "--no-window needs --virtual-camera" in capsys.readouterr().err


def test_live_face_crop_waits_for_a_face_then_tracks_it():
    from test_streaming import face

    crop = webcam.LiveFaceCrop(32)
    empty = np.full((120, 160, 3), 90, np.uint8)
    assert crop(empty).shape == (32, 32, 3) and crop.tracker is None and crop.status == "looking for a face"
    portrait = np.ascontiguousarray(face())
    assert crop(portrait).shape == (32, 32, 3) and crop.tracker is not None and crop.status is None
    assert crop.tracker.detect_every == 3
