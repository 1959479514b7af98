"""Storage paths: local vs s3:// / gs://, the multi-node shared-storage check, and scratch folders.

The refusal on a real multi-node cluster (two `ray start` nodes) is exercised in
tests/test_multinode.py; here the node count is passed explicitly, plus one
check against the real single-node session cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import web_server

from vidray.cluster import cluster_summary, shared_storage_paths
from vidray.config import RunSettings, VidrayConfig, load_config
from vidray.errors import UserError
from vidray.storage import (
    NETWORK_FILESYSTEMS,
    DownloadError,
    check_storage_for_cluster,
    is_uri,
    is_web_url,
    listed_object_uri,
    local_file,
    local_mirror,
    local_part,
    join_uri,
    mount_fstype,
    open_filesystem,
    remove_orphaned_scratch,
    resolve_path,
    scratch,
    scratch_dir,
)
from vidray.train.follow import EpochFollower, tracking_dir
from vidray.train.runs import open_run, run_folder


def test_local_paths_round_trip_through_pyarrow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, root = open_filesystem("runs/exp")
    assert isinstance(fs, pa.fs.LocalFileSystem) and root == str(tmp_path / "runs" / "exp")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `--out '~/exp'`: the home's folder, as resolve_path reads it
    assert open_filesystem("~/exp")[1] == resolve_path("~/exp") == str(tmp_path / "home" / "exp")
    fs.create_dir(root)
    pq.write_table(pa.table({"x": [1, 2]}), join_uri(root, "a.parquet"), filesystem=fs)
    assert pq.read_table(str(tmp_path / "runs" / "exp" / "a.parquet")).column("x").to_pylist() == [1, 2]


def test_a_video_at_a_url_is_downloaded_for_its_decoder_and_a_failed_download_says_why(tmp_path):
    """http(s):// videos (what transformers' pipeline also takes) are read from a local copy that goes with the
    block; a 404 is a missing video, a server that does not answer a failed download; neither is a filesystem."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "clip.mp4").write_bytes(b"\x00video bytes" * 1000)
    with web_server(tmp_path / "site") as base:
        assert is_web_url(f"{base}/clip.mp4") and is_web_url("HTTPS://example.org/a.mp4") and not is_web_url("s3://b/k")
        with local_file(f"{base}/clip.mp4?signature=abc") as copy:
            assert copy.endswith(".mp4") and Path(copy).read_bytes() == (tmp_path / "site" / "clip.mp4").read_bytes()
        assert not Path(copy).exists()  # gone with the block
        with pytest.raises(DownloadError, match=r"^download failed: HTTP 404 ") as missing:
            with local_file(f"{base}/gone.mp4"):
                pass
        assert missing.value.missing
    with pytest.raises(DownloadError, match="^download failed: .*refused") as refused:
        with local_file(f"{base}/clip.mp4"):  # the server is down now
            pass
    assert not refused.value.missing
    with pytest.raises(UserError, match=r"^https://example.org/videos: not a folder or storage vidray can read or write"):
        open_filesystem("https://example.org/videos")


def test_an_object_keeps_what_opening_its_folder_took_and_a_file_uri_is_decoded(tmp_path):
    """Listing s3://videos/day1?endpoint_override=... (MinIO, Ceph) gave rows of plain s3://videos/day1/a.mp4, which
    went to AWS instead: every video failed to download. A file:// URI is percent-encoded
    (Path.as_uri() writes a space as %20, which pyarrow decodes); the decoder looked for "my%20clip.mp4". A URI that
    pyarrow cannot open at all (ftp://) was an exception out of the decode task, filed as a worker crash."""
    minio = "s3://KEY:SECRET@videos/day1?endpoint_override=127.0.0.1:9000&scheme=http&session_token=T"
    # The keys stay out: the URI names the video in predictions.parquet; pyarrow reads keys from the environment too.
    assert listed_object_uri(minio, "videos/day1/a.mp4") == "s3://videos/day1/a.mp4?endpoint_override=127.0.0.1%3A9000&scheme=http"
    # A key is percent-encoded, as pyarrow decodes it (what it parses raw stays raw): see the test below.
    assert listed_object_uri("gs://videos/day1", "videos/day1/b c.mp4") == "gs://videos/day1/b%20c.mp4"
    assert listed_object_uri("gs://videos/day1", "videos/day1/a+b=1,c.mp4") == "gs://videos/day1/a+b=1,c.mp4"
    video = tmp_path / "my clip.mp4"
    video.write_bytes(b"bytes")
    assert local_part(video.as_uri()) == str(video) and local_part(str(video)) == str(video) and local_part(minio) is None
    with local_file(video.as_uri()) as local:
        assert Path(local).read_bytes() == b"bytes"
    with pytest.raises(DownloadError, match="^download failed: ftp://host/a.mp4: not a folder or storage vidray can read") as ftp:
        with local_file("ftp://host/a.mp4"):
            pass
    assert not ftp.value.missing


