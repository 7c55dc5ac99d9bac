"""The ``dagan-fast ops-demo`` job: outputs, motion sanity, zero-motion identity, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dagan_fast import cli, ops
from dagan_fast.cli import ops_demo as demo
from dagan_fast.ops.reference import make_coordinate_grid, materialized_attention


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return demo.run_demo(str(out), frames=3, size=64, progress=False)


@pytest.fixture(scope="module")
def small_frames():
    return demo.render_frames(frames=3, size=64)


def zero_motion_warp(source: torch.Tensor) -> torch.Tensor:
    """What the pipeline must produce with no motion: the 64x64 identity deformation (the official
    make_coordinate_grid), bilinearly upsampled like the demo does, then warped."""
    size = source.shape[-1]
    grid = make_coordinate_grid(demo.MOTION_SIZE, demo.MOTION_SIZE)[None].permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(source, grid.contiguous(), mode="bilinear", padding_mode="zeros", align_corners=False)


def test_run_demo_writes_outputs(small_run):
    import imageio.v3 as iio

    for key in ("animation", "frames_png", "summary"):
        assert os.path.isfile(small_run[key]), key
    assert small_run["animation_format"] == "GIF"
    gif = iio.imread(small_run["animation"], index=None)
    assert gif.shape[:3] == (3, 64, 64)
    grid = iio.imread(small_run["frames_png"])
    assert grid.ndim == 3 and grid.shape[0] > 64 and grid.shape[1] > 4 * 64  # source + frames + 2 panels
    assert grid.std() > 10  # a picture, not a blank
    text = open(small_run["summary"], encoding="utf-8").read()
    assert demo.STATEMENT in text and "Per-frame time" in text
    assert small_run["per_frame_s"] > 0 and small_run["total_s"] > 0
    assert set(small_run["backends_used"]) == {"sparse_motion_inputs", "dense_motion", "warp_occlusion",
                                               "cross_modal_attention"}


def test_gif_frames_show_motion(small_run):
    import imageio.v3 as iio

    gif = iio.imread(small_run["animation"], index=None)[..., :3].astype(np.float64) / 255
    for i in (1, 2):
        diff = np.abs(gif[i] - gif[0]).mean()
        assert 0.01 < diff < 0.2, (i, diff)


def test_driven_frames_move_but_stay_close(small_frames):
    source = small_frames.source
    still = zero_motion_warp(source)
    for i in (1, 2):
        frame = small_frames.frames[i]
        assert frame.shape == source.shape
        assert float((frame - still).abs().mean()) > 0.01  # motion happened
        assert float((frame - source).abs().mean()) < 0.2  # but it is still the same face
        moved = (small_frames.kp_driving[i] - small_frames.kp_source).norm(dim=-1)
        assert float(moved.max()) > 0.05


def test_zero_motion_frame_reproduces_source_warp(small_frames):
    source = small_frames.source
    assert small_frames.times[0] == 0.0
    torch.testing.assert_close(small_frames.kp_driving[0], small_frames.kp_source, atol=1e-6, rtol=0)
    torch.testing.assert_close(small_frames.frames[0], zero_motion_warp(source), atol=1e-4, rtol=0)
    # the identity warp is close to the source itself (the official grid conventions zoom out a little)
    assert float((small_frames.frames[0] - source).abs().mean()) < 0.06


def test_amplitude_zero_gives_still_frames():
    result = demo.render_frames(frames=2, size=64, amplitude=0.0)
    still = zero_motion_warp(result.source)
    for frame in result.frames:
        torch.testing.assert_close(frame, still, atol=1e-4, rtol=0)
    for occlusion in result.occlusion:
        assert float(occlusion.min()) > 0.999


def test_driving_jacobians_linearise_the_motion():
    kp = demo.source_keypoints()
    kp0, jac0 = demo.driving_keypoints(kp, 0.0)
    torch.testing.assert_close(kp0, kp, atol=1e-6, rtol=0)
    torch.testing.assert_close(jac0, torch.eye(2).expand_as(jac0), atol=1e-6, rtol=0)
    t, eps = 0.3, 1e-4
    kp_d, jac = demo.driving_keypoints(kp, t)
    base = kp.double()
    for j in range(2):
        step = torch.zeros_like(base)
        step[..., j] = eps
        column = (demo.head_motion_field(base + step, t) - demo.head_motion_field(base - step, t)) / (2 * eps)
        torch.testing.assert_close(jac[..., :, j].double(), column, atol=1e-4, rtol=0)
    torch.testing.assert_close(kp_d.double(), demo.head_motion_field(base, t), atol=1e-6, rtol=0)


def test_heat_and_attention_panels(small_frames):
    heat = small_frames.heat[1]
    assert heat.shape == (64, 64) and float(heat.max()) > 0.1 and float(heat.min()) < -0.1
    assert float(small_frames.heat[0].abs().max()) < 1e-6  # no motion, no heat
    attention = small_frames.attention[1]
    assert attention.shape == (64, 64)
    assert abs(float(attention.sum()) - 1.0) < 1e-4 and float(attention.min()) >= 0


def test_attention_row_matches_materialised_attention(small_frames):
    source64 = F.interpolate(small_frames.source, size=(64, 64), mode="bilinear", align_corners=False,
                             antialias=True)
    q, k, v = demo.attention_features(small_frames.warped64[1], source64, demo.depth_prior(64))
    assert q.shape == (1, 1, 4096, 6) and v.shape == (1, 1, 4096, 4)
    row, col = demo.keypoint_pixel(small_frames.kp_driving[1][0, demo.NOSE], 64)
    _, attn = materialized_attention(q, k, v, scale=1.0, return_map=True)
    expected = attn[0, 0, row * 64 + col].reshape(64, 64)
    torch.testing.assert_close(small_frames.attention[1], expected, atol=1e-6, rtol=1e-4)
    out = ops.cross_modal_attention(q[:, :, :64], k, v, scale=1.0)
    torch.testing.assert_close(out, materialized_attention(q[:, :, :64], k, v, scale=1.0), atol=1e-5, rtol=1e-4)


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(demo.DemoError, match="frames"):
        demo.run_demo(str(tmp_path), frames=0, progress=False)
    with pytest.raises(demo.DemoError, match="size"):
        demo.run_demo(str(tmp_path), size=16, progress=False)


def test_cli_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = cli.main(["ops-demo", "--out", str(blocker / "sub"), "--frames", "1", "--size", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "error: cannot write to output directory" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""  # nothing ran
    code = cli.main(["ops-demo", "--out", str(blocker), "--no-progress"])
    assert code == 2 and "exists and is not a directory" in capsys.readouterr().err


def test_cli_usage_errors(capsys):
    assert cli.main([]) == 2
    for bad in (["ops-demo", "--frames", "0"], ["ops-demo", "--size", "abc"], ["nope"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(bad)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --frames: expected an integer from 1 to 1000, got 0" in err
    assert "argument --size: expected an integer from 64 to 2048, got 'abc'" in err


def test_cli_help_mentions_what_demo_is(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["ops-demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "No network runs" in text and "--out" in text and "--frames" in text and "--size" in text


@pytest.mark.slow
def test_python_m_dagan_fast_demo(tmp_path):
    out = tmp_path / "cli_out"
    proc = subprocess.run(
        [sys.executable, "-m", "dagan_fast", "ops-demo", "--out", str(out), "--frames", "2", "--size", "64"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert demo.STATEMENT in proc.stdout
    assert "Per-frame time" in proc.stdout and "Backends used" in proc.stdout
    for name in ("animation.gif", "frames.png", "summary.txt"):
        assert (out / name).is_file()
        assert str(out / name) in proc.stdout


def test_cli_forced_backend_that_cannot_run_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGAN_FAST_BACKEND", "cuda")  # the demo's tensors are on the CPU
    code = cli.main(["ops-demo", "--out", str(tmp_path / "o"), "--frames", "1", "--size", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "DAGAN_FAST_BACKEND='cuda' cannot run" in err and "Traceback" not in err
    monkeypatch.setenv("DAGAN_FAST_BACKEND", "gpu")
    assert cli.main(["ops-demo", "--out", str(tmp_path / "o")]) == 2
    assert "is not a backend" in capsys.readouterr().err
