"""What every decoder shares, and the one entry point that picks a decoder.

* :func:`read_clip` decodes a video into the stored clip with the backend named
  by ``decoder`` (``pyav``, ``decord`` or ``torchcodec``; vidray/data/decode/ holds
  one module each). All of them sample the same frames (:func:`segment_indices`),
  show them as a player would (:class:`Geometry`: display-matrix rotation and
  sample aspect ratio applied), resize the short side and centre-crop the same
  way, and fail with the same :class:`VideoError` categories.
* :func:`encode_mp4` writes H.264 for the demo data and the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, get_args

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


def encode_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 30.0,
    crf: int = 23,
    rotation: int = 0,
    sample_aspect_ratio: Fraction | None = None,
) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as an H.264 mp4 (yuv420p) through PyAV's libx264.

    H and W must be even (yuv420p subsampling). The bytes are a pure function of
    the arguments: see :data:`DETERMINISTIC_X264`. ``rotation`` (degrees
    counter-clockwise) goes into the display matrix, as phones write it;
    ``sample_aspect_ratio`` marks non-square pixels (e.g. ``Fraction(4, 3)``).
    The frames are stored as coded; players (and vidray) show them rotated and stretched.
    """
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
        if rotation:
            stream.set_display_rotation(rotation)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)  # a killed writer never leaves a half file under the real name
    return path


# --------------------------------------------------------------------------- decoding

DecoderName = Literal["pyav", "decord", "torchcodec"]
DECODERS: tuple[str, ...] = get_args(DecoderName)
DecodeDevice = Literal["cpu", "cuda"]

# What each decoder needs beyond vidray's own dependencies, and the command that installs it.
# (make setup installs all three: Makefile, target `setup`.)
DECODER_INSTALL = {
    "pyav": ("av", "pip install -c constraints.txt av"),
    "decord": ("decord", "pip install -c constraints.txt decord"),
    "torchcodec": (
        "torchcodec",
        "pip install -c constraints.txt torchcodec, plus FFmpeg's shared libraries (Debian: apt-get install ffmpeg)",
    ),
}


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


class DecoderUnavailableError(UserError):
    """The configured decoder cannot be imported here: names the package and its install command."""


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


def check_file(path: str) -> None:
    """Raise the VideoError for a path that is not a readable, non-empty regular file."""
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


def require_decoder(decoder: str, device: str = "cpu") -> None:
    """Raise a one-line :class:`DecoderUnavailableError` unless ``decoder`` can be loaded here.

    Imports the backend (for torchcodec that loads FFmpeg's shared libraries),
    so a missing package fails before any video is read, not once per video.
    Whether a CUDA device is there is for the GPU task to say (:func:`require_cuda_decoding`).
    """
    if decoder not in DECODERS:
        raise DecoderUnavailableError(f"data.decoder {decoder!r} is not one of {', '.join(DECODERS)}")
    if device not in get_args(DecodeDevice):
        raise DecoderUnavailableError(f"data.decoder_device {device!r} is not one of cpu, cuda")
    if device == "cuda" and decoder != "torchcodec":
        raise DecoderUnavailableError(
            f"data.decoder_device=cuda needs data.decoder=torchcodec (NVDEC through torchcodec), not {decoder}"
        )
    package, command = DECODER_INSTALL[decoder]
    try:
        if decoder == "pyav":
            import av  # noqa: F401
        elif decoder == "decord":
            import decord  # noqa: F401
        else:
            from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:
        # torchcodec raises RuntimeError/OSError when FFmpeg's shared libraries are absent.
        detail = " ".join(str(err).split())[:160]
        raise DecoderUnavailableError(
            f"data.decoder={decoder} needs the {package} package, which cannot be loaded here ({detail}); "
            f"install it: {command}"
        ) from None


def require_cuda_decoding() -> None:
    """Raise unless this process can decode on a CUDA device (run inside a GPU task)."""
    import torch

    if not torch.cuda.is_available():
        raise DecoderUnavailableError(
            f"data.decoder_device=cuda but torch {torch.__version__} sees no CUDA device on this node; "
            "use data.decoder_device=cpu, or give the cluster GPU nodes with CUDA builds of torch and torchcodec"
        )


def read_clip(
    path: str | Path,
    stored_frames: int,
    stored_size: int,
    decoder: DecoderName = "pyav",
    device: DecodeDevice = "cpu",
    num_threads: int = 0,
) -> DecodedClip:
    """Decode ``stored_frames`` frames spread uniformly over the whole video, as a
    player shows them (rotated, non-square pixels stretched), short side resized
    to ``stored_size`` and centre-cropped to a square.

    ``decoder`` picks the backend (vidray/data/decode/<name>.py); every backend opens
    the file once where its library allows (decord needs a PyAV header read
    first: it reports neither rotation nor pixel aspect) and raises a
    :class:`VideoError` subclass that says why a file cannot be used.
    ``num_threads``: decoder threads (0: the library's choice). ``device``:
    ``cuda`` decodes on the GPU's NVDEC (torchcodec only).
    """
    path = str(path)
    check_file(path)
    if decoder == "pyav":
        from vidray.data.decode import pyav

        return pyav.read_samples(path, stored_frames, stored_size, num_threads)
    if decoder == "decord":
        from vidray.data.decode import decord

        return decord.read_samples(path, stored_frames, stored_size, num_threads)
    if decoder == "torchcodec":
        from vidray.data.decode import torchcodec

        return torchcodec.read_samples(path, stored_frames, stored_size, num_threads, device)
    raise DecoderUnavailableError(f"decoder {decoder!r} is not one of {', '.join(DECODERS)}")
