"""`ray job submit --working-dir . -- python jobs/tune.py` against a real Ray head (conftest.py's
`ray_head`, loopback only): the repository is uploaded as the job's working directory (its .venv,
gigabytes, must stay behind: .gitignore does that), `vidray` is imported from the upload, the
sweep runs end to end from video generation to the results table, and the dashboard reports it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_runs_the_sweep(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

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
    demo["run"].update(name="job", storage_path=str(tmp_path / "runs"), reports_dir=str(tmp_path / "reports"))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(demo, allow_unicode=True))

    ray = str(Path(sys.executable).parent / "ray")
    submission_id = f"vidray-tune-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [ray, "job", "submit", "--address", ray_head["dashboard_url"], "--working-dir", ".",
         "--submission-id", submission_id, "--",
         # Where the job's Python finds vidray, then the job itself, as the README runs it.
         "sh", "-c", f"python -c 'import vidray; print(\"vidray from\", vidray.__file__)' && "
         f"python jobs/tune.py --config {config}"],
        cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs[-6000:]

    client = JobSubmissionClient(ray_head["dashboard_url"])
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED
    job_logs = client.get_job_logs(submission_id)
    assert f"results table: {tmp_path / 'reports' / 'results.md'}" in job_logs
    summary = json.loads(job_logs.rstrip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["errored"] == 0 and summary["best"]["exported_model"]
    # The job imported vidray from the uploaded working directory, not from this checkout.
    info = client.get_job_info(submission_id)
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    imported_from = Path(job_logs.split("vidray from ", 1)[1].split()[0])
    assert "runtime_resources" in imported_from.parts and not imported_from.is_relative_to(REPO)
    rows = [line for line in (tmp_path / "reports" / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 and "MixUp α=0.4, lr=1e-3, wd=0.05" in rows[1]  # header + the trial

    # The dashboard's Jobs API answers for the job (with the cluster's token when auth is on).
    url = f"{ray_head['dashboard_url']}/api/jobs/{submission_id}"
    token = subprocess.run([ray, "get-auth-token"], env=ray_head["env"], capture_output=True, text=True).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        job = json.loads(response.read())
    assert job["submission_id"] == submission_id and job["status"] == "SUCCEEDED"
    assert "python jobs/tune.py --config" in job["entrypoint"]
