"""Decoding with PyAV (FFmpeg through Cython): vidray's default, the one that does the least work.

One container, opened once, answers everything: the header gives the frame
size and sample aspect ratio, one demux pass indexes the packets, the sampled
frames are decoded (skipping what no sample needs, see :func:`_decode_samples`),
and the first decoded frame carries the display matrix. When decoding fails,
the same container is rewound to tell "nothing decodes" from "broken part-way".
"""

from __future__ import annotations

import bisect

import av
import numpy as np

from vidray.data.clip import (
    CorruptVideoError,
    DecodedClip,
    Geometry,
    NoFramesError,
    NoVideoStreamError,
    StreamInfo,
    UnknownCodecError,
    UnsupportedByDecoderError,
    VideoError,
    centre_crop,
    quarter_turns,
    rotate_frames,
    sample_aspect,
    segment_indices,
    unopenable,
)


# swscale, resizing and converting to RGB in one call: bilinear, with exact rounding and chroma
# interpolated at full horizontal resolution. Without the last two, x86's SIMD path rounds dark
# levels 1-2 low at even output widths and smears saturated colour edges: the model input was
# 14 grey levels from transformers.pipeline's on a colour test pattern, 2 with them
# (benchmarks/footage_matrix.py; docs/benchmarks.md, section 9).
_SWS = av.video.reformatter.Interpolation
SCALE_FLAGS = int(_SWS.BILINEAR) | int(_SWS.ACCURATE_RND) | int(_SWS.FULL_CHR_H_INT)


def to_rgb(frame, width: int, height: int) -> np.ndarray:
    """A decoded frame as uint8 RGB ``[height, width, 3]``, scaled by swscale with :data:`SCALE_FLAGS`."""
    return frame.to_ndarray(width=width, height=height, format="rgb24", interpolation=SCALE_FLAGS)


def _detail(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)


def open_video(path: str):
    """(container, its video stream); raises the VideoError that says why not.

    The stream is the one FFmpeg picks (``av_find_best_stream``: the most frames probed, then the
    highest bit rate), as torchcodec, decord and players do; not the first one, which in a web
    download can be its thumbnail (a one-frame MJPEG track ahead of the video in Matroska). Cover
    art (an ``attached_pic`` stream: the picture of a song) is not a video, and a stream whose codec
    FFmpeg cannot decode is passed over (:class:`UnknownCodecError` when no other is left).
    """
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as err:
        raise unopenable(path, _detail(err)) from None
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type for s in container.streams if s.type != "video"})
        kinds += ["cover image"] if container.streams.video else []
        container.close()
        raise NoVideoStreamError(path, f"no video stream (streams: {', '.join(kinds) or 'none'})")
    # PyAV gives a stream FFmpeg has no decoder for no codec_context (and no way to read its codec tag):
    # such a stream is passed over, as FFmpeg's own pick does when asked for a decoder (torchcodec, decord).
    decodable = [s for s in videos if s.codec_context is not None]
    if not decodable:
        container.close()
        raise UnknownCodecError(path, "its video codec is not one FFmpeg can decode (unknown, or missing from PyAV's FFmpeg build)")
    best = container.streams.best("video")
    return container, best if best in decodable else decodable[0]


def coded_geometry(path: str, stream) -> Geometry:
    """The header's frame size and sample aspect ratio (rotation 0: PyAV shows the
    display matrix on decoded frames only, see :func:`first_frame_rotation`)."""
    codec = stream.codec_context
    width, height = int(codec.width or 0), int(codec.height or 0)
    if width <= 0 or height <= 0:
        raise CorruptVideoError(path, f"video stream reports no frame size ({width}x{height})")
    return Geometry(width, height, 0, sample_aspect(stream.sample_aspect_ratio))


