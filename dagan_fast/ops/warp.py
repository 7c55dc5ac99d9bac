"""``warp_occlusion``: bilinear feature warping with occlusion masking, as a torch.library custom op
(``dagan_fast::warp_occlusion``) with a fake implementation and autograd, dispatched to a backend."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _backends
from ._extension import extension
from . import _validate, reference

Tensor = torch.Tensor
OP = "warp_occlusion"


@torch.library.custom_op("dagan_fast::warp_occlusion", mutates_args=())
def _warp_op(input: Tensor, grid: Tensor, occlusion: Optional[Tensor], backend: str) -> Tensor:
    return _backends.get_backend(backend).kernels[OP].forward(input, grid, occlusion)


@_warp_op.register_fake
def _(input, grid, occlusion, backend):
    return input.new_empty((input.shape[0], input.shape[1], grid.shape[1], grid.shape[2]))


@torch.library.custom_op("dagan_fast::warp_occlusion_backward", mutates_args=())
def _warp_backward_op(grad_output: Tensor, input: Tensor, grid: Tensor, occlusion: Optional[Tensor], backend: str,
                      output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    grads = _backends.get_backend(backend).kernels[OP].backward(grad_output, input, grid, occlusion, output_mask)
    return tuple(grads)


def _grads_fake(input, grid, occlusion, output_mask):
    B, Ho, Wo = grid.shape[:3]
    return (input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,)),
            grid.new_empty((B, Ho, Wo, 2)) if output_mask[1] else grid.new_empty((0,)),
            grid.new_empty((B, 1, Ho, Wo)) if output_mask[2] and occlusion is not None else grid.new_empty((0,)))


@_warp_backward_op.register_fake
def _(grad_output, input, grid, occlusion, backend, output_mask):
    return _grads_fake(input, grid, occlusion, output_mask)


def _setup_context(ctx, inputs, output):
    input, grid, occlusion, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(input, grid, occlusion)


def _backward(ctx, grad_output):
    input, grid, occlusion = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], occlusion is not None and ctx.needs_input_grad[2]]
    gi, gg, go = _warp_backward_op(grad_output, input, grid, occlusion, ctx.backend, mask)
    return gi if mask[0] else None, gg if mask[1] else None, go if mask[2] else None, None


_warp_op.register_autograd(_backward, setup_context=_setup_context)


def _compiled_forward(input, grid, occlusion):
    return torch.ops.dagan_fast.warp_occlusion_fwd(input, grid, occlusion)


def _compiled_backward(grad_output, input, grid, occlusion, output_mask):
    return torch.ops.dagan_fast.warp_occlusion_bwd(grad_output, input, grid, occlusion, list(output_mask))


_backends.get_backend("reference").register(OP, reference.warp_occlusion, reference.warp_occlusion_backward)
_backends.get_backend("cpu").register(OP, _compiled_forward, _compiled_backward)
_backends.get_backend("cuda").register(OP, _compiled_forward, _compiled_backward)

if extension().loaded:
    # Fake kernels of the compiled ops, so they trace under torch.compile / FakeTensorMode too.
    torch.library.register_fake("dagan_fast::warp_occlusion_fwd")(
        lambda input, grid, occlusion: input.new_empty((input.shape[0], input.shape[1], grid.shape[1], grid.shape[2])))
    torch.library.register_fake("dagan_fast::warp_occlusion_bwd")(
        lambda grad_output, input, grid, occlusion, output_mask: _grads_fake(input, grid, occlusion, output_mask))


def check_warp_args(input, grid, occlusion, op: str = OP) -> None:
    """Raises TypeError/ValueError naming the bad argument (see ``warp_occlusion`` for the shapes)."""
    _validate.tensor(op, "input", input, 4, "(B,C,Hi,Wi)")
    _validate.tensor(op, "grid", grid, 4, "(B,Ho,Wo,2)")
    if grid.shape[-1] != 2:
        raise ValueError(f"{op}: grid must be (B,Ho,Wo,2) with (x, y) last, got {_validate.describe(grid)}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: grid batch {grid.shape[0]} != input batch {input.shape[0]} "
                         f"(input {tuple(input.shape)}, grid {tuple(grid.shape)})")
    if input.shape[2] < 1 or input.shape[3] < 1:
        raise ValueError(f"{op}: input must be at least 1x1 spatially, got {_validate.describe(input)}")
    if occlusion is not None:
        _validate.tensor(op, "occlusion", occlusion, 4, "(B,1,Ho,Wo)")
        expected = (grid.shape[0], 1, grid.shape[1], grid.shape[2])
        if tuple(occlusion.shape) != expected:
            raise ValueError(f"{op}: occlusion must be (B,1,Ho,Wo) = {expected} to match grid {tuple(grid.shape)}, "
                             f"got {tuple(occlusion.shape)}")
    _validate.same_dtype_device(op, [("input", input), ("grid", grid), ("occlusion", occlusion)])
    _validate.finite(op, "input", input)
    _validate.finite(op, "grid", grid, allow_inf=True)
    _validate.finite(op, "occlusion", occlusion)


def warp_occlusion(input: Tensor, grid: Tensor, occlusion: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> Tensor:
    """Bilinear warp with occlusion: ``F.grid_sample(input, grid, "bilinear", "zeros",
    align_corners=False) * occlusion``, differentiable in all three inputs.

    input (B,C,Hi,Wi), grid (B,Ho,Wo,2) of (x, y) in [-1,1] (points outside, even inf, read zeros),
    occlusion (B,1,Ho,Wo) or None -> (B,C,Ho,Wo) contiguous. ``backend``: "cuda", "triton", "cpu",
    "reference" or None (fastest that fits; $DAGAN_FAST_BACKEND overrides).
    """
    check_warp_args(input, grid, occlusion)
    chosen = _backends.select_backend(OP, [input], backend)
    return _warp_op(input, grid, occlusion, chosen.name)
