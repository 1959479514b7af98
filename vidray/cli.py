"""``vidray`` command line. Each subcommand parses its arguments and calls one
function of the pipeline module that does the work; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from vidray.config import DECODERS, DISPATCHES, SPLITS, STORES, DataSettings
from vidray.errors import Interrupted, UserError

# `vidray preprocess`'s flags for data.* keys (--stored-frames: data.stored_frames), each the keyword of preprocess().
PREPROCESS_KEYS = ("frames", "size", "stored_frames", "stored_size", "videos_per_shard", "decoder", "decoder_device",
                   "store", "jpeg_quality", "dispatch")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def set_defaults(self, **kwargs) -> None:  # a command's own parser, whose usage main's errors show
        super().set_defaults(parser=self, **kwargs)


def _tell(line: str) -> None:
    # A command's line for a person goes to stderr, before the summary: stdout stays the JSON alone.
    print(line, file=sys.stderr, flush=True)


def _print_summary(summary: dict, *, disconnect_ray: bool = False) -> None:
    # The last line of stdout is always a JSON summary, so scripts can parse it. A command that
    # ran on Ray disconnects first: Ray's driver threads print late messages (the raylet's
    # worker-start warnings) to stdout, which would land after it.
    ray = sys.modules.get("ray")
    if disconnect_ray and ray is not None and ray.is_initialized():
        ray.shutdown()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    from vidray.config import DEFAULT_CONFIG

    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the embedded demo, configs/demo.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=3")


def _add_view_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clips", type=int, default=None, help="temporal clips per video (default: the train.eval_clips it validated with)"
    )
    parser.add_argument(
        "--crops", type=int, choices=[1, 3], default=1, help="spatial crops: 1 centre (default) or 3 (left, centre, right)"
    )


def _add_retry_crashed_arg(parser: argparse.ArgumentParser, then: str = "; the dataset may change, and a run "
                           "interrupted on it then needs --restart") -> None:  # fmt: skip
    parser.add_argument(
        "--retry-crashed", action="store_true",
        help="decode again the videos whose decoder killed its worker last time (rejected as worker_crash: an OOM "
        f"kill or a lost node need not recur){then}",
    )  # fmt: skip


def _add_rerun_args(parser: argparse.ArgumentParser, what: str, folder: str = "run.name") -> None:
    parser.add_argument("--restart", action="store_true", help=f"delete the {what} under run.storage_path/{folder} (only "
                        f"a folder vidray wrote) and start over (by default a finished {what} is only reported and an "
                        "interrupted one continues)")  # fmt: skip
    _add_verbose_arg(parser, "show Ray's full logs, every reported result and progress bars")


def _add_verbose_arg(parser: argparse.ArgumentParser, help_text: str = "show Ray's own logs and progress bars") -> None:
    # Every command that runs on Ray has the same console (vidray.cluster.console_settings): vidray's lines only.
    parser.add_argument("--verbose", action="store_true", help=help_text)


def _index_line(summary: dict) -> str:
    """The console's line for a manifest `vidray index` wrote (both sources' summaries share these keys)."""
    splits = ", ".join(f"{split} {count}" for split, count in summary["per_split"].items() if count)
    line = f"vidray index: {summary['present']} videos of {len(summary['classes'])} classes" + (f" ({splits})" if splits else "")
    extras = [f"{summary[key]} {what}" for key, what in (
        ("val_held_out_of_train", "of train lent to val"), ("ignored", "paths ignored"), ("missing", "listed but not found"),
        ("probe_errors", "unreadable (preprocessing will reject them)"),
    ) if summary.get(key)]  # fmt: skip
    return line + ("; " + "; ".join(extras) if extras else "") + f" -> {summary['manifest']}"


def cmd_index_folder(args: argparse.Namespace) -> None:
    from vidray.data.index import index_folder

    summary = index_folder(Path(args.root), Path(args.out), probe=not args.no_probe, val_fraction=args.val_fraction)
    _tell(_index_line(summary))
    _print_summary(summary)


def cmd_index_coin(args: argparse.Namespace) -> None:
    from vidray.data.coin import index_coin

    summary = index_coin(annotations=[Path(a) for a in args.annotations], taxonomy=Path(args.taxonomy),
                         videos_dir=Path(args.videos), out=Path(args.out), min_duration=args.min_duration,
                         max_duration=args.max_duration, probe=not args.no_probe, labels=args.labels)  # fmt: skip
    _tell(_index_line(summary))
    _print_summary(summary)


def preprocess_settings(args: argparse.Namespace) -> DataSettings:
    """`vidray preprocess`'s flags as the config's data section: a flag left out takes the data.* key's default, and
    the config's checks decide, so `vidray train` with the same data.frames and data.size finds the same shards."""
    given = {key: getattr(args, key) for key in PREPROCESS_KEYS if getattr(args, key) is not None}
    try:
        return DataSettings(manifest=args.manifest, dataset_dir=args.out, **given)
    except ValidationError as err:  # each key named by its flag: data.stored_frames as --stored-frames
        problems = "; ".join((f"data.{e['loc'][0]}={e['input']}: " if e["loc"] else "") + e["msg"].removeprefix(
            "Value error, ") for e in err.errors())  # fmt: skip
        raise UserError(re.sub(r"data\.(\w+)", lambda key: "--" + key[1].replace("_", "-"), problems)) from None


