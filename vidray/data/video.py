"""The data stage's video API: decode a clip, probe a header, write H.264.

* :func:`read_clip` decodes a video into the stored clip with the backend named
  by ``decoder`` (``pyav``, ``decord`` or ``torchcodec``; vidray/data/decode/ holds
  one module each). What the backends share (sampling, displayed geometry,
  the :class:`vidray.data.clip.VideoError` categories) is in vidray/data/clip.py,
  which they import; this module imports them, never the other way round.
* :func:`probe` reads what a video's header and first frame say (``vidray index``).
* :func:`require_decoder` fails in one line when a backend's library is missing.
* :func:`encode_mp4` writes H.264 for the demo data and the tests.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import get_args

import numpy as np

from vidray.config import DECODERS, DEFAULT_DECODER, DecodeDevice, DecoderName
from vidray.data.clip import DecodedClip, EmptyVideoError, MissingVideoError, NotAVideoError, StreamInfo, still_image_format
from vidray.errors import UserError
from vidray.storage import local_part, resolve_path


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
    import av  # here: PyAV is optional like every decoder library (require_decoder names its install)

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


class DecoderUnavailableError(UserError):
    """The configured decoder cannot be imported here: names the package and its install command."""


def check_file(path: str) -> None:
    """Raise the VideoError for a path that is not a readable, non-empty regular file."""
    if not os.path.lexists(path):
        if local_part(str(path)) is None:  # a manifest row naming remote storage
            raise MissingVideoError(path, "not a file on this machine: training reads local video files (download "
                                          "them and index their folder); `vidray predict` reads s3://, gs:// and "
                                          "http(s):// videos")  # fmt: skip
        raise MissingVideoError(path, "file not found")
    if not os.path.exists(path):
        raise MissingVideoError(path, f"dangling symlink (points to {os.readlink(path)})")
    if not os.path.isfile(path):
        raise MissingVideoError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise EmptyVideoError(path, "zero bytes")
    if not os.access(path, os.R_OK):
        raise MissingVideoError(path, "not readable (permission denied)")
    if image := still_image_format(path):
        raise NotAVideoError(path, f"a still image ({image}), not a video")


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


def chosen_decoder(chosen: str | None, recorded: str) -> str:
    """``chosen`` (a user's choice) or else ``recorded`` (the decoder a model's training data was decoded with),
    checked to load here either way: a missing library fails in one line, not once per video."""
    if chosen is not None:
        require_decoder(chosen)
        return chosen
    try:
        require_decoder(recorded)
    except DecoderUnavailableError as err:
        # The model's data.decoder, which the user did not name: say it is the model's, and that another decoder
        # reads the same frames within a few grey levels (docs/benchmarks.md, section 9).
        instead = ", or read the videos with PyAV: --decoder pyav" if recorded != "pyav" else ""
        raise DecoderUnavailableError(f"the model's {err}{instead}") from None
    return recorded


def require_cuda_decoding() -> None:
    """Raise unless this process can decode on a CUDA device (run inside a GPU task)."""
    import torch  # here: torch costs seconds to import, and only a GPU decode task asks this

    if not torch.cuda.is_available():
        raise DecoderUnavailableError(
            f"data.decoder_device=cuda but torch {torch.__version__} sees no CUDA device on this node; "
            "use data.decoder_device=cpu, or give the cluster GPU nodes with CUDA builds of torch and torchcodec"
        )


def read_clip(
    path: str | Path,
    stored_frames: int,
    stored_size: int,
    decoder: DecoderName = DEFAULT_DECODER,
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
    path = resolve_path(path)  # absolute: FFmpeg reads a relative `cam1:front.mp4` as protocol `cam1`
    check_file(path)
    # Each backend is imported on first use: its library is optional (require_decoder names
    # the install command), and a process that uses one backend never loads the others.
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


def probe(path: str | Path) -> StreamInfo:
    """Size, pixel aspect, rotation, frame rate, duration and frame count of one video, from its
    header and first frame; raises the :class:`vidray.data.clip.VideoError` that says why not.

    Read by PyAV whatever ``data.decoder`` is: it is the one library that reports all of it without
    decoding a clip.
    """
    path = resolve_path(path)  # absolute: FFmpeg reads a relative `cam1:front.mp4` as protocol `cam1`
    check_file(path)
    from vidray.data.decode import pyav  # on first use: PyAV is optional, as in read_clip

    return pyav.probe_stream(path)
