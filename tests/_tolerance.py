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


# --------------------------------------------------------------------------------------------------------------
# sparse_motion_inputs and dense_motion
# --------------------------------------------------------------------------------------------------------------
def _outputs(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def _abs_terms_by_jvp(fn, args, idx, ups, groups, step: float = 1e-7):
    """sum_p |u_p| |d y_p / d theta_j| for theta = args[idx] (float64): ``groups`` lists (tangent mask, reduce)
    pairs whose perturbed elements never reach the same output element, reduce mapping |u| * |jvp| (one tensor
    per output) to the elements' magnitudes (added where the mask is set). The directional derivatives are
    central differences in float64 (grid_sample has no forward-mode AD): a magnitude needs no more than a few
    digits, and their relative error, about step^2 + eps64 / step, is ~1e-9."""
    theta = args[idx]
    scale = max(1.0, float(theta.abs().max()))
    mag = torch.zeros_like(theta)
    for mask, reduce in groups:
        h = step * scale
        plus, minus = list(args), list(args)
        plus[idx], minus[idx] = theta + h * mask, theta - h * mask
        outs = [(p - m) / (2 * h) for p, m in zip(_outputs(fn(*plus)), _outputs(fn(*minus)))]
        mag = mag + reduce([u.abs() * t.abs() for u, t in zip(ups, outs)]) * mask
    return mag


def _keypoint_groups(theta, per_keypoint):
    """One group per coordinate of a keypoint tensor (the 2 of kp, the 2x2 of jac): every batch and keypoint at
    once, as keypoint k only reaches the outputs of block k of a ``per_keypoint`` function, whose |u| * |jvp|
    terms (one (B,K+1,...) tensor) sum per (batch, keypoint) to the magnitudes (block 0 is the background)."""
    B, K = theta.shape[:2]
    groups = []
    for coord in torch.ones(theta.shape[2:]).nonzero().tolist():
        mask = torch.zeros_like(theta)
        mask[(slice(None), slice(None), *coord)] = 1

        def reduce(terms, shape=theta.shape):
            total = sum(t.reshape(B, K + 1, -1).sum(-1)[:, 1:] for t in terms)
            return total.view(B, K, *([1] * (len(shape) - 2)))

        groups.append((mask, reduce))
    return groups


def motion_references(op: str, args, ups, dtype: Optional[torch.dtype] = None, variance: float = 0.01,
                      truth_fn=None, magnitudes: bool = True, with_grads: bool = True):
    """Oracles for sparse_motion_inputs (``op`` "sparse": args source, kp_s, jac_s, kp_d, jac_d; ups one tensor)
    or dense_motion ("dense": args mask_logits, kp_s, jac_s, kp_d, jac_d; ups (grad deformation, grad mask)):
    (truth, same_precision, magnitudes), each a list [outputs..., gradients of the non-None args...].

    truth: PyTorch's autograd of the reference formulation (``truth_fn``, default dagan_fast.ops.reference) in
    float64 from the same rounded inputs; same_precision: the same in float32 (float64 for float64 inputs),
    rounded to ``dtype``. Magnitudes, float64: sparse out: heat |G(kp_d)| + |G(kp_s)|, warps
    grid_sample(|source|) (weights >= 0); dense: deformation sum_k mask_k |T_k(z)|, mask the softmax itself;
    gradients: sum over output elements p of |u_p| |d y_p / d theta_j| (the terms the backward adds): by the
    backward of |u| for the source (d warp / d source >= 0), in closed form for the logits (softmax), by
    float64 central differences for keypoints and Jacobians (a pair of passes per coordinate, every batch and
    keypoint at once: keypoint k only moves the motion T_k).
    """
    from dagan_fast.ops import reference

    dtype = args[0].dtype if dtype is None else dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ups = _outputs(ups)
    if truth_fn is None:
        truth_fn = ((lambda *a: reference.sparse_motion_inputs(*a, variance)) if op == "sparse"
                    else reference.dense_motion)

    def run(dt, store, fn):
        leaves = [None if t is None else t.detach().to(dt).requires_grad_() for t in args]
        outs = _outputs(fn(*leaves))
        if not with_grads:
            return [t.detach().to(store) for t in outs]
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, present, [u.to(dt) for u in ups], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(present, grads)]
        return [t.detach().to(store) for t in outs + grads]

    truth = run(torch.float64, torch.float64, truth_fn)
    same = run(acc, dtype, truth_fn)
    if not magnitudes:
        return truth, same, None

    a64 = [None if t is None else t.detach().double() for t in args]
    u64 = [u.detach().double() for u in ups] if with_grads else []
    ref_fn = (lambda *a: reference.sparse_motion_inputs(*a, variance)) if op == "sparse" else reference.dense_motion
    B, K = a64[1].shape[:2]
    mags = []
    if op == "sparse":
        src = a64[0]
        C, H, W = src.shape[1:]
        grid = reference.make_coordinate_grid(H, W, torch.float64, src.device)
        heat = reference._gaussians(grid, a64[3], variance) + reference._gaussians(grid, a64[1], variance)
        A, b = reference.keypoint_affine(*a64[1:])
        motions = reference.taylor_motions(A, b, grid).reshape(B * (K + 1), H, W, 2)
        rep = src.abs().unsqueeze(1).expand(B, K + 1, C, H, W).reshape(B * (K + 1), C, H, W)
        warped = F_grid_sample(rep, motions).view(B, K + 1, C, H, W)
        heat = torch.cat([heat.new_zeros(B, 1, H, W), heat], 1).unsqueeze(2)
        mags.append(torch.cat([heat, warped], 2).reshape(B, (K + 1) * (C + 1), H, W))
        if not with_grads:
            return truth, same, mags
        leaves = [None if t is None else t.clone().requires_grad_() for t in a64]
        out = ref_fn(*leaves)
        g_src = torch.autograd.grad(out, leaves[0], u64[0].abs(), allow_unused=True)[0]  # d out / d source >= 0
        mags.append(torch.zeros_like(src) if g_src is None else g_src)
    else:
        logits = a64[0]
        H, W = logits.shape[2:]
        grid = reference.make_coordinate_grid(H, W, torch.float64, logits.device)
        mask = torch.softmax(logits, 1)
        A, b = reference.keypoint_affine(*a64[1:])
        motions = reference.taylor_motions(A, b, grid)
        mags += [(mask.unsqueeze(-1) * motions.abs()).sum(1), mask]
        if not with_grads:
            return truth, same, mags

        # d logits_j = sum_k a_k m_k (delta_kj - m_j), a_k = u_mask_k + u_def . T_k: terms |a_k| m_k (delta_kj + m_j)
        a_abs = u64[1].abs() + (u64[0].abs().unsqueeze(1) * motions.abs()).sum(-1)
        mags.append(a_abs * mask + mask * (a_abs * mask).sum(1, keepdim=True))
    # keypoint k moves only T_k (sparse: block k of the output; dense: the term mask_k T_k of the deformation)
    if op == "sparse":
        per_ups = [u64[0].view(B, K + 1, -1)]

        def per_keypoint(*a):
            return ref_fn(*a).view(B, K + 1, -1)
    else:
        def per_keypoint(logits, *kp):
            Hh, Ww = logits.shape[2:]
            g = reference.make_coordinate_grid(Hh, Ww, logits.dtype, logits.device)
            return torch.softmax(logits, 1).unsqueeze(-1) * reference.taylor_motions(*reference.keypoint_affine(*kp), g)

        per_ups = [u64[0].unsqueeze(1).expand(B, K + 1, *u64[0].shape[1:])]
    for idx in range(1, 5):
        if a64[idx] is not None:
            mags.append(_abs_terms_by_jvp(per_keypoint, a64, idx, per_ups, _keypoint_groups(a64[idx], per_keypoint)))
    return truth, same, mags


