"""Sparse-to-dense Taylor motion (FOMM/DaGAN) as torch.library custom ops with fake and autograd:
``dagan_fast::sparse_motion_inputs`` (the dense-motion hourglass input) and
``dagan_fast::dense_motion`` (mask softmax + motion mixture)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _backends
from ._extension import extension
from . import _validate, reference

Tensor = torch.Tensor
SPARSE_OP = "sparse_motion_inputs"
DENSE_OP = "dense_motion"


def _grads_fake(likes, output_mask):
    return tuple(t.new_empty(t.shape) if (want and t is not None) else ref.new_empty((0,))
                 for t, ref, want in zip(likes, (likes[0], likes[1], likes[1], likes[1], likes[1]), output_mask))


# ---------------------------------------------------------------- sparse_motion_inputs
@torch.library.custom_op("dagan_fast::sparse_motion_inputs", mutates_args=())
def _sparse_op(source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
               jac_driving: Optional[Tensor], variance: float, backend: str) -> Tensor:
    kernels = _backends.get_backend(backend).kernels[SPARSE_OP]
    return kernels.forward(source, kp_source, jac_source, kp_driving, jac_driving, variance)


@_sparse_op.register_fake
def _(source, kp_source, jac_source, kp_driving, jac_driving, variance, backend):
    B, C, H, W = source.shape
    return source.new_empty((B, (kp_source.shape[1] + 1) * (C + 1), H, W))


@torch.library.custom_op("dagan_fast::sparse_motion_inputs_backward", mutates_args=())
def _sparse_backward_op(grad: Tensor, source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor],
                        kp_driving: Tensor, jac_driving: Optional[Tensor], variance: float, backend: str,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = _backends.get_backend(backend).kernels[SPARSE_OP]
    return tuple(kernels.backward(grad, source, kp_source, jac_source, kp_driving, jac_driving, variance,
                                  output_mask))


@_sparse_backward_op.register_fake
def _(grad, source, kp_source, jac_source, kp_driving, jac_driving, variance, backend, output_mask):
    return _grads_fake((source, kp_source, jac_source, kp_driving, jac_driving), output_mask)


def _sparse_setup(ctx, inputs, output):
    source, kp_source, jac_source, kp_driving, jac_driving, variance, backend = inputs
    ctx.variance, ctx.backend = variance, backend
    ctx.save_for_backward(source, kp_source, jac_source, kp_driving, jac_driving)


def _sparse_backward(ctx, grad):
    saved = ctx.saved_tensors
    mask = [ctx.needs_input_grad[i] and saved[i] is not None for i in range(5)]
    grads = _sparse_backward_op(grad, *saved, ctx.variance, ctx.backend, mask)
    return (*[g if want else None for g, want in zip(grads, mask)], None, None)


_sparse_op.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# ---------------------------------------------------------------- dense_motion
@torch.library.custom_op("dagan_fast::dense_motion", mutates_args=())
def _dense_op(mask_logits: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
              jac_driving: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    kernels = _backends.get_backend(backend).kernels[DENSE_OP]
    return tuple(kernels.forward(mask_logits, kp_source, jac_source, kp_driving, jac_driving))


@_dense_op.register_fake
def _(mask_logits, kp_source, jac_source, kp_driving, jac_driving, backend):
    B, _, H, W = mask_logits.shape
    return mask_logits.new_empty((B, H, W, 2)), mask_logits.new_empty(mask_logits.shape)


@torch.library.custom_op("dagan_fast::dense_motion_backward", mutates_args=())
def _dense_backward_op(grad_deformation: Tensor, grad_mask: Tensor, mask_logits: Tensor, kp_source: Tensor,
                       jac_source: Optional[Tensor], kp_driving: Tensor, jac_driving: Optional[Tensor], backend: str,
                       output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernels = _backends.get_backend(backend).kernels[DENSE_OP]
    return tuple(kernels.backward(grad_deformation, grad_mask, mask_logits, kp_source, jac_source, kp_driving,
                                  jac_driving, output_mask))


@_dense_backward_op.register_fake
def _(grad_deformation, grad_mask, mask_logits, kp_source, jac_source, kp_driving, jac_driving, backend, output_mask):
    return _grads_fake((mask_logits, kp_source, jac_source, kp_driving, jac_driving), output_mask)


def _dense_setup(ctx, inputs, output):
    mask_logits, kp_source, jac_source, kp_driving, jac_driving, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(mask_logits, kp_source, jac_source, kp_driving, jac_driving)


def _dense_backward(ctx, grad_deformation, grad_mask):
    saved = ctx.saved_tensors
    mask = [ctx.needs_input_grad[i] and saved[i] is not None for i in range(5)]
    if grad_deformation is None:
        grad_deformation = saved[0].new_zeros((saved[0].shape[0], *saved[0].shape[2:], 2))
    if grad_mask is None:
        grad_mask = torch.zeros_like(saved[0])
    grads = _dense_backward_op(grad_deformation, grad_mask, *saved, ctx.backend, mask)
    return (*[g if want else None for g, want in zip(grads, mask)], None)


_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)

_backends.get_backend("reference").register(SPARSE_OP, reference.sparse_motion_inputs,
                                            reference.sparse_motion_inputs_backward)
_backends.get_backend("reference").register(DENSE_OP, reference.dense_motion, reference.dense_motion_backward)


# Compiled kernels (csrc/ops_motion.cpp) for the cpu and cuda backends.
def _compiled_sparse_forward(source, kp_source, jac_source, kp_driving, jac_driving, variance):
    return torch.ops.dagan_fast.sparse_motion_inputs_fwd(source, kp_source, jac_source, kp_driving, jac_driving,
                                                         float(variance))


def _compiled_sparse_backward(grad, source, kp_source, jac_source, kp_driving, jac_driving, variance, output_mask):
    return torch.ops.dagan_fast.sparse_motion_inputs_bwd(grad, source, kp_source, jac_source, kp_driving, jac_driving,
                                                         float(variance), list(output_mask))


def _compiled_dense_forward(mask_logits, kp_source, jac_source, kp_driving, jac_driving):
    return torch.ops.dagan_fast.dense_motion_fwd(mask_logits, kp_source, jac_source, kp_driving, jac_driving)


def _compiled_dense_backward(grad_deformation, grad_mask, mask_logits, kp_source, jac_source, kp_driving, jac_driving,
                             output_mask):
    return torch.ops.dagan_fast.dense_motion_bwd(grad_deformation, grad_mask, mask_logits, kp_source, jac_source,
                                                 kp_driving, jac_driving, list(output_mask))


for _name in ("cpu", "cuda"):
    _backends.get_backend(_name).register(SPARSE_OP, _compiled_sparse_forward, _compiled_sparse_backward)
    _backends.get_backend(_name).register(DENSE_OP, _compiled_dense_forward, _compiled_dense_backward)

if extension().loaded and hasattr(torch.ops.dagan_fast, "sparse_motion_inputs_fwd"):
    # Fake kernels of the compiled ops, so they trace under torch.compile / FakeTensorMode too.
    torch.library.register_fake("dagan_fast::sparse_motion_inputs_fwd")(
        lambda source, kp_source, jac_source, kp_driving, jac_driving, variance: source.new_empty(
            (source.shape[0], (kp_source.shape[1] + 1) * (source.shape[1] + 1), *source.shape[2:])))
    torch.library.register_fake("dagan_fast::sparse_motion_inputs_bwd")(
        lambda grad, source, kp_source, jac_source, kp_driving, jac_driving, variance, output_mask: _grads_fake(
            (source, kp_source, jac_source, kp_driving, jac_driving), output_mask))
    torch.library.register_fake("dagan_fast::dense_motion_fwd")(
        lambda mask_logits, kp_source, jac_source, kp_driving, jac_driving: (
            mask_logits.new_empty((mask_logits.shape[0], *mask_logits.shape[2:], 2)),
            mask_logits.new_empty(mask_logits.shape)))
    torch.library.register_fake("dagan_fast::dense_motion_bwd")(
        lambda grad_deformation, grad_mask, mask_logits, kp_source, jac_source, kp_driving, jac_driving, output_mask:
        _grads_fake((mask_logits, kp_source, jac_source, kp_driving, jac_driving), output_mask))


# ---------------------------------------------------------------- validation and public API
def check_keypoint_args(op: str, batch: int, kp_source, jac_source, kp_driving, jac_driving) -> int:
    """Validates keypoints (B,K,2) and Jacobians (B,K,2,2) or None; returns K."""
    _validate.tensor(op, "kp_source", kp_source, 3, "(B,K,2)")
    _validate.tensor(op, "kp_driving", kp_driving, 3, "(B,K,2)")
    if kp_source.shape[2] != 2 or kp_source.shape[0] != batch:
        raise ValueError(f"{op}: kp_source must be (B,K,2) with B = {batch}, got {_validate.describe(kp_source)}")
    if tuple(kp_driving.shape) != tuple(kp_source.shape):
        raise ValueError(f"{op}: kp_driving must have kp_source's shape {tuple(kp_source.shape)}, "
                         f"got {tuple(kp_driving.shape)}")
    K = kp_source.shape[1]
    if K < 1:
        raise ValueError(f"{op}: need at least one keypoint, got kp_source {tuple(kp_source.shape)}")
    for name, jac in (("jac_source", jac_source), ("jac_driving", jac_driving)):
        if jac is None:
            continue
        _validate.tensor(op, name, jac, 4, "(B,K,2,2)")
        if tuple(jac.shape) != (batch, K, 2, 2):
            raise ValueError(f"{op}: {name} must be (B,K,2,2) = {(batch, K, 2, 2)} to match the keypoints "
                             f"(K = {K}), got {tuple(jac.shape)}")
    for name, t in (("kp_source", kp_source), ("jac_source", jac_source), ("kp_driving", kp_driving),
                    ("jac_driving", jac_driving)):
        _validate.finite(op, name, t)
    return K


# Backends whose kernels take float32 keypoints with a float16/bfloat16 image; the others (one dtype
# for every operand) get the keypoints cast to the image's dtype, and autograd casts their gradients back.
MIXED_KEYPOINT_BACKENDS = ("cpu", "reference")


def check_keypoint_dtypes(op: str, image_name: str, image: Tensor, kp_source: Tensor, jac_source: Optional[Tensor],
                          kp_driving: Tensor, jac_driving: Optional[Tensor]) -> None:
    """The dtype contract of the motion ops: the keypoints and Jacobians share one dtype and the image's
    device; that dtype is the image's, or float32 when the image (source / mask_logits) is float16 or
    bfloat16 (models keep keypoints in float32). Raises TypeError/ValueError naming the argument."""
    named = (("kp_source", kp_source), ("jac_source", jac_source), ("kp_driving", kp_driving),
             ("jac_driving", jac_driving))
    for name, t in named:
        if t is not None and t.device != image.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {image_name} is on {image.device}; "
                             f"move all inputs to one device")
    low = image.dtype in (torch.float16, torch.bfloat16)
    need = (f"{image.dtype} or torch.float32 (float32 keypoints may go with a float16/bfloat16 {image_name})"
            if low else f"{image.dtype}")
    expected = kp_source.dtype if (kp_source.dtype == image.dtype or (low and kp_source.dtype == torch.float32)) \
        else image.dtype
    for name, t in named:
        if t is not None and t.dtype != expected:
            also = f" and kp_source has {expected}" if expected != image.dtype else ""
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {image_name} has {image.dtype}{also}; the keypoints "
                            f"and Jacobians must share one dtype, {need}")


def _keypoints_for(backend: str, image: Tensor, *keypoints: Optional[Tensor]):
    """(kp_source, jac_source, kp_driving, jac_driving) as ``backend`` takes them: unchanged, or cast to
    the image's dtype for backends outside MIXED_KEYPOINT_BACKENDS (None stays None)."""
    if keypoints[0].dtype == image.dtype or backend in MIXED_KEYPOINT_BACKENDS:
        return keypoints
    return tuple(t.to(image.dtype) if t is not None else None for t in keypoints)


