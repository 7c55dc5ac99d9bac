"""warp_occlusion: every backend against F.grid_sample * occlusion, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dagan_fast
from dagan_fast.ops import _backends
from dagan_fast.nn import FusedWarp
from dagan_fast.ops import BackendError, warp_occlusion
from conftest import backends_for, compiled_backends_for, gpu
from _tolerance import WARP_GRADS, assert_warp_accurate

BACKENDS = backends_for("warp_occlusion")
COMPILED = compiled_backends_for("warp_occlusion")


def oracle(x, grid, occ):
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out if occ is None else out * occ


def make_inputs(B, C, Hi, Wi, Ho, Wo, *, spread=1.3, dtype=torch.float32, occlusion=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, Hi, Wi, generator=g, dtype=torch.float64).to(dtype)
    grid = ((torch.rand(B, Ho, Wo, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread).to(dtype)
    occ = torch.rand(B, 1, Ho, Wo, generator=g, dtype=torch.float64).to(dtype) if occlusion else None
    return x, grid, occ


SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 11, 5, 13),
    (3, 17, 13, 5, 11, 7),     # channels not a multiple of any vector width
    (1, 33, 16, 16, 16, 16),
    (2, 4, 64, 64, 31, 29),
]


def test_reference_is_grid_sample_times_occlusion():
    x, grid, occ = make_inputs(2, 3, 9, 8, 7, 6)
    assert torch.equal(warp_occlusion(x, grid, occ, backend="reference"), oracle(x, grid, occ))
    assert torch.equal(warp_occlusion(x, grid, None, backend="reference"), oracle(x, grid, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_occ", [True, False])
def test_forward_matches_oracle(backend, shape, with_occ, poison_outputs):
    x, grid, occ = make_inputs(*shape, occlusion=with_occ)
    out = warp_occlusion(x, grid, occ, backend=backend)
    assert out.shape == (shape[0], shape[1], shape[4], shape[5])
    assert torch.isfinite(out).all(), "kernel left elements unwritten (NaN poison)"
    assert_warp_accurate(x, grid, occ, out=out, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_out_of_range_and_boundary_grids(backend, poison_outputs):
    x, _, occ = make_inputs(2, 5, 6, 7, 4, 9)
    grid = torch.empty(2, 4, 9, 2)
    values = torch.tensor([-1e6, -50.0, -1.0 - 1 / 7, -1.0, -1 + 1 / 7, 0.0, 1 - 1 / 7, 1.0, 1 + 1 / 7, 50.0, 1e6,
                           float("inf"), float("-inf")])
    g = torch.Generator().manual_seed(3)
    grid.copy_(values[torch.randint(len(values), grid.shape, generator=g)])
    out = warp_occlusion(x, grid, occ, backend=backend)
    assert torch.isfinite(out).all()
    assert_warp_accurate(x, grid, occ, out=out, name=backend)  # the reference clamps: grid_sample's inf is undefined
    outside = (grid.abs() > 2).any(-1).unsqueeze(1).expand_as(out)
    assert (out[outside] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_occlusion_exactly_zero_and_one(backend):
    x, grid, _ = make_inputs(2, 6, 8, 8, 8, 8)
    ones, zeros = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    assert_warp_accurate(x, grid, None, out=warp_occlusion(x, grid, ones, backend=backend), name=backend)
    assert (warp_occlusion(x, grid, zeros, backend=backend) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_without_changing_results(backend):
    x, grid, occ = make_inputs(2, 8, 12, 10, 9, 11)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    grid_nc = grid.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    occ_nc = occ.expand(2, 3, 9, 11)[:, 1:2]
    x_sliced = torch.randn(2, 16, 12, 20)[:, ::2, :, ::2]
    x_sliced.copy_(x)
    for xi in (x_cl, x_sliced):
        assert not xi.is_contiguous()
        assert_warp_accurate(x, grid, occ, out=warp_occlusion(xi, grid_nc, occ_nc, backend=backend), name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero_and_channel_zero(backend):
    x, grid, occ = make_inputs(0, 3, 5, 5, 4, 4)
    assert warp_occlusion(x, grid, occ, backend=backend).shape == (0, 3, 4, 4)
    x = torch.randn(2, 0, 5, 5, requires_grad=True)
    grid = torch.rand(2, 4, 4, 2, requires_grad=True)
    out = warp_occlusion(x, grid, None, backend=backend)
    assert out.shape == (2, 0, 4, 4)
    out.sum().backward()
    assert (grid.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_backward_matches_oracle(backend, shape, poison_outputs):
    x, grid, occ = make_inputs(*shape, spread=1.2, seed=5)
    grad_out = torch.randn(shape[0], shape[1], shape[4], shape[5], generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_() for t in (x, grid, occ)]
    warp_occlusion(*leaves, backend=backend).backward(grad_out)
    assert_warp_accurate(x, grid, occ, grads=[t.grad for t in leaves], grad_out=grad_out, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_only_some_inputs(backend):
    x, grid, occ = make_inputs(2, 3, 6, 6, 5, 5)
    grid.requires_grad_()
    warp_occlusion(x, grid, occ, backend=backend).sum().backward()
    assert x.grad is None and occ.grad is None
    assert_warp_accurate(x, grid.detach(), occ, grads=[None, grid.grad, None], grad_out=torch.ones(2, 3, 5, 5),
                         name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3, dtype=torch.float64, spread=1.1, seed=11)
    # keep grid points away from pixel-centre kinks, where the bilinear map is not differentiable
    inputs = [t.requires_grad_() for t in (x, grid, occ)]
    # The Triton interpreter costs ~20 ms a launch and a full Jacobian takes ~1000 launches: check random
    # projections there (the full gradients are compared with the reference in the tests below).
    fast = backend == "triton"
    assert torch.autograd.gradcheck(lambda a, b, c: warp_occlusion(a, b, c, backend=backend), inputs,
                                    fast_mode=fast)
    assert torch.autograd.gradcheck(lambda a, b: warp_occlusion(a, b, None, backend=backend), inputs[:2],
                                    fast_mode=fast)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_and_backward(backend, dtype):
    reasons = _backends.get_backend(backend).not_supported_reasons("warp_occlusion", [torch.zeros(1, dtype=dtype)])
    if reasons:  # bf16 under the Triton interpreter
        pytest.skip("; ".join(reasons))
    x, grid, occ = make_inputs(2, 9, 10, 12, 7, 8, dtype=dtype)
    out = warp_occlusion(x, grid, occ, backend=backend)
    assert out.dtype == dtype
    leaves = [t.clone().requires_grad_() for t in (x, grid, occ)]
    warp_occlusion(*leaves, backend=backend).sum().backward()
    for got in leaves:
        assert got.grad.dtype == dtype
    # same precision: PyTorch in float32, rounded once to dtype (what the kernels compute)
    assert_warp_accurate(x, grid, occ, out=out, grads=[t.grad for t in leaves], grad_out=torch.ones_like(out),
                         name=backend)


@pytest.mark.parametrize("backend", COMPILED)
def test_deterministic_bitwise(backend):
    x, grid, occ = make_inputs(3, 16, 20, 20, 24, 24, spread=0.6, seed=2)  # many pixels share taps
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, grid, occ)]
        out = warp_occlusion(*leaves, backend=backend)
        out.backward(torch.ones_like(out))
        runs.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck_custom_ops():
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3, dtype=torch.float64)
    for backend in BACKENDS:
        args = (x.requires_grad_(), grid.requires_grad_(), occ.requires_grad_(), backend)
        torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion.default, args)
        torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion.default, (x, grid, None, backend))
        grad = torch.randn(2, 3, 4, 3, dtype=torch.float64)
        torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion_backward.default,
                              (grad, x.detach(), grid.detach(), occ.detach(), backend, [True, True, True]))
        torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion_backward.default,
                              (grad, x.detach(), grid.detach(), None, backend, [False, True, False]))


@pytest.mark.skipif(not COMPILED, reason="compiled library not built")
def test_opcheck_compiled_kernels():
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3)
    torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion_fwd.default, (x, grid, occ))
    grad = torch.randn(2, 3, 4, 3)
    torch.library.opcheck(torch.ops.dagan_fast.warp_occlusion_bwd.default, (grad, x, grid, occ, [True, True, True]))


@pytest.mark.skipif(not COMPILED, reason="compiled library not built")
def test_compiled_kernel_checks_its_arguments():
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3)
    with pytest.raises(RuntimeError, match="occlusion must be"):
        torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ[:, :, :2])
    with pytest.raises(RuntimeError, match="grid batch"):
        torch.ops.dagan_fast.warp_occlusion_fwd(x, grid[:1], None)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, g, o: warp_occlusion(x[0], g, o), ValueError, r"input must be 4-D .*got shape \(3, 5, 6\)"),
    (lambda x, g, o: warp_occlusion(x, g[..., :1], o), ValueError, r"grid must be \(B,Ho,Wo,2\)"),
    (lambda x, g, o: warp_occlusion(x, g[:1], o), ValueError, r"grid batch 1 != input batch 2"),
    (lambda x, g, o: warp_occlusion(x, g, o[:, :, :3]), ValueError, r"occlusion must be \(B,1,Ho,Wo\)"),
    (lambda x, g, o: warp_occlusion(x.to(torch.uint8), g, o), TypeError, r"input must be a floating tensor.*uint8"),
    (lambda x, g, o: warp_occlusion(x, g.double(), o), TypeError, r"grid has dtype torch.float64"),
    (lambda x, g, o: warp_occlusion(x.numpy(), g, o), TypeError, r"input must be a torch.Tensor"),
    (lambda x, g, o: warp_occlusion(x, g, o.to("meta")), ValueError, r"occlusion is on meta"),
    (lambda x, g, o: warp_occlusion(x.index_fill(1, torch.tensor([1]), float("nan")), g, o), ValueError,
     r"input contains \d+ NaN"),
    (lambda x, g, o: warp_occlusion(x, g.index_fill(1, torch.tensor([0]), float("nan")), o), ValueError,
     r"grid contains \d+ NaN"),
    (lambda x, g, o: warp_occlusion(x, g, o, backend="cuda"), BackendError, r"backend='cuda' cannot run"),
    (lambda x, g, o: warp_occlusion(x, g, o, backend="fast"), ValueError, r"unknown backend 'fast'"),
    (lambda x, g, o: warp_occlusion(x[:, :, :0], g, o), ValueError, r"at least 1x1"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3)
    with pytest.raises(error, match=match):
        call(x, grid, occ)


def test_value_checks_can_be_skipped():
    x, grid, occ = make_inputs(1, 2, 4, 4, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    with dagan_fast.ops.skip_value_checks():
        out = warp_occlusion(x, grid, occ, backend="reference")
    assert out.shape == (1, 2, 3, 3)


# --------------------------------------------------------------------------------------------
# Triton kernels (through the interpreter on CPU): contract, layouts, boundaries, block plans
# --------------------------------------------------------------------------------------------
triton_only = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here: "
                                 + dagan_fast.ops.available_backends()["triton"].detail)
MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, True, False), (False, True, True), (False, False, False)]


def backward_op(grad, x, grid, occ, backend, mask):
    return torch.ops.dagan_fast.warp_occlusion_backward(grad, x, grid, occ, backend, list(mask))


def assert_grads_match(got, grad, x, grid, occ, mask, dtype=torch.float32):
    """The gradients asked for in ``mask`` are as accurate as PyTorch's (the spec, clamped grid included), the
    others empty."""
    shapes = (x.shape, grid.shape, None if occ is None else occ.shape)
    for i, (name, g) in enumerate(zip(WARP_GRADS, got)):
        if mask[i] and (i < 2 or occ is not None):
            assert g.dtype == dtype and g.is_contiguous() and g.shape == shapes[i], name
            assert torch.isfinite(g).all(), f"{name}: unwritten (NaN poison) or non-finite"
        else:
            assert g.shape == (0,), name
    assert_warp_accurate(x, grid, occ, grads=got, grad_out=grad, name=str(mask))


@triton_only
@pytest.mark.parametrize("with_occ", [True, False])
def test_triton_backward_masks_and_multi_block_shapes(with_occ, poison_outputs):
    # 37*29 pixels: two pixel tiles, the second partial; 11 channels: a full and a partial channel chunk
    x, grid, occ = make_inputs(2, 11, 9, 13, 37, 29, spread=1.2, seed=21, occlusion=with_occ)
    grad = torch.randn(2, 11, 37, 29, generator=torch.Generator().manual_seed(22))
    out = warp_occlusion(x, grid, occ, backend="triton")
    assert_warp_accurate(x, grid, occ, out=out)
    for mask in MASKS:
        got = backward_op(grad, x, grid, occ, "triton", mask)
        assert_grads_match(got, grad, x, grid, occ, mask)


@triton_only
def test_triton_float64_matches_reference_to_rounding():
    x, grid, occ = make_inputs(2, 5, 7, 6, 9, 8, dtype=torch.float64, seed=23)
    grad = torch.randn(2, 5, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    assert_warp_accurate(x, grid, occ, out=warp_occlusion(x, grid, occ, backend="triton"))  # float64 rounding
    got = backward_op(grad, x, grid, occ, "triton", (True, True, True))
    assert_grads_match(got, grad, x, grid, occ, (True,) * 3, dtype=torch.float64)


@triton_only
def test_triton_layouts_backward():
    x, grid, occ = make_inputs(2, 8, 12, 10, 9, 11, seed=25)
    grad = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(26))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_sliced = torch.randn(2, 16, 12, 20)[:, ::2, :, ::2]
    x_sliced.copy_(x)
    grid_nc = grid.transpose(1, 2).contiguous().transpose(1, 2)
    occ_nc = occ.expand(2, 3, 9, 11)[:, 1:2]
    grad_cl = grad.contiguous(memory_format=torch.channels_last)
    for xi, gi in ((x_cl, grad_cl), (x_sliced, grad.transpose(2, 3).contiguous().transpose(2, 3))):
        assert not xi.is_contiguous() and not gi.is_contiguous()
        got = backward_op(gi, xi, grid_nc, occ_nc, "triton", (True,) * 3)
        assert_grads_match(got, grad, x, grid, occ, (True,) * 3)
    # grad_output of out.sum(): stride 0 everywhere
    ones = torch.ones(1, 1, 1, 1).expand(2, 8, 9, 11)
    got = backward_op(ones, x_cl, grid_nc, occ_nc, "triton", (True,) * 3)
    assert_grads_match(got, ones, x, grid, occ, (True,) * 3)


@triton_only
def test_triton_boundary_far_and_inf_grids_backward(poison_outputs):
    x, _, occ = make_inputs(2, 5, 6, 7, 8, 9, seed=27)
    values = torch.tensor([-1e6, -50.0, -3.0, -1.0 - 2 / 7, -1.0 - 1 / 7, -1.0, -1 + 1 / 7, 0.0, 1 - 1 / 7, 1.0,
                           1 + 1 / 7, 1 + 2 / 7, 3.0, 50.0, 1e6, float("inf"), float("-inf")])
    g = torch.Generator().manual_seed(28)
    grid = values[torch.randint(len(values), (2, 8, 9, 2), generator=g)]
    grid[:, :4] = (torch.rand(2, 4, 9, 2, generator=g) * 2 - 1) * 1.2  # some ordinary points too
    grad = torch.randn(2, 5, 8, 9, generator=g)
    got = backward_op(grad, x, grid, occ, "triton", (True,) * 3)
    assert_grads_match(got, grad, x, grid, occ, (True,) * 3)
    outside = (grid.abs() > 1 + 2 / 6).any(-1)  # every tap outside: no value, no gradient
    assert outside.any() and (got[1][outside] == 0).all() and (got[2][:, 0][outside] == 0).all()


@triton_only
def test_triton_occlusion_exactly_zero_and_one_backward():
    x, grid, _ = make_inputs(2, 6, 8, 8, 8, 8, seed=29)
    grad = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(30))
    zeros, ones = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    gi, gg, go = backward_op(grad, x, grid, zeros, "triton", (True,) * 3)
    assert (gi == 0).all() and (gg == 0).all()
    assert_warp_accurate(x, grid, zeros, grads=(None, None, go), grad_out=grad, name="zeros")
    got = backward_op(grad, x, grid, ones, "triton", (True,) * 3)
    assert_warp_accurate(x, grid, None, grads=got[:2], grad_out=grad, name="ones")


@triton_only
def test_triton_float16_channels_last_without_occlusion():
    x, grid, _ = make_inputs(2, 9, 10, 12, 7, 8, dtype=torch.float16, seed=31, occlusion=False)
    x = x.contiguous(memory_format=torch.channels_last)
    out = warp_occlusion(x, grid, None, backend="triton")
    assert out.dtype == torch.float16
    grad = torch.randn(2, 9, 7, 8, generator=torch.Generator().manual_seed(32)).half()
    gi, gg, go = backward_op(grad, x, grid, None, "triton", (True, True, True))
    assert gi.dtype == gg.dtype == torch.float16 and go.shape == (0,)
    assert_warp_accurate(x, grid, None, out=out, grads=(gi, gg, go), grad_out=grad)


@triton_only
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_gpu_block_plan_under_interpreter(monkeypatch, poison_outputs, channels_last):
    """The GPU heuristic (small tiles, channels split across programs) run by the interpreter."""
    from dagan_fast.ops.triton import warp as triton_warp

    monkeypatch.setattr(triton_warp, "_interpreting", lambda t: False)
    monkeypatch.setattr(triton_warp, "_target_programs", lambda device: 64)
    x, grid, occ = make_inputs(2, 19, 9, 13, 11, 7, spread=1.2, seed=33)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plan = triton_warp._Plan(x, grid, split_channels=True)
    assert plan.grid[2] > 1 or channels_last  # NCHW: 19 channels over several programs
    assert triton_warp._Plan(x, grid, split_channels=False).grid[2] == 1
    assert_warp_accurate(x, grid, occ, out=warp_occlusion(x, grid, occ, backend="triton"))
    grad = torch.randn(2, 19, 11, 7, generator=torch.Generator().manual_seed(34))
    for mask in ((True, True, True), (True, False, False)):  # the second splits channels across programs
        got = backward_op(grad, x, grid, occ, "triton", mask)
        assert_grads_match(got, grad, x, grid, occ, mask)


@triton_only
def test_triton_backward_alerts_in_deterministic_mode():
    from dagan_fast.ops.triton import warp as triton_warp

    triton_warp._alert_not_deterministic()  # deterministic mode off: silent
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            triton_warp._alert_not_deterministic()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            triton_warp._alert_not_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_fused_warp_module(backend):
    x, grid, occ = make_inputs(2, 4, 7, 9, 6, 5, seed=35)
    warp = FusedWarp(backend=backend)
    assert isinstance(warp, torch.nn.Module) and repr(warp) == f"FusedWarp(backend={backend!r})"
    assert dagan_fast.nn.FusedWarp is FusedWarp
    leaves = [t.clone().requires_grad_() for t in (x, grid, occ)]
    out = warp(*leaves)
    assert_warp_accurate(x, grid, occ, out=out)
    assert_warp_accurate(x, grid, None, out=warp(x, grid))
    out.backward(torch.ones_like(out))
    assert_warp_accurate(x, grid, occ, grads=[t.grad for t in leaves], grad_out=torch.ones_like(out))


@gpu
def test_cuda_matches_reference():
    x, grid, occ = (t.cuda() for t in make_inputs(2, 19, 33, 31, 29, 37))
    leaves = [t.clone().requires_grad_() for t in (x, grid, occ)]
    out = warp_occlusion(*leaves, backend="cuda")
    g = torch.randn_like(out)
    out.backward(g)
    # against float64 on the same device, with PyTorch's float32 error there as the yardstick
    assert_warp_accurate(x, grid, occ, out=out.detach(), grads=[t.grad for t in leaves], grad_out=g, name="cuda")
