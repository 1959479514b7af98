"""What a sweep leaves behind: the results table, sweep figures and the best model.

Written under ``run.reports_dir``::

    results.md / results.csv / results.json    one row per trial (table below)
    figures/metric_vs_mixup.png                tune.metric at each trial's best epoch vs MixUp α
    figures/learning_curves.png                train loss, val loss, val macro-F1 per epoch, every trial
    figures/confusion_matrix_best.png          the best checkpoint on the held-out split
    best_model/                                that checkpoint exported for transformers.pipeline
    best_eval/                                 its metrics.json, per-class table, predictions

The table has the reference experiment's columns (Type | Training Loss | Test
Loss | Precision | Recall | F1, micro-averaged as there) plus Macro-F1 and
Accuracy. "Test Loss" is our validation loss: for COIN the validation split is
COIN's testing subset, which is what the reference evaluated on. Every value is
from the trial's last epoch; "Best" is its best ``tune.metric`` over epochs,
the epoch whose checkpoint the best model is taken from.

The report reads what the sweep left (vidray/tune/sweep.py: SweepOutcome) and never runs
one; ``vidray tune`` calls the two in turn. Its parts: the trials (trials.py), the table
(table.py), the figures (sweep_figures.py), the best model (best_model.py); this module
writes them out and prints the table.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from vidray.config import VidrayConfig
from vidray.folder_lock import FolderLock
from vidray.model.inference import Views
from vidray.report.best_model import export_and_evaluate_best, frame_order_markdown
from vidray.report.sweep_figures import plot_learning_curves, plot_metric_vs_mixup
from vidray.report.table import REFERENCE_COIN12, TABLE_COLUMNS, compares_with_reference, markdown_table, table_rows
from vidray.report.trials import pick_best, read_finished_trials, summarize_trial
from vidray.storage import json_text
from vidray.tune.sweep import SweepOutcome


def report_sweep(outcome: SweepOutcome) -> dict[str, Any]:
    """The report of what :func:`vidray.tune.sweep.run_sweep` left: this run's Tune results, or a
    finished sweep's trials read back from its experiment folder (no Tune pickle is loaded).

    The driver holds the sweep while it writes (vidray/folder_lock.py): two drivers reporting it at once
    (the same command in two terminals) both wrote its best model's staging folder, and one failed; a
    ``--restart`` could delete the checkpoint being evaluated."""
    with FolderLock(outcome.experiment_path, "vidray tune"):
        results = outcome.results if outcome.results is not None else read_finished_trials(outcome.experiment_path)
        return write_sweep_report(results, outcome.cfg, experiment_path=outcome.experiment_path, dataset_dir=outcome.dataset_dir)


def write_sweep_report(results, cfg: VidrayConfig, *, experiment_path: str, dataset_dir: str) -> dict[str, Any]:
    """Summarise a finished ``ResultGrid``: table (md/csv/json, also printed), figures, best model."""
    reports_dir = cfg.run.reports_path()
    figures_dir = reports_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    trials = sorted(
        (summarize_trial(result, cfg) for result in results),
        key=lambda t: (t.params["mixup_alpha"], t.params["lr"], t.params["weight_decay"], t.params.get("seed", 0)),
    )
    metric = cfg.tune.metric
    best = pick_best(trials, cfg.tune.mode)
    rows = table_rows(trials)

    figures = [
        plot_metric_vs_mixup(trials, metric, figures_dir / "metric_vs_mixup.png"),
        plot_learning_curves(trials, figures_dir / "learning_curves.png"),
    ]
    best_info = None
    if best is not None:
        best_info = export_and_evaluate_best(best, reports_dir, dataset_dir, cfg.tune.test_clips, cfg.tune.test_crops)
        figures.append(Path(best_info["confusion_png"]))

    table = markdown_table(rows, TABLE_COLUMNS)
    lines = [
        f"# Sweep results: {cfg.run.name}",
        "",
        f"{len(trials)} trials on `{dataset_dir}`, {cfg.train.epochs} epochs max, "
        f"ASHA on `{metric}` ({cfg.tune.mode}) {'on' if cfg.tune.asha else 'off'}. Experiment: `{experiment_path}`.",
        "",
        table,
        "",
        "Values are from each trial's last epoch on the validation split. Precision, Recall and F1 are "
        "micro-averaged, as in the reference (for single-label classification they equal accuracy); "
        f"Macro-F1 weighs every class equally. Best: the trial's best `{metric}` and its epoch. "
        f"Protocol: {Views(cfg.train.eval_clips).describe()} per video (the view training validates with).",
    ]
    if compares_with_reference(cfg.data):
        reference_columns = ["Type", "Training Loss", "Test Loss", "F1"]
        lines += ["", "Reference (same COIN-12 split; micro F1):", "", markdown_table(REFERENCE_COIN12, reference_columns)]
    if best_info is not None:
        held_out = best_info["metrics"]
        lines += [
            "",
            f"## Best trial: {best.label}",
            "",
            f"`{metric}` = {best.best_value:.3f} at epoch {best.best_epoch} (checkpoint `{best.best_checkpoint}`).",
            f"On the **{best_info['split']}** split"
            + (" (no test split: the one the best trial and epoch were chosen on, so this is optimistic)"
               if best_info["split"] == "val" else "")
            + f": accuracy {held_out['accuracy']:.3f}, "
            f"macro-F1 {held_out['macro_f1']:.3f}, loss {held_out['loss']:.3f} ({held_out['num_samples']} videos; "
            f"protocol: {held_out['protocol']})."
            + (f" {len(held_out['left_out'])} damaged stored clip(s) left out, as validation leaves them: "
               f"{held_out['left_out'][0]}" if held_out.get("left_out") else ""),
            "",
            f"- model for `transformers.pipeline`: `{best_info['model_dir']}`",
            f"- per-class report: `{reports_dir / 'best_eval' / 'per_class.md'}`",
            f"- confusion matrix: `{best_info['confusion_png']}`",
            "",
            f"### Does it use time? The frame-order control on the {best_info['split']} split",
            "",
            "The same model and videos, once with each clip's frames in order and once shuffled "
            "(every frame kept, time destroyed):",
            "",
            *frame_order_markdown(best_info["frame_order_control"]),
        ]
    else:
        lines += ["", "No trial finished an epoch with a checkpoint, so there is no best model."]
    lines += ["", "Figures: " + ", ".join(f"`{p}`" for p in figures), ""]
    markdown = "\n".join(lines)

    paths = {
        "results_md": reports_dir / "results.md",
        "results_csv": reports_dir / "results.csv",
        "results_json": reports_dir / "results.json",
    }
    paths["results_md"].write_text(markdown)
    csv_rows = [{**row, **{f"param_{k}": v for k, v in t.params.items()}, "trial_id": t.trial_id, "status": t.status}
                for row, t in zip(rows, trials)]
    frame = pd.DataFrame(csv_rows)
    if "Best epoch" in frame:  # whole numbers, empty for a trial without one: a None among them made pandas write 2.0
        frame["Best epoch"] = frame["Best epoch"].astype("Int64")
    frame.to_csv(paths["results_csv"], index=False)
    summary = {
        "experiment_path": experiment_path,
        "metric": metric,
        "mode": cfg.tune.mode,
        "trials": [asdict(t) for t in trials],
        "best": None if best is None else {
            "trial_id": best.trial_id,
            "type": best.label,
            "params": best.params,
            metric: best.best_value,
            "epoch": best.best_epoch,
            "checkpoint": best.best_checkpoint,
            "exported_model": best_info["model_dir"],
            "held_out_split": best_info["split"],
            "held_out_metrics": {k: v for k, v in best_info["metrics"].items() if k not in ("per_class", "confusion", "files")},
            "frame_order_control": best_info["frame_order_control"],
        },
        "figures": [str(p) for p in figures],
        **{k: str(v) for k, v in paths.items()},
    }
    paths["results_json"].write_text(json_text(summary))
    console = [f"\n{table}"]
    if best_info is not None:
        held_out, control = best_info["metrics"], best_info["frame_order_control"]
        # The control's two numbers share its protocol, which may not be the held-out evaluation's (tune.test_clips).
        same = held_out["protocol"] == control["protocol"]
        console.append(
            f"\nbest: {best.label}; {best_info['split']} accuracy {held_out['accuracy']:.3f}"
            + ("" if same else f" ({held_out['protocol']}; {control['protocol']}: in order {control['in_order_accuracy']:.3f})")
            + f", with frames shuffled {control['shuffled_accuracy']:.3f}"
            + (f" (within time-reversed pairs {control['in_order_pair_accuracy']:.3f} -> "
               f"{control['shuffled_pair_accuracy']:.3f}, chance 0.5)" if "pairs" in control else "")
        )
    console.append(f"\nresults table: {paths['results_md']}")
    # Tune's own hint at the start names the driver's staging copy under /tmp/ray/session_*, which
    # goes with the session; every trial's events are in the experiment's folder.
    console.append(f"learning curves: tensorboard --logdir {experiment_path}")
    print("\n".join(console), flush=True)
    best_summary = None
    if best is not None:
        best_summary = {k: summary["best"][k] for k in ("trial_id", "type", metric, "epoch", "exported_model")}
        best_summary.update(
            held_out_split=best_info["split"],
            held_out_accuracy=best_info["metrics"]["accuracy"],
            shuffled_frames_accuracy=best_info["frame_order_control"]["shuffled_accuracy"],
        )
    return {
        "experiment_path": experiment_path,
        "reports_dir": str(reports_dir),
        "trials": len(trials),
        "errored": sum(t.status.startswith("error") for t in trials),
        "best": best_summary,
        "figures": summary["figures"],
        **{k: str(v) for k, v in paths.items()},
    }
