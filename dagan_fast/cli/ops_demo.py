"""The ``dagan-fast ops-demo`` job: the dagan_fast ops driving a real face without any network.

This demo does by hand what the networks do (``dagan-fast demo`` runs the bundled trained model instead):

- the source is the astronaut portrait that ships with scikit-image (``skimage.data.astronaut()``),
  cropped around her face;
- the keypoint detector is replaced by 11 hand-placed facial keypoints (identity Jacobians);
- the driving video is replaced by a smooth synthetic head motion (yaw-like shift, nod, roll and an
  opening mouth); the driving Jacobians are the exact local linearisation of that motion;
- the dense-motion hourglass is replaced by mask logits = log-Gaussians of the driving keypoints,
  and its occlusion head by the local area ratio of the deformation (stretched regions, such as
  the opening mouth, darken);
- the depth-aware attention uses a radial "depth" prior and positions as queries and the warped
  image as keys/values.

Per frame: ``sparse_motion_inputs`` and ``dense_motion`` at 64x64, the deformation bilinearly
upsampled to full size, ``warp_occlusion`` of the full-size source, and ``attention_with_lse`` of
the nose pixel against the 4096 warped pixels. It shows the kernels' motion transfer, not a trained
model's output.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..media.video import to_uint8
from ..ops.reference import make_coordinate_grid

Tensor = torch.Tensor

STATEMENT = (
    "No network runs here: this demo drives the astronaut portrait with hand-placed "
    "keypoints and a synthetic head motion through the dagan_fast ops (sparse motion, dense motion, fused warp, "
    "cross-modal attention). It shows the kernels' motion transfer, not a trained model's output."
)

# Crop of skimage.data.astronaut() (512x512 RGB): rows, cols of a 256x256 square around her face.
CROP = (slice(0, 256), slice(100, 356))

# Hand-placed keypoints, (x, y) in [-1, 1] of the crop (make_coordinate_grid convention: pixel
# i of n sits at 2 i / (n - 1) - 1). "left"/"right" are as seen in the image.
KEYPOINTS: Tuple[Tuple[str, float, float], ...] = (
    ("left eye", -0.20, -0.20),
    ("right eye", 0.15, -0.20),
    ("nose", -0.03, 0.00),
    ("mouth left", -0.18, 0.13),
    ("mouth right", 0.13, 0.13),
    ("upper lip", -0.03, 0.10),
    ("lower lip", -0.03, 0.19),
    ("chin", -0.03, 0.35),
    ("left cheek", -0.30, 0.02),
    ("right cheek", 0.22, 0.00),
    ("forehead", -0.03, -0.35),
)
NOSE = 2
FACE_CENTRE = (-0.03, -0.02)

MOTION_SIZE = 64          # resolution of the dense motion (DaGAN: 0.25 x 256)
KP_VARIANCE = 0.01        # DaGAN's kp_variance
MASK_VARIANCE = 0.04      # mask logit of keypoint k = log of a Gaussian (this variance) at its driving position
BACKGROUND_LOGIT = -1.2   # constant logit of the background (identity) motion
OCCLUSION_FLOOR = 0.5     # lowest value of the area-ratio occlusion map


# --------------------------------------------------------------------------------------------
# source and keypoints
# --------------------------------------------------------------------------------------------
def load_source(size: int = 256) -> Tensor:
    """The astronaut's face, (1, 3, size, size) float32 RGB in [0, 1] (antialiased resize)."""
    from skimage import data

    crop = np.ascontiguousarray(data.astronaut()[CROP])
    image = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return image.clamp_(0.0, 1.0).contiguous()


