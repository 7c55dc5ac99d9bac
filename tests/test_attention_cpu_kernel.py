"""The C++ CPU flash-attention kernels (torch.ops.dagan_fast.cross_modal_attention_fwd/_bwd) against the
reference and naive materialised attention; they also run the online-softmax math of
csrc/common/online_softmax.h that the CUDA kernel shares."""
from __future__ import annotations

import pytest
import torch

from dagan_fast.ops._extension import has_kernel
from dagan_fast.ops import attention_with_lse, cross_modal_attention
from _tolerance import assert_as_accurate, attention_references

pytestmark = pytest.mark.skipif(not has_kernel("cross_modal_attention_fwd", "CPU"),
                                reason="the compiled library has no CPU attention kernel")

FWD = lambda *a: torch.ops.dagan_fast.cross_modal_attention_fwd(*a)  # noqa: E731
BWD = lambda *a: torch.ops.dagan_fast.cross_modal_attention_bwd(*a)  # noqa: E731
MASKS = [[True, True, True], [True, False, False], [False, True, False], [False, False, True], [False, True, True]]


def make_qkv(B, H, Nq, Nk, Dqk, Dv, *, dtype=torch.float32, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, Dqk, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = (torch.randn(B, H, Nk, Dqk, generator=g, dtype=torch.float64) * spread).to(dtype)
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


# Forward blocks are 128 queries x 512 keys, backward blocks 128 x 256: these cross them unevenly.
SHAPES = [
    (1, 1, 1, 1, 16, 16),        # N = 1
    (2, 1, 97, 131, 32, 256),    # DaGAN's Dqk=32, Dv=256 at prime N
    (1, 3, 200, 64, 16, 48),     # Dv != Dqk, Nq != Nk
    (2, 2, 5, 300, 64, 8),
    (1, 1, 257, 1031, 8, 24),    # 3 query blocks, 3 / 5 key blocks with ragged tails
    (1, 2, 130, 1, 4, 3),        # a single key
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_forward_matches_reference_and_materialised(shape, scale):
    q, k, v = make_qkv(*shape)
    out, lse = FWD(q, k, v, scale)
    assert out.shape == (*shape[:3], shape[5]) and out.dtype == torch.float32
    assert lse.shape == shape[:3] and lse.dtype == torch.float32
    truth, fp32, mags = attention_references(q, k, v, None, scale)
    for name in ("out", "lse"):
        assert_as_accurate((out, lse)[name == "lse"], truth[name], fp32[name], magnitude=mags[name], name=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", MASKS)
def test_backward_matches_materialised(shape, mask):
    q, k, v = make_qkv(*shape, seed=3)
    scale = 0.7
    out, lse = FWD(q, k, v, scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = BWD(grad, q, k, v, out, lse, scale, mask)
    truth, fp32, mags = attention_references(q, k, v, grad, scale)
    for name, want, got, like in zip(("dq", "dk", "dv"), mask, grads, (q, k, v)):
        if not want:
            assert got.numel() == 0, name
            continue
        assert got.shape == like.shape and got.dtype == like.dtype, name
        # with one key dq and dk are exactly zero: the term-magnitude floor, not |expected|, bounds them there
        assert_as_accurate(got, truth[name], fp32[name], magnitude=mags[name], name=name)


def test_gradcheck_float64():
    for shape in [(2, 2, 7, 9, 5, 3), (1, 1, 1, 1, 2, 2), (1, 1, 3, 1, 2, 4)]:
        q, k, v = make_qkv(*shape, dtype=torch.float64)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: cross_modal_attention(a, b, c, 0.7, backend="cpu"), leaves)
    only_v = lambda c: cross_modal_attention(q.detach(), k.detach(), c, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(only_v, (v,))


def test_lse_is_float64_for_float64_inputs():
    q, k, v = make_qkv(1, 2, 9, 11, 4, 5, dtype=torch.float64)
    out, lse = FWD(q, k, v, 0.5)
    assert out.dtype == lse.dtype == torch.float64
    truth, _, mags = attention_references(q, k, v, None, 0.5, torch.float64)
    assert_as_accurate(lse, truth["lse"], None, magnitude=mags["lse"], name="lse")  # float64 rounding only


def test_large_logits_do_not_overflow():
    q, k, v = make_qkv(1, 1, 300, 700, 32, 256, spread=4.0)  # DaGAN: scale 1, energies well above 20
    assert torch.matmul(q, k.transpose(-1, -2)).abs().max() > 200
    out, lse = FWD(q, k, v, 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grad = torch.randn_like(out)
    truth, fp32, mags = attention_references(q, k, v, grad, 1.0)
    assert_as_accurate(out, truth["out"], fp32["out"], magnitude=mags["out"], name="out")
    assert_as_accurate(lse, truth["lse"], fp32["lse"], magnitude=mags["lse"], name="lse")
    grads = BWD(grad, q, k, v, out, lse, 1.0, [True, True, True])
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_as_accurate(g, truth[name], fp32[name], magnitude=mags[name], name=name)


@pytest.mark.parametrize("rising", [True, False])
def test_running_max_moves_across_key_blocks(rising):
    # Scores that rise (or fall) key block after key block: every block rescales the accumulator
    # (or none does), the two branches of the online-softmax step.
    q, k, v = make_qkv(1, 1, 40, 1500, 8, 16)
    direction = q.mean(2, keepdim=True)
    ramp = torch.linspace(-3.0, 3.0, 1500) if rising else torch.linspace(3.0, -3.0, 1500)
    k = k * 0.1 + direction * ramp.view(1, 1, -1, 1)
    out, lse = FWD(q, k, v, 1.0)
    truth, fp32, mags = attention_references(q, k, v, None, 1.0)
    assert_as_accurate(out, truth["out"], fp32["out"], magnitude=mags["out"], name="out")
    assert_as_accurate(lse, truth["lse"], fp32["lse"], magnitude=mags["lse"], name="lse")


def test_non_contiguous_inputs():
    q, k, v = make_qkv(2, 1, 140, 300, 8, 16)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    kt = torch.randn(2, 1, 300, 16)[..., ::2]
    kt.copy_(k)
    vt = torch.randn(2, 3, 300, 16)[:, 1:2]
    vt.copy_(v)
    assert not (qt.is_contiguous() or kt.is_contiguous() or vt.is_contiguous())
    out, lse = FWD(qt, kt, vt, 0.5)
    ref_out, ref_lse = FWD(q, k, v, 0.5)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    grad = torch.randn(2, 1, 140, 32)[..., ::2]
    grads = BWD(grad, qt, kt, vt, out, lse, 0.5, [True, True, True])
    ref_grads = BWD(grad.contiguous(), q, k, v, ref_out, ref_lse, 0.5, [True, True, True])
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype):
    q, k, v = make_qkv(1, 2, 150, 600, 32, 48, dtype=dtype)
    out, lse = FWD(q, k, v, 1.0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    out32, lse32 = FWD(q.float(), k.float(), v.float(), 1.0)
    assert torch.equal(out, out32.to(dtype)) and torch.equal(lse, lse32)
    grad = torch.randn_like(out)
    grads = BWD(grad, q, k, v, out, lse, 1.0, [True, True, True])
    grads32 = BWD(grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 1.0, [True, True, True])
    for a, b in zip(grads, grads32):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))


def test_poisoned_outputs_are_fully_written(poison_outputs):
    q, k, v = make_qkv(2, 3, 131, 517, 16, 40)
    out, lse = FWD(q, k, v, 0.9)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grad = torch.randn_like(out)
    for mask in MASKS:
        for g, want in zip(BWD(grad, q, k, v, out, lse, 0.9, mask), mask):
            assert g.numel() > 0 if want else g.numel() == 0
            assert torch.isfinite(g).all()
    q1 = q[:1, :1]  # one head: dQ goes through the per-split partial buffers
    out, lse = FWD(q1, k[:1, :1], v[:1, :1], 0.9)
    for g in BWD(grad[:1, :1], q1, k[:1, :1], v[:1, :1], out, lse, 0.9, [True, True, True]):
        assert torch.isfinite(g).all()


def test_batch_zero_and_no_queries():
    q, k, v = make_qkv(0, 1, 5, 7, 4, 6)
    out, lse = FWD(q, k, v, 1.0)
    assert out.shape == (0, 1, 5, 6) and lse.shape == (0, 1, 5)
    q, k, v = make_qkv(1, 2, 0, 7, 4, 6)
    out, lse = FWD(q, k, v, 1.0)
    dq, dk, dv = BWD(torch.randn_like(out), q, k, v, out, lse, 1.0, [True, True, True])
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_two_runs_are_bitwise_equal():
    for B in (1, 3):  # one head splits dQ over threads; three heads do not (on 2 threads)
        q, k, v = make_qkv(B, 1, 300, 900, 16, 24)
        first = FWD(q, k, v, 0.8)
        second = FWD(q, k, v, 0.8)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        grad = torch.randn_like(first[0])
        g1 = BWD(grad, q, k, v, *first, 0.8, [True, True, True])
        g2 = BWD(grad, q, k, v, *first, 0.8, [True, True, True])
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_thread_count_changes_only_rounding():
    q, k, v = make_qkv(1, 1, 200, 800, 16, 24)
    out, lse = FWD(q, k, v, 0.8)
    grad = torch.randn_like(out)
    many = BWD(grad, q, k, v, out, lse, 0.8, [True, True, True])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = BWD(grad, q, k, v, out, lse, 0.8, [True, True, True])
    finally:
        torch.set_num_threads(threads)
    truth, fp32, mags = attention_references(q, k, v, grad, 0.8)
    for name, a, b in zip(("dq", "dk", "dv"), many, one):  # both as accurate as PyTorch; not necessarily equal
        assert_as_accurate(a, truth[name], fp32[name], magnitude=mags[name], name=f"{name} threads={threads}")
        assert_as_accurate(b, truth[name], fp32[name], magnitude=mags[name], name=f"{name} one thread")


def test_autograd_through_the_cpu_backend():
    q, k, v = make_qkv(2, 1, 97, 131, 32, 256, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_with_lse(*leaves, 1.0, backend="cpu")
    grad = torch.randn_like(out)
    out.backward(grad)
    truth, fp32, mags = attention_references(q, k, v, grad, 1.0)
    for name, a in zip(("dq", "dk", "dv"), leaves):
        assert_as_accurate(a.grad, truth[name], fp32[name], magnitude=mags[name], name=name)


def _good():
    return make_qkv(2, 1, 6, 5, 4, 3)


@pytest.mark.parametrize("args", [
    lambda q, k, v: (q[0], k, v, 1.0),
    lambda q, k, v: (q, k[..., :3], v, 1.0),
    lambda q, k, v: (q, k, v[:, :, :4], 1.0),
    lambda q, k, v: (q, k[:1], v[:1], 1.0),
    lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], 1.0),
    lambda q, k, v: (q, k, v[..., :0], 1.0),
    lambda q, k, v: (q.long(), k.long(), v.long(), 1.0),
    lambda q, k, v: (q, k.double(), v, 1.0),
    lambda q, k, v: (q, k, v, float("nan")),
])
def test_bad_forward_arguments_raise(args):
    with pytest.raises(RuntimeError):
        FWD(*args(*_good()))


@pytest.mark.parametrize("args", [
    lambda g, q, k, v, o, l: (g[..., :2], q, k, v, o, l),
    lambda g, q, k, v, o, l: (g, q, k, v, o[:, :, :3], l),
    lambda g, q, k, v, o, l: (g.double(), q, k, v, o, l),
    lambda g, q, k, v, o, l: (g, q, k, v, o, l[..., :2]),
    lambda g, q, k, v, o, l: (g, q, k, v, o, l[0]),
    lambda g, q, k, v, o, l: (g, q, k, v, o, l.long()),
    lambda g, q, k, v, o, l: (g, q, k[:, :, :3], v, o, l),
])
def test_bad_backward_arguments_raise(args):
    q, k, v = _good()
    out, lse = FWD(q, k, v, 1.0)
    with pytest.raises(RuntimeError):
        BWD(*args(torch.randn_like(out), q, k, v, out, lse), 1.0, [True, True, True])