def sparse_motion_inputs(source: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                         jac_driving: Optional[Tensor], variance: float = 0.01, *,
                         backend: Optional[str] = None) -> Tensor:
    """Dense-motion hourglass input of DaGAN/FOMM in one op.

    source (B,C,H,W) (the downsampled source image), kp_source/kp_driving (B,K,2) in [-1,1] (x, y),
    jac_source/jac_driving (B,K,2,2) or None (identity) -> (B,(K+1)(C+1),H,W): for k = 0..K the
    channels [heat_k, source warped by T_k], T_0 = identity, T_k(z) = kp_s + J_s inv(J_d)(z - kp_d),
    heat_k = exp(-|z-kp_d|^2/(2 variance)) - exp(-|z-kp_s|^2/(2 variance)), heat_0 = 0.
    Driving Jacobians with |det| < 1e-6 are inverted as if |det| were 1e-6 (sign kept).

    Dtypes: source float16/bfloat16/float32/float64; the keypoints and Jacobians share one dtype,
    source's or, for a float16/bfloat16 source, float32 (what models keep them in). The output is in
    source's dtype (float16/bfloat16 computed in float32, rounded once), the keypoint gradients in the
    keypoints' dtype.
    """
    op = SPARSE_OP
    _validate.tensor(op, "source", source, 4, "(B,C,H,W)")
    if source.shape[2] < 1 or source.shape[3] < 1:
        raise ValueError(f"{op}: source must be at least 1x1 spatially, got {_validate.describe(source)}")
    check_keypoint_args(op, source.shape[0], kp_source, jac_source, kp_driving, jac_driving)
    check_keypoint_dtypes(op, "source", source, kp_source, jac_source, kp_driving, jac_driving)
    variance = _validate.real_scalar(op, "variance", variance, positive=True)
    _validate.finite(op, "source", source)
    chosen = _backends.select_backend(op, [source], backend)
    kp_source, jac_source, kp_driving, jac_driving = _keypoints_for(chosen.name, source, kp_source, jac_source,
                                                                    kp_driving, jac_driving)
    return _sparse_op(source, kp_source, jac_source, kp_driving, jac_driving, variance, chosen.name)


