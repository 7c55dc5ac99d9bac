"""Per-stage CPU profile of ``Animator``: where a frame's time goes, and how far each stage is from the conv floor.

    python benchmarks/profile_stages.py [--size 256] [--batch 4] [--threads 1] [--repeats 3] [--malloc-keep]
                                        [--dtype fp32|bf16|auto] [--no-prepack] [--no-fast-conv]

Model: DaGAN with the official configuration and the calibrated random weights of ``tests/official_dagan.py``
(the weights of ``benchmarks/latency.py``); timing does not depend on the values, only the shapes.

For the streaming path (one frame per call) and the batched path (``--batch`` frames per call) it times, per
frame, the stages depth network (encoder + decoder), keypoint detector, dense motion, warp + rest of the
generator front, attention (projections + the attention kernel), bottleneck res-blocks, decoder up-blocks and
the final 7x7 conv, with forward hooks (best of ``--repeats`` runs of the same frames, CPU time of this process
by default: ``time.process_time``, robust against other jobs on the machine; wall time as well). FLOPs of each
stage come from ``torch.utils.flop_counter`` (convolutions, matmuls) plus the attention kernel's
2 N^2 (Dqk + Dv) per image, which the counter cannot see inside the custom op. The "peak" is one large
conv2d in the profiled dtype (the bottleneck's 256->256 3x3 at 64x64, channels-last, batch 1): what this CPU
sustains per thread in that dtype (bf16: oneDNN's AMX/AVX512-BF16 kernels); each stage's "%pk" column is its
GFLOP/s as a share of it (Winograd convolutions are counted as the direct ones they replace, so their rate can
pass the peak). ``--no-fast-conv``: no Winograd. ``--dtype`` (default fp32): the Animator's precision;
``--no-prepack``: plain F.conv2d instead of the pre-packed oneDNN convolutions.

``--malloc-keep``: tell glibc to keep freed memory in the heap (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so
large tensors reuse pages instead of faulting fresh ones in (expensive on some VMs); reported as its own lever.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

# (stage, module path inside the model); a module belongs to the first stage that names it or a parent of it
STAGES: List[Tuple[str, Tuple[str, ...]]] = [
    ("depth (driving)", ("depth_encoder", "depth_decoder")),
    ("keypoints (driving)", ("kp_detector",)),
    ("dense motion", ("generator.dense_motion_network",)),
    ("attention", ("generator.AttnModule",)),
    ("bottleneck res-blocks", ("generator.bottleneck",)),
    ("decoder up-blocks", ("generator.up_blocks",)),
    ("final 7x7 conv", ("generator.final", "generator.decoder")),
]
GENERATOR = "generator"


from _common import cpu_capability, malloc_keep  # noqa: E402


class StageClock:
    """Accumulates CPU and wall seconds per stage with forward pre/post hooks on the stage modules."""

    def __init__(self, model: torch.nn.Module):
        self.cpu: Dict[str, float] = defaultdict(float)
        self.wall: Dict[str, float] = defaultdict(float)
        self.handles = []
        modules = dict(model.named_modules())
        targets = [(stage, path) for stage, paths in STAGES for path in paths] + [("generator (total)", GENERATOR)]
        for stage, path in targets:
            for module in _called_modules(modules, path):
                self._hook(module, stage)

    def _hook(self, module, stage: str) -> None:
        start: List[Tuple[float, float]] = []

        def before(mod, inputs):
            start.append((time.process_time(), time.perf_counter()))

        def after(mod, inputs, output):
            c0, w0 = start.pop()
            self.cpu[stage] += time.process_time() - c0
            self.wall[stage] += time.perf_counter() - w0

        self.handles.append(module.register_forward_pre_hook(before))
        self.handles.append(module.register_forward_hook(after))

    def reset(self) -> None:
        self.cpu.clear()
        self.wall.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _called_modules(modules: Dict[str, torch.nn.Module], path: str) -> List[torch.nn.Module]:
    """The module at ``path``, or its children when it is a container that is never called itself."""
    module = modules.get(path)
    if module is None:
        return []
    if isinstance(module, torch.nn.ModuleList):
        return list(module)
    return [module]


def _counter_names(model: torch.nn.Module, path: str) -> List[str]:
    """FlopCounterMode's names for ``path``: the outermost module called is named by its class (the Animator
    calls the depth network, keypoint detector and generator separately), a ModuleList by its children."""
    head, _, rest = path.partition(".")
    prefix = type(getattr(model, head)).__name__ + ("." + rest if rest else "")
    module = dict(model.named_modules())[path]
    if isinstance(module, torch.nn.ModuleList):
        return [f"{prefix}.{i}" for i in range(len(module))]
    return [prefix]


def stage_flops(animator, frames: List, batch: int) -> Dict[str, float]:
    """FLOPs per frame of each stage (conv/matmul counter + the attention kernel, analytically)."""
    from torch.utils.flop_counter import FlopCounterMode

    animator.reset()
    with FlopCounterMode(display=False, depth=None) as counter:
        list(animator.animate_video(frames[:batch], batch_size=batch))
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    out: Dict[str, float] = {}
    modules = dict(animator.model.named_modules())
    for stage, paths in STAGES:
        names = [name for path in paths if path in modules for name in _counter_names(animator.model, path)]
        out[stage] = sum(per_module.get(name, 0.0) for name in names) / batch
    feat = animator.prepared.features["features"]
    n = feat.shape[2] * feat.shape[3]
    dqk = animator.prepared.features["query"].shape[-1]
    out["attention"] += 2.0 * n * n * (dqk + feat.shape[1])
    generator = _counter_names(animator.model, GENERATOR)[0]
    out["generator (total)"] = per_module.get(generator, 0.0) / batch + 2.0 * n * n * (dqk + feat.shape[1])
    return out


def peak_conv(repeats: int, dtype: torch.dtype = torch.float32) -> Tuple[float, float]:
    """(CPU ms, GFLOP/s per thread) of one 256->256 3x3 conv at 64x64 in ``dtype``, channels-last, best of
    ``repeats`` (process CPU time, summed over threads)."""
    x = torch.randn(1, 256, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(256).to(dtype)
    with torch.inference_mode():
        F.conv2d(x, w, b, padding=1)
        best = min(_timed(lambda: F.conv2d(x, w, b, padding=1))[0] for _ in range(max(repeats, 5)))
    return best * 1e3, 2 * 256 * 256 * 9 * 64 * 64 / best / 1e9


def _timed(fn: Callable) -> Tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def profile_mode(animator, frames: List, batch: int, repeats: int, clock: StageClock):
    """Best-of-``repeats`` per-stage (cpu, wall) seconds per frame, and the end-to-end per-frame seconds."""
    best_stage: Dict[str, Tuple[float, float]] = {}
    best_total = (float("inf"), float("inf"))
    for _ in range(repeats):
        animator.reset()
        list(animator.animate_video(frames[:1], batch_size=1))       # the reference frame, not timed
        clock.reset()
        cpu, wall = _timed(lambda: list(animator.animate_video(frames[1:], batch_size=batch)))
        n = len(frames) - 1
        if cpu / n < best_total[0]:
            best_total = (cpu / n, wall / n)
        for stage in clock.cpu:
            value = (clock.cpu[stage] / n, clock.wall[stage] / n)
            if stage not in best_stage or value[0] < best_stage[stage][0]:
                best_stage[stage] = value
    return best_stage, best_total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--malloc-keep", action="store_true", help="glibc keeps freed memory (see the docstring)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="fp32", help="the Animator's precision")
    parser.add_argument("--no-prepack", action="store_true", help="F.conv2d instead of pre-packed convolutions")
    parser.add_argument("--no-fast-conv", action="store_true",
                        help="float32: direct convolutions only (Animator(fast_conv=False)), no Winograd")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--batch, --repeats and --threads must be >= 1")
    if args.malloc_keep and not malloc_keep():
        print("--malloc-keep: mallopt is not available here (not glibc); ignored", file=sys.stderr)
    torch.set_num_threads(args.threads)

    import official_dagan as official
    from latency import driving_clip

    from dagan_fast import Animator, DaGAN

    tmp = tempfile.mkdtemp(prefix="dagan_profile_")
    models = official.build_official_models("plain", 18, seed=0, calib_size=128)
    paths, _ = official.save_official_layout(tmp, "plain", 18, seed=0, models=models)
    model = DaGAN.from_official(str(paths["checkpoint"]), str(paths["depth_encoder"]), str(paths["depth_decoder"]))
    source, clip = driving_clip(official, 1 + args.batch, args.size)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}[args.dtype]
    animator = Animator(model, source, dtype=dtype, prepack=False if args.no_prepack else None,
                        fast_conv=False if args.no_fast_conv else None)
    print(animator.describe(), flush=True)
    list(animator.animate_video(clip, batch_size=args.batch))          # warm-up (oneDNN primitives)

    # FlopCounterMode cannot see oneDNN's packed-weight op, and the Winograd convolutions time both paths on
    # their first call: count on a direct, unpacked twin (same shapes, same FLOPs)
    counting = (Animator(model, source, dtype=animator.dtype, prepack=False, fast_conv=False)
                if animator.prepack or animator.fast_conv else animator)
    flops = stage_flops(counting, clip, args.batch)
    del counting
    clock = StageClock(animator.model)
    results = {}
    for name, batch in (("stream", 1), (f"batch {args.batch}", args.batch)):
        results[name] = profile_mode(animator, clip, batch, args.repeats, clock)
    clock.remove()
    peak_ms, peak_gflops = peak_conv(args.repeats, animator.dtype)

    names = list(results)
    dname = str(animator.dtype).replace("torch.", "")
    print(f"DaGAN {args.size}x{args.size} {dname}, {args.threads} thread(s), capability {cpu_capability()}, CPU ms "
          f"per frame (wall in brackets), best of {args.repeats}; malloc-keep={args.malloc_keep}, "
          f"prepack={animator.prepack}; %pk = GFLOP/s per thread against the {dname} peak conv "
          f"({peak_gflops:.0f} GFLOP/s per thread)")
    header = f"{'stage':<24} {'GFLOP':>7}" + "".join(f" {n + ' ms':>20} {'GFLOP/s':>8} {'%pk':>4}" for n in names)
    print(header)
    rows = [stage for stage, _ in STAGES] + ["generator (total)"]
    for stage in rows:
        line = f"{stage:<24} {flops.get(stage, 0.0) / 1e9:7.2f}"
        for n in names:
            cpu, wall = results[n][0].get(stage, (0.0, 0.0))
            rate = flops.get(stage, 0.0) / cpu / 1e9 if cpu > 0 else float("nan")
            share = 100 * rate / peak_gflops
            line += f" {cpu * 1e3:9.1f} [{wall * 1e3:8.1f}] {rate:8.1f} {share:4.0f}"
        print(line)
    for n in names:
        stages = results[n][0]
        gen_cpu = stages.get("generator (total)", (0.0, 0.0))[0]
        named = sum(stages.get(s, (0.0, 0.0))[0] for s in ("dense motion", "attention", "bottleneck res-blocks",
                                                            "decoder up-blocks", "final 7x7 conv"))
        analysed = sum(stages.get(s, (0.0, 0.0))[0] for s in ("depth (driving)", "keypoints (driving)"))
        cpu, wall = results[n][1]
        print(f"{n}: end-to-end {cpu * 1e3:.1f} ms CPU [{wall * 1e3:.1f} wall] per frame; warp + glue inside the "
              f"generator {1e3 * (gen_cpu - named):.1f} ms; outside the networks (convert, motion, output) "
              f"{1e3 * (cpu - gen_cpu - analysed):.1f} ms")
    total = flops["generator (total)"] + flops["depth (driving)"] + flops["keypoints (driving)"]
    print(f"peak: one {dname} 256->256 3x3 conv at 64x64: {peak_ms:.1f} ms = {peak_gflops:.1f} GFLOP/s per thread; "
          f"the per-frame work ({total / 1e9:.1f} GFLOP) at that rate: {total / peak_gflops / 1e6:.0f} ms "
          f"per thread-frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
