"""``dagan-fast animate`` / ``webcam`` / ``convert``: outputs, summary line and user errors (exit code 2)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dagan_fast import cli
from dagan_fast.media.video import VideoReader, VideoWriter

from test_streaming import SIZE, face, head_motion, small_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = tmp / "small.safetensors"
    small_model().save(str(model))
    source = tmp / "portrait.png"
    cv2.imwrite(str(source), cv2.cvtColor(face(), cv2.COLOR_RGB2BGR))
    driving = tmp / "talk.avi"
    with VideoWriter(str(driving), fps=12.0) as w:
        for f in head_motion(5, 96):
            w.write(f)
    noise = tmp / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    return {"model": str(model), "source": str(source), "driving": str(driving), "noise": str(noise), "tmp": tmp}


def _animate(files, out, *extra):
    return cli.main(["animate", "--source", files["source"], "--driving", files["driving"], "--out", str(out),
                     "--checkpoint", files["model"], "--size", str(SIZE), "--no-progress", *extra])


def test_animate_writes_video_and_summary(files, capsys):
    out = files["tmp"] / "result.avi"
    assert _animate(files, out) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("5 frames in ") and "fps) -> " in summary and summary.endswith(str(out))
    with VideoReader(str(out)) as r:
        frames = list(r)
        assert abs(r.fps - 12.0) < 1e-3                      # the driving video's rate
    assert len(frames) == 5 and frames[0].shape == (SIZE, SIZE, 3)


def test_animate_without_checkpoint_runs_the_bundled_model(files, capsys):
    out = files["tmp"] / "bundled.avi"
    rc = cli.main(["animate", "--source", files["source"], "--driving", files["driving"], "--out", str(out),
                   "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip().splitlines()[-1].startswith("5 frames in ")
    with VideoReader(str(out)) as r:
        frames = list(r)
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)   # the size the bundled model records


def test_animate_side_by_side_best_frame_batch(files, capsys):
    out = files["tmp"] / "sbs/"
    assert _animate(files, out, "--side-by-side", "--find-best-frame", "--batch-size", "2", "--smooth",
                    "--fast-conv") == 0
    with VideoReader(str(out)) as r:
        frames = list(r)
    assert len(frames) == 5 and frames[0].shape == (SIZE, 3 * SIZE, 3)
    # left panel: the source as the model sees it (centre square, resized)
    src = cv2.resize(face(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert np.abs(frames[0][:, :SIZE].astype(int) - src.astype(int)).max() <= 1


def test_animate_errors(files, capsys):
    out = files["tmp"] / "x.avi"
    # official depth files without the official checkpoint
    rc = cli.main(["animate", "--source", files["source"], "--driving", files["driving"], "--out", str(out),
                   "--depth-encoder", "encoder.pth", "--depth-decoder", "depth.pth"])
    assert rc == 2 and "need --checkpoint" in capsys.readouterr().err
    # unreadable driving file
    bad = files["tmp"] / "broken.mp4"
    bad.write_bytes(b"not a video")
    rc = cli.main(["animate", "--source", files["source"], "--driving", str(bad), "--out", str(out),
                   "--checkpoint", files["model"]])
    assert rc == 2 and "--driving" in capsys.readouterr().err
    # a non-face source with --crop
    rc = cli.main(["animate", "--source", files["noise"], "--driving", files["driving"], "--out", str(out),
                   "--checkpoint", files["model"], "--size", str(SIZE), "--crop"])
    err = capsys.readouterr().err
    assert rc == 2 and "no face found" in err
    # fp16 on the CPU (bf16 runs there), bad size, missing model file
    rc = _animate(files, out, "--dtype", "fp16")
    assert rc == 2 and "needs --device cuda" in capsys.readouterr().err
    rc = cli.main(["animate", "--source", files["source"], "--driving", files["driving"], "--out", str(out),
                   "--checkpoint", files["model"], "--size", "100"])
    assert rc == 2 and "multiple of" in capsys.readouterr().err
    rc = cli.main(["animate", "--source", files["source"], "--driving", files["driving"], "--out", str(out),
                   "--checkpoint", str(files["tmp"] / "nope.safetensors")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_webcam_without_camera(files, capsys):
    rc = cli.main(["webcam", "--source", files["source"], "--checkpoint", files["model"], "--camera", "99",
                   "--size", str(SIZE)])
    err = capsys.readouterr().err
    assert rc == 2 and "--camera 99" in err


def test_convert_is_wired(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--help"])
    assert info.value.code == 0 and "--depth-encoder" in capsys.readouterr().out
