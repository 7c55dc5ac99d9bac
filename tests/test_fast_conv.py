"""Opt-in NNPACK convolutions (``dagan_fast.models.fast_conv``): same results as nn.Conv2d within float32
rounding, same parameters, autograd and non-CPU inputs untouched, and the Animator option."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from dagan_fast import Animator
from dagan_fast.models.fast_conv import FastConv2d, fast_convolutions_available, use_fast_convolutions

from _inputs import SIZE, face, head_motion, small_model

pytestmark = pytest.mark.skipif(not fast_convolutions_available(), reason="no NNPACK in this PyTorch build")


@pytest.mark.parametrize("cin,cout,kernel,padding,bias,batch,hw", [
    (5, 7, 3, 1, True, 3, (37, 41)), (64, 32, 3, 1, False, 1, (64, 64)), (8, 3, 7, 3, True, 2, (40, 36)),
    (6, 4, 1, 0, True, 2, (33, 40)), (3, 9, 3, 0, True, 1, (35, 33))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_conv2d(cin, cout, kernel, padding, bias, batch, hw, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
    fast = copy.deepcopy(conv)
    assert use_fast_convolutions(fast) == 1 and isinstance(fast, FastConv2d)
    x = torch.randn(batch, cin, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = conv(x), fast(x)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last or not channels_last
    # relative to the sum of |w| |x| each output adds up; Winograd's transforms amplify rounding
    magnitude = float(nn.functional.conv2d(x.abs(), conv.weight.detach().abs(), padding=padding).max())
    assert float((out - ref).abs().max()) <= 1e-5 * magnitude
    assert not torch.equal(out, ref) or kernel == 1     # NNPACK really ran (another rounding)


def test_autograd_float64_and_ineligible_convs_fall_back():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    fast = copy.deepcopy(conv)
    use_fast_convolutions(fast)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    torch.testing.assert_close(fast(x), conv(x), rtol=0, atol=0)            # grad enabled: nn.Conv2d
    fast(x).sum().backward()
    assert x.grad is not None
    fast.double(), conv.double()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.double().detach()), conv(x.double().detach()), rtol=0, atol=0)
    strided = nn.Sequential(nn.Conv2d(3, 3, 3, stride=2), nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 3, 3, padding=1,
                                                                                                 padding_mode="reflect"))
    assert use_fast_convolutions(strided) == 0
    small = torch.randn(2, 4, 31, 33)                                         # below MIN_PIXELS: nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(fast.float()(small), conv.float()(small), rtol=0, atol=0)


def test_state_dict_unchanged_and_model_converted():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = use_fast_convolutions(model)
    assert count > 10
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_animator_fast_conv_matches_default():
    frames = head_motion(4)
    default = np.stack(list(Animator(small_model(), face(), size=SIZE).stream(frames)))
    fast_animator = Animator(small_model(), face(), size=SIZE, fast_conv=True)
    assert any(isinstance(m, FastConv2d) for m in fast_animator.model.modules())
    fast = np.stack(list(fast_animator.stream(frames)))
    # uint8 outputs: at most one level apart where the two roundings straddle a level
    assert np.abs(fast.astype(int) - default.astype(int)).max() <= 1
    model = small_model()
    Animator(model, face(), size=SIZE, fast_conv=True)
    assert not any(isinstance(m, FastConv2d) for m in model.modules())    # the caller's model is not modified
    with pytest.raises(ValueError, match="fast_conv"):
        Animator(small_model(), face(), size=SIZE, fast_conv=True, dtype=torch.float64)
