"""Single-label multi-class classification metrics, from a confusion matrix.

Everything is computed from the confusion matrix (rows = true class, columns =
predicted class) so that distributed evaluation can sum per-worker matrices and
get exactly the metrics of the whole split: ``metrics_from_confusion(sum(C_i))``.

Conventions
-----------
* micro precision = micro recall = micro F1 = accuracy: with exactly one true
  and one predicted label per sample, every error is one false positive (for
  the predicted class) and one false negative (for the true class).
* Zero division (sklearn's ``zero_division=0``): a class never predicted has
  precision 0; a class with no true samples has recall 0; F1 is 0 when
  precision + recall is 0.
* Macro averages run over the classes that occur at all, as a true label or
  as a prediction (scikit-learn's default when no ``labels`` are passed). A
  class absent from the evaluated split and never predicted says nothing about
  the model and would otherwise drag macro scores down with a forced 0; a
  class only ever predicted wrongly does count (with F1 0). Per-class entries
  are reported for every class (support 0 when absent). An empty evaluation
  gives 0 everywhere.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# ------------------------------------------------------------------ what training reports

# Every epoch of every training run reports these (vidray/train/finetune.py), plus ``val_f1/<class>``
# per class, ``val_videos``, ``lr``, ``global_step`` and the step telemetry; and an epoch that rejected
# stored clips no earlier epoch did, their ids (vidray.train.rows.REJECTED_CLIPS).
EPOCH_METRICS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_micro_f1",
    "val_macro_precision",
    "val_macro_recall",
    "val_micro_precision",
    "val_micro_recall",
)
# What a run keeps its best checkpoints by (Ray Train's CheckpointConfig) and the default tune.metric.
SCORE_METRIC = "val_macro_f1"
# What tune.metric may name.
TUNABLE_METRICS = tuple(key for key in EPOCH_METRICS if key != "epoch")
# Completed epochs (1, 2, ...), added to every report on its way to Ray Tune: ASHA's time axis and
# the x axis of the learning curves. ``epoch`` is 0-based and restarts nowhere; Tune's own
# ``training_iteration`` restarts at 1 when a trial is resumed, so only this count stays right.
EPOCHS_DONE = "epochs_done"


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` int64 counts; rows = true class, columns = predicted."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def metrics_from_confusion(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, micro/macro P/R/F1, per-class P/R/F1/support and the matrix itself.

    Returns plain Python types (JSON-serialisable):
    ``{"num_samples", "accuracy", "micro_precision", "micro_recall", "micro_f1",
    "macro_precision", "macro_recall", "macro_f1", "per_class": {name: {"precision",
    "recall", "f1", "support"}}, "classes", "confusion"}``.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {confusion.shape} does not match {k} classes")

    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)  # true samples per class
    predicted = confusion.sum(axis=0)  # predictions per class
    total = int(confusion.sum())

    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)

    present = (support > 0) | (predicted > 0)
    accuracy = float(true_positive.sum() / total) if total else 0.0

    def macro(values: np.ndarray) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    return {
        "num_samples": total,
        "accuracy": accuracy,
        "micro_precision": accuracy,
        "micro_recall": accuracy,
        "micro_f1": accuracy,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Metrics for integer labels ``y_true``/``y_pred`` indexing into ``classes``."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, len(classes)), classes)


def epoch_metrics(
    epoch: int, classes: Sequence[str], confusion: np.ndarray, val_loss: float, train_loss: float
) -> dict[str, Any]:
    """The flat dict one epoch reports (:data:`EPOCH_METRICS` + per-class F1) from the whole-val-set confusion matrix."""
    m = metrics_from_confusion(confusion, classes)
    metrics = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": m["accuracy"],
        "val_macro_precision": m["macro_precision"],
        "val_macro_recall": m["macro_recall"],
        "val_macro_f1": m["macro_f1"],
        "val_micro_precision": m["micro_precision"],
        "val_micro_recall": m["micro_recall"],
        "val_micro_f1": m["micro_f1"],
        "val_videos": m["num_samples"],
    }
    for name, per_class in m["per_class"].items():
        metrics[f"val_f1/{name}"] = per_class["f1"]
    return metrics
