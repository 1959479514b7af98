"""Decoding with torchcodec (the PyTorch team's FFmpeg binding; Hugging Face's video loader), on CPU or CUDA.

torchcodec applies the display-matrix rotation itself and reports the
displayed size, the rotation and the pixel aspect ratio in its metadata. It
resizes inside the decoder (FFmpeg's scaler, before the RGB conversion is
copied out), but the transform must be given when the file is opened, before
the metadata is known. :class:`_ShortSideResize` computes the size from the
dimensions torchcodec hands it at that point, so one open serves the common
case; only a video with non-square pixels is opened a second time with the
stretch included (torchcodec passes no pixel aspect ratio to transforms).

That hook is torchcodec's ``DecoderTransform._make_transform_spec``, private;
it is the same in every version tested (:data:`HOOK_TESTED`), and without it
the decoder is opened twice instead (header first, then with the size), which
gives the same frames. tests/test_video.py fails if the hook goes away.

``device="cuda"`` decodes on the GPU (NVDEC) and resizes there; frames come
back to host memory for the Parquet shard. Unmeasured (no GPU here): see
docs/benchmarks.md.
"""

from __future__ import annotations

import numpy as np
import torchcodec
from torchcodec.decoders import VideoDecoder
from torchcodec.transforms import DecoderTransform, Resize

from vidray.data.clip import (
    DecodedClip,
    Geometry,
    NoFramesError,
    centre_crop,
    quarter_turns,
    sample_aspect,
    segment_indices,
)

# torchcodec versions whose DecoderTransform._make_transform_spec(input_dims) was checked:
# 0.13 is PyPI's last CPU-only build (CI), 0.17 the CUDA build GPU nodes get.
HOOK_TESTED = ("0.13", "0.14", "0.15", "0.16", "0.17")


def single_open_supported() -> bool:
    """Whether the installed torchcodec has the transform hook :class:`_ShortSideResize` relies on."""
    version = ".".join(torchcodec.__version__.split("+")[0].split(".")[:2])
    return version in HOOK_TESTED and hasattr(DecoderTransform, "_make_transform_spec")


class _ShortSideResize(DecoderTransform):
    """Resize so the short side is ``short_side``, aspect kept (square pixels assumed).

    torchcodec calls ``_make_transform_spec`` with the displayed (post-rotation)
    (height, width) once it has read the header, inside ``VideoDecoder(...)``.
    """

    def __init__(self, short_side: int):
        self.short_side = short_side
        self.size: tuple[int, int] | None = None  # (height, width), once known

    def _make_transform_spec(self, input_dims) -> str:
        height, width = input_dims
        if not height or not width:
            raise ValueError(f"video stream reports no frame size ({width}x{height})")
        out_width, out_height = Geometry(width, height).resize_displayed(self.short_side)
        self.size = (out_height, out_width)
        return Resize(self.size)._make_transform_spec(input_dims)

    def _get_output_dims(self):
        return self.size


def _message(err: BaseException) -> str:
    # torchcodec prefixes "Function, /path/to/File.cpp:123, "; keep the message.
    text = " ".join(str(err).split())
    return text.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1][:200] if ".cpp:" in text else text[:200]


def _displayed_geometry(metadata) -> Geometry:
    """Geometry from torchcodec's metadata, whose width and height are already rotated."""
    rotation = quarter_turns(metadata.rotation)
    width, height = int(metadata.width or 0), int(metadata.height or 0)
    coded = (height, width) if rotation in (90, 270) else (width, height)
    return Geometry(*coded, rotation, sample_aspect(metadata.pixel_aspect_ratio))


def _open(path: str, stored_size: int, num_threads: int, device: str) -> VideoDecoder:
    options = dict(seek_mode="exact", num_ffmpeg_threads=num_threads, dimension_order="NHWC", device=device)
    if single_open_supported():
        resize = _ShortSideResize(stored_size)
        decoder = VideoDecoder(path, transforms=[resize], **options)
        geometry = _displayed_geometry(decoder.metadata)
        if geometry.sample_aspect_ratio == 1:
            return decoder
    else:
        geometry = _displayed_geometry(VideoDecoder(path, **{**options, "seek_mode": "approximate"}).metadata)
    # Non-square pixels (or no hook): open with the stretched size.
    out_width, out_height = geometry.resize_displayed(stored_size)
    return VideoDecoder(path, transforms=[Resize((out_height, out_width))], **options)


