"""Reading and writing video files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def encode_mp4(path: str | Path, frames: np.ndarray, fps: float = 30.0, crf: int = 23) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` as an H.264 mp4 (yuv420p) through PyAV's libx264.

    H and W must be even (yuv420p subsampling).
    """
    import av
    from fractions import Fraction

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
