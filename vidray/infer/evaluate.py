"""Evaluate a checkpoint on one split of a preprocessed dataset.

By default the views are the ones training validated with (evenly spaced
frames, centre crop, ``train.eval_clips`` clips averaged in logit space), so
the numbers agree with the ``val_*`` metrics the checkpoint was saved with;
``clips`` x ``crops`` (:class:`vidray.model.inference.Views`, e.g. 5 x 3 as published
numbers use) change that, and ``metrics.json`` names the protocol of its numbers.
The split is read shard by shard with plain pyarrow: evaluation is one
process, and a split of stored clips fits through it quickly.

Writes into ``out_dir``:

* ``metrics.json``: :func:`vidray.train.metrics.metrics_from_confusion` plus what was evaluated
* ``per_class.csv`` and ``per_class.md``: precision, recall, F1, support per class
* ``confusion_matrix.png``: rows normalised to recall, raw counts annotated
* ``predictions.csv``: video_id, path, true and predicted label, confidence
"""

from __future__ import annotations

import csv
import logging
import posixpath
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vidray.data.dataset import read_dataset_info, read_split_batches, videos_from_bytes
from vidray.data.store import StoredClipError, clip_name
from vidray.errors import UserError
from vidray.figures import (
    LABEL_CHARS, SEQUENTIAL_CMAP, fit_label, new_figure, save_figure, text_inches, tick_label_lines, wrap_to_width,
)  # fmt: skip
from vidray.model.checkpoint import clip_shape_of, eval_clips_of
from vidray.model.classifier import load_trained_model, to_device
from vidray.model.inference import Views, clip_outputs, inference_device
from vidray.storage import json_text, without_credentials
from vidray.train.metrics import confusion_matrix, metrics_from_confusion

logger = logging.getLogger(__name__)

# Annotate confusion-matrix cells with counts up to this many classes; beyond, the text is unreadable.
ANNOTATE_MAX_CLASSES = 30
CONFUSION_MAX_INCHES = 30.0  # 3,600 px at vidray.figures.DPI


def _check_compatible(shape, dataset, dataset_dir: str, split: str, checkpoint: Path) -> None:
    if list(dataset.classes) != list(shape.classes):
        raise UserError(
            f"{dataset_dir}/dataset.json classes {dataset.classes} do not match the checkpoint's labels "
            f"{shape.classes} ({checkpoint}); evaluate on a dataset preprocessed from the same class list"
        )
    if dataset.split_counts.get(split, 0) == 0:
        available = ", ".join(s for s, n in dataset.split_counts.items() if n) or "none"
        raise UserError(f"split {split!r} of {dataset_dir} holds no videos (splits with videos: {available})")
    if dataset.stored_frames < shape.frames or dataset.stored_size < shape.size:
        raise UserError(
            f"{dataset_dir} stores {dataset.stored_frames} frames of {dataset.stored_size}px but the model eats "
            f"{shape.frames} frames of {shape.size}px; preprocess with at least that many frames and pixels"
        )
    if (dataset.stored_frames, dataset.stored_size) != (shape.stored_frames, shape.stored_size):
        logger.warning(
            "%s stores %d frames of %dpx, the model was trained on %d frames of %dpx: "
            "the centre crop sees a different field of view than in training",
            dataset_dir, dataset.stored_frames, dataset.stored_size, shape.stored_frames, shape.stored_size,
        )


def _intact_rows(batch: dict[str, list], dataset, left_out: list[str]) -> dict[str, list]:
    """``batch`` without its stored clips that fail their check or do not decode, each named in ``left_out``."""
    keep = []
    for row, item in enumerate(batch["video"]):
        try:
            videos_from_bytes([item], dataset.video_shape, dataset.store, [clip_name(batch.get("video_id"), row)])
            keep.append(row)
        except StoredClipError as err:
            left_out.append(str(err))
    return {key: [values[row] for row in keep] for key, values in batch.items()}


