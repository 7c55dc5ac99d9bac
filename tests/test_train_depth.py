"""training.depth / training.train_depth: the losses of DaGAN++ eq. 5-7 against hand-computed values, the
reprojection of eq. 3-4 (identity pose, integer-pixel shifts), the pose network's heads, and a few CPU
steps of a tiny config (finite decreasing loss, gradients everywhere, bit-exact resume, CLI, torchrun)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from dagan_fast.checkpoints import load as load_model
from dagan_fast.models.depth import FaceDepthNetwork
from training.configs import load_config
from training.depth import (PoseNetwork, UNCERTAINTY_FLOOR, auto_mask, axis_angle_to_matrix, disp_to_depth,
                            photometric_error, reproject, reprojection_grid, select_min_reprojection,
                            smoothness_loss, ssim, uncertainty_loss)
from training.train import build_clips
from training.train_depth import DepthFullModel, DepthTrainer, main

C1, C2 = 0.01 ** 2, 0.03 ** 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(size=64, width=8, lr=1e-4):
    cfg = load_config("depth_tiny")
    cfg["model"].update({"depth_width": width, "pose_width": width})
    cfg["data"]["size"] = size
    cfg["data"]["synthetic"] = {"num_clips": 2, "num_frames": 5}
    cfg["train"]["lr"] = lr
    return cfg


def _trainer(cfg, out, batch_size=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DepthTrainer(cfg, build_clips(cfg, seed=0), str(out), batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# losses against hand-computed values
# --------------------------------------------------------------------------------------------
def _ssim_numpy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of (H,W) images written out pixel by pixel: 3x3 windows over reflection padding."""
    xp, yp = np.pad(x, 1, mode="reflect"), np.pad(y, 1, mode="reflect")
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            a, b = xp[i:i + 3, j:j + 3], yp[i:i + 3, j:j + 3]
            ma, mb = a.mean(), b.mean()
            va, vb, cov = (a * a).mean() - ma ** 2, (b * b).mean() - mb ** 2, (a * b).mean() - ma * mb
            out[i, j] = (2 * ma * mb + C1) * (2 * cov + C2) / ((ma ** 2 + mb ** 2 + C1) * (va + vb + C2))
    return out


def test_ssim_identical_images_is_one_and_matches_window_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones_like(x), atol=1e-12)
    y = (x + 0.3 * torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    want = _ssim_numpy(x[1, 2].numpy(), y[1, 2].numpy())
    np.testing.assert_allclose(got[1, 2].numpy(), want, rtol=1e-10, atol=1e-12)
    assert float(got.max()) < 1


def test_photometric_error_by_hand_on_constant_3x3_images():
    # Constant images: every window has zero variance, so per channel SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = [0.2, 0.5, 0.9], [0.4, 0.5, 0.6]
    target = torch.tensor(a, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 3, 3)
    recon = torch.tensor(b, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 3, 3)
    s = [(2 * p * q + C1) / (p * p + q * q + C1) for p, q in zip(a, b)]
    structural = sum((1 - v) / 2 for v in s) / 3
    absolute = (0.2 + 0.0 + 0.3) / 3
    for alpha in (0.85, 0.8):
        got = photometric_error(target, recon, alpha)
        assert got.shape == (1, 1, 3, 3)
        assert torch.allclose(got, torch.full_like(got, alpha * structural + (1 - alpha) * absolute), atol=1e-12)
    assert torch.equal(photometric_error(target, target), torch.zeros(1, 1, 3, 3, dtype=torch.float64))


def test_smoothness_by_hand_on_2x3_disparity():
    disp = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 3)
    gray = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    image = gray.expand(1, 3, 2, 3)
    # mean(disp) = 10/6, so the normalised disparity is 0.6 * disp:
    #   x: |0.6-1.2| e^0, |1.2-2.4| e^-1, 0 e^-0.5, 0 e^0           -> mean over 4
    #   y: 0 e^0, |1.2-0.6| e^-0.5, |2.4-0.6| e^-0.5                 -> mean over 3
    want = (0.6 + 1.2 * math.exp(-1)) / 4 + (0.6 + 1.8) * math.exp(-0.5) / 3
    assert math.isclose(float(smoothness_loss(disp, image)), want, rel_tol=1e-6)
    # a disparity that is constant has no smoothness cost, whatever its scale
    assert float(smoothness_loss(torch.full_like(disp, 3.0), image)) == 0