def dense_motion(mask_logits: Tensor, kp_source: Tensor, jac_source: Optional[Tensor], kp_driving: Tensor,
                 jac_driving: Optional[Tensor], *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Mixes the K+1 Taylor motions with a softmax mask.

    mask_logits (B,K+1,H,W), keypoints (B,K,2), Jacobians (B,K,2,2) or None -> (deformation
    (B,H,W,2) = sum_k mask_k T_k(z) on the (H,W) coordinate grid, mask (B,K+1,H,W) = softmax over
    dim 1). Same Taylor motions and Jacobian floor as ``sparse_motion_inputs``.

    Dtypes: as ``sparse_motion_inputs`` with mask_logits for source: float32 keypoints may go with
    float16/bfloat16 logits. deformation and mask come in mask_logits' dtype (float16/bfloat16
    computed in float32, rounded once), the keypoint gradients in the keypoints' dtype.
    """
    op = DENSE_OP
    _validate.tensor(op, "mask_logits", mask_logits, 4, "(B,K+1,H,W)")
    K = check_keypoint_args(op, mask_logits.shape[0], kp_source, jac_source, kp_driving, jac_driving)
    if mask_logits.shape[1] != K + 1:
        raise ValueError(f"{op}: mask_logits must have K+1 = {K + 1} channels (background + {K} keypoints), "
                         f"got {_validate.describe(mask_logits)}")
    if mask_logits.shape[2] < 1 or mask_logits.shape[3] < 1:
        raise ValueError(f"{op}: mask_logits must be at least 1x1 spatially, got {_validate.describe(mask_logits)}")
    check_keypoint_dtypes(op, "mask_logits", mask_logits, kp_source, jac_source, kp_driving, jac_driving)
    _validate.finite(op, "mask_logits", mask_logits)
    chosen = _backends.select_backend(op, [mask_logits], backend)
    kp_source, jac_source, kp_driving, jac_driving = _keypoints_for(chosen.name, mask_logits, kp_source, jac_source,
                                                                    kp_driving, jac_driving)
    return _dense_op(mask_logits, kp_source, jac_source, kp_driving, jac_driving, chosen.name)