def split_logits(model, dataset_dir: str, dataset, split: str, batch_size: int, shape, views: Views, device,
                 shuffle: torch.Generator | None = None, orders: int = 1,
                 left_out: list[str] | None = None) -> Iterator[tuple[dict[str, list], torch.Tensor]]:  # fmt: skip
    """(record batch, view-averaged logits on the CPU) for every batch of ``split``.

    With ``shuffle``, each clip's frames are put in random order, ``orders`` times
    with fresh orders, and the logits averaged: what the model predicts once
    frame order is gone, with little noise from any one order.

    A stored clip that fails its checksum or does not decode is left out and named in ``left_out``, as training's
    validation leaves it out (vidray/train/rows.py): a sweep that finished around one could not report it. Without
    ``left_out`` it stops the evaluation, in one line naming the video and the fix.
    """
    for batch in read_split_batches(dataset_dir, dataset, split, batch_size):
        try:
            # A writable copy: the stacked array is a view of immutable bytes.
            try:
                videos = videos_from_bytes(batch["video"], dataset.video_shape, dataset.store, batch.get("video_id"))
            except StoredClipError:
                if left_out is None:
                    raise
                batch = _intact_rows(batch, dataset, left_out)
                if not batch["video"]:
                    continue
                videos = videos_from_bytes(batch["video"], dataset.video_shape, dataset.store, batch.get("video_id"))
            videos = torch.from_numpy(videos.copy()).to(device)
        except StoredClipError as err:  # names the video and the fix itself
            raise UserError(f"{dataset_dir} split {split!r}: {err}") from None
        except ValueError as err:
            raise UserError(f"{dataset_dir} split {split!r}: {err}; re-run `vidray preprocess`") from None
        runs = [clip_outputs(model, videos, frames=shape.frames, size=shape.size, views=views, shuffle=shuffle)[0]
                for _ in range(orders if shuffle is not None else 1)]
        yield batch, torch.stack(runs).mean(0).cpu()


# Random frame orders per clip in the frame-order control; their logits are averaged.
CONTROL_ORDERS = 8


