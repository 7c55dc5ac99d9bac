"""Times each dagan_fast op per backend against the plain PyTorch formulation, in one run.

    python benchmarks/kernels.py [warp|attention|motion|bf16|conv|all] [--device cpu|cuda] [--full] [--csv PATH]

Prints per shape and pass (forward, backward, forward+backward): ms, achieved GB/s (warp, motion:
bytes read once + written once) or TFLOP/s (attention), and the speed ratio against PyTorch; `bf16`
(CPU) runs one bfloat16 shape per op against PyTorch in bfloat16; `conv` (CPU) the float32 Winograd and
narrow convolution kernels against nn.Conv2d. Rows
are appended to benchmarks/results/kernels-<device>.csv with device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# this checkout's package first (a worktree or an un-installed clone), then the installed one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dagan_fast  # noqa: E402
from dagan_fast.ops import reference  # noqa: E402
from _common import append_csv, device_name, time_ms, versions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def backends_with(op: str, device: torch.device) -> List[str]:
    names = []
    for name, info in dagan_fast.ops.available_backends().items():
        usable_here = (name == "cuda") == (device.type == "cuda") or name in ("reference", "triton")
        if info.available and op in info.ops and usable_here:
            names.append(name)
    return names


CPU_TAG = ""  # appended to the device column on the CPU: the vector levels of our kernels and of ATen
REPEATS: Optional[int] = None  # timed calls per pass (--repeats; default 10 on a GPU, 3 on the CPU)


def timed_passes(forward: Callable, inputs: List[torch.Tensor], device) -> Dict[str, float]:
    """ms for forward (no autograd graph), backward alone (on a retained graph), forward+backward.
    ``forward`` returns a tensor or a tuple of tensors (each gets a random gradient)."""
    def fwd():
        with torch.no_grad():
            forward()

    outs = forward()
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    grads = [torch.randn_like(o) for o in outs]

    def bwd():
        torch.autograd.backward(outs, grads, retain_graph=True)

    def both():
        result = forward()
        torch.autograd.backward(list(result) if isinstance(result, (tuple, list)) else [result], grads)

    # on the CPU: the best of at least 3 calls and 1 s of calls (short calls get many tries to run unpreempted)
    warmup, repeats, seconds = (3, REPEATS or 10, 0.0) if device.type == "cuda" else (1, REPEATS or 3, 1.0)
    results = {name: time_ms(fn, device, warmup=warmup, repeats=repeats, min_seconds=seconds)
               for name, fn in (("forward", fwd), ("backward", bwd), ("forward+backward", both))}
    for t in inputs:
        t.grad = None
    return results


def report(rows: List[dict], op: str, shape: str, baseline: str, results: Dict[str, Dict[str, float]],
           work: Dict[str, float], unit: str, device: torch.device, meta: dict) -> None:
    for name, passes in results.items():
        for pass_name, ms in passes.items():
            base_ms = results[baseline][pass_name]
            rate = work[pass_name] / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
            row = {"op": op, "shape": shape, "pass": pass_name, "backend": name, "ms": round(ms, 4),
                   unit.replace("/", "_per_"): round(rate, 3), "speedup_vs_pytorch": round(base_ms / ms, 3),
                   "device": device_name(device) + CPU_TAG, **meta}
            rows.append(row)
            print(f"{op:22s} {shape:34s} {pass_name:17s} {name:12s} {ms:10.3f} ms {rate:9.2f} {unit:7s} "
                  f"x{base_ms / ms:6.2f}")


# ---------------------------------------------------------------- warp
def bench_warp(device, full: bool, meta: dict) -> List[dict]:
    # (B, C, H, W, layout of the input): DaGAN's feature warp (C256 64x64), the image warp (C3), and
    # the feature warp with a channels_last input (as conv stacks in channels_last produce it)
    shapes = [(1, 256, 64, 64, "nchw"), (8, 256, 64, 64, "nchw"), (8, 256, 64, 64, "channels_last"),
              (1, 64, 256, 256, "nchw"), (1, 3, 256, 256, "nchw"), (8, 3, 256, 256, "nchw")]
    if full or device.type == "cuda":
        shapes += [(32, 256, 64, 64, "nchw"), (8, 64, 256, 256, "nchw"), (32, 3, 256, 256, "nchw")]
    rows: List[dict] = []
    for B, C, H, W, layout in shapes:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(B, C, H, W, device=device).contiguous(memory_format=fmt).requires_grad_()
        grid = ((torch.rand(B, H, W, 2, device=device) * 2 - 1) * 1.05).requires_grad_()
        occ = torch.rand(B, 1, H, W, device=device, requires_grad=True)
        inputs = [x, grid, occ]
        results = {"pytorch": timed_passes(
            lambda: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * occ,
            inputs, device)}
        for name in backends_with("warp_occlusion", device):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.warp_occlusion(x, grid, occ, backend=name), inputs, device)
        e = x.element_size()
        fwd_bytes = e * (B * C * H * W * 2 + B * H * W * 3)
        bwd_bytes = e * (B * C * H * W * 3 + B * H * W * 6)
        work = {"forward": fwd_bytes, "backward": bwd_bytes, "forward+backward": fwd_bytes + bwd_bytes}
        shape = f"B{B} C{C} {H}x{W}" + (" channels_last" if layout == "channels_last" else "")
        report(rows, "warp_occlusion", shape, "pytorch", results, work, "GB/s", device, meta)
    return rows


# ---------------------------------------------------------------- attention
def bench_attention(device, full: bool, meta: dict) -> List[dict]:
    # (B, H, N, Dqk, Dv, scale): DaGAN's layer, then DaGAN++-style layers with D = layer channels
    shapes = [(1, 1, 4096, 32, 256, 1.0), (8, 1, 4096, 32, 256, 1.0), (1, 1, 1024, 64, 64, None),
              (1, 1, 4096, 64, 64, None)]
    if full or device.type == "cuda":
        shapes += [(1, 1, 16384, 64, 64, None), (1, 1, 65536, 64, 64, None)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows: List[dict] = []
    for B, H, N, Dqk, Dv, scale in shapes:
        q = torch.randn(B, H, N, Dqk, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, N, Dqk, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, N, Dv, device=device, dtype=dtype, requires_grad=True)
        inputs = [q, k, v]
        s = 1.0 / math.sqrt(Dqk) if scale is None else scale
        results = {"sdpa": timed_passes(lambda: F.scaled_dot_product_attention(q, k, v, scale=s), inputs, device)}
        if B * H * N * N * 4 <= 2 ** 31:
            results["materialised"] = timed_passes(lambda: reference.materialized_attention(q, k, v, s), inputs,
                                                   device)
        for name in backends_with("cross_modal_attention", device):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.cross_modal_attention(q, k, v, s, backend=name), inputs, device)
        fwd_flops = 2.0 * B * H * N * N * (Dqk + Dv)
        bwd_flops = 2.0 * B * H * N * N * (3 * Dqk + 2 * Dv)  # recompute QK^T, dV, dP, dQ, dK
        work = {"forward": fwd_flops, "backward": bwd_flops, "forward+backward": fwd_flops + bwd_flops}
        report(rows, "cross_modal_attention", f"B{B} H{H} N{N} Dqk{Dqk} Dv{Dv} {str(dtype)[6:]}", "sdpa", results,
               work, "TFLOP/s", device, meta)
    return rows


# ---------------------------------------------------------------- motion
def _inverse(jac: torch.Tensor) -> torch.Tensor:
    """torch.inverse of (B,K,2,2) Jacobians; float16/bfloat16 go through float32 (linalg.inv refuses them)."""
    if jac.dtype in (torch.float16, torch.bfloat16):
        return torch.inverse(jac.float()).to(jac.dtype)
    return torch.inverse(jac)


def official_sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, variance=0.01):
    """The official DaGAN/FOMM formulation: materialised motions, per-pixel torch.inverse."""
    B, C, H, W = source.shape
    K = kp_s.shape[1]
    grid = reference.make_coordinate_grid(H, W, source.dtype, source.device)

    def gaussian(kp):
        mean = kp.view(B, K, 1, 1, 2)
        return torch.exp(-0.5 * ((grid.view(1, 1, H, W, 2) - mean) ** 2).sum(-1) / variance)

    heat = gaussian(kp_d) - gaussian(kp_s)
    heat = torch.cat([torch.zeros(B, 1, H, W, dtype=heat.dtype, device=heat.device), heat], 1).unsqueeze(2)
    coords = grid.view(1, 1, H, W, 2) - kp_d.view(B, K, 1, 1, 2)
    jac = torch.matmul(jac_s, _inverse(jac_d)).unsqueeze(-3).unsqueeze(-3).repeat(1, 1, H, W, 1, 1)
    coords = torch.matmul(jac, coords.unsqueeze(-1)).squeeze(-1)
    motions = torch.cat([grid.view(1, 1, H, W, 2).repeat(B, 1, 1, 1, 1), coords + kp_s.view(B, K, 1, 1, 2)], 1)
    rep = source.unsqueeze(1).unsqueeze(1).repeat(1, K + 1, 1, 1, 1, 1).view(B * (K + 1), C, H, W)
    deformed = F.grid_sample(rep, motions.view(B * (K + 1), H, W, 2), align_corners=False).view(B, K + 1, C, H, W)
    return torch.cat([heat, deformed], 2).view(B, -1, H, W)


def official_dense_motion(mask_logits, kp_s, jac_s, kp_d, jac_d):
    """The official-style dense motion: materialised (B,K+1,H,W,2) motions (per-pixel torch.inverse),
    softmax mask, weighted sum -> (deformation (B,H,W,2), mask (B,K+1,H,W))."""
    B, K1, H, W = mask_logits.shape
    K = K1 - 1
    grid = reference.make_coordinate_grid(H, W, mask_logits.dtype, mask_logits.device)
    coords = grid.view(1, 1, H, W, 2) - kp_d.view(B, K, 1, 1, 2)
    jac = torch.matmul(jac_s, _inverse(jac_d)).unsqueeze(-3).unsqueeze(-3).repeat(1, 1, H, W, 1, 1)
    coords = torch.matmul(jac, coords.unsqueeze(-1)).squeeze(-1)
    motions = torch.cat([grid.view(1, 1, H, W, 2).repeat(B, 1, 1, 1, 1), coords + kp_s.view(B, K, 1, 1, 2)], 1)
    mask = F.softmax(mask_logits, dim=1)
    deformation = (motions.permute(0, 1, 4, 2, 3) * mask.unsqueeze(2)).sum(dim=1).permute(0, 2, 3, 1)
    return deformation, mask


def bench_motion(device, full: bool, meta: dict) -> List[dict]:
    rows: List[dict] = []
    K, C, H, W = 15, 3, 64, 64
    for B in (1, 8, 32):
        source = torch.rand(B, C, H, W, device=device, requires_grad=True)
        kp_s = (torch.rand(B, K, 2, device=device) * 2 - 1).requires_grad_()
        kp_d = (torch.rand(B, K, 2, device=device) * 2 - 1).requires_grad_()
        eye = torch.eye(2, device=device)
        jac_s = (eye + 0.2 * torch.randn(B, K, 2, 2, device=device)).requires_grad_()
        jac_d = (eye + 0.2 * torch.randn(B, K, 2, 2, device=device)).requires_grad_()
        logits = torch.randn(B, K + 1, H, W, device=device, requires_grad=True)
        inputs = [source, kp_s, jac_s, kp_d, jac_d]
        results = {"official": timed_passes(lambda: official_sparse_motion_inputs(*inputs), inputs, device)}
        for name in backends_with("sparse_motion_inputs", device):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.sparse_motion_inputs(*inputs, backend=name), inputs, device)
        e = source.element_size()
        out_bytes = e * B * (K + 1) * (C + 1) * H * W
        fwd_bytes = out_bytes + e * B * C * H * W
        work = {"forward": fwd_bytes, "backward": 2 * fwd_bytes, "forward+backward": 3 * fwd_bytes}
        report(rows, "sparse_motion_inputs", f"B{B} K{K} C{C} {H}x{W}", "official", results, work, "GB/s", device,
               meta)

        dense_inputs = [logits, kp_s, jac_s, kp_d, jac_d]
        results = {"official": timed_passes(lambda: official_dense_motion(*dense_inputs), dense_inputs, device)}
        for name in backends_with("dense_motion", device):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.dense_motion(*dense_inputs, backend=name), dense_inputs, device)
        # Logits in, mask and deformation out; the backward reads both gradients and writes the logits'.
        fwd_bytes = e * B * H * W * (2 * (K + 1) + 2)
        work = {"forward": fwd_bytes, "backward": 2 * fwd_bytes, "forward+backward": 3 * fwd_bytes}
        report(rows, "dense_motion", f"B{B} K{K} {H}x{W}", "official", results, work, "GB/s", device, meta)
    return rows


# ---------------------------------------------------------------- bfloat16 (CPU)
def bench_bf16(device, full: bool, meta: dict) -> List[dict]:
    """One bfloat16 row per op on the CPU: the kernels against the plain PyTorch formulation run in
    bfloat16 (motion: float32 keypoints with a bfloat16 image, the models' contract)."""
    if device.type != "cpu":
        return []
    bf16 = torch.bfloat16
    rows: List[dict] = []

    def cpu_backends(op):  # the Triton interpreter does not take bfloat16
        return [n for n in backends_with(op, device) if n != "triton"]

    for B, C, H, W, layout in [(1, 256, 64, 64, "nchw"), (1, 256, 64, 64, "channels_last")]:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(B, C, H, W, dtype=bf16).contiguous(memory_format=fmt).requires_grad_()
        grid = ((torch.rand(B, H, W, 2) * 2 - 1) * 1.05).to(bf16).requires_grad_()
        occ = torch.rand(B, 1, H, W).to(bf16).requires_grad_()
        inputs = [x, grid, occ]
        results = {"pytorch": timed_passes(
            lambda: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * occ,
            inputs, device)}
        for name in cpu_backends("warp_occlusion"):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.warp_occlusion(x, grid, occ, backend=name), inputs, device)
        e = x.element_size()
        fwd_bytes = e * (B * C * H * W * 2 + B * H * W * 3)
        bwd_bytes = e * (B * C * H * W * 3 + B * H * W * 6)
        work = {"forward": fwd_bytes, "backward": bwd_bytes, "forward+backward": fwd_bytes + bwd_bytes}
        shape = f"B{B} C{C} {H}x{W} bfloat16" + (" channels_last" if layout == "channels_last" else "")
        report(rows, "warp_occlusion", shape, "pytorch", results, work, "GB/s", device, meta)

    for B, Hh, N, Dqk, Dv, scale in [(1, 1, 4096, 32, 256, 1.0), (1, 1, 1024, 64, 64, None)]:
        q, k, v = (torch.randn(B, Hh, N, d, dtype=bf16, requires_grad=True) for d in (Dqk, Dqk, Dv))
        inputs = [q, k, v]
        s = 1.0 / math.sqrt(Dqk) if scale is None else scale
        results = {"sdpa": timed_passes(lambda: F.scaled_dot_product_attention(q, k, v, scale=s), inputs, device)}
        for name in cpu_backends("cross_modal_attention"):
            results[name] = timed_passes(
                lambda name=name: dagan_fast.ops.cross_modal_attention(q, k, v, s, backend=name), inputs, device)
        fwd_flops = 2.0 * B * Hh * N * N * (Dqk + Dv)
        bwd_flops = 2.0 * B * Hh * N * N * (3 * Dqk + 2 * Dv)
        work = {"forward": fwd_flops, "backward": bwd_flops, "forward+backward": fwd_flops + bwd_flops}
        report(rows, "cross_modal_attention", f"B{B} H{Hh} N{N} Dqk{Dqk} Dv{Dv} bfloat16", "sdpa", results, work,
               "TFLOP/s", device, meta)

    B, K, C, H, W = 8, 15, 3, 64, 64
    source = torch.rand(B, C, H, W).to(bf16).requires_grad_()
    logits = torch.randn(B, K + 1, H, W).to(bf16).requires_grad_()
    kp_s = (torch.rand(B, K, 2) * 2 - 1).requires_grad_()
    kp_d = (torch.rand(B, K, 2) * 2 - 1).requires_grad_()
    eye = torch.eye(2)
    jac_s = (eye + 0.2 * torch.randn(B, K, 2, 2)).requires_grad_()
    jac_d = (eye + 0.2 * torch.randn(B, K, 2, 2)).requires_grad_()
    kps = [kp_s, jac_s, kp_d, jac_d]
    as_bf16 = lambda: [t.to(bf16) for t in kps]  # noqa: E731 - the official code would run all in bfloat16
    inputs = [source, *kps]
    results = {"official": timed_passes(lambda: official_sparse_motion_inputs(source, *as_bf16()), inputs, device)}
    for name in cpu_backends("sparse_motion_inputs"):
        results[name] = timed_passes(
            lambda name=name: dagan_fast.ops.sparse_motion_inputs(source, *kps, backend=name), inputs, device)
    e = source.element_size()
    fwd_bytes = e * B * (K + 1) * (C + 1) * H * W + e * B * C * H * W
    work = {"forward": fwd_bytes, "backward": 2 * fwd_bytes, "forward+backward": 3 * fwd_bytes}
    report(rows, "sparse_motion_inputs", f"B{B} K{K} C{C} {H}x{W} bfloat16", "official", results, work, "GB/s",
           device, meta)
    inputs = [logits, *kps]
    results = {"official": timed_passes(lambda: official_dense_motion(logits, *as_bf16()), inputs, device)}
    for name in cpu_backends("dense_motion"):
        results[name] = timed_passes(
            lambda name=name: dagan_fast.ops.dense_motion(logits, *kps, backend=name), inputs, device)
    fwd_bytes = e * B * H * W * (2 * (K + 1) + 2)
    work = {"forward": fwd_bytes, "backward": 2 * fwd_bytes, "forward+backward": 3 * fwd_bytes}
    report(rows, "dense_motion", f"B{B} K{K} {H}x{W} bfloat16", "official", results, work, "GB/s", device, meta)
    return rows


