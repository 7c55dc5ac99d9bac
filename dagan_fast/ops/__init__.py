"""dagan_fast.ops: the hot ops of DaGAN/DaGAN++ with pluggable backends.

- ``warp_occlusion(input, grid, occlusion=None)``: grid_sample(bilinear, zeros) * occlusion
- ``cross_modal_attention(q, k, v, scale=None)``: flash-style attention, Dqk != Dv allowed
- ``sparse_motion_inputs(source, kp_s, jac_s, kp_d, jac_d, variance)``: dense-motion hourglass input
- ``dense_motion(mask_logits, kp_s, jac_s, kp_d, jac_d)``: (deformation, mask)

Every op takes ``backend=`` ("cuda", "triton", "cpu", "reference"); by default the fastest backend
that supports the inputs runs. ``available_backends()`` says what this install has, and why not;
``cpu_capability()`` which CPU vector paths are in use.
"""
from ._backends import BackendError, BackendInfo, available_backends
from . import reference
from ._cpu import cpu_capability, cpu_capability_summary
from ._validate import skip_value_checks
from .attention import attention_with_lse, cross_modal_attention
from .motion import dense_motion, sparse_motion_inputs
from .warp import warp_occlusion

__all__ = [
    "BackendError", "BackendInfo", "available_backends", "attention_with_lse", "cpu_capability",
    "cpu_capability_summary", "cross_modal_attention",
    "dense_motion", "reference", "skip_value_checks", "sparse_motion_inputs", "warp_occlusion",
]