def test_uncertainty_loss_by_hand():
    error = torch.tensor([0.2, 0.1, 0.4, 0.3]).view(1, 1, 2, 2)
    unc = torch.tensor([0.5, 0.25, 1.0, 0.1]).view(1, 1, 2, 2)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    photometric, log_u = uncertainty_loss(error, unc, mask, 2.0, 0.1)
    assert math.isclose(float(photometric), 2.0 * (0.4 + 0.4 + 0 + 3.0) / 4, rel_tol=1e-6)
    assert math.isclose(float(log_u), 0.1 * (math.log(0.5) + math.log(0.25) + math.log(0.1)) / 4, rel_tol=1e-6)


def test_min_reprojection_and_auto_mask_by_hand():
    e_prev = torch.tensor([0.1, 0.5, 0.3, 0.2]).view(1, 1, 2, 2)
    e_next = torch.tensor([0.2, 0.4, 0.3, 0.6]).view(1, 1, 2, 2)
    u_prev = torch.tensor([0.9, 0.8, 0.7, 0.6]).view(1, 1, 2, 2)
    u_next = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 2, 2)
    i_prev = torch.tensor([0.05, 0.9, 0.9, 0.9]).view(1, 1, 2, 2)
    i_next = torch.tensor([0.9, 0.9, 0.25, 0.15]).view(1, 1, 2, 2)
    error, unc, mask = select_min_reprojection([e_prev, e_next], [u_prev, u_next], [i_prev, i_next])
    assert torch.equal(error.flatten(), torch.tensor([0.1, 0.4, 0.3, 0.2]))
    # ties (pixel 2) go to the first source, as torch.min does
    assert torch.equal(unc.flatten(), torch.tensor([0.9, 0.2, 0.7, 0.6]))
    # identity minima 0.05, 0.9, 0.25, 0.15: only pixel 1 is explained better by the warp than unwarped
    assert torch.equal(mask.flatten(), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(auto_mask(error, error + 1e-3), torch.ones_like(error))
    # the tie-breaking noise lifts the identity error above an equal reprojection error
    noise = torch.full_like(error, 1e-5)
    _, _, mask = select_min_reprojection([e_prev], [u_prev], [e_prev], noise)
    assert torch.equal(mask, torch.ones_like(mask))


def test_full_loss_is_equation_7_on_a_single_scale():
    torch.manual_seed(1)
    cfg = _config()["train"]
    cfg = {**cfg, "scales": [0], "loss_weights": {"photometric": 1.5, "smoothness": 0.3, "uncertainty": 0.2}}
    full = DepthFullModel(FaceDepthNetwork(depth_width=8), PoseNetwork(18, 8), cfg).eval()
    frames = torch.rand(2, 3, 3, 64, 64)
    noise = torch.zeros(2, 1, 64, 64)
    with torch.no_grad():
        losses, stats = full(frames, noise)
        prev, target, nxt = frames.unbind(1)
        disp = full.depth.disparities(target, [0])[("disp", 0)]
        depth = disp_to_depth(disp, cfg["min_depth"], cfg["max_depth"])
        pose = full.pose(torch.cat([target, target]), torch.cat([prev, nxt]))
        errors, ids = [], []
        for i, source in enumerate((prev, nxt)):
            sl = slice(2 * i, 2 * i + 2)
            recon = reproject(source, depth, pose["K"][sl], pose["R"][sl], pose["t"][sl])
            errors.append(photometric_error(target, recon))
            ids.append(photometric_error(target, source))
        u = pose["uncertainty"].chunk(2)
        best = torch.minimum(errors[0], errors[1])
        unc = torch.where(errors[1] < errors[0], u[1], u[0])
        mask = (best < torch.minimum(ids[0], ids[1])).float()
    assert 0 < float(mask.mean()) < 1
    assert math.isclose(float(losses["photometric"]), 1.5 * float((mask * best / unc).mean()), rel_tol=1e-5)
    assert math.isclose(float(losses["uncertainty"]), 0.2 * float((mask * unc.log()).mean()), rel_tol=1e-5)
    assert math.isclose(float(losses["smoothness"]), 0.3 * float(smoothness_loss(disp, target)), rel_tol=1e-5)
    assert math.isclose(float(stats["mask"]), float(mask.mean()), rel_tol=1e-6)


def test_loss_errors_name_the_argument():
    with pytest.raises(ValueError, match="reconstructed"):
        photometric_error(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
    with pytest.raises(ValueError, match="disp"):
        smoothness_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="uncertainty"):
        uncertainty_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 2, 2), torch.ones(1, 1, 4, 4), 1, 1)
    with pytest.raises(ValueError, match="min_depth"):
        disp_to_depth(torch.rand(2), 1.0, 0.5)
    full = DepthFullModel(FaceDepthNetwork(depth_width=8), PoseNetwork(18, 8), _config()["train"])
    with pytest.raises(ValueError, match="at least 64, got 32x64"):
        full(torch.rand(1, 3, 3, 32, 64), torch.zeros(1, 1, 32, 64))
    with pytest.raises(ValueError, match=r"frames must be \(B,3,3,H,W\)"):
        full(torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64))


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def test_rodrigues_and_disp_to_depth():
    theta = 0.3
    R = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, theta]], dtype=torch.float64))[0]
    c, s = math.cos(theta), math.sin(theta)
    assert torch.allclose(R, torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(axis_angle_to_matrix(torch.zeros(2, 3)), torch.eye(3).expand(2, 3, 3))
    Rs = axis_angle_to_matrix(torch.randn(5, 3, dtype=torch.float64))
    assert torch.allclose(Rs @ Rs.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(Rs), torch.ones(5, dtype=torch.float64))
    depth = disp_to_depth(torch.tensor([0.0, 1.0, 0.5]), 0.1, 100.0)
    assert torch.allclose(depth, torch.tensor([100.0, 0.1, 1 / (0.01 + 0.5 * 9.99)]))


def _intrinsics(fx, fy, cx, cy, batch=1):
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64).expand(batch, 3, 3)


