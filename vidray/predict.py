"""Top-k labels for video files, decoded and transformed exactly as evaluation does.

Each video goes through :func:`vidray.video.read_clip` (``stored_frames``
segment-centre frames over the whole video, short side to ``stored_size``,
centre square) and the inference step every evaluation uses
(:func:`vidray.inference.clip_logits`), then a softmax. So a video gets the same prediction here as it
would in ``vidray evaluate`` had it been preprocessed into the dataset.

A video that cannot be read does not stop the others: its entry carries an
``"error"`` (naming the file and the reason) and no predictions. The CLI
prints every result and then exits 2 when any video failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vidray.errors import UserError


@torch.no_grad()
def predict_videos(model_dir: Path, videos: list[Path], top_k: int = 3) -> list[dict[str, Any]]:
    """``[{"video", "predictions": [{"label", "score"}, ...]}]`` in input order, best first.

    ``model_dir`` is an export or a checkpoint directory. Scores are softmax
    probabilities of the clip-averaged logits. An unreadable video gets
    ``{"video", "error", "predictions": []}`` instead; a bad ``model_dir`` or
    ``top_k`` raises :class:`UserError`.
    """
    from vidray.checkpoint import clip_shape_of, eval_clips_of, load_trained_model
    from vidray.inference import clip_logits, inference_device
    from vidray.model import to_device
    from vidray.video import VideoError, read_clip

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    model, info = load_trained_model(Path(model_dir))
    shape = clip_shape_of(info)
    classes = shape.classes
    clips = eval_clips_of(info)
    device = inference_device()
    to_device(model, device)  # with its position table: no copy of it in every forward

    results = []
    for video in videos:
        try:
            # Decoded by the decoder the training shards were made with (recorded in the checkpoint).
            clip = read_clip(video, shape.stored_frames, shape.stored_size, decoder=shape.decoder)
        except VideoError as err:
            results.append({"video": str(video), "error": str(err), "predictions": []})
            continue
        frames = torch.from_numpy(clip.frames).unsqueeze(0).to(device)
        logits = clip_logits(model, frames, frames=shape.frames, size=shape.size, clips=clips)
        probs = logits.softmax(-1)[0].cpu()
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
