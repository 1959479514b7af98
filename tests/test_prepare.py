"""Config -> dataset: demo generation, folder and COIN indexing, preprocessing, cheap re-runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vidray.config import ConfigError, DataSettings, VidrayConfig
from vidray.data.demo import DEMO_CLASSES, GENERATOR_VERSION, drawn_with_seed, settings_file
from vidray.data.coin import load_coin_annotations
from vidray.data import index as indexing
from vidray.data.index import index_folder, read_manifest, write_manifest
from vidray.data.prepare import ensure_demo_videos, folder_manifest_is_stale, manifest_is_stale, prepare_dataset
from vidray.data.shards import Video, load_videos, plan_shards
from vidray.data.video import encode_mp4

SMALL = {"frames": 4, "size": 28, "stored_frames": 8, "stored_size": 32}


def config(tmp_path: Path, **data) -> VidrayConfig:
    return VidrayConfig.model_validate(
        {
            "data": {
                "videos_dir": str(tmp_path / "videos"),
                "manifest": str(tmp_path / "manifest.parquet"),
                "dataset_dir": str(tmp_path / "dataset"),
                **SMALL,
                **data,
            }
        }
    )


def dataset_json(cfg: VidrayConfig) -> dict:
    return json.loads((Path(cfg.data.dataset_dir) / "dataset.json").read_text())


def videos_in_shard(cfg: VidrayConfig, parquet_name: str) -> int:
    return pq.read_metadata(Path(cfg.data.dataset_dir) / parquet_name).num_rows


def small_video(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return encode_mp4(path, rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8), fps=12)


def test_demo_source_generates_indexes_and_preprocesses_once(ray_cluster, tmp_path, capfd, monkeypatch):
    # Paths under ~ as a YAML file gives them (no shell expands them there): each is the folder in the home.
    monkeypatch.setenv("HOME", str(tmp_path))
    home = {key: f"~/{name}" for key, name in (("videos_dir", "videos"), ("manifest", "manifest.parquet"), ("dataset_dir", "dataset"))}
    cfg = config(tmp_path, source="demo", demo={"classes": 2, "videos_per_class": 3}, videos_per_shard=1, **home)
    assert (cfg.data.videos_dir, cfg.data.manifest) == (tmp_path / "videos", tmp_path / "manifest.parquet")
    assert prepare_dataset(cfg) == str(tmp_path / "dataset")

    info = dataset_json(cfg)
    assert info["classes"] == sorted(DEMO_CLASSES[:2])
    assert info["discovered"] == info["processed"] == 6 and info["rejected"] == 0
    assert {split: s["videos"] for split, s in info["splits"].items()} == {"train": 2, "val": 2, "test": 2}
    assert (info["stored_frames"], info["stored_size"]) == (8, 32)
    assert len(info["shards"]) == 6  # data.videos_per_shard=1: one shard, i.e. one Ray task, per video

    videos = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*.mp4")}
    manifest_mtime = cfg.data.manifest.stat().st_mtime_ns
    info_mtime = (tmp_path / "dataset" / "dataset.json").stat().st_mtime_ns
    capfd.readouterr()
    prepare_dataset(cfg)  # everything current: no generation, no indexing, no decoding, nothing written
    assert "decoded 0, reused 6/6 shards" in capfd.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*.mp4")} == videos
    assert cfg.data.manifest.stat().st_mtime_ns == manifest_mtime
    assert (tmp_path / "dataset" / "dataset.json").stat().st_mtime_ns == info_mtime and dataset_json(cfg) == info


def test_demo_folder_that_does_not_match_the_config_is_refused(tmp_path):
    small_video(tmp_path / "videos" / "train" / "something_else" / "x.mp4", seed=0)
    cfg = config(tmp_path, source="demo", demo={"classes": 2, "videos_per_class": 3})
    with pytest.raises(ConfigError, match=r"data.videos_dir .* holds 1 videos of 1 classes, but data.demo asks for 2"):
        prepare_dataset(cfg)


def test_a_demo_folder_of_another_seed_is_refused_and_one_made_before_seeds_were_recorded_too(tmp_path):
    """`make demo`, then `python jobs/tune.py data.demo.seed=1`: the folder held the right classes and counts, so
    the run trained on seed 0's videos while its config said seed 1. The folder records the settings it was made
    with now, and another seed is refused in one line. A folder made before that (no record) is accepted for the
    seed its videos were drawn with, and then gets its record, and refused for any other."""
    def ensure(seed: int) -> None:
        ensure_demo_videos(config(tmp_path, source="demo", demo={"classes": 2, "videos_per_class": 3, "seed": seed}).data)

    videos = tmp_path / "videos"
    ensure(0)  # generated
    record = settings_file(videos)
    assert json.loads(record.read_text()) == {"classes": 2, "videos_per_class": 3, "seed": 0, "generator": GENERATOR_VERSION,
                                              "folder": [videos.stat().st_dev, videos.stat().st_ino]}  # fmt: skip
    files = {p: p.stat().st_mtime_ns for p in videos.rglob("*.mp4")}
    ensure(0)  # the same set: nothing to say
    refusal = "^" + re.escape(f"data.videos_dir {videos} holds the demo videos of data.demo.seed=0, but the config asks "
                              "for 1: delete the folder to regenerate it, or set data.videos_dir to another (empty) path") + "$"
    with pytest.raises(ConfigError, match=refusal):
        ensure(1)

    record.unlink()  # as a folder made before the record (or copied in by hand: recorded for another folder)
    with pytest.raises(ConfigError, match="^" + re.escape(f"data.videos_dir {videos} holds demo videos that data.demo.seed=1 does not draw")):
        ensure(1)
    assert not record.exists()
    ensure(0)  # its own seed: accepted, and recorded
    assert json.loads(record.read_text())["seed"] == 0
    with pytest.raises(ConfigError, match=refusal):
        ensure(1)
    assert {p: p.stat().st_mtime_ns for p in videos.rglob("*.mp4")} == files  # never regenerated
    # The seed is told from the videos' headers, which draws of every seed give; a few seeds are all told apart.
    assert [drawn_with_seed(videos, 2, 3, seed) for seed in range(6)] == [True, False, False, False, False, False]


def test_folder_source_reindexes_when_videos_change(ray_cluster, tmp_path):
    root = tmp_path / "videos"
    seed = 0
    for split, count in {"train": 3, "val": 1, "test": 1}.items():
        for label in ("cats", "dogs"):
            for i in range(count):
                seed += 1
                small_video(root / split / label / f"{label}_{i}.mp4", seed=seed)
    cfg = config(tmp_path, source="folder")
    prepare_dataset(cfg)
    first = dataset_json(cfg)
    assert first["classes"] == ["cats", "dogs"] and first["processed"] == 10

    small_video(root / "train" / "dogs" / "dogs_new.mp4", seed=1234)
    prepare_dataset(cfg)
    second = dataset_json(cfg)
    assert second["processed"] == 11 and second["splits"]["train"]["per_class"] == {"cats": 3, "dogs": 4}
    # Only the train shard(s) around the new video are decoded again; val and test are reused.
    new_shards = set(second["shards"]) - set(first["shards"])
    assert new_shards and all(name.startswith("train/") for name in new_shards)
    assert len(new_shards) <= 2 and second["shards_reused"] == len(second["shards"]) - len(new_shards)
    assert second["decoded_this_run"] == sum(videos_in_shard(cfg, name) for name in new_shards) < 11
    assert {n for n in second["shards"] if not n.startswith("train/")} == {
        n for n in first["shards"] if not n.startswith("train/")
    }


def age(folder: Path) -> None:
    """Every file and folder in ``folder`` dated 2001: footage untarred with the mtimes it was packed with."""
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, ns=(10**18, 10**18))


def without_root(manifest: Path) -> None:
    """``manifest`` as vidray wrote it before it recorded the folder indexed (vidray.source, vidray.root)."""
    table = pq.read_table(manifest)
    kept = {k: v for k, v in table.schema.metadata.items() if k not in (b"vidray.source", b"vidray.root")}
    pq.write_table(table.replace_schema_metadata(kept), manifest)


def test_a_manifest_of_another_folder_is_indexed_again_not_reused(tmp_path, capsys):
    """The demo and the folder source share data/demo/manifest.parquet by default, and footage untarred after
    the demo ran keeps its older mtimes: by mtimes alone, `vidray train data.source=folder` trained on the demo's
    videos and classes (and the demo on the folder's). The manifest records the folder it indexed: another
    folder's (or COIN's) is indexed again, said on the console."""
    demo, mine, manifest = tmp_path / "demo", tmp_path / "mine", tmp_path / "manifest.parquet"
    for root, labels in ((demo, ("circle",)), (mine, ("cats", "dogs"))):
        for split in ("train", "val"):
            for label in labels:
                (root / split / label).mkdir(parents=True)
                (root / split / label / "a.mp4").write_bytes(b"")  # not probed: only what is indexed counts
    folder = DataSettings(source="folder", videos_dir=mine, manifest=manifest)
    index_folder(demo, manifest, probe=False)  # the demo ran first
    age(mine)
    assert folder_manifest_is_stale(folder)
    assert capsys.readouterr().err == f"vidray index: indexing {mine} into {manifest}, which was the index of {demo}\n"
    index_folder(mine, manifest, probe=False)  # as prepare_dataset does when it is stale
    assert read_manifest(manifest)[1] == ["cats", "dogs"]
    assert not folder_manifest_is_stale(folder) and capsys.readouterr().err == ""  # its own: reused

    age(demo)  # and back to the demo (prepare_dataset's demo branch asks manifest_is_stale)
    assert manifest_is_stale(manifest, demo)
    assert capsys.readouterr().err == f"vidray index: indexing {demo} into {manifest}, which was the index of {mine}\n"

    # COIN's index of videos in the same folder is not the folder's index.
    write_manifest(pq.read_table(manifest).to_pylist(), ["cats", "dogs"], manifest, source="coin", root=mine)
    assert folder_manifest_is_stale(folder)
    assert capsys.readouterr().err.endswith(f"which was the index of the coin videos in {mine}\n")

    # A manifest from before the folder was recorded is the folder's while all its videos are below it.
    index_folder(mine, manifest, probe=False)
    without_root(manifest)
    assert not folder_manifest_is_stale(folder) and capsys.readouterr().err == ""
    index_folder(demo, manifest, probe=False)
    without_root(manifest)
    assert folder_manifest_is_stale(folder)
    outside = demo / "train" / "circle" / "a.mp4"
    assert capsys.readouterr().err.endswith(f"which listed videos outside it ({outside}, ...)\n")


def test_videos_untarred_into_an_indexed_class_folder_with_their_old_dates_are_indexed(tmp_path):
    """tar xf (as cp -a, rsync -a and unzip) sets the files it writes, and the folders it writes into, back
    to the mtimes they were packed with: by mtimes alone the manifest looked current, and the new videos were
    left out of training without a word. The index sees them, and an unchanged video's shard is reused."""
    root, pack, manifest = tmp_path / "videos", tmp_path / "pack", tmp_path / "manifest.parquet"
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "a.mp4").write_bytes(b"")  # not probed: only what is indexed counts
    folder = DataSettings(source="folder", videos_dir=root, manifest=manifest)
    index_folder(root, manifest, probe=False)
    assert not folder_manifest_is_stale(folder)
    shards_before = {s.id for s in plan_shards(load_videos(manifest)[0], 4, 16, videos_per_shard=1)}

    (pack / "train" / "cats").mkdir(parents=True)
    (pack / "train" / "cats" / "b.mp4").write_bytes(b"")
    age(pack)  # packed in 2001
    subprocess.run(["tar", "cf", tmp_path / "more.tar", "-C", pack, "train"], check=True)
    subprocess.run(["tar", "xf", tmp_path / "more.tar", "-C", root], check=True)
    written = [root / "train", root / "train" / "cats", root / "train" / "cats" / "b.mp4"]
    assert all(path.stat().st_mtime_ns == 10**18 for path in written)  # older than the manifest

    assert folder_manifest_is_stale(folder)
    index_folder(root, manifest, probe=False)  # as prepare_dataset does when it is stale
    assert sorted(read_manifest(manifest)[0]["video_id"]) == [
        "train/cats/a", "train/cats/b", "train/dogs/a", "val/cats/a", "val/dogs/a"
    ]
    assert not folder_manifest_is_stale(folder)
    shards_after = {s.id for s in plan_shards(load_videos(manifest)[0], 4, 16, videos_per_shard=1)}
    assert shards_before < shards_after and len(shards_after - shards_before) == 1  # b's alone is new


