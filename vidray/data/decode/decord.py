"""Decoding with decord, for users whose pipelines were built on it.

decord applies the display-matrix rotation itself (its output size is the
displayed one) but reports neither the rotation nor the sample aspect ratio,
and it must be told the output size when the file is opened. So the geometry
comes from a PyAV read of the container header and first frame
(:func:`vidray.data.decode.pyav.probe_geometry`), which also tells a file that
nothing decodes from one that breaks part-way: decord's read-ahead fails either
way. This is the one backend that opens a file more than once (and, where it
would seek, demuxes it with PyAV first: see :func:`_seeks_misplace_frames`).

decord seeks to the keyframe before each sample and decodes forward
(``get_batch``); it cannot skip non-reference frames, so it decodes about
twice what the PyAV backend does on B-frame footage (docs/benchmarks.md).
Where its seeks would land on other frames than asked for, it reads the file in order instead.
"""

from __future__ import annotations

import bisect
import re

import av
import decord
import numpy as np

from vidray.data.clip import DecodedClip, NoFramesError, centre_crop, segment_indices
from vidray.data.decode.pyav import failed_part_way, open_video, probe_geometry_and_seeking, refused_by


# Containers (FFmpeg's names) where decord's seeks land on the frame asked for, measured on each: MP4/MOV
# (edit lists aside, see _hidden_frames), Matroska/WebM, AVI, FLV; in closed GOPs with timestamps only
# (see _seeks_misplace_frames). Elsewhere (WMV/ASF: frames repeated; MXF, Ogg, ...) a file is read in
# order. MPEG transport and program streams it cannot read either way.
MOV = "mov,mp4,m4a,3gp,3g2,mj2"
DECORD_SEEKS_EXACTLY = frozenset({MOV, "matroska,webm", "avi", "flv"})
# decord stamps a frame whose packet has no pts (AVI with B-frames) INT64_MIN in the stream's time base:
# -3.7e17 s at 1/25, -1e14 s at 1/90000. An edit list's negative times are at most the video's length.
_NO_TIME_BELOW = -1e9  # seconds
_DECORD_ERRORS = (decord.DECORDError, RuntimeError, AssertionError)

# decord's own FFmpeg logs decoding errors to stderr (a dozen "[h264 @ 0x...] error while decoding MB" lines
# for one damaged file in `vidray predict`'s console); the error vidray raises carries the reason. PyAV and
# torchcodec print nothing. This is decord's bundled FFmpeg only: no other library's logging changes.
decord.logging.set_level(decord.logging.QUIET)


def _message(err: BaseException) -> str:
    # decord prefixes "[hh:mm:ss] /src/file.cc:123: "; keep only the message.
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", text)[:200]


def read_samples(path: str, stored_frames: int, stored_size: int, num_threads: int = 0) -> DecodedClip:
    """Decode the clip (see :func:`vidray.data.video.read_clip`) with decord."""
    # Typed errors for files that are not videos or decode nothing; whether seeking lands where asked.
    geometry, container_format, seeks_precisely = probe_geometry_and_seeking(path)
    seeks_exactly = container_format in DECORD_SEEKS_EXACTLY
    if not seeks_precisely:  # measured: decord 0.6 started a .ts and a .mpg at their second keyframe
        raise refused_by("decord", path, f"it can start a {container_format} stream at a later keyframe")
    out_width, out_height = geometry.resize_displayed(stored_size)
    try:
        reader = decord.VideoReader(path, width=out_width, height=out_height, num_threads=num_threads)
    except _DECORD_ERRORS as err:
        raise refused_by("decord", path, _message(err)) from None  # PyAV decoded its first frame above
    starts = _frame_starts(reader)
    # Edit lists exist in MP4/MOV (other containers can have negative times of their own).
    hidden = _hidden_frames(starts) if container_format == MOV else 0
    num_frames = len(reader) - hidden
    if num_frames < 1:
        raise NoFramesError(path, "no decodable frames (video stream holds 0 frames)")
    indices = segment_indices(num_frames, stored_frames).tolist()
    # The demux pass (a few ms) last, for the files decord would seek in only.
    in_order = bool(hidden) or not seeks_exactly or _seeks_misplace_frames(path, starts)
    try:
        frames = _read_resized(reader, path, indices, in_order, out_width, out_height, num_threads)
    except _DECORD_ERRORS as err:
        if num_threads == 1:
            raise failed_part_way("decord", path, _message(err), stored_frames, stored_size) from None
        # decord takes FFmpeg's "send the next packet later" (EAGAIN) from a frame-threaded decoder for
        # an error. Measured on realtime-mode VP9, what browsers' recorders (MediaRecorder, WebRTC) write:
        # every read failed part-way with decord's thread count, none with one thread.
        try:
            one_thread = decord.VideoReader(path, width=out_width, height=out_height, num_threads=1)
            frames = _read_resized(one_thread, path, indices, in_order, out_width, out_height, 1)
        except _DECORD_ERRORS:
            raise failed_part_way("decord", path, _message(err), stored_frames, stored_size) from None
    return DecodedClip(centre_crop(frames, stored_size), source_frames=num_frames, padded=num_frames < stored_frames)


