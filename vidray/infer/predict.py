"""Top-k labels for video files, decoded and transformed exactly as evaluation does.

:class:`Classifier` is the one prediction step of both ``vidray predict`` modes:
a stored clip (:func:`vidray.data.video.read_clip`: ``stored_frames`` segment-centre
frames over the whole video, short side to ``stored_size``, centre square) goes
through the inference step every evaluation uses (:func:`vidray.model.inference.clip_outputs`,
with the same :class:`~vidray.model.inference.Views`), then a softmax. So a video gets
the same prediction here, in the Ray Data corpus mode (vidray/infer/batch_predict.py)
and in ``vidray evaluate`` had it been preprocessed into the dataset.

This module is the one-by-one mode (``vidray predict`` without ``--out``), for a
handful of files: a video that cannot be read does not stop the others: its entry
carries an ``"error"`` (naming the file and the reason) and no predictions. The
CLI prints every result and then exits 2 when any video failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidray.config import DecoderName
from vidray.data.listing import as_text
from vidray.data.shards import DecodeSettings
from vidray.data.video import chosen_decoder
from vidray.errors import UserError
from vidray.infer.corpus import fetch_or_reject
from vidray.model.checkpoint import clip_shape_of, eval_clips_of
from vidray.model.classifier import load_trained_model, to_device
from vidray.model.inference import Views, clip_outputs, inference_device


class Classifier:
    """A trained model loaded once, with its clip shape, classes and views: clips in, top-k rows out."""

    def __init__(self, model_dir: Path, top_k: int = 3, clips: int | None = None, crops: int = 1,
                 device: torch.device | None = None):  # fmt: skip
        if top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {top_k}")
        Views(1 if clips is None else clips, crops)  # a bad view count fails before the model loads
        self.model, info = load_trained_model(Path(model_dir))
        self.shape = clip_shape_of(info)
        self.classes = list(self.shape.classes)
        # The default is the view training validated with: train.eval_clips clips, the centre crop.
        self.views = Views(eval_clips_of(info) if clips is None else clips, crops)
        self.top_k = min(top_k, len(self.classes))
        self.device = device or inference_device()
        to_device(self.model, self.device)  # with its position table: no copy of it in every forward

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return self.shape.stored_video_shape

    @torch.no_grad()
    def predict(self, clips: np.ndarray, features: bool = False) -> list[dict[str, Any]]:
        """uint8 ``[B, stored_frames, S, S, 3]`` -> per video ``{"label", "score", "top_k": [{"label", "score"}]}``
        (plus ``"embedding"``, float32 ``[H]``, with ``features``). Scores are softmax probabilities
        of the view-averaged logits."""
        videos = torch.from_numpy(np.ascontiguousarray(clips)).to(self.device)
        logits, pooled = clip_outputs(self.model, videos, frames=self.shape.frames, size=self.shape.size,
                                      views=self.views, features=features)  # fmt: skip
        scores, ids = logits.softmax(-1).topk(self.top_k, dim=-1)
        rows = []
        for i, (top_scores, top_ids) in enumerate(zip(scores.cpu().tolist(), ids.cpu().tolist())):
            top = [{"label": self.classes[c], "score": float(s)} for s, c in zip(top_scores, top_ids)]
            row: dict[str, Any] = {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}
            if pooled is not None:
                row["embedding"] = pooled[i].cpu().numpy().astype(np.float32)
            rows.append(row)
        return rows


def predict_videos(
    model_dir: Path, videos: list[Path | str], top_k: int = 3, clips: int | None = None, crops: int = 1,
    decoder: DecoderName | None = None,
) -> list[dict[str, Any]]:
    """``[{"video", "predictions": [{"label", "score"}, ...]}]`` in input order, best first.

    ``videos`` are local files or http(s):// URLs (each downloaded, then read). ``model_dir`` is an export or a
    checkpoint directory; ``clips`` (default: the
    checkpoint's ``train.eval_clips``) x ``crops`` are the views averaged; ``decoder`` (default: the one its
    training data was decoded with) reads the videos. An unreadable video gets ``{"video", "error",
    "predictions": []}`` instead; a bad ``model_dir`` or ``top_k`` raises :class:`UserError`. ``video`` names the
    file as :func:`vidray.data.listing.as_text` shows it (a name that is not UTF-8, escaped), so the results print
    and serialize as text.
    """
    classifier = Classifier(Path(model_dir), top_k=top_k, clips=clips, crops=crops)
    shape = classifier.shape
    decoder = chosen_decoder(decoder, shape.decoder)
    settings = DecodeSettings(shape.stored_frames, shape.stored_size, decoder)
    results = []
    for video in videos:
        name = as_text(str(video))
        # The --out mode's decode-or-reject: a file whose decoder raised anything but a VideoError ended the
        # command in a traceback here, the videos after it not predicted.
        clip, _, reason = fetch_or_reject(str(video), settings, num_threads=0)  # one video at a time: every core
        if clip is None:
            results.append({"video": name, "error": f"{name}: {as_text(reason)}", "predictions": []})
            continue
        (row,) = classifier.predict(clip.frames[None])
        results.append({"video": name, "predictions": row["top_k"]})
    return results


def raise_for_unreadable(results: list[dict[str, Any]]) -> None:
    """One UserError naming every video that could not be read (after the others were reported)."""
    failed = [item["error"] for item in results if "error" in item]
    if len(failed) == 1 and len(results) == 1:
        raise UserError(failed[0])
    if failed:
        raise UserError(f"could not read {len(failed)} of {len(results)} videos: " + "; ".join(failed))
