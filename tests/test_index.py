"""Indexing real video files (folder layout and COIN) into manifest Parquet files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vidray.data import index as indexing
from vidray.data.demo import generate_demo_videos
from vidray.errors import UserError
from vidray.data.coin import index_coin
from vidray.data.index import MANIFEST_SCHEMA, held_out_fraction, index_folder, lent_to_val, probe_video, read_manifest
from vidray.data.video import encode_mp4

REPO = Path(__file__).resolve().parents[1]


def tiny_frames(num_frames=12, height=32, width=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def write_mkv(path: Path, frames: np.ndarray, fps: int) -> Path:
    """A real Matroska file (no frame count in its header, unlike mp4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decoded_frame_count(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


NOBODY = 65534  # the unprivileged user of Debian, Ubuntu and most images


def as_another_user(fn, *args):
    """``fn(*args)`` as a user that files' modes apply to, its result returned (its exception raised) here.

    Tests run as root in some places, and root reads anything: then in a forked child that drops to nobody
    (forked, not a new interpreter, which may sit where nobody cannot reach). Run as anyone else, in place."""
    if os.geteuid() != 0:
        return fn(*args)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns into pytest
        os.close(read)
        try:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as err:
                outcome = ("skip", f"cannot drop root to uid {NOBODY} here to test permissions ({err})")
            else:
                try:
                    outcome = ("returned", fn(*args))
                except BaseException as err:  # noqa: BLE001 - handed to the parent, raised there
                    outcome = ("raised", err)
            payload = pickle.dumps(outcome)
        except BaseException as err:  # noqa: BLE001
            payload = pickle.dumps(("raised", RuntimeError(f"outcome not picklable: {err!r}")))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    if not payload:
        pytest.fail(f"the process running {fn.__name__} as uid {NOBODY} died")
    kind, value = pickle.loads(payload)
    if kind == "skip":
        pytest.skip(value)
    if kind == "raised":
        raise value
    return value


@contextlib.contextmanager
def open_folder():
    """A fresh folder every user may enter and write in, for :func:`as_another_user` (pytest's tmp_path is
    its owner's alone); removed after. Call :func:`share` on what the test writes in it."""
    folder = Path(tempfile.mkdtemp(prefix="vidray-test-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def share(folder: Path) -> None:
    """Folders below ``folder`` enterable and files readable by all, whatever the umask made them."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index") / "demo"
    generate_demo_videos(root, classes=4, videos_per_class=3, seed=0)
    return root


# --- folder --------------------------------------------------------------------


def test_index_folder_probes_videos_and_counts_ignored_files(demo_root, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(demo_root, root)
    (root / "README.txt").write_text("not a video")
    (root / "other").mkdir()
    (root / "train" / "notes.txt").write_text("not a class")
    (root / "train" / "circle_growing" / "labels.csv").write_text("a,b")
    # A class folder's subfolders are read, as torchvision's ImageFolder reads them: a session's takes, say.
    (root / "train" / "circle_growing" / "session2").mkdir()
    write_mkv(root / "train" / "circle_growing" / "session2" / "take.mkv", tiny_frames(30), fps=24)
    (root / "train" / "empty_class").mkdir()
    (root / "val" / "extra_class").mkdir()
    write_mkv(root / "val" / "extra_class" / "clip.MKV", tiny_frames(30), fps=24)
    (root / "test" / "circle_growing" / "broken.mp4").write_bytes(b"not really an mp4" * 50)
    # A link into storage that is gone: a video of the folder, rejected with its reason, not ignored.
    (root / "test" / "circle_growing" / "moved.mp4").symlink_to(tmp_path / "unmounted" / "moved.mp4")
    # Hidden entries, as Hugging Face datasets' folder builders leave them out: not a class, not a video.
    (root / "train" / ".ipynb_checkpoints").mkdir()
    write_mkv(root / "train" / ".ipynb_checkpoints" / "clip.mkv", tiny_frames(30), fps=24)
    (root / "val" / "__MACOSX").mkdir()  # a Mac zip's resource forks
    (root / "val" / "extra_class" / "._clip.MKV").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    out = tmp_path / "out" / "manifest.parquet"

    summary = index_folder(root, out)

    demo_classes = ["circle_growing", "circle_shrinking", "square_moving_left", "square_moving_right"]
    classes = sorted(demo_classes + ["empty_class", "extra_class"])
    assert summary["classes"] == classes
    assert summary["selected"] == summary["present"] == 16 and summary["missing"] == 0
    assert summary["ignored"] == 7  # README.txt, other/, notes.txt, labels.csv and the three hidden ones
    assert summary["per_class"] == {
        "circle_growing": 6, "circle_shrinking": 3, "empty_class": 0, "extra_class": 1,
        "square_moving_left": 3, "square_moving_right": 3,
    }
    assert summary["per_split"] == {"train": 5, "val": 5, "test": 6}
    assert summary["probe_errors"] == 2
    assert sorted(Path(e.split(": ")[0]).name for e in summary["probe_error_examples"]) == ["broken.mp4", "moved.mp4"]

    table = pq.read_table(out)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert json.loads(table.schema.metadata[b"vidray.classes"]) == classes
    frame, read_classes = read_manifest(out)
    assert read_classes == classes
    assert len(frame) == 16 and frame["video_id"].is_unique
    assert "train/circle_growing/session2/take" in set(frame["video_id"])
    for row in frame.itertuples():
        path = Path(row.path)
        if path.name == "moved.mp4":
            assert row.probe_error == f"missing: dangling symlink (points to {tmp_path / 'unmounted' / 'moved.mp4'})"
            continue
        assert path.is_absolute() and path.is_file()
        assert row.video_id == path.relative_to(root).with_suffix("").as_posix()
        assert (row.split, row.label) == path.relative_to(root).parts[:2]
        assert classes[row.label_index] == row.label
        if path.name == "broken.mp4":
            assert row.probe_error.startswith("not_a_video: not a video file")
            assert np.isnan(row.duration) and np.isnan(row.num_frames) and np.isnan(row.width)
            continue
        assert pd.isna(row.probe_error)
        assert row.num_frames == decoded_frame_count(path)
        assert row.duration == pytest.approx(row.num_frames / row.fps, abs=0.05)
        if path.suffix.lower() == ".mkv":  # frame count from demuxing, not a header
            assert (row.num_frames, row.fps, row.width, row.height) == (30, 24.0, 48, 32)
            assert row.duration == pytest.approx(1.25)
        else:
            assert (row.width, row.height) in {(128, 96), (160, 120)}


def test_videos_whose_names_differ_in_their_extension_alone_get_ids_of_their_own(tmp_path):
    """train/cat/a.mp4 and train/cat/a.MOV (a camera's clip and its export) both got video_id train/cat/a,
    which index_folder promises unique (shard boundaries and the train/val split go by it). Those
    ids keep their extensions now; every other id stays the path without it, as existing datasets have it."""
    root = tmp_path / "videos"
    # a.mp4.mkv (a remux named after its source): its id without the extension is a.mp4's with it.
    for video in ("train/cat/a.mp4", "train/cat/a.MOV", "train/cat/a.mp4.mkv", "train/cat/b.mp4", "train/dog/a.mp4"):
        (root / video).parent.mkdir(parents=True, exist_ok=True)
        (root / video).write_bytes(b"")  # not probed: only the listing counts
    index_folder(root, tmp_path / "m.parquet", probe=False)
    frame = read_manifest(tmp_path / "m.parquet")[0]
    assert dict(zip(frame["path"], frame["video_id"])) == {
        str(root / "train/cat/a.mp4"): "train/cat/a.mp4",
        str(root / "train/cat/a.MOV"): "train/cat/a.MOV",
        str(root / "train/cat/a.mp4.mkv"): "train/cat/a.mp4.mkv",
        str(root / "train/cat/b.mp4"): "train/cat/b",
        str(root / "train/dog/a.mp4"): "train/dog/a",
    }


def test_a_folder_from_a_mac_and_its_copy_from_elsewhere_get_the_same_ids_and_val_videos(tmp_path):
    """macOS writes names decomposed (NFD), a zip unpacked on Linux composed (NFC): the same folder gave other ids,
    and so another val hold-out (hashed from the id) on each machine. Two names that differ only in their form,
    both on one Linux disk, still get ids of their own."""
    ids = {}
    for form in ("NFD", "NFC"):
        root = tmp_path / form
        for i in range(10):
            video = root / "train" / unicodedata.normalize(form, "Crème") / unicodedata.normalize(form, f"brûlée_{i}.mp4")
            video.parent.mkdir(parents=True, exist_ok=True)
            video.write_bytes(b"")
        index_folder(root, tmp_path / f"{form}.parquet", probe=False, val_fraction=0.2)
        frame = read_manifest(tmp_path / f"{form}.parquet")[0]
        ids[form] = sorted(zip(frame["video_id"], frame["split"]))
    assert ids["NFD"] == ids["NFC"] and {split for _, split in ids["NFC"]} == {"train", "val"}
    both = tmp_path / "both" / "train" / "Crème"
    both.mkdir(parents=True)
    for form in ("NFD", "NFC"):
        (both / unicodedata.normalize(form, "brûlée.mp4")).write_bytes(b"")
    index_folder(tmp_path / "both", tmp_path / "both.parquet", probe=False)
    assert read_manifest(tmp_path / "both.parquet")[0]["video_id"].nunique() == 2


def test_index_folder_without_probe_leaves_probe_columns_empty(demo_root, tmp_path):
    summary = index_folder(demo_root, tmp_path / "m.parquet", probe=False)
    assert summary["present"] == 12 and summary["ignored"] == 0
    frame, _ = read_manifest(tmp_path / "m.parquet")
    assert frame[["duration", "fps", "num_frames", "width", "height", "probe_error"]].isna().all().all()


def _val_ids(manifest: Path) -> set[str]:
    frame, _ = read_manifest(manifest)
    return set(frame.loc[frame["split"] == "val", "video_id"])


def test_a_folder_without_val_lends_a_share_of_each_classs_train_videos_to_val(tmp_path):
    """train/ and test/ only, as many datasets ship: data.val_fraction of each class's train videos become
    val, chosen by their ids' hash: the same on every run, and a video added moves at most one other."""
    root = tmp_path / "videos"
    for label, count in {"many": 10, "few": 5, "one": 1}.items():
        (root / "train" / label).mkdir(parents=True)
        for i in range(count):
            (root / "train" / label / f"{label}{i}.mp4").write_bytes(b"")  # not probed: only the names count
    (root / "test" / "many").mkdir(parents=True)
    (root / "test" / "many" / "held.mp4").write_bytes(b"")
    out = tmp_path / "m.parquet"

    summary = index_folder(root, out, probe=False, val_fraction=0.2)
    frame, _ = read_manifest(out)
    per_split_class = Counter(zip(frame["split"], frame["label"]))
    # 20 % of 10 and of 5, at least one; a class of one video keeps it for training.
    assert (per_split_class["val", "many"], per_split_class["val", "few"], per_split_class["val", "one"]) == (2, 1, 0)
    assert summary["val_held_out_of_train"] == 3 and summary["per_split"] == {"train": 13, "val": 3, "test": 1}
    assert held_out_fraction(out) == 0.2
    first = _val_ids(out)
    assert all(video_id.startswith("train/") for video_id in first)  # ids stay the paths below ROOT

    index_folder(root, out, probe=False, val_fraction=0.2)
    assert _val_ids(out) == first  # no draw: the same videos every time
    (root / "train" / "many" / "added.mp4").write_bytes(b"")
    index_folder(root, out, probe=False, val_fraction=0.2)
    assert len((_val_ids(out) ^ first) - {"train/many/added"}) <= 1

    assert _val_ids(index_folder(root, out, probe=False, val_fraction=0.0)["manifest"]) == set()
    assert held_out_fraction(out) == 0.0
    (root / "val" / "many").mkdir(parents=True)  # a val/ of its own: nothing is lent
    (root / "val" / "many" / "own.mp4").write_bytes(b"")
    assert index_folder(root, out, probe=False, val_fraction=0.2)["val_held_out_of_train"] == 0
    assert _val_ids(out) == {"val/many/own"} and held_out_fraction(out) == 0.0
    with pytest.raises(UserError, match=r"val_fraction=1.0 is not a share of the train videos: give one in \[0, 1\)"):
        index_folder(root, out, probe=False, val_fraction=1.0)


def test_split_folders_may_carry_the_names_hugging_face_datasets_gives_them(tmp_path):
    """Training/, validation/ and Test/ (any case; dev/, eval/, ...: Hugging Face's split keywords) are the three
    splits, so a dataset laid out for the Hub keeps its own validation videos; two folders for one split are
    refused in one line, as is a folder with none of the names."""
    root = tmp_path / "videos"
    for folder in ("Training", "validation", "Test"):
        (root / folder / "cat").mkdir(parents=True)
        (root / folder / "cat" / f"{folder.lower()}.mp4").write_bytes(b"")
    (root / "notes").mkdir()
    out = tmp_path / "m.parquet"
    summary = index_folder(root, out, probe=False, val_fraction=0.2)
    assert summary["per_split"] == {"train": 1, "val": 1, "test": 1} and summary["val_held_out_of_train"] == 0
    assert summary["ignored_examples"] == [str(root / "notes")] and lent_to_val(root, 0.2) == 0.0
    frame, _ = read_manifest(out)
    assert dict(zip(frame["video_id"], frame["split"])) == {
        "Training/cat/training": "train", "validation/cat/validation": "val", "Test/cat/test": "test"
    }

    (root / "dev").mkdir()
    with pytest.raises(UserError) as refused:
        index_folder(root, out, probe=False)
    assert str(refused.value) == (f"video folder {root} has 2 folders for its val split (dev/, validation/): "
                                  "move their videos into one and remove the others")  # fmt: skip
    assert lent_to_val(tmp_path / "absent", 0.2) == 0.2  # no folder yet: nothing of its own to validate on


def test_a_video_added_to_a_linked_class_folder_makes_the_manifest_stale(tmp_path):
    """A class folder linked from elsewhere (a symlink farm of splits) is indexed; a video added in it must make
    `vidray train` index again. Before, only the link itself was looked at, and the new video was never seen."""
    import os

    from vidray.data.prepare import manifest_is_stale

    raw, root = tmp_path / "raw" / "cat", tmp_path / "videos"
    raw.mkdir(parents=True)
    (raw / "0.mp4").write_bytes(b"")
    (root / "train").mkdir(parents=True)
    (root / "train" / "cat").symlink_to(raw)
    manifest = tmp_path / "m.parquet"
    assert index_folder(root, manifest, probe=False)["present"] == 1
    os.utime(manifest, ns=(3 * 10**18, 3 * 10**18))  # written after everything so far, whatever the clock's resolution
    assert not manifest_is_stale(manifest, root)
    (raw / "1.mp4").write_bytes(b"")
    os.utime(raw / "1.mp4", ns=(4 * 10**18, 4 * 10**18))
    os.utime(raw, ns=(4 * 10**18, 4 * 10**18))
    assert manifest_is_stale(manifest, root)
    assert index_folder(root, manifest, probe=False)["present"] == 2


def test_a_link_up_a_class_folders_tree_lists_no_other_classs_videos(tmp_path):
    """`train/cat/up -> ..` reaches train/: each class folder was walked with a memory of its own, so train/dog was
    walked again through cat's link and its videos labelled cat too (twice in the manifest, under two labels)."""
    root = tmp_path / "videos"
    for label in ("cat", "dog"):
        (root / "train" / label).mkdir(parents=True)
        (root / "train" / label / f"{label}0.mp4").write_bytes(b"")
    (root / "train" / "cat" / "up").symlink_to("..")
    manifest = tmp_path / "m.parquet"
    index_folder(root, manifest, probe=False)
    rows = pq.read_table(manifest).to_pylist()
    assert sorted((Path(r["path"]).name, r["label"]) for r in rows) == [("cat0.mp4", "cat"), ("dog0.mp4", "dog")]


def test_a_class_folder_linked_from_storage_that_is_not_mounted_is_refused(tmp_path):
    """`train/cat -> /mnt/ext/cat` with /mnt/ext unmounted: the dangling link was counted as an ignored file, so the
    class vanished and every class after it took another label index, without a word."""
    root = tmp_path / "videos"
    (root / "train" / "dog").mkdir(parents=True)
    (root / "train" / "dog" / "d0.mp4").write_bytes(b"")
    (root / "train" / "cat").symlink_to(tmp_path / "ext" / "cat")
    manifest = tmp_path / "m.parquet"
    with pytest.raises(UserError, match=rf"^{root / 'train' / 'cat'} links to {tmp_path / 'ext' / 'cat'}, which is not "
                                        r"there \(storage not mounted\?\): mount it, or remove the link"):
        index_folder(root, manifest, probe=False)
    assert not manifest.exists()
    (root / "train" / "notes.txt").symlink_to(tmp_path / "share" / "notes.txt")  # a file's link: ignored, as before
    (root / "train" / "cat").unlink()
    assert index_folder(root, manifest, probe=False)["ignored"] == 1
    (root / "train" / "cat").symlink_to(tmp_path / "ext" / "cat")
    (tmp_path / "ext" / "cat").mkdir(parents=True)
    (tmp_path / "ext" / "cat" / "c0.mp4").write_bytes(b"")
    index_folder(root, manifest, probe=False)
    assert sorted(pq.read_table(manifest).column("label").to_pylist()) == ["cat", "dog"]


def test_a_folder_is_indexed_again_when_its_val_fraction_changes(tmp_path):
    """data.source=folder reuses its manifest while the folder is unchanged, unless the share lent to val changed."""
    from vidray.config import DataSettings
    from vidray.data.prepare import folder_manifest_is_stale

    root = tmp_path / "videos"
    (root / "train" / "a").mkdir(parents=True)
    for i in range(4):
        (root / "train" / "a" / f"{i}.mp4").write_bytes(b"")
    data = DataSettings(source="folder", videos_dir=root, manifest=tmp_path / "m.parquet", val_fraction=0.25)
    assert folder_manifest_is_stale(data)  # no manifest yet
    index_folder(root, data.manifest, probe=False, val_fraction=data.val_fraction)
    assert not folder_manifest_is_stale(data)
    assert folder_manifest_is_stale(data.model_copy(update={"val_fraction": 0.5}))
    (root / "val" / "a").mkdir(parents=True)  # now the folder has its own val/: the fraction no longer applies
    (root / "val" / "a" / "v.mp4").write_bytes(b"")
    index_folder(root, data.manifest, probe=False, val_fraction=data.val_fraction)
    assert not folder_manifest_is_stale(data) and not folder_manifest_is_stale(data.model_copy(update={"val_fraction": 0.5}))


def test_index_folder_bad_layouts_name_the_path_and_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=rf"{missing} does not exist.*train,val,test"):
        index_folder(missing, tmp_path / "m.parquet")

    flat = tmp_path / "flat"
    (flat / "ClassA").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"{flat} has no train/.*found: ClassA.*train,val,test"):
        index_folder(flat, tmp_path / "m.parquet")

    empty = tmp_path / "empty"
    (empty / "train" / "ClassA").mkdir(parents=True)
    (empty / "train" / "ClassA" / "clip.txt").write_text("x")
    with pytest.raises(UserError, match=rf"no video files under {empty}"):
        index_folder(empty, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_a_class_whose_folders_spell_it_decomposed_and_composed_is_one_label(tmp_path):
    """train/ copied from a Mac (decomposed: "e" + U+0300) and val/ made on Linux (composed: U+00E8) name the
    same class; it is one label, in the composed form, and each row keeps the path as it is on disk."""
    root = tmp_path / "videos"
    decomposed = root / "train" / unicodedata.normalize("NFD", "Crème brûlée")
    composed = root / "val" / "Crème brûlée"
    assert decomposed.name != composed.name
    for folder in (decomposed, composed, root / "train" / "plain", root / "val" / "plain"):
        folder.mkdir(parents=True)
        encode_mp4(folder / "a.mp4", tiny_frames(num_frames=4), fps=10)
    summary = index_folder(root, tmp_path / "m.parquet")
    assert summary["classes"] == ["Crème brûlée", "plain"] and summary["per_class"] == {"Crème brûlée": 2, "plain": 2}
    rows, classes = read_manifest(tmp_path / "m.parquet")
    label = dict(zip(rows["path"], rows["label"]))
    assert label[str(decomposed / "a.mp4")] == label[str(composed / "a.mp4")] == "Crème brûlée" == classes[0]
    assert (decomposed / "a.mp4").exists()


def test_names_that_are_not_utf8_are_refused_in_one_line_naming_them_and_the_fix(tmp_path):
    """Names from an unzipped Windows archive (cp1252 bytes) would reach the manifest, the labels and the model:
    refused before anything is probed or written; renamed to UTF-8, as the line says, the folder indexes."""
    root = tmp_path / "videos"
    odd_class = root / "train" / os.fsdecode("Crème".encode("cp1252"))
    odd_video = root / "train" / "plain" / os.fsdecode("café.mp4".encode("cp1252"))
    odd_folder = root / "train" / "plain" / os.fsdecode("Schön".encode("cp1252"))  # a subfolder of takes
    for path in (odd_class / "a.mp4", root / "train" / "plain" / "b.mp4", odd_video, odd_folder / "1.mp4", odd_folder / "2.mp4"):
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_mp4(path, tiny_frames(num_frames=4), fps=10)
    out = tmp_path / "m.parquet"
    with pytest.raises(UserError) as refused:
        index_folder(root, out)
    message = str(refused.value)
    assert message.encode("utf-8") and "\n" not in message  # prints anywhere, as one line
    # Each folder once (not again for each video in it), then the video; each as Python shows its odd byte.
    assert f"3 name(s) in {root} are not UTF-8 text (train/Cr\\xe8me, train/plain/Sch\\xf6n, train/plain/caf\\xe9.mp4)" in message
    assert f"`convmv -r -f cp1252 -t utf-8 --notest {root}`" in message
    assert not out.exists()

    result = subprocess.run([sys.executable, "-m", "vidray", "index", "folder", str(root), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip() == f"vidray index: error: {message}", result.stderr

    # What convmv -f cp1252 -t utf-8 does: each name's bytes read as cp1252, written as UTF-8.
    for path in (odd_video, odd_folder, odd_class):
        path.rename(path.parent / os.fsencode(path.name).decode("cp1252"))
    summary = index_folder(root, out)
    assert summary["classes"] == ["Crème", "plain"] and summary["present"] == 5
    assert sorted(read_manifest(out)[0]["video_id"]) == [
        "train/Crème/a", "train/plain/Schön/1", "train/plain/Schön/2", "train/plain/b", "train/plain/café"
    ]


def assert_each_unreadable_folder_refused(root: Path, cases, index: Callable[[], int], out: Path) -> None:
    """For each (folder below ``root``, mode): with that mode, ``index`` run as another user is refused in one line
    naming the folder and the fix, and writes no manifest ``out``; the mode is put back after."""
    for folder, mode in cases:
        (root / folder).chmod(mode)
        try:
            with pytest.raises(UserError) as refused:
                as_another_user(index)
        finally:
            (root / folder).chmod(0o755)
        assert str(refused.value) == (
            f"folder {root / folder} cannot be read (permission denied), so its videos cannot be listed: make it "
            f"readable (`chmod -R a+rX {root / folder}`, as its owner or with sudo) or move it out of the video folder"
        )
        assert not out.exists()


def test_a_folder_that_cannot_be_read_is_refused_naming_it_and_the_fix():
    """Footage untarred with another owner's modes: a folder below the root that this user may not list (or
    may list but not enter) held videos os.walk skipped without a word, and they were left out of the index,
    the training and the counts. Now indexing stops in one line naming the folder and the fix; readable
    again, as the line says, every video is indexed."""
    with open_folder() as shared:
        root, out = shared / "videos", shared / "m.parquet"
        for video in ("train/cat/a.mp4", "train/cat/session2/b.mp4", "train/dog/c.mp4"):
            (root / video).parent.mkdir(parents=True, exist_ok=True)
            (root / video).write_bytes(b"")  # not probed: only the listing counts
        share(shared)

        def present() -> int:
            return index_folder(root, out, probe=False)["present"]

        # No read and no search permission, read but no search (names listed, none openable); a class folder;
        # a split folder.
        cases = (("train/cat/session2", 0o000), ("train/cat/session2", 0o644), ("train/dog", 0o000), ("train", 0o000))
        assert_each_unreadable_folder_refused(root, cases, present, out)
        assert as_another_user(present) == 3


def test_probe_never_raises(tmp_path):
    text = tmp_path / "a.mp4"
    text.write_text("hello")
    assert probe_video(text)["probe_error"]
    assert probe_video(tmp_path / "absent.mp4")["probe_error"] == "missing: file not found"
    assert probe_video(encode_mp4(tmp_path / "ok.mp4", tiny_frames(7), fps=10))["num_frames"] == 7


def test_probe_reports_the_displayed_size(tmp_path):
    # A phone clip coded 48x32 and marked "rotate 90" shows as 32x48; non-square pixels stretch the width.
    frames = tiny_frames(6)
    for rotation, aspect, displayed in [(0, None, (48, 32)), (90, None, (32, 48)), (270, None, (32, 48)),
                                        (180, None, (48, 32)), (0, Fraction(2), (96, 32)), (90, Fraction(2), (32, 96))]:
        path = encode_mp4(tmp_path / f"r{rotation}_{aspect}.mp4", frames, rotation=rotation, sample_aspect_ratio=aspect)
        info = probe_video(path)
        assert (info["width"], info["height"]) == displayed, (rotation, aspect, info)
        assert info["num_frames"] == 6 and info["probe_error"] is None


def test_read_manifest_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=rf"manifest {tmp_path / 'absent.parquet'} not found: run `vidray index"):
        read_manifest(tmp_path / "absent.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not parquet")
    with pytest.raises(UserError, match=rf"manifest {garbage} is not a readable Parquet file.*vidray index"):
        read_manifest(garbage)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"path": ["x"]}), plain)
    with pytest.raises(UserError, match=rf"manifest {plain} has no vidray.classes metadata.*vidray index"):
        read_manifest(plain)


def test_cli_index_folder_prints_json_summary_last(demo_root, tmp_path):
    out = tmp_path / "manifest.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "vidray", "index", "folder", str(demo_root), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["present"] == 12 and summary["manifest"] == str(out)
    # Before it, one line for a person (on stderr, so stdout stays the summary alone).
    assert result.stderr.strip() == f"vidray index: 12 videos of 4 classes (train 4, val 4, test 4) -> {out}"
    assert len(read_manifest(out)[0]) == 12

    bad = subprocess.run(
        [sys.executable, "-m", "vidray", "index", "folder", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and str(tmp_path / "nope") in bad.stderr


# --- COIN, synthetic -----------------------------------------------------------

TAXONOMY = """domain,task,task_id
Drink and Snack,MakeCoffee,1
Drink and Snack,MakeTea,2
Vehicle,ChangeTire,3
Sport,PoleVault,4
"""


def coin_entry(recipe, task, subset, duration):
    entry = {"class": task, "subset": subset, "duration": duration, "video_url": "https://youtube.com/embed/x"}
    if recipe is not None:
        entry["recipe_type"] = recipe
    return entry


@pytest.fixture
def coin_files(tmp_path):
    taxonomy = tmp_path / "taxonomy_domains.csv"
    taxonomy.write_text(TAXONOMY)
    first = {  # COIN.json layout
        "a1": coin_entry(1, "MakeCoffee", "training", 10.0),  # on the inclusive lower bound
        "a2": coin_entry(3, "ChangeTire", "testing", 60.0),  # on the inclusive upper bound
        "a3": coin_entry(4, "PoleVault", "training", 30.0),  # not downloaded
        "a4": coin_entry(2, "MakeTea", "testing", 9.99),  # too short
        "a5": coin_entry(1, "MakeCoffee", "training", 60.01),  # too long
    }
    second = [  # the list-of-objects layout of coin_train_70.json
        {"a6": coin_entry(999, "JuggleTorches", "training", 20.0)},  # task not in the taxonomy
        {"a7": coin_entry(None, "MakeTea", "training", 20.0)},  # no recipe_type: mapped by name
        {"a8": coin_entry(3, "ChangeTire", "validation", 45.0)},
        {"a9": coin_entry(4, "PoleVault", "testing", 25.0)},  # downloaded into the wrong task folder
    ]
    (tmp_path / "coin.json").write_text(json.dumps({"database": first}))
    (tmp_path / "coin_list.json").write_text(json.dumps(second))

    videos = tmp_path / "videos"
    encode_mp4(videos / "1" / "a1.mp4", tiny_frames(10), fps=10)
    encode_mp4(videos / "a2.mp4", tiny_frames(11), fps=10)
    shutil.move(videos / "a2.mp4", videos / "a2.MOV")  # odd, upper-case extension
    encode_mp4(videos / "a7.mp4", tiny_frames(12), fps=10)
    write_mkv(videos / "3" / "a8.mkv", tiny_frames(13), fps=10)
    encode_mp4(videos / "1" / "a9.mp4", tiny_frames(14), fps=10)
    (videos / "1" / "a3.txt").write_text("not a video")
    return [tmp_path / "coin.json", tmp_path / "coin_list.json"], taxonomy, videos


def test_index_coin_both_json_layouts_duration_filter_and_missing(coin_files, tmp_path):
    annotations, taxonomy, videos = coin_files
    out = tmp_path / "m" / "coin.parquet"
    summary = index_coin(annotations, taxonomy, videos, out, min_duration=10, max_duration=60)

    classes = ["DrinkandSnack", "Sport", "Vehicle"]
    assert summary["classes"] == classes
    assert summary["entries"] == 9
    assert summary["problems"] == 1
    assert "a6" in summary["problem_examples"][0] and "recipe_type=999" in summary["problem_examples"][0]
    assert "coin_list.json" in summary["problem_examples"][0]
    assert summary["filtered_out_by_duration"] == 2
    assert summary["selected"] == 6
    assert summary["selected_per_class"] == {"DrinkandSnack": 2, "Sport": 2, "Vehicle": 2}
    assert summary["present"] == 4 and summary["missing"] == 2
    assert summary["per_class"] == {"DrinkandSnack": 2, "Sport": 0, "Vehicle": 2}
    assert summary["per_split"] == {"train": 2, "val": 2, "test": 0}

    frame, read_classes = read_manifest(out)
    assert read_classes == classes
    rows = {row.video_id: row for row in frame.itertuples()}
    assert set(rows) == {"a1", "a2", "a7", "a8"}
    assert (rows["a1"].label, rows["a1"].split, rows["a1"].num_frames) == ("DrinkandSnack", "train", 10)
    assert (rows["a2"].label, rows["a2"].split, rows["a2"].num_frames) == ("Vehicle", "val", 11)
    assert Path(rows["a2"].path).name == "a2.MOV"
    assert (rows["a7"].label, rows["a7"].label_index) == ("DrinkandSnack", 0)
    assert (rows["a8"].label, rows["a8"].split, rows["a8"].num_frames) == ("Vehicle", "val", 13)
    assert frame["probe_error"].isna().all()

    with open(summary["missing_csv"], newline="") as f:
        missing = list(csv.DictReader(f))
    assert [(m["youtube_id"], m["class"], m["task"], m["split"], float(m["duration"])) for m in missing] == [
        ("a3", "Sport", "PoleVault", "train", 30.0),
        ("a9", "Sport", "PoleVault", "val", 25.0),
    ]
    with open(summary["problems_csv"], newline="") as f:
        assert [p["youtube_id"] for p in csv.DictReader(f)] == ["a6"]

    # Without a filter every mapped entry is selected; a later clean run removes the stale problems list.
    # An id seen twice (here: the same file given twice) counts once.
    summary = index_coin([annotations[0], annotations[0]], taxonomy, videos, out, probe=False)
    assert (summary["entries"], summary["duplicates"]) == (10, 5)
    assert (summary["selected"], summary["present"], summary["missing"], summary["problems"]) == (5, 2, 3, 0)
    assert summary["problems_csv"] is None and not out.with_suffix(".problems.csv").exists()


def test_an_unreadable_folder_among_the_coin_videos_is_refused_or_not_read():
    """`vidray index coin --videos` at a mount's root stopped with a PermissionError traceback on its lost+found
    (root's alone). A folder no video is looked up in is not read now; a task's folder that cannot be read
    is refused in one line naming it and the fix, as the folder source refuses one."""
    with open_folder() as shared:
        videos, out = shared / "videos", shared / "m.parquet"
        (shared / "taxonomy_domains.csv").write_text(TAXONOMY)
        (shared / "coin.json").write_text(json.dumps({"database": {
            "a1": coin_entry(1, "MakeCoffee", "training", 10.0), "a8": coin_entry(3, "ChangeTire", "testing", 45.0),
        }}))  # fmt: skip
        for video in ("1/a1.mp4", "3/a8.mp4", "lost+found/#1234"):
            (videos / video).parent.mkdir(parents=True, exist_ok=True)
            (videos / video).write_bytes(b"")  # not probed: only the listing counts
        share(shared)
        (videos / "lost+found").chmod(0o700)

        def present() -> int:
            return index_coin([shared / "coin.json"], shared / "taxonomy_domains.csv", videos, out, probe=False)["present"]

        assert present() == 2  # first here, loading what index_coin imports lazily before the fork drops root
        assert as_another_user(present) == 2
        out.unlink()
        # No permission; read but no search; the root.
        assert_each_unreadable_folder_refused(videos, (("3", 0o000), ("3", 0o644), ("", 0o000)), present, out)


def test_index_coin_hostile_inputs_name_the_file(coin_files, tmp_path):
    annotations, taxonomy, videos = coin_files
    out = tmp_path / "m.parquet"

    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"database": {"a1": {"class": ')
    with pytest.raises(UserError, match=rf"COIN annotations {truncated} is not valid JSON .*line 1"):
        index_coin([truncated], taxonomy, videos, out)

    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(UserError, match=rf"COIN annotations {scalar}: top level is a int"):
        index_coin([scalar], taxonomy, videos, out)

    not_entry = tmp_path / "not_entry.json"
    not_entry.write_text('{"database": {"a1": [1, 2]}}')
    with pytest.raises(UserError, match=rf"{not_entry}: entry 'a1' is not an object"):
        index_coin([not_entry], taxonomy, videos, out)

    with pytest.raises(UserError, match=rf"COIN annotations {tmp_path / 'absent.json'} not found"):
        index_coin([tmp_path / "absent.json"], taxonomy, videos, out)

    no_ids = tmp_path / "no_ids.csv"
    no_ids.write_text("domain,task\nVehicle,ChangeTire\n")
    with pytest.raises(UserError, match=rf"COIN taxonomy {no_ids} lacks column\(s\) task_id"):
        index_coin(annotations, no_ids, videos, out)

    bad_id = tmp_path / "bad_id.csv"
    bad_id.write_text("domain,task,task_id\nVehicle,ChangeTire,three\n")
    with pytest.raises(UserError, match=rf"COIN taxonomy {bad_id} line 2: task_id 'three' is not an integer"):
        index_coin(annotations, bad_id, videos, out)

    with pytest.raises(UserError, match=rf"COIN taxonomy {tmp_path / 'absent.csv'} not found"):
        index_coin(annotations, tmp_path / "absent.csv", videos, out)

    with pytest.raises(UserError, match=rf"COIN videos folder {tmp_path / 'no_videos'} does not exist"):
        index_coin(annotations, taxonomy, tmp_path / "no_videos", out)

    assert not out.exists()  # nothing half-written on any error

    # Odd entries are counted problems that name the file, not errors.
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"database": {
        "b1": coin_entry(3, "ChangeTire", "dev", 20.0),
        "b2": coin_entry(3, "ChangeTire", "training", "long"),
        "b3": coin_entry("abc", "ChangeTire", "training", 20.0),
        "b4": coin_entry(3, "MakeTea", "training", 20.0),  # task id and name disagree on the domain
        "b5": coin_entry(3, "ChangeTire", "training", 20.0),
    }}))  # fmt: skip
    summary = index_coin([odd], taxonomy, videos, out, min_duration=1)
    assert (summary["problems"], summary["selected"]) == (4, 1)
    reasons = "\n".join(summary["problem_examples"])
    for expected in ["b1 (", "subset 'dev'", "duration 'long'", "recipe_type 'abc'", "Vehicle but class 'MakeTea'"]:
        assert expected in reasons
    assert str(odd) in reasons


def test_a_coin_task_id_written_as_a_float_or_a_string_finds_its_task_folder(coin_files, tmp_path):
    """A COIN.json rewritten by a tool that keeps numbers as floats (pandas' to_json) has recipe_type 3.0: its
    videos were looked up in folder '3.0' and listed missing though present in DIR/3/. 3.0 and "3" are task 3;
    3.5 names no task and is a problem, as "abc" is."""
    _, taxonomy, videos = coin_files
    annotations = tmp_path / "floats.json"
    annotations.write_text(json.dumps({"database": {
        "a8": coin_entry(3.0, "ChangeTire", "training", 45.0),  # videos/3/a8.mkv
        "a1": coin_entry("1", "MakeCoffee", "testing", 10.0),  # videos/1/a1.mp4
        "c1": coin_entry(3.5, "ChangeTire", "training", 20.0),
        "c2": coin_entry(True, "ChangeTire", "training", 20.0),
    }}))  # fmt: skip
    summary = index_coin([annotations], taxonomy, videos, tmp_path / "m.parquet", probe=False)
    assert (summary["present"], summary["missing"], summary["problems"]) == (2, 0, 2)
    reasons = "\n".join(summary["problem_examples"])
    assert "recipe_type 3.5 is not an integer task id" in reasons and "recipe_type True" in reasons
    frame, _ = read_manifest(tmp_path / "m.parquet")
    assert dict(zip(frame["video_id"], frame["label"])) == {"a8": "Vehicle", "a1": "DrinkandSnack"}


def test_coin_probes_only_the_videos_that_changed_since_the_last_index(coin_files, tmp_path, monkeypatch):
    """Every COIN train, tune or pretrain start indexes again (prepare_dataset), and probed every video again:
    ~7 minutes for COIN's 11,800 on 2 cores before a resumed run went on. A video unchanged since the last index
    keeps its probe, by the rule that says a folder's manifest is stale; one never probed, or touched, is probed."""
    annotations, taxonomy, videos = coin_files
    out = tmp_path / "coin.parquet"
    probed: list[str] = []
    real_probe = indexing.probe_video

    def counted(path):
        probed.append(os.path.basename(path))  # list.append is atomic: the probes run in threads
        return real_probe(path)

    monkeypatch.setattr(indexing, "probe_video", counted)

    def index(**kwargs) -> list[dict]:
        probed.clear()
        index_coin(annotations, taxonomy, videos, out, **kwargs)
        return pq.read_table(out).to_pylist()

    index(probe=False)
    first = index()
    assert sorted(probed) == ["a1.mp4", "a2.MOV", "a7.mp4", "a8.mkv"]  # a manifest without probes: all probed
    assert all(row["num_frames"] for row in first)
    assert index() == first and probed == []
    os.utime(videos / "3" / "a8.mkv")
    assert index() == first and probed == ["a8.mkv"]
    encode_mp4(videos / "1" / "a1.mp4", tiny_frames(15), fps=10)  # downloaded again, another cut
    rows = index()
    assert probed == ["a1.mp4"] and {row["video_id"]: row["num_frames"] for row in rows}["a1"] == 15


# --- COIN, the real metadata ----------------------------------------------------


def test_real_coin_10_to_60_seconds_matches_a_direct_computation(shared_coin, tmp_path):
    annotation_files = [shared_coin / "coin_train_70.json", shared_coin / "coin_test_30.json"]
    taxonomy = shared_coin / "taxonomy_domains.csv"

    # Independent expectation straight from the JSON and the CSV.
    with open(taxonomy, newline="") as f:
        domain_of_task = {int(r["task_id"]): r["domain"].replace(" ", "") for r in csv.DictReader(f)}
    expected = {}
    for path in annotation_files:
        for item in json.loads(path.read_text()):
            for video_id, entry in item.items():
                if 10 <= entry["duration"] <= 60:
                    split = {"training": "train", "testing": "val"}[entry["subset"]]
                    expected[video_id] = (domain_of_task[entry["recipe_type"]], split, entry["recipe_type"])
    assert len(set(domain_of_task.values())) == 12

    # Two of the selected videos "downloaded", one in each supported layout.
    videos = tmp_path / "videos"
    (in_task_dir, (_, _, recipe)), (flat, _) = sorted(expected.items())[:2]
    encode_mp4(videos / str(recipe) / f"{in_task_dir}.mp4", tiny_frames(8), fps=8)
    encode_mp4(videos / f"{flat}.mp4", tiny_frames(9), fps=8)

    out = tmp_path / "coin.parquet"
    summary = index_coin(annotation_files, taxonomy, videos, out, min_duration=10, max_duration=60)

    assert summary["entries"] == 7064 + 3006
    assert summary["problems"] == 0
    assert summary["selected"] == len(expected)
    expected_per_class = Counter(domain for domain, _, _ in expected.values())
    assert summary["selected_per_class"] == {name: expected_per_class[name] for name in sorted(expected_per_class)}
    assert len(summary["classes"]) == 12 and all(summary["selected_per_class"][c] > 0 for c in summary["classes"])
    assert summary["present"] == 2 and summary["missing"] == len(expected) - 2

    frame, classes = read_manifest(out)
    assert sorted(frame["video_id"]) == sorted([in_task_dir, flat])
    for row in frame.itertuples():
        assert (row.label, row.split) == expected[row.video_id][:2]
        assert classes[row.label_index] == row.label
    with open(summary["missing_csv"], newline="") as f:
        missing = {m["youtube_id"]: (m["class"], m["split"], int(m["recipe_type"])) for m in csv.DictReader(f)}
    assert set(missing) | set(frame["video_id"]) == set(expected)
    assert missing == {k: v for k, v in expected.items() if k not in (in_task_dir, flat)}
    assert set(Counter(split for _, split, _ in expected.values())) == {"train", "val"}
