"""Metric maths against hand-computed cases and scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidray.train.metrics import classification_metrics, confusion_matrix, metrics_from_confusion

CLASSES = ["a", "b", "c"]


def test_hand_computed_three_classes():
    # true a a a b b c ; pred a a b b c c
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, CLASSES)

    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["num_samples"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Single-label: every error is one FP and one FN, so micro P = R = F1 = accuracy.
    assert m["micro_precision"] == m["micro_recall"] == m["micro_f1"] == pytest.approx(4 / 6)

    a, b, c = (m["per_class"][k] for k in CLASSES)
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(0.8)  # 2 * 1 * 2/3 / (5/3)
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.5, 0.5, 0.5, 2)
    assert (c["precision"], c["recall"], c["support"]) == (0.5, 1.0, 1)
    assert c["f1"] == pytest.approx(2 / 3)

    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    json.dumps(m)  # plain Python types only


def test_perfect_and_all_wrong():
    perfect = classification_metrics([0, 1, 2, 2], [0, 1, 2, 2], CLASSES)
    assert perfect["accuracy"] == perfect["macro_f1"] == 1.0

    wrong = classification_metrics([0, 1, 2], [1, 2, 0], CLASSES)
    assert wrong["accuracy"] == wrong["macro_f1"] == wrong["macro_precision"] == 0.0


def test_zero_division_absent_and_never_predicted_classes():
    classes = ["a", "b", "c", "d"]
    # "b" and "c" are true classes the model never predicts; "d" never occurs at all.
    y_true = [0, 0, 1, 2]
    y_pred = [0, 0, 0, 0]
    m = classification_metrics(y_true, y_pred, classes)
    a, b, c, d = (m["per_class"][k] for k in classes)
    assert a["precision"] == pytest.approx(0.5) and a["recall"] == 1.0
    # Never predicted: precision defined as 0 (not NaN), so F1 is 0 too.
    assert b == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # Absent everywhere: reported with support 0, and excluded from the macro mean.
    assert d == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_recall"] == pytest.approx(1 / 3)
    assert m["macro_precision"] == pytest.approx(0.5 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert not any(np.isnan(v) for v in (m["macro_f1"], m["macro_precision"], m["macro_recall"]))


def test_class_only_predicted_counts_in_macro():
    # "c" never occurs as a true label but is predicted once: it counts with F1 0 (a real mistake).
    m = classification_metrics([0, 1], [0, 2], CLASSES)
    assert m["per_class"]["c"]["support"] == 0
    assert m["macro_recall"] == pytest.approx((1 + 0 + 0) / 3)


def test_empty_evaluation_is_all_zero():
    m = classification_metrics([], [], CLASSES)
    assert m["num_samples"] == 0
    assert m["accuracy"] == m["macro_f1"] == m["micro_f1"] == 0.0
    assert m["confusion"] == [[0] * 3] * 3


def test_summed_worker_confusions_equal_whole_split():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, size=200))
    classes = [f"k{i}" for i in range(5)]
    # Four "workers" each see an uneven slice; the driver sums their matrices.
    cuts = [0, 13, 90, 91, 200]
    parts = [confusion_matrix(y_true[s:e], y_pred[s:e], 5) for s, e in zip(cuts[:-1], cuts[1:])]
    assert metrics_from_confusion(sum(parts), classes) == classification_metrics(y_true, y_pred, classes)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], CLASSES)
    with pytest.raises(ValueError, match="y_pred has 1"):
        classification_metrics([0, 1], [0], CLASSES)
    with pytest.raises(ValueError, match="does not match 3 classes"):
        metrics_from_confusion(np.zeros((2, 2)), CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    k = 6
    y_true = rng.integers(0, k - 1, size=150)  # class k-1 never true
    y_pred = np.where(rng.random(150) < 0.5, y_true, rng.integers(0, k, size=150))
    classes = [f"class{i}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, classes)

    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    for average in ("micro", "macro"):
        # No `labels` argument: scikit-learn averages over the labels that occur, as we do.
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0
        )
        assert (m[f"{average}_precision"], m[f"{average}_recall"], m[f"{average}_f1"]) == pytest.approx((p, r, f))
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(k)), average=None, zero_division=0
    )
    for i, name in enumerate(classes):
        entry = m["per_class"][name]
        assert (entry["precision"], entry["recall"], entry["f1"], entry["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    assert m["confusion"] == sklearn_metrics.confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist()
