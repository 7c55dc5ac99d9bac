"""``cross_modal_attention``: flash-style ``softmax(q k^T * scale) v`` with Dqk != Dv allowed, as a
torch.library custom op (``dagan_fast::cross_modal_attention``) with fake and autograd, plus the models'
epilogue ``gamma * attention + residual`` (``dagan_fast::cross_modal_attention_residual``, inference
only: with gradients the epilogue is composed in PyTorch on the differentiable op)."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from . import _backends
from ._extension import attention_simt_max_features, has_kernel
from . import _validate, reference

Tensor = torch.Tensor
OP = "cross_modal_attention"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dagan_fast::cross_modal_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    return tuple(_backends.get_backend(backend).kernels[OP].forward(q, k, v, scale))


@_attention_op.register_fake
def _(q, k, v, scale, backend):
    B, H, Nq, _ = q.shape
    return q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((B, H, Nq), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("dagan_fast::cross_modal_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                           backend: str, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    _, backward = _backends.get_backend(backend).backward_kernel(OP, [q, k, v])
    return tuple(backward(grad_out, q, k, v, out, lse, scale, output_mask))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend, output_mask):
    return tuple(t.new_empty(t.shape) if want else t.new_empty((0,)) for t, want in zip((q, k, v), output_mask))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend, mask)
    return dq if mask[0] else None, dk if mask[1] else None, dv if mask[2] else None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
_backends.get_backend("reference").register(OP, reference.attention_forward, reference.attention_backward)

# Compiled kernels (csrc/ops_attention.cpp): C++ forward and backward on the CPU; on CUDA a tensor-core
# forward only, so the CUDA backward runs the Triton backend's kernel when it can (else the reference).
def _compiled_forward(q, k, v, scale):
    return torch.ops.dagan_fast.cross_modal_attention_fwd(q, k, v, scale)


# float32 attention on the CPU by blocks of query rows: the scores of one block (at most this many floats)
# live in cache, never the (Nq, Nk) matrix
_BLOCK_SCORES = 1 << 21
_BLOCKED_MIN_KEYS = 256


def _blocked_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(out (B,H,Nq,Dv), lse (B,H,Nq)) with the two products as MKL GEMMs per block of query rows and the
    softmax between them in ATen's vectorised passes. DaGAN's Dqk 32 / Dv 256 at N 4096, float32, 2 threads:
    ~100 ms against ~150 ms for the row-at-a-time C++ kernel, which computes the same to ~2e-7."""
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, H, Nq, v.shape[-1]))
    lse = q.new_empty((B, H, Nq))
    rows = max(16, _BLOCK_SCORES // k.shape[2])
    for b in range(B):
        for h in range(H):
            keys_t, values = k[b, h].transpose(0, 1), v[b, h]
            for start in range(0, Nq, rows):
                scores = torch.mm(q[b, h, start:start + rows], keys_t).mul_(scale)
                peak = scores.amax(-1, keepdim=True)
                total = scores.sub_(peak).exp_().sum(-1, keepdim=True)
                torch.mm(scores, values, out=out[b, h, start:start + rows]).div_(total)
                lse[b, h, start:start + rows] = (peak + total.log()).squeeze(-1)
    return out, lse


def _cpu_forward(q, k, v, scale):
    dqk, dv = q.shape[-1], v.shape[-1]
    if q.dtype == torch.float32 and dqk != dv and k.shape[2] >= _BLOCKED_MIN_KEYS and q.shape[2] >= 16:
        return _blocked_forward(q, k, v, scale)
    if dqk == dv:
        # ATen's CPU flash kernel (what SDPA runs) is the faster forward where it applies (Dqk == Dv);
        # it returns the same natural-log lse, so our backward continues from it
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    if dqk < dv and q.dtype in (torch.bfloat16, torch.float16):
        # zero features add nothing to q k^T, so q and k padded to Dv give the same scores: ATen's kernel then
        # runs its low-precision GEMMs (AMX on CPUs that have it), ~4x our float32-accumulating one for DaGAN's
        # Dqk 32 / Dv 256 in bf16; in float32 the 8x larger q k^T costs more than it gains
        pad = (0, dv - dqk)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad), v, scale=scale)
    return _compiled_forward(q, k, v, scale)