def cmd_preprocess(args: argparse.Namespace) -> None:
    from vidray.data.preprocess import preprocess

    data = preprocess_settings(args)
    summary = preprocess(data.manifest, data.dataset_dir, **{key: getattr(data, key) for key in PREPROCESS_KEYS},
                         verbose=args.verbose, retry_crashed=args.retry_crashed, shared_filesystem=args.shared_filesystem)
    _print_summary(summary, disconnect_ray=True)


def cmd_demo_data(args: argparse.Namespace) -> None:
    from vidray.data.demo import generate_demo_videos

    _print_summary(generate_demo_videos(Path(args.out), classes=args.classes, videos_per_class=args.videos_per_class, seed=args.seed))


def cmd_report_data(args: argparse.Namespace) -> None:
    from vidray.report.data_figures import plot_data_report

    paths = plot_data_report(Path(args.manifest), Path(args.out))
    _print_summary({"figures": [str(p) for p in paths]})


def cmd_prepare(args: argparse.Namespace) -> None:
    from vidray.cluster import init_ray
    from vidray.config import load_config
    from vidray.data.dataset import read_dataset_info
    from vidray.data.prepare import prepare_dataset

    cfg = load_config(args.config, args.overrides)
    init_ray(verbose=args.verbose)
    dataset_dir = prepare_dataset(cfg, verbose=args.verbose, retry_crashed=args.retry_crashed)
    info = read_dataset_info(dataset_dir)
    _print_summary({"dataset_dir": dataset_dir, "classes": info.num_classes, "videos": info.split_counts}, disconnect_ray=True)


