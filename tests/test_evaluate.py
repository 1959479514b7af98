"""`vidray evaluate` end to end on a real dataset directory (real H.264 videos -> Parquet shards)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from vidray.model.transforms import eval_transform
from vidray.model.checkpoint import save_checkpoint
from vidray.cli import main
from vidray.data.dataset import SHARD_SCHEMA, read_dataset_info, split_shards
from vidray.errors import UserError
from vidray.infer.evaluate import evaluate_checkpoint
from vidray.train.metrics import classification_metrics
from vidray.model.classifier import install_position_table
from vidray.infer.predict import predict_videos
from vidray.data.video import encode_mp4, read_clip

# "violet" has no videos at all: it must still get a row (support 0) everywhere.
CLASSES = ["red", "green", "blue", "violet"]
COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}
DATA = {"frames": 4, "size": 32, "stored_frames": 8, "stored_size": 40, "classes": CLASSES}
EVAL_CLIPS = 2


def _encode_videos(
    root: Path, split: str, per_class: int, rng: np.random.Generator, misleading: int = 0
) -> list[tuple[Path, int]]:
    """Noisy coloured clips with a bright bar sweeping across; the class is the colour, so a few
    steps of training separate them. The last ``misleading`` videos of each class wear the next
    class's colour, so an evaluation has real mistakes (off-diagonal cells) to count."""
    videos = []
    names = list(COLOURS)
    for c, name in enumerate(names):
        for k in range(per_class):
            colour = COLOURS[names[(c + 1) % len(names)]] if k >= per_class - misleading else COLOURS[name]
            frames = np.empty((10, 64, 80, 3), dtype=np.float32)
            frames[:] = np.array(colour) * rng.uniform(0.6, 1.0)
            frames += rng.normal(0, 45, size=frames.shape)
            for t in range(10):
                frames[t, :, (8 * t + 7 * k) % 72 : (8 * t + 7 * k) % 72 + 8] = 235
            path = encode_mp4(root / split / name / f"{name}_{k}.mp4", frames.clip(0, 255).astype(np.uint8))
            videos.append((path, CLASSES.index(name)))
    return videos


