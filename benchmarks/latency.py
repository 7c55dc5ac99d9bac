"""End-to-end latency: ``dagan_fast.Animator`` against the official-style PyTorch path, same weights, same inputs.

    python benchmarks/latency.py [--model dagan|dagan-spade|daganpp] [--device cpu|cuda]
                                 [--dtype fp32|fp16|bf16|auto] [--size 256] [--frames N] [--batch B] [--warmup W]
                                 [--threads T] [--no-prepack] [--malloc-keep] [--cpu-time] [--paste-back]

Weights: random, non-trivial, calibrated official-layout weights (``tests/official_dagan.py``), written in the
released file layout and loaded by ``DaGAN.from_official``: both paths run the very same numbers.

* official-style path (``tests/official_dagan.py``, a transcription of the authors' code): per frame what the
  authors' ``demo.py`` ``make_animation`` loop does: depth network and keypoints of the driving frame,
  ``normalize_kp``, and the full generator forward, which re-encodes the source image and source depth every
  frame and materialises the (1, N, N) attention (bmm + softmax), fp32 eager. Source depth/keypoints and the
  initial frame's keypoints are computed once before the loop, as in ``demo.py`` (``--official-recompute-source``
  recomputes them every frame too, a slower baseline).
* fast path: ``Animator.stream`` (``optimize_for_inference()`` folding, cached source work, fused ops).
* batched: ``Animator.animate_video(batch_size=B)`` throughput.

``--model daganpp`` (DaGAN++, no official code exists): seeded random weights of the default configuration; the
baseline is the plain-PyTorch path of the same model: ``DAGAN_FAST_BACKEND=reference`` for every op, the
attention of each layer materialised (matmul + softmax + matmul) where its (B, N, Nk) map fits in
``--materialize-limit-gb`` (else the reference's blocked attention), and per frame ``DaGANpp.animate`` on the
raw source (source depth, keypoints and features recomputed). The fast path is ``Animator.stream`` as for DaGAN.
Also reported: the share of the fast path's frame time spent in the attention layers (timed by hooks in extra
frames, synchronising on a GPU). Rows go to ``benchmarks/results/latency-daganpp.csv``.

``--paste-back`` adds a row: the per-frame cost of pasting the streamed output back into a 1920x1080 source
(``dagan_fast.media.paste_back.PasteBack``, a 648x648 face window: resize + feathered blend of the window and a
copy of the frame; the mask is computed once), and its share of the ``Animator.stream`` frame time.

``--dtype``: the fast path's precision (``auto`` = ``Animator``'s default: bf16 on a CPU with AMX/AVX512-BF16);
the CSV row records the dtype the Animator ran (``dtype``, with ``dtype_requested``) and the CPU capability
(``cpu_capability``: PyTorch's kernel level + native bf16 flags; emulate an AVX2-only CPU with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: the first is what ATen's kernels and ``dtype="auto"`` see,
the second keeps oneDNN's convolutions off AVX-512/AMX). ``--no-prepack``: plain ``F.conv2d`` instead of the pre-packed oneDNN convolutions;
``--malloc-keep``: glibc keeps freed memory (mallopt), see ``_common.malloc_keep`` (the Animator sets it
already, so this mostly matters for the official-style path); ``--cpu-time``: on a shared CPU, time by process
CPU time / threads (column ``clock``).

Per-frame times (p50, p95, max, FPS) after warm-up; CUDA events on a GPU. Prints a table, then the speed-up
ratio as the last line, and appends a row to ``benchmarks/results/latency.csv`` with provenance.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _common import append_csv, cpu_capability, device_name, malloc_keep, versions  # noqa: E402


SHORT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


#: ``--cpu-time``: on the CPU, time by this process's CPU time divided by the thread count instead of wall time
#: (a shared machine's other jobs then add little; OpenMP spin-waits still count).
CLOCK = {"fn": time.perf_counter}


def now() -> float:
    return CLOCK["fn"]()


def _cpu_seconds() -> float:
    return time.process_time() / max(torch.get_num_threads(), 1)


class Timer:
    """Per-call wall time (ms), with CUDA events on a GPU (``--cpu-time``: CPU time per thread on the CPU)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            stop.record()
            stop.synchronize()
            return out, start.elapsed_time(stop)
        t0 = now()
        out = fn()
        return out, (now() - t0) * 1e3


