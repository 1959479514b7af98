"""Ray Data preprocessing on real files: shards, rejects, counts, resume and worker crashes."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import start_lock_holders
from test_index import as_another_user, open_folder, share
from test_video import make_bad_file

from vidray.cli import main as cli_main
from vidray.data.dataset import read_dataset_info, read_split, videos_from_bytes
from vidray.errors import UserError
from vidray.data.index import write_manifest
from vidray.config import DECODERS
from vidray.data.decode_shard import CRASH_ON_ENV, WORKER_CRASH_REASON, decode_shard
from vidray.data.preprocess import preprocess
from vidray.data.shard_files import find_stale
from vidray.data.shards import DecodeSettings, Video, expected_work, load_videos, plan_shards
from vidray import folder_lock
from vidray.folder_lock import LOCK_FILE
from vidray.data.video import encode_mp4, read_clip

CLASSES = ["alpha", "beta", "gamma"]
# (width, height, frames): landscape, portrait, square, odd aspect, tiny; short and long.
SHAPES = [(160, 96, 40), (96, 160, 24), (128, 128, 60), (176, 144, 33), (64, 48, 17)]
SPLIT_OF = ["train", "train", "train", "val", "test"]
FRAMES, SIZE = 4, 28  # stored defaults follow: 8 frames of 32 x 32
STORED_SHAPE = (8, 32, 32, 3)

HOSTILE = {  # file kind -> expected error category in rejects
    "zero_bytes": "empty",
    "text": "not_a_video",
    "truncated": "corrupt",
    "audio_only": "no_video_stream",
    "dangling_symlink": "missing",
    "missing": "missing",
}


def random_video(path: Path, width: int, height: int, frames: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, height, width, 3), dtype=np.uint8)
    drift = np.arange(frames, dtype=np.uint8)[:, None, None, None] * 3  # content changes over time
    return encode_mp4(path, base + drift, fps=20)


def manifest_row(path: Path, label: str, split: str) -> dict:
    return {
        "path": str(path),
        "video_id": path.stem,
        "label": label,
        "label_index": CLASSES.index(label),
        "split": split,
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """15 good videos of varied sizes and lengths, one 3-frame video, and every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for class_index, label in enumerate(CLASSES):
        for i, (width, height, frames) in enumerate(SHAPES):
            path = random_video(root / label / f"{label}_{i}.mp4", width, height, frames, seed=10 * class_index + i)
            rows.append(manifest_row(path, label, SPLIT_OF[i]))
    short = random_video(root / "alpha" / "short.mp4", 64, 48, 3, seed=99)
    rows.append(manifest_row(short, "alpha", "train"))
    good_source = Path(rows[0]["path"])
    bad = root / "bad"
    bad.mkdir()
    for index, kind in enumerate(HOSTILE):
        path = make_bad_file(kind, bad, good_source)
        rows.append(manifest_row(path, CLASSES[index % 3], SPLIT_OF[index % 5]))
    manifest = write_manifest(rows, CLASSES, root / "manifest.parquet")
    return {"root": root, "rows": rows, "manifest": manifest, "short": str(short)}


