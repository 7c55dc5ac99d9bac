"""cross_modal_attention: every backend against naive materialised attention, forward and backward."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dagan_fast.ops import attention_with_lse, cross_modal_attention, reference
from conftest import backends_for, rel_err
from _tolerance import assert_as_accurate, assert_attention_accurate, assert_rounding_close, attention_magnitudes

BACKENDS = backends_for("cross_modal_attention")


def make_qkv(B, H, Nq, Nk, Dqk, Dv, *, dtype=torch.float32, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, Dqk, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = (torch.randn(B, H, Nk, Dqk, generator=g, dtype=torch.float64) * spread).to(dtype)
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


SHAPES = [
    (1, 1, 1, 1, 16, 16),
    (2, 1, 97, 131, 32, 256),   # DaGAN's Dqk=32, Dv=256 at prime N
    (1, 3, 200, 64, 16, 48),
    (2, 2, 5, 300, 64, 8),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_forward_matches_materialised(backend, shape, scale):
    q, k, v = make_qkv(*shape)
    out = cross_modal_attention(q, k, v, scale, backend=backend)
    assert out.shape == (*shape[:3], shape[5]) and out.dtype == q.dtype
    assert_attention_accurate(q, k, v, scale, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    q, k, v = make_qkv(1, 1, 256, 256, 32, 256, spread=4.0)  # DaGAN: scale 1, energies well above 20
    energies = torch.matmul(q, k.transpose(-1, -2))
    assert energies.abs().max() > 200
    out = cross_modal_attention(q, k, v, 1.0, backend=backend)
    assert torch.isfinite(out).all()
    # fp32 rounding of energies in the hundreds alone moves probabilities by ~2e-5 (relative): PyTorch too
    assert_attention_accurate(q, k, v, 1.0, out=out)


def test_logsumexp_is_returned_in_float32():
    q, k, v = make_qkv(2, 1, 33, 40, 8, 4, dtype=torch.float16)
    out, lse = attention_with_lse(q, k, v, 0.5, backend="reference")
    assert lse.dtype == torch.float32 and out.dtype == torch.float16
    assert_attention_accurate(q, k, v, 0.5, lse=lse, dtype=torch.float32)  # float32 math on the fp16 inputs


def test_query_blocks_do_not_change_results(monkeypatch):
    q, k, v = make_qkv(2, 1, 77, 51, 8, 12)
    whole = cross_modal_attention(q, k, v, backend="reference")
    monkeypatch.setattr(reference, "ATTENTION_BLOCK_ELEMENTS", 2 * 51 * 5)  # 5 query rows per block
    blocked = cross_modal_attention(q, k, v, backend="reference")
    scale = 8 ** -0.5
    assert_rounding_close(blocked, whole, magnitude=attention_magnitudes(q, k, v, None, scale)["out"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cross_modal_attention(*leaves, backend="reference").sum().backward()
    assert_attention_accurate(q, k, v, scale, out=blocked, grads=[t.grad for t in leaves],
                              grad_out=torch.ones_like(blocked))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_backward_matches_materialised(backend, shape):
    q, k, v = make_qkv(*shape, seed=4)
    grad = torch.randn(*shape[:3], shape[5], generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cross_modal_attention(*leaves, 1.0, backend=backend).backward(grad)
    assert_attention_accurate(q, k, v, 1.0, grads=[t.grad for t in leaves], grad_out=grad, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # the interpreter costs ~0.1 s a launch: fast mode (a few random directions) for triton
    fast = backend == "triton"
    q, k, v = make_qkv(2, 2, 7, 9, 5, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: cross_modal_attention(a, b, c, 0.7, backend=backend), leaves,
                                    fast_mode=fast)
    only_k = lambda b: cross_modal_attention(q.detach(), b, v.detach(), backend=backend)
    assert torch.autograd.gradcheck(only_k, (k,), fast_mode=fast)


def _skip_unsupported(backend, dtype):
    from dagan_fast.ops import _backends

    reasons = _backends.get_backend(backend).not_supported_reasons("cross_modal_attention", [torch.zeros(1, dtype=dtype)])
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_error_at_most_twice_pytorch(backend, dtype):
    _skip_unsupported(backend, dtype)
    q, k, v = make_qkv(1, 2, 64, 80, 32, 48, dtype=dtype)
    exact = reference.materialized_attention(q.double(), k.double(), v.double(), 1.0)
    ours = rel_err(cross_modal_attention(q, k, v, 1.0, backend=backend), exact)
    torch_same_dtype = rel_err(reference.materialized_attention(q, k, v, 1.0), exact)
    assert ours <= 2 * torch_same_dtype


def test_opcheck_custom_ops():
    q, k, v = make_qkv(2, 1, 6, 5, 4, 3, dtype=torch.float64)
    for backend in BACKENDS:
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.5, backend)
        torch.library.opcheck(torch.ops.dagan_fast.cross_modal_attention.default, args)
        out, lse = torch.ops.dagan_fast.cross_modal_attention(q.detach(), k.detach(), v.detach(), 0.5, backend)
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.dagan_fast.cross_modal_attention_backward.default,
                              (grad, q.detach(), k.detach(), v.detach(), out, lse, 0.5, backend, [True, True, True]))
        torch.library.opcheck(torch.ops.dagan_fast.cross_modal_attention_backward.default,
                              (grad, q.detach(), k.detach(), v.detach(), out, lse, 0.5, backend, [False, True, False]))


def test_batch_zero():
    q, k, v = make_qkv(0, 1, 5, 7, 4, 6)
    assert cross_modal_attention(q, k, v, backend="reference").shape == (0, 1, 5, 6)


def test_non_contiguous_inputs():
    q, k, v = make_qkv(2, 1, 40, 30, 8, 16)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    vt = torch.randn(2, 1, 30, 32)[..., ::2]
    vt.copy_(v)
    assert_attention_accurate(q, k, v, 8 ** -0.5, out=cross_modal_attention(qt, k, vt, backend="reference"))


_PEAK_SCRIPT = r"""
import json, sys, torch
from dagan_fast.ops import cross_modal_attention


