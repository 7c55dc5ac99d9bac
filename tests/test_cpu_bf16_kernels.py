"""bfloat16 in the C++ CPU kernels (warp_occlusion, cross_modal_attention, sparse_motion_inputs,
dense_motion), forward and backward, against the float64 reference with the derived tolerances of
tests/_cpu_kernel_checks.py: random inputs (never zeros), awkward shapes (primes, 1x1, channels not a
multiple of the vector width, channels_last, non-contiguous views), poisoned outputs, bitwise
determinism, the vector paths against the scalar definition, dispatch and the dtype contract."""
from __future__ import annotations

import pytest
import torch

from dagan_fast import ops
from dagan_fast.ops import _backends
from dagan_fast.ops._extension import extension, has_kernel

import _cpu_kernel_checks as C

pytestmark = pytest.mark.skipif(not (extension().loaded and has_kernel("warp_occlusion_fwd", "CPU")),
                                reason="needs the compiled op library with its CPU kernels")

BF16 = torch.bfloat16


@pytest.mark.parametrize("case", C.WARP_CASES, ids=str)
@pytest.mark.parametrize("occlusion", [True, False], ids=["occ", "no-occ"])
def test_warp_bf16_matches_reference(case, occlusion, poison_outputs):
    C.check_warp(case, BF16, seed=1, with_occlusion=occlusion)


@pytest.mark.parametrize("case", C.ATTENTION_CASES, ids=str)
def test_attention_bf16_matches_reference(case, poison_outputs):
    C.check_attention(case, BF16, seed=2)


@pytest.mark.parametrize("case", C.MOTION_CASES, ids=str)
def test_motion_bf16_matches_reference(case, poison_outputs):
    C.check_motion(case, BF16, seed=3)


def _runs():
    """Each kernel family once on an awkward bfloat16 case: (name, callable returning every output)."""
    w = C.warp_inputs((1, 37, 9, 10, 8, 71, "channels_last"), BF16, seed=4)
    wp = C.warp_inputs((2, 13, 17, 23, 19, 67, "nchw"), BF16, seed=5)
    a = C.attention_inputs((1, 2, 131, 257, 32, 17, "contiguous"), BF16, seed=6)
    m = C.motion_inputs((2, 5, 3, 17, 19, "contiguous"), BF16, seed=7)
    return [("warp channels_last", lambda: C.warp_run(*w)), ("warp nchw", lambda: C.warp_run(*wp)),
            ("attention", lambda: C.attention_run(*a)), ("motion", lambda: C.motion_run(*m))]


@pytest.mark.parametrize("index", range(4), ids=["warp-cl", "warp-nchw", "attention", "motion"])
def test_bf16_bitwise_deterministic(index, poison_outputs):
    name, run = _runs()[index]
    first, second = run(), run()
    for i, (x, y) in enumerate(zip(first, second)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name} output {i} differs between two runs"
        assert not torch.isnan(x.float()).any(), f"{name} output {i} left a poisoned (unwritten) element"


@pytest.mark.parametrize("case", [c for c in C.WARP_CASES if c[1] >= 3], ids=str)
def test_warp_bf16_vector_forward_is_the_scalar_definition(case, monkeypatch):
    # The AVX2/AVX-512 bfloat16 tiles run the generic kernel's float32 operations in its order and
    # round once like c10::BFloat16: the same bits (DAGAN_FAST_WARP_SCALAR=1 forces the generic code).
    x, grid, occ, _ = C.warp_inputs(case, BF16, seed=8)
    vector = torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ)
    monkeypatch.setenv("DAGAN_FAST_WARP_SCALAR", "1")
    scalar = torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ)
    assert torch.equal(vector, scalar)


@pytest.mark.parametrize("case", [(1, 2, 9, 11, 4, 6, "contiguous"), (2, 1, 33, 17, 8, 40, "contiguous")])
def test_attention_bf16_padded_flash_forward_matches_reference(case):
    # bf16 with Dqk < Dv: the cpu backend zero-pads q and k to Dv and runs ATen's flash kernel
    cpu_forward = _backends.get_backend("cpu").kernels["cross_modal_attention"].forward
    C.check_attention(case, BF16, seed=5, forward=cpu_forward, lse_dtype=BF16)  # asserts every output


