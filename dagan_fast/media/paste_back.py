"""Paste the animated face back into the full-resolution source portrait.

The model sees only a square window of the source (the face window, resized to the model's side S, e.g.
64 or 256). :class:`PasteBack` puts each S x S result back where it came from, as LivePortrait does:

    paste = PasteBack(source, window)           # source (H, W, 3) uint8, window a CropWindow in it
    full = paste(result)                        # result (S, S, 3) uint8 -> (H, W, 3) uint8

Per frame, only the window is touched: the result is resized to the window's side (INTER_AREA to shrink,
INTER_LINEAR to enlarge), blended with the source's own pixels under a feathered mask computed once, and
written into a copy of the source. Everything outside the window is the source, pixel for pixel; inside,
where the mask is 1 the pixels are the resized result exactly. The mask is 1 in the middle and falls to 0
over a band of ``feather`` x side pixels along the window's edges (a smoothstep ramp), except along edges
that lie on the border of the source: there the face continues past the frame, so the result reaches the
border unblended.

Cost per frame: one copy of the source (H x W x 3 bytes) and a resize + blend of the window (side^2 pixels);
``benchmarks/latency.py --paste-back`` reports it (1920x1080 source).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .face import CropWindow, window_from_box
from .video import as_rgb_uint8, describe

__all__ = ["PasteBack", "feather_mask", "window_from_xywh", "parse_box", "DEFAULT_FEATHER"]

#: Width of the mask's ramp as a fraction of the window side.
DEFAULT_FEATHER = 0.1


def parse_box(text: str, what: str = "--source-box") -> Tuple[int, int, int, int]:
    """``"x,y,w,h"`` (integers, pixels; w, h > 0) -> (x, y, w, h); ``ValueError`` naming ``what`` otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"{what}: expected x,y,w,h as four integers in pixels with w and h > 0 "
                         f"(e.g. 120,80,256,256), got {text!r}")
    return values  # type: ignore[return-value]


