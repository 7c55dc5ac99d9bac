"""Every GPU backend (cuda, triton) of every op on CUDA tensors, forward and backward, in float32, float16 and
bfloat16, by FlashAttention's rule (tests/_tolerance.py): the kernel's error against the reference in float64 on
the same rounded inputs is at most twice PyTorch's own error in the kernel's precision, plus a few roundings of
the terms' magnitude. gpu-marked: skipped without a CUDA device (benchmarks/gpu_suite.sh runs it)."""
from __future__ import annotations

import pytest
import torch

import dagan_fast
from dagan_fast import ops
from _tolerance import assert_attention_accurate, assert_motion_accurate, assert_warp_accurate

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("cuda", "triton")


def _assert_accurate(op, args, out, grads, grad_outs, dtype):
    """The rule for one op call: ``args`` the (rounded) inputs the kernel saw, ``grads`` their gradients
    (None where not a tensor) for the upstream ``grad_outs`` of the outputs ``out``."""
    name = f"{op} {dtype}"
    tensor_grads = [g for a, g in zip(args, grads) if torch.is_tensor(a)]
    if op == "warp_occlusion":
        assert_warp_accurate(*args, out=out[0], grads=tensor_grads, grad_out=grad_outs[0], name=name)
    elif op == "cross_modal_attention":
        q, k, v, scale = args
        assert_attention_accurate(q, k, v, scale, out=out[0], grads=tensor_grads, grad_out=grad_outs[0], name=name)
    elif op == "sparse_motion_inputs":
        assert_motion_accurate("sparse", args[:5], grad_outs[0], out + tensor_grads, variance=args[5], name=name)
    else:
        assert_motion_accurate("dense", args, grad_outs, out + tensor_grads, name=name)


def _runs(op, backend, probe):
    return not dagan_fast.ops._backends.get_backend(backend).not_supported_reasons(op, [probe])


def _warp_case(B, C, Hi, Wi, Ho, Wo, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, C, Hi, Wi, device="cuda", generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grid = (torch.rand(B, Ho, Wo, 2, device="cuda", generator=g) * 2 - 1) * 1.2
    occ = torch.rand(B, 1, Ho, Wo, device="cuda", generator=g)
    return (x, grid, occ), {}


def _attention_case(B, H, N, Dqk, Dv, scale):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, N, Dqk, device="cuda", generator=g)
    k = torch.randn(B, H, N, Dqk, device="cuda", generator=g)
    v = torch.randn(B, H, N, Dv, device="cuda", generator=g)
    return (q, k, v, scale), {}


def _keypoints(B, K, g):
    kp_s = torch.rand(B, K, 2, device="cuda", generator=g) * 2.2 - 1.1
    kp_d = torch.rand(B, K, 2, device="cuda", generator=g) * 2.2 - 1.1
    eye = torch.eye(2, device="cuda")
    jac_s = eye + 0.3 * torch.randn(B, K, 2, 2, device="cuda", generator=g)
    jac_d = eye + 0.3 * torch.randn(B, K, 2, 2, device="cuda", generator=g)
    return kp_s, jac_s, kp_d, jac_d


def _sparse_case(B, K, C, H, W):
    g = torch.Generator(device="cuda").manual_seed(0)
    source = torch.rand(B, C, H, W, device="cuda", generator=g)
    return (source, *_keypoints(B, K, g), 0.01), {}


def _dense_case(B, K, H, W):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, K + 1, H, W, device="cuda", generator=g) * 3
    return (logits, *_keypoints(B, K, g)), {}


CASES = [
    ("warp_occlusion", ops.warp_occlusion, _warp_case, (2, 17, 13, 29, 31, 7)),
    ("warp_occlusion", ops.warp_occlusion, _warp_case, (2, 256, 64, 64, 64, 64)),
    ("warp_occlusion", ops.warp_occlusion, lambda *s: _warp_case(*s, channels_last=True), (2, 64, 33, 35, 37, 31)),
    ("cross_modal_attention", ops.cross_modal_attention, _attention_case, (2, 1, 4096, 32, 256, 1.0)),
    ("cross_modal_attention", ops.cross_modal_attention, _attention_case, (1, 2, 1000, 64, 64, None)),
    ("cross_modal_attention", ops.cross_modal_attention, _attention_case, (1, 1, 77, 16, 48, 0.7)),
    ("sparse_motion_inputs", ops.sparse_motion_inputs, _sparse_case, (2, 15, 3, 64, 64)),
    ("sparse_motion_inputs", ops.sparse_motion_inputs, _sparse_case, (3, 10, 5, 7, 65)),
    ("dense_motion", ops.dense_motion, _dense_case, (2, 15, 64, 64)),
    ("dense_motion", ops.dense_motion, _dense_case, (1, 20, 65, 7)),
]


def _cast(args, dtype):
    return [a.to(dtype).requires_grad_() if torch.is_tensor(a) else a for a in args]


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gpu_backend_matches_reference(case, dtype, backend):
    op, fn, make, shape = CASES[case]
    args, kwargs = make(*shape)
    if not _runs(op, backend, args[0].to(dtype)):
        pytest.skip(f"{backend} cannot run {op} in {dtype} here")
    ours = _cast(args, dtype)
    out = _outputs(fn(*ours, backend=backend, **kwargs))
    for o in out:
        assert o.dtype == dtype and torch.isfinite(o).all()
    weights = [torch.randn(o.shape, device="cuda", dtype=torch.float64) for o in out]
    sum((o.double() * w).sum() for o, w in zip(out, weights)).backward()
    for a in ours:
        if torch.is_tensor(a):
            assert a.grad is not None and torch.isfinite(a.grad).all()
    # the upstream each output received: the float64 weights rounded to its dtype by .double()'s backward
    _assert_accurate(op, [a.detach() if torch.is_tensor(a) else a for a in ours], [o.detach() for o in out],
                     [a.grad if torch.is_tensor(a) else None for a in ours], [w.to(dtype) for w in weights], dtype)


def test_cuda_warp_is_bitwise_repeatable_in_deterministic_mode():
    backend = "cuda"
    args, _ = _warp_case(2, 64, 32, 32, 32, 32)
    if not _runs("warp_occlusion", backend, args[0]):
        pytest.skip(f"{backend} cannot run warp_occlusion here")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(2):
            ins = [a.clone().requires_grad_() for a in args]
            ops.warp_occlusion(*ins, backend=backend).square().sum().backward()
            grads.append([i.grad for i in ins])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
