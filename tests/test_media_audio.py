"""Sound and codecs (dagan_fast.media.audio, VideoWriter(audio=...)): the driving video's sound comes out
aligned and as long as the video, .mp4 is H.264, each output kind holds what its table says, and without
H.264 the writer falls back to 'mp4v' with a warning. Inputs are made here with PyAV (small, a few frames)."""
from __future__ import annotations

import os
import warnings
from fractions import Fraction

import numpy as np
import pytest

from dagan_fast.media import audio
from dagan_fast.media.audio import AudioTrack, MediaWarning, probe
from dagan_fast.media.video import VideoReader, VideoWriter

av = pytest.importorskip("av")

FPS, W, H, RATE = 30, 64, 48, 44100


def make_input(path, frames: int = 15, seconds: float = None, tone: float = 440.0, audio_start: float = 0.0,
               channels: int = 2, rate: int = RATE):
    """An H.264 + AAC file: ``frames`` frames (H, W) at FPS (frame i is grey level 10 * i) and a sine of
    ``tone`` Hz lasting ``seconds`` (default: as long as the video) starting at ``audio_start`` seconds."""
    seconds = frames / FPS if seconds is None else seconds
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = out.add_stream("aac", rate=rate, layout=layout)
        for i in range(frames):
            for packet in v.encode(av.VideoFrame.from_ndarray(np.full((H, W, 3), 10 * i, np.uint8), format="rgb24")):
                out.mux(packet)
        n = int(round(seconds * rate))
        signal = (0.3 * np.sin(2 * np.pi * tone * np.arange(n) / rate)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([signal] * channels), format="fltp", layout=layout)
        frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
        frame.pts = int(round(audio_start * rate))
        for packet in a.encode(frame):
            out.mux(packet)
        for packet in list(v.encode()) + list(a.encode()):
            out.mux(packet)
    return str(path)


def decoded_audio(path) -> np.ndarray:
    """(channels, n) float32 samples of the first audio stream, as a player decodes them."""
    with av.open(str(path)) as container:
        chunks = [f.to_ndarray().reshape(len(f.layout.channels), -1) for f in container.decode(audio=0)]
    return np.concatenate(chunks, axis=1)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    mono = samples.mean(axis=0)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.argmax(spectrum) * rate / len(mono))


def write(path, source, frames: int = 15, **kw):
    with VideoWriter(str(path), fps=FPS, audio=source, **kw) as writer:
        for i in range(frames):
            writer.write(np.full((H - 1, W - 1, 3), 10 * i, np.uint8))          # odd: padded, not cropped
    return writer


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    return make_input(tmp_path_factory.mktemp("audio") / "talk.mp4")


@pytest.mark.skipif(not audio.h264_available(), reason="PyAV without libx264")
def test_mp4_is_h264_with_the_driving_sound(tmp_path, talk):
    writer = write(tmp_path / "out.mp4", talk)
    assert (writer.codec, writer.audio_codec, writer.backend) == ("h264", "aac", "pyav")
    info = probe(tmp_path / "out.mp4")
    assert info["video"] == "h264" and info["audio"] == "aac" and info["frames"] == 15
    assert info["fps"] == pytest.approx(FPS)
    video_seconds = 15 / FPS
    assert abs(info["audio_duration"] - video_seconds) < 1 / FPS                 # same duration, within a frame
    assert abs(info["audio_duration"] - probe(talk)["audio_duration"]) < 1 / FPS
    samples = decoded_audio(tmp_path / "out.mp4")
    assert abs(samples.shape[1] / info["sample_rate"] - video_seconds) < 1 / FPS
    assert dominant_hz(samples, info["sample_rate"]) == pytest.approx(440, abs=40)   # the driving's sound
    with VideoReader(tmp_path / "out.mp4") as reader:                              # OpenCV decodes it
        frames = list(reader)
    assert len(frames) == 15 and frames[0].shape == (H, W, 3)
    assert abs(int(frames[7][: H - 1, : W - 1].mean()) - 70) <= 2


def test_sound_is_aligned_and_cut_or_padded_to_the_video(tmp_path):
    long_sound = make_input(tmp_path / "long.mp4", frames=9, seconds=1.0)           # sound outlasts the video
    late_sound = make_input(tmp_path / "late.mp4", frames=9, seconds=0.2, audio_start=0.1, channels=1, rate=16000)
    video_seconds = 12 / FPS                                                        # the output has 12 frames
    track = AudioTrack.open(long_sound)
    assert (track.rate, track.channels) == (RATE, 2)
    first = track.take_until(0.1)
    rest = track.finish(video_seconds)
    assert first.shape == (2, 4410) and first.shape[1] + rest.shape[1] == int(round(video_seconds * RATE))
    late = AudioTrack.open(late_sound)
    samples = late.finish(video_seconds)
    assert samples.shape == (1, int(round(video_seconds * 16000)))
    lead = samples[0, :1400]                                                        # silence before 0.1 s
    assert np.abs(lead).max() < 0.02 and np.abs(samples[0, 1700:4500]).max() > 0.2   # then the tone
    assert np.abs(samples[0, -400:]).max() < 0.02                                  # padded after its end
    assert AudioTrack.open(tmp_path) is None and AudioTrack.open(None) is None      # a folder, nothing


def test_webm_gif_and_folder(tmp_path, talk):
    if audio.has_encoder("libvpx-vp9") and audio.has_encoder("libopus"):
        writer = write(tmp_path / "out.webm", talk)
        info = probe(tmp_path / "out.webm")
        assert (info["video"], info["audio"], writer.audio_codec) == ("vp9", "opus", "opus")
        assert abs(info["audio_duration"] - 15 / FPS) < 1 / FPS
    with pytest.warns(MediaWarning, match="GIF has no sound"):
        writer = write(tmp_path / "out.gif", talk)
    assert writer.codec == "gif" and writer.audio_codec is None and probe(tmp_path / "out.gif")["audio"] is None
    with VideoReader(tmp_path / "out.gif") as reader:
        frames = list(reader)
    assert len(frames) == 15 and abs(int(frames[7].mean()) - 70) <= 3              # per-frame palette
    writer = write(tmp_path / "frames/", talk)
    assert writer.audio_codec == "pcm_s16le" and len(os.listdir(tmp_path / "frames")) == 16
    wav = probe(tmp_path / "frames" / "audio.wav")
    assert wav["audio"] == "pcm_s16le" and wav["audio_duration"] == pytest.approx(15 / FPS, abs=1e-3)
    with pytest.warns(MediaWarning, match="dropped"):
        write(tmp_path / "out.avi", talk)


def test_falls_back_to_mp4v_with_a_warning(tmp_path, talk, monkeypatch):
    monkeypatch.setattr(audio, "has_encoder", lambda name: False)
    with pytest.warns(MediaWarning, match="mp4v"):
        writer = write(tmp_path / "old.mp4", talk)
    assert (writer.codec, writer.backend, writer.audio_codec) == ("mp4v", "opencv", None)
    assert probe(tmp_path / "old.mp4")["video"] == "mpeg4"
    with VideoReader(tmp_path / "old.mp4") as reader:
        assert len(list(reader)) == 15
    with pytest.raises(ValueError, match=r"\.webm"):
        VideoWriter(tmp_path / "x.webm", fps=FPS)


def test_a_video_without_sound_adds_none(tmp_path):
    silent = tmp_path / "silent.avi"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # no warning either
        write(silent, None)
        writer = write(tmp_path / "out.mp4", str(silent))
    assert writer.audio_codec is None and probe(tmp_path / "out.mp4")["audio"] is None