# Why torchcodec misreads an MPEG transport or program stream (.ts, .mts, .m2ts, .mpg), which is not corrupt:
# it seeks in one by byte position. Measured (0.13) on H.264 with B-frames there (x264's defaults, AVCHD
# camcorders): it decoded no frame at all, or returned a later keyframe as frame 0.
CANNOT_SEEK = "it cannot seek in this stream"


def read_samples(
    path: str, stored_frames: int, stored_size: int, num_threads: int = 0, device: str = "cpu"
) -> DecodedClip:
    """Decode the clip (see :func:`vidray.data.video.read_clip`) with torchcodec on ``device``."""
    try:
        decoder = _open(path, stored_size, num_threads, device)
    except (RuntimeError, ValueError) as err:
        # torchcodec's refusals do not say why (not a video? no video stream?): the
        # header, read with PyAV on this error path only, raises the typed reason. (Imported
        # here: PyAV is optional like every decoder library; require_decoder checks torchcodec's only.)
        from vidray.data.decode.pyav import probe_geometry, refused_by

        probe_geometry(path)
        raise refused_by("torchcodec", path, _message(err)) from None
    num_frames = len(decoder)
    if num_frames < 1:
        raise NoFramesError(path, "no decodable frames (video stream holds 0 frames)")
    samples = segment_indices(num_frames, stored_frames)
    try:
        # Frames come back in the order asked: decoded once per distinct index, sorted internally.
        batch = decoder.get_frames_at(samples.tolist())
    except (RuntimeError, IndexError) as err:
        # PyAV tells why. A file with no video at all (a song whose only picture is its cover, which torchcodec
        # takes for a one-frame video) raises NoVideoStreamError here. Where PyAV decodes the first frame, an
        # MPEG stream is refused whether or not torchcodec got as far as its frame 0 (with B-frames it does
        # not), and any other file is decoded by PyAV too, to tell a broken file from one torchcodec misreads.
        from vidray.data.decode.pyav import failed_part_way, probe_geometry_and_seeking, refused_by

        try:
            seeks_precisely = probe_geometry_and_seeking(path)[2]
        except NoFramesError:
            raise NoFramesError(path, f"no decodable frames ({_message(err)})") from None
        if not seeks_precisely:
            raise refused_by("torchcodec", path, f"{CANNOT_SEEK}: {_message(err)}") from None
        raise failed_part_way("torchcodec", path, _message(err), stored_frames, stored_size) from None
    # The first sample is frame 0, shown at the stream's beginning; see _late_first_frame for why it can be later.
    begin = decoder.metadata.begin_stream_seconds
    if begin is not None and abs(float(batch.pts_seconds[0]) - begin) > 1e-3:
        from vidray.data.decode.pyav import probe_geometry_and_seeking, refused_by

        late = f"its frame 0 comes back as the one at {float(batch.pts_seconds[0]):.3f} s"
        _, container_format, seeks_precisely = probe_geometry_and_seeking(path)
        why = _late_first_frame(container_format) if seeks_precisely else CANNOT_SEEK
        raise refused_by("torchcodec", path, f"{late}: {why}")
    frames = batch.data.cpu().numpy() if batch.data.device.type != "cpu" else batch.data.numpy()
    return DecodedClip(centre_crop(np.asarray(frames), stored_size), source_frames=num_frames,
                       padded=num_frames < stored_frames)  # fmt: skip


def _late_first_frame(container_format: str) -> str:
    """Why torchcodec's frame 0 is stamped after the stream's beginning (measured, 0.13), by container
    (FFmpeg's name: "mov,mp4,m4a,3gp,3g2,mj2", "avi", "asf").

    In MP4/MOV: torchcodec (exact seek mode) cannot reach the frames before the first shown keyframe when an
    edit list hides the keyframe they decode from (a trimmed phone video, a `-c copy` cut); it returns that
    next keyframe, with its time. Elsewhere (no edit lists): B-frames in AVI, and in ASF as FFmpeg writes it,
    whose display times FFmpeg derives from the decode times: the first frame's starts a frame or two late.
    """
    if container_format.startswith("mov,"):
        return "an edit list hides the keyframe its first frames decode from"
    return f"its {container_format} container stores no display times for B-frames, and those FFmpeg derives start late"