@pytest.fixture(scope="module")
def first_run(corpus, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "ds"
    summary = preprocess(corpus["manifest"], str(out), frames=FRAMES, size=SIZE, videos_per_shard=4)
    return {"out": out, "summary": summary}


def shard_files(out: Path) -> dict[str, float]:
    """Relative path -> mtime of every data and record file of a dataset dir."""
    files = list(out.glob("*/shard-*.parquet")) + list(out.glob("_shards/shard-*.json"))
    return {str(f.relative_to(out)): f.stat().st_mtime_ns for f in files}


def test_counts_add_up_and_dataset_json_describes_the_run(corpus, first_run):
    summary, out = first_run["summary"], first_run["out"]
    total = len(corpus["rows"])
    assert summary["discovered"] == total
    assert summary["processed"] == 16  # 15 good + the short one
    assert summary["rejected"] == len(HOSTILE)
    assert summary["processed"] + summary["rejected"] == summary["discovered"]
    assert summary["padded"] == 1
    assert summary["decoded_this_run"] == total and summary["shards_reused"] == 0

    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == CLASSES
    assert (info["frames"], info["size"], info["stored_frames"], info["stored_size"]) == (4, 28, 8, 32)
    assert info["splits"]["train"] == {"videos": 10, "per_class": {"alpha": 4, "beta": 3, "gamma": 3}}
    assert info["splits"]["val"]["videos"] == 3 and info["splits"]["test"]["videos"] == 3
    assert info["manifest"] == str(corpus["manifest"].resolve())
    assert len(info["manifest_sha256"]) == 64
    assert sorted(info["shards"]) == sorted(str(p.relative_to(out)) for p in out.glob("*/shard-*.parquet"))

    loaded = read_dataset_info(str(out))
    assert loaded.video_shape == STORED_SHAPE
    assert loaded.split_counts == {"train": 10, "val": 3, "test": 3}


def test_every_hostile_input_is_rejected_with_its_reason(corpus, first_run):
    out = first_run["out"]
    rejects = pq.read_table(out / "rejects.parquet").to_pandas()
    assert list(rejects.columns) == ["path", "video_id", "split", "label", "error", "reason"]
    by_stem = {Path(p).stem: row for p, row in zip(rejects["path"], rejects.to_dict("records"))}
    assert sorted(by_stem) == sorted(HOSTILE)
    for kind, error in HOSTILE.items():
        assert by_stem[kind]["error"] == error, by_stem[kind]
        assert by_stem[kind]["reason"]
    assert "dangling symlink" in by_stem["dangling_symlink"]["reason"]
    assert "file not found" in by_stem["missing"]["reason"]
    assert "zero bytes" in by_stem["zero_bytes"]["reason"]
    # The CSV is the same table, for people.
    assert pd.read_csv(out / "rejects.csv")["path"].tolist() == rejects["path"].tolist()
    assert first_run["summary"]["rejected_by_error"] == {"empty": 1, "not_a_video": 1, "corrupt": 1,
                                                         "no_video_stream": 1, "missing": 2}  # fmt: skip


def test_shards_hold_every_good_video_decoded_and_labelled(corpus, first_run):
    out = first_run["out"]
    expected = {r["path"]: r for r in corpus["rows"] if Path(r["path"]).parent.name != "bad"}
    seen = {}
    for split in ("train", "val", "test"):
        # Any Parquet reader opens a split folder: no sidecar or temporary file is in the way.
        table = pd.read_parquet(out / split)
        videos = videos_from_bytes(table["video"], STORED_SHAPE)
        for row, frames in zip(table.drop(columns="video").to_dict("records"), videos):
            source = expected[row["path"]]
            assert source["split"] == split
            assert (row["label"], row["label_name"]) == (source["label_index"], source["label"])
            assert row["video_id"] == source["video_id"]
            seen[row["path"]] = (row, frames)
    assert sorted(seen) == sorted(expected)

    for path in [corpus["rows"][0]["path"], corpus["rows"][1]["path"], corpus["short"]]:
        row, frames = seen[path]
        clip = read_clip(path, 8, 32, num_threads=1)
        np.testing.assert_array_equal(frames, clip.frames)
        assert row["source_frames"] == clip.source_frames and row["padded"] == clip.padded
    assert seen[corpus["short"]][0]["padded"] and seen[corpus["short"]][0]["source_frames"] == 3

    # Shards are written with row groups and are readable through the training-side reader.
    assert all(pq.ParquetFile(f).metadata.num_row_groups >= 1 for f in out.glob("*/shard-*.parquet"))
    assert read_split(str(out), "train").count() == 10


def test_rerun_reuses_every_shard_and_rewrites_nothing(corpus, first_run):
    """A rerun only reads, so a run reading the dataset beside it never finds dataset.json missing. Every
    rerun used to delete it and write it again: a `vidray pretrain` beside another one (each prepares
    the dataset first) failed with "no dataset.json" (tests/test_readme.py, once in a run)."""
    out = first_run["out"]
    before = shard_files(out)
    written = {name: (out / name).stat() for name in ("dataset.json", "rejects.parquet", "rejects.csv")}
    missing, done = [], threading.Event()

    def read_beside() -> None:
        while not done.is_set():
            try:
                read_dataset_info(str(out))
            except UserError as err:
                missing.append(str(err))

    reader = threading.Thread(target=read_beside)
    reader.start()
    try:
        reruns = [preprocess(corpus["manifest"], str(out), frames=FRAMES, size=SIZE, videos_per_shard=4) for _ in range(3)]
    finally:
        done.set()
        reader.join()
    assert not missing, missing[0]
    for summary in reruns:
        assert summary["decoded_this_run"] == 0 and summary["shards_written"] == 0
        assert summary["shards_reused"] == len(list(out.glob("_shards/shard-*.json")))
        for key in ("discovered", "processed", "rejected", "padded", "splits", "shards", "rejected_by_error"):
            assert summary[key] == first_run["summary"][key]
    assert shard_files(out) == before  # nothing rewritten
    for name, stat in written.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    # dataset.json still describes the run that wrote it.
    assert json.loads((out / "dataset.json").read_text())["decoded_this_run"] == len(corpus["rows"])


def test_killed_run_recomputes_only_missing_shards(corpus, first_run, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(first_run["out"], out)
    records = sorted(out.glob("_shards/shard-*.json"))
    assert len(records) >= 3
    # What a kill can leave behind: a shard never written, a Parquet file written
    # but not its record, a half-written temporary, and no dataset.json.
    lost = json.loads(records[0].read_text())
    records[0].unlink()
    if lost["file"]:
        (out / lost["file"]).unlink()
    unrecorded = json.loads(records[1].read_text())
    records[1].unlink()
    (out / "train" / ".shard-x.parquet.1234abcd.tmp").write_bytes(b"half a file")
    (out / "dataset.json").unlink()
    untouched = {k: v for k, v in shard_files(out).items() if lost["shard"] not in k and unrecorded["shard"] not in k}

    summary = preprocess(corpus["manifest"], str(out), frames=FRAMES, size=SIZE, videos_per_shard=4)
    assert summary["decoded_this_run"] == len(lost["videos"]) + len(unrecorded["videos"])
    assert summary["shards_written"] == 2
    after = shard_files(out)
    assert {k: after[k] for k in untouched} == untouched
    assert not list(out.glob("train/.*.tmp"))
    for key in ("discovered", "processed", "rejected", "padded", "splits", "shards"):
        assert summary[key] == first_run["summary"][key]
    assert (out / "dataset.json").is_file()


def test_changed_parameters_replace_old_shards(corpus, first_run, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(first_run["out"], out)
    old = set(shard_files(out))
    summary = preprocess(corpus["manifest"], str(out), frames=FRAMES, size=24, videos_per_shard=4)
    assert summary["stored_size"] == 27 and summary["shards_reused"] == 0
    new = set(shard_files(out))
    assert not old & new  # the directory never mixes two parameter sets
    assert sorted(summary["shards"]) == sorted(p for p in new if p.endswith(".parquet"))
    table = pq.read_table(out / summary["shards"][0])
    assert len(table.column("video")[0].as_py()) == 8 * 27 * 27 * 3


def test_rays_own_lines_reach_the_console_only_with_verbose(corpus, ray_head, tmp_path, monkeypatch, capsys, caplog):
    """`vidray preprocess` has the console of every vidray command on Ray (vidray.cluster.console_settings):
    its own line and summary; Ray Data's dataset executions (INFO records of Ray's loggers) only with
    --verbose. Both runs connect to the session's cluster, as a command under `ray job submit` does."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head["address"])
    ray_records = {}
    for flags in ([], ["--verbose"]):
        caplog.clear()
        # Ray Data's logger stops its records' propagation once its first execution in this process configured it
        # (replacing its handlers), so caplog, on the root logger, saw them only when an earlier test had run one:
        # it listens there too.
        ray_data = logging.getLogger("ray.data")
        ray_data.addHandler(caplog.handler)
        with caplog.at_level(logging.DEBUG):
            assert cli_main(["preprocess", "--manifest", str(corpus["manifest"]), "--out", str(tmp_path / f"ds{len(flags)}"),
                             "--frames", str(FRAMES), "--size", str(SIZE), "--stored-frames", str(STORED_SHAPE[0]),
                             "--stored-size", str(STORED_SHAPE[1]), "--videos-per-shard", "4", *flags]) in (0, None)  # fmt: skip
        console = capsys.readouterr()
        summary = json.loads(console.out.strip().splitlines()[-1])
        assert summary["processed"] == len(corpus["rows"]) - len(HOSTILE) and summary["rejected"] == len(HOSTILE)
        assert "vidray preprocess: " in console.err
        ray_data.removeHandler(caplog.handler)
        ray_records[bool(flags)] = [r.getMessage() for r in caplog.records if r.name.startswith("ray") and r.levelno < logging.WARNING]
    assert ray_records[False] == []
    assert any(m.startswith("Starting execution of Dataset") for m in ray_records[True]), ray_records[True]


# pyav is first_run's decoder: its run here hands the tasks out as plain Ray tasks (data.dispatch), which
# must write first_run's shards byte for byte. (Which dispatch runs a decoder does not matter: a task
# runs the same decode_shard either way.)
DISPATCH_OF = {"pyav": "ray_tasks"}


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_accounts_for_every_video(corpus, first_run, ray_cluster, tmp_path, decoder):
    """processed + rejected = discovered with each decoder, the same videos rejected for the same
    reasons, the decoder recorded in dataset.json, and its frames in the shards."""
    out = tmp_path / "ds"
    dispatch = DISPATCH_OF.get(decoder, "ray_data")
    summary = preprocess(corpus["manifest"], str(out), frames=FRAMES, size=SIZE, videos_per_shard=4, decoder=decoder,
                         dispatch=dispatch)  # fmt: skip
    assert summary["processed"] + summary["rejected"] == summary["discovered"] == len(corpus["rows"])
    assert summary["processed"] == 16 and summary["padded"] == 1
    assert summary["rejected_by_error"] == first_run["summary"]["rejected_by_error"]
    assert json.loads((out / "dataset.json").read_text())["decoder"] == decoder
    rejects = pq.read_table(out / "rejects.parquet").to_pandas()
    assert {Path(p).stem: e for p, e in zip(rejects["path"], rejects["error"])} == HOSTILE
    table = pd.read_parquet(out / "train")
    row = table[table["path"] == corpus["short"]].iloc[0]
    frames = videos_from_bytes(pd.Series([row["video"]]), STORED_SHAPE)[0]
    np.testing.assert_array_equal(frames, read_clip(corpus["short"], 8, 32, decoder=decoder, num_threads=1).frames)
    # Another decoder's shards are other shards: switching decodes again, nothing is mixed.
    assert not set(summary["shards"]) & set(first_run["summary"]["shards"]) or decoder == "pyav"
    if dispatch == "ray_tasks":  # the same shards as Ray Data's run, every file byte for byte
        assert summary["shards"] == first_run["summary"]["shards"] and summary["decoded_this_run"] == len(corpus["rows"])
        for name in summary["shards"]:
            assert (out / name).read_bytes() == (first_run["out"] / name).read_bytes(), name


@pytest.mark.parametrize("decoder", DECODERS)
def test_worker_crash_loses_no_other_video(ray_cluster, tmp_path, monkeypatch, decoder):
    """A worker that dies mid-shard (os._exit, as a segfaulting decoder) loses only its video, whoever
    hands out the tasks (``DISPATCH_OF``: plain Ray tasks for one decoder, Ray Data for the others)."""
    rows = []
    for i in range(5):
        rows.append(manifest_row(random_video(tmp_path / f"ok_{i}.mp4", 64, 48, 12, seed=i), CLASSES[i % 3], "train"))
    # Its id sorts last: the worker has decoded five videos with this backend when it dies on the sixth.
    rows.insert(2, manifest_row(random_video(tmp_path / "zz_crash.mp4", 64, 48, 12, seed=7), "beta", "train"))
    manifest = write_manifest(rows, CLASSES, tmp_path / "manifest.parquet")
    monkeypatch.setenv(CRASH_ON_ENV, "zz_crash")

    # One shard holds all six videos, so the crash takes the other five down with it at first.
    summary = preprocess(
        manifest, str(tmp_path / "ds"), frames=FRAMES, size=SIZE, videos_per_shard=64, decoder=decoder,
        dispatch=DISPATCH_OF.get(decoder, "ray_data"),
    )  # fmt: skip
    assert summary["discovered"] == 6 and summary["processed"] == 5 and summary["rejected"] == 1
    assert summary["rejected_by_error"] == {"worker_crash": 1}
    rejects = pd.read_csv(tmp_path / "ds" / "rejects.csv")
    assert rejects["path"].tolist() == [str(tmp_path / "zz_crash.mp4")]
    assert rejects["error"].tolist() == ["worker_crash"]
    assert rejects["reason"].iloc[0].startswith(WORKER_CRASH_REASON)
    written = pd.read_parquet(tmp_path / "ds" / "train")
    assert sorted(written["path"]) == sorted(str(tmp_path / f"ok_{i}.mp4") for i in range(5))


def test_retry_crashed_decodes_again_a_video_that_killed_its_worker(ray_cluster, tmp_path, monkeypatch, capsys):
    """A worker's death need not recur (an OOM kill, a lost node). A rerun keeps the dataset as written (a run it
    continues finds the same data); ``--retry-crashed`` decodes that video's shard again (before, the video stayed
    rejected until its file changed). A retry whose videos all die again leaves no Parquet file of the old run."""
    rows = [manifest_row(random_video(tmp_path / f"ok_{i}.mp4", 64, 48, 12, seed=i), CLASSES[i % 3], "train") for i in range(3)]
    rows.append(manifest_row(random_video(tmp_path / "zz_crash.mp4", 64, 48, 12, seed=7), "beta", "train"))
    manifest = write_manifest(rows, CLASSES, tmp_path / "manifest.parquet")
    out, train = str(tmp_path / "ds"), tmp_path / "ds" / "train"

    def run(crash_on: str | None, retry: bool) -> dict:
        if crash_on:
            monkeypatch.setenv(CRASH_ON_ENV, crash_on)
        else:
            monkeypatch.delenv(CRASH_ON_ENV, raising=False)
        return preprocess(manifest, out, frames=FRAMES, size=SIZE, videos_per_shard=64, retry_crashed=retry)  # one shard

    crashed = run("zz_crash", retry=False)
    assert crashed["rejected_by_error"] == {"worker_crash": 1} and crashed["processed"] == 3
    assert "1 killed their decoder's worker: --retry-crashed tries those again" in capsys.readouterr().err
    kept = run(None, retry=False)
    assert kept["decoded_this_run"] == 0 and kept["rejected_by_error"] == {"worker_crash": 1}
    # Retried while every video of the shard dies: no Parquet file is written, and the old one is gone with its
    # record (it stayed, and Ray Data's read of the split, which lists the folder, took its 3 videos for training).
    dead = run(".mp4", retry=True)
    assert dead["processed"] == 0 and dead["rejected_by_error"] == {"worker_crash": 4}
    assert not list(train.glob("*.parquet"))
    retried = run(None, retry=True)
    assert retried["decoded_this_run"] == 4 and retried["processed"] == 4 and retried["rejected"] == 0
    assert sorted(pd.read_parquet(train)["path"]) == sorted(str(r["path"]) for r in rows)
    assert pd.read_csv(tmp_path / "ds" / "rejects.csv").empty
    assert run(None, retry=True)["decoded_this_run"] == 0


def test_gpu_decoding_without_a_gpu_in_the_cluster_is_a_user_error(corpus, ray_cluster, tmp_path):
    with pytest.raises(UserError, match=r"data.decoder_device=cuda but the Ray cluster has no GPU"):
        preprocess(corpus["manifest"], str(tmp_path / "ds"), decoder="torchcodec", decoder_device="cuda")
    with pytest.raises(UserError, match=r"data.decoder_device=cuda needs data.decoder=torchcodec"):
        preprocess(corpus["manifest"], str(tmp_path / "ds"), decoder="pyav", decoder_device="cuda")


# --- planning and input errors (no Ray needed) ------------------------------------------


def fake_videos(count: int, split: str = "train") -> list[Video]:
    return [Video(f"/videos/{split}/v{i:04d}.mp4", f"v{i:04d}", "a", 0, split, 1000 + i, 7) for i in range(count)]


def test_shard_boundaries_move_only_where_videos_change():
    videos = fake_videos(400) + fake_videos(50, "val")
    shards = plan_shards(videos, 32, 128, videos_per_shard=16)
    assert sum(len(s.videos) for s in shards) == 450
    assert all(len({v.split for v in s.videos}) == 1 for s in shards)
    for split in ("train", "val"):
        sizes = [len(s.videos) for s in shards if s.split == split]
        assert max(sizes) <= 32 and min(sizes[:-1]) >= 4  # only a split's last shard may be short

    added = plan_shards(videos + [Video("/videos/train/v0200b.mp4", "new", "a", 0, "train", 5, 7)], 32, 128, 16)
    changed = {s.id for s in added} ^ {s.id for s in shards}
    assert 1 <= len(changed) <= 4  # the shard that gained the video (old and new id), at most one neighbour

    touched = [Video(v.path, v.video_id, v.label, v.label_index, v.split, v.size, 8) if i == 10 else v
               for i, v in enumerate(videos)]  # fmt: skip
    assert len({s.id for s in plan_shards(touched, 32, 128, 16)} ^ {s.id for s in shards}) == 2
    assert not {s.id for s in plan_shards(videos, 32, 112, 16)} & {s.id for s in shards}
    assert [len(s.videos) for s in plan_shards(videos, 32, 128, 1)] == [1] * len(videos)
    # The decoder and its device are decode parameters too: switching re-decodes everything.
    assert not {s.id for s in plan_shards(videos, 32, 128, 16, decoder="torchcodec")} & {s.id for s in shards}
    cuda = plan_shards(videos, 32, 128, 16, decoder="torchcodec", decoder_device="cuda")
    assert not {s.id for s in cuda} & {s.id for s in plan_shards(videos, 32, 128, 16, decoder="torchcodec")}


def test_a_reject_for_permission_is_decoded_again_once_the_file_may_be_read():
    """"not readable (permission denied)" tells the user to fix the permission and run again; chmod changes
    neither size nor mtime, so the shard holding the reject kept its id and every rerun reused the reject.
    Now an unreadable video is part of its shard's id: fixed, the shard is decoded again (and while it is not,
    the reject is reused, as any finished shard); processed + rejected stays the videos listed."""
    with open_folder() as shared:
        videos = [random_video(shared / "alpha" / f"alpha_{i}.mp4", 64, 48, 6, seed=i) for i in range(3)]
        manifest, out = shared / "manifest.parquet", shared / "dataset"
        write_manifest([manifest_row(v, "alpha", "train") for v in videos], CLASSES, manifest)
        share(shared)
        out.mkdir()
        out.chmod(0o777)  # whatever the umask: the reader writes the shards
        settings = DecodeSettings(8, 32)

        def run() -> tuple[int, dict[str, tuple[str, str]]]:
            """What preprocess does for each shard, without Ray: a finished shard's record is reused, any
            other shard decoded. (shards reused, {video: (status, reason)})."""
            shards = plan_shards(load_videos(manifest)[0], 8, 32, videos_per_shard=8)
            finished, _ = find_stale(pafs.LocalFileSystem(), str(out), shards)
            rows = [row for s in shards for row in finished.get(s.id) or decode_shard(str(out), s, settings, None)]
            return len(finished), {row["video_id"]: (row["status"], row["reason"]) for row in rows}

        denied = {"alpha_0": ("processed", ""), "alpha_1": ("rejected", "not readable (permission denied)"),
                  "alpha_2": ("processed", "")}  # fmt: skip
        videos[1].chmod(0o000)
        assert as_another_user(run) == (0, denied)
        assert as_another_user(run) == (1, denied)  # nothing changed: the finished shard is reused
        videos[1].chmod(0o644)  # the fix the reason asks for
        assert as_another_user(run) == (0, dict.fromkeys(denied, ("processed", "")))
        assert as_another_user(run)[0] == 1
    # Readable videos hash as before unreadable ones were told apart: existing datasets keep their shards.
    assert plan_shards(fake_videos(3), 8, 32, 8)[0].id == "e44ff49f-c530b5951e673522ee55"


def test_a_video_its_task_did_not_find_where_the_driver_found_it_is_decoded_again(tmp_path, capsys):
    """`data.videos_dir` on the head's disk and not mounted on a worker node: the driver stamps the video (it is
    there), the task on the other node rejects it "file not found", and the shard's id stays the same on every
    rerun (the driver still sees the file): its record was reused for ever. Now such a record is not finished:
    the shard is decoded again. A video the driver does not find either stays rejected until it is back."""
    videos = [random_video(tmp_path / "videos" / f"alpha_{i}.mp4", 64, 48, 6, seed=i) for i in range(2)]
    manifest, out, aside = tmp_path / "manifest.parquet", tmp_path / "dataset", tmp_path / "aside.mp4"
    write_manifest([manifest_row(v, "alpha", "train") for v in videos], CLASSES, manifest)
    fs, settings = pafs.LocalFileSystem(), DecodeSettings(8, 32)

    def plan() -> list:
        return plan_shards(load_videos(manifest)[0], 8, 32, videos_per_shard=8)

    (shard,) = plan()
    assert all(v.size > 0 for v in shard.videos)  # stamped present, as the driver saw them
    # The task "on another node": the file is not where it looks (moved away and back, mtime and all).
    videos[1].rename(aside)
    rows = decode_shard(str(out), shard, settings, None)
    aside.rename(videos[1])
    assert [(r["status"], r["reason"]) for r in rows] == [("processed", ""), ("rejected", "file not found")]
    assert plan() == [shard]  # the same id: the driver's stamp did not change
    capsys.readouterr()
    finished, stale = find_stale(fs, str(out), [shard])
    assert finished == {}  # decoded again, its record and Parquet cleared first
    assert sorted(stale) == sorted(str(out / name) for name in (shard.record_name, shard.parquet_name))
    assert capsys.readouterr().err == ("vidray preprocess: decoding 1 shard(s) again: their tasks did not find a video "
                                       "this machine sees (a node without the videos' mount?)\n")  # fmt: skip
    rows = decode_shard(str(out), shard, settings, None)  # the rerun, on a node that has the file
    assert [r["status"] for r in rows] == ["processed", "processed"]
    assert find_stale(fs, str(out), [shard]) == ({shard.id: rows}, [])
    assert capsys.readouterr().err == ""

    # Missing for the driver too (stamp -1): rejected, and the record stands until the file is back.
    videos[1].rename(aside)
    (gone,) = plan()
    rows = decode_shard(str(out), gone, settings, None)
    assert rows[1]["reason"] == "file not found"
    finished, _ = find_stale(fs, str(out), [gone])
    assert finished == {gone.id: rows}


def sized_videos(specs: list[tuple[int, int, int]], split: str = "train") -> list[Video]:
    """Videos with the index's (frames, width, height): their expected decode work."""
    return [
        Video(f"/v/{split}/w{i:04d}.mp4", f"w{i:04d}", "a", 0, split, 1000, 7, expected_work(*spec))
        for i, spec in enumerate(specs)
    ]