def test_reprojection_with_identity_pose_returns_the_source():
    g = torch.Generator().manual_seed(2)
    source = torch.rand(2, 3, 6, 8, generator=g, dtype=torch.float64)
    depth = 0.5 + torch.rand(2, 1, 6, 8, generator=g, dtype=torch.float64)
    K = _intrinsics(7.0, 5.0, 4.3, 2.9, 2)
    out = reproject(source, depth, K, torch.eye(3, dtype=torch.float64).expand(2, 3, 3),
                    torch.zeros(2, 3, dtype=torch.float64))
    assert torch.allclose(out, source, atol=1e-9)


def test_reprojection_pure_translation_at_constant_depth_shifts_by_whole_pixels():
    # u' = u + fx tx / D, v' = v + fy ty / D: with D = 2, fx = 8, fy = 6, tx = 0.25, ty = -2/3 the target
    # pixel (i, j) reads the source pixel (i - 2, j + 1); the rest falls outside and reads zeros.
    g = torch.Generator().manual_seed(3)
    source = torch.rand(1, 3, 5, 7, generator=g, dtype=torch.float64)
    depth = torch.full((1, 1, 5, 7), 2.0, dtype=torch.float64)
    t = torch.tensor([[0.25, -2.0 / 3.0, 0.0]], dtype=torch.float64)
    out = reproject(source, depth, _intrinsics(8.0, 6.0, 3.5, 2.5), torch.eye(3, dtype=torch.float64)[None], t)
    want = torch.zeros_like(source)
    want[:, :, 2:, :-1] = source[:, :, :-2, 1:]
    assert torch.allclose(out, want, atol=1e-9)
    grid = reprojection_grid(depth, _intrinsics(8.0, 6.0, 3.5, 2.5), torch.eye(3, dtype=torch.float64)[None], t)
    assert grid.shape == (1, 5, 7, 2)
    with pytest.raises(ValueError, match="K must have shape"):
        reprojection_grid(depth, torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[None], t)


def test_reprojection_gradients_reach_depth_pose_and_intrinsics():
    g = torch.Generator().manual_seed(4)
    source = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    depth = (1 + torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)).requires_grad_()
    K = _intrinsics(6.0, 6.0, 4.0, 4.0).clone().requires_grad_()
    axis = torch.tensor([[0.01, -0.02, 0.03]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.05, 0.02, 0.01]], dtype=torch.float64, requires_grad=True)
    reproject(source, depth, K, axis_angle_to_matrix(axis), t).square().sum().backward()
    for name, x in (("source", source), ("depth", depth), ("K", K), ("axis", axis), ("t", t)):
        assert x.grad is not None and float(x.grad.abs().sum()) > 0, name


