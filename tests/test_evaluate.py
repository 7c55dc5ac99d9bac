"""training.metrics (L1, PSNR, SSIM, TCM, LPIPS) against hand-computed and skimage values, the face split
of SyntheticClips, and training.evaluate (function and CLI) on a tiny random DaGAN."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dagan_fast.checkpoints import CheckpointMismatchError
from training import metrics
from training.metrics import LPIPS, TemporalConsistency, farneback_flow, l1, psnr, ssim, tcm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _translating_video(frames=4, size=48, dx=2, dy=1, seed=0):
    """A smooth random texture moving by (dx, dy) pixels per frame: (T,3,size,size) in [0,1]."""
    coarse = _rand(1, 3, size // 4 + 4, size // 4 + 4, seed=seed)
    texture = F.interpolate(coarse, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]
    return torch.stack([texture[:, 4 + dy * t:4 + dy * t + size, 4 + dx * t:4 + dx * t + size] for t in range(frames)])


# --------------------------------------------------------------------------------------------
# L1 / PSNR / SSIM
# --------------------------------------------------------------------------------------------
def test_l1_and_psnr_by_hand():
    a = 0.2 + 0.6 * _rand(3, 3, 16, 20, seed=1, dtype=torch.float64)
    signs = torch.where(_rand(3, 3, 16, 20, seed=2) < 0.5, -1.0, 1.0).double()
    steps = torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64).view(3, 1, 1, 1)
    b = a + steps * signs  # |a - b| = step everywhere: L1 = step, MSE = step^2
    assert torch.allclose(l1(a, b), torch.tensor([0.1, 0.05, 0.02], dtype=torch.float64), atol=1e-12)
    # 10 log10(1 / 0.01) = 20 dB, 10 log10(1 / 0.0025) = 26.0206 dB, 10 log10(1 / 0.0004) = 33.9794 dB
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 26.020600, 33.979400], dtype=torch.float64), atol=1e-5)
    assert psnr(a[0], b[0]).shape == () and float(psnr(a[0], b[0])) == pytest.approx(20.0)
    assert float(l1(a[2], b[2])) == pytest.approx(0.02)
    assert math.isinf(float(psnr(a[1], a[1])))


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    a = _rand(3, 3, 40, 48, seed=3, dtype=torch.float64)
    noise = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = (a + torch.tensor([0.05, 0.2, 0.6], dtype=torch.float64).view(3, 1, 1, 1) * noise).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(3):
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert abs(float(ours[i]) - ref) < 1e-4, (i, float(ours[i]), ref)
    assert ours[0] > ours[1] > ours[2]  # more noise, less similar
    assert float(ssim(a[0], a[0])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [l1, psnr, ssim])
def test_metrics_reject_bad_inputs(fn):
    a = _rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        fn(a, a[:1])
    bad = a.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="b contains NaN"):
        fn(a, bad)
    with pytest.raises(ValueError, match=r"a must be \(B,3,H,W\)"):
        fn(a[:, :2], a[:, :2])
    with pytest.raises(ValueError, match=r"in \[0,1\]"):
        fn(a * 255, a * 255)
    with pytest.raises(TypeError, match="dtype torch.uint8"):
        fn((a * 255).to(torch.uint8), a)


def test_ssim_needs_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_rand(3, 8, 16), _rand(3, 8, 16))


# --------------------------------------------------------------------------------------------
# TCM
# --------------------------------------------------------------------------------------------
def test_tcm_perfect_and_scaled_results():
    gt = _translating_video()
    assert tcm(gt, gt) == 1.0
    # The warp is linear and keeps constants, so an affine copy a * gt + c has warping residuals |a|
    # times the ground truth's: TCM = exp(-|1/a - 1|) exactly.
    assert tcm(gt, 0.5 * gt + 0.25) == pytest.approx(math.exp(-1.0), abs=1e-5)
    assert tcm(gt, 0.8 * gt + 0.1) == pytest.approx(math.exp(-0.25), abs=1e-5)


def test_tcm_noisy_result_is_less_consistent():
    gt = _translating_video()
    noise = torch.randn(gt.shape, generator=torch.Generator().manual_seed(5))
    slightly = tcm(gt, (gt + 0.01 * noise).clamp(0, 1))
    very = tcm(gt, (gt + 0.1 * noise).clamp(0, 1))
    assert 0 < very < slightly < 1
    assert math.exp(-1) < very < 0.5  # a residual larger than the ground truth's: terms floor at exp(-1)


def test_tcm_on_a_pure_translation():
    dx, dy = 2, 1
    gt = _translating_video(dx=dx, dy=dy)
    flow = farneback_flow(gt[1], gt[0])
    # T_{t-1<-t}: frame t at x shows frame t-1 at x + (dx, dy)
    assert flow.shape == (48, 48, 2)
    assert np.median(flow[..., 0]) == pytest.approx(dx, abs=0.05)
    assert np.median(flow[..., 1]) == pytest.approx(dy, abs=0.05)
    assert np.abs(flow[8:-8, 8:-8] - np.array([dx, dy])).mean() < 0.05
    frozen = gt[:1].expand_as(gt)
    acc = TemporalConsistency()
    acc.update(gt[:2], frozen[:2])  # in two chunks: the accumulator carries the previous frame over
    acc.update(gt[2:], frozen[2:])
    assert len(acc.terms) == len(gt) - 1
    for t in range(1, len(gt)):
        unwarped = float((gt[t] - gt[t - 1]).double().norm())
        # compensating the motion removes most of the ground truth's change (what is left: the borders)
        assert acc.gt_norms[t - 1] < 0.25 * unwarped
        # a frozen video warped by the translation differs from itself by about one frame step
        assert acc.result_norms[t - 1] == pytest.approx(unwarped, rel=0.05)
    # g/r in [0, 0.25]: every term in [exp(-1), exp(-0.75)]
    assert math.exp(-1) <= acc.value() <= math.exp(-0.75)
    assert acc.value() == pytest.approx(tcm(gt, frozen))


def test_tcm_input_errors():
    gt = _translating_video(frames=3)
    with pytest.raises(ValueError, match="at least 2 frames"):
        tcm(gt[:1], gt[:1])
    with pytest.raises(ValueError, match="same shape"):
        tcm(gt, gt[:2])
    with pytest.raises(ValueError, match=r"video \(T,3,H,W\)"):
        tcm(gt[0], gt[0])


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------
def _backbone_state(net: str, seed: int = 0):
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in metrics.LPIPSBackbone(net).features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry a classifier LPIPS ignores
    return state


def _linear_state(net: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    # The released weights are non-negative (LPIPS clamps them in training).
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for i, c in enumerate(metrics.LPIPS_NETS[net]["channels"])}


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    backbone, linear = root / "alexnet.pth", root / "alex.pth"
    torch.save(_backbone_state("alex"), backbone)
    torch.save(_linear_state("alex"), linear)
    return str(backbone), str(linear)


def test_lpips_properties(alex_files):
    lp = LPIPS(*alex_files)
    assert lp.net == "alex"
    x, y = _rand(2, 3, 64, 64, seed=6), _rand(2, 3, 64, 64, seed=7)
    assert torch.equal(lp(x, x), torch.zeros(2))
    d = lp(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert torch.allclose(d, lp(y, x), rtol=1e-6, atol=0)
    assert lp(x[0], y[0]).shape == () and float(lp(x[0], y[0])) == pytest.approx(float(d[0]), rel=1e-5)
    near = (x + 0.02 * (y - x)).clamp(0, 1)
    assert bool((lp(x, near) < d).all())  # a closer image is nearer
    with pytest.raises(ValueError, match="same shape"):
        lp(x, y[:1])


def test_lpips_first_layer_by_hand(alex_files, tmp_path):
    """Only lin0 non-zero: LPIPS = spatial mean of sum_c w_c (n_x - n_y)^2 with n the channel-normalised
    relu1 of AlexNet's first convolution on the scaled input (2x - 1 - shift) / scale."""
    backbone, _ = alex_files
    lin = {k: torch.zeros_like(v) for k, v in _linear_state("alex").items()}
    w = torch.rand(1, 64, 1, 1, generator=torch.Generator().manual_seed(8))
    lin["lin0.model.1.weight"] = w
    torch.save(lin, tmp_path / "lin0_only.pth")
    lp = LPIPS(backbone, str(tmp_path / "lin0_only.pth"))
    state = torch.load(backbone, weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def relu1(img):
        f = F.relu(F.conv2d((2 * img - 1 - shift) / scale, state["features.0.weight"], state["features.0.bias"],
                            stride=4, padding=2))
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    x, y = _rand(2, 3, 48, 48, seed=9), _rand(2, 3, 48, 48, seed=10)
    expected = ((relu1(x) - relu1(y)) ** 2 * w).sum(1).mean((1, 2))
    assert torch.allclose(lp(x, y), expected, rtol=1e-5, atol=1e-7)


def test_lpips_vgg_layout(tmp_path):
    torch.save(_backbone_state("vgg"), tmp_path / "vgg16.pth")
    torch.save(_linear_state("vgg"), tmp_path / "vgg.pth")
    lp = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    assert lp.net == "vgg"
    x, y = _rand(1, 3, 32, 32, seed=11), _rand(1, 3, 32, 32, seed=12)
    assert float(lp(x, x)) == 0 and float(lp(x, y)) > 0


def test_lpips_wrong_files(alex_files, tmp_path):
    backbone, linear = alex_files
    with pytest.raises(ValueError, match="linear-layer file"):
        LPIPS(linear, backbone)  # swapped
    with pytest.raises(ValueError, match="torchvision backbone state_dict"):
        LPIPS(backbone, backbone)
    torch.save(_linear_state("vgg"), tmp_path / "vgg.pth")
    with pytest.raises(CheckpointMismatchError, match=r"lin1\.model\.1\.weight: file \(1, 128, 1, 1\)"):
        LPIPS(backbone, str(tmp_path / "vgg.pth"))  # VGG's linear layers with an AlexNet backbone
    state = _backbone_state("alex")
    del state["features.3.bias"]
    state["features.99.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        LPIPS(str(tmp_path / "broken.pth"), linear)
    assert "missing keys (1): features.3.bias" in str(err.value)
    assert "unexpected keys (1): features.99.weight" in str(err.value)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision AlexNet or VGG16 state_dict"):
        LPIPS(str(tmp_path / "other.pth"), linear)
    with pytest.raises(ValueError, match="net='vgg' was asked for"):
        LPIPS(backbone, linear, net="vgg")
    with pytest.raises(FileNotFoundError):
        LPIPS(str(tmp_path / "missing.pth"), linear)


# --------------------------------------------------------------------------------------------
# held-out faces
# --------------------------------------------------------------------------------------------
def test_synthetic_face_split():
    from training.synthetic import SyntheticClips

    names = {split: [f.name for f in SyntheticClips(num_clips=3, num_frames=3, size=32, face_split=split).faces]
             for split in ("train", "test")}
    assert len(names["test"]) == 20 and len(names["train"]) == 81
    assert not set(names["test"]) & set(names["train"])
    assert "astronaut" in names["train"] and names["test"][:2] == ["lfw3", "lfw8"]
    default = SyntheticClips(num_clips=3, num_frames=3, size=32)
    assert [f.name for f in default.faces] == ["astronaut", "lfw0", "lfw1"]  # unchanged default
    with pytest.raises(ValueError, match="face_split must be one of"):
        SyntheticClips(num_clips=3, num_frames=3, size=32, face_split="val")


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from dagan_fast.models.dagan import DaGAN
    from training.configs import load_config

    torch.manual_seed(0)
    return DaGAN(load_config("tiny")["model"])


@pytest.fixture(scope="module")
def tiny_clips():
    from training.synthetic import SyntheticClips

    return SyntheticClips(num_clips=2, num_frames=3, size=64, seed=1000, face_split="test")


def test_evaluate_tiny_model(tiny_model, tiny_clips, alex_files):
    from training.evaluate import evaluate, format_table

    tiny_model.train()
    tiny_model.depth_encoder.eval()
    lp = LPIPS(*alex_files)
    result = evaluate(tiny_model, tiny_clips, batch_size=2, lpips=lp, progress=False)
    # the caller's modes come back (a trainer keeps its frozen depth networks in eval mode)
    assert tiny_model.training and tiny_model.generator.training and not tiny_model.depth_encoder.training
    tiny_model.eval()

    assert result["clips"] == 2 and result["metrics"] == ["l1", "psnr", "ssim", "lpips", "tcm"]
    assert [(r["clip"], r["method"]) for r in result["rows"]] == [
        (0, "model"), (0, "source_frame"), (1, "model"), (1, "source_frame")]
    for row in result["rows"]:
        assert row["frames"] == 2  # frame 0, the source, is left out of the frame metrics
        assert all(math.isfinite(row[m]) for m in result["metrics"]), row
        assert 0 <= row["tcm"] <= 1 and row["l1"] > 0
    # the baseline's rows by hand: the source frame against frames 1 and 2
    for clip in range(2):
        frames = tiny_clips.frames(clip, [0, 1, 2])
        row = result["rows"][2 * clip + 1]
        source = frames[:1].expand(2, -1, -1, -1)
        assert row["l1"] == pytest.approx(float(l1(source, frames[1:]).mean()), rel=1e-9)
        assert row["psnr"] == pytest.approx(float(psnr(source, frames[1:]).mean()), rel=1e-9)
        assert row["ssim"] == pytest.approx(float(ssim(source, frames[1:]).mean()), rel=1e-9)
        assert row["lpips"] == pytest.approx(float(lp(source, frames[1:]).mean()), rel=1e-5)
        assert row["tcm"] == pytest.approx(tcm(frames, frames[:1].expand(3, -1, -1, -1)), rel=1e-9)
    mean = result["mean"]["source_frame"]["l1"]
    assert mean == pytest.approx((result["rows"][1]["l1"] + result["rows"][3]["l1"]) / 2)
    table = format_table(result)
    assert "source frame" in table and "TCM" in table and "LPIPS" in table


def test_evaluate_argument_errors(tiny_model, tiny_clips):
    from training.evaluate import evaluate

    with pytest.raises(ValueError, match="max_frames must be None or an int >= 2"):
        evaluate(tiny_model, tiny_clips, max_frames=1, progress=False)
    with pytest.raises(TypeError, match="DaGAN or DaGANpp"):
        evaluate(torch.nn.Linear(2, 2), tiny_clips, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate(tiny_model, tiny_clips, batch_size=0, progress=False)


def test_evaluate_cli(tiny_model, tmp_path):
    checkpoint = tmp_path / "tiny.safetensors"
    tiny_model.save(checkpoint)
    out_csv, out_json = tmp_path / "eval.csv", tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "training.evaluate", "--checkpoint", str(checkpoint), "--synthetic-clips", "1",
           "--synthetic-frames", "3", "--synthetic-seed", "7", "--size", "64", "--include-source-frame",
           "--csv", str(out_csv), "--json", str(out_json), "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "source frame" in done.stdout and "PSNR" in done.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["clip"] for r in rows] == ["0", "0", "mean", "mean"]
    assert [r["method"] for r in rows[:2]] == ["model", "source_frame"]
    assert rows[0]["frames"] == "3"  # --include-source-frame
    assert math.isfinite(float(rows[0]["psnr"])) and float(rows[0]["l1"]) > 0
    # the baseline reproduces frame 0 exactly: +inf PSNR, written as null in the JSON
    assert math.isinf(float(rows[1]["psnr"]))
    result = json.loads(out_json.read_text())
    assert result["mean"]["source_frame"]["psnr"] is None
    assert result["data"]["face_split"] == "test" and len(result["rows"]) == 2
