"""Paste-back (dagan_fast.media.paste_back) and ``Animator(paste_back=True)``: pixels outside the window are the
source's exactly, inside the blend is the model output where the mask is 1; odd sizes; windows on the border."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dagan_fast import Animator
from dagan_fast.media.face import CropWindow
from dagan_fast.media.paste_back import PasteBack, feather_mask, parse_box, window_from_xywh

from test_streaming import SIZE, face, head_motion, small_model


def _random(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _check(paste: PasteBack, source: np.ndarray, result: np.ndarray, frame: np.ndarray) -> None:
    win = paste.window
    assert frame.shape == source.shape and frame.dtype == np.uint8
    outside = np.ones(source.shape[:2], bool)
    outside[win.y0:win.y1, win.x0:win.x1] = False
    assert np.array_equal(frame[outside], source[outside])             # untouched, pixel for pixel
    side = win.side
    interpolation = cv2.INTER_AREA if result.shape[0] > side else cv2.INTER_LINEAR
    resized = result if result.shape[0] == side else cv2.resize(result, (side, side), interpolation=interpolation)
    region = frame[win.y0:win.y1, win.x0:win.x1].astype(np.float64)
    full = paste.mask == 1.0
    assert full.any()
    assert np.array_equal(region[full], resized[full])                  # the model's output where the mask is 1
    m = paste.mask[..., None].astype(np.float64)
    want = m * resized + (1 - m) * source[win.y0:win.y1, win.x0:win.x1]
    assert np.abs(region - want).max() <= 0.5 + 1e-3                    # the blend, rounded to nearest


@pytest.mark.parametrize("shape, box", [
    ((97, 131, 3), (30, 20, 40, 40)),          # odd frame, window inside
    ((101, 77, 3), (0, 0, 33, 33)),            # odd window touching the top-left corner
    ((90, 120, 3), (87, 57, 33, 33)),          # touching the bottom-right corner
    ((64, 64, 3), (0, 0, 64, 64)),             # the window is the whole frame
    ((75, 200, 3), (-10, 5, 300, 300)),        # a box larger than the frame: shrunk to the short side
])
def test_outside_untouched_inside_is_the_output(shape, box):
    source = _random(shape, 1)
    window = window_from_xywh(box, (shape[1], shape[0]))
    paste = PasteBack(source, window)
    for side, seed in ((SIZE, 2), (17, 3)):                             # enlarged and shrunk results
        result = _random((side, side, 3), seed)
        _check(paste, source, result, paste(result))


def test_mask_feathers_only_inner_edges():
    mask = feather_mask(50, 0.1)
    assert mask.shape == (50, 50) and mask.dtype == np.float32
    assert mask[25, 25] == 1.0 and 0 < mask[0, 25] < mask[3, 25] < 1.0 and mask.min() > 0
    assert np.array_equal(mask, mask[::-1]) and np.array_equal(mask, mask.T)
    hard = feather_mask(50, 0.1, hard_edges=(True, True, False, False))   # on the frame's left and top border
    assert hard[0, 25] == 1.0 and hard[25, 0] == 1.0 and hard[49, 25] < 1.0 and hard[25, 49] < 1.0
    assert np.all(feather_mask(9, 0.0) == 1.0)
    with pytest.raises(ValueError, match="feather"):
        feather_mask(50, 0.7)
    # a window on the border keeps the model's output up to the border
    source = _random((80, 120, 3), 4)
    paste = PasteBack(source, CropWindow(0, 10, 40, 50, (120, 80)))
    result = _random((40, 40, 3), 5)
    assert np.array_equal(paste(result)[30, 0], result[20, 0])


def test_out_size_and_errors():
    source = _random((90, 160, 3), 6)
    paste = PasteBack(source, (40, 20, 50, 50), out_size=(80, 45))
    assert paste(_random((SIZE, SIZE, 3), 7)).shape == (45, 80, 3) and paste.size == (80, 45)
    with pytest.raises(ValueError, match="square"):
        paste(_random((SIZE, SIZE + 1, 3), 8))
    with pytest.raises(ValueError, match="outside"):
        window_from_xywh((500, 500, 10, 10), (160, 90))
    with pytest.raises(ValueError, match="--source-box"):
        parse_box("1,2,3")
    with pytest.raises(ValueError, match="--source-box"):
        parse_box("1,2,0,4")
    assert parse_box(" 1, 2,30,40") == (1, 2, 30, 40)
    with pytest.raises(ValueError, match="made for"):
        PasteBack(source, CropWindow(0, 0, 10, 10, (100, 100)))


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_animator_paste_back_yields_full_resolution_frames(model):
    portrait = np.ascontiguousarray(cv2.resize(face(), (151, 151))[:, :139])       # odd, non-square source
    box = (20, 10, 96, 96)
    plain = Animator(model, portrait, size=SIZE, source_box=box)
    pasted = Animator(model, portrait, size=SIZE, source_box=box, paste_back=True)
    clip = head_motion(3)
    crops = list(plain.stream(clip))
    frames = list(pasted.stream(clip))
    assert len(frames) == 3 and crops[0].shape == (SIZE, SIZE, 3)
    for crop, frame in zip(crops, frames):
        assert frame.shape == portrait.shape and frame.dtype == np.uint8
        _check(pasted.paster, portrait, crop, frame)
    # tensors in: still full-resolution uint8 frames out
    import torch

    tensor = torch.from_numpy(clip[0]).permute(2, 0, 1).float() / 255
    pasted.reset()
    assert pasted(tensor).shape == portrait.shape


def test_animator_paste_back_without_a_box_uses_the_centre_square(model):
    portrait = np.ascontiguousarray(cv2.resize(face(), (90, 70)))
    animator = Animator(model, portrait, size=SIZE, paste_back=True)
    assert animator.paster.window.box == (10, 0, 80, 70)
    frame = animator(head_motion(1)[0])
    assert frame.shape == (70, 90, 3)
    assert np.array_equal(frame[:, :10], portrait[:, :10]) and np.array_equal(frame[:, 80:], portrait[:, 80:])
