"""VideoMAE for video classification: build from a checkpoint or from scratch,
and keep pretrained position embeddings meaningful at a new input size.

VideoMAE has no learned position embedding: ``VideoMAEEmbeddings`` holds a
fixed 1-D sinusoid table over the flattened token index (a plain tensor
attribute, not a parameter or buffer, added to the patch embeddings in
``forward``). When a checkpoint pretrained at 16 x 224² is built at 112², HF
rebuilds that 1-D table for the smaller token count, so token (t, h, w) of the
new 8 x 7 x 7 grid gets the code of a completely different place on the
pretrained 8 x 14 x 14 grid. :func:`interpolate_position_table` instead lays the
pretrained table out on its own (T, H, W) grid and resizes it trilinearly to the
new grid, so every token keeps the code of the same spot of the clip.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import VideoMAEConfig

if TYPE_CHECKING:
    from transformers import VideoMAEForVideoClassification

from vidray.compat import move_position_table_with_model, sinusoid_encoding_table
from vidray.config import ModelSettings
from vidray.errors import UserError
from vidray.storage import is_uri, local_folder, without_credentials
from vidray.model.checkpoint import (
    INFO, MODEL_DIR, clip_shape_of, model_folder, quiet_progress_bars, read_checkpoint_info, refuse_pretraining_checkpoint,
)  # fmt: skip

logger = logging.getLogger(__name__)

# Written into config.json of every model we build whose position table was
# interpolated: the (T, H, W) token grid the table was pretrained on. Loading a
# saved model rebuilds the same table from it (see :func:`load_model`).
POS_GRID_KEY = "vidray_pos_embed_grid"
# model_type of an export whose table was interpolated: it ships code that rebuilds that table
# for transformers.pipeline(trust_remote_code=True); see vidray/infer/export.py.
CUSTOM_MODEL_TYPE = "vidray_videomae"

# Named scratch sizes (init=scratch). tiny is for CPU tests and the demo;
# small is ViT-S (VideoMAE-S), base is ViT-B (VideoMAE-B, HF's defaults).
SCRATCH_SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def token_grid(config: VideoMAEConfig) -> tuple[int, int, int]:
    """(T, H, W) token grid of a VideoMAE config: frames / tubelet x (side / patch)²."""
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return (config.num_frames // config.tubelet_size, size // patch, size // patch)


def interpolate_position_table(
    source_grid: tuple[int, int, int], target_grid: tuple[int, int, int], hidden_size: int
) -> torch.Tensor:
    """The sinusoid table of ``source_grid`` resized to ``target_grid``: ``[1, T*H*W, D]`` float32.

    ``align_corners=False`` maps token centres to token centres, which is the
    right geometry for patches: a 16 px patch at 112² covers the same part of
    the frame as two neighbouring 16 px patches at 224².
    """
    source_grid, target_grid = tuple(source_grid), tuple(target_grid)
    table = sinusoid_encoding_table(source_grid[0] * source_grid[1] * source_grid[2], hidden_size)
    if source_grid == target_grid:
        return table
    grid = table.reshape(1, *source_grid, hidden_size).permute(0, 4, 1, 2, 3)  # [1, D, T, H, W]
    grid = F.interpolate(grid, size=target_grid, mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, hidden_size).contiguous()


def install_position_table(model: VideoMAEForVideoClassification, source_grid: tuple[int, int, int]) -> None:
    """Replace HF's 1-D table by the one interpolated from ``source_grid`` and record it in the config."""
    embeddings = model.videomae.embeddings
    target_grid = token_grid(model.config)
    table = interpolate_position_table(source_grid, target_grid, model.config.hidden_size)
    if table.shape != embeddings.position_embeddings.shape:
        raise AssertionError(f"position table {tuple(table.shape)} != {tuple(embeddings.position_embeddings.shape)}")
    # A plain attribute, as in HF: forward() copies it to the input's device and dtype.
    embeddings.position_embeddings = table
    model.config.update({POS_GRID_KEY: list(source_grid)})