def test_an_object_listed_with_a_space_or_a_question_mark_in_its_name_is_the_one_read(tmp_path):
    """A folder on a bucket listed "day1/b c.mp4": its URI "s3://videos/day1/b c.mp4" was no URI pyarrow could parse
    (the video download_failed on every run); "day1/b?c.mp4" lost "?c.mp4" (another object, or none, was read). The
    key is percent-encoded now, and pyarrow decodes it back. A real pyarrow S3 client, on a server on loopback."""
    names = ["b c.mp4", "vidéo.mp4", "100%.mp4", "b?c#d.mp4", "b%20c.mp4"]
    for i, name in enumerate(names):
        (tmp_path / "videos" / "day1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / "day1" / name).write_bytes(b"video %d" % i)
    with web_server(tmp_path) as base:
        folder = f"s3://K:S@videos/day1?endpoint_override={base.removeprefix('http://')}&scheme=http&region=us-east-1"
        for i, name in enumerate(names):
            uri = listed_object_uri(folder, f"videos/day1/{name}")
            assert open_filesystem(uri)[1] == f"videos/day1/{name}"
            with local_file(uri) as local:
                assert Path(local).read_bytes() == b"video %d" % i, name
    # A local folder's listing, as a file:// URI: the same path back.
    listed = str(tmp_path / "videos" / "day1" / "b?c#d.mp4")
    assert open_filesystem(listed_object_uri(tmp_path.as_uri(), listed))[1] == listed
    assert local_part(listed_object_uri(tmp_path.as_uri(), listed)) == listed


def test_a_json_file_the_store_refuses_to_give_is_an_error_not_an_absent_file(tmp_path):
    """read_json read every OSError as "no such file": a bucket's access denied or a network error made a run's
    lock look free (`--restart` went on to delete a live run) and its marker absent (rewritten without what it
    held). A real pyarrow S3 client on a server on loopback: a missing key is None, a refused one an error."""
    from vidray.storage import read_json

    (tmp_path / "bucket" / "runs").mkdir(parents=True)
    (tmp_path / "bucket" / "runs" / "lock.json").write_text('{"pid": 1}')
    refusing: dict = {}
    with web_server(tmp_path, refusing=refusing) as base:
        folder = f"s3://K:S@bucket/runs/{{}}?endpoint_override={base.removeprefix('http://')}&scheme=http&region=us-east-1"
        assert read_json(folder.format("lock.json")) == {"pid": 1}
        assert read_json(folder.format("absent.json")) is None
        refusing["status"] = 403
        with pytest.raises(UserError, match=r"^bucket/runs/lock.json: cannot read it \(.*ACCESS_DENIED.*\): check the storage"):
            read_json(folder.format("lock.json"))


def test_uris_are_joined_with_slashes_and_kept_verbatim():
    assert is_uri("s3://bucket/runs") and is_uri("gs://bucket/x") and not is_uri("/data/runs")
    assert join_uri("s3://bucket/runs/", "trial", "ckpt") == "s3://bucket/runs/trial/ckpt"
    assert join_uri("/data/runs", "trial") == os.path.join("/data/runs", "trial")
    assert resolve_path("gs://bucket/runs") == "gs://bucket/runs"
    # An S3-compatible store (MinIO, Ceph) is named by its query, which stays at the end, where pyarrow reads it:
    # the name came after it, and every run.name was refused as not inside run.storage_path.
    minio = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert join_uri(minio, "demo", "x") == "s3://bucket/runs/demo/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    from vidray.train.runs import run_folder

    assert run_folder(minio, "demo") == "s3://bucket/runs/demo?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


def test_local_paths_are_made_absolute_for_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("runs") == str(tmp_path / "runs")
    assert resolve_path("~/runs") == os.path.join(os.path.expanduser("~"), "runs")
    assert check_storage_for_cluster("runs", "run.storage_path", num_nodes=1) == str(tmp_path / "runs")
    assert check_storage_for_cluster("file://" + str(tmp_path), "run.storage_path", num_nodes=1) == str(tmp_path)


@pytest.mark.parametrize("uri", ["s3://bucket/vidray/runs", "gs://bucket/vidray/runs"])
def test_object_store_uris_pass_on_any_cluster(uri):
    assert check_storage_for_cluster(uri, "run.storage_path", num_nodes=8) == uri


@pytest.mark.parametrize(
    ("path", "key"),
    [("runs", "run.storage_path"), ("data/demo/dataset", "data.dataset_dir"), ("file:///tmp/runs", "run.storage_path")],
)
def test_node_local_paths_are_refused_on_multi_node_clusters(path, key):
    with pytest.raises(UserError) as err:
        check_storage_for_cluster(path, key, num_nodes=3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: {path!r} is a node-local path")
    assert "has 3 nodes" in message
    assert "s3://bucket/path" in message and "gs://bucket/path" in message
    assert "run.shared_filesystem=true" in message


def test_a_flag_is_refused_with_the_flag_that_vouches_for_it():
    """`vidray preprocess --out` has no run.shared_filesystem to set: its refusal names its own --shared-filesystem."""
    with pytest.raises(UserError, match=r"^--out: 'ds' is a node-local path .* and pass --shared-filesystem$"):
        check_storage_for_cluster("ds", "--out", num_nodes=2)
    assert "--shared-filesystem" in subprocess.run([sys.executable, "-m", "vidray", "preprocess", "--help"],
                                                   capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_shared_filesystem_opt_in_accepts_a_local_path(tmp_path):
    path = str(tmp_path / "nfs" / "runs")
    assert check_storage_for_cluster(path, "run.storage_path", shared_filesystem=True, num_nodes=4) == path


def test_mount_fstype_reads_the_real_mount_table(tmp_path):
    if not os.path.exists("/proc/mounts") or shutil.which("findmnt") is None:
        pytest.skip("needs Linux /proc/mounts and findmnt")
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert mount_fstype(str(tmp_path)) == expected
    # A path that does not exist yet (a fresh runs/ dir) belongs to its parent's mount.
    assert mount_fstype(str(tmp_path / "not" / "yet")) == expected


def test_mount_fstype_picks_the_deepest_mount_and_unescapes_spaces(tmp_path):
    # The /proc/mounts format: device, mount point (spaces as \040), type, options, dump, pass.
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/root / ext4 rw 0 0\n"
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0\n"
        "10.0.0.2:/share /mnt/team\\040data nfs rw 0 0\n"
        "tmpfs /mnt/efs/scratch tmpfs rw 0 0\n"
    )
    assert mount_fstype("/mnt/efs/vidray/runs", str(mounts)) == "nfs4"
    assert mount_fstype("/mnt/efs/scratch/x", str(mounts)) == "tmpfs"
    assert mount_fstype("/mnt/team data/runs", str(mounts)) == "nfs"
    assert mount_fstype("/mnt/efsx", str(mounts)) == "ext4"
    assert mount_fstype("/x", str(tmp_path / "no-such-file")) is None
    assert {"nfs", "nfs4", "lustre"} <= NETWORK_FILESYSTEMS and "ext4" not in NETWORK_FILESYSTEMS


def test_single_node_session_cluster_accepts_local_paths(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = cluster_summary()
    assert summary["nodes"] == 1 and summary["CPU"] >= 1
    cfg = load_config(None, ["run.storage_path=runs", "data.dataset_dir=s3://bucket/dataset"])
    storage_path, dataset_dir = shared_storage_paths(cfg)
    assert storage_path == str(tmp_path / "runs")
    assert dataset_dir == "s3://bucket/dataset"


def test_shared_filesystem_is_a_config_key():
    assert load_config(None).run.shared_filesystem is False
    assert load_config(None, ["run.shared_filesystem=true"]).run.shared_filesystem is True


# ------------------------------------------------------------------ scratch folders of killed processes

MAKE_SCRATCH = """
import time
from vidray.storage import scratch_dir
path = scratch_dir("ckpt")
open(path + "/model.safetensors", "wb").write(b"weights")
print(path, flush=True)
time.sleep(600)
"""


def start_scratch_maker(tmp_path) -> tuple[subprocess.Popen, str]:
    """A real process that made a scratch folder (a file in it) and now waits to be killed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", MAKE_SCRATCH], env=env, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_killed_process_scratch_folder_is_removed_by_the_next_one_and_no_other(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    killed, killed_dir = start_scratch_maker(tmp_path)
    alive, alive_dir = start_scratch_maker(tmp_path)
    try:
        killed.kill()  # SIGKILL: no cleanup runs, as for a worker of a lost node or a dead driver
        killed.wait()
        assert os.path.isfile(os.path.join(killed_dir, "model.safetensors"))
        elsewhere = tmp_path / "vidray-ckpt-another-host-1-abc"  # another container's, sharing /tmp
        unnamed = tmp_path / "vidray-ckpt-l3u1xf5v"  # not made by scratch_dir (an older vidray's)
        for folder in (elsewhere, unnamed):
            folder.mkdir()
        with scratch("ckpt") as mine:
            assert os.path.dirname(mine) == str(tmp_path) and f"-{os.getpid()}-" in os.path.basename(mine)
            assert not os.path.exists(killed_dir)
            assert os.path.isfile(os.path.join(alive_dir, "model.safetensors"))  # its process still runs
            assert elsewhere.is_dir() and unnamed.is_dir()
        assert not os.path.exists(mine)
    finally:
        alive.kill()
        alive.wait()
    assert remove_orphaned_scratch() == [alive_dir]


def test_scratch_kinds_are_plain_words():
    with pytest.raises(ValueError, match="lower-case letters only"):
        scratch_dir("ckpt-1")


# ------------------------------------------------------------------ a bucket run's files on the driver's machine


def test_a_bucket_runs_local_files_have_a_folder_of_their_own(tmp_path, monkeypatch):
    """TensorBoard events, wandb/ and a sweep's reports are local files, so a run on a bucket keeps them on the
    driver's machine: in a folder derived from its whole URI, not in ~/ray_results/<name>, which is also the folder
    of a local run of the same name (the default storage path) and of that name on every other bucket."""
    monkeypatch.setenv("HOME", str(tmp_path))
    results = tmp_path / "ray_results"
    bucket = "s3://my-bucket/team/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    on_bucket, local = RunSettings(name="demo", storage_path=bucket), RunSettings(name="demo")
    mirror = results / "s3" / "my-bucket" / "team" / "runs" / "demo"
    assert on_bucket.reports_path() == mirror / "reports"  # the query (an S3-compatible store's endpoint) left out
    assert local.reports_path() == results / "demo" / "reports"  # a local run's own folder, as before
    # Each command's tracking folder (from the run's URI) is the folder its reports default to (from storage and name).
    assert tracking_dir(run_folder(bucket, "demo")) == mirror == on_bucket.reports_path().parent
    local_run = run_folder(resolve_path(local.storage_path), "demo")
    assert tracking_dir(local_run) == results / "demo" == local.reports_path().parent
    # A pretraining run (<name>-pretrain) has its own, beside it.
    pretrain = RunSettings(name="demo-pretrain", storage_path=bucket)
    assert tracking_dir(run_folder(bucket, "demo-pretrain")) == pretrain.reports_path().parent
    assert pretrain.reports_path().parent == mirror.parent / "demo-pretrain"
    # Another bucket, prefix or scheme with the same run name: another folder each.
    others = ["s3://other-bucket/team/runs", "s3://my-bucket/other/runs", "s3://my-bucket/team", "gs://my-bucket/team/runs",
              f"local://{tmp_path}/team/runs", "hdfs://namenode:8020/team/runs"]  # fmt: skip
    folders = {local_mirror(uri, "demo") for uri in others} | {mirror, results / "demo"}
    assert len(folders) == len(others) + 2
    assert all(folder.is_relative_to(results) for folder in folders)
    # file:// is a local path (as the drivers give it to Ray): the run's own folder, as for a plain path.
    assert local_mirror(f"file://{tmp_path}/team/runs", "demo") == local_mirror(f"{tmp_path}/team/runs", "demo")
    assert local_mirror(f"file://{tmp_path}/team/runs", "demo") == tmp_path / "team" / "runs" / "demo"
    # The same run however its URI is spelled; no credentials in a folder name, nothing outside ~/ray_results/<scheme>.
    assert local_mirror("s3://my-bucket/team/runs/", "demo") == local_mirror("s3://my-bucket/team/runs/demo") == mirror
    assert local_mirror("s3://KEY:SECRET@my-bucket/team/runs", "demo") == mirror
    assert local_mirror("s3://my-bucket/../../../../etc", "demo") == results / "s3" / "my-bucket" / "etc" / "demo"


def test_restart_of_a_bucket_run_clears_its_local_folder_and_no_other(tmp_path, monkeypatch):
    """--restart deletes a bucket run's folder and its local one with it (the restarted run's TensorBoard curves
    would otherwise be drawn beside the deleted run's, for the same epochs); a local run of the same name keeps
    its files, and a refused --restart deletes nothing."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "bucket").mkdir()
    bucket = f"local://{tmp_path / 'bucket'}"  # a URI pyarrow reads from the local disk: the code path of s3:// and gs://
    local_storage = resolve_path("~/ray_results")

    def train_once(storage: str, restart: bool = False) -> tuple[str, Path]:
        """What a run's driver leaves on this machine: TensorBoard events (EpochFollower's) and a report."""
        folder, _ = open_run("train", "train", storage, "demo", restart=restart, state_of=lambda _: "new", finished_note="")
        with EpochFollower(folder, VidrayConfig(), command="vidray train", name="demo", line=lambda metrics, epochs: ""):
            pass
        reports = RunSettings(name="demo", storage_path=storage).reports_path()
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "results.md").write_text(f"results of {folder}")
        return folder, tracking_dir(folder)

    local_folder, local_tracking = train_once(local_storage)
    assert local_tracking == Path(local_storage) / "demo"
    local_files = sorted(p.relative_to(local_tracking) for p in local_tracking.rglob("*"))
    assert Path("tensorboard") in local_files and Path("reports/results.md") in local_files
    folder, mirror = train_once(bucket)
    assert mirror != local_tracking and list((mirror / "tensorboard").iterdir())  # the old run's events

    open_run("train", "train", bucket, "demo", restart=True, state_of=lambda _: "new", finished_note="")
    assert not mirror.exists()  # its TensorBoard events and reports went with the run
    assert sorted(p.name for p in (tmp_path / "bucket" / "demo").iterdir()) == ["vidray_run.json"]  # marked anew
    assert sorted(p.relative_to(local_tracking) for p in local_tracking.rglob("*")) == local_files  # untouched
    assert mirror.parent.is_dir()  # only the run's own folder is deleted, not the prefix's

    # A --restart refused (a bucket folder vidray did not write) deletes nothing, here or there.
    (tmp_path / "bucket" / "foreign").mkdir()
    (tmp_path / "bucket" / "foreign" / "keep.txt").write_text("not vidray's")
    foreign_mirror = local_mirror(bucket, "foreign")
    foreign_mirror.mkdir(parents=True)
    (foreign_mirror / "keep.txt").write_text("kept")
    with pytest.raises(UserError, match="not written by vidray"):
        open_run("train", "train", bucket, "foreign", restart=True, state_of=pytest.fail, finished_note="")
    assert (foreign_mirror / "keep.txt").is_file() and (tmp_path / "bucket" / "foreign" / "keep.txt").is_file()


def test_json_text_is_json_every_parser_reads():
    """A diverged trial's NaN loss went into results.json as NaN, which is not JSON (jq and JSON.parse refuse it)."""
    from vidray.storage import json_text

    text = json_text({"loss": float("nan"), "history": [{"val_loss": float("inf")}, {"val_loss": 0.5}], "n": 3, "p": Path("/x")})
    assert json.loads(text, parse_constant=pytest.fail) == {"loss": None, "history": [{"val_loss": None}, {"val_loss": 0.5}], "n": 3, "p": "/x"}