def _write_shard(path: Path, videos: list[tuple[Path, int]]) -> None:
    clips = [read_clip(p, DATA["stored_frames"], DATA["stored_size"]) for p, _ in videos]
    table = pa.table(
        {
            "video": [c.frames.tobytes() for c in clips],
            "label": [label for _, label in videos],
            "label_name": [CLASSES[label] for _, label in videos],
            "video_id": [p.stem for p, _ in videos],
            "path": [str(p) for p, _ in videos],
            "source_frames": [c.source_frames for c in clips],
            "padded": [c.padded for c in clips],
        },
        schema=SHARD_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_dataset_json(root: Path, classes: list[str], shards: list[str], counts: dict[str, int]) -> None:
    info = {
        "classes": classes,
        **{k: DATA[k] for k in ("frames", "size", "stored_frames", "stored_size")},
        "splits": {s: {"videos": counts.get(s, 0)} for s in ("train", "val", "test")},
        "shards": shards,
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset directory per vidray/data/dataset.py: val split in two shards, empty test split."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    train = _encode_videos(root / "videos", "train", 3, rng)
    val = _encode_videos(root / "videos", "val", 4, rng, misleading=1)
    out = root / "dataset"
    _write_shard(out / "train" / "shard-a.parquet", train)
    _write_shard(out / "val" / "shard-b.parquet", val[:5])
    _write_shard(out / "val" / "shard-c.parquet", val[5:])
    # A stray file that dataset.json does not list (a half-written shard of a killed run) is not read.
    (out / "val" / "shard-stale.parquet").write_bytes(b"PAR1 half written")
    shards = ["train/shard-a.parquet", "val/shard-b.parquet", "val/shard-c.parquet"]
    _write_dataset_json(out, CLASSES, shards, {"train": len(train), "val": len(val)})
    return {"dir": out, "train": train, "val": val}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> Path:
    """A tiny VideoMAE (interpolated position table, as a fine-tuned pretrained model has) trained
    briefly on the train split, written through the training code's own checkpoint writer."""
    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=DATA["size"], num_frames=DATA["frames"], patch_size=16, tubelet_size=2,
        id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
    )
    model = VideoMAEForVideoClassification(config)
    install_position_table(model, (4, 4, 4))
    clips = np.stack([read_clip(p, DATA["stored_frames"], DATA["stored_size"]).frames for p, _ in dataset["train"]])
    pixels = eval_transform(torch.from_numpy(clips), frames=DATA["frames"], size=DATA["size"])
    labels = torch.tensor([label for _, label in dataset["train"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    info = {
        "epoch": 1,
        "metrics": {"val_accuracy": 0.0},
        "data": DATA,
        "config": {"train": {"eval_clips": EVAL_CLIPS}},
    }
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_epoch_0001", model.eval(), training_state={}, info=info)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, checkpoint, dataset):
    out = tmp_path_factory.mktemp("eval")
    summary = evaluate_checkpoint(checkpoint, str(dataset["dir"]), split="val", out_dir=out, batch_size=3)
    return out, summary


def test_metrics_agree_with_predictions_and_direct_computation(evaluated, dataset):
    out, summary = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    # Every val video once, in shard order, with its true label.
    assert [r["path"] for r in rows] == [str(p) for p, _ in dataset["val"]]
    assert [r["label"] for r in rows] == [CLASSES[label] for _, label in dataset["val"]]

    y_true = [CLASSES.index(r["label"]) for r in rows]
    y_pred = [CLASSES.index(r["predicted"]) for r in rows]
    # The fixture is meant to give a matrix with both hits and misses; otherwise this proves little.
    assert 0 < sum(t == p for t, p in zip(y_true, y_pred)) < len(rows)
    direct = classification_metrics(y_true, y_pred, CLASSES)
    assert {k: metrics[k] for k in direct} == direct
    assert metrics["per_class"]["violet"]["support"] == 0
    assert metrics["split"] == "val" and metrics["eval_clips"] == EVAL_CLIPS and metrics["checkpoint_epochs_done"] == 2
    assert summary["files"]["metrics"] == str(out / "metrics.json")
    assert {k: v for k, v in summary.items() if k != "files"} == metrics


def test_evaluate_matches_predict_on_the_source_files(evaluated, checkpoint, dataset):
    # The shards were decoded from these files with the same read_clip parameters, so predict's path
    # (file -> read_clip -> eval_transform, eval_clips from the checkpoint) must give the same answers.
    out, _ = evaluated
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    predicted = predict_videos(checkpoint, [p for p, _ in dataset["val"]], top_k=1)
    assert [r["predictions"][0]["label"] for r in predicted] == [r["predicted"] for r in rows]
    assert [r["predictions"][0]["score"] for r in predicted] == pytest.approx(
        [float(r["confidence"]) for r in rows], abs=1e-4
    )


def test_per_class_report_and_confusion_png(evaluated):
    out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "per_class.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == CLASSES
    for row in table:
        expected = metrics["per_class"][row["class"]]
        assert float(row["f1"]) == pytest.approx(expected["f1"], abs=1e-4)
        assert float(row["precision"]) == pytest.approx(expected["precision"], abs=1e-4)
        assert float(row["recall"]) == pytest.approx(expected["recall"], abs=1e-4)
        assert int(row["support"]) == expected["support"]
    markdown = (out / "per_class.md").read_text()
    for name in CLASSES:
        assert f"| {name} | " in markdown
    assert f"| **macro avg** | {metrics['macro_precision']:.3f} |" in markdown

    import matplotlib.image

    png = out / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert height >= 400 and width >= 400


def test_a_downloaded_checkpoint_is_named_by_where_it_lives(checkpoint, dataset, tmp_path):
    """A sweep on a bucket evaluates a download of its best checkpoint: metrics.json named the scratch folder, which
    goes, and the figure's title ended in the URI's query ("localhost:9000&scheme=http")."""
    origin = "s3://KEY:SECRET@bucket/runs/t1/checkpoint_epoch_0003?endpoint_override=localhost%3A9000&scheme=http"
    metrics = evaluate_checkpoint(checkpoint, str(dataset["dir"]), split="val", out_dir=tmp_path / "eval", batch_size=8, origin=origin)
    assert metrics["checkpoint"] == "s3://bucket/runs/t1/checkpoint_epoch_0003?endpoint_override=localhost%3A9000&scheme=http"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"] == metrics["checkpoint"]


def test_the_frame_order_control_names_its_protocol(evaluated, checkpoint, dataset):
    """The control runs the validation view whatever the held-out evaluation used (tune.test_clips / test_crops):
    its result and its table in results.md say which, so its "in order" row is read against its own protocol (the
    console put a 5-clip, 3-crop accuracy beside a 1-clip shuffled one, unnamed)."""
    from vidray.infer.evaluate import frame_order_control
    from vidray.report.best_model import frame_order_markdown

    _, summary = evaluated
    control = frame_order_control(checkpoint, str(dataset["dir"]), "val", batch_size=3)
    assert control["protocol"] == summary["protocol"]  # the default view, as that evaluation's
    assert control["in_order_accuracy"] == pytest.approx(summary["accuracy"])
    assert f"Protocol: {control['protocol']} per video (the validation view)." in "\n".join(frame_order_markdown(control))


def test_a_class_name_with_a_bar_stays_one_cell_of_per_class_md():
    from vidray.infer.evaluate import per_class_markdown

    row = {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 1}
    metrics = {"per_class": {"cats | dogs": row, "birds": row}, "num_samples": 2, "accuracy": 0.5,
               "macro_precision": 0.5, "macro_recall": 1.0, "macro_f1": 0.667}  # fmt: skip
    lines = per_class_markdown(metrics).splitlines()
    assert lines[2] == r"| cats \| dogs | 0.500 | 1.000 | 0.667 | 1 |"
    assert {line.replace(r"\|", "").count("|") for line in lines} == {6}  # five cells on every row


def test_reads_unlisted_shards_when_dataset_json_has_no_list(tmp_path, checkpoint, dataset, evaluated):
    copy = tmp_path / "dataset"
    shutil.copytree(dataset["dir"], copy)
    (copy / "val" / "shard-stale.parquet").unlink()
    info = json.loads((copy / "dataset.json").read_text())
    del info["shards"]
    (copy / "dataset.json").write_text(json.dumps(info))
    # Every Parquet file of the split folder, sorted: what both reads take (and what sizes Ray's footer readers).
    _, shards = split_shards(str(copy), read_dataset_info(str(copy)), "val")
    assert shards == sorted(str(p) for p in (copy / "val").glob("*.parquet")) and shards
    metrics = evaluate_checkpoint(checkpoint, str(copy), split="val", out_dir=tmp_path / "eval", batch_size=8)
    assert metrics["confusion"] == evaluated[1]["confusion"]


def test_cli_evaluate_prints_json_summary(checkpoint, dataset, tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(dataset["dir"]), "--out", str(tmp_path), "--batch-size", "16"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == len(dataset["val"]) and (tmp_path / "confusion_matrix.png").is_file()


def test_clear_errors(checkpoint, dataset, tmp_path, capsys):
    data_dir = str(dataset["dir"])

    with pytest.raises(UserError, match=r"does not exist or is not a directory"):
        evaluate_checkpoint(tmp_path / "nope", data_dir, out_dir=tmp_path / "o")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoint, no_weights)
    (no_weights / "model" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"model holds no model\.safetensors: the checkpoint is incomplete"):
        evaluate_checkpoint(no_weights, data_dir, out_dir=tmp_path / "o")

    no_info = tmp_path / "no_info"
    shutil.copytree(checkpoint, no_info)
    (no_info / "vidray.json").unlink()
    with pytest.raises(UserError, match=r"is not a vidray checkpoint or export: vidray\.json is missing"):
        evaluate_checkpoint(no_info, data_dir, out_dir=tmp_path / "o")

    with pytest.raises(UserError, match=r"split 'test' of .* holds no videos \(splits with videos: train, val\)"):
        evaluate_checkpoint(checkpoint, data_dir, split="test", out_dir=tmp_path / "o")

    with pytest.raises(UserError, match=r"no dataset\.json in"):
        evaluate_checkpoint(checkpoint, str(tmp_path / "missing_dataset"), out_dir=tmp_path / "o")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match=r"no dataset\.json in"):  # was a NotADirectoryError traceback
        evaluate_checkpoint(checkpoint, str(a_file), out_dir=tmp_path / "o")
    # --out that cannot be a folder is refused before the split is evaluated, not after (a FileExistsError then).
    with pytest.raises(UserError, match=rf"cannot write the reports to {a_file} \(File exists\); pass --out a writable"):
        evaluate_checkpoint(checkpoint, data_dir, out_dir=a_file)

    other = tmp_path / "other_classes"
    shutil.copytree(dataset["dir"], other)
    info = json.loads((other / "dataset.json").read_text())
    info["classes"] = ["green", "red", "blue", "violet"]  # same names, another order: labels would be wrong
    (other / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"classes \['green', 'red', 'blue', 'violet'\] do not match the checkpoint's labels"):
        evaluate_checkpoint(checkpoint, str(other), out_dir=tmp_path / "o")

    # A raw clip of the wrong size (a shard rewritten by hand, a store read with another dataset.json): one line
    # naming the video and the fix, once (it read "video blob of N bytes does not match shape ...", no video). The
    # evaluation leaves it out, as validation does (test_a_damaged_stored_clip_is_left_out_...); the line is the same.
    short = tmp_path / "short_clip"
    shutil.copytree(dataset["dir"], short)
    shard = short / "val" / "shard-c.parquet"
    table = pq.read_table(shard)
    videos = table.column("video").to_pylist()
    videos[1] = videos[1][:-3]
    pq.write_table(table.set_column(table.column_names.index("video"), "video", pa.array(videos, pa.binary())), shard)
    (left_out,) = evaluate_checkpoint(checkpoint, str(short), out_dir=tmp_path / "o")["left_out"]
    victim = table.column("video_id")[1].as_py()
    assert left_out.startswith(f"stored clip of video {victim}: video blob of ")
    assert left_out.count("decode its shard again") == 1 and "re-run" not in left_out
    capsys.readouterr()

    # Through the CLI: one line on stderr, exit 2, nothing written.
    rc = main(["evaluate", "--checkpoint", str(no_weights), "--data", data_dir, "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("vidray evaluate: error: ") and "model.safetensors" in err[-1]
    assert not (tmp_path / "cli").exists()


def test_a_confusion_matrix_of_coins_180_tasks_stays_a_figure_a_person_opens(tmp_path):
    """Half an inch per class made COIN's 180 tasks an 11,000 px square (50 s, 4.8 GB to draw); the side is
    capped and the class names shrink to fit their rows (7 pt at 180)."""
    import matplotlib.image

    from vidray.figures import DPI
    from vidray.infer.evaluate import CONFUSION_MAX_INCHES, plot_confusion

    k = 180
    confusion = np.random.default_rng(0).integers(0, 3, (k, k)) + 20 * np.eye(k, dtype=int)
    png = plot_confusion(confusion, [f"task {i}" for i in range(k)], tmp_path / "confusion.png", title="test")
    height, width, _ = matplotlib.image.imread(png).shape
    assert height <= CONFUSION_MAX_INCHES * DPI and width <= (CONFUSION_MAX_INCHES + 1) * DPI


def test_a_damaged_stored_clip_is_left_out_and_named_as_validation_leaves_it(tmp_path, checkpoint, dataset, evaluated, capsys):
    """Training's validation leaves a stored clip that fails its check out (vidray/train/rows.py); the evaluation
    stopped on it, so a sweep that finished around one could not write its report, nor any rerun. It is left
    out now, counted and named, and the other videos are scored as before."""
    copy = tmp_path / "dataset"
    shutil.copytree(dataset["dir"], copy)
    shard = copy / "val" / "shard-c.parquet"
    table = pq.read_table(shard)
    videos = table.column("video").to_pylist()
    videos[0] = videos[0][:100]  # a raw clip cut short: not the stored shape
    pq.write_table(table.set_column(0, "video", pa.array(videos, pa.binary())), shard)
    damaged = table.column("video_id")[0].as_py()

    metrics = evaluate_checkpoint(checkpoint, str(copy), split="val", out_dir=tmp_path / "eval", batch_size=3)
    assert metrics["num_samples"] == len(dataset["val"]) - 1
    assert len(metrics["left_out"]) == 1 and metrics["left_out"][0].startswith(f"stored clip of video {damaged}: ")
    assert f"vidray evaluate: 1 stored clip(s) of split 'val' left out, as training's validation leaves them: " \
           f"stored clip of video {damaged}" in capsys.readouterr().err  # fmt: skip
    def guesses(path) -> dict[str, str]:
        with open(path) as f:
            return {row["video_id"]: row["predicted"] for row in csv.DictReader(f)}

    scored = guesses(metrics["files"]["predictions"])
    assert damaged not in scored and scored == {k: v for k, v in guesses(evaluated[1]["files"]["predictions"]).items() if k != damaged}
