"""Outputs a `ray job submit --working-dir` job would lose: the job runs in a copy of the folder, under
.../runtime_resources/working_dir_files/, that Ray deletes when the job ends. No Ray: a folder named so stands in."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidray.config import load_config
from vidray.data.shard_files import inside_job_copy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def job_copy(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


def test_a_path_is_inside_the_copy_where_it_resolves_not_by_how_it_is_written(job_copy, tmp_path, monkeypatch):
    assert inside_job_copy("runs") and inside_job_copy("./data/ds") and inside_job_copy(str(job_copy / "runs"))
    assert not inside_job_copy(str(tmp_path / "runs"))  # absolute, outside the copy
    assert not inside_job_copy("../../outside")  # relative, resolving outside it
    assert not inside_job_copy("s3://bucket/runs") and not inside_job_copy("gs://bucket/runs")
    monkeypatch.chdir(tmp_path)  # a plain folder: relative paths are the user's own
    assert not inside_job_copy("runs")


def test_train_warns_of_an_absolute_output_path_inside_the_copy(job_copy, capsys):
    """`vidray train/pretrain/tune` decided by how the path was written (not starting with / or ~: relative), so
    run.storage_path=$PWD/runs in a job's copy was lost without a word, while the data stage, which resolves the
    path, warned of its dataset directory there. Both now ask vidray.data.shard_files.inside_job_copy."""
    from vidray.train.driver import warn_if_inside_a_job_copy

    shared = ["run.shared_filesystem=true", "data.dataset_dir=/data/ds"]
    warn_if_inside_a_job_copy(load_config(CONFIGS / "demo.yaml", [*shared, f"run.storage_path={job_copy / 'runs'}"]),
                              "vidray train")  # fmt: skip
    assert capsys.readouterr().err == (
        f"vidray train: warning: run.storage_path points into this job's working-directory copy ({job_copy}), which "
        "Ray deletes; use a path outside it (the default is ~/ray_results)\n"
    )
    warn_if_inside_a_job_copy(load_config(CONFIGS / "demo.yaml", [*shared, "run.storage_path=../../../../elsewhere"]),
                              "vidray train")  # fmt: skip
    assert capsys.readouterr().err == ""  # written relative, resolving outside the copy
