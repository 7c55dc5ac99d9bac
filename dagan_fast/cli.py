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

PROG = "dagan-fast"


class CommandError(Exception):
    """A problem the user can fix (bad option, unwritable path): printed as ``dagan-fast <cmd>: error: ...``."""


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
def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="animate a bundled portrait through the ops (no trained weights needed)",
        description=(
            "Animate the astronaut portrait that ships with scikit-image through the dagan_fast ops. "
            "No trained DaGAN weights are bundled yet: the keypoints are hand-placed and the head motion is "
            "synthetic, so this shows the kernels' motion transfer (sparse motion, dense motion, fused warp, "
            "cross-modal attention), not a trained model's output. Runs on the CPU in seconds; no download."),
        epilog=(
            "Writes to --out: animation.gif (the driven frames, looping), frames.png (source with keypoints | "
            "driven frames | heat channels | nose attention) and summary.txt (keypoints, backends, timings). "
            "Set DAGAN_FAST_BACKEND=reference|cpu|cuda|triton to force a backend."),
    )
    parser.add_argument("--out", default="demo_out", metavar="DIR",
                        help="output directory, created if missing (default: %(default)s)")
    parser.add_argument("--frames", type=_positive_int(1, 1000, "--frames"), default=24, metavar="N",
                        help="number of frames, one period of the motion (1-1000, default: %(default)s)")
    parser.add_argument("--size", type=_positive_int(64, 2048, "--size"), default=256, metavar="S",
                        help="frame side in pixels; the motion itself runs at 64x64 (64-2048, default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int(1, 1024, "--threads"), default=None, metavar="T",
                        help="PyTorch CPU threads (default: PyTorch's choice; 1 is often fastest for these "
                             "small ops on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import demo

    from ._backends import PRIORITY
    from .ops import BackendError

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


SUBCOMMANDS = (_add_demo,)  # later: animate, convert, webcam


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