def first_frame_rotation(container, stream, rewind: bool = False) -> int | None:
    """Rotation of the first decodable frame (its display matrix), or None when no frame decodes.

    ``rewind``: seek back to the start first (seeking also flushes the decoder),
    so the same container answers after a failed decode too.
    """
    stream.codec_context.skip_frame = "DEFAULT"
    try:
        if rewind:
            container.seek(0)
        for frame in container.decode(stream):
            return quarter_turns(frame.rotation)
    except av.error.FFmpegError:
        return None
    return None


def read_samples(path: str, stored_frames: int, stored_size: int, num_threads: int = 0) -> DecodedClip:
    """Decode the clip (see :func:`vidray.data.video.read_clip`) from one open container."""
    container, stream = open_video(path)
    with container:
        geometry = coded_geometry(path, stream)
        # Rotating after resizing: the short side is the short side either way, and
        # rotating a 128-pixel frame is cheaper than rotating the source.
        out_width, out_height = geometry.resize_before_rotation(stored_size)
        progress = _Progress()
        try:
            frames, num_frames = _decode_samples(container, stream, stored_frames, out_width, out_height,
                                                 num_threads, progress)  # fmt: skip
        except (av.error.FFmpegError, _MissingFrames) as err:
            # A decode error alone says neither "nothing decodes" nor "broken later on".
            if progress.rotation is not None or first_frame_rotation(container, stream, rewind=True) is not None:
                raise CorruptVideoError(path, f"truncated or corrupt: decoding failed part-way ({_detail(err)})") from None
            raise NoFramesError(path, f"no decodable frames ({_detail(err)})") from None
    if num_frames < 1:
        raise NoFramesError(path, "no decodable frames (video stream holds 0 frames)")
    frames = centre_crop(rotate_frames(frames, progress.rotation or 0), stored_size)
    return DecodedClip(frames, source_frames=num_frames, padded=num_frames < stored_frames)


class _MissingFrames(Exception):
    """The index promised frames that the decoder never produced."""


class _SeekOvershot(Exception):
    """A seek landed after the frame it was for, as it does in containers that seek by byte position
    (those are read in order from the start: _IMPRECISE_SEEK_FLAGS); here, in one whose flags did not say so."""


class _Progress:
    """What decoding has seen so far: the display rotation of the first decoded frame (None: none yet)."""

    rotation: int | None = None

    def saw(self, frame) -> None:
        if self.rotation is None:
            self.rotation = quarter_turns(frame.rotation)


def _decode_samples(container, stream, count: int, width: int, height: int, num_threads: int,
                    progress: _Progress) -> tuple[np.ndarray, int]:  # fmt: skip
    """(``count`` frames at the segment starts resized to width x height, frames in the video).

    One demux pass (no decoding) indexes the packets: display order from their
    timestamps, and where the keyframes are. Then, for the samples in order,
    the decoder seeks only when a keyframe lies between its position and the
    next sample (else it decodes on), and is told to skip non-reference frames
    that are not samples (``skip_frame=NONREF``, set per packet): no other frame
    depends on them, so they need not be decoded. With B-frames (YouTube's
    H.264) that is about half the frames; without, it changes nothing.
    Where the timestamps do not tell the display order (:func:`_pts_tell_display_order`):
    decode everything in order instead, numbering frames as the decoder outputs them.
    """
    codec = stream.codec_context
    codec.thread_count, codec.thread_type = num_threads, "AUTO"
    # (pts, keyframe, shown) of every packet. Packets FFmpeg flags as discard (before an edit
    # list's start: a trim, a `-c copy` cut) are decoded as references but never shown: not frames
    # of the video. The keyframe the first shown frames decode from can be one of them.
    packets = [(p.pts, p.is_keyframe, not p.is_discard) for p in container.demux(stream) if p.size]
    # A stream recorded or cut mid-GOP (a broadcast capture, a transport stream's tail) opens with
    # frames whose reference came before it: nothing decodes them. The video starts at its first keyframe.
    packets = packets[next((i for i, (_, key, _) in enumerate(packets) if key), 0) :]
    timestamps = [pts for pts, _, shown in packets if shown]
    if not timestamps:
        return np.zeros((0, height, width, 3), np.uint8), 0
    samples = segment_indices(len(timestamps), count).tolist()
    by_pts = _pts_tell_display_order(stream, timestamps)
    shown = sorted(timestamps) if by_pts else None  # display order
    index_of = {pts: i for i, pts in enumerate(shown)} if by_pts else None
    if not by_pts or container.format.flags & _IMPRECISE_SEEK_FLAGS:
        container.seek(0)
        kept = _decode_in_order(container, stream, set(samples), width, height, progress, index_of)
    else:
        keyframes = sorted(pts for pts, key, _ in packets if key and pts is not None)
        try:
            kept = _decode_by_timestamp(container, stream, shown, index_of, keyframes, samples, width, height, progress)
        except _SeekOvershot:  # this file cannot be sought precisely: read it once, in order
            container.seek(0)
            kept = _decode_in_order(container, stream, set(samples), width, height, progress, index_of)
    missing = sorted(set(samples) - set(kept))
    if missing:
        raise _MissingFrames(f"frame {missing[0]} of {len(timestamps)} never decoded")
    return np.stack([kept[i] for i in samples]), len(timestamps)


