"""Winograd F(4x4, 3x3) convolutions (``dagan_fast.models.fast_conv``, ``dagan_fast::winograd_conv3x3``): same
results as a float64 convolution within float32 Winograd rounding, over awkward shapes, every output element
written, the fused block forms equal to the unfused ones, autograd / other dtypes / ineligible convolutions
untouched, and the Animator default."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast import Animator
from dagan_fast.models.blocks import ResBlock2d, UpBlock2d, fold_module
from dagan_fast.models.fast_conv import FastConv2d, NarrowConv2d, fast_convolutions_available, use_fast_convolutions

from _cpu_kernel_checks import NARROW_CASES, check_narrow_conv, check_winograd_filter
from _inputs import SIZE, face, head_motion, small_model

pytestmark = pytest.mark.skipif(not fast_convolutions_available(), reason="compiled op library not loaded")
winograd = torch.ops.dagan_fast.winograd_conv3x3 if fast_convolutions_available() else None


def _bound(x: torch.Tensor, w: torch.Tensor, padding: int) -> float:
    """1e-5 of the largest sum of |w| |x| an output adds up (Winograd's transforms amplify rounding ~4x)."""
    return 1e-5 * float(F.conv2d(x.detach().abs().double(), w.detach().abs().double(), padding=padding).max())


@pytest.mark.parametrize("cin,cout,batch,hw,padding,bias", [
    (5, 7, 3, (37, 41), 1, True), (64, 32, 1, (64, 64), 1, False), (19, 21, 2, (6, 13), 0, True),
    (3, 16, 1, (1, 1), 2, True), (17, 33, 2, (9, 4), 2, False), (1, 5, 1, (3, 3), 0, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_float64_convolution(cin, cout, batch, hw, padding, bias, channels_last, monkeypatch):
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")          # every element written, or NaN survives
    torch.manual_seed(cin * cout + padding)
    conv = nn.Conv2d(cin, cout, 3, padding=padding, bias=bias)
    fast = copy.deepcopy(conv)
    assert use_fast_convolutions(fast, policy="always") == 1 and isinstance(fast, FastConv2d)
    x = torch.randn(batch, cin, *hw) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, direct = fast(x), conv(x)
        ref = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                       padding=padding)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).abs().max()) <= _bound(x, conv.weight, padding)
    assert not torch.equal(out, direct) or out.numel() <= 16        # the kernel ran (another rounding)


def test_fused_prologue_upsample_residual_relu():
    torch.manual_seed(3)
    x = torch.randn(2, 24, 7, 9)
    w, b = torch.randn(20, 24, 3, 3) / 15, torch.randn(20)
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    up = F.interpolate(F.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), scale_factor=2.0)
    residual = torch.randn(2, 20, 14, 18)
    out = winograd(x, torch.ops.dagan_fast.winograd_filter(w, False), b, scale, shift, True, 1, True, residual)
    ref = F.relu(F.conv2d(up.double(), w.double(), b.double(), padding=1) + residual.double())
    assert float((out.double() - ref).abs().max()) <= _bound(up, w, 1)


def test_strided_vectors_and_residual():
    """Non-contiguous bias / pre-activation vectors and residual are read correctly."""
    torch.manual_seed(5)
    x, w = torch.randn(1, 6, 9, 7), torch.randn(5, 6, 3, 3) / 8
    pairs = torch.randn(6, 2) + 1                      # column views: stride 2
    bias = torch.randn(5, 3)[:, 1]
    residual = torch.randn(1, 5, 7, 9).transpose(2, 3)   # (1,5,9,7) with neither planar nor NHWC strides
    u = torch.ops.dagan_fast.winograd_filter(w, False)
    out = winograd(x, u, bias, pairs[:, 0], pairs[:, 1], False, 1, False, residual)
    pre = F.relu(x * pairs[:, 0].view(1, -1, 1, 1) + pairs[:, 1].view(1, -1, 1, 1))
    ref = F.conv2d(pre, w, bias, padding=1) + residual
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_kernel_argument_errors():
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(RuntimeError, match=r"weight_u must be float32 \(36,C,Co\) with C = 8"):
        winograd(x, torch.randn(36, 7, 4), None, None, None, False, 1, False, None)
    with pytest.raises(RuntimeError, match="pad must be 0, 1 or 2"):
        winograd(x, torch.randn(36, 8, 4), None, None, None, False, 3, False, None)
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU vector of 4"):
        winograd(x, torch.randn(36, 8, 4), torch.randn(5), None, None, False, 1, False, None)
    with pytest.raises(RuntimeError, match="pre_scale and pre_shift come together"):
        winograd(x, torch.randn(36, 8, 4), None, torch.randn(8), None, False, 1, False, None)
    with pytest.raises(RuntimeError, match="leaves no output pixel"):
        winograd(torch.randn(1, 8, 1, 1), torch.randn(36, 8, 4), None, None, None, False, 0, False, None)
    with pytest.raises(RuntimeError, match="input must be a float32"):
        winograd(x.double(), torch.randn(36, 8, 4), None, None, None, False, 1, False, None)


