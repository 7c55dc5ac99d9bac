"""``dagan-fast convert``: the authors' checkpoint + depth files -> one dagan_fast safetensors file.

``add_convert_parser(subparsers)`` registers the subcommand; ``run_convert(args)`` runs it and returns
the exit code (problems the user can fix raise ``cli.CommandError``: one line, exit code 2).
"""
from __future__ import annotations

import argparse
import os


def _depth_layers(text: str):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 18, 34, 50, 101 or 152, got {text!r}") from None
    if value not in (18, 34, 50, 101, 152):
        raise argparse.ArgumentTypeError(f"expected 'auto', 18, 34, 50, 101 or 152, got {value}")
    return value


def _num_kp(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``convert`` to an argparse subparsers object; the parser's default ``handler`` is run_convert."""
    parser = subparsers.add_parser(
        "convert",
        help="convert the DaGAN authors' checkpoints to one dagan_fast .safetensors file",
        description=(
            "Read the official DaGAN files as they are (DaGAN_vox_adv_256.pth.tar or SPADE_DaGAN_vox_adv_256.pth.tar, "
            "plus the depth network's encoder.pth and depth.pth), check them strictly against dagan_fast's models, "
            "and write one safetensors file with the configuration in its metadata. Load it with "
            "dagan_fast.DaGAN.load(path)."),
        epilog="Generator kind, depth backbone and number of keypoints are read from the files unless given.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PTH_TAR",
                        help="DaGAN checkpoint (.pth.tar with 'generator' and 'kp_detector')")
    parser.add_argument("--depth-encoder", required=True, metavar="ENCODER_PTH", help="depth encoder (encoder.pth)")
    parser.add_argument("--depth-decoder", required=True, metavar="DEPTH_PTH", help="depth decoder (depth.pth)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output file (.safetensors)")
    parser.add_argument("--generator", choices=("auto", "plain", "spade"), default="auto",
                        help="generator kind; 'auto' reads it from the keys (default: %(default)s)")
    parser.add_argument("--depth-layers", type=_depth_layers, default="auto", metavar="{auto,18,50}",
                        help="ResNet depth of the depth encoder; 'auto' reads it from the keys (default: %(default)s)")
    parser.add_argument("--num-kp", type=_num_kp, default=None, metavar="K",
                        help="expected number of keypoints (default: read from the checkpoint)")
    parser.add_argument("--with-discriminator", action="store_true",
                        help="also convert the checkpoint's discriminator (only needed to continue training)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(handler=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Converts, writes ``args.out``, reloads it to check the round trip, prints a summary; returns 0."""
    from .errors import CommandError
    from ..checkpoints import CheckpointError, load, save
    from ..models.dagan import DaGAN

    out = os.fspath(args.out)
    if os.path.isdir(out):
        example = os.path.join(out, "model.safetensors")
        raise CommandError(f"--out {out} is a directory; give a file name such as {example}")
    if os.path.exists(out) and not args.force:
        raise CommandError(f"--out {out} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CommandError(f"the directory of --out does not exist: {parent}")
    try:
        model = DaGAN.from_official(args.checkpoint, args.depth_encoder, args.depth_decoder, generator=args.generator,
                                    depth_layers=args.depth_layers, num_kp=args.num_kp,
                                    load_discriminator=args.with_discriminator)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    try:
        save(model, out)
    except OSError as exc:
        raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
    reloaded = load(out)
    original, again = model.state_dict(), reloaded.state_dict()
    if original.keys() != again.keys() or any(not _torch_equal(original[k], again[k]) for k in original):
        raise CommandError(f"round-trip check failed: {out} does not reload to the same weights")
    cfg = model.config
    kind = {"plain": "DepthAwareGenerator", "spade": "SPADEDepthAwareGenerator"}[cfg["generator"]]
    size_mb = os.path.getsize(out) / 2 ** 20
    print(f"Wrote {out} ({size_mb:.1f} MiB, {len(original)} tensors): {kind}, ResNet-{cfg['depth_layers']} depth, "
          f"{cfg['num_kp']} keypoints" + (", with discriminator" if cfg["discriminator"] else "") + ".")
    print("Load it with: dagan_fast.DaGAN.load(path)")
    return 0


def _torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
