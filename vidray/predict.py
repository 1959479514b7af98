"""Top-k labels for video files, decoded and transformed exactly as evaluation does.

Each video goes through :func:`vidray.video.read_clip` (``stored_frames``
segment-centre frames over the whole video, short side to ``stored_size``,
centre square) and :func:`vidray.augment.eval_transform` (evenly spaced
``frames``, centre crop to ``size``, ``eval_clips`` clips whose logits are
averaged), then a softmax. So a video gets the same prediction here as it
would in ``vidray evaluate`` had it been preprocessed into the dataset.

A video that cannot be read does not stop the others: its entry carries an
``"error"`` (naming the file and the reason) and no predictions. The CLI
prints every result and then exits 2 when any video failed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from vidray.errors import UserError

INFO = "vidray.json"
DATA_KEYS = ("frames", "size", "stored_frames", "stored_size", "classes")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_trained_model(path: Path) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, vidray.json) from a training checkpoint or a `vidray export` directory.

    A checkpoint holds the weights in ``path/model/``; an export holds them in
    ``path`` itself. Both carry ``vidray.json`` with the data shape the model
    was trained on (``data``: frames, size, stored_frames, stored_size, classes).
    """
    path = Path(path)
    hint = "pass a checkpoint directory written by `vidray train` or a directory written by `vidray export`"
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a directory ({hint})")
    info_path = path / INFO
    if not info_path.is_file():
        raise UserError(f"{path} is not a vidray checkpoint or export: {INFO} is missing ({hint})")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{info_path} is not valid JSON ({err}); the checkpoint is damaged") from None
    data = info.get("data") if isinstance(info, dict) else None
    missing = [k for k in DATA_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{info_path} lacks data.{missing[0]}; the checkpoint is damaged or from another tool")

    model_dir = path if (path / "config.json").is_file() else path / "model"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{path} holds no model/config.json: the checkpoint is incomplete ({hint})")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{model_dir} holds no model.safetensors: the checkpoint is incomplete (re-export or re-train)")
    from safetensors import SafetensorError

    try:
        with quiet_progress_bars():
            model = _load_classifier(model_dir)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(
            f"cannot load the model in {model_dir}: {_first_line(err)} (re-export or re-train)"
        ) from None

    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != list(data["classes"]):
        raise UserError(
            f"{model_dir}/config.json id2label {labels} does not match {info_path} classes {data['classes']}; "
            "the checkpoint is damaged"
        )
    return model.eval(), info


@contextlib.contextmanager
def quiet_progress_bars():
    """No "Loading weights" / "Writing model shards" bars on the terminal of a one-line command."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_classifier(model_dir: Path):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from vidray.export import CUSTOM_MODEL_TYPE
    from vidray.model import POS_GRID_KEY, install_position_table, load_model

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != CUSTOM_MODEL_TYPE:
        return load_model(str(model_dir))
    # An export that ships custom code for transformers.pipeline (see vidray/export.py): the
    # weights are plain VideoMAE, so load them into the stock class and restore the table here.
    for key in ("model_type", "auto_map", "architectures"):
        config.pop(key, None)
    model = VideoMAEForVideoClassification.from_pretrained(
        model_dir, config=VideoMAEConfig.from_dict(config), attn_implementation="sdpa"
    )
    install_position_table(model, tuple(config[POS_GRID_KEY]))
    return model


def eval_clips_of(info: dict[str, Any]) -> int:
    """Clips per video the model was validated with during training (1 when not recorded)."""
    return int(((info.get("config") or {}).get("train") or {}).get("eval_clips", 1))


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_videos(model_dir: Path, videos: list[Path], top_k: int = 3) -> list[dict[str, Any]]:
    """``[{"video", "predictions": [{"label", "score"}, ...]}]`` in input order, best first.

    ``model_dir`` is an export or a checkpoint directory. Scores are softmax
    probabilities of the clip-averaged logits. An unreadable video gets
    ``{"video", "error", "predictions": []}`` instead; a bad ``model_dir`` or
    ``top_k`` raises :class:`UserError`.
    """
    from vidray.augment import average_clip_logits, eval_transform
    from vidray.model import autocast
    from vidray.video import VideoError, read_clip

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    model, info = load_trained_model(Path(model_dir))
    data = info["data"]
    classes = list(data["classes"])
    clips = eval_clips_of(info)
    device = inference_device()
    model.to(device)

    results = []
    for video in videos:
        try:
            # The decoder the training shards were made with, when the checkpoint says (dataset.json's).
            clip = read_clip(video, int(data["stored_frames"]), int(data["stored_size"]),
                             decoder=data.get("decoder", "pyav"))  # fmt: skip
        except VideoError as err:
            results.append({"video": str(video), "error": str(err), "predictions": []})
            continue
        frames = torch.from_numpy(clip.frames).unsqueeze(0).to(device)
        pixels = eval_transform(frames, frames=int(data["frames"]), size=int(data["size"]), clips=clips)
        with autocast(device):
            logits = model(pixel_values=pixels).logits
        probs = average_clip_logits(logits.float(), clips).softmax(-1)[0].cpu()
        scores, ids = probs.topk(min(top_k, len(classes)))
        results.append(
            {
                "video": str(video),
                "predictions": [{"label": classes[i], "score": float(s)} for s, i in zip(scores.tolist(), ids.tolist())],
            }
        )
    return results


def raise_for_unreadable(results: list[dict[str, Any]]) -> None:
    """One UserError naming every video that could not be read (after the others were reported)."""
    failed = [item["error"] for item in results if "error" in item]
    if len(failed) == 1 and len(results) == 1:
        raise UserError(failed[0])
    if failed:
        raise UserError(f"could not read {len(failed)} of {len(results)} videos: " + "; ".join(failed))