def cmd_train(args: argparse.Namespace) -> None:
    from vidray.config import load_config

    # The config before the driver: a bad file or key fails in a second, not after importing torch and Ray.
    cfg = load_config(args.config, args.overrides)
    from vidray.train.driver import run_training
    from vidray.train.follow import TENSORBOARD_DIR, tracking_dir

    summary = run_training(cfg, restart=args.restart, verbose=args.verbose)
    best = summary["best"]
    if best:
        curves = tracking_dir(summary["run_dir"]) / TENSORBOARD_DIR
        _tell(f"vidray train: best val macro-F1 {best['val_macro_f1']:.4f} at epoch {int(best['epoch'])} "
              f"({summary['best_checkpoint']}); learning curves: tensorboard --logdir {curves}")
    _print_summary(summary, disconnect_ray=True)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from vidray.config import load_config

    cfg = load_config(args.config, args.overrides)  # before the driver's imports, as in cmd_train
    from vidray.pretrain.checks import PRETRAINING_SETS, check_pretrain_config
    from vidray.train.runs import refuse_ignored_overrides

    refuse_ignored_overrides("vidray pretrain", args.overrides, PRETRAINING_SETS)
    check_pretrain_config(cfg)  # a run that cannot work fails here, in about two seconds, before Ray is imported
    import ray

    from vidray.pretrain.driver import run_pretraining

    # A caller already connected to Ray (a test or notebook running the CLI in-process) keeps its connection.
    connected_before = ray.is_initialized()
    summary = run_pretraining(cfg, restart=args.restart, verbose=args.verbose)
    sizes = "".join(f" model.{key}=null" for key in ("patch_size", "tubelet_size") if getattr(cfg.model, key))  # scratch's
    _tell(f"vidray pretrain: encoder in {summary['model_dir']}; fine-tune from it with model.init=pretrained "
          f"model.name_or_path={summary['model_dir']}{sizes}")
    _print_summary(summary, disconnect_ray=not connected_before)


def cmd_tune(args: argparse.Namespace) -> None:
    from vidray.config import load_config

    cfg = load_config(args.config, args.overrides)  # before the sweep's imports, as in cmd_train
    from vidray.report.results import report_sweep
    from vidray.train.runs import SWEEP_SETS, refuse_ignored_overrides
    from vidray.tune.sweep import run_sweep

    refuse_ignored_overrides("vidray tune", args.overrides, SWEEP_SETS)

    # The sweep trains (or, when it had finished, finds its trials); the report stage writes and prints its results.
    _print_summary(report_sweep(run_sweep(cfg, restart=args.restart, verbose=args.verbose)), disconnect_ray=True)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from vidray.infer.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        Path(args.checkpoint), args.data, split=args.split, out_dir=Path(args.out), batch_size=args.batch_size,
        clips=args.clips, crops=args.crops,
    )
    _tell(
        f"vidray evaluate: {metrics['split']} split, {metrics['num_samples']} videos, {metrics['protocol']}: "
        f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, loss {metrics['loss']:.4f} "
        f"-> {metrics['files']['confusion_png']}, {metrics['files']['per_class_md']}"
    )
    _print_summary(metrics)


def cmd_export(args: argparse.Namespace) -> None:
    from vidray.infer.export import CUSTOM_CODE_FILE, export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)  # a bucket's checkpoint downloaded, a URI --out refused
    remote = ", trust_remote_code=True" if (out / CUSTOM_CODE_FILE).is_file() else ""
    _tell(f'vidray export: {out} (model card: {out / "README.md"}); load it with '
          f'pipeline("video-classification", model="{out}"{remote})')
    _print_summary({"exported": str(out)})