def test_shards_are_balanced_by_expected_work_not_by_count():
    # A folder like users' own: 6-60 s clips, 360p to 720p. 200 of them, vps 8.
    rng = np.random.default_rng(0)
    sizes = [(640, 360), (854, 480), (1280, 720), (720, 1280)]
    specs = [(int(rng.uniform(6, 60) * 30), *sizes[rng.integers(4)]) for _ in range(200)]
    videos = sized_videos(specs)
    shards = plan_shards(videos, 32, 128, videos_per_shard=8)
    assert sorted(v.video_id for s in shards for v in s.videos) == sorted(v.video_id for v in videos)
    works = np.array([s.work for s in shards])
    target = 8 * 2.0 ** round(np.log2(np.median([v.work for v in videos])))
    # Every shard but the split's last holds between half and twice the target work...
    assert works[:-1].min() >= target / 2 and works.max() <= 2 * target
    # ...so shards of heavy videos hold fewer of them: video count and work are not proportional.
    per_video = [s.work / len(s.videos) for s in shards]
    counts = [len(s.videos) for s in shards]
    assert np.corrcoef(per_video, counts)[0, 1] < -0.3
    # Count-based planning (what an unprobed manifest gets) leaves that band on the same videos.
    work_of = {v.video_id: v.work for v in videos}
    unprobed = plan_shards([Video(v.path, v.video_id, "a", 0, "train", 1000, 7) for v in videos], 32, 128, 8)
    by_count = np.array([sum(work_of[v.video_id] for v in s.videos) for s in unprobed])
    assert by_count[:-1].min() < target / 2 and by_count.max() > 2 * target