@pytest.mark.parametrize("policy", ["always", "auto"])
def test_blocks_fused_forms_match(policy):
    torch.manual_seed(4)
    blocks = nn.Sequential(ResBlock2d(32), UpBlock2d(32, 16), ResBlock2d(16))
    for m in blocks.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    blocks.eval()
    fold_module(blocks)
    fast = copy.deepcopy(blocks)
    assert use_fast_convolutions(fast, policy=policy) == 5
    x = torch.randn(1, 32, 21, 19)
    with torch.no_grad():
        ref, out = blocks(x), fast(x)
        again = fast(x)                                    # the per-shape choice made, now reused
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4 * float(ref.abs().max()))
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_other_dtypes_and_ineligible_convs_fall_back():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    fast = copy.deepcopy(conv)
    use_fast_convolutions(fast, policy="always")
    x = torch.randn(2, 4, 9, 9)
    fast.double(), conv.double()
    torch.testing.assert_close(fast(x.double().requires_grad_()), conv(x.double()), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.double()), conv(x.double()), rtol=0, atol=0)
    # neither Winograd (3x3 stride 1 ...) nor narrow (1-4 output channels, stride 1 ...)
    others = nn.Sequential(nn.Conv2d(3, 3, 3, stride=2), nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 1),
                           nn.Conv2d(3, 5, 7, padding=3), nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
                           nn.Conv2d(3, 3, 3, dilation=2), nn.Conv2d(3, 3, 3, padding=3))
    assert use_fast_convolutions(others) == 0
    narrow = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(8, 4, 7, padding=3), nn.Conv2d(2, 1, (5, 3), padding=(4, 2)))
    assert use_fast_convolutions(narrow) == 3 and all(isinstance(m, NarrowConv2d) for m in narrow)
    with pytest.raises(ValueError, match="policy must be one of"):
        use_fast_convolutions(others, policy="fastest")


