"""``cross_modal_attention``: flash-style ``softmax(q k^T * scale) v`` with Dqk != Dv allowed, as a
torch.library custom op (``dagan_fast::cross_modal_attention``) with fake and autograd."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .. import _backends
from .._extension import has_kernel
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
    kernels = _backends.get_backend(backend).kernels[OP]
    return tuple(kernels.backward(grad_out, q, k, v, out, lse, scale, output_mask))


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


def _compiled_backward(grad_out, q, k, v, out, lse, scale, output_mask):
    return torch.ops.dagan_fast.cross_modal_attention_bwd(grad_out, q, k, v, out, lse, scale, list(output_mask))


def _cuda_backward(grad_out, q, k, v, out, lse, scale, output_mask):
    triton = _backends.get_backend("triton")
    kernels = triton.kernels[OP] if not triton.not_supported_reasons(OP, [q]) else None
    backward = kernels.backward if kernels is not None else reference.attention_backward
    return backward(grad_out, q, k, v, out, lse, scale, output_mask)


_backends.get_backend("cpu").register(OP, _compiled_forward, _compiled_backward)
_backends.get_backend("cuda").register(OP, _compiled_forward, _cuda_backward)
if has_kernel("cross_modal_attention_fwd", "CPU"):  # false without the library (or with an old build of it)
    # Fake kernels of the compiled ops, so they trace under torch.compile / FakeTensorMode too.
    torch.library.register_fake("dagan_fast::cross_modal_attention_fwd")(
        lambda q, k, v, scale: (q.new_empty((*q.shape[:3], v.shape[-1])),
                                q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))))
    torch.library.register_fake("dagan_fast::cross_modal_attention_bwd")(
        lambda grad_out, q, k, v, out, lse, scale, output_mask: tuple(
            t.new_empty(t.shape) if want else t.new_empty((0,)) for t, want in zip((q, k, v), output_mask)))


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


def cross_modal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                          backend: Optional[str] = None) -> Tensor:
    """``softmax(q k^T * scale) v`` over keys, never materialising the Nq x Nk matrix.

    q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv) -> (B,H,Nq,Dv); Dv may differ from Dqk (DaGAN:
    32 and 256). ``scale`` defaults to 1/sqrt(Dqk); DaGAN passes 1.0. Differentiable in q, k, v.
    """
    scale = check_attention_args(q, k, v, scale)
    chosen = _backends.select_backend(OP, [q], backend)
    out, _ = _attention_op(q, k, v, scale, chosen.name)
    return out


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Like ``cross_modal_attention`` but also returns the row logsumexp (B,H,Nq) of the scaled scores
    (float32; float64 for float64 inputs), e.g. to merge attention over split key sets."""
    scale = check_attention_args(q, k, v, scale)
    chosen = _backends.select_backend(OP, [q], backend)
    return _attention_op(q, k, v, scale, chosen.name)
