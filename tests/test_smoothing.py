"""One-Euro keypoint smoothing (dagan_fast.streaming.smoothing)."""
from __future__ import annotations

import math

import pytest
import torch

from dagan_fast.streaming.smoothing import KeypointSmoother, OneEuroFilter


def alpha(cutoff: float, freq: float = 25.0) -> float:
    """Smoothing factor of the paper: 1 / (1 + tau / te), tau = 1 / (2 pi cutoff)."""
    return 1.0 / (1.0 + freq / (2 * math.pi * cutoff))


def frames_to_90_percent(beta: float) -> int:
    f = OneEuroFilter(min_cutoff=1.0, beta=beta)
    step = torch.cat([torch.zeros(10), torch.ones(60)]).double()
    out = f.filter_sequence(step)
    return int((out[10:] >= 0.9).nonzero()[0]) + 1


def test_constant_passes_unchanged():
    x = torch.randn(2, 10, 2)
    f = OneEuroFilter(min_cutoff=0.5, beta=3.0)
    for _ in range(30):
        assert torch.equal(f(x), x)


def test_white_noise_jitter_is_reduced():
    g = torch.Generator().manual_seed(0)
    level = torch.randn(1, 10, 2, generator=g)
    noisy = level + 0.01 * torch.randn(400, 1, 10, 2, generator=g)
    out = OneEuroFilter().filter_sequence(noisy)[20:]
    ratio = float((out - level).std() / (noisy[20:] - level).std())
    assert ratio < 0.5
    # an EMA with the default alpha keeps sqrt(alpha / (2 - alpha)) of white noise
    a = alpha(1.0)
    assert ratio == pytest.approx(math.sqrt(a / (2 - a)), rel=0.15)
    assert float((out.mean(0) - level).abs().max()) < 0.005            # no bias


@pytest.mark.parametrize("freq", [None, 50.0])
def test_first_steps_follow_the_paper_formula(freq):
    rate = 25.0 if freq is None else freq
    f = OneEuroFilter(min_cutoff=1.0, beta=0.0, freq=freq)
    f(torch.zeros(3, dtype=torch.float64))
    assert float(f(torch.ones(3, dtype=torch.float64))[0]) == pytest.approx(alpha(1.0, rate), rel=1e-12)
    # with beta: speed from the previous *filtered* value, low-passed at d_cutoff, raises the cutoff
    beta, d_cutoff = 2.0, 1.5
    f = OneEuroFilter(min_cutoff=1.0, beta=beta, d_cutoff=d_cutoff, freq=freq)
    f(torch.tensor([0.0], dtype=torch.float64))
    y1 = float(f(torch.tensor([1.0], dtype=torch.float64)))
    dx_hat = alpha(d_cutoff, rate) * rate
    assert y1 == pytest.approx(alpha(1.0 + beta * dx_hat, rate), rel=1e-12)
    y2 = float(f(torch.tensor([1.0], dtype=torch.float64)))
    dx_hat2 = dx_hat + alpha(d_cutoff, rate) * ((1.0 - y1) * rate - dx_hat)
    assert y2 == pytest.approx(y1 + alpha(1.0 + beta * dx_hat2, rate) * (1.0 - y1), rel=1e-12)


def test_higher_beta_follows_a_step_with_less_lag():
    lag0, lag1, lag10 = frames_to_90_percent(0.0), frames_to_90_percent(1.0), frames_to_90_percent(10.0)
    assert lag0 == math.ceil(math.log(0.1) / math.log(1 - alpha(1.0)))   # plain EMA: 11 frames at 25 Hz
    assert lag10 <= lag1 < lag0
    assert lag1 <= lag0 / 2


def test_causal():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(40, 3, 5, 2, generator=g, dtype=torch.float64)
    future = xs.clone()
    future[21:] = torch.randn(19, 3, 5, 2, generator=g, dtype=torch.float64) * 10
    a = OneEuroFilter(beta=5.0).filter_sequence(xs)
    b = OneEuroFilter(beta=5.0).filter_sequence(future)
    assert torch.equal(a[:21], b[:21])
    assert not torch.equal(a[21:], b[21:])


