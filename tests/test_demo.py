"""``dagan-fast demo`` (README's main job) and the bundled trained model it runs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dagan_fast import DaGAN, cli
from dagan_fast.checkpoints import pretrained
from dagan_fast.cli import demo
from dagan_fast.streaming import Animator
from dagan_fast.media.synthetic import face_images, make_clip, split_faces


@pytest.fixture(scope="module")
def bundled():
    return pretrained.load_default()


def test_bundled_model_is_a_small_trained_dagan(bundled):
    import os

    assert isinstance(bundled, DaGAN) and bundled.discriminator is None and not bundled.training
    assert bundled.image_size == 64 and bundled.config["depth_width"] == 16
    assert os.path.getsize(pretrained.DEFAULT_MODEL_FILE) < 8 * 2 ** 20     # "a few MB"
    # trained, not initial: BatchNorm statistics moved away from their initial (0, 1)
    stats = [m.running_mean for m in bundled.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stats and max(float(s.abs().max()) for s in stats) > 1e-2


def test_animator_defaults_to_the_bundled_model():
    face = face_images(64, count=1)[0].image
    animator = Animator(None, face)
    assert animator.size == 64
    clip = make_clip(split_faces(face_images(64), "test")[0], 4, seed=3)["frames"]
    outs = list(animator.stream(clip))
    assert len(outs) == 4 and outs[0].shape == (3, 64, 64) and torch.isfinite(outs[0]).all()
    # reference="first": the first output keeps the source pose, so it stays close to the source
    assert float((outs[0] - face).abs().mean()) < float((clip[0] - face).abs().mean())


def test_missing_bundled_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL_FILE", str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="bundled model .* is missing"):
        pretrained.load_default()


def test_run_demo_writes_outputs_and_beats_the_source_baseline(tmp_path):
    import imageio.v3 as iio

    info = demo.run_demo(str(tmp_path / "out"), frames=6, progress=False)
    gif = iio.imread(info["animation"], index=None)
    assert gif.shape == (6, demo.DISPLAY_SIZE, 3 * demo.DISPLAY_SIZE, 3)
    assert iio.imread(info["frames_png"]).shape[1] == 3 * demo.DISPLAY_SIZE
    text = open(info["summary"]).read()
    assert "PSNR" in text and "ms per frame" in text
    assert info["size"] == 64 and info["per_frame_ms"] > 0
    # the model follows the head: better than returning the source frame
    assert info["self_psnr"] > info["baseline_psnr"]
    # the driving face is one the bundled model never trained on
    assert info["driving_face"] in {f.name for f in split_faces(face_images(64), "test")}


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(demo.DemoError, match="frames"):
        demo.run_demo(str(tmp_path), frames=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker), "--frames", "2", "--no-progress"]) == 2


@pytest.mark.slow
def test_cli_demo_main_job(tmp_path):
    out = tmp_path / "demo_out"
    proc = subprocess.run([sys.executable, "-m", "dagan_fast", "demo", "--out", str(out), "--frames", "3",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "self-reenactment" in proc.stdout and (out / "animation.gif").stat().st_size > 0
    assert (out / "frames.png").stat().st_size > 0
