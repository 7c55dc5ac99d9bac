"""``dagan-fast animate`` / ``webcam`` / ``convert``: outputs, summary line and user errors (exit code 2)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dagan_fast import cli
from dagan_fast.media.video import VideoReader, VideoWriter

from _inputs import SIZE, face, head_motion, small_model


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
                    "--no-fast-conv") == 0
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


# --------------------------------------------------------------------------------------------
# paste-back, driving faces, sound and codecs
# --------------------------------------------------------------------------------------------
def _outside_equal(frame, source, box):
    x0, y0, x1, y1 = box
    outside = np.ones(source.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    return np.array_equal(frame[outside], source[outside])


def test_crop_pastes_back_into_the_full_source(files, capsys):
    from dagan_fast.media.face import crop_window

    source = cv2.cvtColor(cv2.imread(files["source"]), cv2.COLOR_BGR2RGB)
    window = crop_window(source)
    out = files["tmp"] / "pasted/"
    assert _animate(files, out, "--crop") == 0                         # PNG frames: lossless, exact
    frames = list(VideoReader(str(out)))
    assert len(frames) == 5 and frames[0].shape == source.shape         # the source's resolution
    assert all(_outside_equal(f, source, window.box) for f in frames)
    assert not np.array_equal(frames[2], source)
    out = files["tmp"] / "crop_only/"
    assert _animate(files, out, "--crop", "--no-paste-back") == 0
    assert next(iter(VideoReader(str(out)))).shape == (SIZE, SIZE, 3)
    out = files["tmp"] / "boxed/"
    assert _animate(files, out, "--source-box", "40,30,120,100", "--out-size", "112x112", "--side-by-side") == 0
    frame = next(iter(VideoReader(str(out))))
    assert frame.shape == (112, 3 * 112, 3)                            # source | driving | result, one height
    out = files["tmp"] / "boxed_full/"
    assert _animate(files, out, "--source-box", "40,30,120,100") == 0
    assert _outside_equal(next(iter(VideoReader(str(out)))), source, (40, 20, 160, 140))   # squared: side 120
    rc = _animate(files, files["tmp"] / "x/", "--source-box", "40,30,0,100")
    assert rc == 2 and "--source-box" in capsys.readouterr().err


def test_driving_video_without_a_face_stops_with_a_clear_error(files, capsys):
    from skimage import data

    coffee = cv2.resize(data.coffee(), (176, 144), interpolation=cv2.INTER_AREA)
    cycling = files["tmp"] / "cycling.avi"
    with VideoWriter(str(cycling), fps=30.0) as w:
        for i in range(12):
            w.write(np.roll(coffee, 4 * i, axis=1))
    rc = cli.main(["animate", "--source", files["source"], "--driving", str(cycling), "--out",
                   str(files["tmp"] / "none.avi"), "--checkpoint", files["model"], "--size", str(SIZE), "--crop",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--driving {cycling}" in err and "looked at frames 0, 5, 10 (3 frames)" in err
    assert "--crop off" not in err and "leave out --crop" in err
    rc = cli.main(["animate", "--source", files["noise"], "--driving", files["driving"], "--out",
                   str(files["tmp"] / "none.avi"), "--checkpoint", files["model"], "--size", str(SIZE), "--crop"])
    err = capsys.readouterr().err
    assert rc == 2 and "--source-box" in err and "--crop off" not in err


def test_mp4_output_is_h264_with_the_driving_sound(files, capsys):
    av = pytest.importorskip("av")
    from dagan_fast.media import audio

    if not audio.h264_available():
        pytest.skip("PyAV without libx264")
    from test_media_audio import make_input

    talk = make_input(files["tmp"] / "talk.mp4", frames=6)
    out = files["tmp"] / "talk_out.mp4"
    rc = cli.main(["animate", "--source", files["source"], "--driving", talk, "--out", str(out),
                   "--checkpoint", files["model"], "--size", str(SIZE), "--no-progress"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[-2] == f"output: {SIZE}x{SIZE} h264, sound aac"
    info = audio.probe(out)
    assert (info["video"], info["audio"], info["frames"]) == ("h264", "aac", 6)
    assert abs(info["audio_duration"] - 6 / 30) < 1 / 30
    rc = cli.main(["animate", "--source", files["source"], "--driving", talk, "--out", str(out),
                   "--checkpoint", files["model"], "--size", str(SIZE), "--no-progress", "--no-audio"])
    assert rc == 0 and audio.probe(out)["audio"] is None and av is not None
