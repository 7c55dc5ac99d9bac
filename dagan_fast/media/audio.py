"""Sound and codecs: the driving video's audio track, carried into the output, and what each output kind holds.

The encoding library is PyAV (``pip install av``; a dependency of dagan_fast), chosen over the ffmpeg binary
that imageio-ffmpeg ships because it runs in-process: frames go from NumPy to the H.264 encoder and audio
samples from the driving file's decoder to the AAC/Opus encoder in one container, with sample-exact trimming,
no subprocess pipes, no temporary files and no second pass to mux the sound; its wheels bundle FFmpeg with
libx264, libvpx-vp9, libopus and AAC on Linux, macOS and Windows, and it can read every stream's codec, which
the tests use. Without PyAV (or in a build of it without libx264), .mp4 falls back to OpenCV's 'mp4v'
(MPEG-4 Part 2, silent) with a warning.

What :class:`~dagan_fast.media.video.VideoWriter` writes for each output (``OUTPUT_FORMATS``):

========================  ==============================================  ======================================
output                    video                                           sound (from ``audio=``, the driving)
========================  ==============================================  ======================================
.mp4 .m4v .mov .mkv       H.264 (libx264, yuv420p, CRF 18): plays in      AAC 160 kb/s
                          browsers, phones, QuickTime, video editors
.webm                     VP9 (libvpx-vp9, CRF 32): browsers               Opus 128 kb/s
.gif                      animated GIF, looping, 256 colours per frame    none (GIF has no sound; a warning)
.avi                      Motion JPEG (OpenCV)                            none (a warning)
folder (path ending /)    000000.png, 000001.png, ... (lossless)          audio.wav beside them (16-bit PCM)
========================  ==============================================  ======================================

Alignment: output frame i shows driving frame i at i / fps seconds, so the sound is taken from the driving
file's first video frame on (``video start_time``; sound that starts later is preceded by silence, sound that
starts earlier is cut) and cut (or padded with silence) to exactly ``frames / fps`` seconds: the output's
sound lasts as long as its video. All of it is done by :class:`AudioTrack`.
"""
from __future__ import annotations

import os
import warnings
from fractions import Fraction
from typing import Iterator, Optional

import numpy as np

__all__ = ["AudioTrack", "pyav", "has_encoder", "h264_available", "probe", "write_wav", "MediaWarning",
           "OUTPUT_FORMATS", "PYAV_MISSING"]

PYAV_MISSING = ("PyAV is not installed (pip install av): H.264/VP9 video and sound need it")

#: Output kind -> (video codec, audio codec or None), as written when PyAV is available.
OUTPUT_FORMATS = {
    ".mp4": ("libx264", "aac"), ".m4v": ("libx264", "aac"), ".mov": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"), ".webm": ("libvpx-vp9", "libopus"), ".gif": ("gif", None),
    ".avi": ("MJPG", None), "folder": ("png", "pcm_s16le"),
}


class MediaWarning(UserWarning):
    """A media output differs from what was asked (codec fallback, sound dropped)."""


