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
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from vidray.config import VidrayConfig
from vidray.figures import TRIAL_CMAP, light_grid, new_figure, save_figure
from vidray.train.metrics import EPOCHS_DONE
from vidray.train.runs import read_json
from vidray.storage import is_uri, join_uri, open_filesystem


# The reference COIN-12 runs (VideoMAE-B Kinetics, 16 x 112², 15 epochs, lr 5e-5, wd 0.05,
# batch 32), as published: micro P/R/F1; None where the reference gives no number.
REFERENCE_COIN12 = [
    {"Type": "Reference: no MixUp", "Training Loss": 1.121, "Test Loss": None, "F1": 0.522},
    {"Type": "Reference: MixUp α=0.4", "Training Loss": 1.471, "Test Loss": 1.815, "F1": 0.411},
]

TABLE_COLUMNS = ["Type", "Epochs", "Training Loss", "Test Loss", "Precision", "Recall", "F1", "Macro-F1", "Accuracy", "Best"]
LAST_EPOCH_METRICS = {
    "Training Loss": "train_loss",
    "Test Loss": "val_loss",
    "Precision": "val_micro_precision",
    "Recall": "val_micro_recall",
    "F1": "val_micro_f1",
    "Macro-F1": "val_macro_f1",
    "Accuracy": "val_accuracy",
}