def test_a_video_copied_in_while_the_folder_is_probed_is_indexed_on_the_next_run(tmp_path, monkeypatch):
    """Indexing lists the folder, probes every video (minutes on a big set), then writes the manifest. The manifest's
    mtime was the end of that, so a video copied in while the others were probed was older than the manifest: never
    listed, and never indexed on a later run either. Here it is copied in as the first video is probed, by a hook
    that then probes it for real."""
    root, manifest = tmp_path / "videos", tmp_path / "manifest.parquet"
    small_video(root / "train" / "cats" / "a.mp4", seed=1)
    small_video(root / "train" / "dogs" / "a.mp4", seed=2)
    late = root / "train" / "dogs" / "copied_in_while_probing.mp4"
    probe_video, copying = indexing.probe_video, threading.Lock()

    def probed_while_a_video_is_copied_in(path):
        with copying:  # the probes run in threads: one copy
            if not late.exists():
                small_video(late, seed=3)
        return probe_video(path)

    monkeypatch.setattr(indexing, "probe_video", probed_while_a_video_is_copied_in)
    index_folder(root, manifest)
    monkeypatch.undo()
    frame, _ = read_manifest(manifest)
    assert sorted(frame["video_id"]) == ["train/cats/a", "train/dogs/a"] and frame["probe_error"].isna().all()

    assert manifest_is_stale(manifest, root)  # the next prepare_dataset indexes again
    index_folder(root, manifest)  # as prepare_dataset does when it is stale
    assert sorted(read_manifest(manifest)[0]["video_id"]) == [
        "train/cats/a", "train/dogs/a", "train/dogs/copied_in_while_probing"
    ]
    assert not manifest_is_stale(manifest, root)