def _float64_grads(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list:
    ref = copy.deepcopy(conv).double()
    xd = x.detach().double().requires_grad_()
    out = F.conv2d(xd, ref.weight, ref.bias, padding=ref.padding)
    out.backward(grad.double())
    return [out.detach(), xd.grad] + [p.grad for p in ref.parameters()]


@pytest.mark.parametrize("cin,cout,batch,hw,padding,bias", [
    (5, 7, 3, (37, 41), 1, True), (19, 21, 2, (6, 13), 0, True), (3, 16, 1, (1, 1), 2, True),
    (17, 33, 2, (9, 4), 2, False), (32, 48, 1, (20, 20), 1, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_forward_and_gradients_match_float64(cin, cout, batch, hw, padding, bias, channels_last,
                                                       monkeypatch):
    """With autograd (policy "always"): the output, the input's and every parameter's gradient equal a float64
    convolution's within Winograd's float32 rounding; output and input gradient keep the input's format."""
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    torch.manual_seed(cin + cout + padding)
    conv = nn.Conv2d(cin, cout, 3, padding=padding, bias=bias)
    fast = copy.deepcopy(conv)
    use_fast_convolutions(fast, policy="always")
    x = torch.randn(batch, cin, *hw) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = fast(x)
    grad = torch.randn(out.shape)
    out.backward(grad)
    got = [out, x.grad] + [p.grad for p in fast.parameters()]
    want = _float64_grads(conv, x, grad)
    # (a (B,C,1,1) input is contiguous in both formats: NCHW then)
    fmt = torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    assert out.grad_fn is not None and "Winograd" in type(out.grad_fn).__name__   # the kernel ran, not nn.Conv2d
    bounds = [_bound(x, conv.weight, padding),
              1e-5 * float(F.conv2d(grad.abs().double(), conv.weight.detach().abs().double().flip(2, 3)
                                    .transpose(0, 1), padding=2 - padding).max()),
              # each filter-gradient entry sums |x| |grad| over every output pixel
              1e-5 * float(torch.nn.grad.conv2d_weight(x.detach().abs().double(), conv.weight.shape,
                                                       grad.abs().double(), padding=padding).max()),
              1e-6 * float(grad.abs().sum((0, 2, 3)).max())]
    for name, g, w, bound in zip(("output", "input grad", "weight grad", "bias grad"), got, want, bounds):
        g = g.detach()
        assert torch.isfinite(g).all(), name
        assert float((g.double() - w).abs().max()) <= bound, (name, float((g.double() - w).abs().max()), bound)


def test_training_auto_policy_double_backward_and_frozen_parts():
    """policy "auto" measures once per shape and part (same results either way, within rounding); a backward
    with create_graph stays differentiable (a gradient penalty through the convolution); a frozen weight or an
    input without grad gets no gradient."""
    from dagan_fast.models import fast_conv as fc
    torch.manual_seed(5)
    conv = nn.Conv2d(24, 40, 3, padding=1)
    fast = copy.deepcopy(conv)
    use_fast_convolutions(fast)
    x = torch.randn(2, 24, 16, 16, requires_grad=True)
    before = len(fc._CHOICES)
    out = fast(x)
    out.square().sum().backward()
    keys = [k for k in fc._CHOICES if k[0] in ("forward", "input grad", "filter grad") and k[1] == tuple(x.shape)]
    assert {k[0] for k in keys} == {"forward", "input grad", "filter grad"} and len(fc._CHOICES) >= before
    want = _float64_grads(conv, x, 2 * F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1))
    torch.testing.assert_close(x.grad.double(), want[1], rtol=0, atol=1e-4 * float(want[1].abs().max()))
    # gradient penalty: d/dw |d out / d x|^2 needs the backward's own graph
    for m in (fast, conv):
        m.zero_grad(set_to_none=True)
        x2 = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(m(x2).sum(), x2, create_graph=True)
        gx.square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=0,
                               atol=1e-4 * float(conv.weight.grad.abs().max()))
    fast.zero_grad(set_to_none=True)
    fast.weight.requires_grad_(False)
    y = fast(x.detach().requires_grad_())
    y.sum().backward()
    assert fast.weight.grad is None and fast.bias.grad is not None


@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (3, 5, 7, 9), (2, 17, 1, 33), (1, 1, 4, 4), (2, 40, 3, 1)])
def test_as_channels_last_blocked_transposition(shape):
    """The kernels' NCHW -> channels_last transposition equals ``contiguous(channels_last)`` bitwise; NCHW
    output (channels_last=False) equals the channels_last one; other dtypes / layouts are copied."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape)
    y = torch.ops.dagan_fast.as_channels_last(x)
    assert torch.equal(y, x) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.ops.dagan_fast.as_channels_last(y).data_ptr() == y.data_ptr()            # already: itself
    strided = torch.randn(shape[0], shape[1], shape[2] * 2, shape[3])[:, :, ::2]
    assert torch.equal(torch.ops.dagan_fast.as_channels_last(strided), strided)
    assert torch.equal(torch.ops.dagan_fast.as_channels_last(x.double()), x.double())
    u = torch.ops.dagan_fast.winograd_filter(torch.randn(6, shape[1], 3, 3), False)
    cl = winograd(x, u, None, None, None, False, 1, False, None)
    nchw = winograd(x, u, None, None, None, False, 1, False, None, False)
    assert nchw.is_contiguous() and torch.equal(nchw, cl)


def test_training_kernel_argument_errors():
    x, gy = torch.randn(2, 8, 6, 6), torch.randn(2, 4, 6, 6)
    wgrad = torch.ops.dagan_fast.winograd_conv3x3_weight_grad
    with pytest.raises(RuntimeError, match=r"grad_output must be \(2,4,4,4\) for input \[2, 8, 6, 6\] and pad 0"):
        wgrad(x, gy, 0)
    with pytest.raises(RuntimeError, match="grad_output must be float32 .* with the input's batch"):
        wgrad(x, gy[:1], 1)
    with pytest.raises(RuntimeError, match="input must be a float32 CPU tensor"):
        wgrad(x.double(), gy, 1)
    with pytest.raises(RuntimeError, match="pad must be 0, 1 or 2, got 3"):
        wgrad(x, gy, 3)
    with pytest.raises(RuntimeError, match=r"winograd_filter: weight must be float32 CPU \(Co,C,3,3\)"):
        torch.ops.dagan_fast.winograd_filter(torch.randn(4, 8, 5, 5), False)


def test_state_dict_unchanged_and_weight_changes_seen():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_convolutions(model) > 10
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    use_fast_convolutions(conv, policy="always")
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2)                                                # in place: re-transformed
        torch.testing.assert_close(conv(x) - conv.bias.view(1, -1, 1, 1),
                                   2 * (first - conv.bias.view(1, -1, 1, 1)), rtol=0, atol=1e-5)


def test_filter_transform_matches_float64():
    check_winograd_filter(seed=5)


def test_training_reuses_filters_until_the_weight_changes():
    """The transformed filters (forward and flipped) are made once per weight version: a second step with the
    same weights (gradient accumulation) reuses them; an optimizer step makes them again, and the gradients
    follow the new weights."""
    torch.manual_seed(11)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    use_fast_convolutions(conv, policy="always")
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    conv(x).square().sum().backward()
    held = {t: u for t, (_, u) in conv._wino.filters.items()}
    assert set(held) == {False, True}
    conv(x).square().sum().backward()
    assert all(conv._wino.filters[t][1] is held[t] for t in held)
    torch.optim.SGD(conv.parameters(), lr=0.1).step()
    x.grad = None
    conv(x).square().sum().backward()
    assert all(conv._wino.filters[t][1] is not held[t] for t in held)
    xr = x.detach().double().requires_grad_()
    F.conv2d(xr, conv.weight.double(), conv.bias.double(), padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", NARROW_CASES)
def test_narrow_kernel_matches_float64(case, monkeypatch):
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")          # every element written, or NaN survives
    check_narrow_conv(case, seed=3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,kernel,padding,bias", [(64, 3, 7, 3, True), (13, 1, 5, (2, 1), False),
                                                          (9, 4, (3, 1), (1, 0), True)])
def test_narrow_module_inference_and_training(cin, cout, kernel, padding, bias, channels_last, monkeypatch):
    """Convolutions to 1-4 channels become NarrowConv2d: inference (channels_last out) and training (output,
    input and parameter gradients, in the input's format) equal a float64 convolution within float32
    rounding; the training forward is the kernel's (its own autograd node)."""
    monkeypatch.setenv("DAGAN_FAST_POISON", "1")
    torch.manual_seed(cin + cout)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
    fast = copy.deepcopy(conv)
    assert use_fast_convolutions(fast, policy="always") == 1 and isinstance(fast, NarrowConv2d)
    x = torch.randn(2, cin, 11, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fast(x)
    x.requires_grad_()
    y = fast(x)
    grad = torch.randn(y.shape)
    y.backward(grad)
    want = _float64_grads(conv, x, grad)
    assert out.is_contiguous(memory_format=torch.channels_last) and "Narrow" in type(y.grad_fn).__name__
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    for name, g, w in zip(("inference", "output", "input grad", "weight grad", "bias grad"),
                          [out, y, x.grad] + [p.grad for p in fast.parameters()], [want[0]] + want):
        bound = 1e-5 * (float(w.abs().max()) + 1)
        assert torch.isfinite(g).all() and float((g.detach().double() - w).abs().max()) <= bound, name


def test_narrow_auto_policy_double_backward_and_errors():
    """policy "auto" records its choices; a create_graph backward stays differentiable; bad arguments name
    what they got."""
    from dagan_fast.models import fast_conv as fc
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 3, 7, padding=3)
    fast = copy.deepcopy(conv)
    use_fast_convolutions(fast)
    x = torch.randn(1, 8, 12, 12, requires_grad=True)
    with torch.no_grad():
        fast(x)
    (g,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert {("narrow inference", tuple(x.shape)), ("narrow forward", tuple(x.shape))} <= {k[:2] for k in fc._CHOICES}
    conv.zero_grad()
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(conv(x2).square().sum(), x2, create_graph=True)
    g2.square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=1e-4, atol=1e-4)
    op = torch.ops.dagan_fast.narrow_conv2d
    w, b = torch.randn(3, 8, 7, 7), torch.randn(3)
    with pytest.raises(RuntimeError, match=r"weight must be float32 CPU \(Co,C,kh,kw\) with 1 <= Co <= 4 and C = 8"):
        op(x.detach(), torch.randn(5, 8, 7, 7), None, 3, 3)
    with pytest.raises(RuntimeError, match="C = 8 .* got Float \\[3, 6, 7, 7\\]"):
        op(x.detach(), torch.randn(3, 6, 7, 7), None, 3, 3)
    with pytest.raises(RuntimeError, match=r"padding must be below the 7x7 kernel size and >= 0, got \(7, 3\)"):
        op(x.detach(), w, b, 7, 3)
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU vector of 3 values, got Float \\[4\\]"):
        op(x.detach(), w, torch.randn(4), 3, 3)
    with pytest.raises(RuntimeError, match="input must be a float32 CPU tensor"):
        op(x.detach().double(), w, b, 3, 3)
    with pytest.raises(RuntimeError, match="a 7x7 kernel with padding \\(0, 0\\) does not fit the 5x12 input"):
        op(torch.randn(1, 8, 5, 12), w, b, 0, 0)


def test_flop_counter_counts_the_direct_convolution():
    from torch.utils.flop_counter import FlopCounterMode
    use_fast_convolutions(nn.Conv2d(8, 5, 3))                # registers the formula
    x, u = torch.randn(2, 8, 10, 10), torch.randn(36, 8, 5)
    with FlopCounterMode(display=False) as counter:
        winograd(x, u, None, None, None, False, 1, False, None)
    assert counter.get_total_flops() == 2 * 8 * 5 * 9 * 2 * 10 * 10
    with FlopCounterMode(display=False) as counter:
        torch.ops.dagan_fast.narrow_conv2d(x, torch.randn(3, 8, 7, 5), None, 3, 2)
    assert counter.get_total_flops() == 2 * 8 * 7 * 5 * 3 * 2 * 10 * 10


def test_animator_fast_conv_default_and_opt_out():
    frames = head_motion(4)
    default_animator = Animator(small_model(), face(), size=SIZE, dtype=torch.float32)
    assert default_animator.fast_conv and "Winograd" in default_animator.describe()
    assert any(isinstance(m, FastConv2d) for m in default_animator.model.modules())
    assert any(isinstance(m, NarrowConv2d) for m in default_animator.model.modules())     # the last 7x7 to RGB
    direct_animator = Animator(small_model(), face(), size=SIZE, dtype=torch.float32, fast_conv=False)
    assert not any(isinstance(m, FastConv2d) for m in direct_animator.model.modules())
    for m in default_animator.model.modules():
        if isinstance(m, (FastConv2d, NarrowConv2d)):
            m.policy = "always"
    fast = np.stack(list(default_animator.stream(frames)))
    direct = np.stack(list(direct_animator.stream(frames)))
    # uint8 outputs: at most one level apart where the two roundings straddle a level
    assert np.abs(fast.astype(int) - direct.astype(int)).max() <= 1
    model = small_model()
    Animator(model, face(), size=SIZE, dtype=torch.float32)
    assert not any(isinstance(m, FastConv2d) for m in model.modules())    # the caller's model is untouched
    with pytest.raises(ValueError, match="fast_conv=True runs float32 on the CPU only"):
        Animator(small_model(), face(), size=SIZE, dtype=torch.bfloat16, fast_conv=True)