def test_reset_and_sequence_equals_steps():
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(15, 4, 2, generator=g)
    f = OneEuroFilter(beta=1.0)
    stepwise = torch.stack([f(x) for x in xs])
    f.reset()
    assert torch.equal(f(xs[5]), xs[5])                                 # fresh start: passes unchanged
    f.reset()
    assert torch.equal(f.filter_sequence(xs), stepwise)
    with pytest.raises(ValueError, match="reset"):
        f(torch.zeros(4, 3))


def test_dtypes_and_autograd():
    x64 = torch.randn(2, 3, 2, dtype=torch.float64)
    f = OneEuroFilter()
    assert f(x64).dtype == torch.float64 and f(x64 + 1).dtype == torch.float64
    x32 = torch.randn(2, 3, 2)
    g = OneEuroFilter()
    assert g(x32).dtype == torch.float32 and g(x32 * 2).dtype == torch.float32
    with pytest.raises(TypeError, match="floating"):
        OneEuroFilter()(torch.zeros(3, dtype=torch.int64))
    h = OneEuroFilter()
    h(torch.zeros(3))
    x = torch.ones(3, requires_grad=True)
    out = h(x)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), alpha(1.0)))
    assert not h._x.requires_grad                                       # no graph kept across frames


def test_timestamps():
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(10, 6, generator=g, dtype=torch.float64)
    by_rate = OneEuroFilter(beta=2.0, freq=30.0).filter_sequence(xs)
    by_time = OneEuroFilter(beta=2.0).filter_sequence(xs, timestamps=[i / 30.0 for i in range(10)])
    assert torch.allclose(by_rate, by_time, rtol=1e-12, atol=1e-12)
    f = OneEuroFilter()
    f(torch.zeros(1), t=0.0)
    slow = float(f(torch.ones(1), t=0.5))                              # a long gap: follows more
    assert slow == pytest.approx(alpha(1.0, freq=2.0), rel=1e-6) and slow > alpha(1.0)
    with pytest.raises(ValueError, match="increase"):
        f(torch.ones(1), t=0.5)


@pytest.mark.parametrize("kwargs", [dict(min_cutoff=0.0), dict(beta=-1.0), dict(d_cutoff=0.0),
                                    dict(freq=0.0), dict(min_cutoff=float("nan"))])
def test_parameter_checks(kwargs):
    with pytest.raises(ValueError):
        OneEuroFilter(**kwargs)


def test_keypoint_smoother_shapes_and_dict():
    g = torch.Generator().manual_seed(4)
    smoother = KeypointSmoother(min_cutoff=1.0, beta=0.0)
    kp = {"value": torch.rand(2, 10, 2, generator=g), "jacobian": torch.rand(2, 10, 2, 2, generator=g),
          "extra": "kept"}
    first = smoother(kp)
    assert first is not kp and first["extra"] == "kept"
    assert torch.equal(first["value"], kp["value"]) and torch.equal(first["jacobian"], kp["jacobian"])
    moved = {"value": kp["value"] + 1.0, "jacobian": kp["jacobian"] * 3.0}
    second = smoother(moved)
    assert second["value"].shape == (2, 10, 2) and second["jacobian"].shape == (2, 10, 2, 2)
    assert torch.allclose(second["value"], kp["value"] + alpha(1.0))
    assert torch.allclose(second["jacobian"], kp["jacobian"] * (1 + 2 * alpha(1.0)))
    assert torch.equal(moved["value"], kp["value"] + 1.0)               # input not modified
    smoother.reset()
    assert torch.equal(smoother(moved)["value"], moved["value"])
    no_jac = KeypointSmoother()({"value": kp["value"], "jacobian": None})
    assert no_jac["jacobian"] is None
    with pytest.raises(ValueError, match="jacobian"):
        KeypointSmoother()({"value": kp["value"], "jacobian": torch.rand(2, 10, 2)})
    with pytest.raises(ValueError, match="value"):
        KeypointSmoother()({"jacobian": kp["jacobian"]})
