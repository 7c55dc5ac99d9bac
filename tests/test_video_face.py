"""Video/image I/O (dagan_fast.media.video) and face cropping (dagan_fast.media.face).

All media are made here, in tmp_path, from scikit-image's bundled images: no network, no large files.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dagan_fast.media import video
from dagan_fast.media.face import CropWindow, FaceDetector, NoFaceError, crop_window, window_from_box
from dagan_fast.media.video import VideoReader, VideoWriter, iter_frames, read_image, to_tensor, to_uint8

W, H, T = 160, 128, 30          # synthetic clip: (W, H) frames, T of them


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()                                # (512, 512, 3) uint8 RGB


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.fixture(scope="module")
def clip(astronaut):
    """T frames (H, W, 3) of the astronaut's head (image downscaled to 256, face near the middle) sliding
    1 px right and 1/3 px up per frame, as a list of uint8 RGB arrays."""
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    return [np.ascontiguousarray(small[i // 3:i // 3 + H, 45 - i:45 - i + W]) for i in range(T)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def write_clip(path, frames, fps=24.0):
    with VideoWriter(path, fps=fps) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


# --------------------------------------------------------------------------------------------
# video files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext, min_psnr", [(".mp4", 25.0), (".avi", 28.0)])
def test_video_round_trip(tmp_path, clip, ext, min_psnr):
    path = tmp_path / f"clip{ext}"
    writer = write_clip(path, clip, fps=29.97)
    assert writer.frames_written == T and writer.size == (W, H)
    with VideoReader(path) as reader:
        assert reader.kind == "video"
        assert reader.frame_count == T
        assert reader.size == (W, H)
        assert abs(reader.fps - 29.97) < 0.01
        frames = list(reader)
    assert len(frames) == T
    for i, (got, want) in enumerate(zip(frames, clip)):
        assert got.shape == (H, W, 3) and got.dtype == np.uint8
        assert psnr(got, want) > min_psnr
        if i + 1 < T:                                        # in order: closer to its own frame than the next
            assert psnr(got, want) > psnr(got, clip[i + 1]) + 1
    # channel order survives (BGR <-> RGB swapped twice, not once): the astronaut's suit is orange
    red_minus_blue = frames[0][..., 0].astype(int).mean() - frames[0][..., 2].astype(int).mean()
    want_rmb = clip[0][..., 0].astype(int).mean() - clip[0][..., 2].astype(int).mean()
    assert abs(red_minus_blue - want_rmb) < 5


def test_reader_is_lazy_and_restarts(tmp_path, clip, monkeypatch):
    path = tmp_path / "clip.avi"
    write_clip(path, clip)
    reads = []
    real_capture = cv2.VideoCapture

    class CountingCapture:
        def __init__(self, *args):
            self._cap = real_capture(*args)

        def read(self):
            reads.append(1)
            return self._cap.read()

        def __getattr__(self, name):
            return getattr(self._cap, name)

    monkeypatch.setattr(video.cv2, "VideoCapture", CountingCapture)
    reader = VideoReader(path)
    assert reads == []                                       # opening decodes nothing
    frames = iter(reader)
    for k in range(1, 4):
        next(frames)
        assert len(reads) <= k + 1                           # at most one frame read ahead
    frames.close()
    reads.clear()
    again = list(reader)                                     # a new pass starts from frame 0
    assert len(again) == T and len(reads) <= T + 1
    assert psnr(again[0], clip[0]) > 28
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        next(iter(reader))


def test_odd_sizes_are_padded_not_cropped(tmp_path, astronaut):
    frame = np.ascontiguousarray(astronaut[100:147, 150:213])   # 63 x 47
    path = tmp_path / "odd.avi"
    write_clip(path, [frame] * 3)
    with VideoReader(path) as reader:
        assert reader.size == (64, 48)
        got = next(iter(reader))
    assert psnr(got[:47, :63], frame) > 28                   # nothing of the frame was lost


def test_image_folder_round_trip_is_exact(tmp_path, clip):
    folder = tmp_path / "frames"
    write_clip(str(folder) + "/", clip)
    assert sorted(os.listdir(folder))[:2] == ["000000.png", "000001.png"]
    with VideoReader(folder, fps=10) as reader:
        assert (reader.kind, reader.frame_count, reader.size, reader.fps) == ("folder", T, (W, H), 10.0)
        frames = list(reader)
    assert len(frames) == T
    assert all(np.array_equal(a, b) for a, b in zip(frames, clip))
    assert VideoReader(folder).fps == video.DEFAULT_FPS


def test_image_folder_natural_order_and_size_check(tmp_path):
    folder = tmp_path / "natural"
    folder.mkdir()
    for value in (1, 2, 10):
        cv2.imwrite(str(folder / f"f{value}.png"), np.full((8, 8, 3), value, np.uint8))
    (folder / "notes.txt").write_text("ignored")
    assert [int(f[0, 0, 0]) for f in VideoReader(folder)] == [1, 2, 10]       # not 1, 10, 2
    cv2.imwrite(str(folder / "f11.png"), np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="f11.png.*8x9"):
        list(VideoReader(folder))


def test_single_image_reader(tmp_path, astronaut):
    path = tmp_path / "portrait.png"
    cv2.imwrite(str(path), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    with VideoReader(path) as reader:
        assert (reader.kind, reader.frame_count, reader.size, reader.fps) == ("image", 1, (512, 512), 25.0)
        frames = list(reader)
    assert len(frames) == 1 and np.array_equal(frames[0], astronaut)


def test_reader_errors(tmp_path, clip):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        VideoReader(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match="cannot open video .*notes.mp4"):
        VideoReader(text)
    empty_file = tmp_path / "empty.mp4"
    empty_file.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        VideoReader(empty_file)
    good = tmp_path / "good.mp4"
    write_clip(good, clip)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot open video"):
        VideoReader(truncated)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="contains no frames"):
        VideoReader(tmp_path / "empty_dir")
    with pytest.raises(TypeError):
        VideoReader(3.5)


def test_zero_frame_video_raises_when_iterated(tmp_path):
    path = tmp_path / "zero.avi"
    VideoWriter(path, fps=25, size=(32, 32)).close()         # a valid AVI header, no frames
    reader = VideoReader(path)                                # opens ...
    with pytest.raises(ValueError, match="zero.avi contains no frames"):
        list(reader)                                          # ... but iterating says why it is empty
    with pytest.raises(ValueError, match="contains no frames"):
        list(iter_frames(path))


def test_writer_errors(tmp_path, clip, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create"):
        VideoWriter(blocker / "out.mp4", fps=25)            # parent is a file: never writable
    with pytest.raises(OSError, match="cannot create"):
        VideoWriter(blocker / "frames/", fps=25)
    with pytest.raises(ValueError, match="image extension"):
        VideoWriter(tmp_path / "out.png", fps=25)
    with pytest.raises(ValueError, match="unsupported video extension"):
        VideoWriter(tmp_path / "out.xyz", fps=25)
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "out.mp4", fps=0)

    writer = VideoWriter(tmp_path / "change.mp4", fps=25)
    writer.write(clip[0])
    with pytest.raises(ValueError, match=r"frame 1 .* is 80x64 .* output is 160x128"):
        writer.write(clip[1][:64, :80])
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(clip[0])

    class NeverOpens:                                         # what cv2 returns when it cannot create a file
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(video.cv2, "VideoWriter", NeverOpens)   # OpenCV's writer: .avi, or a fourcc given
    with pytest.raises(OSError, match=r"cannot create video .*x.mp4.*mp4v"):
        VideoWriter(tmp_path / "x.mp4", fps=25, size=(W, H), fourcc="mp4v")
    lazy = VideoWriter(tmp_path / "y.avi", fps=25)            # size unknown: opens at the first frame
    with pytest.raises(OSError, match="cannot create video"):
        lazy.write(clip[0])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_writer_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot write"):
            VideoWriter(folder / "out.mp4", fps=25)
    finally:
        folder.chmod(0o700)


def test_writer_accepts_float_tensors(tmp_path, clip):
    folder = tmp_path / "tensors"
    with VideoWriter(folder, fps=25) as writer:
        writer.write(torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255)          # (3, H, W)
        writer.write(torch.from_numpy(clip[1]).float().div(255))                       # (H, W, 3)
        writer.write(torch.from_numpy(clip[2]).permute(2, 0, 1)[None].double() / 255)  # (1, 3, H, W)
    frames = list(VideoReader(folder))
    assert all(np.array_equal(a, b) for a, b in zip(frames, clip[:3]))


# --------------------------------------------------------------------------------------------
# read_image and frame normalisation
# --------------------------------------------------------------------------------------------
def test_read_image_conversions(astronaut):
    rgb = astronaut[:40, :50]
    assert read_image(np.ascontiguousarray(rgb)).shape == (40, 50, 3)
    gray = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)
    out = read_image(gray)
    assert out.shape == (40, 50, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    assert np.array_equal(read_image(gray[..., None]), out)
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(read_image(rgba), rgb)                               # alpha dropped
    as_float = rgb.astype(np.float32) / 255
    assert np.array_equal(read_image(as_float), rgb)
    over = as_float.copy()
    over[0, 0, 0], over[0, 0, 1] = 1.05, -0.05                                 # small overshoot: clamped
    assert tuple(read_image(over)[0, 0, :2]) == (255, 0)
    assert np.array_equal(read_image(rgb.astype(np.uint16) * 257), rgb)      # 16-bit
    assert np.array_equal(read_image(rgb.astype(np.int64)), rgb)
    chw = torch.from_numpy(as_float).permute(2, 0, 1)
    for tensor in (chw, chw[None], chw.permute(1, 2, 0), torch.from_numpy(np.ascontiguousarray(rgb))):
        assert np.array_equal(read_image(tensor), rgb)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((10, 10, 2), np.uint8), r"got 2 .*shape \(10, 10, 2\)"),
    (np.zeros((10, 10, 5), np.uint8), r"got 5"),
    (np.zeros((0, 10, 3), np.uint8), r"empty image .*shape \(0, 10, 3\)"),
    (np.zeros((3, 10, 12), np.uint8), "channels-first"),
    (np.full((4, 4, 3), 200.0, np.float32), r"\[0, 1\].*divide"),
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 4, 3), 300, np.int32), r"\[0, 255\]"),
    (np.zeros((4, 4, 3), bool), "dtype bool"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\)"),
    (torch.zeros(2, 3, 4, 4), "batch of 2"),
    (torch.zeros(5, 4, 7), r"\(3, H, W\)"),
])
def test_read_image_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        read_image(bad)


def test_read_image_files(tmp_path, astronaut):
    rgba = np.concatenate([astronaut, np.full((512, 512, 1), 128, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), astronaut)
    cv2.imwrite(str(tmp_path / "gray.png"), astronaut[..., 1])
    gray = read_image(str(tmp_path / "gray.png"))
    assert gray.shape == (512, 512, 3) and np.array_equal(gray[..., 0], astronaut[..., 1])
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ValueError, match="fake.png"):
        read_image(tmp_path / "fake.png")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="folder"):
        read_image(tmp_path)
    with pytest.raises(TypeError):
        read_image(None)


# --------------------------------------------------------------------------------------------
# iter_frames, to_tensor, to_uint8
# --------------------------------------------------------------------------------------------
def test_iter_frames_sources(tmp_path, clip):
    path = tmp_path / "clip.avi"
    write_clip(path, clip)
    assert len(list(iter_frames(path))) == T
    with VideoReader(path) as reader:
        assert len(list(iter_frames(reader))) == T
    stack = np.stack(clip[:4])
    assert all(np.array_equal(a, b) for a, b in zip(iter_frames(stack), clip[:4]))
    tensors = torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 255        # (T, 3, H, W)
    assert all(np.array_equal(a, b) for a, b in zip(iter_frames(tensors), clip[:4]))
    single = list(iter_frames(clip[0]))
    assert len(single) == 1 and np.array_equal(single[0], clip[0])

    pulled = []

    def generator():
        for frame in clip[:5]:
            pulled.append(1)
            yield frame

    frames = iter_frames(generator())
    assert pulled == []                                     # streamed: nothing pulled yet
    next(frames)
    assert len(pulled) == 1

    with pytest.raises(ValueError, match="contains no frames"):
        list(iter_frames([]))
    with pytest.raises(ValueError, match="frame 1 of"):
        list(iter_frames([clip[0], np.zeros((4, 4, 2), np.uint8)]))
    with pytest.raises(TypeError):
        iter_frames(object())
    with pytest.raises(FileNotFoundError):
        iter_frames(tmp_path / "missing.avi")                # raised by the call, not later


def test_to_tensor_center_crops_then_resizes(clip):
    frame = clip[0]                                          # 160 x 128: centre square is columns 16..143
    square = frame[:, 16:144]
    full = to_tensor(frame)
    assert full.shape == (1, 3, H, H) and full.dtype == torch.float32
    assert np.array_equal(to_uint8(full), square)            # aspect kept: a crop, not a squeeze
    small = to_tensor(frame, size=64)
    want = cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA)
    assert small.shape == (1, 3, 64, 64)
    assert np.array_equal(to_uint8(small), want)
    big = to_tensor(frame, size=200, dtype=torch.float64)
    assert big.dtype == torch.float64 and float(big.min()) >= 0 and float(big.max()) <= 1
    assert np.array_equal(to_uint8(big), cv2.resize(square, (200, 200), interpolation=cv2.INTER_LINEAR))
    marked = np.zeros((20, 40, 3), np.uint8)
    marked[:, :10] = 255                                     # bars outside the centre square are cut away
    marked[:, 30:] = 255
    assert float(to_tensor(marked).max()) == 0.0
    with pytest.raises(ValueError, match="size"):
        to_tensor(frame, size=0)


def test_to_uint8_layouts_and_range():
    x = torch.rand(1, 3, 6, 5)
    want = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    for layout in (x, x[0], x[0].permute(1, 2, 0)):
        assert np.array_equal(to_uint8(layout), want)
    over = x.clone()
    over[0, 0, 0, 0] = 1.05                                   # interpolation overshoot is clamped
    assert to_uint8(over)[0, 0, 0] == 255
    with pytest.raises(ValueError, match="batch of 2"):
        to_uint8(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(x * 2 - 1.5)


# --------------------------------------------------------------------------------------------
# faces
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def astronaut_window(astronaut, detector):
    return crop_window(astronaut, detector=detector)


def test_astronaut_face_found(astronaut, detector):
    boxes = detector.detect(astronaut)
    assert len(boxes) >= 1
    x0, y0, x1, y1 = boxes[0]
    # her face spans rows ~65-160 and columns ~175-270 of the 512x512 image (checked by eye)
    assert 130 <= x0 < x1 <= 330 and 30 <= y0 < y1 <= 200
    assert 60 <= x1 - x0 <= 150 and 60 <= y1 - y0 <= 150
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    assert areas == sorted(areas, reverse=True)


def test_astronaut_crop_window(astronaut, astronaut_window, detector):
    win = astronaut_window
    assert isinstance(win, CropWindow) and win.frame_size == (512, 512)
    assert win.x1 - win.x0 == win.y1 - win.y0 == win.side and win.side % 2 == 0
    assert 0 <= win.x0 and 0 <= win.y0 and win.x1 <= 512 and win.y1 <= 512
    fx0, fy0, fx1, fy1 = win.face
    assert win.x0 <= fx0 and win.y0 <= fy0 and fx1 <= win.x1 and fy1 <= win.y1
    assert abs(win.side - 1.8 * max(fx1 - fx0, fy1 - fy0)) <= 2
    crop = win.apply(astronaut, size=128)
    assert crop.shape == (128, 128, 3)
    # the face is in the middle of the crop, about 1/1.8 of its side
    again = detector.detect(crop)
    assert again, "the crop should still show a face"
    cx, cy = (again[0][0] + again[0][2]) / 2, (again[0][1] + again[0][3]) / 2
    assert abs(cx - 64) < 13 and abs(cy - 64) < 13
    assert 0.4 < (again[0][2] - again[0][0]) / 128 < 0.75
    with pytest.raises(ValueError, match="512x512 frames"):
        win.apply(astronaut[:300])


def test_video_crop_window_is_fixed(tmp_path, clip, detector):
    path = tmp_path / "clip.avi"
    write_clip(path, clip)
    from_path = crop_window(path, detector=detector, max_frames=4, stride=9)
    from_list = crop_window(clip, detector=detector, max_frames=4, stride=9)
    assert from_path.frame_size == from_list.frame_size == (W, H)
    assert abs(from_path.x0 - from_list.x0) <= 3 and abs(from_path.side - from_list.side) <= 4
    crops = [from_list.apply(frame) for frame in iter_frames(path)]
    assert len(crops) == T and {c.shape for c in crops} == {(from_list.side,) * 2 + (3,)}
    # the union over frames 0, 9, 18, 27 covers the face of each of those frames
    for i in (0, 9, 18, 27):
        face = detector.best_face(clip[i])
        assert from_list.x0 <= face[0] + 2 and face[2] - 2 <= from_list.x1
    median = crop_window(clip, detector=detector, max_frames=4, stride=9, combine="median")
    assert median.side <= from_list.side


class ScriptedDetector(FaceDetector):
    """FaceDetector whose detections are scripted per frame (frame index = value of pixel (0, 0)):
    {index: [(box, support), ...]}; best_face is the real method."""

    def __init__(self, script):                       # no cascade needed
        self.script = script
        self.seen = []

    def detect_scored(self, frame):
        index = int(frame[0, 0, 0])
        self.seen.append(index)
        entries = self.script.get(index, [])
        boxes = np.asarray([b for b, _ in entries], dtype=np.float64).reshape(-1, 4)
        support = np.asarray([k for _, k in entries], dtype=np.int64)
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        return boxes[order], support[order]


def test_crop_window_combines_boxes_and_rejects_outliers():
    frames = [np.full((200, 300, 3), i, np.uint8) for i in range(12)]
    script = {0: [((100, 50, 140, 90), 20)],
              3: [((110, 55, 150, 95), 25)],
              6: [((5, 5, 15, 15), 9)],                             # the only detection: a stray one
              9: [((150, 100, 290, 190), 4), ((105, 50, 145, 90), 30)]}  # larger but weak false positive
    scripted = ScriptedDetector(script)
    assert tuple(scripted.best_face(frames[9])) == (105, 50, 145, 90)
    scripted.seen.clear()
    win = crop_window(frames, detector=scripted, max_frames=4, stride=3, margin=2.0)
    assert scripted.seen == [0, 3, 6, 9]
    assert win.face == (100.0, 50.0, 150.0, 95.0)                    # union of 0, 3, 9; 6 dropped
    assert win.side == 100 and (win.x0, win.y0) == (75, 22)
    med = crop_window(frames, detector=scripted, max_frames=4, stride=3, margin=2.0, combine="median")
    assert med.face == (102.5, 50.0, 142.5, 90.0)
    with pytest.raises(ValueError, match="combine"):
        crop_window(frames, detector=scripted, combine="mean")


def test_window_shifts_inside_rather_than_shrinking():
    win = window_from_box((0, 0, 40, 40), (300, 200), margin=2.0)    # face in the top-left corner
    assert win.box == (0, 0, 80, 80)
    win = window_from_box((270, 170, 300, 200), (300, 200), margin=2.0)
    assert win.box == (240, 140, 300, 200)
    win = window_from_box((50, 20, 250, 180), (300, 200), margin=2.0)  # too big: shrunk to the short side
    assert win.box == (50, 0, 250, 200)


def test_no_face_errors(detector, astronaut):
    coffee = data.coffee()
    assert detector.detect(coffee) == []
    with pytest.raises(NoFaceError, match=r"no face found in .*leave out --crop") as info:
        crop_window(coffee, detector=detector, what="the source image")
    assert isinstance(info.value, ValueError) and "the source image" in str(info.value)
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError):
        crop_window(noise, detector=detector)
    with pytest.raises(NoFaceError, match="no frames"):
        crop_window([], detector=detector)
    with pytest.raises(NoFaceError, match="no frames"):
        crop_window(iter([]), detector=detector)


def test_lfw_faces_upscaled(detector):
    lfw = (data.lfw_subset() * 255).round().astype(np.uint8)          # 0-99 faces, 100-199 non-faces, 25x25
    faces = [cv2.resize(lfw[i], (128, 128), interpolation=cv2.INTER_CUBIC) for i in range(8)]
    found = [bool(detector.detect(face)) for face in faces]
    assert sum(found) >= 6, found
    for face, hit in zip(faces, found):
        if hit:
            x0, y0, x1, y1 = detector.detect(face)[0]
            assert x1 - x0 > 64                                       # the face fills most of the thumbnail
    assert sum(bool(detector.detect(lfw[i])) for i in range(100, 106)) <= 1


def test_face_tracker_keeps_a_fixed_window_then_follows_the_face(astronaut, detector):
    from dagan_fast.media.face import FaceTracker

    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    still = [np.ascontiguousarray(small[0:H, 45 - i:45 - i + W]) for i in range(4)]     # the head moves a little
    moved = [np.ascontiguousarray(small[0:H, 0:W])] * 8                                   # then 45 px to the right
    tracker = FaceTracker(crop_window(still[0], detector=detector), detector=detector, smoothing=0.5)
    first = tracker.window
    assert all(tracker.update(f) == first for f in still) and tracker.moves == 0
    xs = [tracker.update(f).x0 for f in moved]
    assert tracker.moves == 1 and tracker.missed == 0
    target = crop_window(moved[0], detector=detector)
    assert xs[-1] == target.x0 and tracker.window.box == target.box                 # ends on the new face
    assert xs[0] < xs[-1] and xs == sorted(xs) and len(set(xs)) > 2                 # glided there, not jumped
    assert tracker.apply(moved[0], size=32).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="frames, frame"):
        tracker.update(np.zeros((H + 2, W, 3), np.uint8))


def test_video_without_a_face_names_the_frames_looked_at(tmp_path, detector):
    coffee = cv2.resize(data.coffee(), (176, 144), interpolation=cv2.INTER_AREA)
    path = tmp_path / "cycling.avi"
    write_clip(path, [np.roll(coffee, 3 * i, axis=1) for i in range(12)])
    with pytest.raises(NoFaceError, match=r"first frames of .*cycling.avi \(looked at frames 0, 5, 10 \(3 frames\)"):
        crop_window(str(path), detector=detector, min_support=12, min_hits=0.3)