# ---------------------------------------------------------------- CPU float32 convolutions
def bench_conv(device, full: bool, meta: dict) -> List[dict]:
    """The fast_conv kernels (Winograd F(4x4,3x3), the narrow direct kernel) against nn.Conv2d (oneDNN), on
    DaGAN's shapes, NCHW inputs as in training; forced on (policy "always") so the kernels themselves are
    timed. Forward: the inference path (channels_last output); backward: the training path's gradients."""
    if device.type != "cpu":
        return []
    import copy
    from dagan_fast.models.fast_conv import fast_convolutions_available, use_fast_convolutions
    if not fast_convolutions_available():
        print("conv: the compiled op library is not loaded; skipped")
        return []
    # (C, Co, kernel, H, W): the bottleneck res-block, a decoder up-block's at 128x128, the last 7x7 to RGB,
    # the depth decoder's disparity head
    shapes = [(256, 256, 3, 64, 64), (128, 64, 3, 128, 128), (64, 3, 7, 256, 256), (16, 1, 3, 256, 256)]
    rows: List[dict] = []
    for C, Co, k, H, W in shapes:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(C, Co, k, padding=k // 2)
        fast = copy.deepcopy(conv)
        use_fast_convolutions(fast, policy="always")
        x = torch.randn(1, C, H, W, requires_grad=True)
        results = {"pytorch": timed_passes(lambda: conv(x), [x], device)}
        results[type(fast).__name__] = timed_passes(lambda: fast(x), [x], device)
        flops = 2.0 * C * Co * k * k * H * W
        work = {"forward": flops, "backward": 2 * flops, "forward+backward": 3 * flops}
        report(rows, "conv2d fp32", f"C{C} Co{Co} {k}x{k} {H}x{W}", "pytorch", results, work, "TFLOP/s", device,
               meta)
    return rows


BENCHES = {"warp": bench_warp, "attention": bench_attention, "motion": bench_motion, "bf16": bench_bf16,
           "conv": bench_conv}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--full", action="store_true", help="also the large shapes on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per pass (default: 10 GPU, 3 CPU)")
    parser.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/kernels-<dev>.csv)")
    args = parser.parse_args(argv)
    global REPEATS
    REPEATS = args.repeats
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    meta = versions()
    global CPU_TAG
    try:  # the vector level of our CPU kernels (DAGAN_FAST_CPU_CAPABILITY / ATEN_CPU_CAPABILITY, capped by the CPU)
        capability = str(torch.ops.dagan_fast.cpu_capability())
    except (AttributeError, RuntimeError):  # no compiled library, or one older than the switch
        capability = "none"
    if device.type == "cpu":
        CPU_TAG = f" [ours {capability}, ATen {torch.backends.cpu.get_cpu_capability()}]"
    print(f"device: {device_name(device)} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}"
          f"{CPU_TAG}")
    print("ratio: PyTorch time / backend time (>1: faster than PyTorch)")
    rows: List[dict] = []
    for name in (BENCHES if args.which == "all" else [args.which]):
        rows += BENCHES[name](device, args.full, meta)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    path = args.csv or os.path.join(RESULTS, f"kernels-{tag}.csv")
    append_csv(path, rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
