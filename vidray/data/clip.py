"""What every decoder shares: the clip it returns, how it samples and shapes it, how it fails.

The backends in vidray/data/decode/ import this module (and nothing above it):
they sample the same frames (:func:`segment_indices`), show them as a player
would (:class:`Geometry`: display-matrix rotation and sample aspect ratio
applied), resize the short side and centre-crop the same way, and fail with
the same :class:`VideoError` categories. :mod:`vidray.data.video` picks a
backend (``read_clip``) and checks the file before any backend sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from vidray.errors import UserError


class VideoError(UserError):
    """A video file that cannot be used. ``code`` is a stable category for
    tables and tests; ``reason`` is the human detail; ``str()`` names the file."""

    code = "video_error"

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# The categories a rejected video is filed under (rejects.csv's `error`).
class MissingVideoError(VideoError): code = "missing"
class EmptyVideoError(VideoError): code = "empty"
class NotAVideoError(VideoError): code = "not_a_video"
class CorruptVideoError(VideoError): code = "corrupt"
class NoVideoStreamError(VideoError): code = "no_video_stream"
class NoFramesError(VideoError): code = "no_frames"
# A video stream whose codec FFmpeg has no decoder for (a tag it does not know, or a codec its build lacks):
# no decoder of vidray reads it, so it is not the chosen decoder's (unsupported_by_decoder) nor a broken file.
class UnknownCodecError(VideoError): code = "unknown_codec"
# A video PyAV decodes that the chosen decoder (decord, torchcodec on its FFmpeg build, NVDEC) cannot.
class UnsupportedByDecoderError(VideoError): code = "unsupported_by_decoder"


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # uint8 [stored_frames, stored_size, stored_size, 3], as displayed
    source_frames: int  # frames the container reports for the whole video
    padded: bool  # source_frames < stored_frames, so some frames appear more than once


@dataclass(frozen=True)
class Geometry:
    """How a player shows a video stream's coded frames.

    ``rotation``: the display matrix's counter-clockwise rotation, 0/90/180/270
    (phones record landscape and mark "show rotated 90"). ``sample_aspect_ratio``:
    the width of one pixel over its height (anamorphic DVD/DV footage: 32/27...);
    a player stretches the width by it before rotating.
    """

    coded_width: int
    coded_height: int
    rotation: int = 0
    sample_aspect_ratio: Fraction = Fraction(1)

    @property
    def unrotated_size(self) -> tuple[int, int]:
        """(width, height) with square pixels, before the rotation."""
        return max(1, round(self.coded_width * self.sample_aspect_ratio)), self.coded_height

    @property
    def displayed_size(self) -> tuple[int, int]:
        """(width, height) as a player shows the video."""
        width, height = self.unrotated_size
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def resize_before_rotation(self, short_side: int) -> tuple[int, int]:
        """(width, height) to scale the *coded* frame to, so that rotating it after gives
        :meth:`resize_displayed`: the short side is the short side either way."""
        return resized_size(*self.unrotated_size, short_side)

    def resize_displayed(self, short_side: int) -> tuple[int, int]:
        """(width, height) of the displayed frame with its short side scaled to ``short_side``."""
        return resized_size(*self.displayed_size, short_side)


@dataclass(frozen=True)
class StreamInfo:
    """What a video's header and first frame say, without decoding a clip (``vidray index`` probes it)."""

    coded: Geometry  # frame size and sample aspect ratio; rotation 0 (see ``rotation``)
    rotation: int | None  # display matrix of the first decodable frame; None when none decodes
    fps: float | None
    duration: float | None  # seconds
    num_frames: int  # from the header, else by counting packets; 0 when the stream holds none


def quarter_turns(degrees: float | None) -> int:
    """A display-matrix angle (any sign, degrees counter-clockwise) as 0, 90, 180 or 270."""
    if degrees is None or degrees != degrees:  # None or NaN: no display matrix
        return 0
    return int(round(float(degrees) / 90.0)) % 4 * 90


