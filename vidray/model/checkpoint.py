"""Everything vidray writes to and reads back from a checkpoint.

A training checkpoint, written once per epoch by rank 0 (vidray/train/loop.py)::

    checkpoint_epoch_NNNN/
      model/                        save_pretrained(): config.json (id2label/label2id) + model.safetensors
      training_state.json           epoch, global step, optimizer hyper-parameters, scheduler, RNG states
      training_state.safetensors    the tensors training_state.json refers to (optimizer moments, RNG states)
      vidray.json                   {"epoch", "metrics", "history", "data": {...}, "config": {...}, "file_sizes": {...}}

Ray Train copies a reported checkpoint's files straight into the run's ``checkpoint_epoch_NNNN``, in no set
order, and registers it only afterwards; a Ctrl-C, killed worker or full disk during the copy leaves a
partial folder there, which Ray ignores when the run continues. vidray must ignore it too, so vidray.json,
written last, lists every other file with its size (``file_sizes``), and :func:`complete_checkpoint_info`
is the one test of "a complete checkpoint", whatever order the copy went in and wherever it stopped.

Nothing here is unpickled. Checkpoints live under ``run.storage_path``, which
can be a shared bucket, and every resuming worker reads them: a pickle there
would let anyone who can write to the bucket run code on every worker. So the
training state is plain JSON plus safetensors, and a checkpoint from before
that change (``training_state.pt``) is refused with a one-line error rather
than loaded.

The one loader of trained models, for evaluation, export and prediction, is
:func:`vidray.model.classifier.load_trained_model` (it needs transformers' modeling code, which
this module does not import: the sweep's driver and trial actors read checkpoints without it).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from vidray.data.dataset import ClipShape
from vidray.errors import UserError
from vidray.storage import is_uri, load_json, open_filesystem, without_credentials

if TYPE_CHECKING:
    import torch

MODEL_DIR = "model"
INFO = "vidray.json"
TRAINING_STATE = "training_state.json"
TRAINING_TENSORS = "training_state.safetensors"
# Written by vidray 0.1 (a torch pickle): recognised only to refuse it.
LEGACY_TRAINING_STATE = "training_state.pt"
STATE_FORMAT = 2
# In vidray.json: {path relative to the checkpoint, "/"-separated: bytes} of every other file save_checkpoint wrote.
FILE_SIZES = "file_sizes"


# ------------------------------------------------------------------ JSON + safetensors encoding


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors and arrays moved into ``tensors`` under dotted names.

    Dicts with non-string keys (an optimizer's per-parameter state) and tuples
    (RNG states) are tagged so that :func:`_decode` gives back exactly what went in.
    """
    import torch  # here: reading a checkpoint's vidray.json (a prediction driver) needs no torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses two entries over one buffer (the same RNG state captured twice, say).
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in tensors.values()):
            tensor = tensor.clone()
        tensors[name] = tensor
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        # safetensors has no uint32 for torch; int64 holds every value, the dtype name restores it.
        tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": name, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{name}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state entry {name} is a {type(value).__name__}: only tensors, arrays and JSON types are saved")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


# ------------------------------------------------------------------ write / read