def test_work_balanced_boundaries_move_only_where_videos_change():
    rng = np.random.default_rng(1)
    specs = [(int(rng.uniform(6, 60) * 30), 640, 360) for _ in range(300)]
    videos = sized_videos(specs)
    shards = plan_shards(videos, 32, 128, 8)
    bigger = Video("/v/train/w0150b.mp4", "w0150b", "a", 0, "train", 1000, 7, expected_work(1800, 1280, 720))
    changed = {s.id for s in plan_shards(videos + [bigger], 32, 128, 8)} ^ {s.id for s in shards}
    assert 1 <= len(changed) <= 4
    removed = {s.id for s in plan_shards(videos[:100] + videos[101:], 32, 128, 8)} ^ {s.id for s in shards}
    assert 1 <= len(removed) <= 4
    # Only relative work matters (the target follows the median), and the estimate is planning
    # data, not content: the same groups of videos keep the same ids.
    doubled = [Video(v.path, v.video_id, "a", 0, "train", 1000, 7, v.work * 2) for v in videos]
    assert [s.id for s in plan_shards(doubled, 32, 128, 8)] == [s.id for s in shards]


def test_a_dataset_inside_a_ray_jobs_working_dir_copy_is_warned_of(tmp_path, monkeypatch, capsys):
    """`ray job submit --working-dir . -- python jobs/preprocess.py`: the job runs in a copy of the folder that Ray
    deletes, and the default relative data.dataset_dir lands in it. `vidray train` warned of its own outputs
    there; the data stage said nothing. (Every shard is decoded beforehand, in this process: no Ray starts.)"""
    job_copy = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_copy.mkdir(parents=True)
    videos = [Video(str(tmp_path / f"gone_{i}.mp4"), f"gone_{i}", "alpha", 0, "train", -1, -1) for i in range(2)]
    manifest = write_manifest([manifest_row(Path(v.path), "alpha", "train") for v in videos], CLASSES, tmp_path / "m.parquet")

    def prepared(out: Path, key: str = "--out") -> str:
        for shard in plan_shards(load_videos(manifest)[0], 8, 32, 8):
            decode_shard(str(out.absolute()), shard, DecodeSettings(8, 32), None)
        capsys.readouterr()
        assert preprocess(manifest, str(out), frames=FRAMES, size=SIZE, out_key=key)["decoded_this_run"] == 0
        return capsys.readouterr().err

    monkeypatch.chdir(job_copy)
    assert prepared(Path("data/ds"), "data.dataset_dir").startswith(  # relative, as by default
        f"vidray preprocess: warning: data.dataset_dir ({job_copy / 'data' / 'ds'}) is inside this job's "
        f"working-directory copy ({job_copy}), which Ray deletes when the job ends; use an absolute path outside it\n"
    )
    assert "warning" not in prepared(tmp_path / "ds")  # outside the copy
    monkeypatch.chdir(tmp_path)  # a plain folder: the user's own
    assert "warning" not in prepared(tmp_path / "ds2")


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"manifest .*nope\.parquet not found: run `vidray index"):
        preprocess(tmp_path / "nope.parquet", str(tmp_path / "ds"))