def _read_resized(reader, path: str, indices: list[int], in_order: bool, width: int, height: int, num_threads: int):
    """:func:`_read` at ``width`` x ``height``, around decord 0.6's copy-size bug."""
    try:
        return _read(reader, indices, in_order)
    except decord.DECORDError as err:
        if "size must exactly match" not in str(err):
            raise
        # decord 0.6 miscomputes its copy size for some small output sizes
        # (e.g. 48x36): decode at the displayed size and resize here instead.
        return _resize(_read(decord.VideoReader(path, num_threads=num_threads), indices, in_order), width, height)


def _frame_starts(reader) -> np.ndarray:
    """Each frame's start in seconds as decord counts frames (sorted by pts: its display order)."""
    if len(reader) < 1:
        return np.zeros(0, np.float32)
    return reader.get_frame_timestamp(list(range(len(reader))))[:, 0]


def _hidden_frames(starts: np.ndarray) -> int:
    """Frames decord counts that a player never shows: those an edit list hides (a cut made with
    `ffmpeg -ss ... -c copy`, a phone's trim), decoded as references before the video's start and
    stamped with negative times. None for most files. Frames without a time are not hidden ones."""
    hidden = int(((starts < 0) & (starts > _NO_TIME_BELOW)).sum())
    return hidden if hidden < len(starts) else 0


def _seeks_misplace_frames(path: str, starts: np.ndarray) -> bool:
    """Whether decord's get_batch would return other frames than those asked for (measured, 0.6).

    It numbers frames by sorting its packets' pts, and takes a keyframe's place in the file (decode
    order) for its place in that numbering when it seeks. That holds for closed GOPs only. It fails
    where frames have no pts (H.264 or MPEG-4 Part 2 with B-frames in AVI: frame 0 came back for frame
    20), and in an open GOP, where frames shown before a keyframe are stored after it: x265's default
    (HEVC), x264's --open-gop, MPEG-4 Part 2 with B-frames (frame 60 came back for 117). Reading in
    order gives the right frames in all of them, for one decode of the file up to the last sample.
    """
    if bool((starts <= _NO_TIME_BELOW).any()):
        return True
    return _keyframe_out_of_place(path)


def _keyframe_out_of_place(path: str) -> bool:
    """Whether some keyframe's place in decode order is not its place in display order, or the display
    order is unknown (pts missing or repeated). One demux pass through PyAV, no decoding: a few
    milliseconds for a 20 s 720p MP4 (decord reads its samples in hundreds)."""
    container, stream = open_video(path)
    with container:
        try:
            # Every packet decord counts; not the demuxer's end marker (empty, without timestamps).
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream)
                       if p.size or p.pts is not None or p.dts is not None]  # fmt: skip
        except av.error.FFmpegError:  # a file broken part-way: read in order, which tells where it breaks
            return True
    times = [pts for pts, _ in packets]
    if None in times or len(set(times)) < len(times):
        return True
    shown = sorted(times)
    return any(key and bisect.bisect_left(shown, pts) != place for place, (pts, key) in enumerate(packets))


def _read(reader, indices: list[int], in_order: bool) -> np.ndarray:
    """Shown frames ``indices``; ``in_order``: by reading the file from its start, keeping the samples.

    decord reaches a frame by seeking or by reading on, and get_batch mixes both. Where seeking is not
    exact that mixes two countings (measured): with frames an edit list hides, reading on returns the
    next *shown* frame while a seek counts the hidden ones too; in a Windows Media file seeks repeated
    frames. Such files are read in order.
    """
    if not in_order:
        return reader.get_batch(indices).asnumpy()
    wanted, kept = set(indices), {}
    for index in range(max(indices) + 1):
        try:
            frame = reader.next()
        except StopIteration:  # fewer frames than it counted: as a truncated file fails a seek
            raise decord.DECORDError(f"the stream ended at frame {index} of {len(reader)}") from None
        if index in wanted:
            kept[index] = frame.asnumpy()
            if kept[index].shape[-1] != 3:  # the output-size bug read_samples works around, as next() shows it
                raise decord.DECORDError(f"size must exactly match (decord returned {kept[index].shape})")
    return np.stack([kept[i] for i in indices])


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB frames scaled to width x height by FFmpeg's swscale (the scaler decord itself uses)."""
    return np.stack(
        [av.VideoFrame.from_ndarray(f, format="rgb24").to_ndarray(width=width, height=height, format="rgb24")
         for f in frames]
    )  # fmt: skip
