"""The GPU check (benchmarks/gpu_check.py) as the lent GPU machine's image will run it: no Ray, PyAV,
decord, torchcodec or wandb there. Its sections 1-3 must get past every import and run without them;
the CPU at toy sizes stands in for the GPU (their figures mean nothing here).

The packages are hidden from every process of the check (its section workers too) by
tests/gpu_image_site/sitecustomize.py on PYTHONPATH. benchmarks/gpu_dryrun.sh is the fuller
rehearsal: Python 3.12, the image's torch/transformers versions, the carried wheels installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("ray", "av", "decord", "torchcodec", "wandb")


def test_gpu_check_sections_run_without_ray_or_pyav(tmp_path):
    env = {
        **os.environ,
        "VIDRAY_HIDE_PACKAGES": ",".join(HIDDEN),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "gpu_image_site"), str(REPO)]),
        "OUT": str(tmp_path / "out"),
    }
    sections = ["environment", "vit_b", "device_ingest", "gpu_decode", "ray_train"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
         "--cache", str(tmp_path / "cache"), "--budget", "600", "--only", *sections],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Written under $OUT, as on the device machine.
    result = json.loads((tmp_path / "out" / "gpu_check_quick.json").read_text())
    ran = result["sections"]
    for name in ("environment", "vit_b", "device_ingest", "gpu_decode"):
        assert ran[name]["status"] == "ok", (name, ran[name].get("output_tail"))

    # The control: the one section that needs Ray fails for want of it, so the others really ran without it.
    assert ran["ray_train"]["status"] == "exit 1"
    assert "No module named 'ray'" in ran["ray_train"]["output_tail"]
    versions = ran["environment"]["result"]["versions"]
    assert all(versions[name] is None for name in HIDDEN), versions
    assert versions["torch"] and versions["transformers"]

    # Section 1: vidray's training step at both sides, a finite loss, the MFU inputs.
    for side in ("32", "48"):
        step = ran["vit_b"]["result"][side]
        assert step["loss_finite"] and step["timed_steps"] == 3 and step["train_gflops_per_clip"] > 0
    assert set(result["summary"]) >= {"vit_b@32", "vit_b@48"}

    # Section 2: the device cache holds the 16 train and 8 val clips of 8x37x37x3 (and their labels);
    # both paths deliver every full batch of 2 epochs.
    ingest = ran["device_ingest"]["result"]
    assert ingest["dataset"]["splits"]["train"] == 16
    assert ingest["load"]["bytes"] == (16 + 8) * (8 * 37 * 37 * 3 + 8)
    assert ingest["device_cache"]["clips"] == ingest["host_path"]["clips"] == 2 * 16

    # Section 3: nvjpeg needs CUDA; without torchvision (the project's venv) the section says so.
    decode = ran["gpu_decode"]["result"]
    assert "not measured" in decode["nvdec"]
    assert "nvjpeg" in decode or all("cpu_1thread" in v for v in decode.values() if isinstance(v, dict) and "frames" in v)
    # vidray's own jpeg-store path: the host decoder measured; the device one needs a batched JPEG decoder,
    # which this venv lacks (tests/test_device_decode.py runs that code through torchvision's CPU mode).
    store = decode["vidray_jpeg_store"]
    assert store["stored"] == [8, 37, 37, 3] and store["host_1thread_clips_per_s"] > 0
    assert store["device"].startswith("not measured: no batched JPEG decoder"), store


def test_a_section_that_overruns_is_killed_with_its_tree():
    """What bounds the check's time: a section process past its timeout dies with every process it started
    (a Ray cluster, on the machine), and the mandatory sections' limits fit the budget."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchlib
    import gpu_check

    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"
    code, _, _, seconds = gpu_check.run_bounded(["-c", script], timeout=2)
    assert code is None and seconds < 60
    assert not [pid for pid in benchlib.process_tree(os.getpid()) if pid != os.getpid() and "time.sleep(300)" in _cmdline(pid)]
    assert sum(s.max_s for s in gpu_check.SECTIONS if not s.optional) <= 400 - gpu_check.RESERVE_S
    assert [s.name for s in gpu_check.SECTIONS][-2:] == ["ray_train", "vit_b_compiled_224"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
