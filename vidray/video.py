"""Reading and writing video files, through PyAV (FFmpeg).

Decoding does only the work the sampled frames need (see :func:`read_clip`);
container headers tell *why* a file is unusable; H.264 writing serves the demo
data and tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidray.errors import UserError


# x264 settings that make the output depend on the input alone, not on the machine or the process.
# - mbtree=0: the macroblock-tree lookahead is x264's one float-heavy SIMD kernel family, and it is
#   not reproducible: on AVX-512 CPUs its result varied with what the process had allocated before
#   (the same clip encoded 6 times in a row gave 6 different files; with asm capped at AVX2 it did
#   not, and AVX2 and SSE4.2 builds disagreed with each other). Without it, the files are identical
#   whatever the thread pool, the load, or the SIMD level (SSE4.2 to AVX-512 checked).
#   For this short synthetic footage mbtree buys nothing measurable.
# - threads=1: frame threading changes x264's decisions with the thread count, which defaults
#   to the machine's core count.
DETERMINISTIC_X264 = {"threads": "1", "x264-params": "mbtree=0"}


def encode_mp4(path: str | Path, frames: np.ndarray, fps: float = 30.0, crf: int = 23) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as an H.264 mp4 (yuv420p) through PyAV's libx264.

    H and W must be even (yuv420p subsampling). The bytes are a pure function of
    ``frames``, ``fps`` and ``crf``: see :data:`DETERMINISTIC_X264`.
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
        stream.options = {"crf": str(crf), "preset": "veryfast", **DETERMINISTIC_X264}
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


def read_clip(path: str | Path, stored_frames: int, stored_size: int, num_threads: int = 0) -> DecodedClip:
    """Decode ``stored_frames`` frames spread uniformly over the whole video,
    short side resized to ``stored_size`` and centre-cropped to a square.

    Only the decode work the samples need is done (:func:`_decode_samples`):
    seeks only across keyframes, and the decoder skips non-reference frames
    that are not samples. Raises a :class:`VideoError` subclass that says why
    a file cannot be used. Pixel aspect ratio and rotation metadata are ignored.
    ``num_threads``: FFmpeg decoder threads (0: FFmpeg's choice).
    """
    import av

    path = str(path)
    _check_file(path)
    width, height = _probe_frame_size(path)
    if width <= 0 or height <= 0:
        raise CorruptVideoError(path, f"video stream reports no frame size ({width}x{height})")
    out_width, out_height = resized_size(width, height, stored_size)
    try:
        frames, num_frames = _decode_samples(path, stored_frames, out_width, out_height, num_threads)
    except (av.error.FFmpegError, _MissingFrames) as err:
        detail = getattr(err, "strerror", None) or str(err)
        if _first_frame_decodes(path):
            raise CorruptVideoError(path, f"truncated or corrupt: decoding failed part-way ({detail})") from None
        raise NoFramesError(path, f"no decodable frames ({detail})") from None
    if num_frames < 1:
        raise NoFramesError(path, "no decodable frames (video stream holds 0 frames)")

    top = (frames.shape[1] - stored_size) // 2
    left = (frames.shape[2] - stored_size) // 2
    frames = frames[:, top : top + stored_size, left : left + stored_size]
    return DecodedClip(np.ascontiguousarray(frames), source_frames=num_frames, padded=num_frames < stored_frames)


class _MissingFrames(Exception):
    """The index promised frames that the decoder never produced."""


def _decode_samples(path: str, count: int, width: int, height: int, num_threads: int) -> tuple[np.ndarray, int]:
    """(``count`` frames at the segment centres resized to width x height, frames in the video).

    One demux pass (no decoding) indexes the packets: display order from their
    timestamps, and where the keyframes are. Then, for the samples in order,
    the decoder seeks only when a keyframe lies between its position and the
    next sample (else it decodes on), and is told to skip non-reference frames
    that are not samples (``skip_frame=NONREF``, set per packet): no other frame
    depends on them, so they need not be decoded. With B-frames (YouTube's
    H.264) that is about half the frames; without, it changes nothing.
    Packets without usable timestamps: decode everything in order instead.
    """
    import av

    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count, codec.thread_type = num_threads, "AUTO"
        # (pts, keyframe) of every shown frame. Packets FFmpeg flags as discard (before an
        # edit list's start) are decoded as references but never shown: not frames of the video.
        shown = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
        if not shown:
            return np.zeros((0, height, width, 3), np.uint8), 0
        samples = segment_indices(len(shown), count).tolist()
        timestamps = [pts for pts, _ in shown]
        if None in timestamps or len(set(timestamps)) != len(timestamps):
            container.seek(0)
            kept = _decode_in_order(container, stream, set(samples), width, height)
        else:
            keyframes = {pts for pts, key in shown if key}
            kept = _decode_by_timestamp(container, stream, sorted(timestamps), keyframes, samples, width, height)
    missing = sorted(set(samples) - set(kept))
    if missing:
        raise _MissingFrames(f"frame {missing[0]} of {len(shown)} never decoded")
    return np.stack([kept[i] for i in samples]), len(shown)


def _decode_by_timestamp(container, stream, timestamps, keyframes, samples, width, height) -> dict[int, np.ndarray]:
    index_of = {pts: i for i, pts in enumerate(timestamps)}
    keyframe_indices = sorted(index_of[pts] for pts in keyframes) or [0]
    wanted = set(samples)
    wanted_pts = {timestamps[i] for i in wanted}
    kept, position, frames = {}, -1, None
    for target in sorted(wanted):
        if target in kept:
            continue
        keyframe = max((k for k in keyframe_indices if k <= target), default=keyframe_indices[0])
        if frames is None or keyframe > position:
            container.seek(timestamps[keyframe], stream=stream, backward=True)
            frames = _decoded_frames(stream.codec_context, container.demux(stream), wanted_pts)
            position = keyframe - 1
        for frame in frames:
            index = index_of.get(frame.pts)
            if index is None:
                continue
            position = max(position, index)
            if index in wanted and index not in kept:
                kept[index] = frame.to_ndarray(width=width, height=height, format="rgb24")
            if target in kept:
                break
    return kept


def _decode_in_order(container, stream, wanted: set[int], width: int, height: int) -> dict[int, np.ndarray]:
    kept = {}
    for index, frame in enumerate(_decoded_frames(stream.codec_context, container.demux(stream))):
        if index in wanted:
            kept[index] = frame.to_ndarray(width=width, height=height, format="rgb24")
        if len(kept) == len(wanted):
            break
    return kept


def _decoded_frames(codec, packets, wanted_pts: set | None = None):
    """Frames decoded from ``packets``, then the decoder's delayed frames once they run out.

    With ``wanted_pts``, every other packet goes in with ``skip_frame=NONREF``:
    the decoder drops it unless later frames reference it.
    """
    for packet in packets:
        if not packet.size:
            continue  # the demuxer's end marker, or an empty (dropped-frame) packet: not a flush
        if wanted_pts is not None:
            codec.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
        yield from codec.decode(packet)
    codec.skip_frame = "DEFAULT"
    yield from codec.decode(None)


def _first_frame_decodes(path: str) -> bool:
    # Tells "nothing decodes" apart from "broken later on": a decode error alone says neither.
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration):
        return False
    return True
