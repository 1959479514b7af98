"""VideoMAE for masked-autoencoder pretraining: build, reload, and hand the encoder on to fine-tuning.

The pretraining model is transformers' ``VideoMAEForPreTraining``: the
VideoMAE encoder (``videomae``, run on the visible tokens only), a linear
``encoder_to_decoder`` projection, a ``mask_token`` and a small transformer
decoder that predicts the pixels of the masked tubes.

* ``model.init=scratch``: the encoder of ``model.size`` / ``model.patch_size``,
  exactly the classifier ``vidray train`` would build from scratch.
* ``model.init=pretrained``: continue from ``model.name_or_path``, a
  ``VideoMAEForPreTraining`` checkpoint (its decoder too, e.g. a checkpoint's
  ``model/`` of an earlier ``vidray pretrain``), or any VideoMAE encoder or
  classifier (a fresh decoder). Its patch and tubelet sizes are kept; its
  position table is interpolated to this run's token grid as in vidray/model/classifier.py.

As in VideoMAE's own pretraining, the encoder ends in a LayerNorm
(``use_mean_pooling=False``) that feeds the decoder. :func:`save_encoder`
writes the encoder the way VideoMAE fine-tunes it: a ``VideoMAEModel``
directory with ``use_mean_pooling=True`` (mean-pooled tokens through a new
``fc_norm``), without that last norm, so ``vidray train model.init=pretrained
model.name_or_path=DIR`` loads every backbone weight and starts only the head
(``fc_norm``, ``classifier``) fresh. Frames, patch, tubelet and the position
table (``vidray_pos_embed_grid``) travel in its ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import VideoMAEConfig

if TYPE_CHECKING:
    from transformers import VideoMAEForPreTraining

from vidray.model.checkpoint import quiet_progress_bars
from vidray.config import ModelSettings, PretrainSettings
from vidray.errors import UserError
from vidray.model.masking import masked_positions
from vidray.storage import local_folder
from vidray.model.classifier import (
    POS_GRID_KEY,
    _check_loading_info,
    check_clip_shape,
    install_position_table,
    interpolate_position_table,
    load_pretrained_config,
    scratch_config,
    table_source_grid,
    token_grid,
)

# What a checkpoint without a pretraining decoder leaves to start fresh: the decoder, and
# the encoder's last norm when the checkpoint is a mean-pooling encoder or classifier.
NEW_PRETRAINING_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token", "videomae.layernorm.")
PRETRAINING_ARCHITECTURE = "VideoMAEForPreTraining"
# VideoMAE's own pretraining code draws the mask token from trunc_normal_(std=0.02).
MASK_TOKEN_STD = 0.02
PROVENANCE_FILE = "vidray_pretrain.json"


def _decoder_settings(pretrain: PretrainSettings) -> dict[str, int | bool]:
    return dict(
        decoder_num_hidden_layers=pretrain.decoder_depth,
        decoder_hidden_size=pretrain.decoder_width,
        decoder_num_attention_heads=pretrain.decoder_heads,
        decoder_intermediate_size=4 * pretrain.decoder_width,
        norm_pix_loss=pretrain.norm_pix_loss,
    )


def _check_decoder_matches(source: VideoMAEConfig, pretrain: PretrainSettings, name_or_path: str) -> None:
    """A checkpoint that has a pretraining decoder keeps it: refuse settings that would discard it."""
    if PRETRAINING_ARCHITECTURE not in (source.architectures or []):
        return
    theirs = {
        "pretrain.decoder_depth": source.decoder_num_hidden_layers,
        "pretrain.decoder_width": source.decoder_hidden_size,
        "pretrain.decoder_heads": source.decoder_num_attention_heads,
    }
    ours = {
        "pretrain.decoder_depth": pretrain.decoder_depth,
        "pretrain.decoder_width": pretrain.decoder_width,
        "pretrain.decoder_heads": pretrain.decoder_heads,
    }
    differ = [f"{key}={theirs[key]}" for key in theirs if theirs[key] != ours[key]]
    if differ:
        raise UserError(
            f"model.name_or_path {name_or_path!r} holds a pretraining decoder of another shape: set "
            f"{' '.join(differ)} to continue with it (or point model.name_or_path at an encoder to start a new decoder)"
        )


def pretraining_config(model_cfg: ModelSettings, pretrain: PretrainSettings, frames: int, size: int) -> VideoMAEConfig:
    """The ``VideoMAEForPreTraining`` config of a run (reads only config files, no weights)."""
    common = dict(
        num_frames=frames,
        image_size=size,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
        use_mean_pooling=False,  # the encoder's last LayerNorm feeds the decoder, as in VideoMAE
        **_decoder_settings(pretrain),
    )
    if model_cfg.init == "scratch":
        config = scratch_config(model_cfg, **common, attn_implementation="sdpa")
    else:
        source = load_pretrained_config(model_cfg.name_or_path)
        _check_decoder_matches(source, pretrain, model_cfg.name_or_path)
        with local_folder(model_cfg.name_or_path, files=("config.json",)) as folder:  # a bucket's: copied here
            config = VideoMAEConfig.from_pretrained(folder, **common)
        config.update({POS_GRID_KEY: None})
        if PRETRAINING_ARCHITECTURE in (source.architectures or []):  # its decoder goes on as it is, MLP width included
            config.decoder_intermediate_size = source.decoder_intermediate_size
    config.architectures = [PRETRAINING_ARCHITECTURE]
    check_clip_shape(frames, size, config)
    return config


def check_pretraining_model(model_cfg: ModelSettings, pretrain: PretrainSettings, frames: int, size: int) -> VideoMAEConfig:
    """Config-only checks of a pretraining run, for the driver before Ray starts; returns the config."""
    config = pretraining_config(model_cfg, pretrain, frames, size)
    time_steps, height, width = token_grid(config)
    spatial = height * width
    hidden = masked_positions(spatial, pretrain.mask_ratio)
    where = f"a {size} px clip in {config.patch_size} px patches has {height} x {width} = {spatial} patch positions"
    if hidden >= spatial:
        raise UserError(
            f"pretrain.mask_ratio={pretrain.mask_ratio} hides all of them ({where}), leaving no visible token; "
            f"lower pretrain.mask_ratio to at most {(spatial - 1) / spatial:.3f}"  # hides all but one
        )
    if hidden == 0:
        raise UserError(
            f"pretrain.mask_ratio={pretrain.mask_ratio} hides none of them ({where}), leaving nothing to "
            f"reconstruct; raise pretrain.mask_ratio to at least {1 / spatial:.3f}"  # hides one
        )
    return config


def install_pretraining_position_tables(model: VideoMAEForPreTraining, source_grid: tuple[int, int, int]) -> None:
    """Encoder and decoder position tables interpolated from ``source_grid`` (see vidray.model.classifier)."""
    install_position_table(model, source_grid)  # the encoder's, and records the grid in the config
    model.position_embeddings = interpolate_position_table(
        source_grid, token_grid(model.config), model.config.decoder_hidden_size
    )


def build_pretraining_model(
    model_cfg: ModelSettings, pretrain: PretrainSettings, frames: int, size: int
) -> VideoMAEForPreTraining:
    # Here, not at the top (as in vidray.model.classifier): VideoMAE's modeling code takes seconds to
    # import, and `vidray pretrain` checks the config with this module before anything else.
    from transformers import VideoMAEForPreTraining

    config = pretraining_config(model_cfg, pretrain, frames, size)
    if model_cfg.init == "scratch":
        model = VideoMAEForPreTraining(config)
        start_mask_token(model)  # HF leaves it zero
        check_finite_weights(model, loaded=set(), name_or_path=None)
    else:
        source = load_pretrained_config(model_cfg.name_or_path)
        with quiet_progress_bars(), local_folder(model_cfg.name_or_path) as folder:  # a bucket's: copied here first
            model, info = VideoMAEForPreTraining.from_pretrained(  # float32 weights whatever the file's: build_model
                folder, config=config, output_loading_info=True, attn_implementation="sdpa", dtype=torch.float32
            )
        _check_loading_info(model_cfg.name_or_path, info, new_prefixes=NEW_PRETRAINING_PREFIXES)
        fresh = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
        if "mask_token" in fresh:
            start_mask_token(model)
        loaded = {name for name, _ in model.named_parameters()} - fresh
        check_finite_weights(model, loaded=loaded, name_or_path=model_cfg.name_or_path)
        # A model vidray trained at another size already carries a resized table: its origin grid is the source.
        if source_grid := table_source_grid(model_cfg.interpolate_pos_embed, source, config):
            install_pretraining_position_tables(model, source_grid)
    if model_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def start_mask_token(model: VideoMAEForPreTraining) -> None:
    """The mask token as VideoMAE starts it. transformers' ``_init_weights`` covers Linear, Conv and
    LayerNorm modules only: a checkpoint without a decoder left this bare parameter as ``from_pretrained``
    allocated it, uninitialised memory (1e38 or NaN: a NaN first loss, then every weight NaN)."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.mask_token, std=MASK_TOKEN_STD)


