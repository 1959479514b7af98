"""The sweep's best checkpoint: exported for ``transformers.pipeline``, evaluated on the held-out split,
and put through the frame-order control (does the model use time?)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vidray.data.dataset import read_dataset_info
from vidray.data.demo import reversal_pairs
from vidray.infer.evaluate import evaluate_checkpoint, frame_order_control
from vidray.infer.export import export_model
from vidray.model.classifier import local_checkpoint
from vidray.report.trials import TrialSummary
from vidray.storage import scratch


def export_and_evaluate_best(
    best: TrialSummary, reports_dir: Path, dataset_dir: str, clips: int | None = None, crops: int = 1
) -> dict[str, Any]:
    """Export the best checkpoint, evaluate it on the held-out split (test if there is one, else val)
    with ``clips`` x ``crops`` views (``tune.test_clips`` / ``tune.test_crops``; by default the
    validation view), and run the frame-order control on that split."""
    info = read_dataset_info(dataset_dir)
    split = "test" if info.split_counts.get("test", 0) else "val"
    # Classes that are time-reversals of each other sharpen the control. The demo's classes come in
    # such pairs (vidray/data/demo.py); any other dataset has none, and the control is plain accuracy.
    time_reversed = reversal_pairs(list(info.classes))
    with scratch("best") as folder:
        checkpoint = local_checkpoint(best.best_checkpoint, Path(folder))
        # Named by where it lives, not by the download of a bucket's checkpoint, which goes with the scratch folder.
        evaluation = evaluate_checkpoint(checkpoint, dataset_dir, split=split, out_dir=reports_dir / "best_eval",
                                         clips=clips, crops=crops, origin=best.best_checkpoint)
        model_dir = export_model(checkpoint, reports_dir / "best_model", held_out=evaluation, origin=best.best_checkpoint)
        control = frame_order_control(checkpoint, dataset_dir, split, pairs=time_reversed)
    figure = reports_dir / "figures" / "confusion_matrix_best.png"
    shutil.copyfile(evaluation["files"]["confusion_png"], figure)
    return {
        "model_dir": str(model_dir), "split": split, "metrics": evaluation, "confusion_png": str(figure),
        "frame_order_control": control,
    }


def frame_order_markdown(control: dict[str, Any]) -> list[str]:
    """The frame-order control as a small table and what chance is."""
    pairs = "pairs" in control
    header = "| frames | accuracy |" + (" accuracy within time-reversed pairs |" if pairs else "")
    lines = [header, "|---|---:|" + ("---:|" if pairs else "")]
    for name, label in (("in_order", "in order"), ("shuffled", f"shuffled ({control['orders']} random orders per clip)")):
        row = f"| {label} | {control[f'{name}_accuracy']:.3f} |"
        if pairs:
            row += f" {control[f'{name}_pair_accuracy']:.3f} |"
        lines.append(row)
    note = f"Protocol: {control['protocol']} per video (the validation view). Chance: {control['chance']:.3f} over all classes."
    if pairs:
        names = ", ".join(f"{a} / {b}" for a, b in control["pairs"])
        note += (
            f" Within a time-reversed pair ({names}) chance is {control['chance_within_pairs']:.1f}: a video and its"
            " reversal hold the same frames, so a model blind to frame order gets one of the two right."
        )
    return [*lines, "", note]