def _compiled_backward(grad_out, q, k, v, out, lse, scale, output_mask):
    return torch.ops.dagan_fast.cross_modal_attention_bwd(grad_out, q, k, v, out, lse, scale, list(output_mask))


# Dqk in which the CUDA forward uses tensor cores for fp16/bf16; elsewhere its SIMT kernel holds Dqk + Dv
# features per row in registers/shared memory, up to a limit the library states.
_CUDA_TENSOR_CORE_DQK = (16, 32, 64, 128, 256)


def _cuda_limits(q, k=None, v=None) -> List[str]:
    if v is None:
        return []
    dqk, dv = q.shape[-1], v.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and dqk in _CUDA_TENSOR_CORE_DQK:
        return []
    limit = attention_simt_max_features()
    if limit is not None and dqk + dv > limit:
        return [f"Dqk + Dv = {dqk + dv} exceeds the {limit} features of its non-tensor-core kernel ({q.dtype}, "
                f"Dqk {dqk}; tensor cores need fp16/bf16 and Dqk in {_CUDA_TENSOR_CORE_DQK})"]
    return []


_backends.get_backend("cpu").register(OP, _cpu_forward, _compiled_backward)
_backends.get_backend("cuda").register(OP, _compiled_forward, None, not_supported_reasons=_cuda_limits,
                                       backward_via="triton")
if has_kernel("cross_modal_attention_fwd", "CPU"):  # false without the library (or with an old build of it)
    # Fake kernels of the compiled ops, so they trace under torch.compile / FakeTensorMode too.
    torch.library.register_fake("dagan_fast::cross_modal_attention_fwd")(
        lambda q, k, v, scale: (q.new_empty((*q.shape[:3], v.shape[-1])),
                                q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))))
    torch.library.register_fake("dagan_fast::cross_modal_attention_bwd")(
        lambda grad_out, q, k, v, out, lse, scale, output_mask: tuple(
            t.new_empty(t.shape) if want else t.new_empty((0,)) for t, want in zip((q, k, v), output_mask)))


def register_epilogue(backend: str, forward: Callable) -> None:
    """Declares that ``backend``'s attention forward can apply ``gamma * out + residual`` while storing:
    ``forward(q, k, v, scale, residual or None, gamma (1,) or None) -> (out laid out like epilogue_output,
    lse)``. Other backends run their plain forward and the epilogue in PyTorch; either way the math is
    ``reference.attention_residual``."""
    _backends.get_backend(backend).register_epilogue(OP, forward)


def epilogue_output(q: Tensor, v: Tensor, residual: Optional[Tensor]) -> Tensor:
    """The uninitialised (B,H,Nq,Dv) result of the epilogue: laid out like ``residual`` when that is dense
    (DaGAN's residual is an NCHW map seen as tokens: the result is then that NCHW map; empty_like's
    preserve_format rule), else contiguous."""
    if residual is not None:
        return torch.empty_like(residual, dtype=q.dtype)
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("dagan_fast::cross_modal_attention_residual", mutates_args=())
def _attention_residual_op(q: Tensor, k: Tensor, v: Tensor, scale: float, residual: Optional[Tensor],
                           gamma: Optional[Tensor], backend: str) -> Tensor:
    kernels = _backends.get_backend(backend).kernels[OP]
    if kernels.epilogue is not None:
        return kernels.epilogue(q, k, v, scale, residual, gamma)[0]
    attn, _ = kernels.forward(q, k, v, scale)
    result = epilogue_output(q, v, residual)
    if gamma is None:
        return torch.add(attn, residual, out=result)
    g = gamma.reshape(())
    if residual is None:
        return torch.mul(attn, g, out=result)
    return torch.addcmul(residual, g, attn, out=result)