def test_bf16_cpu_tensors_dispatch_to_the_cpu_kernels():
    x, grid, occ, _ = C.warp_inputs((1, 8, 5, 6, 7, 9, "nchw"), BF16)
    q, k, v, _, scale = C.attention_inputs((1, 2, 9, 11, 4, 6, "contiguous"), BF16)
    src, logits, kp_s, jac_s, kp_d, jac_d, *_ = C.motion_inputs((1, 3, 2, 5, 6, "contiguous"), BF16)
    for op, first in (("warp_occlusion", x), ("cross_modal_attention", q), ("sparse_motion_inputs", src),
                      ("dense_motion", logits)):
        assert _backends.select_backend(op, [first]).name == "cpu", op
    assert torch.equal(ops.warp_occlusion(x, grid, occ), torch.ops.dagan_fast.warp_occlusion_fwd(x, grid, occ))
    out = ops.cross_modal_attention(q, k, v, scale=scale)
    cpu_forward = _backends.get_backend("cpu").kernels["cross_modal_attention"].forward
    assert out.dtype == BF16 and torch.equal(out, cpu_forward(q, k, v, scale)[0])
    sparse = ops.sparse_motion_inputs(src, kp_s, jac_s, kp_d, jac_d)
    assert sparse.dtype == BF16
    assert torch.equal(sparse, torch.ops.dagan_fast.sparse_motion_inputs_fwd(src, kp_s, jac_s, kp_d, jac_d, 0.01))


def test_motion_float32_keypoints_with_bf16_image_autograd():
    src, logits, kp_s, jac_s, kp_d, jac_d, *_ = C.motion_inputs((2, 4, 3, 9, 11, "contiguous"), BF16, seed=9)
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (src, logits, kp_s, jac_s, kp_d, jac_d)]
        s, lg, ks, js, kd, jd = leaves
        sparse = ops.sparse_motion_inputs(s, ks, js, kd, jd, backend=backend)
        deformation, mask = ops.dense_motion(lg, ks, js, kd, jd, backend=backend)
        assert sparse.dtype == deformation.dtype == mask.dtype == BF16
        (sparse.float().square().sum() + deformation.float().sum() + mask.float().square().sum()).backward()
        assert s.grad.dtype == lg.grad.dtype == BF16, backend
        assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in (ks, js, kd, jd)), backend


def test_motion_keypoints_cast_for_single_dtype_backends():
    src, _, kp_s, jac_s, kp_d, jac_d, *_ = C.motion_inputs((1, 2, 1, 3, 3, "contiguous"), BF16)
    from dagan_fast.ops import motion as M

    kept = M._keypoints_for("cpu", src, kp_s, jac_s, kp_d, None)
    assert kept[0] is kp_s and kept[3] is None
    cast = M._keypoints_for("cuda", src, kp_s, jac_s, kp_d, None)
    assert [t.dtype for t in cast[:3]] == [BF16] * 3 and cast[3] is None


def test_dtype_errors_name_the_argument():
    x, grid, occ, _ = C.warp_inputs((1, 3, 4, 5, 4, 5, "nchw"), BF16)
    with pytest.raises(TypeError, match=r"grid has dtype torch.float32 but input has torch.bfloat16"):
        ops.warp_occlusion(x, grid.float(), occ)
    with pytest.raises(RuntimeError, match=r"grid dtype Float != input dtype BFloat16"):
        torch.ops.dagan_fast.warp_occlusion_fwd(x, grid.float(), occ)
    src, logits, kp_s, jac_s, kp_d, jac_d, *_ = C.motion_inputs((1, 2, 1, 3, 3, "contiguous"), BF16)
    with pytest.raises(TypeError, match=r"kp_source has dtype torch.float64 but source has torch.bfloat16.*"
                                        r"torch.bfloat16 or torch.float32"):
        ops.sparse_motion_inputs(src, kp_s.double(), None, kp_d.double(), None)
    with pytest.raises(TypeError, match=r"jac_driving has dtype torch.bfloat16 but mask_logits has torch.bfloat16 "
                                        r"and kp_source has torch.float32"):
        ops.dense_motion(logits, kp_s, jac_s, kp_d, jac_d.to(BF16))
    with pytest.raises(TypeError, match=r"kp_source has dtype torch.bfloat16 but source has torch.float32"):
        ops.sparse_motion_inputs(src.float(), kp_s.to(BF16), None, kp_d.to(BF16), None)
    with pytest.raises(RuntimeError, match=r"kp_source must be BFloat16 or float32 \(the dtype of source"):
        torch.ops.dagan_fast.sparse_motion_inputs_fwd(src, kp_s.double(), None, kp_d.double(), None, 0.01)
    with pytest.raises(RuntimeError, match=r"kp_driving \(against kp_source\) dtype"):
        torch.ops.dagan_fast.dense_motion_fwd(logits, kp_s, None, kp_d.to(BF16), None)
