"""Reading and writing video files.

Decoding uses decord (seek + decode only the sampled frames, resize inside the
decoder); PyAV reads container headers to tell *why* a file is unusable and
writes H.264 for the demo data and tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidray.errors import UserError


def encode_mp4(path: str | Path, frames: np.ndarray, fps: float = 30.0, crf: int = 23) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as an H.264 mp4 (yuv420p) through PyAV's libx264.

    H and W must be even (yuv420p subsampling).
    """
    from fractions import Fraction

    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)  # a killed writer never leaves a half file under the real name
    return path


# --------------------------------------------------------------------------- decoding


class VideoError(UserError):
    """A video file that cannot be used. ``code`` is a stable category for
    tables and tests; ``reason`` is the human detail; ``str()`` names the file."""

    code = "video_error"

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MissingVideoError(VideoError):
    code = "missing"


class EmptyVideoError(VideoError):
    code = "empty"


class NotAVideoError(VideoError):
    code = "not_a_video"


class CorruptVideoError(VideoError):
    code = "corrupt"


class NoVideoStreamError(VideoError):
    code = "no_video_stream"


class NoFramesError(VideoError):
    code = "no_frames"


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # uint8 [stored_frames, stored_size, stored_size, 3]
    source_frames: int  # frames the container reports for the whole video
    padded: bool  # source_frames < stored_frames, so some frames appear more than once


# First bytes of the containers ffmpeg is likely to be handed. A file that starts
# like one of these but cannot be opened is a broken video, not a stray text file.
_CONTAINER_SIGNATURES = (
    (4, b"ftyp"),  # mp4 / mov / m4a / 3gp
    (4, b"moov"),
    (4, b"mdat"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),  # mpeg program stream
)


def segment_indices(num_frames: int, count: int) -> np.ndarray:
    """Centre of each of ``count`` equal segments of ``[0, num_frames)``.

    When ``num_frames < count`` neighbouring segments share a frame, so every
    source frame is repeated evenly (the clip keeps its whole time span) rather
    than the last frame being held.
    """
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames}, {count}")
    centres = (np.arange(count) + 0.5) * (num_frames / count)
    return np.minimum(centres.astype(np.int64), num_frames - 1)


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side``, aspect kept."""
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


def _check_file(path: str) -> None:
    if not os.path.lexists(path):
        raise MissingVideoError(path, "file not found")
    if not os.path.exists(path):
        raise MissingVideoError(path, f"dangling symlink (points to {os.readlink(path)})")
    if not os.path.isfile(path):
        raise MissingVideoError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(path, "zero bytes")
    if not os.access(path, os.R_OK):
        raise MissingVideoError(path, "not readable (permission denied)")


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(192)
    if head[0:1] == head[188:189] == b"\x47":
        return True  # mpeg transport stream: a sync byte every 188-byte packet
    return any(head[offset : offset + len(magic)] == magic for offset, magic in _CONTAINER_SIGNATURES)


def _probe_frame_size(path: str) -> tuple[int, int]:
    """(width, height) of the first video stream, read from the container header
    with PyAV (no decoding); raises the VideoError that says why it cannot."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            streams = container.streams
            if not streams.video:
                kinds = ", ".join(sorted({s.type for s in streams})) or "none"
                raise NoVideoStreamError(path, f"no video stream (streams: {kinds})")
            codec = streams.video[0].codec_context
            return int(codec.width or 0), int(codec.height or 0)
    except av.error.FFmpegError as err:
        detail = getattr(err, "strerror", None) or str(err)
        if _looks_like_container(path):
            raise CorruptVideoError(path, f"truncated or corrupt container ({detail})") from None
        raise NotAVideoError(path, f"not a video file ({detail})") from None


def _decord_message(err: BaseException) -> str:
    # decord prefixes "[hh:mm:ss] /src/file.cc:123: "; keep only the message.
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", text)[:200]


def read_clip(path: str | Path, stored_frames: int, stored_size: int, num_threads: int = 0) -> DecodedClip:
    """Decode ``stored_frames`` frames spread uniformly over the whole video,
    short side resized to ``stored_size`` (during decoding) and centre-cropped
    to a square.

    Only the sampled frames are requested from decord (``get_batch``; it seeks
    to the nearest keyframe and decodes forward), never the whole video into
    memory. Raises a :class:`VideoError` subclass that says why a file cannot
    be used. Pixel aspect ratio and rotation metadata are ignored.
    """
    import decord

    path = str(path)
    _check_file(path)
    width, height = _probe_frame_size(path)
    if width <= 0 or height <= 0:
        raise CorruptVideoError(path, f"video stream reports no frame size ({width}x{height})")
    out_width, out_height = resized_size(width, height, stored_size)
    try:
        reader = decord.VideoReader(path, width=out_width, height=out_height, num_threads=num_threads)
        num_frames = len(reader)
        if num_frames < 1:
            raise NoFramesError(path, "no decodable frames (video stream holds 0 frames)")
        indices = segment_indices(num_frames, stored_frames)
        try:
            frames = reader.get_batch(indices.tolist()).asnumpy()
        except decord.DECORDError as err:
            if "size must exactly match" not in str(err):
                raise
            # decord 0.6 miscomputes its copy size for some small output sizes
            # (e.g. 48x36): decode at native size and resize here instead.
            reader = decord.VideoReader(path, num_threads=num_threads)
            frames = _resize_frames(reader.get_batch(indices.tolist()).asnumpy(), out_width, out_height)
    except (decord.DECORDError, RuntimeError, AssertionError) as err:
        if _first_frame_decodes(path):
            raise CorruptVideoError(
                path, f"truncated or corrupt: decoding failed part-way ({_decord_message(err)})"
            ) from None
        raise NoFramesError(path, f"no decodable frames ({_decord_message(err)})") from None

    top = (frames.shape[1] - stored_size) // 2
    left = (frames.shape[2] - stored_size) // 2
    frames = frames[:, top : top + stored_size, left : left + stored_size]
    return DecodedClip(np.ascontiguousarray(frames), source_frames=num_frames, padded=num_frames < stored_frames)


def _resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    clip = F.interpolate(clip, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _first_frame_decodes(path: str) -> bool:
    # PyAV decodes lazily packet by packet, so it tells "nothing decodes" apart
    # from "broken later on" where decord's read-ahead fails either way.
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration):
        return False
    return True