def host_snapshot(value: Any) -> Any:
    """A copy of ``value`` that later training cannot change: tensors copied to host memory,
    containers rebuilt, everything else as it is.

    From a GPU the copies are asynchronous and waited for once at the end, so
    snapshotting model and optimizer state costs about one device-to-host transfer of them.
    """
    import torch

    def copy(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            item = item.detach()
            if item.device.type == "cuda":
                from_cuda.append(True)
                return item.to("cpu", non_blocking=True)
            return item.clone()
        if isinstance(item, dict):
            return {k: copy(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(v) for v in item)
        if isinstance(item, np.ndarray):
            return item.copy()
        return item

    from_cuda: list[bool] = []
    snapshot = copy(value)
    if from_cuda:  # the copies were queued (non_blocking): wait for them. Not on CUDA otherwise, which would start it
        torch.cuda.synchronize()
    return snapshot


def save_checkpoint(
    directory: str | Path,
    model,
    *,
    training_state: dict[str, Any],
    info: dict[str, Any],
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model/, training_state.{json,safetensors} and vidray.json into ``directory`` (created).

    ``model_state``: the weights to write instead of the model's current ones (a
    :func:`host_snapshot` of its ``state_dict()``, when the writing happens while the model trains on).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():
        model.save_pretrained(directory / MODEL_DIR, safe_serialization=True, state_dict=model_state)
    tensors: dict[str, torch.Tensor] = {}
    encoded = {"format": STATE_FORMAT, "state": _encode(training_state, "state", tensors)}
    save_file(tensors, str(directory / TRAINING_TENSORS))
    (directory / TRAINING_STATE).write_text(json.dumps(encoded))
    # Last, and listing the rest: a copy of this folder is complete only once every listed file is there
    # whole (complete_checkpoint_info), however the copy was ordered.
    info = {**info, FILE_SIZES: _written_file_sizes(directory)}
    (directory / INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return directory


def _written_file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: bytes} of what save_checkpoint wrote besides vidray.json: model/ (whatever files
    save_pretrained chose: one safetensors file or shards) and the two training-state files."""
    written = [p for p in (directory / MODEL_DIR).rglob("*") if p.is_file()]
    written += [directory / TRAINING_STATE, directory / TRAINING_TENSORS]
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(written)}


# ------------------------------------------------------------------ a complete checkpoint


def _sizes_on_storage(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """{path after ``prefix`` (a folder ending in "/"): bytes} of every file under it, from one recursive
    listing (one request to a bucket rather than one per file)."""
    entries = fs.get_file_info(pafs.FileSelector(prefix.rstrip("/"), recursive=True, allow_not_found=True))
    return {e.path[len(prefix):]: e.size for e in entries if e.type == pafs.FileType.File and e.path.startswith(prefix)}


def _has_everything(info: dict[str, Any], sizes: dict[str, int]) -> bool:
    """Whether the files ``info`` lists are all in ``sizes`` at their listed size (a file cut short
    counts as missing). A checkpoint from before the list (no FILE_SIZES) is complete when it has its
    training state: the pair, or vidray 0.1's pickle, which check_training_state then refuses by name."""
    listed = info.get(FILE_SIZES)
    if listed is None:
        return (TRAINING_STATE in sizes and TRAINING_TENSORS in sizes) or LEGACY_TRAINING_STATE in sizes
    if not isinstance(listed, dict):
        return False
    return all(sizes.get(name) == size for name, size in listed.items())


def complete_checkpoint_info(checkpoint: str | Path) -> dict[str, Any] | None:
    """The vidray.json of ``checkpoint`` (a local path or an s3:// / gs:// URI) when the checkpoint is
    complete, else None: still being copied, cut short, or without a vidray.json that parses.

    One listing of the folder and one read of vidray.json. The listing comes first: a file that grew to
    its listed size after it was taken only makes the answer None now and complete at the next look.
    """
    fs, root = open_filesystem(str(checkpoint))
    prefix = root.rstrip("/") + "/"
    sizes = _sizes_on_storage(fs, prefix)
    if INFO not in sizes:
        return None
    info = load_json(fs, prefix + INFO)
    return info if isinstance(info, dict) and _has_everything(info, sizes) else None


def check_training_state(directory: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose training state vidray cannot (or will not) read."""
    directory = Path(directory)
    if (directory / TRAINING_STATE).is_file() and (directory / TRAINING_TENSORS).is_file():
        return
    if (directory / LEGACY_TRAINING_STATE).is_file():
        raise UserError(
            f"{directory} holds {LEGACY_TRAINING_STATE}, the pickled training state of vidray 0.1, which is never "
            "loaded (unpickling runs code); start over with a new run.name (or --restart), or evaluate/export "
            "its model/ as it is"
        )
    raise UserError(
        f"{directory} has no {TRAINING_STATE} + {TRAINING_TENSORS}: not a resumable vidray checkpoint "
        "(start over with a new run.name or --restart)"
    )


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """The ``training_state`` given to :func:`save_checkpoint`, read back without unpickling anything."""
    from safetensors.torch import load_file

    directory = Path(directory)
    check_training_state(directory)
    encoded = json.loads((directory / TRAINING_STATE).read_text())
    if encoded.get("format") != STATE_FORMAT:
        raise UserError(f"{directory / TRAINING_STATE} has format {encoded.get('format')!r}, expected {STATE_FORMAT}")
    return _decode(encoded["state"], load_file(str(directory / TRAINING_TENSORS)))


def _what_to_pass(folder: Path) -> str:
    """The hint for a folder that is no checkpoint: the folder of a run or a sweep (what a user has at hand
    after `vidray train` or `vidray tune`) names what in it to pass."""
    if (folder / "reports" / "best_model" / INFO).is_file():
        return f"it is a sweep's folder: its best model is {folder / 'reports' / 'best_model'}"
    runs = sorted(d for d in folder.glob("checkpoint_epoch_*") if complete_checkpoint_info(d) is not None)
    if runs:
        return (f"it is a training run's folder: pass one of its checkpoints, e.g. {runs[-1]} (the latest; "
                "`vidray train` names the best as best_checkpoint)")  # fmt: skip
    return "pass a checkpoint directory written by `vidray train` or a directory written by `vidray export`"


def read_checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """vidray.json of a checkpoint or export: epoch, metrics, history, data (a ClipShape), config."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise UserError(f"{directory} is not a vidray checkpoint or export: {INFO} is missing ({_what_to_pass(Path(directory))})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    data = info.get("data") if isinstance(info, dict) else None
    missing = [k for k in ClipShape.KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{path} lacks data.{missing[0]}; the checkpoint is damaged or from another tool")
    return info


def model_folder(path: Path) -> Path:
    """Where the model's config.json and weights are: ``path`` itself for an export, ``path/model`` for a checkpoint."""
    return path if (path / "config.json").is_file() else path / MODEL_DIR


def refuse_pretraining_checkpoint(path: str | Path, origin: str | None = None) -> None:
    """A `vidray pretrain` checkpoint holds a VideoMAEForPreTraining (encoder and decoder, no classifier): loaded as
    a classifier, transformers printed its table of unexpected and missing weights and the head's made-up labels
    then read as a damaged checkpoint. Said in one line instead, from config.json alone (no torch), so that
    `vidray predict --out` says it before it deletes an earlier run's output or starts Ray. ``origin``: where
    ``path`` was downloaded from (a bucket's checkpoint), named instead of the download, which is deleted."""
    try:
        architectures = json.loads((model_folder(Path(path)) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # not this case: loading the model says what is wrong with the file
    if "VideoMAEForPreTraining" in architectures:
        shown = without_credentials(origin) if origin else path
        raise UserError(f"{shown} is a `vidray pretrain` checkpoint: it has no classifier; fine-tune it first (`vidray "
                        f"train model.init=pretrained model.name_or_path={_run_encoder(origin or str(path))}`, the "
                        "encoder `vidray pretrain` reported), then use that run's checkpoint")  # fmt: skip


def _run_encoder(checkpoint: str) -> str:
    """The encoder `vidray pretrain` writes beside its run's checkpoints (vidray/pretrain/driver.py), a local folder
    or a bucket's, when it is there; else a placeholder."""
    if is_uri(checkpoint):
        parts = urllib.parse.urlsplit(checkpoint)
        run = posixpath.dirname(parts.path.rstrip("/"))
        encoder = urllib.parse.urlunsplit(parts._replace(path=posixpath.join(run, "encoder")))
    else:
        encoder = str(Path(checkpoint).parent / "encoder")
    try:
        fs, folder = open_filesystem(encoder)
        there = fs.get_file_info(folder.rstrip("/") + "/config.json").type == pafs.FileType.File
    except (OSError, UserError):  # no access to the bucket, a scheme pyarrow cannot open: not named
        there = False
    return without_credentials(encoder) if there else "<run>/encoder"


def clip_shape_of(info: dict[str, Any]) -> ClipShape:
    return ClipShape.from_dict(info["data"])


def eval_clips_of(info: dict[str, Any]) -> int:
    """Clips per video the model was validated with during training (1 when not recorded)."""
    return int(((info.get("config") or {}).get("train") or {}).get("eval_clips", 1))


# ------------------------------------------------------------------ trained models


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