def test_a_manifest_kept_in_its_video_folder_is_stale_only_once_the_folder_changes(tmp_path):
    """`vidray index folder /videos --out /videos/manifest.parquet`: the manifest carries the time its listing began,
    and writing it changed its own folder after that, so it was stale as soon as written: every run indexed and
    probed every video again."""
    root = tmp_path / "videos"
    manifest = root / "manifest.parquet"
    small_video(root / "train" / "cats" / "a.mp4", seed=1)
    small_video(root / "train" / "dogs" / "a.mp4", seed=2)
    index_folder(root, manifest)
    assert not manifest_is_stale(manifest, root)
    small_video(root / "train" / "dogs" / "b.mp4", seed=3)
    assert manifest_is_stale(manifest, root)
    index_folder(root, manifest)
    assert not manifest_is_stale(manifest, root) and len(read_manifest(manifest)[0]) == 3


def test_shard_plan_does_not_depend_on_where_videos_live():
    # Same ids, different folders and mtimes: same boundaries and the same file order,
    # so the same training run on any machine.
    def plan(prefix, mtime):
        videos = [
            Video(f"{prefix}/train/c{i % 3}/v{i}.mp4", f"train/c{i % 3}/v{i}", f"c{i % 3}", i % 3, "train", 100, mtime)
            for i in range(40)
        ]
        return plan_shards(videos, stored_frames=4, stored_size=16, videos_per_shard=4)

    here, there = plan("/data/a", 1), plan("/mnt/elsewhere", 2)
    assert [[v.video_id for v in s.videos] for s in here] == [[v.video_id for v in s.videos] for s in there]
    assert [s.id.split("-")[0] for s in here] == [s.id.split("-")[0] for s in there]
    assert {s.id for s in here}.isdisjoint({s.id for s in there})  # but the content hash tells them apart

    def in_file_order(shards):
        return [[v.video_id for v in s.videos] for s in sorted(shards, key=lambda s: s.parquet_name)]

    assert in_file_order(here) == in_file_order(there)
    assert 4 < len(here) < 40


