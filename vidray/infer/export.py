"""A trained checkpoint as a self-contained Hugging Face model directory.

``vidray export --checkpoint C --out DIR`` writes::

    DIR/
      config.json                     id2label / label2id, num_frames, image_size
      model.safetensors
      video_preprocessor_config.json  VideoMAEVideoProcessor: frames over the whole video, resize,
                                      centre crop, mean/std as in evaluation (what the pipeline uses)
      preprocessor_config.json        VideoMAEImageProcessor, the same spatial transform, for clients
                                      without torchvision (the pipeline then reads the first frames)
      vidray.json                     data shape, eval clips, source checkpoint, its epoch and metrics
      modeling_vidray_videomae.py     only when the position table was interpolated (see below)

so that ``transformers.pipeline("video-classification", model=DIR)`` and
``vidray predict --model DIR`` both load it.

Preprocessing. vidray decodes ``stored_frames`` frames at the starts of
equal segments of the video, short side resized to ``stored_size``, centre
crop; evaluation then takes ``frames`` of them, evenly strided from the first,
and centre-crops ``size`` (:func:`vidray.model.transforms.eval_transform`).
The video processor is transformers' stock ``VideoMAEVideoProcessor`` (no
custom code) with ``do_sample_frames`` and ``num_frames = frames``: the pipeline
decodes frame ``i * N // frames`` of a video of ``N`` frames, the same frames
(:func:`vidray_frame_positions`, :func:`pipeline_frame_positions`), resizes the
short side to ``stored_size`` (bilinear) and centre-crops ``size``, normalised
with the ImageNet mean/std of :mod:`vidray.model.transforms`.
:func:`sampling_differences` lists what still differs, and the model card repeats it.

Position table. When training interpolated the pretrained sinusoid table to a
new token grid (``vidray_pos_embed_grid`` in config.json, see
:mod:`vidray.model.classifier`), stock ``VideoMAEForVideoClassification`` would rebuild
HF's plain 1-D table on load and silently predict with a table the model never
saw. Such exports get ``model_type: vidray_videomae`` and a small custom-code
module (``auto_map``) that rebuilds the interpolated table, so they load with
``pipeline(..., trust_remote_code=True)`` and refuse to load without it
instead of loading wrong (transformers has no option for such a table:
huggingface/transformers#30579). The processors stay stock either way.
Exports without an interpolated table are plain ``videomae`` models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from vidray.compat import EXPORT_CODE_PRIVATE_IMPORTS, videomae_image_processor_class
from vidray.data.dataset import ClipShape
from vidray.data.clip import segment_indices
from vidray.errors import UserError
from vidray.infer.export_folder import UNFINISHED, carry_repository, clear_leftover, delete_folder, is_export
from vidray.model.checkpoint import INFO, eval_clips_of, quiet_progress_bars
from vidray.model.classifier import CUSTOM_MODEL_TYPE, POS_GRID_KEY, downloaded_checkpoint, load_trained_model, token_grid
from vidray.model.transforms import MEAN, STD
from vidray.storage import is_uri, scratch, without_credentials

CUSTOM_CODE_FILE = "modeling_vidray_videomae.py"

# Self-contained (torch + transformers only): the export directory must not need vidray installed.
# tests/test_export_predict.py checks the table it builds equals vidray.model.classifier.interpolate_position_table.
CUSTOM_CODE = '''\
"""VideoMAE fine-tuned by vidray with its sinusoid position table resized from the
token grid it was pretrained on (``vidray_pos_embed_grid``) to the grid it runs at.