@dataclass
class TrialSummary:
    trial_id: str
    label: str  # the "Type" column
    params: dict[str, float]
    epochs_done: int
    epochs: int
    status: str  # "completed", "stopped early" (ASHA) or "error: ..."
    last: dict[str, float]  # metrics of the last epoch
    best_value: float | None  # tune.metric at its best epoch
    best_epoch: int | None  # epochs done at that point (1-based)
    best_checkpoint: str | None
    trial_dir: str
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_videos: int | None = None  # videos the best epoch's metric was measured on


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def wilson_interval(proportion: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a proportion measured on ``n`` trials.

    Exact for accuracy; for F1-type metrics over ``n`` videos, a binomial yardstick of the
    same size (their sampling noise is of that order), which is what the sweep figure needs:
    whether a gap between trials is larger than what ``n`` videos can resolve.
    """
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _short(value: float) -> str:
    """5e-05 -> 5e-5, 0.001 -> 1e-3, 0.05 -> 0.05, 0.4 -> 0.4: how people write learning rates."""
    if value != 0 and abs(value) < 0.01:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def trial_label(params: dict[str, Any]) -> str:
    alpha = float(params["mixup_alpha"])
    mixup = "No MixUp" if alpha == 0 else f"MixUp α={_short(alpha)}"
    label = f"{mixup}, lr={_short(float(params['lr']))}, wd={_short(float(params['weight_decay']))}"
    if "seed" in params:
        label += f", seed={int(params['seed'])}"
    return label


def _history(result) -> list[dict[str, float]]:
    """Per-epoch metrics of one trial, deduplicated by epoch (a resumed trial may repeat one)."""
    frame = result.metrics_dataframe
    if frame is None or EPOCHS_DONE not in frame:
        return []
    frame = frame.dropna(subset=[EPOCHS_DONE]).drop_duplicates(subset=[EPOCHS_DONE], keep="last")
    columns = [c for c in [EPOCHS_DONE, *LAST_EPOCH_METRICS.values(), "val_videos", "checkpoint_path"] if c in frame]
    rows = frame.sort_values(EPOCHS_DONE)[columns].to_dict("records")
    return [{k: (int(v) if k == EPOCHS_DONE else v) for k, v in row.items()} for row in rows]


@dataclass
class StoredTrial:
    """A finished trial as Tune left it on storage, read from its params.json and result.json only
    (what :func:`summarize_trial` reads of a Tune ``Result``; no pickle is loaded)."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    metrics_dataframe: pd.DataFrame | None
    path: str
    error: None = None  # a sweep is marked finished only when no trial errored


def read_finished_trials(experiment_path: str) -> list[StoredTrial]:
    """Every trial folder of a finished sweep (the ones holding Tune's params.json)."""
    fs, root = open_filesystem(experiment_path)
    trials = []
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        trial_dir = join_uri(experiment_path, entry.base_name)
        params = read_json(join_uri(trial_dir, "params.json")) if entry.type == pafs.FileType.Directory else None
        if not isinstance(params, dict):
            continue
        _, result_path = open_filesystem(join_uri(trial_dir, "result.json"))
        try:
            with fs.open_input_stream(result_path) as f:
                rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        except FileNotFoundError:
            rows = []
        frame = pd.json_normalize(rows, sep="/") if rows else None
        trials.append(StoredTrial(config=params, metrics=rows[-1] if rows else {}, metrics_dataframe=frame, path=trial_dir))
    return trials


def _checkpoint_exists(path: str | None) -> bool:
    if not path:
        return False
    import pyarrow.fs as pafs

    fs, inner = open_filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def summarize_trial(result, cfg: VidrayConfig) -> TrialSummary:
    params = {k: result.config[k] for k in ("mixup_alpha", "lr", "weight_decay", "seed") if k in result.config}
    history = _history(result)
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "max" else -1)
    epochs_done = history[-1][EPOCHS_DONE] if history else 0
    if result.error is not None:
        status = f"error: {type(result.error).__name__}"
    elif epochs_done < cfg.train.epochs:
        status = "stopped early"
    else:
        status = "completed"
    ranked = sorted(
        (row for row in history if metric in row and not math.isnan(row[metric])),
        key=lambda row: (-sign * row[metric], -row[EPOCHS_DONE]),
    )
    best = ranked[0] if ranked else None
    # Ray Train keeps the best checkpoints by val macro-F1 and the latest; take the best one still on disk.
    checkpoint = next((row["checkpoint_path"] for row in ranked if _checkpoint_exists(row.get("checkpoint_path"))), None)
    return TrialSummary(
        trial_id=str(result.metrics.get("trial_id") or Path(result.path).name),
        label=trial_label(params),
        params={k: float(v) for k, v in params.items()},
        epochs_done=epochs_done,
        epochs=cfg.train.epochs,
        status=status,
        last={k: float(history[-1][k]) for k in LAST_EPOCH_METRICS.values() if history and k in history[-1]},
        best_value=float(best[metric]) if best else None,
        best_videos=int(best["val_videos"]) if best and _finite(best.get("val_videos")) else None,
        best_epoch=best[EPOCHS_DONE] if best else None,
        best_checkpoint=checkpoint,
        trial_dir=str(result.path),
        history=history,
    )


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if t.best_value is not None and t.best_checkpoint]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.best_value)


# ------------------------------------------------------------- table


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


# ------------------------------------------------------------- figures


def _interval_bars(trials: list[TrialSummary]) -> np.ndarray | None:
    """``[2, len(trials)]`` distances below/above each best value to its Wilson 95 % bounds (None: no counts)."""
    bounds = []
    for t in trials:
        if not t.best_videos or not 0.0 <= t.best_value <= 1.0:
            return None
        low, high = wilson_interval(t.best_value, t.best_videos)
        bounds.append((t.best_value - low, high - t.best_value))
    return np.array(bounds).T