def pyav():
    """The ``av`` module, or None when PyAV is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


def has_encoder(name: str) -> bool:
    """Whether PyAV is installed and its FFmpeg has the encoder ``name`` (e.g. "libx264", "aac")."""
    av = pyav()
    if av is None:
        return False
    try:
        av.codec.Codec(name, "w")
    except Exception:                  # noqa: BLE001 - UnknownCodecError and friends
        return False
    return True


def h264_available() -> bool:
    """Whether .mp4 files are written as H.264 here (PyAV with libx264)."""
    return has_encoder("libx264")


def probe(path) -> dict:
    """What a media file holds, read by PyAV: ``{"video": codec name or None, "audio": codec name or None,
    "frames": video frame count (container's) or None, "fps": float or None, "audio_duration": seconds or
    None, "video_duration": seconds or None, "sample_rate": int or None, "channels": int or None}``.
    ``ImportError`` without PyAV; ``ValueError`` naming the file when it cannot be opened."""
    av = pyav()
    if av is None:
        raise ImportError(PYAV_MISSING)
    path = os.fspath(path)
    try:
        container = av.open(path)
    except Exception as exc:          # noqa: BLE001 - av.error.* subclasses
        raise ValueError(f"cannot open {path} with PyAV: {exc}") from None
    info = {"video": None, "audio": None, "frames": None, "fps": None, "audio_duration": None,
            "video_duration": None, "sample_rate": None, "channels": None}
    with container:
        if container.streams.video:
            v = container.streams.video[0]
            info["video"] = v.codec_context.name
            info["frames"] = int(v.frames) or None
            rate = v.average_rate or v.base_rate
            info["fps"] = float(rate) if rate else None
            if v.duration is not None and v.time_base is not None:
                info["video_duration"] = float(v.duration * v.time_base)
        if container.streams.audio:
            a = container.streams.audio[0]
            info["audio"] = a.codec_context.name
            info["sample_rate"] = int(a.codec_context.sample_rate or a.rate or 0) or None
            info["channels"] = int(a.codec_context.channels) if hasattr(a.codec_context, "channels") else \
                len(a.codec_context.layout.channels)
            if a.duration is not None and a.time_base is not None:
                info["audio_duration"] = float(a.duration * a.time_base)
            else:                                  # WebM/Matroska keep no stream duration: count the samples
                samples = sum(frame.samples for frame in container.decode(a))
                info["audio_duration"] = samples / info["sample_rate"] if info["sample_rate"] else None
    return info


class AudioTrack:
    """The sound of a media file, decoded lazily, aligned to its first video frame, resampled and cut.

    ``path``: the driving video (anything FFmpeg reads). ``rate``: output sample rate (default: the
    file's; Opus needs 48000). ``channels``: 1 or 2 (default: the file's, at most 2).
    Use :meth:`open` (None when the file has no sound or PyAV is missing) rather than the constructor.

    :meth:`take_until` ``(seconds)`` returns the samples from the last call up to that output time, as a
    (channels, n) float32 array in [-1, 1]; :meth:`finish` ``(seconds)`` returns the rest up to exactly
    ``round(seconds * rate)`` samples in all, padding with silence when the file's sound is shorter.
    Attributes: ``rate``, ``channels``, ``layout`` ("mono"/"stereo"), ``samples_out`` (samples handed out),
    ``codec`` (the file's audio codec), ``path``.
    """

    def __init__(self, path, rate: Optional[int] = None, channels: Optional[int] = None):
        av = pyav()
        if av is None:
            raise ImportError(PYAV_MISSING)
        self.path = os.fspath(path)
        try:
            self._container = av.open(self.path)
        except Exception as exc:      # noqa: BLE001
            raise ValueError(f"cannot open {self.path} to read its sound: {exc}") from None
        if not self._container.streams.audio:
            self._container.close()
            raise ValueError(f"{self.path} has no audio stream")
        stream = self._container.streams.audio[0]
        self._stream = stream
        ctx = stream.codec_context
        self.codec = ctx.name
        in_channels = len(ctx.layout.channels) if ctx.layout is not None else 2
        self.channels = int(channels or min(2, max(1, in_channels)))
        if self.channels not in (1, 2):
            raise ValueError(f"AudioTrack: channels must be 1 or 2, got {channels!r}")
        self.layout = "mono" if self.channels == 1 else "stereo"
        self.rate = int(rate or ctx.sample_rate or 48000)
        video_start = 0.0
        if self._container.streams.video:
            v = self._container.streams.video[0]
            if v.start_time is not None and v.time_base is not None:
                video_start = float(v.start_time * v.time_base)
        self._video_start = video_start
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        self._chunks = self._decode()
        self._buffer = np.zeros((self.channels, 0), np.float32)
        self._exhausted = False
        self.samples_out = 0

    @classmethod
    def open(cls, path, rate: Optional[int] = None, channels: Optional[int] = None,
             warn_missing_pyav: bool = True) -> Optional["AudioTrack"]:
        """An :class:`AudioTrack` of ``path``, or None when the file has no sound, is an image or image folder,
        or PyAV is not installed (then with a :class:`MediaWarning` if ``warn_missing_pyav``)."""
        if path is None:
            return None
        path = os.fspath(path)
        if os.path.isdir(path) or not os.path.isfile(path):
            return None
        if pyav() is None:
            if warn_missing_pyav:
                warnings.warn(f"the sound of {path} is not copied: {PYAV_MISSING}", MediaWarning, stacklevel=2)
            return None
        try:
            return cls(path, rate=rate, channels=channels)
        except ValueError:
            return None

    def _decode(self) -> Iterator[np.ndarray]:
        """(channels, n) float32 chunks at ``rate``, starting at the first video frame's time."""
        first = True
        skip = 0
        try:
            for frame in self._container.decode(self._stream):
                if first:
                    first = False
                    start = float(frame.time) if frame.time is not None else 0.0
                    lead = start - self._video_start
                    if lead > 0:                                # sound starts after the video: silence first
                        yield np.zeros((self.channels, int(round(lead * self.rate))), np.float32)
                    else:
                        skip = int(round(-lead * self.rate))
                for out in self._resampler.resample(frame):
                    data = out.to_ndarray().astype(np.float32, copy=False).reshape(self.channels, -1)
                    if skip:
                        cut = min(skip, data.shape[1])
                        data, skip = data[:, cut:], skip - cut
                    if data.shape[1]:
                        yield data
            for out in self._resampler.resample(None):
                data = out.to_ndarray().astype(np.float32, copy=False).reshape(self.channels, -1)
                if skip:
                    cut = min(skip, data.shape[1])
                    data, skip = data[:, cut:], skip - cut
                if data.shape[1]:
                    yield data
        except Exception as exc:      # noqa: BLE001 - a damaged stream ends the sound, not the video
            warnings.warn(f"the sound of {self.path} ends early: decoding failed ({exc})", MediaWarning,
                          stacklevel=3)

    def _take(self, total: int, pad: bool) -> np.ndarray:
        """Samples ``samples_out`` .. ``total`` (fewer at the end of the file unless ``pad``)."""
        need = total - self.samples_out
        if need <= 0:
            return np.zeros((self.channels, 0), np.float32)
        parts = [self._buffer]
        have = self._buffer.shape[1]
        while have < need and not self._exhausted:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._exhausted = True
                break
            parts.append(chunk)
            have += chunk.shape[1]
        data = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        out, self._buffer = data[:, :need], data[:, need:]
        if pad and out.shape[1] < need:
            out = np.concatenate([out, np.zeros((self.channels, need - out.shape[1]), np.float32)], axis=1)
        self.samples_out += out.shape[1]
        return np.ascontiguousarray(out)

    def take_until(self, seconds: float) -> np.ndarray:
        """(channels, n) float32: the samples from the last call up to output time ``seconds``."""
        return self._take(int(round(seconds * self.rate)), pad=False)

    def finish(self, seconds: float) -> np.ndarray:
        """(channels, n) float32: the rest up to exactly ``round(seconds * rate)`` samples in all (silence
        pads a short sound). Closes the input."""
        out = self._take(int(round(seconds * self.rate)), pad=True)
        self.close()
        return out

    def close(self) -> None:
        """Close the input file (idempotent)."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def __repr__(self) -> str:
        return f"AudioTrack({self.path!r}, {self.codec}, {self.rate} Hz, {self.layout})"


class AudioEncoder:
    """Encode :class:`AudioTrack` samples into an audio stream of an open PyAV output container.

    ``container``: the av output container; ``codec``: "aac", "libopus" or "pcm_s16le"; ``track``: the
    source. Samples are sent with ``pts`` = samples sent so far (time base 1/rate), so the sound starts at 0
    and is exactly as long as what the track hands out.
    """

    def __init__(self, container, codec: str, track: AudioTrack, bit_rate: Optional[int] = None):
        av = pyav()
        self.track = track
        self.container = container
        fmt = "s16" if codec == "pcm_s16le" else ("flt" if codec == "libopus" else "fltp")
        self.stream = container.add_stream(codec, rate=track.rate, layout=track.layout, format=fmt)
        if bit_rate:
            self.stream.bit_rate = int(bit_rate)
        self._format = fmt
        self._av = av
        self.sent = 0

    def _send(self, data: np.ndarray) -> None:
        if data.shape[1] == 0:
            return
        if self._format == "s16":
            samples = np.clip(np.rint(data.T * 32767.0), -32768, 32767).astype(np.int16).reshape(1, -1)
        elif self._format == "flt":
            samples = np.ascontiguousarray(data.T).reshape(1, -1)
        else:
            samples = data
        frame = self._av.AudioFrame.from_ndarray(samples, format=self._format, layout=self.track.layout)
        frame.sample_rate = self.track.rate
        frame.pts = self.sent
        frame.time_base = Fraction(1, self.track.rate)
        self.sent += data.shape[1]
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def until(self, seconds: float) -> None:
        """Encode the track's sound up to output time ``seconds`` (interleaved with the video)."""
        self._send(self.track.take_until(seconds))

    def finish(self, seconds: float) -> None:
        """Encode the rest, to exactly ``seconds``, and flush the encoder."""
        self._send(self.track.finish(seconds))
        for packet in self.stream.encode(None):
            self.container.mux(packet)


def write_wav(track: AudioTrack, path, seconds: float) -> str:
    """Write ``track``'s sound, from its start to exactly ``seconds``, to ``path`` as 16-bit PCM WAV
    (the sound of an image-folder output). Returns the path."""
    av = pyav()
    path = os.fspath(path)
    with av.open(path, "w", format="wav") as container:
        encoder = AudioEncoder(container, "pcm_s16le", track)
        step = 10.0
        t = step
        while t < seconds:                       # ten seconds at a time: never the whole sound in memory
            encoder.until(t)
            t += step
        encoder.finish(seconds)
    return path