def test_manifest_without_required_columns_is_a_user_error(tmp_path):
    import pyarrow as pa

    table = pa.table({"path": ["/x.mp4"], "label": ["a"]}).replace_schema_metadata({"vidray.classes": '["a"]'})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(UserError, match=r"lacks column\(s\) video_id, label_index, split"):
        preprocess(tmp_path / "m.parquet", str(tmp_path / "ds"))


def test_inconsistent_manifest_rows_are_user_errors(tmp_path):
    row = {"path": "/x.mp4", "video_id": "x", "label": "beta", "label_index": 0, "split": "train"}
    write_manifest([row], CLASSES, tmp_path / "label.parquet")
    with pytest.raises(UserError, match=r"/x.mp4 has label 'beta' but label_index 0 is 'alpha'"):
        preprocess(tmp_path / "label.parquet", str(tmp_path / "ds"))
    write_manifest([{**row, "label": "alpha", "split": "holdout"}], CLASSES, tmp_path / "split.parquet")
    with pytest.raises(UserError, match=r"split 'holdout' is not one of train, val, test"):
        preprocess(tmp_path / "split.parquet", str(tmp_path / "ds"))


def test_unwritable_output_is_a_user_error(corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=r"cannot write the dataset to .*a-file/ds .*pass --out a writable directory"):
        preprocess(corpus["manifest"], str(blocker / "ds"))