Stock VideoMAE rebuilds a 1-D sinusoid table for the current token count, which
is not the table this model was trained with; this class rebuilds the right one.
"""

import torch.nn.functional as F
from transformers import VideoMAEConfig, VideoMAEForVideoClassification
''' + EXPORT_CODE_PRIVATE_IMPORTS + '''

class VidrayVideoMAEConfig(VideoMAEConfig):
    model_type = "vidray_videomae"


def _side(value):
    return value if isinstance(value, int) else value[0]


class VidrayVideoMAEForVideoClassification(VideoMAEForVideoClassification):
    config_class = VidrayVideoMAEConfig

    def __init__(self, config):
        super().__init__(config)
        source = tuple(config.vidray_pos_embed_grid)
        cells = _side(config.image_size) // _side(config.patch_size)
        target = (config.num_frames // config.tubelet_size, cells, cells)
        hidden = config.hidden_size
        table = get_sinusoid_encoding_table(source[0] * source[1] * source[2], hidden)
        grid = table.reshape(1, *source, hidden).permute(0, 4, 1, 2, 3)
        grid = F.interpolate(grid, size=target, mode="trilinear", align_corners=False)
        self.videomae.embeddings.position_embeddings = grid.permute(0, 2, 3, 4, 1).reshape(1, -1, hidden).contiguous()
'''


def image_processor_for(data: dict[str, Any]):
    """The VideoMAE image processor that reproduces evaluation's spatial transform for ``data``."""
    return videomae_image_processor_class()(
        do_resize=True,
        size={"shortest_edge": int(data["stored_size"])},
        resample=2,  # PIL bilinear
        do_center_crop=True,
        crop_size={"height": int(data["size"]), "width": int(data["size"])},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    )


VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"


