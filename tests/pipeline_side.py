"""The transformers side of tests/test_pipeline_parity.py, run in the pipeline environment.

That environment (``make pipeline-env``: .venv-pipeline) has what a user of an
export has on a GPU node: PyPI's torch with torchvision and torchcodec, and
transformers; not vidray. vidray's own venv keeps its CPU torch, beside which
PyPI's torchvision does not import. So this script imports nothing from vidray.

    .venv-pipeline/bin/python tests/pipeline_side.py REQUEST.json
    .venv-pipeline/bin/python tests/pipeline_side.py --serve

REQUEST: ``{"model": DIR, "videos": [path, ...], "trust_remote_code": bool, "dtype": "bfloat16"}`` (dtype
optional: the pipeline's ``dtype=torch.<dtype>``, as a user loads a model on a GPU; default float32).
Prints one JSON object: the processor the pipeline picked, its settings, the
warnings transformers logged, and per video the labels and scores, best first.

``--serve`` imports torch and transformers once (seconds), then reads one REQUEST.json
path a line from stdin and answers each in a child forked from that state: every model
loads into a process that has imported what this script imports and nothing else (no
earlier request's model, remote code or once-only warning), as in a fresh interpreter.
The child writes the JSON object to REQUEST.json + ".out"; then the server prints
``<exit status> <REQUEST.json>``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings


def answer(request_path: str, messages: list[str], caught: list) -> dict:
    """The JSON object for one request (``messages`` and ``caught``: the warnings so far, imports' included)."""
    import torch
    import transformers
    from transformers import AutoVideoProcessor, pipeline

    with open(request_path) as f:
        request = json.load(f)
    torch.manual_seed(0)
    remote = bool(request.get("trust_remote_code"))
    processor = AutoVideoProcessor.from_pretrained(request["model"])
    dtype = getattr(torch, request.get("dtype") or "float32")
    classifier = pipeline("video-classification", model=request["model"], trust_remote_code=remote, dtype=dtype)
    results = []
    for video in request["videos"]:
        try:
            ranked = classifier(video, top_k=classifier.model.config.num_labels)
            results.append({"video": video, "predictions": ranked})
        except Exception as err:  # noqa: BLE001 - reported per video, as vidray predict does
            results.append({"video": video, "error": f"{type(err).__name__}: {err}", "predictions": []})
    picked = classifier.video_processor
    return {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "auto_video_processor": type(processor).__name__,
        "pipeline_video_processor": type(picked).__name__ if picked is not None else None,
        "settings": {k: v for k, v in picked.to_dict().items() if not k.startswith("_")} if picked else None,
        "model_class": type(classifier.model).__name__,
        "model_dtype": str(classifier.model.dtype).removeprefix("torch."),
        "warnings": messages + [str(w.message) for w in caught],
        "results": results,
    }


def serve(messages: list[str], caught: list) -> None:
    for line in sys.stdin:
        request_path = line.strip()
        child = os.fork()
        if child == 0:  # no return from here: the child must not go on reading the server's stdin
            status = 1
            try:
                with open(request_path + ".out", "w") as out:
                    json.dump(answer(request_path, messages, caught), out, default=str)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        _, status = os.waitpid(child, 0)
        print(os.waitstatus_to_exitcode(status), request_path, flush=True)


def main(argv: list[str]) -> None:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("transformers").addHandler(Collect(level=logging.WARNING))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch  # noqa: F401 - imported here, before any request: --serve forks from this state
        import transformers  # noqa: F401
        from transformers import AutoVideoProcessor, pipeline  # noqa: F401

        if argv == ["--serve"]:
            serve(messages, caught)
        else:
            print(json.dumps(answer(argv[0], messages, caught), default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