def test_pose_network_heads():
    torch.manual_seed(5)
    net = PoseNetwork(18, 8)
    target, source = torch.rand(3, 3, 64, 32), torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        out = net(target, source)
    assert out["R"].shape == (3, 3, 3) and out["t"].shape == (3, 3) and out["K"].shape == (3, 3, 3)
    assert out["uncertainty"].shape == (3, 1, 64, 32)
    u = out["uncertainty"].detach()
    assert UNCERTAINTY_FLOOR <= float(u.min()) and float(u.max()) < 1
    R = out["R"]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5)
    # small initial motion (monodepth2's 0.01 scale); principal point at the image centre; positive focal lengths
    assert float(out["t"].abs().max()) < 0.05
    K = out["K"]
    assert torch.allclose(K[:, 0, 2], torch.full((3,), 16.0)) and torch.allclose(K[:, 1, 2], torch.full((3,), 32.0))
    assert bool((K[:, 0, 0] > 0).all()) and bool((K[:, 1, 1] > 0).all())
    assert torch.equal(K[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(3, 3))
    assert K[0, 0, 1] == 0 and K[0, 1, 0] == 0
    with pytest.raises(ValueError, match="source must be a floating"):
        net(target, torch.rand(3, 1, 64, 32))
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(1, 3, 40, 32), torch.rand(1, 3, 40, 32))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def test_steps_finite_decreasing_and_gradients_everywhere(tmp_path):
    trainer = _trainer(_config(lr=1e-3), tmp_path)
    batch = torch.utils.data.default_collate([trainer.dataset[(0, 1)], trainer.dataset[(1, 2)]])
    assert batch["frames"].shape == (2, 3, 3, 64, 64)
    history = []
    for step in range(8):
        values = trainer.train_step(batch)
        assert all(math.isfinite(v) for v in values.values()), values
        if step == 0:
            for net in (trainer.depth_net, trainer.pose_net):
                for name, p in net.named_parameters():
                    assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        history.append(values["total"])
    assert set(values) == {"photometric", "uncertainty", "smoothness", "total", "mask", "uncertainty_mean",
                           "focal", "translation"}
    assert np.mean(history[-3:]) < np.mean(history[:3]), history


def test_checkpoint_and_bit_exact_resume(tmp_path):
    cfg = _config()
    a = _trainer(cfg, tmp_path / "a")
    ha = a.fit(4, progress=False, checkpoint_every=100)
    b = _trainer(cfg, tmp_path / "b")
    hb = b.fit(2, progress=False, checkpoint_every=100)
    b = _trainer(cfg, tmp_path / "b")
    assert b.has_checkpoint()
    b.load_checkpoint()
    assert b.step == 2
    hb += b.fit(4, progress=False, checkpoint_every=100)
    assert ha == hb
    for net in ("depth_net", "pose_net"):
        for (k, v), (_, w) in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().items()):
            assert torch.equal(v, w), (net, k)
    depth = load_model(str(tmp_path / "b" / "depth.safetensors"), model="FaceDepthNetwork")
    for (k, v), (_, w) in zip(depth.state_dict().items(), a.depth_net.state_dict().items()):
        assert torch.equal(v, w), k
    assert depth.config == {"depth_layers": 18, "depth_width": 8}
    state = torch.load(tmp_path / "b" / "depth_state.pt", weights_only=True)
    assert state["step"] == 4 and state["seed"] == 0
    with pytest.raises(ValueError, match="seed"):
        other = _trainer(cfg, tmp_path / "b")
        other.seed = 1
        other.load_checkpoint()


def test_cli_writes_files_the_generator_trainer_reads(tmp_path):
    from safetensors import safe_open
    from dagan_fast.checkpoints import load_depth_networks
    from dagan_fast.models.dagan import DaGAN
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_config()))
    out = tmp_path / "run"
    args = ["--config", str(path), "--out", str(out), "--batch-size", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--steps", "1"]) == 0
        assert main(args + ["--steps", "2"]) == 0  # resumes at step 1
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["total"])) for r in rows)
    with safe_open(str(out / "pose.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["dagan_fast.pose_config"]) == {"pose_layers": 18, "pose_width": 8}
    dagan_cfg = load_config("tiny")["model"]
    dagan_cfg["depth_width"] = 8
    load_depth_networks(DaGAN(dagan_cfg), str(out / "depth.safetensors"))


def test_torchrun_two_cpu_ranks(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(_config()))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.train_depth", "--config", str(path), "--steps", "2", "--out", str(out),
           "--batch-size", "1", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "depth_state.pt", weights_only=True)["step"] == 2
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2]  # rank 0 alone logs
    load_model(str(out / "depth.safetensors"), model="FaceDepthNetwork")