def driving_clip(official, n, size):
    """n (1,3,S,S) float frames: the astronaut face with a smooth synthetic head motion (shift + zoom)."""
    import torch.nn.functional as F

    face = official.astronaut_face(size)
    frames = []
    for i in range(n):
        t = 2 * np.pi * i / max(n, 1)
        theta = torch.tensor([[[1.0 + 0.05 * np.cos(t), 0.05 * np.sin(t), 0.06 * np.sin(2 * t)],
                               [-0.05 * np.sin(t), 1.0 + 0.05 * np.cos(t), 0.04 * np.cos(t)]]], dtype=torch.float32)
        grid = F.affine_grid(theta, face.shape, align_corners=False)
        frames.append(F.grid_sample(face, grid, padding_mode="border", align_corners=False).clamp(0, 1))
    return face, frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("dagan", "dagan-spade", "daganpp"), default="dagan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "auto"), default="fp32",
                        help="fast path precision (the official path is always fp32); auto: the Animator's pick")
    parser.add_argument("--no-prepack", action="store_true",
                        help="fast path: F.conv2d instead of pre-packed oneDNN convolutions (Animator(prepack=False))")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU device: time by process CPU time / threads instead of wall time (shared machines)")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="glibc keeps freed memory in the heap (mallopt), no fresh-page faults per tensor")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=None, help="timed frames per path (default: 8 CPU, 100 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed frames first (default: 2 CPU, 10 GPU)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the offline mode (0: skip it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-recompute-source", action="store_true",
                        help="official path: recompute the source (and initial frame) depth and keypoints per frame")
    parser.add_argument("--compile", action="store_true", help="fast path: torch.compile")
    parser.add_argument("--no-fast-conv", action="store_true",
                        help="fast path, CPU float32: direct convolutions only (Animator(fast_conv=False)), "
                             "no Winograd")
    parser.add_argument("--materialize-limit-gb", type=float, default=4.0,
                        help="daganpp baseline: materialise a layer's attention map when it takes at most this")
    parser.add_argument("--paste-back", action="store_true",
                        help="also time pasting each output back into a 1920x1080 source (648 px window)")
    parser.add_argument("--csv", default=None, help="default: results/latency.csv (latency-daganpp.csv for daganpp)")
    args = parser.parse_args(argv)
    if args.csv is None:
        args.csv = os.path.join(HERE, "results", "latency-daganpp.csv" if args.model == "daganpp" else "latency.csv")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    frames_n = args.frames or (100 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "auto": "auto"}[args.dtype]
    if args.cpu_time and not gpu:
        CLOCK["fn"] = _cpu_seconds
    if args.malloc_keep and not malloc_keep():
        print("--malloc-keep: mallopt is not available here (not glibc); ignored", file=sys.stderr)

    try:
        import official_dagan as official
    except ImportError:
        print("benchmarks/latency.py needs tests/official_dagan.py (the official-style transcription)", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    from dagan_fast import Animator, DaGAN

    if args.model == "daganpp":
        return run_daganpp(args, official, device, dtype, frames_n, warmup)
    kind = "plain" if args.model == "dagan" else "spade"
    print(f"building calibrated random {args.model} weights (seed {args.seed}) ...", flush=True)
    tmp = tempfile.mkdtemp(prefix="dagan_latency_")
    models = official.build_official_models(kind, 18, seed=args.seed, calib_size=128)
    paths, models = official.save_official_layout(tmp, kind, 18, seed=args.seed, models=models)
    model = DaGAN.from_official(str(paths["checkpoint"]), str(paths["depth_encoder"]), str(paths["depth_decoder"]))
    for m in models.values():
        m.to(device).eval()

    source, clip = driving_clip(official, warmup + frames_n, args.size)
    timer = Timer(device)

    # ---------------- official-style path
    src = source.to(device)
    dev_clip = [f.to(device) for f in clip]
    gen = models["generator"]

    def official_step(driving, state):
        if args.official_recompute_source or state is None:
            d_src = official.official_depth(models, src)
            kp_src = official._kp_only(official.official_kp(models, src, d_src))
            init = dev_clip[0]
            kp_init = official._kp_only(official.official_kp(models, init, official.official_depth(models, init)))
            state = (d_src, kp_src, kp_init)
        d_src, kp_src, kp_init = state
        d_drv = official.official_depth(models, driving)
        kp_drv = official._kp_only(official.official_kp(models, driving, d_drv))
        kp_norm = official.normalize_kp(kp_src, kp_drv, kp_init, use_relative_movement=True,
                                        use_relative_jacobian=True)
        out = gen(src, kp_driving=official._kp_only(kp_norm), kp_source=kp_src, source_depth=d_src,
                  driving_depth=d_drv)
        return out["prediction"], state

    official_ms = []
    with torch.no_grad():
        state = None
        if not args.official_recompute_source:       # demo.py: source + initial frame analysed before the loop
            _, state = official_step(dev_clip[0], None)
        for i, frame in enumerate(tqdm(dev_clip, desc="official-style", unit="frame")):
            (pred, state), ms = timer(lambda: official_step(frame, state))
            _ = pred.cpu() if gpu else pred
            if i >= warmup:
                official_ms.append(ms)

    # ---------------- fast path: stream
    animator = Animator(model, source, device=device, dtype=dtype, compile=args.compile,
                        fast_conv=False if args.no_fast_conv else None, prepack=False if args.no_prepack else None)
    print(animator.describe(), flush=True)
    stream_ms = []
    it = animator.stream(iter(clip))
    outs_fast = []
    for i in tqdm(range(len(clip)), desc="Animator.stream", unit="frame"):
        out, ms = timer(lambda: next(it))
        outs_fast.append(out)
        if i >= warmup:
            stream_ms.append(ms)

    # ---------------- paste-back into a 1080p source (host work per frame, after the model)
    paste_ms = []
    if args.paste_back:
        from dagan_fast.media.face import CropWindow
        from dagan_fast.media.paste_back import PasteBack
        from dagan_fast.media.video import to_uint8

        rng = np.random.default_rng(args.seed)
        full = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        paster = PasteBack(full, CropWindow(636, 180, 1284, 828, (1920, 1080)))
        results = [to_uint8(o) for o in outs_fast]
        for i, result in enumerate(results):
            t0 = time.perf_counter()
            paster(result)
            if i >= warmup:
                paste_ms.append(1000.0 * (time.perf_counter() - t0))

    # agreement (sanity; fp32: ~1e-5)
    with torch.no_grad():
        ref_pred, _ = official_step(dev_clip[-1], None)
    agree = float((outs_fast[-1].float().cpu() - ref_pred[0].float().cpu()).abs().max())

    # ---------------- batched offline
    batch_fps = None
    if args.batch:
        animator.reset()
        pre = clip[:max(args.batch, warmup)]
        list(animator.animate_video(pre, batch_size=args.batch))          # warm-up
        animator.reset()
        timed = clip[warmup:warmup + frames_n]
        if gpu:
            torch.cuda.synchronize()
        t0 = now()
        n = sum(1 for _ in animator.animate_video(timed, batch_size=args.batch, progress=False))
        if gpu:
            torch.cuda.synchronize()
        batch_fps = n / (now() - t0)

    def row(name, ms):
        return (f"{name:<28} {statistics.median(ms):10.1f} {percentile(ms, 95):10.1f} {max(ms):10.1f} "
                f"{1000.0 / statistics.median(ms):8.2f}")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    ran = SHORT_DTYPES[animator.dtype]
    print(f"{args.model} {args.size}x{args.size}, {device_name(device)}, capability {cpu_capability()}, fast path "
          f"{ran} (--dtype {args.dtype}), {frames_n} timed frames after {warmup} warm-up, load average {load:.2f}")
    print(f"{'path':<28} {'p50 ms':>10} {'p95 ms':>10} {'max ms':>10} {'FPS':>8}")
    print(row("official-style (fp32 eager)", official_ms))
    print(row(f"Animator.stream ({ran}{', no fast_conv' if args.no_fast_conv else ''})", stream_ms))
    official_fps = 1000.0 / statistics.median(official_ms)
    ratio = statistics.median(official_ms) / statistics.median(stream_ms)
    if batch_fps is not None:
        print(f"{'animate_video batch ' + str(args.batch):<28} {'':>10} {'':>10} {'':>10} {batch_fps:8.2f}"
              f"   ({batch_fps / official_fps:.2f}x the official-style throughput)")
    if paste_ms:
        share = statistics.median(paste_ms) / statistics.median(stream_ms)
        print(f"{'paste-back 1920x1080':<28} {statistics.median(paste_ms):10.1f} {percentile(paste_ms, 95):10.1f} "
              f"{max(paste_ms):10.1f} {'':>8}   (+{100 * share:.1f}% of the Animator.stream p50)")
    print(f"max |fast - official| on the last frame: {agree:.2e}")
    info = versions()
    append_csv(args.csv, [{
        "date": info["date"], "commit": info["commit"], "device": device_name(device), "torch": info["torch"],
        "triton": info["triton"], "model": args.model, "size": args.size, "dtype": ran,
        "dtype_requested": args.dtype, "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
        "prepack": animator.prepack, "malloc_keep": args.malloc_keep, "frames": frames_n, "warmup": warmup,
        "load_avg": f"{load:.2f}", "clock": "cpu" if CLOCK["fn"] is _cpu_seconds else "wall",
        "official_recompute_source": args.official_recompute_source,
        "official_p50_ms": f"{statistics.median(official_ms):.2f}", "official_p95_ms": f"{percentile(official_ms, 95):.2f}",
        "stream_p50_ms": f"{statistics.median(stream_ms):.2f}", "stream_p95_ms": f"{percentile(stream_ms, 95):.2f}",
        "stream_max_ms": f"{max(stream_ms):.2f}", "stream_fps": f"{1000.0 / statistics.median(stream_ms):.3f}",
        "batch": args.batch, "batch_fps": f"{batch_fps:.3f}" if batch_fps else "",
        "batch_ratio": f"{batch_fps / official_fps:.3f}" if batch_fps else "",
        "speedup_p50": f"{ratio:.3f}", "max_abs_diff": f"{agree:.2e}", "fast_conv": animator.fast_conv,
        **({"paste_back_1080p_p50_ms": f"{statistics.median(paste_ms):.2f}",
            "paste_back_share": f"{statistics.median(paste_ms) / statistics.median(stream_ms):.4f}"}
           if paste_ms else {}),
    }])
    print(f"speed-up (official-style p50 / Animator.stream p50): {ratio:.2f}x")
    return 0


class AttentionTimer:
    """Wall time spent inside every ``GeometryAttention`` of a model (forward hooks; synchronises on a GPU)."""

    def __init__(self, model, device):
        from dagan_fast.models import GeometryAttention

        self.device, self.total_ms, self._start = device, 0.0, None
        self.enabled = False
        self.handles = []
        for module in model.modules():
            if isinstance(module, GeometryAttention):
                self.handles.append(module.register_forward_pre_hook(self._begin))
                self.handles.append(module.register_forward_hook(self._end))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _begin(self, module, inputs):
        if self.enabled:
            self._sync()
            self._start = now()

    def _end(self, module, inputs, output):
        if self.enabled:
            self._sync()
            self.total_ms += (now() - self._start) * 1e3

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_daganpp(args, official, device, dtype, frames_n, warmup) -> int:
    """``--model daganpp``: plain-PyTorch path of the same model against ``Animator.stream`` (see the docstring)."""
    import copy

    from tqdm.auto import tqdm

    from dagan_fast import Animator, DaGANpp

    torch.manual_seed(args.seed)
    model = DaGANpp().eval()
    with torch.no_grad():
        model.generator.final.weight.mul_(4.0)          # default init gives a nearly flat grey output
        model.kp_detector.jacobian.weight.normal_(0.0, 0.01)
    source, clip = driving_clip(official, warmup + frames_n, args.size)
    timer = Timer(device)

    # ---------------- plain-PyTorch path: reference ops, materialised attention where it fits
    plain = copy.deepcopy(model).to(device)
    limit = args.materialize_limit_gb * 2 ** 30
    materialised = []
    for i, layer in enumerate(plain.generator.attention):
        n = (args.size // 2 ** i) ** 2
        layer.materialize = n * n * 4 * 2 <= limit        # scores and probabilities, float32
        materialised.append(layer.materialize)
    src, dev_clip = source.to(device), [f.to(device) for f in clip]
    saved_backend = os.environ.get("DAGAN_FAST_BACKEND")
    os.environ["DAGAN_FAST_BACKEND"] = "reference"
    plain_ms, plain_last = [], None
    try:
        with torch.no_grad():
            kp_initial = plain.keypoints(dev_clip[0])
            for i, frame in enumerate(tqdm(dev_clip, desc="plain PyTorch", unit="frame")):
                out, ms = timer(lambda: plain.animate(src, frame, kp_initial)["prediction"])
                plain_last = out
                if i >= warmup:
                    plain_ms.append(ms)
    finally:
        if saved_backend is None:
            os.environ.pop("DAGAN_FAST_BACKEND", None)
        else:
            os.environ["DAGAN_FAST_BACKEND"] = saved_backend
    plain = None                                         # frees its memory before the fast path

    # ---------------- fast path
    animator = Animator(model, source, device=device, dtype=dtype, compile=args.compile,
                        fast_conv=False if args.no_fast_conv else None, prepack=False if args.no_prepack else None)
    print(animator.describe(), flush=True)
    stream_ms, outs_fast = [], []
    it = animator.stream(iter(clip))
    for i in tqdm(range(len(clip)), desc="Animator.stream", unit="frame"):
        out, ms = timer(lambda: next(it))
        outs_fast.append(out)
        if i >= warmup:
            stream_ms.append(ms)
    agree = float((outs_fast[-1].float().cpu() - plain_last[0].float().cpu()).abs().max())

    # ---------------- share of the fast path's frame time in attention (instrumented extra frames)
    hooks = AttentionTimer(animator.model, device)
    animator.reset()
    share_frames = clip[:max(2, min(len(clip), 1 + frames_n // 2))]
    it = animator.stream(iter(share_frames))
    next(it)                                                # reference frame, untimed
    hooks.enabled = True
    t0 = now()
    for _ in it:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    share = hooks.total_ms / ((now() - t0) * 1e3)
    hooks.remove()

    batch_fps = None
    if args.batch:
        animator.reset()
        list(animator.animate_video(clip[:max(args.batch, warmup)], batch_size=args.batch))
        animator.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = now()
        n = sum(1 for _ in animator.animate_video(clip[warmup:warmup + frames_n], batch_size=args.batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        batch_fps = n / (now() - t0)

    p50_plain, p50_fast = statistics.median(plain_ms), statistics.median(stream_ms)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    ran = SHORT_DTYPES[animator.dtype]
    print(f"daganpp {args.size}x{args.size}, {device_name(device)}, capability {cpu_capability()}, fast path {ran} "
          f"(--dtype {args.dtype}), {frames_n} timed frames "
          f"after {warmup} warm-up, load average {load:.2f}; baseline attention materialised per layer "
          f"(finest first): {materialised}")
    print(f"{'path':<28} {'p50 ms':>10} {'p95 ms':>10} {'max ms':>10} {'FPS':>8}")
    for name, ms in (("plain PyTorch (fp32)", plain_ms), (f"Animator.stream ({ran})", stream_ms)):
        print(f"{name:<28} {statistics.median(ms):10.1f} {percentile(ms, 95):10.1f} {max(ms):10.1f} "
              f"{1000.0 / statistics.median(ms):8.2f}")
    if batch_fps is not None:
        print(f"{'animate_video batch ' + str(args.batch):<28} {'':>10} {'':>10} {'':>10} {batch_fps:8.2f}")
    print(f"attention share of the Animator.stream frame time: {100 * share:.1f}%")
    print(f"max |fast - plain| on the last frame: {agree:.2e}")
    info = versions()
    append_csv(args.csv, [{
        "date": info["date"], "commit": info["commit"], "device": device_name(device), "torch": info["torch"],
        "triton": info["triton"], "model": "daganpp", "size": args.size, "dtype": ran, "dtype_requested": args.dtype,
        "cpu_capability": cpu_capability(), "threads": torch.get_num_threads(), "prepack": animator.prepack,
        "malloc_keep": args.malloc_keep, "clock": "cpu" if CLOCK["fn"] is _cpu_seconds else "wall",
        "frames": frames_n,
        "warmup": warmup, "load_avg": f"{load:.2f}",
        "materialised_layers": "".join("1" if m else "0" for m in materialised),
        "plain_p50_ms": f"{p50_plain:.2f}", "plain_p95_ms": f"{percentile(plain_ms, 95):.2f}",
        "stream_p50_ms": f"{p50_fast:.2f}", "stream_p95_ms": f"{percentile(stream_ms, 95):.2f}",
        "stream_fps": f"{1000.0 / p50_fast:.3f}", "attention_share": f"{share:.3f}",
        "batch": args.batch, "batch_fps": f"{batch_fps:.3f}" if batch_fps else "",
        "speedup_p50": f"{p50_plain / p50_fast:.3f}", "max_abs_diff": f"{agree:.2e}", "fast_conv": animator.fast_conv,
    }])
    print(f"speed-up (plain PyTorch p50 / Animator.stream p50): {p50_plain / p50_fast:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