def sample_aspect(value) -> Fraction:
    """A stream's sample aspect ratio as a Fraction; unknown (None, 0, 0/1) means square pixels."""
    try:
        ratio = Fraction(value) if value is not None else Fraction(0)
    except (TypeError, ValueError, ZeroDivisionError):
        return Fraction(1)
    return ratio if ratio > 0 else Fraction(1)


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    """``[T, H, W, C]`` frames rotated counter-clockwise by ``rotation`` degrees (a multiple of 90)."""
    return np.rot90(frames, k=rotation // 90, axes=(1, 2)) if rotation else frames


def centre_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` square of ``[T, H, W, C]`` frames, contiguous."""
    top = (frames.shape[1] - size) // 2
    left = (frames.shape[2] - size) // 2
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size])


def segment_indices(num_frames: int, count: int) -> np.ndarray:
    """First frame of each of ``count`` equal segments of ``[0, num_frames)``: ``i * num_frames // count``.

    The same integers as transformers' ``default_sample_indices_fn``, so a model exported with a
    video processor (vidray/infer/export.py) sees in ``pipeline(...)`` the frames vidray showed it.
    When ``num_frames < count`` neighbouring segments share a frame, so every source frame is
    repeated evenly (the clip keeps its whole time span) rather than the last frame being held.
    """
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames}, {count}")
    return np.arange(count, dtype=np.int64) * num_frames // count


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled to ``short_side``, aspect kept, the long side rounded
    down: transformers' own rule (``get_resize_output_image_size``, the same float expression), so an
    export's video processor resizes a video to the size vidray trained on (rounding to nearest
    left the two a pixel apart on the long side: 3-4 grey levels of the model input on real
    footage, benchmarks/footage_matrix.py)."""
    if width <= height:
        return short_side, max(short_side, int(short_side * height / width))
    return max(short_side, int(short_side * width / height)), short_side


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


# Still images, by their first bytes: FFmpeg opens one (image2, jpeg_pipe, png_pipe, ...) as a video of one
# frame, which a clip would repeat 16 times and a model label with confidence. A photo saved as .mp4, or an
# iPhone HEIC photo (an ISO BMFF file like an mp4, told apart by its brand), is not a video. GIF is left to
# FFmpeg: an animated one is a video.
_STILL_IMAGE_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WebP"),
    *((8, brand, "HEIF/AVIF") for brand in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"avif")),
)


def still_image_format(path: str) -> str | None:
    """The still-image format ``path`` starts like (JPEG, PNG, ...), or None. Not the moving kinds that share their
    first bytes: a raw MJPEG stream (an IP camera's .mjpeg, JPEG after JPEG) and an animated PNG (its acTL chunk
    comes before the first image's data)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for offset, magic, name in _STILL_IMAGE_SIGNATURES:
        if head[offset : offset + len(magic)] == magic and (offset != 8 or head[:4] == b"RIFF" or head[4:8] == b"ftyp"):
            moving = (name == "JPEG" and path.lower().endswith((".mjpeg", ".mjpg"))) or (name == "PNG" and b"acTL" in head)
            return None if moving else name
    return None


def looks_like_container(path: str) -> bool:
    """Whether the file starts like a video container (so failing to open it means: broken)."""
    with open(path, "rb") as f:
        head = f.read(192)
    if head[0:1] == head[188:189] == b"\x47":
        return True  # mpeg transport stream: a sync byte every 188-byte packet
    return any(head[offset : offset + len(magic)] == magic for offset, magic in _CONTAINER_SIGNATURES)


def unopenable(path: str, detail: str) -> VideoError:
    """The error for a file the demuxer refuses: broken if it looks like a container, else not a video."""
    if looks_like_container(path):
        return CorruptVideoError(path, f"truncated or corrupt container ({detail})")
    return NotAVideoError(path, f"not a video file ({detail})")
