"""Reconstruction evaluation of a trained model:
``python -m training.evaluate --checkpoint runs/tiny/checkpoint.safetensors``.

The official reconstruction protocol (FOMM / DaGAN): in every held-out clip the first frame is the
source and every frame drives it with absolute keypoints (``model(source, driving)``); the result is
compared with the driving frames. Per clip: L1, PSNR, SSIM (and LPIPS when its weights are given,
``training.metrics.LPIPS``) averaged over the frames, and DaGAN++'s temporal consistency TCM over the
generated video. The same metrics are computed for the trivial baseline that returns the source frame
for every frame, so that the model's numbers can be read against "no motion at all".

Frame 0 is the source itself: by default it is left out of L1/PSNR/SSIM/LPIPS (the baseline reproduces
it exactly, PSNR = +inf, and it says nothing about motion transfer; ``--include-source-frame`` keeps it,
as the official scripts do). TCM always covers the whole generated video, frame 0 included.

Data: ``--data DIR`` (``training.data.VideoClips``, 256x256 by default) or synthetic clips
(``training.synthetic.SyntheticClips``) with a seed other than training's (``EVAL_SEED``) and, by
default, only the held-out faces (``--face-split test``; train with ``"face_split": "train"`` in the
config's ``data.synthetic`` section so that these people are unseen). The model runs at the clip size.
Outputs: a table on stdout, per-clip rows and means as CSV (``--csv``) and JSON (``--json``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from dagan_fast.checkpoints import load as load_model
from dagan_fast.models.dagan import DaGAN

from .data import VideoClips
from .metrics import LPIPS, TemporalConsistency, l1, psnr, ssim
from .synthetic import FACE_SPLITS, SyntheticClips

Tensor = torch.Tensor

EVAL_SEED = 1000           # training's default seed is 0: other trajectories
METHODS = ("model", "source_frame")
FRAME_METRICS = ("l1", "psnr", "ssim")
CHUNK_FRAMES = 128         # frames read from a clip at once: bounded memory without re-decoding each batch


def _check_arguments(model, clips, max_clips, max_frames, batch_size) -> None:
    if not isinstance(model, DaGAN):
        raise TypeError(f"model must be a dagan_fast DaGAN or DaGANpp, got {type(model).__name__}")
    if len(clips) < 1:
        raise ValueError("clips is empty: nothing to evaluate")
    for name, value, least in (("max_clips", max_clips, 1), ("max_frames", max_frames, 2)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be None or an int >= {least}, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class _ClipScores:
    """Running sums of one method's per-frame metrics and its TCM over one clip."""

    def __init__(self, names: Sequence[str]):
        self.sums = {name: 0.0 for name in names}
        self.count = 0
        self.tcm = TemporalConsistency()

    def add(self, values: Dict[str, Tensor]) -> None:
        for name, v in values.items():
            self.sums[name] += float(v.sum())
        self.count += next(iter(values.values())).numel()

    def row(self) -> Dict[str, float]:
        out = {name: total / self.count for name, total in self.sums.items()}
        out["tcm"] = self.tcm.value()
        return out


def _metric_values(result: Tensor, target: Tensor, lpips: Optional[LPIPS]) -> Dict[str, Tensor]:
    values = {"l1": l1(result, target), "psnr": psnr(result, target), "ssim": ssim(result, target)}
    if lpips is not None:
        values["lpips"] = lpips(result, target).double().cpu()
    return values


