"""How the suite decides that a kernel's result is accurate enough (shared by every kernel test).

The rule, the one FlashAttention's tests use: compute a float64 ground truth from the *same* (already rounded)
inputs, run a PyTorch reference in the kernel's own precision, and require

    max|kernel - truth|  <=  factor * max|same_precision_reference - truth|  +  ulps * eps(dtype) * magnitude

``factor`` (2 by default) lets the kernel round in a different order than PyTorch, but not be less accurate
than PyTorch is on this CPU (ATen's vector path, AVX-512, AVX2 or scalar, changes the reference's error, and
the kernel's, together: the bound needs no per-CPU constant). The absolute floor covers results whose
reference error happens to be zero (an exactly-zero gradient, a single key, a pixel that reads one input value);
it is a few units of rounding of ``magnitude``, the size of the terms that enter the result (for a dot product
sum_i a_i b_i: sum_i |a_i| |b_i|, the quantity the standard bound |fl(s) - s| <= gamma_n sum |terms| is
written in). It is never the magnitude of the expected value, which may be exactly zero while the terms that
cancel to produce it are not.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Number = Union[float, torch.Tensor]

#: units of rounding of the term magnitude in the absolute floor. The floor only decides where the reference
#: happens to be exact or nearly so; measured on the attention kernels (cpu, triton-interpreter and chunked
#: reference, float32, ATen AVX-512 and AVX2) the excess of the kernel's error over twice the reference's never
#: passed 0.25 units (the exactly-zero dq, dk of a single key); 4 leaves a factor 16 and still bounds a
#: gradient that should be zero at a few float32 roundings of the products that cancel to give it.
DEFAULT_ULPS = 4.0


def eps(dtype: torch.dtype) -> float:
    """Unit roundoff scale of ``dtype`` (torch.finfo(dtype).eps: 2**-23 for float32)."""
    return float(torch.finfo(dtype).eps)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (0 for empty tensors); shapes must agree."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max())


def _size(magnitude: Number) -> float:
    if torch.is_tensor(magnitude):
        return float(magnitude.detach().double().abs().max()) if magnitude.numel() else 0.0
    return abs(float(magnitude))


def accuracy_bound(truth: torch.Tensor, same_precision: Optional[torch.Tensor], *, magnitude: Number,
                   dtype: torch.dtype, factor: float = 2.0, ulps: float = DEFAULT_ULPS) -> float:
    """``factor * max|same_precision - truth| + ulps * eps(dtype) * max(magnitude)``: the largest error the
    rule above accepts (no reference term when ``same_precision`` is None)."""
    ref = 0.0 if same_precision is None else max_abs_err(same_precision, truth)
    return factor * ref + ulps * eps(dtype) * _size(magnitude)


def assert_as_accurate(actual: torch.Tensor, truth: torch.Tensor, same_precision: Optional[torch.Tensor], *,
                       magnitude: Number, dtype: Optional[torch.dtype] = None, factor: float = 2.0,
                       ulps: float = DEFAULT_ULPS, name: str = "") -> None:
    """Asserts the rule of this module: ``actual`` (the kernel) is within ``factor`` times the error of
    ``same_precision`` (PyTorch in the kernel's precision), both against the float64 ``truth``, plus an absolute
    floor of ``ulps`` roundings of ``magnitude`` in ``dtype`` (default: actual's dtype)."""
    dtype = actual.dtype if dtype is None else dtype
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, truth)
    bound = accuracy_bound(truth, same_precision, magnitude=magnitude, dtype=dtype, factor=factor, ulps=ulps)
    ref = None if same_precision is None else max_abs_err(same_precision, truth)
    assert err <= bound, (f"{name}: error {err:.3g} above {bound:.3g} (same-precision reference error "
                          f"{ref if ref is None else format(ref, '.3g')}, term magnitude {_size(magnitude):.3g}, "
                          f"{dtype})")


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, *, magnitude: Number,
                          dtype: Optional[torch.dtype] = None, ulps: float = DEFAULT_ULPS, name: str = "") -> None:
    """Two computations in ``dtype`` of the same value that may only round differently (thread counts,
    block orders, an out-of-place layout): max|actual - expected| <= ulps * eps(dtype) * max(magnitude)."""
    assert_as_accurate(actual, expected, None, magnitude=magnitude, dtype=dtype, ulps=ulps, name=name)


