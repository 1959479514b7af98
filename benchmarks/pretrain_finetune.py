"""Does vidray's masked-autoencoder pretraining help? Fine-tune from a pretrained encoder vs from scratch.

On the synthetic demo set (vidray/configs/demo.yaml: 4 classes that are 2
time-reversal pairs, 150 train / 50 val / 50 test videos per class, a 2-layer
VideoMAE with 8 px patches and 4-frame tubelets on 8 x 32² clips), each stage
in one process and one local Ray cluster, with its own data and runs under
``--storage``:

1. ``data``: generate and preprocess the demo videos (vidray.data.prepare).
2. ``pretrain``: ``vidray pretrain`` (vidray.pretrain.driver.run_pretraining) on the
   train split only (labels unused; the VideoMAE paper's "no extra data"
   setting), timed end to end; its epoch history gives the steady clips/s.
3. ``finetune``: for each seed, two ``vidray train`` runs
   (vidray.train.driver.run_training) with the same fine-tuning config, budget and
   seed: ``scratch`` (demo.yaml, ``model.init=scratch``) and ``pretrained``
   (``model.init=pretrained model.name_or_path=<model_dir>``, a new head),
   then ``vidray evaluate`` of the last checkpoint on the test split.

Reported per arm: the last epoch's val macro-F1 (no checkpoint selection), the
best epoch's, the last checkpoint's test macro-F1 and accuracy; their means
over seeds; and pretrained - scratch. Every run starts over (``--restart``), so
the numbers are from these invocations. Each stage is one short command (the
machine is shared); ``finetune`` adds its seeds to the result file, replacing
runs of the same arm, seed and budget::

    python benchmarks/pretrain_finetune.py --stage data
    python benchmarks/pretrain_finetune.py --stage pretrain
    python benchmarks/pretrain_finetune.py --stage finetune --seeds 0 1
    python benchmarks/pretrain_finetune.py --stage finetune --seeds 2
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
CONFIG = REPO / "vidray" / "configs" / "demo.yaml"
ARMS = ("scratch", "pretrained")
COMPARED = ("val_macro_f1_last", "val_macro_f1_best", "test_macro_f1", "test_accuracy")


# The few-labels set (--labelled-per-class): other demo videos (data seed 1, none of them among the
# pretraining videos of seed 0), N per class, split 60/20/20 like every demo set.
LABELLED_SEED = 1


def data_overrides(storage: Path, labelled_per_class: int | None = None) -> list[str]:
    data = storage / ("data" if labelled_per_class is None else f"data_labelled_{labelled_per_class}")
    few = [] if labelled_per_class is None else [f"data.demo.videos_per_class={labelled_per_class}", f"data.demo.seed={LABELLED_SEED}"]
    return [
        f"data.videos_dir={data / 'videos'}",
        f"data.manifest={data / 'manifest.parquet'}",
        f"data.dataset_dir={data / 'dataset'}",
        f"run.storage_path={storage / 'runs'}",
        *few,
    ]


def load(args: argparse.Namespace, *overrides: str, labelled: bool = False):
    """demo.yaml on this benchmark's data: the demo set, or with ``labelled`` the few-labels set when there is one."""
    from vidray.config import load_config

    per_class = args.labelled_per_class if labelled else None
    return load_config(CONFIG, [*data_overrides(Path(args.storage), per_class), *overrides])


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from vidray.cluster import init_ray
    from vidray.data.prepare import prepare_dataset

    init_ray()
    started = time.perf_counter()
    dataset_dir = prepare_dataset(load(args, labelled=True))
    info = json.loads((Path(dataset_dir) / "dataset.json").read_text())
    return {
        "dataset_dir": dataset_dir,
        "splits": {split: counts["videos"] for split, counts in info["splits"].items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from vidray.pretrain.driver import run_pretraining

    overrides = ["run.name=bench", *args.pretrain_override]
    if args.pretrain_epochs is not None:
        overrides.append(f"pretrain.epochs={args.pretrain_epochs}")
    cfg = load(args, *overrides)
    started = time.perf_counter()
    summary = run_pretraining(cfg, restart=True)
    seconds = time.perf_counter() - started
    info = json.loads((Path(summary["checkpoint"]) / "vidray.json").read_text())
    history = info["history"]
    steady = [h["train_videos_per_s"] for h in history[1:]] or [history[0]["train_videos_per_s"]]
    return {
        "overrides": overrides,
        "config": cfg.pretrain.model_dump(),
        "epochs": len(history),
        "clips_seen": sum(h["train_videos"] for h in history),
        "wall_seconds": round(seconds, 1),
        "wall_minutes": round(seconds / 60, 2),
        "epoch_seconds_total": round(sum(h["epoch_seconds"] for h in history), 1),
        "clips_per_s_median": round(statistics.median(steady), 1),
        "clips_per_s_end_to_end": round(sum(h["train_videos"] for h in history) / seconds, 1),
        "loss_per_epoch": [round(h["train_loss"], 4) for h in history],
        "ingest": info.get("ingest"),
        "masking": info["masking"],
        "model_dir": summary["model_dir"],
        "figures": summary["figures"],
        "loadavg_after": loadavg(),
    }


def finetune(args: argparse.Namespace, arm: str, seed: int, model_dir: str) -> dict[str, Any]:
    from vidray.infer.evaluate import evaluate_checkpoint
    from vidray.train.driver import run_training

    extra = {
        "scratch": [],
        "pretrained": [
            "model.init=pretrained", "model.patch_size=null", "model.tubelet_size=null", f"model.name_or_path={model_dir}",
        ],
    }[arm]  # fmt: skip
    overrides = [f"train.epochs={args.finetune_epochs}", *args.finetune_override, *extra, f"train.seed={seed}"]
    few = "" if args.labelled_per_class is None else f"_l{args.labelled_per_class}"
    tag = f"bench_{arm}_e{args.finetune_epochs}{few}_seed{seed}"
    cfg = load(args, *overrides, f"run.name={tag}", labelled=True)
    started = time.perf_counter()
    summary = run_training(cfg, restart=True)
    seconds = time.perf_counter() - started
    history = json.loads((Path(summary["checkpoint"]) / "vidray.json").read_text())["history"]
    test = evaluate_checkpoint(
        Path(summary["checkpoint"]), cfg.data.dataset_dir, split="test", out_dir=Path(args.storage) / "evals" / tag
    )
    return {
        "arm": arm,
        "seed": seed,
        "finetune_epochs": args.finetune_epochs,
        "labelled_per_class": args.labelled_per_class,
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


def budget_key(epochs: int, labelled_per_class: int | None) -> str:
    return f"{epochs}" if labelled_per_class is None else f"{epochs}_labelled_{labelled_per_class}"


def summarise(runs: list[dict[str, Any]], epochs: int, labelled_per_class: int | None) -> dict[str, Any]:
    """Means per arm over the seeds both arms have at this budget, and pretrained - scratch."""
    at_budget = [r for r in runs if budget_key(r["finetune_epochs"], r.get("labelled_per_class")) == budget_key(epochs, labelled_per_class)]
    seeds = sorted({r["seed"] for r in at_budget if r["arm"] == "scratch"} & {r["seed"] for r in at_budget if r["arm"] == "pretrained"})
    means = {
        arm: {key: round(statistics.fmean(r[key] for r in at_budget if r["arm"] == arm and r["seed"] in seeds), 4) for key in COMPARED}
        for arm in ARMS
    } if seeds else {}  # fmt: skip
    gain = {key: round(means["pretrained"][key] - means["scratch"][key], 4) for key in COMPARED} if seeds else {}
    return {
        "finetune_epochs": epochs, "labelled_per_class": labelled_per_class, "seeds": seeds,
        "means": means, "pretrained_minus_scratch": gain,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("data", "pretrain", "finetune"), required=True)
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: demo.yaml's pretrain.epochs")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning budget of both arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of both arms")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument(
        "--labelled-per-class", type=int, default=None, metavar="N",
        help="data and finetune: fine-tune on a separate demo set of N videos per class (data seed 1) instead of "
        "the pretraining set; pretraining always uses the demo set's train videos",
    )  # fmt: skip
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--storage", default=str(REPO / "benchmarks" / ".cache" / "pretrain_finetune"))
    parser.add_argument("--out", default=str(RESULTS / "pretrain_finetune.json"))
    args = parser.parse_args()
    out = Path(args.out)
    payload: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"benchmark": "pretrain_finetune"}
    payload.pop("loadavg_at_end", None)
    payload.setdefault("commands", {})
    stage_key = args.stage if args.stage != "finetune" else f"finetune_e{budget_key(args.finetune_epochs, args.labelled_per_class)}_seeds{'_'.join(map(str, args.seeds))}"
    if args.stage == "data" and args.labelled_per_class is not None:
        stage_key = f"data_labelled_{args.labelled_per_class}"
    payload["commands"][stage_key] = {"command": command_line(), "at": now(), "machine": machine_info()}

    if args.stage == "data":
        payload["data" if args.labelled_per_class is None else f"data_labelled_{args.labelled_per_class}"] = prepare(args)
    elif args.stage == "pretrain":
        payload["pretraining"] = pretrain(args)
        payload["runs"] = []  # fine-tuning runs of an earlier encoder no longer apply
        payload["comparisons"] = {}
    else:
        model_dir = payload["pretraining"]["model_dir"]
        runs = payload.setdefault("runs", [])
        for seed in args.seeds:
            for arm in args.arms:  # interleaved: both arms of a seed run under the same load
                result = finetune(args, arm, seed, model_dir)
                key = (arm, seed, budget_key(args.finetune_epochs, args.labelled_per_class))
                runs[:] = [r for r in runs if (r["arm"], r["seed"], budget_key(r["finetune_epochs"], r.get("labelled_per_class"))) != key]
                runs.append(result)
                print(f"{arm} seed {seed}: {json.dumps(result)}", file=sys.stderr, flush=True)
        key = budget_key(args.finetune_epochs, args.labelled_per_class)
        payload.setdefault("comparisons", {})[key] = summarise(runs, args.finetune_epochs, args.labelled_per_class)
    write_result("pretrain_finetune", payload, out)
    print(json.dumps({k: payload.get(k) for k in ("data", "pretraining", "comparisons") if k in payload}, default=str)[-3000:])


if __name__ == "__main__":
    main()
