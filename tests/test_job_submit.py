"""`ray job submit --working-dir . -- python jobs/tune.py` against a real Ray head on loopback, as the
README runs it: the repository is uploaded as the job's working directory (its .venv, gigabytes, must
stay behind: .gitignore does that), `vidray` is imported from the upload, the sweep runs end to end
from video generation to the results table, the dashboard reports it, and the results are where the
summary line says, at absolute paths that outlive the job, its working-directory copy and the cluster."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import loopback_head

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray  # a head of its own, with token authentication
def test_ray_job_submit_runs_the_sweep_and_its_results_outlive_the_cluster(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    home = tmp_path / "home"  # the user's ~ as the cluster sees it: the default run.storage_path is ~/ray_results
    home.mkdir()
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    demo["data"].update(
        videos_dir=str(tmp_path / "videos"),
        manifest=str(tmp_path / "manifest.parquet"),
        dataset_dir=str(tmp_path / "dataset"),
        frames=4,
        size=32,
        stored_frames=8,
        stored_size=36,
        demo={"classes": 2, "videos_per_class": 6, "seed": 3},
    )
    demo["train"].update(epochs=1, batch_size=4, warmup_epochs=0)
    demo["tune"].update(mixup_alpha=[0.4], asha=False)  # one trial: sweeps are tested in test_tune.py
    demo["run"]["name"] = "job"
    assert demo["run"]["storage_path"] == "~/ray_results" and demo["run"]["reports_dir"] is None  # the defaults
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(demo, allow_unicode=True))

    ray = str(Path(sys.executable).parent / "ray")
    submission_id = f"vidray-tune-{uuid.uuid4().hex[:8]}"
    # The cluster runs as cluster.yaml runs it: token authentication on (conftest turns it off for
    # every other test cluster). `ray job submit` carries the token through the environment.
    token = secrets.token_hex(16)
    with loopback_head(tmp_path, {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as head:
        submit = subprocess.run(
            [ray, "job", "submit", "--address", head["dashboard_url"], "--working-dir", ".",
             "--submission-id", submission_id, "--",
             # Where the job's Python finds vidray, then the job itself, as the README runs it.
             "sh", "-c", f"python -c 'import vidray; print(\"vidray from\", vidray.__file__)' && "
             f"python jobs/tune.py --config {config}"],
            cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0, logs[-6000:]

        client = JobSubmissionClient(head["dashboard_url"], headers={"Authorization": f"Bearer {token}"})
        assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED
        job_logs = client.get_job_logs(submission_id)
        # The job imported vidray from the uploaded working directory, not from this checkout.
        info = client.get_job_info(submission_id)
        assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
        imported_from = Path(job_logs.split("vidray from ", 1)[1].split()[0])
        assert "runtime_resources" in imported_from.parts and not imported_from.is_relative_to(REPO)
        assert imported_from.is_relative_to(head["temp_dir"])

        # The dashboard's Jobs API refuses a request without the cluster's token (or with a wrong one)
        # and answers one that carries it.
        url = f"{head['dashboard_url']}/api/jobs/{submission_id}"
        for headers in ({}, {"Authorization": f"Bearer {secrets.token_hex(16)}"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert refused.value.code in (401, 403), refused.value
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            job = json.loads(response.read())
        assert job["submission_id"] == submission_id and job["status"] == "SUCCEEDED"
        assert "python jobs/tune.py --config" in job["entrypoint"]

    # The job, its working-directory copy and the whole cluster are gone...
    assert not Path(head["temp_dir"]).exists() and not imported_from.exists()
    # ...and everything the summary line points at is still there, at absolute paths under ~/ray_results.
    summary = json.loads(job_logs.rstrip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["errored"] == 0
    experiment = home / "ray_results" / "job"
    assert summary["experiment_path"] == str(experiment)
    assert summary["reports_dir"] == str(experiment / "reports")
    for key in ("results_md", "results_csv", "results_json"):
        assert Path(summary[key]).is_absolute() and Path(summary[key]).is_file(), key
        assert Path(summary[key]).parent == experiment / "reports"
    assert f"results table: {experiment / 'reports' / 'results.md'}" in job_logs
    rows = [line for line in Path(summary["results_md"]).read_text().splitlines() if line.startswith("| ")]
    assert "MixUp α=0.4, lr=1e-3, wd=0.05" in "\n".join(rows)
    best_model = Path(summary["best"]["exported_model"])
    assert best_model.is_relative_to(experiment) and (best_model / "model.safetensors").is_file()
    assert (best_model / "README.md").is_file()  # the model card
    assert list((experiment / "train_runs").glob("*/checkpoint_epoch_0000/model/model.safetensors"))