def table_source_grid(interpolate: bool, pretrained: VideoMAEConfig, config: VideoMAEConfig) -> tuple[int, int, int] | None:
    """The token grid whose sinusoid table a model built from ``pretrained`` as ``config`` gets, resized to its own
    grid; None: HF's table for its grid.

    A checkpoint that vidray trained with a resized table records that table's origin (:data:`POS_GRID_KEY`).
    Resized from there when ``interpolate`` (model.interpolate_pos_embed) says so. At the checkpoint's own grid
    the checkpoint's table is kept whatever it says: nothing is resized anew, and HF's table would be one
    the model never saw.
    """
    recorded = getattr(pretrained, POS_GRID_KEY, None)
    source = tuple(recorded or token_grid(pretrained))
    if source == token_grid(config):
        return None
    if interpolate or (recorded and token_grid(pretrained) == token_grid(config)):
        return source
    return None


def check_clip_shape(frames: int, size: int, config: VideoMAEConfig) -> None:
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if frames % config.tubelet_size:
        raise UserError(f"data.frames={frames} must be a multiple of the model's tubelet_size {config.tubelet_size}")
    if size % patch:
        raise UserError(f"data.size={size} must be a multiple of the model's patch_size {patch}")


def _label_maps(classes: list[str]) -> dict:
    return {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}


def load_pretrained_config(name_or_path: str) -> VideoMAEConfig:
    try:
        # VideoMAEConfig reads any model's config.json with a logged warning: a TimeSformer or ViT checkpoint
        # passed every driver-side check and was refused only in the workers, as a traceback.
        with local_folder(name_or_path, files=("config.json",)) as source:
            model_type = VideoMAEConfig.get_config_dict(source)[0].get("model_type", "videomae")
            if model_type != "videomae":
                raise UserError(
                    f"model.name_or_path: {name_or_path!r} holds a {model_type!r} model, not VideoMAE; point it at a "
                    "VideoMAE checkpoint (e.g. MCG-NJU/videomae-base-finetuned-kinetics) or set model.init=scratch"
                )
            return VideoMAEConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model.name_or_path: cannot load a VideoMAE config from {name_or_path!r} ({first_line}); "
            "pass a local directory written by save_pretrained, a reachable hub id, or set model.init=scratch"
        ) from None


def scratch_config(model_cfg: ModelSettings, **overrides) -> VideoMAEConfig:
    sizes = {key: getattr(model_cfg, key) for key in ("patch_size", "tubelet_size") if getattr(model_cfg, key)}
    return VideoMAEConfig(**SCRATCH_SIZES[model_cfg.size], **sizes, **overrides)


def check_model_config(model_cfg: ModelSettings, frames: int, size: int) -> None:
    """The cheap part of :func:`build_model` (config only, no weights), to fail on the driver, not in a worker."""
    if model_cfg.init == "pretrained":
        config = load_pretrained_config(model_cfg.name_or_path)
    else:
        config = scratch_config(model_cfg)
    check_clip_shape(frames, size, config)


