"""The transformers side of tests/test_pipeline_parity.py, run in the pipeline environment.

That environment (``make pipeline-env``: .venv-pipeline) has what a user of an
export has on a GPU node: PyPI's torch with torchvision and torchcodec, and
transformers; not vidray. vidray's own venv keeps its CPU torch, beside which
PyPI's torchvision does not import. So this script imports nothing from vidray.

    .venv-pipeline/bin/python tests/pipeline_side.py REQUEST.json

REQUEST: ``{"model": DIR, "videos": [path, ...], "trust_remote_code": bool}``.
Prints one JSON object: the processor the pipeline picked, its settings, the
warnings transformers logged, and per video the labels and scores, best first.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import transformers
        from transformers import AutoVideoProcessor, pipeline

        torch.manual_seed(0)
        remote = bool(request.get("trust_remote_code"))
        processor = AutoVideoProcessor.from_pretrained(request["model"])
        classifier = pipeline("video-classification", model=request["model"], trust_remote_code=remote)
        results = []
        for video in request["videos"]:
            try:
                ranked = classifier(video, top_k=classifier.model.config.num_labels)
                results.append({"video": video, "predictions": ranked})
            except Exception as err:  # noqa: BLE001 - reported per video, as vidray predict does
                results.append({"video": video, "error": f"{type(err).__name__}: {err}", "predictions": []})
    picked = classifier.video_processor
    print(
        json.dumps(
            {
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "auto_video_processor": type(processor).__name__,
                "pipeline_video_processor": type(picked).__name__ if picked is not None else None,
                "settings": {k: v for k, v in picked.to_dict().items() if not k.startswith("_")} if picked else None,
                "model_class": type(classifier.model).__name__,
                "warnings": messages + [str(w.message) for w in caught],
                "results": results,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