def evaluate(model: DaGAN, clips, *, max_clips: Optional[int] = None, max_frames: Optional[int] = None,
             batch_size: int = 8, lpips: Optional[LPIPS] = None, include_source_frame: bool = False,
             progress: bool = True) -> Dict[str, Any]:
    """Reconstruction metrics of ``model`` (a DaGAN / DaGANpp, on its device) and of the source-frame
    baseline on ``clips`` (a clip source of ``training.data``: frames (n,3,S,S) in [0,1]; the model
    runs at S x S).

    Per clip (the first ``max_clips``, each cut to ``max_frames`` frames): source = frame 0, every frame
    drives it (absolute keypoints, ``batch_size`` frames per pass, eval mode, inference mode). Returns
    {"rows": [{"clip", "method" ("model" | "source_frame"), "frames" (frames in the frame metrics),
    "l1", "psnr", "ssim", "tcm" (+ "lpips")}], "mean": {method: {metric: mean over clips}},
    "clips": int, "metrics": [names]}. Frame metrics skip frame 0 unless ``include_source_frame`` (see
    the module docstring); TCM covers every frame."""
    _check_arguments(model, clips, max_clips, max_frames, batch_size)
    num_clips = len(clips) if max_clips is None else min(max_clips, len(clips))
    names = [*FRAME_METRICS, *(["lpips"] if lpips is not None else [])]
    ref = next(model.parameters())
    # Restored afterwards module by module: a trainer keeps its frozen depth networks in eval mode.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_clips, desc="evaluate", unit="clip", dynamic_ncols=True)
    rows: List[Dict[str, Any]] = []
    try:
        with torch.inference_mode():
            for clip in range(num_clips):
                n = clips.num_frames(clip) if max_frames is None else min(max_frames, clips.num_frames(clip))
                if n < 2:
                    raise ValueError(f"clip {clip} has {n} frame(s); TCM needs at least 2")
                scores = {method: _ClipScores(names) for method in METHODS}
                source = clips.frames(clip, [0]).to(ref.device, ref.dtype)
                prepared = model.prepare_source(source)
                for chunk_start in range(0, n, CHUNK_FRAMES):
                    chunk = clips.frames(clip, range(chunk_start, min(n, chunk_start + CHUNK_FRAMES)))
                    for start in range(0, chunk.shape[0], batch_size):
                        target = chunk[start:start + batch_size].float()
                        driving = target.to(ref.device, ref.dtype)
                        predicted = model(prepared, driving)["prediction"].clamp(0, 1)
                        first = chunk_start + start
                        keep = slice(1 if first == 0 and not include_source_frame else 0, None)
                        for method, result in (("model", predicted), ("source_frame", source.expand_as(driving))):
                            # Frame metrics on the model's device; the optical flow of TCM needs the CPU.
                            scores[method].tcm.update(target, result.float().cpu())
                            if driving[keep].shape[0]:
                                scores[method].add(_metric_values(result[keep], driving[keep], lpips))
                for method in METHODS:
                    rows.append({"clip": clip, "method": method, "frames": scores[method].count,
                                 **scores[method].row()})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(psnr=f"{rows[-2]['psnr']:.2f}", ssim=f"{rows[-2]['ssim']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        for module, mode in modes.items():
            module.training = mode
    metrics = [*names, "tcm"]
    mean = {method: {m: sum(r[m] for r in rows if r["method"] == method) / num_clips for m in metrics}
            for method in METHODS}
    return {"rows": rows, "mean": mean, "clips": num_clips, "metrics": metrics}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def format_table(results: Dict[str, Any]) -> str:
    """The means of ``evaluate``'s result as a text table, model vs source-frame baseline."""
    metrics = results["metrics"]
    lines = [f"{'':<14}" + "".join(f"{m.upper():>10}" for m in metrics)]
    for method, label in (("model", "model"), ("source frame", "source frame")):
        lines.append(f"{label:<14}" + "".join(f"{results['mean'][method.replace(' ', '_')][m]:>10.4f}"
                                              for m in metrics))
    frames = sorted({r["frames"] for r in results["rows"]})
    span = str(frames[0]) if len(frames) == 1 else f"{frames[0]}..{frames[-1]}"
    lower = [m.upper() for m in metrics if m in ("l1", "lpips")]
    lines.append(f"{results['clips']} clips, {span} frames each in the frame metrics; means over clips; "
                 f"lower is better for {' and '.join(lower)}, higher for the others")
    return "\n".join(lines)


def write_csv(results: Dict[str, Any], path: str) -> None:
    """Per-clip rows of ``evaluate`` then one "mean" row per method, as CSV."""
    fields = ["clip", "method", "frames", *results["metrics"]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        for method in METHODS:
            writer.writerow({"clip": "mean", "method": method, "frames": "",
                             **{m: f"{v:.6g}" for m, v in results["mean"][method].items()}})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="dagan_fast model file (DaGAN or DaGAN++ safetensors)")
    p.add_argument("--data", default=None, help="folder of held-out face videos (sub-folders of frames or video "
                                                "files); default: synthetic clips")
    p.add_argument("--synthetic-clips", type=int, default=20, help="number of synthetic clips (default 20)")
    p.add_argument("--synthetic-frames", type=int, default=32, help="frames per synthetic clip (default 32)")
    p.add_argument("--synthetic-seed", type=int, default=EVAL_SEED,
                   help=f"trajectory seed of the synthetic clips (default {EVAL_SEED}; training's default is 0)")
    p.add_argument("--face-split", choices=FACE_SPLITS, default="test",
                   help="which bundled faces the synthetic clips animate (default: the held-out 'test' faces)")
    p.add_argument("--size", type=int, default=None, help="frame size (default 64 synthetic, 256 with --data)")
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of each clip")
    p.add_argument("--batch-size", type=int, default=8, help="driving frames per model pass")
    p.add_argument("--include-source-frame", action="store_true",
                   help="count frame 0 (the source) in L1/PSNR/SSIM/LPIPS, as the official scripts do")
    p.add_argument("--lpips-backbone", default=None, help="torchvision alexnet/vgg16 state_dict file for LPIPS")
    p.add_argument("--lpips-linear", default=None, help="the lpips package's weights/v0.1/alex.pth or vgg.pth")
    p.add_argument("--csv", default=None, help="write per-clip rows and means here")
    p.add_argument("--json", default=None, help="write the full result here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if (args.lpips_backbone is None) != (args.lpips_linear is None):
        p.error("LPIPS needs both --lpips-backbone and --lpips-linear")
    if args.synthetic_clips < 1 or args.synthetic_frames < 3:
        p.error("--synthetic-clips must be >= 1 and --synthetic-frames >= 3")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m training.evaluate``."""
    args = parse_args(argv)
    model = load_model(args.checkpoint, map_location=args.device)
    if not isinstance(model, DaGAN):
        raise SystemExit(f"{args.checkpoint} holds a {type(model).__name__}, not a talking-head model "
                         "(DaGAN or DaGAN++)")
    if args.data is not None:
        clips = VideoClips(args.data, size=args.size or 256)
    else:
        clips = SyntheticClips(num_clips=args.synthetic_clips, num_frames=args.synthetic_frames, size=args.size or 64,
                               seed=args.synthetic_seed, face_split=args.face_split)
    lpips = None
    if args.lpips_backbone is not None:
        lpips = LPIPS(args.lpips_backbone, args.lpips_linear).to(args.device)
    results = evaluate(model, clips, max_clips=args.max_clips, max_frames=args.max_frames,
                       batch_size=args.batch_size, lpips=lpips, include_source_frame=args.include_source_frame,
                       progress=not args.no_progress)
    results["checkpoint"] = args.checkpoint
    results["data"] = args.data or {"synthetic_clips": args.synthetic_clips, "frames": args.synthetic_frames,
                                     "seed": args.synthetic_seed, "face_split": args.face_split,
                                     "size": args.size or 64}
    print(format_table(results))
    if args.csv:
        write_csv(results, args.csv)
    if args.json:
        with open(args.json, "w") as f:
            # +inf PSNR (identical frames) is written as null: strict JSON has no infinity.
            json.dump(_finite_or_none(results), f, indent=2)
    return 0


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