def _pts_tell_display_order(stream, timestamps: list) -> bool:
    """Whether the shown packets' pts, listed in decode (file) order, give each frame's place in display order.

    Not when some are missing or repeated. Nor when the decoder reorders frames (B-frames; FFmpeg's
    ``has_b_frames``, from the stream header or measured while probing) yet the pts never go back in
    file order: a frame shown before one stored ahead of it has the smaller pts, so true pts go back
    somewhere. Pts that never do were made up by FFmpeg in file order, for a container that stores
    none: H.264 with B-frames in AVI (24 of 32 samples were other frames, or one "never decoded"), or
    in ASF as FFmpeg writes it. (MPEG-4 Part 2 in AVI gets true pts: FFmpeg's parser knows its frame
    types.) A stream that could reorder but does not is read in order too: right, only slower.
    """
    if None in timestamps or len(set(timestamps)) < len(timestamps):
        return False
    if not stream.codec_context.has_b_frames:
        return True
    return any(later < earlier for earlier, later in zip(timestamps, timestamps[1:]))


def _decode_by_timestamp(container, stream, timestamps, index_of, keyframes, samples, width, height,
                         progress: _Progress) -> dict[int, np.ndarray]:  # fmt: skip
    """``timestamps``: the shown frames' pts, sorted, and ``index_of`` each one's place among them;
    ``keyframes``: every keyframe packet's pts, sorted (hidden ones included)."""
    keyframes = keyframes or [timestamps[0]]
    wanted = set(samples)
    wanted_pts = {timestamps[i] for i in wanted}
    kept, position, frames = {}, -1, None
    for target in sorted(wanted):
        if target in kept:
            continue
        keyframe = max((k for k in keyframes if k <= timestamps[target]), default=keyframes[0])
        first = bisect.bisect_left(timestamps, keyframe)  # the first shown frame decoding from it gives
        if frames is None or first > position:
            container.seek(keyframe, stream=stream, backward=True)
            frames = _decoded_frames(stream.codec_context, container.demux(stream), wanted_pts)
            position = first - 1
        for frame in frames:
            progress.saw(frame)
            index = index_of.get(frame.pts)
            if index is None:
                continue
            if index > target and target not in kept and index > position:
                raise _SeekOvershot()  # decoding went past the target without showing it
            position = max(position, index)
            if index in wanted and index not in kept:
                kept[index] = to_rgb(frame, width, height)
            if target in kept:
                break
    return kept


def _decode_in_order(container, stream, wanted: set[int], width: int, height: int, progress: _Progress,
                     index_of: dict[int, int] | None = None) -> dict[int, np.ndarray]:  # fmt: skip
    """Decode from where the container is, keeping frames ``wanted``: each decoded frame is the one its
    pts names in ``index_of`` (a frame that does not decode then shifts no other), else the next one."""
    kept = {}
    for count, frame in enumerate(_decoded_frames(stream.codec_context, container.demux(stream))):
        progress.saw(frame)
        index = count if index_of is None else index_of.get(frame.pts)
        if index in wanted and index not in kept:
            kept[index] = to_rgb(frame, width, height)
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