def video_processor_config(data: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``VideoMAEVideoProcessor`` settings that reproduce evaluation's input for ``data``.

    Written as JSON, not through the class: the class needs torchvision, which
    vidray itself does not (tests/test_pipeline_parity.py loads it with
    ``AutoVideoProcessor`` where torchvision is installed and checks every value).
    """
    return {
        "video_processor_type": "VideoMAEVideoProcessor",
        # Frames over the whole video: i * N // num_frames (transformers' default_sample_indices_fn).
        "do_sample_frames": True,
        "num_frames": int(data["frames"]),
        "fps": None,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(data["stored_size"])},
        "default_to_square": False,
        "resample": 2,  # bilinear
        "do_center_crop": True,
        "crop_size": {"height": int(data["size"]), "width": int(data["size"])},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(MEAN),
        "image_std": list(STD),
    }


def vidray_frame_positions(num_frames: int, data: dict[str, Any]) -> list[int]:
    """The source frames vidray's evaluation view shows the model for a video of ``num_frames`` frames:
    ``stored_frames`` segment starts, then ``frames`` of those, evenly strided from the first
    (read_clip then eval_transform with one clip)."""
    stored = segment_indices(num_frames, int(data["stored_frames"]))
    stride = int(data["stored_frames"]) / int(data["frames"])
    return [int(stored[min(int(j * stride), len(stored) - 1)]) for j in range(int(data["frames"]))]


def pipeline_frame_positions(num_frames: int, frames: int) -> list[int]:
    """The source frames transformers' video processor samples (``default_sample_indices_fn``)."""
    return [i * num_frames // frames for i in range(frames)]


def sampling_differences(data: dict[str, Any]) -> list[str]:
    """What still differs between ``pipeline(...)`` with the exported video processor and vidray's evaluation view."""
    frames, stored = int(data["frames"]), int(data["stored_frames"])
    if stored % frames == 0:
        position = (
            f"Frame positions: none. Both take frame i*N//{frames} of a video of N frames, the first of each of "
            f"{frames} equal segments (vidray stores {stored} segment starts and shows the model one in {stored // frames})."
        )
    else:
        position = (
            f"Frame position: transformers takes frame i*N//{frames} of N; vidray the nearest of its {stored} stored "
            f"segment starts at or before it ({stored} is not a multiple of {frames}): at most one stored segment earlier."
        )
    # Each claim below is checked against the pinned pipeline environment by tests/test_benchmarks.py
    # (test_the_model_card_says_what_transformers_pipeline_does_otherwise); measured per kind of file
    # by benchmarks/footage_matrix.py (docs/benchmarks.md, section 9).
    return [
        position,
        "Short videos: a video with fewer frames than the model's "
        f"{frames} makes transformers raise; vidray repeats frames evenly.",
        "Non-square pixels (DV, broadcast, some phone and web files): vidray stretches the width by the pixel "
        "aspect ratio, as a player shows the video; transformers' decoder (torchcodec 0.13) keeps the coded width, "
        "so the model sees such a video squeezed. Display rotation (phones) is applied by both.",
        "MPEG transport streams (.ts, .m2ts, .mts: screen recorders, camcorders, HLS) and DVD program streams "
        "(.mpg, .vob): torchcodec 0.13 fails on many of them in the pipeline, and on one captured mid-GOP it returns "
        "other frames than the positions asked for; vidray reads them.",
        "Resize: the same size (the short side scaled, the long side rounded down by both), with other filters: "
        "vidray resizes in the decoder (FFmpeg's swscale, bilinear), transformers resizes RGB frames with "
        "torchvision (bilinear, antialiased). The model inputs differ by 1-2.5 grey levels on average.",
        "A resolution change part-way (WebRTC and browser recordings adapt their resolution to the connection): "
        "torchcodec 0.13 fails on it in the pipeline; vidray scales every frame to the clip's size.",
        "Views: vidray's evaluation may average several temporal clips (train.eval_clips); the pipeline runs one.",
        "Trimmed videos (an edit list hiding the frames before the new start, as phones and `ffmpeg -ss ... -c copy` "
        "write them): torchcodec 0.13 can return the first shown keyframe for the frames before it; vidray decodes "
        "the frames a player shows.",
    ]


def _write_custom_code(directory: Path) -> None:
    (directory / CUSTOM_CODE_FILE).write_text(CUSTOM_CODE)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    module = CUSTOM_CODE_FILE.removesuffix(".py")
    config["model_type"] = CUSTOM_MODEL_TYPE
    config["auto_map"] = {
        "AutoConfig": f"{module}.VidrayVideoMAEConfig",
        "AutoModelForVideoClassification": f"{module}.VidrayVideoMAEForVideoClassification",
    }
    config["architectures"] = ["VidrayVideoMAEForVideoClassification"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """`vidray export`: :func:`export_model` of ``checkpoint`` as the command line names it (a bucket's, as
    `vidray train` reports best_checkpoint when run.storage_path is one, is downloaded first) to ``out``."""
    if is_uri(out):  # as a Path, s3://bucket/x is the local folder ./s3:/bucket/x: the export went there, exit 0
        shown = without_credentials(out)
        raise UserError(f"--out {shown} is a URI; vidray export writes a local folder: export to one, then upload "
                        f"it (e.g. `aws s3 cp --recursive DIR {shown}`)")  # fmt: skip
    if not is_uri(checkpoint):
        return export_model(Path(checkpoint), Path(out))
    with scratch("export") as folder, downloaded_checkpoint(checkpoint, Path(folder)) as local:  # errors name the URI
        return export_model(local, Path(out), origin=checkpoint)


def export_model(checkpoint: Path, out: Path, held_out: dict[str, Any] | None = None, origin: str | None = None) -> Path:
    """Write ``checkpoint`` (a `vidray train` checkpoint or an earlier export) to ``out``; returns ``out``.

    ``held_out``: metrics of the model on a held-out split (vidray.infer.evaluate's
    metrics.json), for the model card. ``origin``: where the checkpoint lives when ``checkpoint`` is a
    download of it (a bucket's), recorded as ``exported_from``. ``out`` must be new, empty, or an earlier
    export (replaced; a git clone of one keeps its repository), not the current folder or one above it. Written
    beside ``out`` and moved into place at the end, so a failed export never leaves a half-written
    model under the real name.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    # Written as resolved: `.`, `..` or `model/..` name a folder but have no name to put `.partial` after.
    folder = out.resolve()
    if folder == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; pass a new directory")
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_export(folder))):
        raise UserError(f"--out {out} exists and is not an earlier vidray export; pass a new or empty directory")
    here = Path.cwd().resolve()
    if folder == here or folder in here.parents:
        # The export replaces --out whole (below): the shell would be left in a deleted folder that looks empty.
        raise UserError(f"--out {out} is {'the current folder' if folder == here else 'above the current folder'} "
                        f"({folder}), which an export replaces as a whole; pass a folder of its own, "
                        f"e.g. --out {out / 'model'}")  # fmt: skip
    staging, aside = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".partial-old")
    for leftover in (staging, aside):
        clear_leftover(leftover, out)
    model, info = load_trained_model(checkpoint)
    data = info["data"]

    try:
        staging.mkdir(parents=True)
        (staging / UNFINISHED).touch()
    except OSError as err:  # a file where a parent folder should be, or no permission
        raise UserError(f"cannot write --out {out} ({err.strerror}); pass a new directory in a writable folder") from None
    with quiet_progress_bars():
        model.save_pretrained(staging, safe_serialization=True)
    image_processor_for(data).save_pretrained(staging)
    (staging / VIDEO_PROCESSOR_FILE).write_text(json.dumps(video_processor_config(data), indent=2, sort_keys=True) + "\n")
    pos_grid = getattr(model.config, POS_GRID_KEY, None)
    if pos_grid:
        _write_custom_code(staging)
    config = info.get("config") or {}
    export_info = {
        "data": ClipShape.from_dict(data).as_dict(),
        # Without credentials: a run on s3://KEY:SECRET@bucket would otherwise hand them to whoever gets the export.
        "config": without_credentials(config) if config.get("model") else {"train": {"eval_clips": eval_clips_of(info)}},
        "epoch": info.get("epoch"),
        "metrics": {k: v for k, v in (info.get("metrics") or {}).items() if isinstance(v, (int, float, str))},
        "held_out": _card_metrics(held_out) if held_out else info.get("held_out"),
        "exported_from": without_credentials(origin) if origin else str(checkpoint.resolve()),
    }
    (staging / INFO).write_text(json.dumps(export_info, indent=2, sort_keys=True, default=str) + "\n")
    (staging / "README.md").write_text(model_card(export_info, pos_grid, token_grid(model.config)))

    (staging / UNFINISHED).unlink()  # whole now: what a stop here leaves is still known (export_folder.is_export)
    # Moved aside, not deleted in place: a delete cut short (Ctrl-C) left --out half an export, which the next
    # export refused. --out is always one whole export now; a stop leaves what is left aside, deleted next time.
    if folder.exists():
        carry_repository(folder, staging, written_sometimes=(CUSTOM_CODE_FILE,))
        folder.replace(aside)
    staging.replace(folder)
    if aside.exists():
        try:
            delete_folder(aside)
        except OSError as err:
            print(f"vidray export: wrote {out}, but could not delete the earlier export moved aside to {aside} "
                  f"({err}): the next export to {out} deletes it, or delete it yourself", file=sys.stderr)
    return out


def _card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    # With its views (vidray.infer.evaluate): a sweep's tune.test_clips x tune.test_crops is not what predict runs by default.
    keys = ("split", "num_samples", "accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "loss",
            "eval_clips", "eval_crops", "protocol")  # fmt: skip
    return {k: metrics[k] for k in keys if k in metrics}


COIN_LICENSE_NOTICE = (
    "Trained on COIN (Tang et al., CVPR 2019), which is licensed CC BY-NC 4.0: this model is a derivative "
    "of it and may be used for non-commercial research only."
)


def _seconds(value) -> str:
    return "any" if value is None else f"{value:g}"


def _epochs_done(epoch: Any) -> Any:
    """A checkpoint's 0-based epoch as the epochs done, as vidray's console, results.md and Tune count them."""
    return epoch + 1 if isinstance(epoch, int) else "?"


def _hub_repo_id(name: str) -> bool:
    """Whether ``name`` is a Hub repo id (owner/name), as base_model must be for the Hub to take the card: not a URI
    (a `vidray pretrain` encoder on a bucket) nor a local path, found here or not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # transformers' own dependency

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1 and not name.startswith((".", "~")) and not Path(name).exists()


def _predict_line(export_info: dict[str, Any]) -> str:
    """The card's `vidray predict` command that predicts as the held-out number was measured: its views when they
    are not predict's default (the train.eval_clips it was validated with, one centre crop)."""
    held_out = export_info.get("held_out") or {}
    clips, crops = held_out.get("eval_clips"), held_out.get("eval_crops")
    views = f" --clips {clips}" if clips and clips != eval_clips_of(export_info) else ""
    views += f" --crops {crops}" if crops and crops != 1 else ""
    measured = f" ({held_out['protocol']} per video)" if views and held_out.get("protocol") else ""
    return f"`vidray predict --model PATH/TO/THIS/FOLDER{views} video.mp4` predicts exactly as evaluation did{measured}."


def model_card(export_info: dict[str, Any], pos_grid: list[int] | None, grid: tuple[int, int, int]) -> str:
    """The export's README.md: what the model is, what it was trained on, how well it does, how to load it.

    ``pos_grid``: the token grid the position table was interpolated from (None: not interpolated);
    ``grid``: the model's own (T, H, W) token grid.
    """
    data, config = export_info["data"], export_info.get("config") or {}
    model_cfg, data_cfg, train_cfg = config.get("model", {}), config.get("data", {}), config.get("train", {})
    source = data_cfg.get("source")
    pretrained = model_cfg.get("init") == "pretrained"
    base = model_cfg.get("name_or_path") if pretrained else None
    front = ["---", "library_name: transformers", "pipeline_tag: video-classification", "tags: [videomae, vidray]"]
    if base and _hub_repo_id(base):
        front.append(f"base_model: {base}")
    if source == "coin":
        front.append("license: cc-by-nc-4.0")
    front.append("---")

    classes = data["classes"]
    lines = [
        *front,
        "",
        f"# VideoMAE video classifier ({len(classes)} classes), fine-tuned with vidray",
        "",
        "## Model",
        "",
        f"- Start: {'`' + base + '`' if base else 'randomly initialised (' + str(model_cfg.get('size', '?')) + ' size, trained from scratch)'}.",
        f"- Input: {data['frames']} frames of {data['size']}x{data['size']} px per clip, sampled evenly over the whole "
        f"video ({data['stored_frames']} frames stored per video, short side resized to {data['stored_size']} px, centre crop).",
        f"- Classes: {', '.join(classes)}.",
        "",
        "## Training data",
        "",
        {
            "coin": ("COIN's 180 task classes" if data_cfg.get("coin_labels") == "task" else "COIN's 12 domain classes")
                    + " (instructional YouTube videos), as selected by the vidray config "
                    f"(durations {_seconds(data_cfg.get('min_duration'))}-{_seconds(data_cfg.get('max_duration'))} s).",
            "demo": "vidray's synthetic demo set: classes in time-reversed pairs, so only frame order separates them.",
            "folder": "A folder of videos laid out as ROOT/{train,val,test}/<Class>/<video>.",
        }.get(source, "Not recorded."),
    ]
    if train_cfg:
        lines += [
            "",
            f"Recipe: {train_cfg.get('epochs')} epochs, batch {train_cfg.get('batch_size')}, AdamW lr "
            f"{train_cfg.get('lr')}, weight decay {train_cfg.get('weight_decay')}, {train_cfg.get('scheduler', 'cosine')} "
            f"schedule, MixUp α {train_cfg.get('mixup_alpha')}, label smoothing {train_cfg.get('label_smoothing')}.",
        ]
    lines += ["", "## Results", "", "| split | videos | accuracy (= micro F1) | macro F1 |", "|---|---:|---:|---:|"]
    metrics = export_info.get("metrics") or {}
    if "val_accuracy" in metrics:
        lines.append(
            f"| val (epoch {_epochs_done(export_info.get('epoch'))}, during training) | {metrics.get('val_videos', '?')} | "
            f"{metrics['val_accuracy']:.3f} | {metrics.get('val_macro_f1', float('nan')):.3f} |"
        )
    held_out = export_info.get("held_out")
    if held_out:
        how = "held out" if held_out["split"] != "val" else "no test split: the one the model was chosen on"
        how += f", {held_out['protocol']} per video" if held_out.get("protocol") else ""
        lines.append(
            f"| {held_out['split']} ({how}) "
            f"| {held_out.get('num_samples', '?')} | {held_out['accuracy']:.3f} | "
            f"{held_out.get('macro_f1', float('nan')):.3f} |"
        )
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", ""]
    if pos_grid:
        lines += [
            'classifier = pipeline("video-classification", model="PATH/TO/THIS/FOLDER", trust_remote_code=True)',
            'print(classifier("video.mp4", top_k=3))',
            "```",
            "",
            "`trust_remote_code=True` is needed: training resized the pretrained sinusoid position table from the "
            f"checkpoint's {'x'.join(map(str, pos_grid))} token grid to this model's {'x'.join(map(str, grid))} grid "
            "(frames/tubelet x patches x patches), so every token keeps the position code of the same place in the "
            "clip. Stock VideoMAE would rebuild a plain 1-D table on load and predict with positions the model never "
            f"saw; `{CUSTOM_CODE_FILE}` (torch + transformers only) rebuilds the right one. A model whose table "
            "was never resized (trained at its pretrained checkpoint's resolution, or with "
            "`model.interpolate_pos_embed=false` from one whose table was not resized) loads without it.",
        ]
    else:
        lines += [
            'classifier = pipeline("video-classification", model="PATH/TO/THIS/FOLDER")',
            'print(classifier("video.mp4", top_k=3))',
            "```",
            "",
            "A plain VideoMAE model: no custom code, no `trust_remote_code`.",
        ]
    lines += [
        "",
        # av: transformers' VideoClassificationPipeline refuses to start without PyAV (requires_backends), torchcodec decoding or not.
        "Needs `torch`, `transformers`, `torchvision`, `torchcodec` (with FFmpeg's shared libraries) and `av` (PyAV, "
        "which transformers' video-classification pipeline requires to start): the pipeline "
        f"then uses this folder's video processor (`{VIDEO_PROCESSOR_FILE}`, stock `VideoMAEVideoProcessor`), which "
        f"decodes {data['frames']} frames spread over the whole video, resizes the short side to {data['stored_size']} px, "
        f"centre-crops {data['size']} px and normalises as evaluation did. Without torchvision, transformers falls back "
        "to `preprocessor_config.json` with a deprecation warning and reads only the first frames of each video: "
        "install torchvision rather than use that path. transformers 4.x always reads them so: its pipeline takes "
        f"{data['frames']} frames evenly from the first {data['frames']} x `frame_sampling_rate` (default 1), so "
        f"pass `frame_sampling_rate=N // {data['frames']}` for a video of N frames (then within one segment of "
        "vidray's positions), or use transformers 5.",
        "",
        "### What still differs from vidray's evaluation",
        "",
        *[f"- {line}" for line in sampling_differences(data)],
        "",
        _predict_line(export_info),
    ]
    if source == "coin":
        lines += ["", "## License", "", COIN_LICENSE_NOTICE]
    return "\n".join(lines) + "\n"