def F_grid_sample(x, grid):
    import torch.nn.functional as F

    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def assert_motion_accurate(op: str, args, ups, results, *, variance: float = 0.01, truth_fns=(None,),
                           dtype: Optional[torch.dtype] = None, ulps: float = DEFAULT_ULPS, name: str = "") -> None:
    """The rule of this module for ``results`` = [outputs..., gradients of the non-None args...] of one
    sparse_motion_inputs / dense_motion call (see motion_references), once per formulation in ``truth_fns``
    (None: dagan_fast.ops.reference; e.g. the official DaGAN code written out); None results are skipped,
    and only the forward is computed when every gradient is None (``ups`` is then unused)."""
    arg_names = ["source" if op == "sparse" else "mask_logits", "kp_source", "jac_source", "kp_driving",
                 "jac_driving"]
    names = (["out"] if op == "sparse" else ["deformation", "mask"]) + [
        n for n, t in zip(arg_names, args) if t is not None]
    n_out = 1 if op == "sparse" else 2
    with_grads = any(r is not None for r in results[n_out:])
    if not with_grads:
        results, names = results[:n_out], names[:n_out]
    mags = None
    for i, fn in enumerate(truth_fns):
        truth, same, m = motion_references(op, args, ups, dtype, variance, fn, magnitudes=mags is None,
                                           with_grads=with_grads)
        mags = m if mags is None else mags
        assert len(results) == len(truth), (len(results), len(truth))
        for key, got, t, s, mg in zip(names, results, truth, same, mags):
            if got is not None:
                assert_as_accurate(got, t, s, magnitude=mg, dtype=got.dtype, ulps=ulps,
                                   name=f"{name} {key} (formulation {i})".strip())