# --------------------------------------------------------------------------------------------------------------
# Term magnitudes of the ops (all computed in float64 from absolute values)
# --------------------------------------------------------------------------------------------------------------
def attention_magnitudes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: Optional[torch.Tensor],
                         scale: Optional[float]) -> dict:
    """Sizes of the terms that enter softmax(q k^T scale) v and its gradients, elementwise, in float64:

    scores s = scale q k^T: S = scale |q||k|^T; lse = max + log sum exp: max_j S + log(Nk);
    P = exp(s - lse) in a kernel that saves the logsumexp (flash attention, the chunked reference): its rounding
    of lse scales a whole row of P by (1 + eps |lse|), which the normalised softmax of PyTorch's naive
    formulation does not suffer, so P carries c = 1 + |lse| (per query row) into every term below;
    out = P v: (c P)|v|; dv = P^T dO: (c P)^T |dO|; dP = dO v^T and D = rowsum(dO * O):
    T = |dO||v|^T + rowsum(|dO||O|); dS = P * (dP - D): c P T; dq = scale dS k: scale (c P T)|k|;
    dk = scale dS^T q: scale (c P T)^T |q|.
    The rest of the scores' rounding (eps S_ij, which moves P within a row) is left out: the same-precision
    reference suffers it equally (it is the conditioning of softmax), and where it cancels exactly (a single
    key: P = 1 whatever the score) the kernel's result cancels too.
    Returns a dict with keys out, lse and, with ``grad_out``, dq, dk, dv.
    """
    q, k, v = (t.detach().double() for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    cp = p * (1.0 + lse.abs())
    S = torch.matmul(q.abs(), k.abs().transpose(-1, -2)) * abs(scale)
    out = torch.matmul(p, v)
    mags = {"out": torch.matmul(cp, v.abs()), "lse": S.amax(-1) + math.log(max(k.shape[-2], 1))}
    if grad_out is not None:
        go = grad_out.detach().double()
        T = torch.matmul(go.abs(), v.abs().transpose(-1, -2)) + (go.abs() * out.abs()).sum(-1, keepdim=True)
        dS = cp * T
        mags["dq"] = torch.matmul(dS, k.abs()) * abs(scale)
        mags["dk"] = torch.matmul(dS.transpose(-1, -2), q.abs()) * abs(scale)
        mags["dv"] = torch.matmul(cp.transpose(-1, -2), go.abs())
    return mags


def warp_magnitudes(x: torch.Tensor, grid: torch.Tensor, occlusion: Optional[torch.Tensor],
                    grad_out: Optional[torch.Tensor] = None) -> dict:
    """Sizes of the terms of out = grid_sample(x, grid, bilinear, zeros, align_corners=False) * occ, in float64.

    A pixel is occ sum_t w_t x_t over its 4 taps with weights w_t >= 0: out: |occ| grid_sample(|x|);
    d input (a sum over the pixels that read a tap): grid_sample_backward of |go| |occ| (exact, as w >= 0);
    d occ: sum_C |go| grid_sample(|x|); d grid (per component; size the width or height): size / 2 |occ|
    sum_C |go| 2 max|x| (the weight derivatives are +-(1 - f), +-f over the 4 taps). The rounding of the pixel
    coordinate ((g + 1) size - 1) / 2 (about eps size, moving the weights by as much) is left out: PyTorch's
    grid_sample computes the same coordinate and the same-precision reference carries it.
    Keys out and, with ``grad_out``, input, grid, occlusion.
    """
    import torch.nn.functional as F

    from dagan_fast.ops import reference

    x = x.detach().double()
    grid = grid.detach().double().clamp(-3, 3)  # as the reference: anything beyond reads zeros
    B, C, Hi, Wi = x.shape
    occ = None if occlusion is None else occlusion.detach().double().abs()
    k = 1.0
    sampled = F.grid_sample(x.abs(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mags = {"out": k * (sampled if occ is None else sampled * occ)}
    if grad_out is not None:
        go = grad_out.detach().double().abs()
        gi = reference.warp_occlusion_backward(go, x, grid, occ, (True, False, False))[0]
        mags["input"] = k * gi
        w = go.sum(1, keepdim=True) * (1.0 if occ is None else occ)  # (B,1,Ho,Wo)
        xmax = float(x.abs().max()) if x.numel() else 0.0
        sizes = torch.tensor([Wi, Hi], dtype=torch.float64, device=x.device)
        mags["grid"] = k * w[:, 0, :, :, None] * sizes / 2 * 2 * xmax
        mags["occlusion"] = k * (go * sampled).sum(1, keepdim=True)
    return mags


def same_precision_grads(fn, inputs: Sequence[Optional[torch.Tensor]], grad_outputs, dtype: torch.dtype):
    """(outputs, gradients) of ``fn`` with every tensor input cast to ``dtype`` (None stays None); gradients
    of the inputs that were tensors, with respect to sum(out * grad_output)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs_list = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    gos = list(grad_outputs) if isinstance(grad_outputs, (tuple, list)) else [grad_outputs]
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outs_list, gos)).backward()
    return outs, [None if t is None else t.grad for t in leaves]


def attention_references(q, k, v, grad_out, scale: Optional[float], dtype: torch.dtype = torch.float32):
    """Oracles for one attention call: (truth, same_precision, magnitudes), truth and same_precision dicts with
    keys out, lse and (with ``grad_out``) dq, dk, dv: the naive materialised formulation in float64 from the
    same rounded inputs, and PyTorch's in ``dtype`` (its autograd for the gradients)."""
    from dagan_fast.ops import reference

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    def run(dt):
        leaves = [t.detach().to(dt).requires_grad_(grad_out is not None) for t in (q, k, v)]
        out = reference.materialized_attention(*leaves, scale)
        scores = torch.matmul(leaves[0].detach(), leaves[1].detach().transpose(-1, -2)) * scale
        res = {"out": out.detach(), "lse": torch.logsumexp(scores, -1)}
        if grad_out is not None:
            out.backward(grad_out.to(dt))
            res.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        return res

    return run(torch.float64), run(dtype), attention_magnitudes(q, k, v, grad_out, scale)


def assert_attention_accurate(q, k, v, scale: Optional[float], out=None, grads=None, grad_out=None, lse=None,
                              dtype: Optional[torch.dtype] = None, name: str = "") -> None:
    """The rule of this module for every result given of one attention call (out, lse, grads = (dq, dk, dv),
    the last with ``grad_out``): q, k, v are the (already rounded) inputs the kernel saw, in any layout."""
    dtype = (out if out is not None else q).dtype if dtype is None else dtype
    truth, same, mags = attention_references(q, k, v, grad_out, scale, dtype)
    results = {"out": out, "lse": lse}
    if grads is not None:
        results.update(zip(("dq", "dk", "dv"), grads))
    for key, got in results.items():
        if got is not None:
            assert_as_accurate(got, truth[key], same[key], magnitude=mags[key], dtype=got.dtype,
                               name=f"{name} {key}".strip())


WARP_GRADS = ("input", "grid", "occlusion")


def warp_references(x, grid, occ, grad_out=None, dtype: Optional[torch.dtype] = None):
    """Oracles for one warp_occlusion call: (truth, same_precision, magnitudes), dicts with keys out and (with
    ``grad_out``) input, grid, occlusion. truth: the reference (grid_sample * occlusion, grid clamped to +-3 so
    inf reads zeros) in float64 from the same rounded inputs; same_precision: the same in float32 (float64 for
    float64 inputs) rounded to ``dtype`` (default x's): what PyTorch computing in float32 and storing the
    result in the kernel's dtype gets."""
    from dagan_fast.ops import reference

    dtype = x.dtype if dtype is None else dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def run(dt, store):
        a = [None if t is None else t.detach().to(dt) for t in (x, grid, occ)]
        res = {"out": reference.warp_occlusion(*a).to(store)}
        if grad_out is not None:
            gs = reference.warp_occlusion_backward(grad_out.detach().to(dt), *a, (True, True, a[2] is not None))
            res.update((n, g.to(store)) for n, g in zip(WARP_GRADS, gs))
        return res

    return run(torch.float64, torch.float64), run(acc, dtype), warp_magnitudes(x, grid, occ, grad_out)


def assert_warp_accurate(x, grid, occ, *, out=None, grads=None, grad_out=None, dtype=None, name: str = "") -> None:
    """The rule of this module for the results given of one warp_occlusion call: ``out`` and/or ``grads``
    (input, grid, occlusion gradients for ``grad_out``; None or empty entries are skipped)."""
    truth, same, mags = warp_references(x, grid, occ, grad_out, dtype)
    results = {"out": out}
    if grads is not None:
        results.update(zip(WARP_GRADS, grads))
    for key, got in results.items():
        if got is None or (key != "out" and got.numel() == 0):
            continue
        assert_as_accurate(got, truth[key], same[key], magnitude=mags[key], dtype=got.dtype,
                           name=f"{name} {key}".strip())