def _predict_line(summary: dict) -> str:
    """The console's closing line for `vidray predict --out`: how the corpus came out, and where."""
    from vidray.data.shard_files import WORKER_CRASH, crash_hint

    rejected = ", ".join(f"{category} {count}" for category, count in summary["rejected_by"].items())
    rejected += crash_hint(summary["rejected_by"].get(WORKER_CRASH, 0))
    return (f"vidray predict: {summary['predicted']} of {summary['discovered']} videos labelled"
            + (f" ({summary['reused']} from an earlier run)" if summary["reused"] else "")
            + (f", {summary['rejected']} rejected ({rejected}; reasons in {summary['rejects']})" if rejected else "")
            + f" -> {summary['predictions']}")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> None:
    if args.out:
        import ray

        from vidray.infer.batch_predict import predict_corpus

        # A caller already connected to Ray (a test or notebook running the CLI in-process) keeps its connection.
        connected_before = ray.is_initialized()
        summary = predict_corpus(Path(args.model), args.videos, args.out, top_k=args.top_k, clips=args.clips,
                                 crops=args.crops, embeddings=args.embeddings, batch_size=args.batch_size, actors=args.actors,
                                 actor_cpus=args.actor_cpus, videos_per_chunk=args.videos_per_chunk,
                                 stages=args.stages, decoder=args.decoder, verbose=args.verbose,
                                 retry_crashed=args.retry_crashed)  # fmt: skip
        _tell(_predict_line(summary))
        _print_summary(summary, disconnect_ray=not connected_before)
        return
    if args.embeddings:
        raise UserError("--embeddings needs --out (embeddings are written to OUT/predictions.parquet)")
    from os.path import expanduser  # not Path.expanduser: it raises on `~name` where no user has that name
    from vidray.storage import is_uri, is_web_url
    args.videos = [v if is_uri(v) else expanduser(v) for v in args.videos]  # a `~` no shell expanded
    folders = [v for v in args.videos if Path(v).is_dir() or (is_uri(v) and not is_web_url(v)) or v.endswith(".parquet")]
    if folders:
        raise UserError(f"{folders[0]}: folders, manifests and s3:// / gs:// URIs need --out OUT (Ray Data batch prediction)")
    from vidray.infer.predict import predict_videos, raise_for_unreadable  # torch: the batch driver does without

    videos = [v if is_web_url(v) else Path(v) for v in args.videos]  # a URL as a Path would lose its "//"
    results = predict_videos(Path(args.model), videos, top_k=args.top_k, clips=args.clips, crops=args.crops,
                             decoder=args.decoder)  # fmt: skip
    for item in results:
        labels = ", ".join(f"{p['label']} {p['score']:.3f}" for p in item["predictions"])
        reason = item.get("error", "").removeprefix(f"{item['video']}: ")  # the error names the video too
        print(f"{item['video']}: {labels or f'unreadable: {reason}'}")
    _print_summary({"results": results})
    raise_for_unreadable(results)  # the readable videos are reported above; exit 2 if any was not


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vidray",
        description="Video classification on Ray: index videos, preprocess them into sharded Parquet (Ray Data), "
        "fine-tune or pretrain VideoMAE (Ray Train), sweep (Ray Tune), evaluate, export for transformers.pipeline "
        "and label a corpus. The usual order: index, preprocess, train or tune, evaluate, export, predict; "
        "`vidray tune` alone runs it all on the embedded demo.",
        epilog="`vidray COMMAND --help` for a command's options; README.md walks through them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="list videos and labels into a manifest Parquet file")
    index_sub = index.add_subparsers(dest="layout", required=True)
    folder = index_sub.add_parser("folder", help="ROOT/{train,val,test}/<Class>/<video>")
    folder.add_argument("root", help="split folders train/, val/, test/ (or as Hugging Face datasets names them: "
                                     "training/, validation/, dev/, testing/, ..., any case), a folder per class in each")
    folder.add_argument("--out", required=True, help="manifest .parquet to write")
    folder.add_argument("--no-probe", action="store_true", help="skip reading duration/fps/size")
    folder.add_argument(
        "--val-fraction", type=float, default=DataSettings().val_fraction,
        help="ROOT without val/: this share of each class's train videos is val, the same ones every time "
             "(data.val_fraction; default %(default)s, 0 for none)",
    )  # fmt: skip
    folder.set_defaults(func=cmd_index_folder)
    coin = index_sub.add_parser("coin", help="COIN.json annotations + taxonomy -> 12 domain (or 180 task) classes")
    coin.add_argument("--annotations", nargs="+", required=True, help="COIN.json files (subset training -> train, testing -> val)")
    coin.add_argument("--taxonomy", required=True, help="taxonomy_domains.csv")
    coin.add_argument("--videos", required=True, help="downloaded videos: DIR/<recipe_type>/<id>.mp4 or DIR/<id>.mp4")
    coin.add_argument("--min-duration", type=float, default=None, help="seconds (COIN.json's duration): shorter videos are left out")
    coin.add_argument("--max-duration", type=float, default=None, help="seconds (COIN.json's duration): longer videos are left out")
    coin.add_argument("--out", required=True, help="manifest Parquet file to write")
    coin.add_argument("--no-probe", action="store_true", help="skip reading duration/fps/size")
    coin.add_argument("--labels", choices=["domain", "task"], default="domain",
                      help="classes: COIN's 12 domains (default) or its 180 tasks (published COIN results)")
    coin.set_defaults(func=cmd_index_coin)

    pre = sub.add_parser("preprocess", help="decode + resize videos on Ray Data into sharded Parquet")
    pre.add_argument("--manifest", required=True, help="manifest .parquet written by `vidray index`")
    pre.add_argument("--out", required=True, help="dataset directory (local path or s3:// / gs:// URI)")
    # Each flag's default is its data.* key's (preprocess_settings), so a training config of the same frames and
    # size stores the same clips.
    data = DataSettings()
    for flag, kind, help_text in (
        ("frames", int, "frames the model eats per clip"), ("size", int, "model input side in pixels"),
        ("stored-frames", int, "frames stored per video, >= --frames"), ("stored-size", int, "stored square side, >= --size"),
        ("videos-per-shard", int, "videos per Parquet shard = per Ray task"), ("decoder", DECODERS, "decoding library"),
        ("decoder-device", ["cpu", "cuda"], "cuda: torchcodec on the GPU (NVDEC)"),
        ("store", STORES, "how clips are stored: raw uint8 (exact) or jpeg per frame (~9x smaller, decoded while training)"),
        ("jpeg-quality", int, "--store jpeg only"),
        ("dispatch", DISPATCHES, "who hands out the decode tasks: Ray Data or plain Ray tasks (the same shards; the "
         "first task starts 1.3-1.9 s sooner)"),
    ):  # fmt: skip
        key = flag.replace("-", "_")
        pre.add_argument(f"--{flag}", default=None, help=f"{help_text} (data.{key}; default {getattr(data, key)})",
                         **({"type": kind} if kind is int else {"choices": kind}))  # fmt: skip
    pre.add_argument("--shared-filesystem", action="store_true", help="--out is mounted at the same place on every node "
                     "of a multi-node cluster (run.shared_filesystem): a node-local --out is refused there")  # fmt: skip
    _add_retry_crashed_arg(pre)
    _add_verbose_arg(pre)
    pre.set_defaults(func=cmd_preprocess)

    demo = sub.add_parser("demo-data", help="write the synthetic demo dataset as real H.264 files")
    demo.add_argument("--out", required=True, help="folder to write OUT/{train,val,test}/<Class>/*.mp4 into (new or empty)")
    demo.add_argument("--classes", type=int, default=8, help="synthetic classes: an even number from 2 to 12, in time-reversed pairs (default %(default)s)")
    demo.add_argument("--videos-per-class", type=int, default=12, help="spread over train/val/test (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="the same seed writes the same videos (default %(default)s)")
    demo.set_defaults(func=cmd_demo_data)

    report = sub.add_parser("report", help="figures of a manifest: its classes and durations (a sweep writes its own)")
    report_sub = report.add_subparsers(dest="what", required=True)
    report_data = report_sub.add_parser("data", help="class and duration distributions of a manifest")
    report_data.add_argument("--manifest", required=True, help="manifest .parquet written by `vidray index`")
    report_data.add_argument("--out", default="reports/figures", help="folder for the figures (default %(default)s)")
    report_data.set_defaults(func=cmd_report_data)

    prepare = sub.add_parser("prepare", help="make the dataset a config describes: generate (demo), index and preprocess, no training")
    _add_config_args(prepare)
    _add_retry_crashed_arg(prepare)
    _add_verbose_arg(prepare)
    prepare.set_defaults(func=cmd_prepare)

    # The commands that run on Ray and keep a folder under run.storage_path: the same arguments each.
    for name, help_text, what, folder, func in (
        ("train", "fine-tune on Ray Train", "run", "run.name", cmd_train),
        ("pretrain", "VideoMAE masked-autoencoder pretraining on Ray Train (no labels)", "run", "<run.name>-pretrain",
         cmd_pretrain),
        ("tune", "Ray Tune sweep over MixUp alpha, lr and weight decay", "sweep", "run.name", cmd_tune),
    ):  # fmt: skip
        command = sub.add_parser(name, help=help_text)
        _add_config_args(command)
        _add_rerun_args(command, what, folder=folder)
        command.set_defaults(func=func)

    ev = sub.add_parser("evaluate", help="metrics, per-class report and confusion matrix")
    ev.add_argument("--checkpoint", required=True,
                    help="checkpoint directory of a run (the train summary's best_checkpoint), or a `vidray export` directory")
    ev.add_argument("--data", required=True, help="dataset directory written by preprocess")
    ev.add_argument("--split", default="val", choices=SPLITS, help="which split's videos (default %(default)s)")
    ev.add_argument("--out", default="reports/eval",
                    help="folder for metrics.json, per_class.md and confusion_matrix.png (default %(default)s)")
    ev.add_argument("--batch-size", type=int, default=8, help="videos per forward pass (default %(default)s)")
    _add_view_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="save_pretrained model + processor for transformers.pipeline")
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory of a run (the train summary's best_checkpoint, on a bucket too)")
    ex.add_argument("--out", required=True, help="local folder to write, loadable by transformers.pipeline; new or an earlier export")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="top-k labels for video files; with --out, for a whole corpus on Ray Data (resumable)")
    pr.add_argument("--model", required=True, help="directory written by `vidray export`, or a checkpoint")
    pr.add_argument(
        "videos", nargs="+", metavar="INPUT",
        help="video files or http(s):// URLs of videos; with --out also folders (searched recursively), manifest "
             ".parquet files (a path column of files or URLs), s3:// / gs:// URIs",
    )  # fmt: skip
    pr.add_argument("--top-k", type=int, default=3, help="labels per video, best first (default %(default)s)")
    pr.add_argument("--out", default=None, help="write OUT/predictions.parquet and OUT/rejects.csv on Ray Data")
    pr.add_argument("--embeddings", action="store_true", help="with --out: add the pooled encoder features")
    pr.add_argument("--batch-size", type=int, default=8, help="with --out: videos per model batch")
    pr.add_argument("--actors", type=int, default=None, help="with --out: most model actors (default: one per GPU; fused: one per CPU)")
    pr.add_argument(
        "--stages", default="auto",
        help="with --out: fused = one actor per CPU decodes and predicts; two = decode tasks feed model actors "
        "(default auto: fused on CPU-only clusters, two on GPU clusters)",
    )
    pr.add_argument(
        "--actor-cpus", type=float, default=0.0,
        help="with --out --stages two on CPU-only clusters: CPUs each model actor reserves (default 0: it shares the decode CPUs)",
    )  # fmt: skip
    pr.add_argument("--videos-per-chunk", type=int, default=None,
                    help="with --out: videos per decode task and per resumable part (default: up to 16, at least 32 chunks)")
    pr.add_argument(
        "--decoder", choices=DECODERS, default=None,
        help="decoding library (default: the one the model's training data was decoded with; another reads the "
             "same frames within a few grey levels, and a file that one refuses)",
    )  # fmt: skip
    _add_retry_crashed_arg(pr, then=", and predict them (with --out)")
    _add_view_args(pr)
    _add_verbose_arg(pr, "with --out: show Ray's own logs")
    pr.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Overrides may come before, between or after options: argparse leaves those after an option over
    # (parse_intermixed_args refuses subcommands), and an unknown option is refused under its command's usage.
    args, extra = build_parser().parse_known_args(argv)
    if unknown := [arg for arg in extra if arg.startswith("-") or not hasattr(args, "overrides")]:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    try:
        args.func(args)
    except UserError as err:
        print(f"vidray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        detail = f": {err}" if isinstance(err, Interrupted) else ""
        print(f"vidray {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