def test_missing_inputs_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.videos_dir: .*videos does not exist \(a folder laid out as"):
        prepare_dataset(config(tmp_path, source="folder"))
    with pytest.raises(ConfigError, match=r"data.annotations is not set"):
        prepare_dataset(config(tmp_path, source="coin"))
    with pytest.raises(ConfigError, match=r"data.annotations\[0\]: .*COIN.json does not exist"):
        prepare_dataset(config(tmp_path, source="coin", annotations=[str(tmp_path / "COIN.json")]))
    (tmp_path / "COIN.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data.taxonomy is not set \(COIN's taxonomy_domains.csv\)"):
        prepare_dataset(config(tmp_path, source="coin", annotations=[str(tmp_path / "COIN.json")]))


def test_coin_source_with_the_real_metadata(ray_cluster, shared_coin, tmp_path):
    """Real COIN annotations + taxonomy; four videos 'downloaded' (encoded here) under real ids."""
    train = load_coin_annotations(shared_coin / "coin_train_70.json")
    test = load_coin_annotations(shared_coin / "coin_test_30.json")
    picked = list(train.items())[:3] + list(test.items())[:1]
    for index, (youtube_id, entry) in enumerate(picked):
        small_video(tmp_path / "videos" / str(entry["recipe_type"]) / f"{youtube_id}.mp4", seed=index)
    cfg = config(
        tmp_path,
        source="coin",
        annotations=[str(shared_coin / "coin_train_70.json"), str(shared_coin / "coin_test_30.json")],
        taxonomy=str(shared_coin / "taxonomy_domains.csv"),
    )
    prepare_dataset(cfg)

    info = dataset_json(cfg)
    assert len(info["classes"]) == 12
    assert info["discovered"] == info["processed"] == 4
    assert info["splits"]["train"]["videos"] == 3 and info["splits"]["val"]["videos"] == 1
    manifest, classes = read_manifest(cfg.data.manifest)
    assert classes == info["classes"]
    labels = dict(zip(manifest["video_id"], manifest["label_index"]))
    written = pd.concat(pd.read_parquet(Path(cfg.data.dataset_dir) / s) for s in ("train", "val"))
    assert {vid: labels[vid] for vid in written["video_id"]} == dict(zip(written["video_id"], written["label"]))
    assert sorted(written["video_id"]) == sorted(youtube_id for youtube_id, _ in picked)


ENSURE_DEMO_VIDEOS = """
import sys, time
from pathlib import Path
from vidray.config import VidrayConfig
from vidray.data.prepare import ensure_demo_videos
videos, go = sys.argv[1], Path(sys.argv[2])
data = {"videos_dir": videos, "demo": {"classes": 2, "videos_per_class": 4, "seed": 7}}
cfg = VidrayConfig.model_validate({"data": data})
while not go.exists():
    time.sleep(0.005)
ensure_demo_videos(cfg.data)
"""


def test_runs_started_together_on_a_fresh_demo_share_one_set_of_videos(tmp_path):
    """Two sweeps started at once on a fresh machine both find no demo videos and both generate them:
    the second to finish used to fail on the first's folder (an OSError from its rename); now it keeps
    the first's set, checked like any existing set, and deletes its own."""
    videos, go = tmp_path / "videos", tmp_path / "go"
    runs = [
        subprocess.Popen([sys.executable, "-c", ENSURE_DEMO_VIDEOS, str(videos), str(go)], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    time.sleep(1.0)  # their imports
    go.touch()
    errors = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert len(list(videos.glob("*/*/*.mp4"))) == 8
    # No staging folder left; the settings the set was made with beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["go", settings_file(videos).name, "videos"])