# Container formats whose timestamps may jump or be missing: MPEG transport and program streams
# (.ts, .m2ts, .mpg, .vob: AVFMT_TS_DISCONT), raw elementary streams (AVFMT_NOTIMESTAMPS). A seek in
# them lands by byte position, a keyframe or more away from the frame asked for.
_IMPRECISE_SEEK_FLAGS = 0x200 | 0x80


def probe_geometry(path: str) -> Geometry:
    """How the video displays (size, rotation, pixel aspect), from its header and first frame.

    For decoders that need the geometry before they open the file (decord).
    Raises the VideoError for files that are not videos, have no video stream
    or no decodable frame.
    """
    return probe_geometry_and_seeking(path)[0]


def probe_geometry_and_seeking(path: str) -> tuple[Geometry, str, bool]:
    """:func:`probe_geometry`, the container format's name (FFmpeg's: ``mpegts``, ``mov,mp4,...``) and
    whether a seek in it lands where asked (see _IMPRECISE_SEEK_FLAGS)."""
    container, stream = open_video(path)
    with container:
        geometry = coded_geometry(path, stream)
        layout = container.format.name, not container.format.flags & _IMPRECISE_SEEK_FLAGS
        stream.codec_context.thread_count = 1  # one frame: threads would only add start-up
        rotation = first_frame_rotation(container, stream)
    if rotation is None:
        raise NoFramesError(path, "no decodable frames (the first frame does not decode)")
    return Geometry(geometry.coded_width, geometry.coded_height, rotation, geometry.sample_aspect_ratio), *layout


def refused_by(decoder: str, path: str, detail: str) -> UnsupportedByDecoderError:
    """The error for a file ``decoder`` cannot open though PyAV decodes its first frame (the caller
    probed it): not a corrupt file but one its build lacks the codec for (decord's bundled FFmpeg has
    no AV1, for one). Names the codec and the decoder that reads it."""
    container, stream = open_video(path)
    with container:
        codec = stream.codec_context.codec.canonical_name  # the format (av1), not the decoder (libdav1d)
    return UnsupportedByDecoderError(
        path, f"{decoder} cannot decode its {codec} video ({detail}), which PyAV decodes: "
        "set data.decoder=pyav (to predict with a model: vidray predict --decoder pyav)"
    )


def failed_part_way(decoder: str, path: str, detail: str, stored_frames: int, stored_size: int) -> VideoError:
    """The error for a file ``decoder`` stopped decoding part-way: truncated or corrupt when PyAV cannot
    read the same samples either, else :func:`refused_by` (a file that decoder cannot read, not a broken
    one). PyAV decodes the clip once more on this error path only."""
    try:
        read_samples(path, stored_frames, stored_size, num_threads=1)
    except VideoError:
        return CorruptVideoError(path, f"truncated or corrupt: decoding failed part-way ({detail})")
    return refused_by(decoder, path, f"it failed part-way: {detail}")


def probe_stream(path: str) -> StreamInfo:
    """What :func:`vidray.data.video.probe` reports, from one open container.

    The header gives size, sample aspect ratio, rate and duration; the first
    decoded frame its display matrix (PyAV shows it on frames only). Containers
    without a frame count in their header (mkv, webm) get one by demuxing
    packets, which reads the file but decodes nothing more.
    """
    container, stream = open_video(path)
    with container:
        coded = coded_geometry(path, stream)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = None
        num_frames = stream.frames
        stream.codec_context.thread_count = 1  # one frame: threads would only add start-up
        rotation = first_frame_rotation(container, stream)
        if not num_frames:
            container.seek(0)
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
    return StreamInfo(coded, rotation, fps, duration, int(num_frames or 0))