def window_from_xywh(box: Union[Sequence[int], CropWindow], frame_size: Tuple[int, int],
                     what: str = "source_box") -> CropWindow:
    """The square window for a user box (x, y, w, h) in a frame of ``frame_size`` (W, H): side max(w, h),
    centred on the box, shifted (not shrunk) to stay inside the frame, shrunk only to the frame's shorter
    side, even when possible (as :func:`~dagan_fast.media.face.window_from_box`). A :class:`CropWindow`
    is returned as is after checking its frame size. ``ValueError`` (naming ``what``) for a box that does
    not overlap the frame or has a non-positive size."""
    width, height = int(frame_size[0]), int(frame_size[1])
    if isinstance(box, CropWindow):
        if tuple(box.frame_size) != (width, height):
            raise ValueError(f"{what}: the window was made for {box.frame_size[0]}x{box.frame_size[1]} frames, "
                             f"the source is {width}x{height}")
        return box
    try:
        x, y, w, h = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (x, y, w, h) integers, got {box!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{what}: width and height must be > 0, got {box!r}")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"{what}: the box {box!r} (x, y, w, h) lies outside the {width}x{height} source")
    side = max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    window = window_from_box((cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0),
                             (width, height), margin=1.0)
    return CropWindow(window.x0, window.y0, window.x1, window.y1, window.frame_size, face=None)


def feather_mask(side: int, feather: float = DEFAULT_FEATHER,
                 hard_edges: Tuple[bool, bool, bool, bool] = (False, False, False, False)) -> np.ndarray:
    """(side, side) float32 blend weights in [0, 1]: 1 in the middle, a smoothstep ramp to 0 over
    ``round(feather * side)`` pixels along each edge (the outermost pixel gets the smallest nonzero weight
    of the ramp, never exactly 0 so the band stays continuous; the pixel just outside the window is the
    source, i.e. weight 0). ``hard_edges`` (left, top, right, bottom): edges that keep weight 1 up to the
    border (the window touches the frame there). ``feather=0``: all ones."""
    if not isinstance(side, (int, np.integer)) or side < 1:
        raise ValueError(f"feather_mask: side must be a positive int, got {side!r}")
    if not 0.0 <= feather <= 0.5:
        raise ValueError(f"feather_mask: feather must be in [0, 0.5] (a fraction of the window side), got {feather!r}")
    band = int(round(feather * side))
    ramp = np.ones(side, dtype=np.float32)
    if band > 0:
        t = (np.arange(band, dtype=np.float32) + 1.0) / (band + 1.0)     # (0, 1), increasing inwards
        ramp[:band] = t * t * (3.0 - 2.0 * t)
    left, top, right, bottom = (bool(v) for v in hard_edges)
    ones = np.ones(side, dtype=np.float32)
    wx = np.minimum(ones if left else ramp, ones if right else ramp[::-1])
    wy = np.minimum(ones if top else ramp, ones if bottom else ramp[::-1])
    return np.ascontiguousarray(wy[:, None] * wx[None, :])


class PasteBack:
    """Blend model outputs into the full-resolution source at a fixed window.

    ``source``: the full source image ((H, W, 3) uint8 RGB, or anything ``read_image`` accepts).
    ``window``: a :class:`~dagan_fast.media.face.CropWindow` of ``source`` (e.g. from ``crop_window``), or a
    user box (x, y, w, h) made square by :func:`window_from_xywh`. ``feather``: mask ramp width as a
    fraction of the side (default 0.1). ``out_size``: (W, H) to resize each full frame to (None: the
    source's size). The mask, its complement times the source window, and the window's slices are computed
    here, once.

    Attributes: ``source`` (H, W, 3) uint8, ``window``, ``mask`` (side, side) float32, ``size`` (W, H) of
    the frames returned.
    """

    def __init__(self, source, window: Union[CropWindow, Sequence[int]], feather: float = DEFAULT_FEATHER,
                 out_size: Optional[Tuple[int, int]] = None):
        self.source = np.ascontiguousarray(as_rgb_uint8(source, what="PasteBack source"))
        h, w = self.source.shape[:2]
        self.window = window_from_xywh(window, (w, h), what="PasteBack window")
        win = self.window
        if not (0 <= win.x0 < win.x1 <= w and 0 <= win.y0 < win.y1 <= h):
            raise ValueError(f"PasteBack: window {win.box} does not lie inside the {w}x{h} source")
        hard = (win.x0 == 0, win.y0 == 0, win.x1 == w, win.y1 == h)
        self.mask = feather_mask(win.side, feather, hard)
        # the band where 0 < mask < 1, as up to four rectangles (top, bottom, left, right strips); inside them
        # the blend runs in float32 with precomputed weights and (1 - mask) * source; elsewhere the result is copied
        side = win.side
        band = int(round(feather * side))
        t = 0 if hard[1] else band
        b = 0 if hard[3] else band
        l = 0 if hard[0] else band
        r = 0 if hard[2] else band
        rects = [(slice(0, t), slice(0, side)), (slice(side - b, side), slice(0, side)),
                 (slice(t, side - b), slice(0, l)), (slice(t, side - b), slice(side - r, side))]
        region = self.source[win.y0:win.y1, win.x0:win.x1].astype(np.float32)
        self._strips = []
        for ys, xs in rects:
            if ys.stop - ys.start <= 0 or xs.stop - xs.start <= 0:
                continue
            weights = np.ascontiguousarray(np.repeat(self.mask[ys, xs, None], 3, axis=2))
            background = np.ascontiguousarray(region[ys, xs] * (1.0 - weights))
            self._strips.append((ys, xs, weights, background))
        if out_size is not None:
            if (not isinstance(out_size, (tuple, list)) or len(out_size) != 2
                    or not all(isinstance(v, (int, np.integer)) and v > 0 for v in out_size)):
                raise ValueError(f"PasteBack: out_size must be (width, height) positive ints, got {out_size!r}")
            out_size = (int(out_size[0]), int(out_size[1]))
            if out_size == (w, h):
                out_size = None
        self._out_size = out_size
        self.size = out_size or (w, h)

    def _resized(self, result) -> np.ndarray:
        image = as_rgb_uint8(result, what="PasteBack result")
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"PasteBack: the model output must be square (S, S, 3), got {describe(image)}")
        side = self.window.side
        if image.shape[0] != side:
            interpolation = cv2.INTER_AREA if image.shape[0] > side else cv2.INTER_LINEAR
            image = cv2.resize(image, (side, side), interpolation=interpolation)
        return image

    def _blend_into(self, out: np.ndarray) -> None:
        """Blend the feather band of ``out`` ((side, side, 3) uint8 view holding the resized result) in place."""
        for ys, xs, weights, background in self._strips:
            blended = cv2.multiply(out[ys, xs], weights, dtype=cv2.CV_32F)
            cv2.add(blended, background, dst=blended)
            out[ys, xs] = cv2.convertScaleAbs(blended)      # round to nearest, saturate to [0, 255]

    def blend_window(self, result) -> np.ndarray:
        """(S, S, 3) uint8 model output -> (side, side, 3) uint8 window (a new array): resized to the
        window, then ``mask * result + (1 - mask) * source`` rounded to nearest."""
        out = np.array(self._resized(result), copy=True)
        self._blend_into(out)
        return out

    def __call__(self, result) -> np.ndarray:
        """(S, S, 3) uint8 model output (or any square image ``read_image`` accepts) -> (H, W, 3) uint8 full
        frame, a new array (``out_size`` applied when given)."""
        win = self.window
        image = self._resized(result)
        frame = self.source.copy()
        region = frame[win.y0:win.y1, win.x0:win.x1]
        region[...] = image
        self._blend_into(region)
        if self._out_size is not None:
            interpolation = cv2.INTER_AREA if self._out_size[0] < frame.shape[1] else cv2.INTER_LINEAR
            frame = cv2.resize(frame, self._out_size, interpolation=interpolation)
        return frame

    def __repr__(self) -> str:
        return f"PasteBack(source {self.source.shape[1]}x{self.source.shape[0]}, window {self.window.box})"
