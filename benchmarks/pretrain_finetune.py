"""Does vidray's masked-autoencoder pretraining help? Fine-tune from a pretrained encoder vs from scratch.

On the synthetic demo set (configs/demo.yaml: 4 classes that are 2 time-reversal
pairs, 192 train / 64 val / 64 test videos, a tiny VideoMAE with 8 px patches on
8 x 48² clips), in one process and one local Ray cluster:

1. ``pretrain``: ``vidray pretrain`` (vidray.pretrain.run_pretraining) on the
   train split only (labels unused), timed end to end; its epoch history gives
   the steady-state clips/s.
2. for each seed, two ``vidray train`` runs (vidray.trainer.run_training) with
   the same fine-tuning config, budget and seed: ``scratch`` (demo.yaml as is,
   ``model.init=scratch``) and ``pretrained`` (``model.init=pretrained
   model.name_or_path=<model_dir>``, a new head), then ``vidray evaluate`` of the
   last checkpoint on the test split.

Reported per arm: the last epoch's val macro-F1 (no checkpoint selection), the
best epoch's, and the last checkpoint's test macro-F1; their means over seeds;
and pretrained - scratch. Every run starts over (``--restart``), so the numbers
are from this invocation.

    python benchmarks/pretrain_finetune.py --stage pretrain      # what docs/benchmarks.md reports, in two steps
    python benchmarks/pretrain_finetune.py --stage finetune
    python benchmarks/pretrain_finetune.py --pretrain-epochs 20 --finetune-epochs 10 --seeds 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, command_line, loadavg, machine_info, now, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"


def finetune(overrides: list[str], tag: str, storage: str) -> dict[str, Any]:
    from vidray.config import load_config
    from vidray.evaluate import evaluate_checkpoint
    from vidray.trainer import run_training

    cfg = load_config(CONFIG, [*overrides, f"run.name={tag}", f"run.storage_path={storage}"])
    started = time.perf_counter()
    summary = run_training(cfg, restart=True)
    seconds = time.perf_counter() - started
    history = json.loads((Path(summary["checkpoint"]) / "vidray.json").read_text())["history"]
    test = evaluate_checkpoint(
        Path(summary["checkpoint"]), cfg.data.dataset_dir, split="test", out_dir=Path(storage) / tag / "test_eval"
    )
    return {
        "run": tag,
        "overrides": overrides,
        "seconds": round(seconds, 1),
        "val_macro_f1_last": round(history[-1]["val_macro_f1"], 4),
        "val_macro_f1_best": round(max(h["val_macro_f1"] for h in history), 4),
        "val_accuracy_last": round(history[-1]["val_accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4),
        "test_accuracy": round(test["accuracy"], 4),
        "val_macro_f1_per_epoch": [round(h["val_macro_f1"], 4) for h in history],
        "loadavg_after": loadavg(),
    }


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 4)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from vidray.config import load_config
    from vidray.pretrain import run_pretraining

    overrides = [f"run.storage_path={args.storage}", "run.name=bench", *args.pretrain_override]
    if args.pretrain_epochs is not None:
        overrides.append(f"pretrain.epochs={args.pretrain_epochs}")
    cfg = load_config(CONFIG, overrides)
    started = time.perf_counter()
    summary = run_pretraining(cfg, restart=True)
    seconds = time.perf_counter() - started
    info = json.loads((Path(summary["checkpoint"]) / "vidray.json").read_text())
    history = info["history"]
    steady = [h["train_videos_per_s"] for h in history[1:]] or [history[0]["train_videos_per_s"]]
    return {
        "overrides": overrides,
        "config": {k: v for k, v in cfg.pretrain.model_dump().items()},
        "epochs": len(history),
        "clips_seen": sum(h["train_videos"] for h in history),
        "wall_seconds": round(seconds, 1),
        "wall_minutes": round(seconds / 60, 2),
        "epoch_seconds_total": round(sum(h["epoch_seconds"] for h in history), 1),
        "clips_per_s_median": round(statistics.median(steady), 1),
        "clips_per_s_end_to_end": round(sum(h["train_videos"] for h in history) / seconds, 1),
        "loss_first_epoch": round(history[0]["train_loss"], 4),
        "loss_last_epoch": round(history[-1]["train_loss"], 4),
        "masking": info["masking"],
        "model_dir": summary["model_dir"],
        "figures": summary["figures"],
        "loadavg_after": loadavg(),
    }


def compare(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    common = [f"train.epochs={args.finetune_epochs}", *args.finetune_override]
    arms = {
        "scratch": [],
        "pretrained": ["model.init=pretrained", "model.patch_size=null", f"model.name_or_path={model_dir}"],
    }
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        for arm, extra in arms.items():  # interleaved: both arms of a seed run under the same load
            result = finetune([*common, *extra, f"train.seed={seed}"], f"bench_{arm}_seed{seed}", args.storage)
            runs[arm].append({"seed": seed, **result})
            print(f"{arm} seed {seed}: {json.dumps(result)}", file=sys.stderr, flush=True)
    keys = ("val_macro_f1_last", "val_macro_f1_best", "test_macro_f1", "test_accuracy")
    means = {arm: {key: mean([r[key] for r in results]) for key in keys} for arm, results in runs.items()}
    return {
        "finetune_epochs": args.finetune_epochs,
        "finetune_overrides": common,
        "seeds": list(range(args.seeds)),
        "runs": runs,
        "means": means,
        "pretrained_minus_scratch": {key: round(means["pretrained"][key] - means["scratch"][key], 4) for key in keys},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stage", choices=("all", "pretrain", "finetune"), default="all",
        help="pretrain: only step 1 (writes the result with it); finetune: only step 2, from the encoder the "
        "result file's pretraining left (two shorter commands instead of one long one)",
    )  # fmt: skip
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: demo.yaml's pretrain.epochs")
    parser.add_argument("--finetune-epochs", type=int, default=15, help="fine-tuning budget of both arms")
    parser.add_argument("--seeds", type=int, default=3, help="train.seed 0..N-1, the same for both arms")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--storage", default=str(REPO / "benchmarks" / ".cache" / "pretrain_runs"))
    parser.add_argument("--out", default=str(RESULTS / "pretrain_finetune.json"))
    args = parser.parse_args()
    out = Path(args.out)

    from vidray.cluster import cluster_summary

    payload: dict[str, Any] = {"benchmark": "pretrain_finetune", "machine": machine_info()}
    if args.stage == "finetune":
        payload = json.loads(out.read_text())  # what --stage pretrain wrote
        payload.pop("loadavg_at_end", None)
    else:
        payload.update(started=now(), pretrain_command=command_line(), pretraining=pretrain(args))
        print(f"pretraining: {json.dumps(payload['pretraining'])}", file=sys.stderr, flush=True)
    if args.stage != "pretrain":
        payload.update(finetune_command=command_line(), finetune_machine=machine_info(), **compare(args, payload["pretraining"]["model_dir"]))
    payload["cluster"] = cluster_summary()
    write_result("pretrain_finetune", payload, out)
    print(json.dumps({k: payload.get(k) for k in ("pretraining", "means", "pretrained_minus_scratch")}))


if __name__ == "__main__":
    main()