@_attention_residual_op.register_fake
def _(q, k, v, scale, residual, gamma, backend):
    return epilogue_output(q, v, residual)


def check_attention_args(q, k, v, scale, op: str = OP) -> float:
    """Validates the (B,H,N,D) operands; returns the scale to use (1/sqrt(Dqk) when None)."""
    _validate.tensor(op, "q", q, 4, "(B,H,Nq,Dqk)")
    _validate.tensor(op, "k", k, 4, "(B,H,Nk,Dqk)")
    _validate.tensor(op, "v", v, 4, "(B,H,Nk,Dv)")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: q, k, v must share (B,H); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k's last dim (Dqk) must equal q's: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: v must have as many keys (dim 2) as k: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"{op}: k must hold at least one key, got {_validate.describe(k)}")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"{op}: Dqk and Dv must be >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    _validate.same_dtype_device(op, [("q", q), ("k", k), ("v", v)])
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else _validate.real_scalar(op, "scale", scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.finite(op, name, t)
    return float(scale)


def check_epilogue_args(q: Tensor, v: Tensor, residual: Optional[Tensor], gamma: Optional[Tensor],
                        op: str = OP) -> None:
    """Validates the optional residual (B,H,Nq,Dv) and gamma (one element) of the attention epilogue."""
    if residual is not None:
        _validate.tensor(op, "residual", residual, 4, "(B,H,Nq,Dv)")
        expected = (*q.shape[:3], v.shape[3])
        if tuple(residual.shape) != expected:
            raise ValueError(f"{op}: residual must be (B,H,Nq,Dv) = {expected}, got {tuple(residual.shape)}")
    if gamma is not None:
        if not isinstance(gamma, torch.Tensor) or not gamma.is_floating_point() or gamma.numel() != 1:
            raise TypeError(f"{op}: gamma must be a floating tensor with one element (DaGAN's learnable scale), "
                            f"got {gamma!r}")
        if gamma.device != q.device:
            raise ValueError(f"{op}: gamma is on {gamma.device} but q is on {q.device}")
    _validate.same_dtype_device(op, [("q", q), ("residual", residual)])


def cross_modal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                          residual: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                          backend: Optional[str] = None) -> Tensor:
    """``softmax(q k^T * scale) v`` over keys, never materialising the Nq x Nk matrix, optionally
    followed by the models' epilogue ``gamma * attention + residual`` (DaGAN) or ``attention + residual``
    (DaGAN++).

    q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv) -> (B,H,Nq,Dv); Dv may differ from Dqk (DaGAN:
    32 and 256). ``scale`` defaults to 1/sqrt(Dqk); DaGAN passes 1.0. ``residual`` (B,H,Nq,Dv), any
    strides, q's dtype; ``gamma`` a one-element tensor (cast to q's dtype). Differentiable in q, k, v,
    residual and gamma. When no gradient is needed, backends that can (triton) apply the epilogue
    while storing the attention, and the result is then laid out like a dense ``residual``.
    """
    scale = check_attention_args(q, k, v, scale)
    check_epilogue_args(q, v, residual, gamma)
    chosen = _backends.select_backend(OP, [q, k, v], backend)
    if residual is None and gamma is None:
        out, _ = _attention_op(q, k, v, scale, chosen.name)
        return out
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, residual, gamma))
    if needs_grad:
        out, _ = _attention_op(q, k, v, scale, chosen.name)
        return reference.attention_residual(out, residual, gamma)
    g = gamma.detach().reshape(1).to(q.dtype) if gamma is not None else None
    return _attention_residual_op(q, k, v, scale, residual, g, chosen.name)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Like ``cross_modal_attention`` but also returns the row logsumexp (B,H,Nq) of the scaled scores
    (float32; float64 for float64 inputs), e.g. to merge attention over split key sets."""
    scale = check_attention_args(q, k, v, scale)
    chosen = _backends.select_backend(OP, [q, k, v], backend)
    return _attention_op(q, k, v, scale, chosen.name)