def source_keypoints() -> Tensor:
    """(1, K, 2) hand-placed keypoints of the source, (x, y) in [-1, 1]."""
    return torch.tensor([[[x, y] for _, x, y in KEYPOINTS]], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# synthetic head motion
# --------------------------------------------------------------------------------------------
def motion_parameters(t: float, amplitude: float = 1.0) -> Dict[str, float]:
    """Yaw-like shift, nod, roll (radians) and mouth opening at time t in [0, 1) (periodic; all zero at t = 0)."""
    s1, s2 = math.sin(2 * math.pi * t), math.sin(4 * math.pi * t)
    return {
        "yaw": amplitude * 0.09 * s1,
        "nod": amplitude * 0.05 * s2,
        "roll": amplitude * 0.06 * s1,
        "mouth": amplitude * 0.08 * 0.5 * (1.0 - math.cos(4 * math.pi * t)),
    }


def head_motion_field(z: Tensor, t: float, amplitude: float = 1.0) -> Tensor:
    """Where the source point z (..., 2) sits in the driving frame at time t (smooth in z).

    A yaw-like horizontal shift and a nod that are largest at the face centre and fade outwards
    (a turning sphere), a roll about the neck, and the lower lip and jaw moving down.
    """
    p = motion_parameters(t, amplitude)
    cx, cy = FACE_CENTRE
    x, y = z[..., 0], z[..., 1]
    # mouth: the region below the lip line moves down, most at the lower lip, fading to the sides
    lower = torch.sigmoid((y - 0.145) / 0.015)
    jaw = torch.exp(-0.5 * ((x - cx) / 0.16) ** 2) * torch.exp(-0.5 * ((y - 0.20) / 0.18) ** 2)
    y = y + p["mouth"] * lower * jaw
    # yaw and nod: a shift that grows toward the face centre
    bulge = torch.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / 0.45 ** 2)
    x = x + p["yaw"] * bulge
    y = y + p["nod"] * bulge
    # roll about a pivot at the neck
    px, py = cx, cy + 0.6
    c, s = math.cos(p["roll"]), math.sin(p["roll"])
    dx, dy = x - px, y - py
    return torch.stack([px + c * dx - s * dy, py + s * dx + c * dy], dim=-1)


def driving_keypoints(kp_source: Tensor, t: float, amplitude: float = 1.0) -> Tuple[Tensor, Tensor]:
    """kp_driving (B, K, 2) = the head motion of kp_source, and jac_driving (B, K, 2, 2) = its exact
    local linearisation (the motion's Jacobian at each source keypoint, by autograd)."""
    with torch.enable_grad():
        points = kp_source.detach().double().reshape(-1, 2).requires_grad_(True)
        moved = head_motion_field(points, t, amplitude)
        rows = [torch.autograd.grad(moved[:, i].sum(), points, retain_graph=i == 0)[0] for i in range(2)]
    jac = torch.stack(rows, dim=1)  # (N, 2 outputs, 2 inputs)
    kp = moved.detach().to(kp_source.dtype).reshape(kp_source.shape)
    return kp, jac.to(kp_source.dtype).reshape(*kp_source.shape[:2], 2, 2)


# --------------------------------------------------------------------------------------------
# the per-frame pipeline
# --------------------------------------------------------------------------------------------
def mask_logits_from_keypoints(kp_driving: Tensor, size: int = MOTION_SIZE) -> Tensor:
    """Network-free dense-motion mask logits (B, K+1, size, size): the background a constant, keypoint
    k the log of a Gaussian at its driving position, -|z - kp_d|^2 / (2 MASK_VARIANCE).

    Their softmax is the normalised Gaussians: a smooth partition of unity, so the mixed motion
    blends gently from keypoint to keypoint and into the static background (sharper masks, such as
    30 x Gaussian logits, fold and tear the image where the face meets the background)."""
    grid = make_coordinate_grid(size, size, kp_driving.dtype, kp_driving.device)
    diff = grid[None, None] - kp_driving[:, :, None, None, :]
    logits = -0.5 * diff.pow(2).sum(-1) / MASK_VARIANCE
    background = logits.new_full((logits.shape[0], 1, size, size), BACKGROUND_LOGIT)
    return torch.cat([background, logits], dim=1)


def area_occlusion(deformation: Tensor, floor: float = OCCLUSION_FLOOR) -> Tensor:
    """Network-free occlusion map (B, 1, H, W) = clamp(sqrt(det J), floor, 1), J the Jacobian of the
    deformation (driving -> source coordinates): where a smaller source area is stretched over a
    larger driving area (the cheek turning toward the camera, the opening mouth: disoccluded
    content) the frame darkens softly, as DaGAN's occlusion map does. Exactly 1 with zero motion
    (up to rounding)."""
    B, H, W, _ = deformation.shape
    d = deformation.permute(0, 3, 1, 2)
    hx, hy = 2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1)
    pad = F.pad(d, (1, 1, 1, 1), mode="replicate")
    ddx = (pad[:, :, 1:-1, 2:] - pad[:, :, 1:-1, :-2]) / (2 * hx)
    ddy = (pad[:, :, 2:, 1:-1] - pad[:, :, :-2, 1:-1]) / (2 * hy)
    # at the borders the replicate pad halves the central difference: one-sided differences there
    if W > 1:
        ddx[..., 0] *= 2
        ddx[..., -1] *= 2
    if H > 1:
        ddy[..., 0, :] *= 2
        ddy[..., -1, :] *= 2
    det = ddx[:, 0] * ddy[:, 1] - ddy[:, 0] * ddx[:, 1]
    return det.clamp(0.0, 1.0).sqrt().clamp(floor, 1.0).unsqueeze(1).contiguous()


