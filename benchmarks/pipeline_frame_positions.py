"""Which frames of a video transformers' video-classification pipeline feeds a vidray export, in whichever
environment runs it (transformers 4.x or 5.x; no vidray needed there):

    python benchmarks/pipeline_frame_positions.py EXPORT_DIR RAMP.mp4 [frame_sampling_rate ...]

RAMP.mp4 is a grey ramp whose frame i has level ``step * i`` (``--step``, default 4), written lossless by
this script when the file is not there (60 frames, PyAV). Prints one JSON line per call: the frame index each model
input frame shows (its mean level over ``step``), for the pipeline's defaults and for each
``frame_sampling_rate`` given. docs/benchmarks.md, section 9, has a run on both majors.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def write_ramp(path: str, step: int, frames: int = 60) -> None:
    import av

    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"crf": "0"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), step * index, np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("ramp")
    parser.add_argument("rates", nargs="*", type=int, help="frame_sampling_rate values to try besides the default")
    parser.add_argument("--step", type=int, default=4)
    args = parser.parse_args()
    if not os.path.exists(args.ramp):
        write_ramp(args.ramp, args.step)
    import transformers
    from transformers import pipeline

    classify = pipeline("video-classification", model=args.export_dir, trust_remote_code=True)
    # transformers 5 preprocesses with the export's video processor, 4.x with its image processor.
    processor = getattr(classify, "video_processor", None) or classify.image_processor
    mean = np.array(processor.image_mean)[:, None, None]
    std = np.array(processor.image_std)[:, None, None]
    for kwargs in [{}] + [{"frame_sampling_rate": rate} for rate in args.rates]:
        pixels = classify.preprocess(args.ramp, **kwargs)["pixel_values"][0].float().numpy()  # [T, 3, H, W]
        levels = ((pixels * std + mean) * 255).mean(axis=(1, 2, 3))
        shown = [round(float(level) / args.step, 1) for level in levels]
        print(json.dumps({"transformers": transformers.__version__, "call": kwargs, "frames_shown": shown}))


if __name__ == "__main__":
    main()
