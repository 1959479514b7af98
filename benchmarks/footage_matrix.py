"""Every decoder on the files users' folders hold: what each one reads, and whether it reads the frames.

Not a timing: a correctness matrix. The ``ffmpeg`` command line writes one small file per case (the
containers, codecs and oddities of phone, web, camcorder and broadcast footage; FFmpeg's testsrc2
pattern, 4-6 s), then each decoder reads 16 frames at 32 px through :func:`vidray.data.video.read_clip`,
as preprocessing and prediction do. A read is compared with a reference decode of the same frames (PyAV,
every frame decoded in order from the start, the sampled positions picked by frame index), so a decoder
that returns other frames than it says shows up as a large difference, not just as a count.

    python benchmarks/footage_matrix.py --out benchmarks/results/footage_matrix.json

Needs the ``ffmpeg`` command (Debian: apt-get install ffmpeg) with libx264, libx265, libvpx, libsvtav1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidray.config import DECODERS  # noqa: E402
from vidray.data.clip import centre_crop, quarter_turns, rotate_frames, segment_indices  # noqa: E402
from vidray.data.video import read_clip  # noqa: E402

SOURCE = "testsrc2=size=320x240:rate=25"
STORED_FRAMES, STORED_SIZE = 16, 32

# name -> (what it stands for, ffmpeg arguments after the lavfi input, output file name)
CASES: dict[str, tuple[str, list[str], str]] = {
    "h264_mp4": ("web and phone H.264 (the common case)", ["-c:v", "libx264", "-bf", "3"], "h264.mp4"),
    "hevc10_mov_rot90": ("iPhone: HEVC 10-bit MOV, upright (rotate 90), timecode track",
                         ["-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error", "-tag:v", "hvc1",
                          "-metadata:s:v", "rotate=90", "-timecode", "01:00:00:00"], "iphone.mov"),
    "vp9_webm": ("web VP9 (YouTube, browsers' recorders)", ["-c:v", "libvpx-vp9", "-b:v", "300k"], "vp9.webm"),
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
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_files(folder: Path) -> dict[str, Path]:
    files = {}
    for name, (_, args, file_name) in CASES.items():
        files[name] = folder / file_name
        ffmpeg("-f", "lavfi", "-i", f"{SOURCE}:duration=4", *args, str(files[name]))
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
    return files


def reference(path: Path) -> tuple[np.ndarray, int]:
    """(The samples read_clip should return, the frames a player shows): every shown frame decoded in
    order from the start (PyAV, no seeking, no index), picked by position, then resized, rotated and
    cropped with the PyAV backend's own geometry."""
    from vidray.data.decode.pyav import coded_geometry, open_video

    container, stream = open_video(str(path))
    with container:
        geometry = coded_geometry(str(path), stream)
        width, height = geometry.resize_before_rotation(STORED_SIZE)
        frames = list(container.decode(stream))
    rotation = quarter_turns(frames[0].rotation)
    picked = [frames[i] for i in segment_indices(len(frames), STORED_FRAMES)]
    arrays = np.stack([f.to_ndarray(width=width, height=height, format="rgb24") for f in picked])
    return centre_crop(rotate_frames(arrays, rotation), STORED_SIZE), len(frames)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        sys.exit("footage_matrix: needs the ffmpeg command (Debian: apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="vidray-footage-") as tmp:
        files = make_files(Path(tmp))
        rows = []
        for name, path in files.items():
            what = CASES[name][0] if name in CASES else DERIVED[name]
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
    print(f"| case | frames shown | {' | '.join(DECODERS)} |")
    print("|---|---:|" + "---|" * len(DECODERS))
    for row in rows:
        cells = []
        for decoder in DECODERS:
            result = row["decoders"][decoder]
            cells.append(f"rejected: {result['error']}" if "error" in result else
                         f"{result['frames']} frames, diff {result['mean_abs_diff']} (worst {result['worst_frame_diff']})")  # fmt: skip
        print(f"| {row['case']} ({row['what']}) | {row['frames_shown']} | {' | '.join(cells)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"stored_frames": STORED_FRAMES, "stored_size": STORED_SIZE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