def depth_prior(size: int, dtype=torch.float32) -> Tensor:
    """(size, size) radial face prior in [0, 1] (1 at the face centre): a stand-in for DaGAN's depth."""
    grid = make_coordinate_grid(size, size, dtype)
    cx, cy = FACE_CENTRE
    return torch.exp(-0.5 * (((grid[..., 0] - cx) / 0.28) ** 2 + ((grid[..., 1] - cy) / 0.38) ** 2))


ATTENTION_SIGMA = 0.25    # spatial reach of the attention (in [-1, 1] units)
ATTENTION_COLOUR = 12.0   # weight of the colour agreement in the attention logits


def attention_features(warped64: Tensor, source64: Tensor, prior: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q (1,1,N,6), k (1,1,N,6), v (1,1,N,4) on the 64x64 grid, N = 4096, for ``scale=1.0``.

    q.k = -|z_q - z_k|^2 / (2 sigma^2) + colour * prior(z_q) * <skin colour, rgb_k - mean> (+ a term
    of z_q alone, which the softmax ignores): each pixel attends to nearby pixels whose warped colour
    looks like the source's skin, more so where the depth prior says "face". v = [warped RGB, prior].
    """
    _, C, H, W = warped64.shape
    grid = make_coordinate_grid(H, W, warped64.dtype).reshape(-1, 2)
    s2 = ATTENTION_SIGMA ** 2
    rgb = warped64[0].reshape(C, -1).t()                                    # (N, 3)
    centred = rgb - rgb.mean(0, keepdim=True)
    skin = source64[0, :, H // 2 - 2:H // 2 + 3, W // 2 - 2:W // 2 + 3].reshape(C, -1).mean(1)
    skin = skin - source64[0].reshape(C, -1).mean(1)
    skin = skin / skin.norm().clamp_min(1e-6)
    d = prior.reshape(-1, 1)
    q = torch.cat([grid / s2, torch.full_like(d, -0.5 / s2), ATTENTION_COLOUR * d * skin], dim=1)
    k = torch.cat([grid, grid.pow(2).sum(1, keepdim=True), centred], dim=1)
    v = torch.cat([rgb, d], dim=1)
    return q[None, None].contiguous(), k[None, None].contiguous(), v[None, None].contiguous()


def keypoint_pixel(kp: Tensor, size: int) -> Tuple[int, int]:
    """(row, col) of the pixel nearest to keypoint kp = (x, y) in [-1, 1] on a size x size grid."""
    col = int(round((float(kp[0]) + 1) / 2 * (size - 1)))
    row = int(round((float(kp[1]) + 1) / 2 * (size - 1)))
    return min(max(row, 0), size - 1), min(max(col, 0), size - 1)


@dataclass
class DemoFrames:
    """What ``render_frames`` computed; images are float32 (B=1) tensors in [0, 1]."""

    source: Tensor                    # (1, 3, S, S)
    kp_source: Tensor                 # (1, K, 2)
    times: List[float]
    frames: List[Tensor] = field(default_factory=list)          # (1, 3, S, S) each
    kp_driving: List[Tensor] = field(default_factory=list)      # (1, K, 2) each
    heat: List[Tensor] = field(default_factory=list)            # (64, 64) sum of the heat channels
    attention: List[Tensor] = field(default_factory=list)       # (64, 64) attention row of the nose
    warped64: List[Tensor] = field(default_factory=list)        # (1, 3, 64, 64) keys/values image
    occlusion: List[Tensor] = field(default_factory=list)       # (1, 1, S, S)
    op_seconds: Dict[str, float] = field(default_factory=dict)  # total time per op over all frames
    frame_seconds: List[float] = field(default_factory=list)    # wall time of each frame's pipeline
    warmup_seconds: float = 0.0                                 # first calls of the ops, on tiny inputs


def warm_up() -> float:
    """Calls each op once on tiny inputs (PyTorch imports torch._dynamo on the first custom-op call,
    about a second or two); returns the seconds spent, so per-frame timings are steady-state."""
    start = time.perf_counter()
    with torch.no_grad():
        image, kp = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2)
        ops.sparse_motion_inputs(image, kp, None, kp, None)
        ops.dense_motion(torch.zeros(1, 2, 2, 2), kp, None, kp, None)
        ops.warp_occlusion(image, torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 2, 2))
        ops.attention_with_lse(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 1), 1.0)
    return time.perf_counter() - start


def _timed(store: Dict[str, float], name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    store[name] = store.get(name, 0.0) + time.perf_counter() - start
    return out


def render_frames(frames: int = 24, size: int = 256, amplitude: float = 1.0, progress: bool = False) -> DemoFrames:
    """Runs the op pipeline for ``frames`` frames at times t = i / frames (frame 0 has zero motion).

    ``amplitude`` scales the synthetic head motion (0: every frame is the zero-motion warp).
    """
    source = load_source(size)
    source64 = F.interpolate(source, size=(MOTION_SIZE, MOTION_SIZE), mode="bilinear", align_corners=False,
                             antialias=True).contiguous()
    kp_source = source_keypoints()
    jac_source = torch.eye(2).expand(1, kp_source.shape[1], 2, 2).contiguous()
    prior = depth_prior(MOTION_SIZE)
    times = [i / frames for i in range(frames)]
    out = DemoFrames(source=source, kp_source=kp_source, times=times, warmup_seconds=warm_up())
    C = source.shape[1]
    iterator = times
    if progress:
        from tqdm import tqdm
        iterator = tqdm(times, desc="demo frames", unit="frame", leave=False)
    with torch.no_grad():
        for t in iterator:
            start = time.perf_counter()
            kp_driving, jac_driving = _timed(out.op_seconds, "keypoint motion", driving_keypoints, kp_source, t,
                                             amplitude)
            sparse = _timed(out.op_seconds, "sparse_motion_inputs", ops.sparse_motion_inputs, source64, kp_source,
                            jac_source, kp_driving, jac_driving, KP_VARIANCE)
            logits = mask_logits_from_keypoints(kp_driving)
            deformation, _mask = _timed(out.op_seconds, "dense_motion", ops.dense_motion, logits, kp_source,
                                        jac_source, kp_driving, jac_driving)
            occlusion64 = area_occlusion(deformation)
            grid = F.interpolate(deformation.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1).contiguous()
            occlusion = F.interpolate(occlusion64, size=(size, size), mode="bilinear",
                                      align_corners=False).contiguous()
            frame = _timed(out.op_seconds, "warp_occlusion", ops.warp_occlusion, source, grid, occlusion)
            warped64 = _timed(out.op_seconds, "warp_occlusion", ops.warp_occlusion, source64, deformation,
                              occlusion64)
            q, k, v = attention_features(warped64, source64, prior)
            row, col = keypoint_pixel(kp_driving[0, NOSE], MOTION_SIZE)
            q_nose = q[:, :, row * MOTION_SIZE + col:row * MOTION_SIZE + col + 1].contiguous()
            _, lse = _timed(out.op_seconds, "cross_modal_attention", ops.attention_with_lse, q_nose, k, v, 1.0)
            # the one attention row of the nose: exp(q.k - logsumexp), with the op's logsumexp
            attention = torch.exp(torch.matmul(q_nose, k.transpose(-1, -2))[0, 0, 0].float() - lse[0, 0, 0])
            out.frame_seconds.append(time.perf_counter() - start)
            out.frames.append(frame.clamp(0.0, 1.0))
            out.kp_driving.append(kp_driving)
            out.heat.append(sparse[0, ::C + 1].sum(0))
            out.attention.append(attention.reshape(MOTION_SIZE, MOTION_SIZE))
            out.warped64.append(warped64)
            out.occlusion.append(occlusion)
    return out


def full_attention(result: DemoFrames, index: int) -> Tuple[Tensor, float]:
    """The whole DaGAN-size attention step (4096 queries x 4096 keys, scale 1.0) on frame ``index``:
    returns (out (1,1,4096,4), seconds)."""
    q, k, v = attention_features(result.warped64[index], F.interpolate(
        result.source, size=(MOTION_SIZE, MOTION_SIZE), mode="bilinear", align_corners=False, antialias=True),
        depth_prior(MOTION_SIZE))
    with torch.no_grad():
        start = time.perf_counter()
        out = ops.cross_modal_attention(q, k, v, scale=1.0)
        return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------
def draw_points(image: np.ndarray, points: Tensor, colour=(0, 255, 0), radius: int = 2) -> np.ndarray:
    """Copy of ``image`` (H, W, 3) uint8 with a dot (dark ring) at each (x, y) in [-1, 1] of ``points`` (K, 2)."""
    out = image.copy()
    H, W = out.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    for x, y in points.tolist():
        cx, cy = (x + 1) / 2 * (W - 1), (y + 1) / 2 * (H - 1)
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        out[r2 <= (radius + 1) ** 2] = (0, 0, 0)
        out[r2 <= radius ** 2] = colour
    return out


def _upscale(panel: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(panel).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def heat_panel(heat: Tensor, backdrop: Tensor, size: int) -> np.ndarray:
    """Signed heat (64, 64) over a faint grey ``backdrop`` (1, 3, 64, 64) -> (size, size, 3) uint8:
    red = Gaussians of the driving keypoints, blue = those of the source keypoints."""
    h = heat.float()
    h = h / h.abs().max().clamp_min(1e-6)
    pos, neg = h.clamp_min(0), (-h).clamp_min(0)
    colour = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-1).clamp(0, 1)  # white, red +, blue -
    grey = 0.75 + 0.25 * backdrop[0].float().mean(0, keepdim=True).permute(1, 2, 0)
    return _upscale((colour * grey * 255).numpy().astype(np.uint8), size)


def attention_panel(attention: Tensor, warped64: Tensor, query: Tensor, size: int) -> np.ndarray:
    """Attention row (64, 64) as a hot overlay on the grey warped image, the query pixel marked."""
    a = attention.float()
    a = (a / a.max().clamp_min(1e-12)).clamp(0, 1)
    grey = warped64[0].float().mean(0) * 0.6
    hot = torch.stack([(a * 3).clamp(0, 1), (a * 3 - 1).clamp(0, 1), (a * 3 - 2).clamp(0, 1)], dim=-1)
    alpha = a.sqrt().unsqueeze(-1)
    rgb = (1 - alpha) * grey.unsqueeze(-1) + alpha * hot
    panel = _upscale((rgb.numpy() * 255).astype(np.uint8), size)
    return draw_points(panel, query.reshape(1, 2), colour=(0, 255, 255), radius=max(2, size // 96))


def _label(panel: np.ndarray, text: str, height: int) -> np.ndarray:
    """Panel with a caption strip above it (plain strip if Pillow cannot draw text)."""
    strip = np.full((height, panel.shape[1], 3), 255, dtype=np.uint8)
    try:
        from PIL import Image, ImageDraw, ImageFont

        img = Image.fromarray(strip)
        draw = ImageDraw.Draw(img)
        try:
            font = ImageFont.load_default(size=max(8, height - 6))
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        draw.text((3, 1), text, fill=(0, 0, 0), font=font)
        strip = np.asarray(img)
    except Exception:
        pass
    return np.concatenate([strip, panel], axis=0)


def shown_frames(count: int, fractions: Sequence[float] = (0.125, 0.25, 0.625, 0.75)) -> List[int]:
    """Indices of the driven frames shown in frames.png: those nearest to the given fractions of
    the motion period (t = 1/4 and 3/4 are the widest poses), never frame 0 unless it is the only one."""
    if count <= 1:
        return [0]
    return sorted({min(count - 1, max(1, int(round(f * count)))) for f in fractions})


def most_moved_frame(result: DemoFrames) -> int:
    """The shown frame (``shown_frames``) whose keypoints moved most: the heat and attention panels show it."""
    moves = {i: float((result.kp_driving[i] - result.kp_source).norm(dim=-1).mean())
             for i in shown_frames(len(result.frames))}
    return max(moves, key=lambda i: (round(moves[i], 6), -i))


def frames_grid(result: DemoFrames, focus: int) -> np.ndarray:
    """source + keypoints | driven frames | heat panel | attention panel, captioned."""
    size = result.source.shape[-1]
    label_h = max(12, size // 14)
    sep = np.full((size + label_h, max(2, size // 64), 3), 255, dtype=np.uint8)
    panels = [_label(draw_points(to_uint8(result.source), result.kp_source[0], radius=max(1, size // 96)),
                     "source + keypoints", label_h)]
    for i in shown_frames(len(result.frames)):
        img = draw_points(to_uint8(result.frames[i]), result.kp_driving[i][0], colour=(255, 220, 0),
                          radius=max(1, size // 128))
        panels.append(_label(img, f"frame {i} (t={result.times[i]:.2f})", label_h))
    panels.append(_label(heat_panel(result.heat[focus], result.warped64[focus], size), f"heat, frame {focus}",
                         label_h))
    panels.append(_label(attention_panel(result.attention[focus], result.warped64[focus],
                                         result.kp_driving[focus][0, NOSE], size),
                         f"nose attention, frame {focus}", label_h))
    row: List[np.ndarray] = []
    for p in panels:
        row.extend([p, sep])
    return np.concatenate(row[:-1], axis=1)


def write_animation(frames: Sequence[np.ndarray], out_dir: str, fps: float = 12.0) -> Tuple[str, str]:
    """Writes ``animation.gif`` (looping); if GIF writing fails, ``animation_strip.png`` (frames side
    by side). Returns (path, note)."""
    import imageio.v3 as iio

    path = os.path.join(out_dir, "animation.gif")
    try:
        iio.imwrite(path, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        return path, "GIF"
    except Exception as exc:  # no GIF writer: fall back to a PNG strip
        if os.path.exists(path):
            os.remove(path)
        strip = os.path.join(out_dir, "animation_strip.png")
        iio.imwrite(strip, np.concatenate(list(frames), axis=1))
        return strip, f"PNG strip (GIF writing failed: {exc.__class__.__name__}: {exc})"


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------
class DemoError(Exception):
    """A user-facing problem (bad argument, unwritable output directory): the CLI prints it, exit 2."""


def prepare_out_dir(out_dir: str) -> str:
    """Creates ``out_dir`` if needed and checks a file can be written there; raises DemoError."""
    path = os.path.abspath(os.path.expanduser(str(out_dir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise DemoError(f"cannot write to output directory {str(out_dir)!r}: it exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dagan_fast_probe_"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DemoError(f"cannot write to output directory {str(out_dir)!r}: {reason}") from None
    return path


def backend_summary() -> List[str]:
    """One line per backend of ``dagan_fast.ops.available_backends()``."""
    lines = []
    for name, info in ops.available_backends().items():
        state = "available" if info.available else "unavailable"
        implemented = ", ".join(info.ops) if info.ops else "no ops"
        lines.append(f"{name:9s} {state:11s} ops: {implemented}. {info.detail}")
    return lines


def backends_used(source: Tensor) -> Dict[str, str]:
    """Which backend each op picked for this demo's (CPU float32) tensors."""
    from ..ops._backends import select_backend

    chosen = {}
    for op in ("sparse_motion_inputs", "dense_motion", "warp_occlusion", "cross_modal_attention"):
        try:
            chosen[op] = select_backend(op, [source]).name
        except Exception as exc:  # pragma: no cover - reported, not fatal
            chosen[op] = f"none ({exc})"
    return chosen


def run_demo(out_dir: str = "ops_demo_out", frames: int = 24, size: int = 256, progress: bool = True) -> dict:
    """Animates the astronaut portrait through the dagan_fast ops and writes the results.

    No trained model is involved (see ``STATEMENT``): hand-placed keypoints, a synthetic head
    motion, network-free mask logits and occlusion, then ``sparse_motion_inputs``,
    ``dense_motion``, ``warp_occlusion`` and ``cross_modal_attention`` per frame (see the module
    docstring).

    Args:
        out_dir: output directory, created if missing.
        frames: number of frames (>= 1); frame i is at time i / frames of one motion period, so
            frame 0 has zero motion and the GIF loops seamlessly.
        size: side of the square output frames in pixels (>= 64; the motion runs at 64x64).
        progress: show a tqdm progress bar on stderr.

    Writes ``animation.gif`` (``animation_strip.png`` if GIF writing fails), ``frames.png`` (source
    with keypoints | driven frames | heat panel | nose-attention panel) and ``summary.txt``.

    Returns a dict: ``out_dir``, ``animation``, ``animation_format``, ``frames_png``, ``summary``
    (absolute paths), ``frames``, ``size``, ``per_frame_s`` (median wall time of one frame's whole
    pipeline), ``warmup_s`` (the ops' one-time first calls, before the frames), ``op_seconds``
    (total per op), ``full_attention_s`` (one 4096x4096 attention step), ``total_s``, ``threads``,
    ``backends_used`` (op -> backend), ``focus_frame`` (the most-moved frame, shown in the heat and
    attention panels), ``mean_abs_diff`` (per frame, mean |frame - source|).

    Raises DemoError for bad arguments or an unwritable ``out_dir``.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise DemoError(f"frames must be a positive integer, got {frames!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 64 <= size <= 2048:
        raise DemoError(f"size must be an integer from 64 to 2048, got {size!r}")
    start = time.perf_counter()
    path = prepare_out_dir(out_dir)

    result = render_frames(frames, size, progress=progress)
    focus = most_moved_frame(result)
    _, full_attention_s = full_attention(result, focus)

    info = {
        "out_dir": path, "frames": frames, "size": size,
        "per_frame_s": float(np.median(result.frame_seconds)), "warmup_s": result.warmup_seconds,
        "op_seconds": dict(result.op_seconds),
        "full_attention_s": full_attention_s, "threads": torch.get_num_threads(),
        "backends_used": backends_used(result.source), "focus_frame": focus,
        "mean_abs_diff": [float((f - result.source).abs().mean()) for f in result.frames],
        "frames_png": os.path.join(path, "frames.png"), "summary": os.path.join(path, "summary.txt"),
    }
    try:
        import imageio.v3 as iio

        info["animation"], info["animation_format"] = write_animation([to_uint8(f) for f in result.frames], path)
        iio.imwrite(info["frames_png"], frames_grid(result, focus))
        info["total_s"] = time.perf_counter() - start
        with open(info["summary"], "w", encoding="utf-8") as fh:
            fh.write(_summary_text(result, info))
    except OSError as exc:
        raise DemoError(f"cannot write the outputs to {path!r}: {exc.strerror or exc}") from None
    return info


def _summary_text(result: DemoFrames, info: dict) -> str:
    frames, size, focus = info["frames"], info["size"], info["focus_frame"]
    lines = ["dagan-fast ops-demo", "", STATEMENT, "",
             f"Source: skimage.data.astronaut() rows {CROP[0].start}-{CROP[0].stop}, cols {CROP[1].start}-"
             f"{CROP[1].stop}, resized to {size}x{size}.",
             f"Frames: {frames} (one period of the synthetic motion; frame 0 has zero motion); dense motion at "
             f"{MOTION_SIZE}x{MOTION_SIZE}.",
             "", f"Keypoints (x, y in [-1, 1]; source -> driving at the most-moved frame {focus}):"]
    for (name, _, _), s, d in zip(KEYPOINTS, result.kp_source[0].tolist(), result.kp_driving[focus][0].tolist()):
        lines.append(f"  {name:12s} ({s[0]:+.3f}, {s[1]:+.3f}) -> ({d[0]:+.3f}, {d[1]:+.3f})")
    lines += ["", "Backends used: " + ", ".join(f"{op} -> {b}" for op, b in info["backends_used"].items()),
              "Backends in this install:"] + ["  " + line for line in backend_summary()]
    lines += ["", f"Per-frame time: {info['per_frame_s'] * 1000:.1f} ms (median over the {frames} frames of one "
                  f"frame's whole pipeline; {info['threads']} CPU threads, torch {torch.__version__})",
              f"One-time warm-up before the frames: {info['warmup_s'] * 1000:.0f} ms (PyTorch imports torch._dynamo "
              f"on the first custom-op call)",
              "Time per op, all frames: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in info["op_seconds"].items()),
              f"One full 4096x4096 attention step (scale 1.0, Dqk 6, Dv 4): {info['full_attention_s'] * 1000:.1f} ms",
              f"Total: {info['total_s']:.2f} s",
              "Mean |frame - source| per frame: " + ", ".join(f"{d:.3f}" for d in info["mean_abs_diff"]),
              "", "Outputs:", f"  {info['animation']}  ({info['animation_format']}, {frames} frames)",
              f"  {info['frames_png']}  (source + keypoints | driven frames | heat channels of sparse_motion_inputs, "
              f"red driving / blue source | attention of the nose pixel over the warped frame)",
              f"  {info['summary']}", ""]
    return "\n".join(lines)
