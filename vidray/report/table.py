"""The results table: one row per trial, as Markdown (and the reference COIN-12 rows to compare with)."""

from __future__ import annotations

import math
from typing import Any

from vidray.config import DataSettings
from vidray.report.trials import LAST_EPOCH_METRICS, TrialSummary

# The reference COIN-12 runs (VideoMAE-B Kinetics, 16 x 112², 15 epochs, lr 5e-5, wd 0.05,
# batch 32), as published: micro P/R/F1; None where the reference gives no number.
REFERENCE_COIN12 = [
    {"Type": "Reference: no MixUp", "Training Loss": 1.121, "Test Loss": None, "F1": 0.522},
    {"Type": "Reference: MixUp α=0.4", "Training Loss": 1.471, "Test Loss": 1.815, "F1": 0.411},
]


def compares_with_reference(data: DataSettings) -> bool:
    """Whether a sweep's data are the reference's task: COIN's 12 domains on its 10-60 s videos (a 180-task or
    unfiltered COIN sweep is another task, and its numbers are not comparable)."""
    return data.source == "coin" and data.coin_labels == "domain" and (data.min_duration, data.max_duration) == (10, 60)


TABLE_COLUMNS = ["Type", "Epochs", "Training Loss", "Test Loss", "Precision", "Recall", "F1", "Macro-F1", "Accuracy", "Best"]


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table_rows(trials: list[TrialSummary]) -> list[dict[str, Any]]:
    rows = []
    for t in trials:
        epochs = f"{t.epochs_done}/{t.epochs}" + ("" if t.status == "completed" else f" ({t.status})")
        row: dict[str, Any] = {"Type": t.label, "Epochs": epochs}
        for column, key in LAST_EPOCH_METRICS.items():
            row[column] = t.last.get(key)
        row["Best"] = t.best_value
        row["Best epoch"] = t.best_epoch
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c in ("Type", "Epochs") else "---:" for c in columns) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "Best" and value is not None and row.get("Best epoch") is not None:
                cells.append(f"{value:.3f} (ep {row['Best epoch']})")
            elif isinstance(value, (float, int)) or value is None:
                cells.append(_fmt(value))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
