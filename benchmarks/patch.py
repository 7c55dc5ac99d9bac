"""``dagan_fast.nn.patch`` on the models people run: unpatched vs patched, side by side in one run.

    python benchmarks/patch.py [--models dagan,fomm] [--size 256] [--batch 1] [--device cpu|cuda|all]
                               [--repeats 5] [--threads N] [--no-backward]

Models: official-layout DaGAN ``DepthAwareGenerator`` (K=15, vox-adv-256 configuration) and FOMM's
``OcclusionAwareGenerator`` (vox-256: K=10), the stand-ins of ``tests/official_fomm.py`` (official class
names, attributes, forwards and output dicts) with default-like random weights (timing depends on the shapes
only). Per model and device it times the same module on the same inputs before and after ``patch`` (applied
in the mode the model then runs in): ``first call after patch`` (eval, no grad: the one-time costs of a fresh
patch included: weight packing, the Winograd convolutions' per-shape timing), ``forward`` (eval, no grad, a
later call with new source tensors: no source-side cache hit), ``forward (same source)`` (a call with the
source of the previous one: the patched generators' source-side cache hits) and ``forward+backward`` (train
mode, L1 loss on the prediction, backward to every parameter). CPU: the minimum of ``--repeats`` runs (a shared machine only ever adds time); GPU: CUDA events,
median. Each row gets the speed-up, the largest relative difference of the prediction, and the number of
call-time fallbacks the patched forwards took (0 means the fused ops ran throughout). Unpatched and patched
calls alternate, so load from other processes hits both alike; ``--clock process --threads 1`` times this
process's CPU time instead of wall time, which other jobs on a shared machine barely move. Rows are appended to
``benchmarks/results/patch.csv`` with device, versions, commit, date and the CPU capability.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _common import append_csv, device_name, time_ms, versions  # noqa: E402

import dagan_fast  # noqa: E402
from dagan_fast.nn import patch, unpatch  # noqa: E402

warnings.filterwarnings("ignore", message="Default grid_sample")
warnings.filterwarnings("ignore", message="Default upsampling")

import official_dagan as od  # noqa: E402
import official_fomm as of  # noqa: E402

DENSE_MOTION_FULL = dict(block_expansion=64, max_features=1024, num_blocks=5, scale_factor=0.25)


def build(model: str) -> tuple:
    """(generator, num_kp, takes_depth) at the released configuration, default-like random weights."""
    torch.manual_seed(0)
    if model == "dagan":
        gen, K, depth = of.DepthAwareGenerator(3, 15, 64, 512, 2, 6, True, DENSE_MOTION_FULL, True), 15, True
    elif model == "dagan-spade":
        gen, K, depth = of.SPADEDepthAwareGenerator(3, 15, 64, 512, 2, 6, True, DENSE_MOTION_FULL, True), 15, True
    elif model == "fomm":
        gen, K, depth = of.OcclusionAwareGenerator(3, 10, 64, 512, 2, 6, True, DENSE_MOTION_FULL, True), 10, False
    else:
        raise SystemExit(f"unknown model {model!r} (dagan, dagan-spade, fomm)")
    with torch.no_grad():
        od._reinit_default(gen, torch.Generator().manual_seed(1))
        if hasattr(gen, "AttnModule"):
            gen.AttnModule.gamma.fill_(0.7)
    return gen, K, depth


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(model: str, device: torch.device, size: int, batch: int, repeats: int, backward: bool,
        clock: str = "wall") -> list:
    gen, K, depth = build(model)
    gen = gen.to(device)
    source = of.images(batch, 7, size).to(device)
    driving = of.images(batch, 8, size).to(device)
    src_depth = of.images(batch, 9, size, channels=1).to(device)
    kp_s = {k: v.to(device) for k, v in of.keypoints(batch, K, 10).items()}
    kp_d = {k: v.to(device) for k, v in of.keypoints(batch, K, 11).items()}
    args = (source, kp_d, kp_s) + ((src_depth, src_depth) if depth else ())

    def forward():
        with torch.no_grad():
            return gen(*args)

    def forward_new_source():
        # fresh source tensors (same values): the patched generators' source-side cache misses, as for a new
        # portrait per call
        with torch.no_grad():
            return gen(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])

    def forward_backward():
        out = gen(*args)
        loss = (out["prediction"] - driving).abs().mean()  # the official reconstruction loss is L1
        loss.backward()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    initial = {k: v.clone() for k, v in gen.state_dict().items()}  # train-mode runs move BatchNorm statistics
    # "first call after patch": what a fresh patch costs once (weight packing, the Winograd convolutions' timing
    # of both paths per input shape, oneDNN primitive creation). "forward": later calls, each with a new source.
    # "forward (same source)": the animation loop (one source, many driving frames), so a patched generator's
    # source-side cache is warm (the unpatched one has none: the same work every call).
    modes = [("first call after patch", forward_new_source, "eval"), ("forward", forward_new_source, "eval"),
             ("forward (same source)", forward, "eval")] + \
        ([("forward+backward", forward_backward, "train")] if backward else [])
    reports = [patch(gen)]
    print(reports[0])
    unpatch(gen)
    results = {}
    for mode, fn, training in modes:
        samples = {False: [], True: []}
        # unpatched and patched calls interleaved, so that load from other processes hits both alike
        for r in range(repeats + 1):
            for patched in (False, True):
                gen.load_state_dict(initial)
                gen.train(training == "train")      # patched in the mode it runs in, as a user would
                if patched:
                    reports.append(patch(gen))
                gen.zero_grad(set_to_none=True)
                if mode != "first call after patch":
                    fn()
                if clock == "process" and device.type == "cpu":
                    began = time.process_time()
                    fn()
                    ms = (time.process_time() - began) * 1e3
                else:
                    ms = time_ms(lambda: (fn(), sync()), device, warmup=0, repeats=1 if device.type == "cpu" else 5)
                if r:  # the first round is the warm-up
                    samples[patched].append(ms)
                if patched:
                    unpatch(gen)
        for patched in (False, True):
            gen.load_state_dict(initial)
            gen.eval()
            if patched:
                reports.append(patch(gen))
            with torch.no_grad():
                prediction = gen(*args)["prediction"]
            if patched:
                unpatch(gen)
            agg = min if device.type == "cpu" else statistics.median
            results[(mode, patched)] = (agg(samples[patched]), prediction)
    fallbacks = sum(sum(v.values()) for r in reports for v in r.fallbacks().values())
    rows = []
    ver = versions()
    for mode, _, _ in modes:
        (t0, p0), (t1, p1) = results[(mode, False)], results[(mode, True)]
        speedup = t0 / t1
        print(f"{model:<12} {device.type:<5} {mode:<21} unpatched {t0:9.1f} ms  patched {t1:9.1f} ms  "
              f"{speedup:5.2f}x  prediction rel diff {rel_diff(p1, p0):.1e}  fallbacks {fallbacks}")
        rows.append({
            "date": ver["date"], "commit": ver["commit"], "device": device_name(device), "torch": ver["torch"],
            "triton": ver["triton"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "load_avg": f"{os.getloadavg()[0]:.2f}",
            "model": model, "size": size, "batch": batch, "mode": mode, "repeats": repeats,
            "timing": (f"min, {clock} time" if device.type == "cpu" else "median (CUDA events)"),
            "unpatched_ms": f"{t0:.2f}", "patched_ms": f"{t1:.2f}", "speedup": f"{speedup:.3f}",
            "max_rel_diff": f"{rel_diff(p1, p0):.2e}", "fallbacks": fallbacks,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="dagan,fomm")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="CPU timing: wall time, or this process's CPU time (robust against other jobs on a "
                             "shared machine; use with --threads 1, where no thread waits for another)")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "patch.csv"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no CUDA device here")
    print(f"dagan_fast {dagan_fast.__file__}; backends: "
          f"{[n for n, i in dagan_fast.ops.available_backends().items() if i.available]}")
    rows = []
    for device in devices:
        for model in args.models.split(","):
            rows += run(model.strip(), device, args.size, args.batch, args.repeats, not args.no_backward, args.clock)
    append_csv(args.csv, rows)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