def check_finite_weights(model: torch.nn.Module, loaded: set[str], name_or_path: str | None) -> None:
    """Refuse a NaN or infinite weight before training spreads it to every other one."""
    for name, param in model.named_parameters():
        if torch.isfinite(param).all():
            continue
        if name in loaded:
            raise UserError(
                f"model.name_or_path {name_or_path!r} holds non-finite values in {name} (a run that diverged?); "
                "point model.name_or_path at another checkpoint"
            )
        raise RuntimeError(f"bug: {name} was initialised with non-finite values")


def load_pretraining_model(model_dir: str | Path) -> VideoMAEForPreTraining:
    """A pretraining checkpoint's ``model/``, with the position tables it was trained with."""
    from transformers import VideoMAEForPreTraining

    with quiet_progress_bars():
        model = VideoMAEForPreTraining.from_pretrained(str(model_dir), attn_implementation="sdpa")
    source_grid = getattr(model.config, POS_GRID_KEY, None)
    if source_grid:
        install_pretraining_position_tables(model, tuple(source_grid))
    return model


def encoder_config(config: VideoMAEConfig) -> VideoMAEConfig:
    """The fine-tuning encoder's config: the pretraining one, mean-pooled, as a ``VideoMAEModel``."""
    encoder = VideoMAEConfig.from_dict(config.to_dict())
    encoder.use_mean_pooling = True
    encoder.architectures = ["VideoMAEModel"]
    return encoder


def encoder_state_dict(model: VideoMAEForPreTraining) -> dict[str, torch.Tensor]:
    """The encoder's weights under ``VideoMAEModel`` names, without the norm only the decoder used."""
    return {
        key.removeprefix("videomae."): value
        for key, value in model.state_dict().items()
        if key.startswith("videomae.") and not key.startswith("videomae.layernorm.")
    }


def save_encoder(model: VideoMAEForPreTraining, directory: str | Path, provenance: dict | None = None) -> Path:
    """``save_pretrained`` of the encoder into ``directory``: what ``vidray train`` fine-tunes from.

    ``provenance`` (run, epochs, masking, loss) goes into :data:`PROVENANCE_FILE` beside it:
    nothing in config.json tells a pretrained encoder from a randomly initialised one.
    """
    from transformers import VideoMAEModel

    directory = Path(directory)
    encoder = VideoMAEModel(encoder_config(model.config))
    encoder.load_state_dict(encoder_state_dict(model), strict=True)
    with quiet_progress_bars():
        encoder.save_pretrained(directory, safe_serialization=True)
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2, sort_keys=True, default=str))
    return directory
