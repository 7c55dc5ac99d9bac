"""The C++ CPU warp_occlusion kernel (csrc/cpu/warp_occlusion.cpp) against F.grid_sample * occlusion:
its float32 AVX2 path (row-pair loads, vectorised taps) and its generic path (other dtypes, or
DAGAN_FAST_WARP_SCALAR=1), layouts, awkward shapes, determinism, poisoning and argument checks."""
from __future__ import annotations

import pytest
import torch

from dagan_fast.ops import warp_occlusion
from conftest import compiled_backends_for
from _tolerance import assert_rounding_close, assert_warp_accurate, warp_magnitudes

pytestmark = pytest.mark.skipif("cpu" not in compiled_backends_for("warp_occlusion"),
                                reason="compiled CPU kernels not built")

fwd_op = torch.ops.dagan_fast.warp_occlusion_fwd
bwd_op = torch.ops.dagan_fast.warp_occlusion_bwd


def make_inputs(B, C, Hi, Wi, Ho, Wo, *, spread=1.2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, Hi, Wi, generator=g, dtype=torch.float64).to(dtype)
    grid = ((torch.rand(B, Ho, Wo, 2, generator=g, dtype=torch.float64) * 2 - 1) * spread).to(dtype)
    occ = torch.rand(B, 1, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    return x, grid, occ


def grads(fn, tensors, grad_out):
    """Output and gradients of fn(*tensors) for grad_out, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def ours(x, grid, occ):
    return warp_occlusion(x, grid, occ, backend="cpu")


@pytest.fixture
def scalar_path(monkeypatch):
    """Forces the generic (non-AVX2) float32 code."""
    monkeypatch.setenv("DAGAN_FAST_WARP_SCALAR", "1")


# C not a multiple of 8 (the vector width); Wo not a multiple of 8 or of the 64-pixel tile.
CASES = [
    (1, 1, 1, 1, 1, 1),
    (1, 3, 1, 1, 3, 5),
    (2, 5, 1, 7, 3, 11),    # one input row: both row taps clamp to it
    (1, 8, 7, 1, 5, 9),     # one input column: no row pairs, gather path
    (2, 17, 13, 11, 7, 67),
    (1, 64, 23, 29, 19, 31),
    (1, 256, 16, 16, 9, 70),
    (2, 9, 150, 170, 11, 70),  # planes beyond L2: channel-blocked passes over a taps table
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("generic", [False, True])
def test_forward_and_backward_match_reference(case, generic, monkeypatch, poison_outputs):
    if generic:
        monkeypatch.setenv("DAGAN_FAST_WARP_SCALAR", "1")
    B, C, Hi, Wi, Ho, Wo = case
    x, grid, occ = make_inputs(*case, seed=sum(case))
    g_out = torch.randn(B, C, Ho, Wo, generator=torch.Generator().manual_seed(3))
    got = grads(ours, (x, grid, occ), g_out)
    assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=g_out)


@pytest.mark.parametrize("C", [1, 3, 5, 8, 17, 64, 256])
def test_channel_counts_without_occlusion(C, poison_outputs):
    x, grid, _ = make_inputs(2, C, 12, 10, 9, 13, seed=C)
    g_out = torch.randn(2, C, 9, 13, generator=torch.Generator().manual_seed(C))
    got = grads(lambda a, b: warp_occlusion(a, b, None, backend="cpu"), (x, grid), g_out)
    assert_warp_accurate(x, grid, None, out=got[0], grads=got[1:], grad_out=g_out)


def test_gradcheck_float64():
    x, grid, occ = make_inputs(2, 3, 5, 7, 4, 6, dtype=torch.float64, spread=1.1, seed=11)
    inputs = [t.requires_grad_() for t in (x, grid, occ)]
    assert torch.autograd.gradcheck(ours, inputs)
    assert torch.autograd.gradcheck(lambda a, b: warp_occlusion(a, b, None, backend="cpu"), inputs[:2])


@pytest.mark.parametrize("C", [3, 17])
def test_layouts_and_strides_read_in_place(C):
    """channels_last, sliced and transposed operands, and an expanded (stride-0) grad_output."""
    x, grid, occ = make_inputs(2, C, 12, 19, 9, 23, seed=C)
    layouts = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": torch.randn(2, 2 * C, 12, 38)[:, ::2, :, ::2].copy_(x),
        "transposed_rows": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    grid_nc = grid.transpose(1, 2).contiguous().transpose(1, 2)
    occ_nc = occ.expand(2, 3, 9, 23)[:, 1:2]
    g_out = torch.randn(2, C, 9, 23, generator=torch.Generator().manual_seed(1))
    for name, xi in layouts.items():
        assert not xi.is_contiguous(), name
        got = grads(ours, (xi, grid_nc, occ_nc), g_out)
        assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=g_out, name=name)
    occ_t = occ.transpose(2, 3).contiguous().transpose(2, 3)  # occlusion strided along x, grid contiguous
    got = grads(ours, (layouts["sliced"], grid, occ_t), g_out)
    assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=g_out, name="occlusion strided")
    expanded = torch.ones(()).expand(2, C, 9, 23)  # what out.sum().backward() sends
    got = grads(ours, (layouts["channels_last"], grid, occ), expanded)
    assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=expanded, name="expanded grad")


@pytest.mark.parametrize("channels_last", [False, True])
def test_avx2_and_generic_paths_agree_bitwise_forward(channels_last, monkeypatch):
    """Same IEEE operations in the same order: the forward and grad_occlusion are bit-identical."""
    x, grid, occ = make_inputs(2, 19, 31, 37, 29, 41, spread=1.3, seed=4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g_out = torch.randn(2, 19, 29, 41, generator=torch.Generator().manual_seed(4))
    fast = grads(ours, (x, grid, occ), g_out)
    monkeypatch.setenv("DAGAN_FAST_WARP_SCALAR", "1")
    slow = grads(ours, (x, grid, occ), g_out)
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[3], slow[3])
    mags = warp_magnitudes(x, grid, occ, g_out)
    for name, a, b in zip(("input", "grid"), fast[1:3], slow[1:3]):  # summation order may differ: close, not equal
        assert_rounding_close(a, b, magnitude=mags[name], name=name)


@pytest.mark.parametrize("case", [(3, 16, 20, 20, 24, 24), (1, 3, 40, 40, 64, 70), (2, 1, 9, 9, 30, 33)])
def test_two_runs_and_thread_counts_are_bitwise_equal(case):
    x, grid, occ = make_inputs(*case, spread=0.6, seed=2)  # many output pixels share taps
    g_out = torch.randn(case[0], case[1], case[4], case[5], generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        runs = [grads(ours, (x, grid, occ), g_out) for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(grads(ours, (x, grid, occ), g_out))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float32_reference(dtype, poison_outputs):
    x, grid, occ = make_inputs(2, 9, 10, 12, 7, 13, dtype=dtype, seed=6)
    g_out = torch.randn(2, 9, 7, 13, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = grads(ours, (x, grid, occ), g_out)
    for name, a in zip(("out", "input", "grid", "occlusion"), got):
        assert a.dtype == dtype, name
    # against PyTorch computing in float32 and rounding once to dtype, as the kernel does
    assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=g_out)


def test_far_out_of_range_inf_and_border_grids(poison_outputs):
    x, _, occ = make_inputs(2, 5, 6, 7, 4, 9)
    values = torch.tensor([-1e6, -50.0, -1.0 - 1 / 7, -1.0, -1 + 1 / 7, 0.0, 1 - 1 / 7, 1.0, 1 + 1 / 7, 50.0, 1e6,
                           float("inf"), float("-inf")])
    idx = torch.randint(len(values), (2, 4, 9, 2), generator=torch.Generator().manual_seed(3))
    grid = values[idx]
    out = fwd_op(x, grid, occ)
    assert torch.isfinite(out).all()
    assert_warp_accurate(x, grid, occ, out=out)  # the reference clamps the grid: inf reads zeros
    gi, gg, go = bwd_op(torch.randn_like(out), x, grid, occ, [True, True, True])
    assert torch.isfinite(gi).all() and torch.isfinite(gg).all() and torch.isfinite(go).all()


@pytest.mark.parametrize("generic", [False, True])
def test_values_next_to_the_taps_are_never_weighted(generic, monkeypatch):
    """inf in pixels that are not taps but share an 8-byte row pair with one (the AVX2 path loads
    pairs clamped inside the row) must not turn into NaN: invalid taps are masked, never
    multiplied by zero."""
    if generic:
        monkeypatch.setenv("DAGAN_FAST_WARP_SCALAR", "1")
    Hi, Wi = 5, 6
    x = torch.randn(1, 3, Hi, Wi)
    # (ix, iy) in pixel units: ix in (-1, 0) reads only column 0; ix in (Wi-1, Wi) only column Wi-1;
    # iy in (-1, 0) only row 0; iy in (Hi-1, Hi) only row Hi-1; a point far outside reads nothing.
    pts = torch.tensor([[-0.4, 2.3], [Wi - 0.7, 1.2], [2.5, -0.6], [2.2, Hi - 0.8], [-5.0, 30.0]])
    grid = torch.stack([(2 * pts[:, 0] + 1) / Wi - 1, (2 * pts[:, 1] + 1) / Hi - 1], -1).view(1, 1, -1, 2)
    poisoned = x.clone()
    poisoned[:, :, :, 1] = float("inf")         # beside column 0
    poisoned[:, :, :, Wi - 2] = float("inf")    # beside column Wi-1
    clean = x.clone()
    clean[torch.isinf(poisoned)] = 0.0
    out = fwd_op(poisoned, grid, None)
    assert torch.isfinite(out).all()
    assert_warp_accurate(clean, grid, None, out=out)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (1, 2, 1, 1, 7, 5), (3, 7, 13, 17, 11, 19), (1, 3, 2, 2, 1, 1)])
def test_awkward_shapes(shape):
    x, grid, occ = make_inputs(*shape, spread=1.5, seed=7)
    g_out = torch.randn(shape[0], shape[1], shape[4], shape[5], generator=torch.Generator().manual_seed(7))
    got = grads(ours, (x, grid, occ), g_out)
    assert_warp_accurate(x, grid, occ, out=got[0], grads=got[1:], grad_out=g_out)


def test_backward_partial_masks_return_empty_tensors(poison_outputs):
    x, grid, occ = make_inputs(2, 4, 6, 6, 5, 5)
    g_out = torch.randn(2, 4, 5, 5)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = bwd_op(g_out, x, grid, occ, mask)
        for keep, a in zip(mask, got):
            assert (a.numel() > 0) == keep
        assert_warp_accurate(x, grid, occ, grads=got, grad_out=g_out, name=str(mask))


BAD_CALLS = [
    ("input must be", lambda x, g, o: fwd_op(x[0], g, o)),
    ("grid must be", lambda x, g, o: fwd_op(x, g[..., :1], o)),
    ("grid must be", lambda x, g, o: fwd_op(x, g[0], o)),
    ("grid batch", lambda x, g, o: fwd_op(x, g[:1], o[:1])),
    ("occlusion must be", lambda x, g, o: fwd_op(x, g, o[:, :, :2])),
    ("occlusion must be", lambda x, g, o: fwd_op(x, g, o.expand(2, 2, 4, 3))),
    ("at least 1x1", lambda x, g, o: fwd_op(x[:, :, :0], g, o)),
    ("grid dtype", lambda x, g, o: fwd_op(x, g.double(), o)),
    ("occlusion dtype", lambda x, g, o: fwd_op(x, g, o.double())),
    ("grad_output must be", lambda x, g, o: bwd_op(torch.zeros(2, 3, 4, 4), x, g, o, [True, True, True])),
    ("grad_output must match", lambda x, g, o: bwd_op(torch.zeros(2, 3, 4, 3).double(), x, g, o, [True] * 3)),
]


@pytest.mark.parametrize("match, call", BAD_CALLS)
def test_compiled_op_rejects_bad_shapes(match, call):
    x, grid, occ = make_inputs(2, 3, 5, 6, 4, 3)
    with pytest.raises(RuntimeError, match=match):
        call(x, grid, occ)


def test_batch_and_channel_zero():
    x, grid, occ = make_inputs(0, 3, 5, 5, 4, 4)
    assert fwd_op(x, grid, occ).shape == (0, 3, 4, 4)
    x, grid, occ = make_inputs(2, 0, 5, 5, 4, 4)
    gi, gg, go = bwd_op(torch.zeros(2, 0, 4, 4), x, grid, occ, [True, True, True])
    assert gi.shape == x.shape and (gg == 0).all() and (go == 0).all()