def plot_metric_vs_mixup(trials: list[TrialSummary], metric: str, path: Path) -> Path:
    """tune.metric at each trial's best epoch against MixUp α, one line per (lr, wd) setting.

    The y-axis spans the metric's whole range (0-1 for accuracy and F1: a 0.02 gap on a
    0.98-1.00 axis looks like a collapse), and each point carries a Wilson 95 % interval over
    the videos it was measured on, so a gap can be read against what that many videos resolve.
    """
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    groups: dict[tuple[float, float], list[TrialSummary]] = {}
    for t in trials:
        if t.best_value is not None:
            groups.setdefault((t.params["lr"], t.params["weight_decay"]), []).append(t)
    scored = [t for group in groups.values() for t in group]
    bounded = bool(scored) and "loss" not in metric and all(0.0 <= t.best_value <= 1.0 for t in scored)
    with_intervals = bounded and _interval_bars(scored) is not None
    if len(groups) <= 10:
        spread = 0.012 * (max((t.params["mixup_alpha"] for t in scored), default=1.0) or 1.0)
        for index, ((lr, wd), members) in enumerate(sorted(groups.items())):
            members = sorted(members, key=lambda t: t.params["mixup_alpha"])
            # Settings side by side at each α (a small horizontal offset), so their intervals do not hide each other.
            x = [t.params["mixup_alpha"] + (index - (len(groups) - 1) / 2) * spread for t in members]
            y = [t.best_value for t in members]
            line = ax.plot(x, y, marker="o", label=f"lr={_short(lr)}, wd={_short(wd)}")[0]
            if with_intervals:
                ax.errorbar(x, y, yerr=_interval_bars(members), fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.8)
            # Hollow markers: ASHA stopped the trial before the last epoch.
            early = [(xi, yi) for xi, yi, t in zip(x, y, members) if t.status != "completed"]
            if early:
                ax.scatter(*zip(*early), s=90, facecolors="none", edgecolors=line.get_color(), linewidths=1.5)
        ax.legend(title="hollow ring: stopped early", fontsize=8, title_fontsize=8, loc="lower right")
    else:  # lr drawn from a range: every trial is its own setting, so colour by lr instead
        x, y = [t.params["mixup_alpha"] for t in scored], [t.best_value for t in scored]
        if with_intervals:
            ax.errorbar(x, y, yerr=_interval_bars(scored), fmt="none", ecolor="0.6", capsize=2, zorder=1)
        points = ax.scatter(x, y, c=np.log10([t.params["lr"] for t in scored]), cmap=TRIAL_CMAP, zorder=2)
        fig.colorbar(points, ax=ax, label="log10(lr)")
    alphas = sorted({t.params["mixup_alpha"] for t in trials})
    ax.set_xticks(alphas, [_short(a) for a in alphas])
    ax.set_xlabel("MixUp α (0 = no MixUp)")
    if bounded:
        ax.set_ylim(0.0, 1.02)  # a point at 1.0 stays whole
    ax.set_ylabel(f"{metric} (best epoch)" + (", full range 0-1" if bounded else ""))
    title = f"{metric} vs MixUp α ({len(trials)} trials)"
    if with_intervals:
        counts = sorted({t.best_videos for t in scored})
        videos = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        title += f"\nbars: Wilson 95 % interval over the {videos} validation videos"
    ax.set_title(title, fontsize=10)
    light_grid(ax)
    return save_figure(fig, path)


