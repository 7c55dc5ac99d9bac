"""dagan_fast.Animator: streaming, batched offline mode, reference frames, input handling, memory.

The model is a small DaGAN (same architecture, fewer channels, 3 hourglass blocks so 64x64 runs) with
seeded random weights (attention gamma and Jacobian head non-trivial), saved and loaded through
safetensors. The driving clip is the scikit-image astronaut face with smooth synthetic head motion.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import gpu
from _inputs import SIZE, SMALL, face, head_motion, small_model
from dagan_fast import Animator, DaGAN
from dagan_fast.streaming import _hull_normalised


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    small_model().save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model(model_path):
    return DaGAN.load(model_path)


@pytest.fixture(scope="module")
def clip():
    return head_motion(30)


def test_stream_one_output_per_input(model_path, clip):
    animator = Animator(model_path, face(), size=SIZE)     # the path argument, safetensors
    outs = list(animator.stream(iter(clip)))
    assert len(outs) == len(clip)
    for out in outs:
        assert isinstance(out, np.ndarray) and out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert animator.frames_seen == 30
    assert np.stack(outs).std() > 1.0                       # a picture, not a flat image
    tensors = list(animator.stream(torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in clip[:3]))
    assert all(t.shape == (3, SIZE, SIZE) and t.dtype == torch.float32 for t in tensors)
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t in tensors)


def test_stream_is_lazy(model, clip):
    consumed = []

    def frames():
        for i, f in enumerate(clip):
            consumed.append(i)
            yield f

    gen = Animator(model, face(), size=SIZE).stream(frames())
    next(gen)
    assert consumed == [0]
    next(gen)
    assert consumed == [0, 1]


def test_source_work_is_cached(model, clip, monkeypatch):
    animator = Animator(model, face(), size=SIZE)
    calls = []
    original = animator.model.generator.encode_source
    monkeypatch.setattr(animator.model.generator, "encode_source", lambda *a, **k: calls.append(1) or original(*a, **k))
    list(animator.stream(clip[:3]))
    assert calls == []
    assert {"features", "query", "small", "image"} <= set(animator.prepared.features)


@pytest.mark.parametrize("options", [dict(), dict(reference="best", best_frames=4, smoothing=True),
                                     dict(reference=2, adapt_scale=True), dict(relative=False)],
                         ids=["first", "best+smooth", "index2+adapt", "absolute"])
def test_stream_equals_animate_video(model, clip, options):
    frames = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in clip[:11]]
    a = Animator(model, face(), size=SIZE, **options)
    streamed = list(a.stream(frames))
    a.reset()
    batched = list(a.animate_video(frames, batch_size=4))
    assert len(streamed) == len(batched) == 11
    err = max(float((s - b).abs().max()) for s, b in zip(streamed, batched))
    assert err <= 1e-5, err


def test_first_output_reproduces_source_pose(model, clip):
    """With reference="first", frame 0 drives the generator with exactly the source keypoints (kp_source +
    0) and Jacobians J0 inv(J0) Js = Js; later frames move away from them. (The keypoints detected on the
    output image are not compared: with random weights that relation is not meaningful.)"""
    a = Animator(model, face(), size=SIZE, reference="first")
    gen = a.stream(clip)
    next(gen)
    src = a.prepared.kp
    assert torch.equal(a.last_keypoints["norm"]["value"], src["value"])
    torch.testing.assert_close(a.last_keypoints["norm"]["jacobian"], src["jacobian"], atol=1e-5, rtol=1e-5)
    for _ in range(7):
        next(gen)
    assert float((a.last_keypoints["norm"]["value"] - src["value"]).abs().max()) > 1e-4


def test_reset_reference(model, clip):
    a = Animator(model, face(), size=SIZE)
    src = a.prepared.kp["value"]
    gen = a.stream(clip)
    for i in range(10):
        next(gen)
    assert not torch.equal(a.last_keypoints["norm"]["value"], src)
    a.reset_reference()
    next(gen)           # frame 10 is the new reference: the source pose again
    assert torch.equal(a.last_keypoints["norm"]["value"], src)
    next(gen)           # frame 11 relative to frame 10
    expected = a.last_keypoints["driving"]["value"] - a._ref["value"] + src
    assert torch.equal(a.last_keypoints["norm"]["value"], expected)


def test_reference_index_delays_and_errors(model, clip):
    consumed = []

    def frames(n):
        for i, f in enumerate(clip[:n]):
            consumed.append(i)
            yield f

    a = Animator(model, face(), size=SIZE, reference=3)
    gen = a.stream(frames(6))
    next(gen)
    assert consumed == [0, 1, 2, 3]       # frame 0's output needs frame 3 (the reference)
    outs = [next(gen) for _ in range(3)]  # frames 1, 2, 3
    assert torch.equal(a.last_keypoints["norm"]["value"], a.prepared.kp["value"])
    assert len(outs) == 3 and len(list(gen)) == 2
    with pytest.raises(ValueError, match="reference=3"):
        list(Animator(model, face(), size=SIZE, reference=3).stream(clip[:3]))


def test_best_reference_is_causal(model, clip):
    n = 6
    a = Animator(model, face(), size=SIZE, reference="best", best_frames=n)
    src_n = _hull_normalised(a.prepared.kp["value"][0])
    norms, drivings = [], []
    for _ in a.stream(clip[:10]):
        norms.append(a.last_keypoints["norm"]["value"])
        drivings.append(a.last_keypoints["driving"]["value"])
    scores = [float(((src_n - _hull_normalised(d[0])) ** 2).sum()) for d in drivings]
    for i in range(10):
        best = int(np.argmin(scores[:min(i, n - 1) + 1]))          # best among frames seen (first n)
        expected = drivings[i] - drivings[best] + a.prepared.kp["value"]
        assert torch.equal(norms[i], expected), i


def test_frames_of_other_kinds_and_sizes(model):
    a = Animator(model, face(), size=SIZE)
    rgb = head_motion(1, 100)[0]
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    wide = cv2.resize(rgb, (140, 90))
    outs = list(a.stream([rgb, gray, rgba, wide, gray[:, :, None]]))
    assert [o.shape for o in outs] == [(SIZE, SIZE, 3)] * 5
    # RGBA (alpha dropped) = RGB
    a.reset()
    first = list(a.stream([rgb, rgba]))
    a.reset()
    again = list(a.stream([rgb, rgb]))
    assert np.array_equal(first[1], again[1])


def test_bad_inputs(model, model_path, clip, tmp_path):
    a = Animator(model, face(), size=SIZE)
    with pytest.raises(ValueError, match="no frames"):
        list(a.stream([]))
    with pytest.raises(ValueError, match="frame 1.*channels"):
        list(Animator(model, face(), size=SIZE).stream([clip[0], np.zeros((64, 64, 2), np.uint8)]))
    with pytest.raises(ValueError, match=r"frame 0.*\[0, 1\]"):
        list(a.stream([torch.full((3, SIZE, SIZE), 255.0)]))
    with pytest.raises(ValueError, match="NaN"):
        list(a.stream([torch.full((3, SIZE, SIZE), float("nan"))]))
    with pytest.raises(TypeError, match="frames must be an iterable"):
        list(a.stream(42))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        Animator(model, str(bad), size=SIZE)
    with pytest.raises(FileNotFoundError):
        Animator(model, str(tmp_path / "missing.png"), size=SIZE)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Animator(str(tmp_path / "missing.safetensors"), face())
    official = tmp_path / "ckpt.pth.tar"
    official.write_bytes(b"x")
    with pytest.raises(ValueError, match="depth_encoder"):
        Animator(str(official), face())
    with pytest.raises(ValueError, match="multiple of"):
        Animator(model, face(), size=100)
    with pytest.raises(ValueError, match="CUDA"):
        Animator(model, face(), size=SIZE, dtype=torch.float16)
    with pytest.raises(ValueError, match="reference"):
        Animator(model, face(), size=SIZE, reference="last")


def test_non_face_source_with_face_crop(model):
    from dagan_fast.face import NoFaceError

    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError):
        Animator(model, noise, size=SIZE, face_crop=True)


def test_model_not_modified(clip):
    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    Animator(m, face(), size=SIZE)
    assert not m.inference_only and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_memory_flat_over_500_frames(model):
    frames = head_motion(25)
    a = Animator(model, face(), size=SIZE, smoothing=True)

    def clip500():
        for i in range(500):
            yield frames[i % len(frames)]

    rss = []
    for i, _ in enumerate(a.stream(clip500())):
        if i in (100, 499):
            rss.append(_rss_bytes())
    growth = rss[1] - rss[0]
    assert growth < 8 * 2 ** 20, f"RSS grew by {growth / 2 ** 20:.1f} MiB over 400 frames"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_psnr(model, clip, dtype):
    frames = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in clip[:6]]
    ref = list(Animator(model, face(), size=SIZE, device="cuda", cuda_graphs=False).stream(frames))
    low = list(Animator(model, face(), size=SIZE, device="cuda", dtype=dtype).stream(frames))
    for r, l in zip(ref, low):
        mse = float(((r - l.float()) ** 2).mean())
        assert 10 * np.log10(1.0 / max(mse, 1e-12)) > 40


@gpu
def test_gpu_graphs_match_eager_and_cpu(model, clip):
    frames = clip[:6]
    cpu = [torch.from_numpy(o).float() for o in Animator(model, face(), size=SIZE).stream(frames)]
    eager = list(Animator(model, face(), size=SIZE, device="cuda", cuda_graphs=False).stream(frames))
    graphed = list(Animator(model, face(), size=SIZE, device="cuda").animate_video(frames, batch_size=4))
    for c, e, g in zip(cpu, eager, graphed):
        assert np.abs(e.astype(int) - g.astype(int)).max() <= 1
        assert (c - torch.from_numpy(e).float()).abs().max() <= 2


def test_sizes_below_the_depth_network_minimum_are_rejected_clearly():
    model = DaGAN(**SMALL)
    assert model.size_multiple == 32 and model.min_size == 64
    with pytest.raises(ValueError, match=r"(source|driving) is 32x32, but H and W must be multiples of 32 and at least 64"):
        model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"size must be a multiple of 32 .* and at least 64"):
        Animator(model, face(), size=32)
    assert model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))["prediction"].shape == (1, 3, 64, 64)