@torch.no_grad()
def frame_order_control(
    checkpoint: Path, dataset_dir: str, split: str, pairs: list[tuple[int, int]] | None = None,
    batch_size: int = 16, seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of ``checkpoint`` on ``split`` with frames in order and with each clip's frames shuffled.

    Shuffling keeps every frame and destroys time, so the gap between the two
    is what the model owes to frame order. ``pairs`` (class index pairs that
    are time-reversals of each other, e.g. the demo's) add the accuracy within
    pairs: among videos predicted inside their own pair, the share whose
    direction is right. An order-blind model is at chance there, 0.5.
    """
    model, info = load_trained_model(checkpoint)
    shape = clip_shape_of(info)
    dataset = read_dataset_info(dataset_dir)
    _check_compatible(shape, dataset, dataset_dir, split, Path(checkpoint))
    device = inference_device()
    to_device(model, device)
    confusions = {}
    views = Views(eval_clips_of(info))  # the validation view: 1 + CONTROL_ORDERS passes over the split
    for name, shuffle in (("in_order", None), ("shuffled", torch.Generator().manual_seed(seed))):
        y_true, y_pred = [], []
        for batch, logits in split_logits(model, dataset_dir, dataset, split, batch_size, shape, views, device,
                                          shuffle=shuffle, orders=CONTROL_ORDERS, left_out=[]):  # named by the evaluation
            y_true += batch["label"]
            y_pred += logits.argmax(-1).tolist()
        confusions[name] = confusion_matrix(y_true, y_pred, len(shape.classes))
    result: dict[str, Any] = {
        "split": split, "orders": CONTROL_ORDERS, "chance": 1 / len(shape.classes), "protocol": views.describe(),
    }
    for name, confusion in confusions.items():
        result[f"{name}_accuracy"] = float(np.trace(confusion) / max(confusion.sum(), 1))
        if pairs:
            result[f"{name}_pair_accuracy"] = pair_accuracy(confusion, pairs)
    if pairs:
        result.update(chance_within_pairs=0.5, pairs=[[shape.classes[a], shape.classes[b]] for a, b in pairs])
    return result


def pair_accuracy(confusion: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    """Among videos of paired classes predicted inside their own pair: how often the member is right."""
    confusion = np.asarray(confusion)
    right = sum(confusion[a, a] + confusion[b, b] for a, b in pairs)
    within = sum(confusion[np.ix_([a, b], [a, b])].sum() for a, b in pairs)
    return float(right / within) if within else 0.0


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: Path,
    dataset_dir: str,
    split: str = "val",
    out_dir: Path = Path("reports/eval"),
    batch_size: int = 8,
    clips: int | None = None,
    crops: int = 1,
    origin: str | None = None,
) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on ``split`` of ``dataset_dir``; writes the reports into ``out_dir``.

    ``clips`` defaults to the ``train.eval_clips`` the checkpoint was trained
    with, ``crops`` to the centre crop: the view training validated with. ``origin``: where the
    checkpoint lives when ``checkpoint`` is a download of it (a bucket's), named in metrics.json and
    the figure's title instead of the download, which goes. Returns the
    metrics dict written to ``metrics.json`` (with ``protocol``) plus ``files``.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    checkpoint = Path(checkpoint)
    model, info = load_trained_model(checkpoint)
    shape = clip_shape_of(info)
    dataset = read_dataset_info(dataset_dir)
    _check_compatible(shape, dataset, dataset_dir, split, checkpoint)
    classes = shape.classes
    views = Views(eval_clips_of(info) if clips is None else clips, crops)
    out_dir = Path(out_dir)
    try:  # before the evaluation, not after it
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write the reports to {out_dir} ({err.strerror}); pass --out a writable directory") from None
    device = inference_device()
    to_device(model, device)  # with its position table: no copy of it in every forward

    y_true: list[int] = []
    y_pred: list[int] = []
    rows: list[dict[str, Any]] = []
    left_out: list[str] = []
    loss_sum = 0.0
    for batch, logits in split_logits(model, dataset_dir, dataset, split, batch_size, shape, views, device, left_out=left_out):
        labels = torch.tensor(batch["label"], dtype=torch.int64)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        probs = logits.softmax(-1)
        confidence, predicted = probs.max(-1)
        y_true += batch["label"]
        y_pred += predicted.tolist()
        for video_id, path, label, guess, score in zip(
            batch["video_id"], batch["path"], batch["label"], predicted.tolist(), confidence.tolist()
        ):
            rows.append(
                {
                    "video_id": video_id,
                    "path": path,
                    "label": classes[label],
                    "predicted": classes[guess],
                    "confidence": round(score, 6),
                    "correct": label == guess,
                }
            )

    if left_out:
        print(f"vidray evaluate: {len(left_out)} stored clip(s) of split {split!r} left out, as training's validation "
              f"leaves them: {left_out[0]}", file=sys.stderr, flush=True)  # fmt: skip
    if not y_true:
        raise UserError(f"the shards of split {split!r} of {dataset_dir} hold no rows; re-run `vidray preprocess`")
    confusion = confusion_matrix(y_true, y_pred, len(classes))
    metrics = metrics_from_confusion(confusion, classes)
    metrics.update(
        loss=loss_sum / max(len(y_true), 1),
        checkpoint=without_credentials(origin) if origin else str(checkpoint.resolve()),
        # Epochs done, as every other output counts them (results.md's "epoch 5", the model card): vidray.json's
        # "epoch" is the 0-based index, which results.json showed as 4 beside its best epoch 5.
        checkpoint_epochs_done=None if info.get("epoch") is None else info["epoch"] + 1,
        dataset_dir=str(dataset_dir),
        split=split,
        eval_clips=views.clips,
        eval_crops=views.crops,
        protocol=views.describe(),
        left_out=left_out,  # damaged stored clips, each in the one line that names its video and the fix
    )

    files = {
        "metrics": out_dir / "metrics.json",
        "per_class_csv": out_dir / "per_class.csv",
        "per_class_md": out_dir / "per_class.md",
        "confusion_png": out_dir / "confusion_matrix.png",
        "predictions": out_dir / "predictions.csv",
    }
    files["metrics"].write_text(json_text(metrics))
    write_per_class_csv(metrics, files["per_class_csv"])
    files["per_class_md"].write_text(per_class_markdown(metrics))
    name = posixpath.basename(metrics["checkpoint"].partition("?")[0].rstrip("/"))  # a URI's query is no name
    plot_confusion(confusion, classes, files["confusion_png"], title=f"{split}: {name}")
    with open(files["predictions"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {**metrics, "files": {k: str(v) for k, v in files.items()}}


def write_per_class_csv(metrics: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name, m in metrics["per_class"].items():
            writer.writerow([name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]])


def per_class_markdown(metrics: dict[str, Any]) -> str:
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, m in metrics["per_class"].items():
        cell = name.replace("|", "\\|")  # a folder class may hold one: the row would gain a column
        lines.append(f"| {cell} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    total = metrics["num_samples"]
    lines.append(
        f"| **macro avg** | {metrics['macro_precision']:.3f} | {metrics['macro_recall']:.3f} | "
        f"{metrics['macro_f1']:.3f} | {total} |"
    )
    lines.append(f"| **accuracy (= micro P/R/F1)** | | | {metrics['accuracy']:.3f} | {total} |")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    """Rows normalised to sum 1 (the diagonal is per-class recall); cells annotated with raw counts."""
    confusion = np.asarray(confusion)
    k = len(classes)
    support = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)

    # The matrix gets half an inch per class (3 in at least), the figure the names beside and below it and the
    # title above, all within CONFUSION_MAX_INCHES: COIN's 180 tasks at half an inch drew an 11,000 px square in
    # 50 s and 4.8 GB; capped, the names shrink to fit their rows (6 pt at 180 classes). A name longer than
    # LABEL_CHARS is broken over up to 3 lines where its row has room, else shortened in its middle.
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    title = f"{title}  (accuracy {accuracy:.3f}, n={int(confusion.sum())})".strip()
    side, top = max(3.0, 0.5 * k), 0.5
    for _ in range(3):  # the names' size follows the side, the side what the names and the title leave
        names_pt = min(10.0, 0.55 * 72 * side / k)
        lines = tick_label_lines(side / k, names_pt)
        x_names = [fit_label(c, LABEL_CHARS, lines) for c in classes]
        y_names = [f"{name} ({int(n)})" for name, n in zip(x_names, support[:, 0])]
        x_reach = max(sum(text_inches(name, names_pt)) for name in x_names) * 0.71  # 45°: as far down as aside
        left = max(max(text_inches(name, names_pt)[0] for name in y_names), x_reach - side / k / 2) + 0.55
        bottom = x_reach + 0.5  # and the axis label below
        # The colour bar (its width and gap are fractions of the matrix's side below) with its ticks and label.
        side = min(side, CONFUSION_MAX_INCHES - bottom - top, (CONFUSION_MAX_INCHES + 0.3 - left) / 1.086)
        right = 0.086 * side + 0.7
        width = left + side + right
        title_lines = wrap_to_width(title, width - 0.3, 12)
        top = text_inches(title_lines, 12)[1] + 0.2
    fig = new_figure(width, min(top + side + bottom, CONFUSION_MAX_INCHES))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=x_names, rotation=45, ha="right", rotation_mode="anchor", fontsize=names_pt)
    ax.set_yticks(range(k), labels=y_names, fontsize=names_pt)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (support)")
    if k <= ANNOTATE_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    ax.text(
                        j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    fig.suptitle(title_lines, fontsize=12)  # over the whole figure: a long title is not cut at the matrix's edges
    return save_figure(fig, path)