def plot_learning_curves(trials: list[TrialSummary], path: Path) -> Path:
    """Train loss, val loss and val macro-F1 against epoch for every trial."""
    panels = [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_macro_f1", "val macro-F1")]
    fig = new_figure(15.0, 4.8)
    axes = fig.subplots(1, len(panels))
    colours = [f"C{i % 10}" for i in range(len(trials))]
    for t, colour in zip(trials, colours):
        epochs = [row[EPOCHS_DONE] for row in t.history]
        for ax, (key, _) in zip(axes, panels):
            values = [row.get(key, np.nan) for row in t.history]
            ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=t.label)
            if t.status == "stopped early" and epochs:
                ax.plot(epochs[-1], values[-1], marker="x", markersize=9, color=colour)
    max_epoch = max((t.epochs for t in trials), default=1)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, max_epoch + 0.5)
        light_grid(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.suptitle("Learning curves (x: stopped early by ASHA)")
    return save_figure(fig, path)


# ------------------------------------------------------------- best model


def _local_checkpoint(path: str, scratch: Path) -> Path:
    """A local directory holding the checkpoint (downloaded first when it lives in object storage)."""
    if not is_uri(path):
        return Path(path)
    import ray.train

    return Path(ray.train.Checkpoint(path).to_directory(str(scratch / Path(path).name)))


def export_and_evaluate_best(
    best: TrialSummary, reports_dir: Path, dataset_dir: str, clips: int | None = None, crops: int = 1
) -> dict[str, Any]:
    """Export the best checkpoint, evaluate it on the held-out split (test if there is one, else val)
    with ``clips`` x ``crops`` views (``tune.test_clips`` / ``tune.test_crops``; by default the
    validation view), and run the frame-order control on that split."""
    from vidray.data.dataset import read_dataset_info
    from vidray.data.demo import reversal_pairs
    from vidray.infer.evaluate import evaluate_checkpoint, frame_order_control
    from vidray.infer.export import export_model

    info = read_dataset_info(dataset_dir)
    split = "test" if info.split_counts.get("test", 0) else "val"
    with tempfile.TemporaryDirectory(prefix="vidray-best-") as scratch:
        checkpoint = _local_checkpoint(best.best_checkpoint, Path(scratch))
        evaluation = evaluate_checkpoint(checkpoint, dataset_dir, split=split, out_dir=reports_dir / "best_eval",
                                         clips=clips, crops=crops)
        model_dir = export_model(checkpoint, reports_dir / "best_model", held_out=evaluation)
        control = frame_order_control(checkpoint, dataset_dir, split, pairs=reversal_pairs(list(info.classes)))
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
    note = f"Chance: {control['chance']:.3f} over all classes."
    if pairs:
        names = ", ".join(f"{a} / {b}" for a, b in control["pairs"])
        note += (
            f" Within a time-reversed pair ({names}) chance is {control['chance_within_pairs']:.1f}: a video and its"
            " reversal hold the same frames, so a model blind to frame order gets one of the two right."
        )
    return [*lines, "", note]


# ------------------------------------------------------------- report


def write_sweep_report(results, cfg: VidrayConfig, *, experiment_path: str, dataset_dir: str) -> dict[str, Any]:
    """Summarise a finished ``ResultGrid``: table (md/csv/json, also printed), figures, best model."""
    from vidray.model.inference import Views  # torch: only once a sweep has finished

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
    if cfg.data.source == "coin":
        reference_columns = ["Type", "Training Loss", "Test Loss", "F1"]
        lines += ["", "Reference (same COIN-12 split; micro F1):", "", markdown_table(REFERENCE_COIN12, reference_columns)]
    if best_info is not None:
        held_out = best_info["metrics"]
        lines += [
            "",
            f"## Best trial: {best.label}",
            "",
            f"`{metric}` = {best.best_value:.3f} at epoch {best.best_epoch} (checkpoint `{best.best_checkpoint}`).",
            f"On the **{best_info['split']}** split: accuracy {held_out['accuracy']:.3f}, "
            f"macro-F1 {held_out['macro_f1']:.3f}, loss {held_out['loss']:.3f} ({held_out['num_samples']} videos; "
            f"protocol: {held_out['protocol']}).",
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
    pd.DataFrame(csv_rows).to_csv(paths["results_csv"], index=False)
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
    paths["results_json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    console = [f"\n{table}"]
    if best_info is not None:
        held_out, control = best_info["metrics"], best_info["frame_order_control"]
        console.append(
            f"\nbest: {best.label}; {best_info['split']} accuracy {held_out['accuracy']:.3f}, "
            f"with frames shuffled {control['shuffled_accuracy']:.3f}"
            + (f" (within time-reversed pairs {control['in_order_pair_accuracy']:.3f} -> "
               f"{control['shuffled_pair_accuracy']:.3f}, chance 0.5)" if "pairs" in control else "")
        )
    console.append(f"\nresults table: {paths['results_md']}")
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