def build_model(model_cfg: ModelSettings, classes: list[str], frames: int, size: int) -> VideoMAEForVideoClassification:
    """A VideoMAE classifier for ``classes`` eating ``frames`` x ``size``² clips.

    ``init=pretrained`` loads ``model_cfg.name_or_path`` (hub id or local
    directory, same code path; a folder on a bucket is copied here first) and re-initialises the classification head
    unless the checkpoint was trained on exactly these class names.
    ``init=scratch`` builds a random model of ``model_cfg.size``.
    """
    # Here, not at the top: VideoMAE's modeling code takes seconds to import (1.4 s of a 2-core box), and
    # the processes that only check configs (vidray tune's driver, each Tune trial, each Ray Train
    # controller of a sweep) import this module without ever building a model.
    from transformers import VideoMAEForVideoClassification

    common = dict(
        num_frames=frames,
        image_size=size,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
        **_label_maps(classes),
    )
    if model_cfg.init == "scratch":
        config = scratch_config(model_cfg, **common, attn_implementation="sdpa")
        check_clip_shape(frames, size, config)
        model = VideoMAEForVideoClassification(config)
    else:
        with local_folder(model_cfg.name_or_path) as source:  # a bucket's folder: copied here first
            model = _pretrained_classifier(model_cfg, source, classes, frames, size, common)
    if model_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _pretrained_classifier(model_cfg: ModelSettings, source: str, classes: list[str], frames: int, size: int,
                           common: dict[str, Any]) -> VideoMAEForVideoClassification:  # fmt: skip
    """:func:`build_model` from the checkpoint ``model_cfg.name_or_path`` names, read from ``source``."""
    from transformers import VideoMAEForVideoClassification

    pretrained = load_pretrained_config(source)
    keep_head = pretrained.id2label == dict(enumerate(classes))
    config = VideoMAEConfig.from_pretrained(source, **common)
    config.num_labels = len(classes)  # resyncs nothing else: id2label/label2id were set above
    config.update({POS_GRID_KEY: None})
    if "VideoMAEForPreTraining" in (pretrained.architectures or []):
        # VideoMAE's fine-tuning recipe: a new fc_norm over the mean of the tokens. A pretraining checkpoint
        # (MCG-NJU/videomae-base, a `vidray pretrain` checkpoint's model/) says use_mean_pooling=false, and HF
        # then classifies from the first token, one patch of the first tubelet (VideoMAE has no CLS token).
        config.use_mean_pooling = True
    check_clip_shape(frames, size, config)
    model, info = VideoMAEForVideoClassification.from_pretrained(
        source,
        config=config,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        attn_implementation="sdpa",
        # transformers 5 loads a checkpoint in the dtype its config.json names ("auto"): a half-precision one
        # would train in it, AdamW's moments and updates too (bf16 rounds a 5e-5 step on a 0.02 weight away).
        # Training keeps float32 weights; autocast gives the bf16 compute.
        dtype=torch.float32,
    )
    _check_loading_info(model_cfg.name_or_path, info)
    if not keep_head:
        reset_classifier(model)
    # A model we fine-tuned earlier already carries a resized table: its origin grid is the source.
    if source_grid := table_source_grid(model_cfg.interpolate_pos_embed, pretrained, config):
        install_position_table(model, source_grid)
    return model


# Parameters a classification model may legitimately lack in a checkpoint
# (e.g. a VideoMAEForPreTraining checkpoint has no head and no fc_norm).
_HEAD_PREFIXES = ("classifier.", "fc_norm.", "videomae.layernorm.")


def _check_loading_info(name_or_path: str, info: dict, new_prefixes: tuple[str, ...] = _HEAD_PREFIXES) -> None:
    """Refuse a checkpoint that leaves backbone weights unloaded; ``new_prefixes`` may start fresh."""
    mismatched = sorted(key for key, *_ in info["mismatched_keys"])
    missing = sorted(info["missing_keys"])
    bad_mismatched = [k for k in mismatched if not k.startswith("classifier.")]
    bad_missing = [k for k in missing if not k.startswith(new_prefixes)]
    if bad_mismatched or bad_missing:
        keys = ", ".join((bad_mismatched + bad_missing)[:4])
        raise UserError(
            f"model.name_or_path: {name_or_path!r} does not fit a VideoMAE backbone "
            f"(missing or mismatched weights: {keys}); point it at a VideoMAE checkpoint"
        )
    if mismatched or missing:
        logger.info("%s: new head weights %s", name_or_path, ", ".join(mismatched + missing))


def reset_classifier(model: VideoMAEForVideoClassification) -> None:
    """Fresh head, initialised like HF's ``_init_weights`` does a Linear (normal, std=initializer_range)."""
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.zero_()


def load_model(model_dir: str) -> VideoMAEForVideoClassification:
    """Load a classifier saved by vidray (a checkpoint's ``model/`` or an export), with the position
    table it was trained with.

    A plain ``VideoMAEForVideoClassification.from_pretrained`` of such a
    directory loads the same weights but rebuilds HF's 1-D table, which is not
    the table the model was trained with whenever ``vidray_pos_embed_grid`` is
    set. An export of such a model is tagged :data:`CUSTOM_MODEL_TYPE` (for
    ``transformers.pipeline``); its weights are plain VideoMAE and load here
    into the stock class.
    """
    from transformers import VideoMAEForVideoClassification  # seconds to import: see build_model

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") == CUSTOM_MODEL_TYPE:
        for key in ("model_type", "auto_map", "architectures"):
            config.pop(key, None)
        model = VideoMAEForVideoClassification.from_pretrained(
            model_dir, config=VideoMAEConfig.from_dict(config), attn_implementation="sdpa"
        )
    else:
        model = VideoMAEForVideoClassification.from_pretrained(model_dir, attn_implementation="sdpa")
    source_grid = getattr(model.config, POS_GRID_KEY, None)
    if source_grid:
        install_position_table(model, tuple(source_grid))
    return model