def test_bad_stored_parameters_are_user_errors(corpus, tmp_path):
    with pytest.raises(UserError, match=r"stored_frames \(4\) must be >= frames \(8\)"):
        preprocess(corpus["manifest"], str(tmp_path / "ds"), frames=8, stored_frames=4)
    with pytest.raises(UserError, match=r"stored_size \(100\) must be >= size \(112\)"):
        preprocess(corpus["manifest"], str(tmp_path / "ds"), stored_size=100)
    with pytest.raises(UserError, match=r"dispatch 'ray_actors' is not one of ray_data, ray_tasks"):
        preprocess(corpus["manifest"], str(tmp_path / "ds"), dispatch="ray_actors")


def test_a_run_preparing_a_dataset_another_is_writing_waits_then_reuses_it(corpus, tmp_path, capfd, monkeypatch):
    """Two sweeps started together on a fresh dataset: the second waits for the first's preprocessing, then
    reuses its shards (they used to decode the same shards, each deleting the other's temporaries).

    Without Ray: the "first" holds the dataset's lock in another process while the shards are written here
    by ``decode_shard``, the function preprocessing's Ray tasks run; then it ends (killed: its lock left
    stale), and the waiting run finds every shard written."""
    out = tmp_path / "ds"
    out.mkdir()
    (holder,) = start_lock_holders(str(out), tmp_path / "go", command="vidray tune")
    assert holder.stdout.readline().strip() == "held"
    settings = DecodeSettings(*STORED_SHAPE[:2])
    for shard in plan_shards(load_videos(corpus["manifest"])[0], *STORED_SHAPE[:2], 4):
        decode_shard(str(out), shard, settings, crash_on=None)
    waiting, ended = threading.Event(), threading.Event()
    live_holder = folder_lock.live_holder

    def seen(folder: str):  # the waiting run found the first one holding the dataset
        found = live_holder(folder)
        if found is not None:
            waiting.set()
        return found

    monkeypatch.setattr(folder_lock, "live_holder", seen)

    def end_the_first() -> None:
        waiting.wait(timeout=600)
        holder.kill()
        holder.wait()
        ended.set()

    threading.Thread(target=end_the_first).start()
    capfd.readouterr()
    summary = preprocess(corpus["manifest"], str(out), frames=FRAMES, size=SIZE, videos_per_shard=4)
    assert ended.is_set()  # it returned only once the first had ended
    assert summary["decoded_this_run"] == 0 and summary["shards_reused"] == len(list(out.glob("_shards/shard-*.json")))
    assert summary["processed"] + summary["rejected"] == summary["discovered"] == len(corpus["rows"])
    waits = [line for line in capfd.readouterr().err.splitlines() if "waiting for" in line]
    assert len(waits) == 1 and waits[0].startswith(
        f"vidray preprocess: waiting for `vidray tune` (pid {holder.pid} on host {socket.gethostname()}, since "
    ) and waits[0].endswith(f") to finish writing {out}"), waits
    assert not (out / LOCK_FILE).exists() and (out / "dataset.json").is_file()
