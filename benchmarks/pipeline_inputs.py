"""What transformers' video-classification pipeline feeds a model for each video, with the video
processor a vidray export carries. Run in the pipeline environment (``make pipeline-env``: PyPI's
torch with torchvision and torchcodec, transformers, no vidray), by benchmarks/footage_matrix.py:

    .venv-pipeline/bin/python benchmarks/pipeline_inputs.py PROCESSOR_DIR OUT.npz VIDEO...

PROCESSOR_DIR holds a ``video_preprocessor_config.json`` (vidray.infer.export.video_processor_config).
Each video goes through the pipeline's own ``preprocess`` (decode, frame sampling, resize, crop,
normalisation), as ``pipeline(...)(video)`` runs it; the model is a one-layer VideoMAE that never runs.
OUT.npz: for the i-th video, key ``str(i)``, its ``pixel_values`` back in 0-255, float32
``[frames, height, width, 3]``. Prints one JSON line: per video it could not read, transformers' error;
and the versions.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(argv: list[str]) -> None:
    processor_dir, out, *videos = argv
    import torch
    import torchcodec
    import transformers
    from transformers import AutoVideoProcessor, VideoMAEConfig, VideoMAEForVideoClassification, pipeline

    processor = AutoVideoProcessor.from_pretrained(processor_dir)
    size, frames = processor.crop_size["height"], processor.num_frames
    config = VideoMAEConfig(num_frames=frames, image_size=size, patch_size=size, tubelet_size=frames, hidden_size=8,
                            num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)  # fmt: skip
    classify = pipeline("video-classification", model=VideoMAEForVideoClassification(config), video_processor=processor)
    mean = np.array(processor.image_mean, np.float32)[:, None, None]
    std = np.array(processor.image_std, np.float32)[:, None, None]
    arrays, errors = {}, {}
    for i, video in enumerate(videos):
        try:
            pixels = classify.preprocess(video)["pixel_values"][0].to(torch.float32).numpy()  # [T, 3, H, W]
        except Exception as err:  # noqa: BLE001 - a file the pipeline cannot read is a result here
            errors[video] = f"{type(err).__name__}: {err}".replace("\n", " ")
            continue
        arrays[str(i)] = ((pixels * std + mean) * 255).transpose(0, 2, 3, 1)
    np.savez(out, **arrays)
    versions = {"torch": torch.__version__, "torchcodec": torchcodec.__version__, "transformers": transformers.__version__}
    print(json.dumps({"errors": errors, "versions": versions}))


if __name__ == "__main__":
    main(sys.argv[1:])