def peak_rss_kib():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork time)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


torch.manual_seed(0)
n, d = int(sys.argv[1]), int(sys.argv[2])
q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
cross_modal_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="reference")  # load BLAS etc. first
base = peak_rss_kib()
out = cross_modal_attention(q, k, v, backend="reference")
peak = peak_rss_kib()
print(json.dumps({"extra_bytes": (peak - base) * 1024, "finite": bool(torch.isfinite(out).all())}))
"""


@pytest.mark.slow
def test_reference_peak_memory_is_linear_in_n():
    n, d = 16384, 64
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n), str(d)], capture_output=True, text=True,
                            check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    materialised = n * n * 4
    assert stats["finite"]
    # 1 GiB would be the N x N map alone. The blocks' peak varies with glibc's arenas under 2 OpenMP threads:
    # 57-142 MB measured over repeated runs on one machine, so the bound is a quarter of the map, not an eighth.
    assert stats["extra_bytes"] < materialised / 4, stats


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v: cross_modal_attention(q[0], k, v), ValueError, r"q must be 4-D"),
    (lambda q, k, v: cross_modal_attention(q, k[..., :3], v), ValueError, r"k's last dim \(Dqk\) must equal q's"),
    (lambda q, k, v: cross_modal_attention(q, k, v[:, :, :4]), ValueError, r"v must have as many keys"),
    (lambda q, k, v: cross_modal_attention(q, k[:1], v[:1]), ValueError, r"q, k, v must share \(B,H\)"),
    (lambda q, k, v: cross_modal_attention(q, k[:, :, :0], v[:, :, :0]), ValueError, r"at least one key"),
    (lambda q, k, v: cross_modal_attention(q.long(), k, v), TypeError, r"q must be a floating tensor"),
    (lambda q, k, v: cross_modal_attention(q, k.half(), v), TypeError, r"k has dtype torch.float16"),
    (lambda q, k, v: cross_modal_attention(q, k, v, scale=float("nan")), ValueError, r"scale must be finite"),
    (lambda q, k, v: cross_modal_attention(q, k, v, scale=torch.tensor(1.0)), TypeError, r"scale must be"),
    (lambda q, k, v: cross_modal_attention(q, k, v.index_fill(2, torch.tensor([0]), float("inf"))), ValueError,
     r"v contains \d+ NaN or inf"),
    (lambda q, k, v: cross_modal_attention(q, k, v, backend="cuda"), Exception, r"backend='cuda' cannot run"),
])
def test_bad_input_errors_name_the_argument(call, error, match):
    q, k, v = make_qkv(2, 1, 6, 5, 4, 3)
    with pytest.raises(error, match=match):
        call(q, k, v)


# --------------------------------------------------------------------------------------------
# awkward shapes, strides, poisoning, determinism (every backend; the triton ones run through the
# interpreter, so N stays small)
# --------------------------------------------------------------------------------------------
def _grads(backend, q, k, v, scale, grad, **epilogue):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    extra = {name: t.detach().clone().requires_grad_() for name, t in epilogue.items()}
    out = cross_modal_attention(*leaves, scale, backend=backend, **extra)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves], {name: t.grad for name, t in extra.items()}


def _exact_grads(q, k, v, scale, grad, residual=None, gamma=None, dtype=torch.float64):
    """The naive formulation through PyTorch's autograd in ``dtype`` (float64: the ground truth)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    extra = {name: t.detach().to(dtype).requires_grad_() for name, t in (("residual", residual), ("gamma", gamma))
             if t is not None}
    out = reference.attention_residual(reference.materialized_attention(*leaves, scale), **extra)
    out.backward(grad.to(dtype))
    return out.detach(), [t.grad for t in leaves], {name: t.grad for name, t in extra.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 32, 256),       # N = 1 on both sides
    (1, 1, 3, 70, 128, 20),      # Dqk 128, keys past one tile, Dv not a power of two
    (1, 1, 17, 5, 256, 512),     # Dqk 256, Dv 512 (four Dv slices in the Triton kernels)
    (2, 1, 66, 1, 64, 33),       # one key: dq and dk are exactly zero
])
def test_head_dims_and_tiny_n(backend, shape):
    q, k, v = make_qkv(*shape, seed=7)
    grad = torch.randn(*shape[:3], shape[5], generator=torch.Generator().manual_seed(2))
    out, grads, _ = _grads(backend, q, k, v, 0.2, grad)
    # a single key: the softmax is constant, so dq and dk are zero up to the rounding of dP - delta,
    # which the term-magnitude floor bounds
    assert_attention_accurate(q, k, v, 0.2, out=out, grads=grads, grad_out=grad, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_backward(backend):
    q, k, v = make_qkv(1, 1, 40, 70, 32, 256, spread=3.0, seed=3)  # energies far above 20 at scale 1
    assert torch.matmul(q, k.transpose(-1, -2)).abs().max() > 100
    grad = torch.randn(1, 1, 40, 256, generator=torch.Generator().manual_seed(5))
    _, grads, _ = _grads(backend, q, k, v, 1.0, grad)
    # the float32 rounding of energies in the hundreds alone is ~1e-5 of the probabilities: PyTorch's too
    assert_attention_accurate(q, k, v, 1.0, grads=grads, grad_out=grad, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_gradients_at_most_twice_pytorch(backend):
    _skip_unsupported(backend, torch.float16)
    q, k, v = make_qkv(1, 2, 50, 70, 32, 48, dtype=torch.float16, seed=11)
    grad = torch.randn(1, 2, 50, 48, generator=torch.Generator().manual_seed(3)).half()
    _, ours, _ = _grads(backend, q, k, v, 1.0, grad)
    _, exact, _ = _exact_grads(q, k, v, 1.0, grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference.materialized_attention(*leaves, 1.0).backward(grad)  # PyTorch doing the same in float16
    for name, a, t, b in zip("qkv", ours, leaves, exact):
        assert a.dtype == torch.float16
        assert rel_err(a, b) <= 2 * rel_err(t.grad, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_every_backend(backend):
    q, k, v = make_qkv(2, 2, 40, 30, 16, 24, seed=9)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)              # Dqk-major
    kt = k.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)      # tokens outermost
    vt = torch.randn(2, 2, 30, 48)[..., ::2]                         # stride 2 along Dv
    vt.copy_(v)
    grad = torch.randn(2, 2, 48, 40).transpose(2, 3)[..., ::2]       # strided grad_out
    out, grads, _ = _grads(backend, qt, kt, vt, 0.4, grad)
    assert_attention_accurate(q, k, v, 0.4, out=out, grads=grads, grad_out=grad, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_outputs_are_fully_written_and_reproducible(backend, poison_outputs):
    q, k, v = make_qkv(2, 1, 67, 45, 32, 144, seed=13)  # Dv 144: a partial Dv slice
    grad = torch.randn(2, 1, 67, 144, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        out, lse = torch.ops.dagan_fast.cross_modal_attention(q, k, v, 1.0, backend)
        grads = torch.ops.dagan_fast.cross_modal_attention_backward(grad, q, k, v, out, lse, 1.0, backend,
                                                                     [True, True, True])
        only_v = torch.ops.dagan_fast.cross_modal_attention_backward(grad, q, k, v, out, lse, 1.0, backend,
                                                                      [False, False, True])
        assert only_v[0].numel() == 0 and only_v[1].numel() == 0
        runs.append((out, lse, *grads, only_v[2]))
    for t in runs[0]:
        assert torch.isfinite(t).all()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][-1], runs[0][-2])  # dv alone equals dv computed with dq and dk


# --------------------------------------------------------------------------------------------
# the epilogue: gamma * attention + residual (DaGAN), attention + residual (DaGAN++)
# --------------------------------------------------------------------------------------------
def _token_residual(B, N, C, *, channels_last=False, seed=0):
    """A (B,C,H,W) feature map seen as (B,1,N,C) tokens: a strided view, as DaGAN adds it."""
    feat = torch.randn(B, C, N, 1, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    return feat, feat.flatten(2).transpose(1, 2).unsqueeze(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_gamma", [True, False])
def test_epilogue_values_and_layout(backend, with_gamma):
    q, k, v = make_qkv(2, 1, 37, 37, 16, 40, seed=21)
    gamma = torch.tensor([0.7]) if with_gamma else None
    for channels_last in (False, True):
        feat, residual = _token_residual(2, 37, 40, channels_last=channels_last)
        exact, fp32 = (reference.attention_residual(reference.materialized_attention(q.to(d), k.to(d), v.to(d), 1.0),
                                                    residual.to(d), gamma.to(d) if with_gamma else None)
                       for d in (torch.float64, torch.float32))
        magnitude = (0.7 if with_gamma else 1.0) * attention_magnitudes(q, k, v, None, 1.0)["out"] + residual.abs()
        with torch.no_grad():  # the fused path where a backend has one
            out = cross_modal_attention(q, k, v, 1.0, residual=residual, gamma=gamma, backend=backend)
        assert_as_accurate(out, exact, fp32, magnitude=magnitude, name="fused")
        assert out.stride() == residual.stride()  # written in feat's own layout
        composed = cross_modal_attention(q, k, v, 1.0, residual=residual, gamma=gamma, backend=backend)
        assert_as_accurate(composed, exact, fp32, magnitude=magnitude, name="composed")
    scaled = cross_modal_attention(q, k, v, 1.0, gamma=torch.tensor(-1.5), backend=backend)
    assert_as_accurate(scaled, -1.5 * reference.materialized_attention(q.double(), k.double(), v.double(), 1.0),
                       -1.5 * reference.materialized_attention(q, k, v, 1.0),
                       magnitude=1.5 * attention_magnitudes(q, k, v, None, 1.0)["out"], name="gamma only")


@pytest.mark.parametrize("backend", BACKENDS)
def test_epilogue_gradients(backend):
    q, k, v = make_qkv(1, 1, 29, 23, 32, 48, seed=17)
    _, residual = _token_residual(1, 29, 48, seed=4)
    gamma = torch.tensor([0.3])
    grad = torch.randn(1, 1, 29, 48, generator=torch.Generator().manual_seed(8))
    out, grads, extra = _grads(backend, q, k, v, 1.0, grad, residual=residual, gamma=gamma)
    exact, exact_grads, exact_extra = _exact_grads(q, k, v, 1.0, grad, residual, gamma)
    fp32, fp32_grads, fp32_extra = _exact_grads(q, k, v, 1.0, grad, residual, gamma, dtype=torch.float32)
    mags = attention_magnitudes(q, k, v, grad * 0.3, 1.0)  # q, k, v see gamma * grad
    assert_as_accurate(out, exact, fp32, magnitude=0.3 * mags["out"] + residual.abs(), name="out")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, exact_grads, fp32_grads):
        assert_as_accurate(a, b, c, magnitude=mags[name], name=name)
    assert_as_accurate(extra["residual"], exact_extra["residual"], fp32_extra["residual"], magnitude=grad.abs(),
                       name="residual")  # the gradient itself
    attention = reference.materialized_attention(q.double(), k.double(), v.double(), 1.0)
    assert_as_accurate(extra["gamma"], exact_extra["gamma"], fp32_extra["gamma"],
                       magnitude=(grad.double().abs() * attention.abs()).sum(), name="gamma")
    # gamma 0 (DaGAN's initial value) still passes a gradient to gamma, none to q, k, v
    _, grads, extra = _grads(backend, q, k, v, 1.0, grad, residual=residual, gamma=torch.zeros(1))
    assert extra["gamma"].abs().max() > 0 and all(g.abs().max() == 0 for g in grads)


def test_epilogue_gradcheck_float64():
    q, k, v = make_qkv(1, 2, 5, 6, 3, 4, dtype=torch.float64)
    residual = torch.randn(1, 2, 4, 5, dtype=torch.float64).transpose(2, 3)
    gamma = torch.tensor([0.6], dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, residual, gamma)]
    fn = lambda a, b, c, r, g: cross_modal_attention(a, b, c, 0.9, residual=r, gamma=g, backend="reference")
    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck_epilogue_op():
    q, k, v = make_qkv(2, 1, 6, 5, 4, 3, dtype=torch.float64)
    residual = torch.randn(2, 1, 3, 6, dtype=torch.float64).transpose(2, 3)
    for backend in BACKENDS:
        for r, g in ((residual, torch.tensor([0.5], dtype=torch.float64)), (residual, None), (None, q.new_ones(1))):
            torch.library.opcheck(torch.ops.dagan_fast.cross_modal_attention_residual.default,
                                  (q, k, v, 0.5, r, g, backend))


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v, r: cross_modal_attention(q, k, v, residual=r[..., :2]), ValueError, r"residual must be"),
    (lambda q, k, v, r: cross_modal_attention(q, k, v, residual=r.double()), TypeError, r"residual has dtype"),
    (lambda q, k, v, r: cross_modal_attention(q, k, v, residual=r, gamma=torch.ones(2)), TypeError, r"gamma must"),
    (lambda q, k, v, r: cross_modal_attention(q, k, v, residual=r, gamma=0.5), TypeError, r"gamma must"),
])
def test_bad_epilogue_errors(call, error, match):
    q, k, v = make_qkv(2, 1, 6, 5, 4, 3)
    with pytest.raises(error, match=match):
        call(q, k, v, torch.randn(2, 1, 6, 3))
