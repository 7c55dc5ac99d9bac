"""``dagan-fast``: the command line. A small argparse dispatcher: each subcommand registers a parser
and a handler ``(args) -> exit code``; add one by writing ``_add_<name>`` and listing it in
``SUBCOMMANDS``. Usage errors and problems the user can fix exit with code 2 and a one-line message,
never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .errors import CommandError

PROG = "dagan-fast"


def _positive_int(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
def _add_ops_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "ops-demo",
        help="drive a bundled portrait through the ops alone (no network)",
        description=(
            "Drive the astronaut portrait that ships with scikit-image through the dagan_fast ops alone. "
            "No network runs (not even the bundled one): the keypoints are hand-placed and the head motion is "
            "synthetic, so this shows the kernels' motion transfer (sparse motion, dense motion, fused warp, "
            "cross-modal attention). Runs on the CPU in seconds; no download."),
        epilog=(
            "Writes to --out: animation.gif (the driven frames, looping), frames.png (source with keypoints | "
            "driven frames | heat channels | nose attention) and summary.txt (keypoints, backends, timings). "
            "Set DAGAN_FAST_BACKEND=reference|cpu|cuda|triton to force a backend."),
    )
    parser.add_argument("--out", default="ops_demo_out", metavar="DIR",
                        help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--frames", type=_positive_int(1, 1000, "--frames"), default=24, metavar="N",
                        help="number of frames, one period of the motion (1-1000, default: %(default)s)")
    parser.add_argument("--size", type=_positive_int(64, 2048, "--size"), default=256, metavar="S",
                        help="frame side in pixels; the motion itself runs at 64x64 (64-2048, default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int(1, 1024, "--threads"), default=None, metavar="T",
                        help="PyTorch CPU threads (default: PyTorch's choice; 1 is often fastest for these "
                             "small ops on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_ops_demo)


def _run_ops_demo(args: argparse.Namespace) -> int:
    import torch

    from . import ops_demo as demo

    from ..ops._backends import PRIORITY
    from ..ops import BackendError

    forced = os.environ.get("DAGAN_FAST_BACKEND", "").strip()
    if forced and forced not in PRIORITY:
        raise CommandError(f"DAGAN_FAST_BACKEND={forced!r} is not a backend; use one of {', '.join(PRIORITY)} "
                           "or unset it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        demo.prepare_out_dir(args.out)  # fail before printing anything
        print(demo.STATEMENT, flush=True)
        result = demo.run_demo(args.out, frames=args.frames, size=args.size, progress=not args.no_progress)
    except demo.DemoError as exc:
        raise CommandError(str(exc)) from None
    except BackendError as exc:
        raise CommandError(f"{exc}\n(unset DAGAN_FAST_BACKEND to let each op pick a backend that can run it)") from None
    print()
    print("Backends used: " + ", ".join(f"{op} -> {name}" for op, name in result["backends_used"].items()))
    print("Backends in this install:")
    for line in demo.backend_summary():
        print("  " + line)
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    print(f"Per-frame time: {result['per_frame_s'] * 1000:.1f} ms median ({plural(result['frames'], 'frame')} of "
          f"{result['size']}x{result['size']}, {plural(result['threads'], 'CPU thread')}; one-time warm-up "
          f"{result['warmup_s'] * 1000:.0f} ms). One full 4096x4096 attention step: "
          f"{result['full_attention_s'] * 1000:.1f} ms. Total {result['total_s']:.1f} s.")
    print("Outputs:")
    print(f"  {result['animation']}  ({result['animation_format']}, the driven frames)")
    print(f"  {result['frames_png']}  (source + keypoints | driven frames | heat channels | nose attention)")
    print(f"  {result['summary']}")
    return 0


# --------------------------------------------------------------------------------------------
# animate, webcam, convert
# --------------------------------------------------------------------------------------------
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def _add_model_options(parser) -> None:
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="the model: a dagan_fast .safetensors file (from 'dagan-fast convert' or training), or "
                             "the authors' .pth.tar with --depth-encoder and --depth-decoder (default: the bundled "
                             "tiny 64x64 model trained on synthetic clips)")
    parser.add_argument("--depth-encoder", metavar="ENCODER_PTH", help="official depth encoder (encoder.pth)")
    parser.add_argument("--depth-decoder", metavar="DEPTH_PTH", help="official depth decoder (depth.pth)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto"] + sorted(_DTYPES), default="auto",
                        help="compute precision: auto = bf16 on a CPU with AMX/AVX512-BF16, else fp32; bf16 runs on "
                             "the CPU and CUDA, fp16 needs --device cuda (default: %(default)s)")
    parser.add_argument("--size", type=_positive_int(64, 4096, "--size"), default=None, metavar="S",
                        help="side the model runs at, a multiple of the model's size_multiple (default: the size the "
                             "model file records it was trained at, else 256)")
    motion = parser.add_mutually_exclusive_group()
    motion.add_argument("--relative", dest="relative", action="store_true", default=True,
                        help="relative motion against a reference driving frame (default)")
    motion.add_argument("--absolute", dest="relative", action="store_false",
                        help="use the driving keypoints as they are")
    parser.add_argument("--adapt-scale", action="store_true",
                        help="scale the motion by the source/reference keypoint hull areas")
    parser.add_argument("--crop", action="store_true",
                        help="animate the face: a square window around the detected face of the source (found once) "
                             "and of the driving frames (tracked), pasted back into the full source (default: the "
                             "centre square of each)")
    parser.add_argument("--source-box", metavar="X,Y,W,H", default=None,
                        help="the source window to animate, in source pixels (made square), instead of the detected "
                             "face; pasted back like --crop")
    parser.add_argument("--no-paste-back", dest="paste_back", action="store_false", default=True,
                        help="with --crop/--source-box, output the model's square crop instead of the full source")
    parser.add_argument("--smooth", action="store_true",
                        help="One-Euro smoothing of the driving keypoints (less jitter)")
    parser.add_argument("--fast-conv", action=argparse.BooleanOptionalAction, default=None,
                        help="CPU float32: Winograd F(4x4,3x3) for the 3x3 convolutions where it measures faster "
                             "(default on there; outputs within ~1e-4 of the direct convolutions); "
                             "--no-fast-conv: direct convolutions only")
    parser.add_argument("--threads", type=_positive_int(1, 1024, "--threads"), default=None, metavar="T",
                        help="PyTorch CPU threads (default: PyTorch's choice)")


def _load_model(args):
    """The model of --checkpoint (the bundled one without it), and the side it runs at (--size, else the size
    the file records, else 256); user-fixable problems become CommandError."""
    from ..checkpoints import CheckpointError
    from ..streaming import DEFAULT_SIZE, load_model

    if bool(args.depth_encoder) != bool(args.depth_decoder):
        raise CommandError("--depth-encoder and --depth-decoder go together (the official depth files)")
    if args.depth_encoder and not args.checkpoint:
        raise CommandError("--depth-encoder/--depth-decoder need --checkpoint (the official .pth.tar)")
    try:
        model = load_model(args.checkpoint, depth_encoder=args.depth_encoder, depth_decoder=args.depth_decoder)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as exc:
        raise CommandError(str(exc)) from None
    size = args.size or getattr(model, "image_size", None) or DEFAULT_SIZE
    return model, size


def _make_animator(args, model, size: int, source_image, reference: str = "first", source_box=None,
                   paste_back: bool = False):
    """The Animator for parsed options and a loaded model; user-fixable problems become CommandError."""
    import torch

    from ..checkpoints import CheckpointError
    from ..streaming import Animator

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CommandError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {args.device}: only cpu and cuda are supported")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, _DTYPES[args.dtype])
    if dtype == torch.float16 and device.type != "cuda":
        raise CommandError(f"--dtype {args.dtype} needs --device cuda; use --dtype bf16, fp32 or auto on the CPU")
    smoothing = {"freq": getattr(args, "_fps", None)} if args.smooth else None
    try:
        animator = Animator(model, source_image, device=device, dtype=dtype, relative=args.relative,
                            adapt_scale=args.adapt_scale, reference=reference, smoothing=smoothing, size=size,
                            fast_conv=args.fast_conv, source_box=source_box, paste_back=paste_back)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{type(animator.model).__name__} {animator.size}x{animator.size} on {animator.device}, "
          f"{str(animator.dtype).replace('torch.', '')} ({animator.dtype_reason})", flush=True)
    return animator


def _add_animate(subparsers) -> None:
    parser = subparsers.add_parser(
        "animate",
        help="animate a portrait with a driving video",
        description=("Animate the --source portrait with the head motion and expressions of the --driving video "
                     "(DaGAN, relative motion by default) and write the result with the driving video's frame rate."),
        epilog="Example: dagan-fast animate --source portrait.jpg --driving talk.mp4 --out result.mp4 "
               "--checkpoint dagan.safetensors --crop --find-best-frame",
    )
    parser.add_argument("--source", required=True, metavar="IMAGE", help="the portrait to animate")
    parser.add_argument("--driving", required=True, metavar="VIDEO",
                        help="driving video (.mp4, .avi, ...), image folder or image")
    parser.add_argument("--out", required=True, metavar="VIDEO",
                        help="output .mp4/.mov/.mkv (H.264 + AAC), .webm (VP9 + Opus), .gif, .avi (MJPG, silent), or "
                             "a folder (path ending in '/') for PNG frames + audio.wav")
    _add_model_options(parser)
    parser.add_argument("--out-size", metavar="WxH", default=None,
                        help="resize the animated frames to W x H pixels (default: the source's size with paste-back, "
                             "else the model's)")
    parser.add_argument("--no-audio", dest="audio", action="store_false", default=True,
                        help="do not copy the driving video's sound")
    parser.add_argument("--find-best-frame", action="store_true",
                        help="reference = the driving frame (of the first 10) whose keypoints best match the source")
    parser.add_argument("--side-by-side", action="store_true", help="write source | driving | result")
    parser.add_argument("--batch-size", type=_positive_int(1, 256, "--batch-size"), default=1, metavar="B",
                        help="frames per network call (offline throughput; default: %(default)s, streaming)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_animate)


def _checked_source(args: argparse.Namespace):
    """Applies --threads and reads --source (H,W,3 uint8 RGB), as CommandErrors."""
    import torch

    from ..media.video import read_image

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return read_image(args.source, what=f"--source {args.source}")
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise CommandError(f"--source: {exc}") from None


def _parse_size(text: Optional[str], what: str):
    """"WxH" -> (W, H) positive ints, or None; CommandError naming ``what`` otherwise."""
    if text is None:
        return None
    parts = text.lower().replace(" ", "").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        width = height = 0
    if len(parts) != 2 or width < 1 or height < 1 or width > 16384 or height > 16384:
        raise CommandError(f"{what}: expected WxH in pixels (e.g. 1280x720), got {text!r}")
    return width, height


#: What to do when the source portrait shows no face the detector finds.
_SOURCE_NO_FACE_HINT = ("pass a portrait in which a frontal face is clearly visible, give the face window by hand "
                        "with --source-box X,Y,W,H, or leave out --crop to animate the centre square")
#: What to do when the driving video shows no face in its first frames.
_DRIVING_NO_FACE_HINT = ("the driving video must show a frontal face from its first seconds on (trim the start of the "
                         "clip), or leave out --crop to use the centre square of each frame")


def _source_window(args, source):
    """The source CropWindow of --source-box or --crop (None without either); CommandError for user problems."""
    from ..media.face import NoFaceError, crop_window
    from ..media.paste_back import parse_box, window_from_xywh

    height, width = source.shape[:2]
    try:
        if args.source_box is not None:
            return window_from_xywh(parse_box(args.source_box), (width, height), what="--source-box")
        if args.crop:
            return crop_window(source, what=f"--source {args.source}", hint=_SOURCE_NO_FACE_HINT)
    except NoFaceError as exc:
        raise CommandError(str(exc)) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return None


class _UserWarnings:
    """Show MediaWarnings as one ``dagan-fast COMMAND: warning: ...`` line each, on stderr, while active."""

    def __init__(self, command: str):
        self.command = command

    def __enter__(self):
        import warnings

        from ..media.audio import MediaWarning

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always", MediaWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, MediaWarning):
                print(f"{PROG} {self.command}: warning: {message}", file=sys.stderr, flush=True)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _panel(image, height: int):
    """(h, w, 3) uint8 -> resized to ``height`` rows, aspect ratio kept (for --side-by-side)."""
    import cv2

    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, int(round(w * height / h)))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if height < h else cv2.INTER_LINEAR)


def _run_animate(args: argparse.Namespace) -> int:
    import collections
    import time

    import cv2
    import numpy as np

    from ..media.face import DRIVING_MIN_SUPPORT, FaceTracker, NoFaceError, crop_window
    from ..media.video import VideoReader, VideoWriter, center_square, resize_square

    out_size = _parse_size(args.out_size, "--out-size")
    full_source = _checked_source(args)
    try:
        reader = VideoReader(args.driving)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise CommandError(f"--driving: {exc}") from None
    model, size = _load_model(args)
    window = _source_window(args, full_source)
    paste_back = window is not None and args.paste_back
    tracker = None
    with reader, _UserWarnings("animate"):
        try:
            if args.crop:
                first = crop_window(args.driving, what=f"the first frames of --driving {args.driving}",
                                    min_support=DRIVING_MIN_SUPPORT, min_hits=0.3, hint=_DRIVING_NO_FACE_HINT)
                tracker = FaceTracker(first)
                prepare = lambda f: tracker.apply(f, size=size)  # noqa: E731
            else:
                prepare = lambda f: resize_square(np.ascontiguousarray(center_square(f)), size)  # noqa: E731
        except NoFaceError as exc:
            raise CommandError(f"{exc}") from None
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        args._fps = reader.fps
        animator = _make_animator(args, model, size, full_source, reference="best" if args.find_best_frame else "first",
                                  source_box=window, paste_back=paste_back)
        # the left panel of --side-by-side: the full source with paste-back, else the model's input
        if paste_back:
            shown_source = full_source
        elif window is not None:
            shown_source = window.apply(full_source, size=size)
        else:
            shown_source = resize_square(np.ascontiguousarray(center_square(full_source)), size)
        try:
            writer = VideoWriter(args.out, fps=reader.fps, audio=args.driving if args.audio else None)
        except (OSError, ValueError) as exc:
            raise CommandError(f"--out: {exc}") from None
        fed: collections.deque = collections.deque()

        def driving_frames():
            for frame in reader:
                crop = prepare(frame)
                if args.side_by_side:
                    fed.append(frame if paste_back else crop)
                yield crop

        from tqdm.auto import tqdm

        count = 0
        began = time.perf_counter()
        with writer, tqdm(total=reader.frame_count, unit="frame", disable=args.no_progress,
                          desc="animate") as bar:
            outputs = (animator.stream(driving_frames()) if args.batch_size == 1
                       else animator.animate_video(driving_frames(), batch_size=args.batch_size))
            try:
                for out in outputs:
                    if out_size is not None and (out.shape[1], out.shape[0]) != out_size:
                        out = cv2.resize(out, out_size, interpolation=cv2.INTER_AREA if out_size[0] < out.shape[1]
                                         else cv2.INTER_LINEAR)
                    if args.side_by_side:
                        height = out.shape[0]
                        out = np.concatenate([_panel(shown_source, height), _panel(fed.popleft(), height), out], axis=1)
                    writer.write(out)
                    count += 1
                    bar.update(1)
            except NoFaceError as exc:
                raise CommandError(str(exc)) from None
            except ValueError as exc:
                raise CommandError(f"--driving {args.driving}: {exc}") from None
        elapsed = time.perf_counter() - began
    if tracker is not None and (tracker.moves or tracker.missed):
        print(f"driving face: the window moved {tracker.moves} time(s); no face found in {tracker.missed} of "
              f"{tracker.frames} frames (the window was kept there)")
    height, width = (writer.size[1], writer.size[0]) if writer.size else (0, 0)
    print(f"output: {width}x{height} {writer.codec}" + (f", sound {writer.audio_codec}" if writer.audio_codec else
                                                       ", no sound"))
    print(f"{count} frames in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.2f} fps) -> {args.out}")
    return 0


def _add_webcam(subparsers) -> None:
    parser = subparsers.add_parser(
        "webcam",
        help="live animation: camera in, preview window and/or virtual camera out",
        description=("Animate the --source portrait live with an OpenCV camera. A capture thread always hands the "
                     "newest camera frame to the model (latency never accumulates). --virtual-camera sends the frames "
                     "to a virtual camera that video-call apps can pick (pyvirtualcam; on Linux v4l2loopback, on "
                     "Windows/macOS OBS's virtual camera). Keys in the preview window: x re-anchors the reference to "
                     "the current pose (look straight at the camera and press x), s toggles keypoint smoothing, q or "
                     "Esc quits; the window shows FPS and latency."),
    )
    parser.add_argument("--source", required=True, metavar="IMAGE", help="the portrait to animate")
    parser.add_argument("--camera", type=_positive_int(0, 1000, "--camera"), default=0, metavar="INDEX",
                        help="OpenCV camera index (default: %(default)s)")
    _add_model_options(parser)
    parser.add_argument("--virtual-camera", action="store_true",
                        help="send the animated frames to a virtual camera (pip install pyvirtualcam)")
    parser.add_argument("--no-window", dest="window", action="store_false", default=True,
                        help="no preview window (with --virtual-camera; Ctrl+C quits)")
    parser.add_argument("--out-size", metavar="WxH", default=None,
                        help="size of the frames sent out (default: the source's with paste-back, else the model's)")
    parser.add_argument("--no-overlay", dest="overlay", action="store_false", default=True,
                        help="no FPS/latency text in the preview window")
    parser.set_defaults(handler=_run_webcam)


def _run_webcam(args: argparse.Namespace) -> int:
    from ..media import webcam

    out_size = _parse_size(args.out_size, "--out-size")
    if not args.window and not args.virtual_camera:
        raise CommandError("--no-window needs --virtual-camera (otherwise nothing would be shown)")
    full_source = _checked_source(args)
    try:
        camera = webcam.open_camera(args.camera)
    except (ValueError, OSError) as exc:
        raise CommandError(f"--camera {args.camera}: {exc}") from None
    vcam = display = None
    try:
        model, size = _load_model(args)
        window = _source_window(args, full_source)
        paste_back = window is not None and args.paste_back
        args._fps = camera.fps
        animator = _make_animator(args, model, size, full_source, reference="first", source_box=window,
                                  paste_back=paste_back)
        prepare = webcam.LiveFaceCrop(size) if args.crop else None
        if args.window:
            try:
                display = webcam.OpenCVWindow(f"{PROG} webcam (x: re-anchor, s: smoothing, q: quit)")
            except RuntimeError as exc:
                hint = "use --virtual-camera --no-window" if args.virtual_camera else \
                    "use --virtual-camera --no-window, or 'dagan-fast animate' on a recorded video"
                raise CommandError(f"{exc}; {hint}") from None
        if args.virtual_camera:
            height, width = full_source.shape[:2] if paste_back else (size, size)
            width, height = out_size or (width, height)
            try:
                vcam = webcam.open_virtual_camera(width, height, camera.fps or 30.0)
            except webcam.VirtualCameraError as exc:
                raise CommandError(f"--virtual-camera: {exc}") from None
            print(f"sending {width}x{height} frames to the virtual camera {vcam.device}", flush=True)
        from ..media.face import NoFaceError

        try:
            stats = webcam.run_live(animator, camera, prepare=prepare, virtual_camera=vcam, display=display,
                                    overlay=args.overlay, out_size=out_size)
        except NoFaceError as exc:
            raise CommandError(str(exc)) from None
    finally:
        for thing in (vcam, display, camera):
            if thing is not None:
                try:
                    (thing.release if thing is camera else thing.close)()
                except Exception:                 # noqa: BLE001 - closing is best effort
                    pass
    lat = sorted(stats["latency_ms"])
    median = lat[len(lat) // 2] if lat else 0.0
    print(f"{stats['frames']} frames animated, {stats['dropped']} camera frames skipped to stay live, median "
          f"latency {median:.0f} ms")
    return 0


def _add_convert(subparsers) -> None:
    from .convert import add_convert_parser

    add_convert_parser(subparsers)


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="animate the bundled portrait with the bundled trained model (no download)",
        description=(
            "The main job, offline: the bundled tiny DaGAN (trained on synthetic talking-head clips) animates the "
            "astronaut portrait that ships with scikit-image, driven by a synthetic talking-head clip of another "
            "face, through Animator.stream. Also reconstructs held-out synthetic clips of faces the model never "
            "saw and reports PSNR/SSIM against returning the source frame."),
        epilog="Writes to --out: animation.gif (source | driving | result, looping), frames.png and summary.txt.",
    )
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--frames", type=_positive_int(2, 1000, "--frames"), default=48, metavar="N",
                        help="driving frames (2-1000, default: %(default)s)")
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="another dagan_fast model file to use instead of the bundled one")
    parser.add_argument("--threads", type=_positive_int(1, 1024, "--threads"), default=None, metavar="T",
                        help="PyTorch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import demo
    from ..checkpoints import CheckpointError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = demo.run_demo(args.out, frames=args.frames, checkpoint=args.checkpoint,
                               progress=not args.no_progress)
    except (demo.DemoError, CheckpointError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    print(demo.summary_text(result))
    return 0


SUBCOMMANDS = (_add_demo, _add_animate, _add_webcam, _add_convert, _add_ops_demo)


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="dagan_fast: a fast runtime for DaGAN depth-aware talking-head generation.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``dagan-fast`` and ``python -m dagan_fast``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into head
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