def to_device(model: VideoMAEForVideoClassification, device: torch.device) -> VideoMAEForVideoClassification:
    """``model.to(device)``, and the position table with it, once.

    HF's forward adds ``position_embeddings.detach().type_as(x).to(x.device, copy=True)``:
    with the table left on the CPU that is a host-to-device copy from pageable memory
    in every forward, which makes the host wait for the GPU. On the device it is a
    device-side copy. A table that is already a buffer or parameter moves with the model.
    """
    model.to(device)
    move_position_table_with_model(model.videomae.embeddings, device)
    return model


def use_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions that autocast leaves in fp32 (CUDA only).

    Through the long-standing switches: torch >= 2.9 also has ``fp32_precision``, but once that
    is set, any library that reads the old ``allow_tf32`` flag gets a RuntimeError.
    """
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def compile_model(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with static shapes: one graph per shape, no dynamic-shape graphs (the eval loop pads
    its last batch, so train and eval each need exactly one)."""
    return torch.compile(module, dynamic=False)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 (a no-op context) elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def local_checkpoint(path: str, folder: Path) -> Path:
    """A local directory holding the checkpoint (downloaded into ``folder`` first when it lives in object storage)."""
    if not is_uri(path):
        return Path(path)
    import ray.train  # here: seconds to import, and only a bucket's checkpoint needs it

    try:
        return Path(ray.train.Checkpoint(path).to_directory(str(folder / Path(path).name)))
    except (OSError, ValueError) as err:  # not there, no access, a scheme pyarrow has no filesystem for
        raise UserError(f"cannot download the checkpoint {without_credentials(path)} ({_first_line(err)}); "
                        "pass a checkpoint folder on a bucket or a local one") from None  # fmt: skip


@contextlib.contextmanager
def downloaded_checkpoint(uri: str, folder: Path) -> Iterator[Path]:
    """:func:`local_checkpoint` of ``uri``, a classifier's checkpoint in object storage, for the block. An error that
    names the download (raised in the block too) names ``uri`` instead: the download is deleted by the time the user
    reads it. A pretraining checkpoint is refused here, where the hint can name the encoder beside ``uri``."""
    local = local_checkpoint(uri, folder)
    try:
        refuse_pretraining_checkpoint(local, origin=uri)
        yield local
    except UserError as err:
        if str(local) not in str(err):
            raise
        raise UserError(str(err).replace(str(local), without_credentials(uri))) from None


def load_trained_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(classifier in eval mode, vidray.json) from a training checkpoint or a `vidray export` directory.

    A checkpoint holds the weights in ``path/model/``; an export holds them in
    ``path`` itself. Both carry ``vidray.json`` with the clip shape the model
    was trained on. The position table is the one the model was trained with
    (see :func:`vidray.model.classifier.load_model`), whichever of the two it is.
    """
    path = Path(path)
    hint = "pass a checkpoint directory written by `vidray train` or a directory written by `vidray export`"
    if not path.is_dir():
        raise UserError(f"{path} does not exist or is not a directory ({hint})")
    info = read_checkpoint_info(path)
    model_dir = model_folder(path)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{path} holds no {MODEL_DIR}/config.json: the checkpoint is incomplete ({hint})")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{model_dir} holds no model.safetensors: the checkpoint is incomplete (re-export or re-train)")
    refuse_pretraining_checkpoint(path)
    try:
        with quiet_progress_bars():
            model = load_model(str(model_dir))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load the model in {model_dir}: {_first_line(err)} (re-export or re-train)") from None

    classes = clip_shape_of(info).classes
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != list(classes):
        raise UserError(
            f"{model_dir}/config.json id2label {labels} does not match {path / INFO} classes {classes}; "
            "the checkpoint is damaged"
        )
    return model.eval(), info
