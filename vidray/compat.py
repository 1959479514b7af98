"""Every private Ray or transformers API vidray touches, in one place, each behind its version gate.

A gate lists the releases the shim was checked against (Ray: exact versions; transformers: version
prefixes). tests/test_compat.py imports each private API, checks the attribute or signature its shim
relies on, and fails when the installed release is outside the gate: an upgrade then re-checks the
shim named in the failure (read the Ray/transformers source it points at, fix the shim, list the
release). Outside its gate a shim does what its comment says: fall back to public behaviour, or
try anyway where the worst outcome is cosmetic.

Shared stage: imports nothing heavy at module level. The GPU check imports vidray.model.classifier
(and so this module) where Ray is hidden, so every shim imports Ray or transformers inside itself.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from vidray.errors import warn_once

logger = logging.getLogger(__name__)

def _ray_version() -> str:
    import ray  # only the Ray shims call this; they run in Ray processes, where ray is loaded

    return ray.__version__


def _transformers_version() -> str:
    import transformers  # loaded already wherever a VideoMAE is built

    return transformers.__version__


# ------------------------------------------------ Ray Data: the Parquet footer readers of a read
# ray/data/read_api.py builds read_parquet's file indexer when it is called (FooterFileIndexer,
# ray/data/_internal/datasource_v2/formats/parquet/footer_file_indexer.py), and the indexer reads every
# file's footer on a pool of RAY_DATA_PARQUET_FOOTER_NUM_ACTORS actors (default 32), each a Python
# process of its own, handing each actor RAY_DATA_PARQUET_FOOTER_BATCH_SIZE files per call (default 10),
# which it reads on as many threads at once (its pool has RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY, 128).
# Both are taken from the environment in the indexer's constructor. Sized for object stores and
# hundreds of thousands of files; a process start costs 1.2-1.5 CPU-s, so for a split of a few hundred
# shards the pool costs more than its reads (one actor reads a call's 128 footers at once: on local or
# network disks in milliseconds, from object storage in one round trip). Outside the gate nothing is set
# (Ray's default pool: slower, same result). If it moves: find where the new indexer sizes its pool and
# its calls, and point this shim at those switches.
PARQUET_FOOTER_READERS_VERIFIED_RAY = ("2.60.0",)
PARQUET_FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
PARQUET_FOOTER_BATCH_ENV = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"
PARQUET_FOOTERS_PER_CALL = 128  # Ray's per-actor IO concurrency: one call keeps every thread of a reader busy
PARQUET_FILES_PER_READER = 4096  # 32 calls of 128: about a second of reads per reader from object storage
PARQUET_FOOTER_READERS_MAX = 32  # Ray's own default, the most this shim asks for


@contextmanager
def parquet_footer_readers_for(files: int) -> Iterator[None]:
    """Within the block, a ``ray.data.read_parquet`` call reads its ``files``' footers with one actor per
    4,096 files (1 to 32) instead of Ray's 32, 128 files per call instead of 10; what the user set in the
    environment wins (each variable on its own)."""
    if _ray_version() not in PARQUET_FOOTER_READERS_VERIFIED_RAY:
        yield
        return
    # Ray reads the variables twice: into module defaults when read_parquet first imports the indexer,
    # and in the indexer's constructor. Imported here first, the defaults stay Ray's own for every later
    # read in this process, the user's included, whichever read came first.
    import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401

    readers = min(PARQUET_FOOTER_READERS_MAX, max(1, -(-files // PARQUET_FILES_PER_READER)))
    ours = {
        name: value
        for name, value in ((PARQUET_FOOTER_READERS_ENV, readers), (PARQUET_FOOTER_BATCH_ENV, PARQUET_FOOTERS_PER_CALL))
        if os.environ.get(name) is None
    }
    os.environ.update({name: str(value) for name, value in ours.items()})
    try:
        yield
    finally:
        for name in ours:
            os.environ.pop(name, None)


# ------------------------------------------------------------------ Ray Train V2: the report log line
# ray/train/v2/_internal/execution/context.py logs every ray.train.report with its whole metrics dict
# at INFO from every rank, under a logger named after that file (logging.getLogger(__file__)).
# Soft gate: outside it the shim still tries, since the worst outcome is that those lines come back.
# If the file moves: find the "Reporting training result" log call and point the import at its module.
TRAIN_REPORT_LOG_VERIFIED_RAY = ("2.60.0",)


def quiet_ray_train_report_log() -> None:
    """Ray Train's per-report INFO line (every rank, every epoch) down to WARNING, in this process."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# ------------------------------------------------ Ray core: the raylet's "many worker processes" warning
# A raylet warns every driver once its node runs 4x, 5x, ... its maximum worker startup concurrency
# (the node's CPUs) in Python worker processes: "WARNING: 8 PYTHON worker processes have been started on
# node ... which is 4x the maximum expected startup concurrency (2)" (src/ray/raylet/worker_pool.cc,
# WarnAboutSize). A sweep's trials are each a handful of zero-CPU actors (trial, Train controller, its
# placement-group cleaner and synchronisation actor, Ray Data's coordinators), so on a 2-CPU machine
# `make demo`'s two trials set it off: nothing to act on, in the first console a newcomer sees. The
# driver prints it from its error-listener thread (ray/_private/worker.py, listen_error_messages) through
# the module function print_to_stdstream({"lines": [...], "pid": "raylet", ...}, ignore_prefix=False),
# looked up by name at each call; the shim wraps that function and drops those lines alone. Soft gate:
# outside it the shim still tries (the worst outcome is the warning back). If it moves: find where the
# driver prints the raylet's pushed errors and filter there.
WORKER_POOL_WARNING_VERIFIED_RAY = ("2.60.0",)
WORKER_POOL_WARNING = "the maximum expected startup concurrency"


def quiet_worker_pool_warning(quiet: bool = True) -> None:
    """Drop (``quiet``) or print again the raylet's many-worker-processes warning on this driver's console."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    original = getattr(printer, "__wrapped__", printer)
    if not quiet:
        ray_worker.print_to_stdstream = original
        return

    def print_without_the_warning(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if WORKER_POOL_WARNING not in line]
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    print_without_the_warning.__wrapped__ = original
    ray_worker.print_to_stdstream = print_without_the_warning


# ------------------------------------------------ Ray core: the cluster `ray start` left on this machine
# ray.init() without an address joins the cluster whose GCS address the last `ray start` wrote to
# <Ray's temp dir>/ray_current_cluster (ray/_private/services.py: get_ray_address_from_environment ->
# find_bootstrap_address -> ray._private.utils.read_ray_address; `ray stop` deletes the file). vidray
# must know, because it starts a local cluster of its own with keywords that only fit a new one
# (vidray.cluster.init_ray): given to a ray.init that joined the README's `ray start` head, they failed
# after 60 s ("No node info found matching attributes: '127.0.0.2'"). Outside the gate: try anyway (where
# the file moved, None: vidray starts its own local cluster beside that one, which works).
STARTED_CLUSTER_VERIFIED_RAY = ("2.60.0",)


def started_cluster_address(temp_dir: str | None = None) -> str | None:
    """The GCS address of the cluster the last `ray start` on this machine started and no `ray stop` ended
    (what a plain ``ray.init()`` joins), or None. ``temp_dir``: that of a `ray start --temp-dir`, which
    records its cluster there (vidray.local_cluster reads its heads' addresses so)."""
    if _ray_version() not in STARTED_CLUSTER_VERIFIED_RAY:
        warn_once(f"vidray's check for a `ray start` cluster was verified on Ray {STARTED_CLUSTER_VERIFIED_RAY[-1]}")
    try:
        from ray._private.utils import read_ray_address
    except ImportError:
        return None
    return read_ray_address(temp_dir) or None


# ------------------------------------------------ Ray Train V2: StorageContext.persist_current_checkpoint
# The background checkpoint writer (vidray.train.epoch_report.report_epoch) hands ray.train.report a
# checkpoint_upload_fn that Ray runs on its upload thread; it calls
# ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name),
# a DeveloperAPI of ray/train/v2/_internal/execution/storage.py. Outside the gate report_epoch writes
# the checkpoint before it reports. If it moves: re-check report_epoch's upload function against the
# new storage API (and ray.train.report's checkpoint_upload_mode / checkpoint_upload_fn).
BACKGROUND_CHECKPOINT_VERIFIED_RAY = ("2.60.0",)


def background_checkpoints_supported() -> bool:
    """Whether this Ray is one the background checkpoint writer was checked with, and still has its API."""
    if _ray_version() not in BACKGROUND_CHECKPOINT_VERIFIED_RAY:
        return False
    from ray.train.v2._internal.execution.storage import StorageContext

    return callable(getattr(StorageContext, "persist_current_checkpoint", None))


# ------------------------------------------------ Ray Tune: the Train->Tune report hand-over queue
# vidray.tune.sweep.wait_until_tune_has_the_last_report works around a race in Ray 2.60's function
# trainable (ray/train/_internal/session.py, _TrainSession): TuneReportCallback puts each epoch's metrics
# into session._inter_actor_queue (a one-slot Ray queue); the trial's main thread, in get_next ->
# _get_result_from_queues, gets an item and report()s it into session.result_queue (one slot). The wait
# puts HANDOVER_MARKER into that queue itself, and relies on _get_result_from_queues dropping a falsy
# item (``if inter_actor_item:``) without reporting it. Outside the gate the wait is off (with a
# warning). If this moves: re-check the race in that file (does fit() still return before the last
# report is taken? is a falsy item still dropped?), then point this shim at the new queue.
HANDOVER_VERIFIED_RAY = ("2.60.0",)
HANDOVER_ATTRIBUTES = ("_inter_actor_queue",)
HANDOVER_MARKER = None  # falsy: the trial's main thread takes it off the queue and drops it


def train_to_tune_report_queue() -> Any | None:
    """The Train->Tune queue of this trial's process (a ``ray.util.queue.Queue``), or None with a warning
    (once) when the installed Ray is not one the workaround was verified with or its private attribute
    is gone; None without one when no TuneReportCallback was made in this trial (nothing in flight)."""
    ray_version = _ray_version()
    if ray_version not in HANDOVER_VERIFIED_RAY:
        warn_once(
            f"vidray's wait for the last Train->Tune report was verified on Ray {', '.join(HANDOVER_VERIFIED_RAY)} "
            f"and is off on Ray {ray_version}; if a sweep hangs after a trial's last epoch, "
            f"pin ray=={HANDOVER_VERIFIED_RAY[-1]}",
            key="handover:version",
        )
        return None
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        get_session = None
    session = get_session() if get_session else None
    if session is None or not all(hasattr(session, name) for name in HANDOVER_ATTRIBUTES):
        warn_once(
            "vidray cannot find Ray Tune's Train->Tune report queue (ray.train._internal.session moved?); "
            "a sweep may hang after a trial's last epoch",
            key="handover:attributes",
        )
        return None
    return session._inter_actor_queue  # None when no TuneReportCallback was made: nothing in flight


# ------------------------------------------ transformers: VideoMAE's sinusoid position table internals
# transformers/models/videomae/modeling_videomae.py builds the fixed table with the module-level
# get_sinusoid_encoding_table(n_position, d_hid) -> [1, n, d] float32, and VideoMAEEmbeddings keeps it
# as a plain tensor attribute ``position_embeddings`` (not a parameter or buffer, so Module.to() leaves
# it where it is) that forward() copies to the input's device every time. Outside the gate
# move_position_table_with_model warns once and still moves a plain-attribute table. If this moves:
# re-check vidray.model.classifier (interpolate/install_position_table, to_device) and the exported
# model's code (vidray.infer.export.CUSTOM_CODE) against the new VideoMAEEmbeddings.
POSITION_TABLE_VERIFIED_TRANSFORMERS = ("5.",)
_warned_unverified: list[str] = []


def sinusoid_encoding_table(positions: int, hidden_size: int):
    """VideoMAE's own 1-D sinusoid position table: ``[1, positions, hidden_size]`` float32."""
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    return get_sinusoid_encoding_table(positions, hidden_size)


def move_position_table_with_model(embeddings, device) -> None:
    """Put VideoMAEEmbeddings' plain-attribute position table on ``device`` (a table that is already a
    buffer or parameter moved with the model), so forward's copy is device-side, not host-to-device."""
    import torch

    version = _transformers_version()
    if not version.startswith(POSITION_TABLE_VERIFIED_TRANSFORMERS) and not _warned_unverified:
        _warned_unverified.append(version)
        logger.warning(
            "transformers %s is not one vidray checked VideoMAE's position table with (%s): "
            "it may be copied to the device in every forward", version,
            ", ".join(POSITION_TABLE_VERIFIED_TRANSFORMERS),
        )  # fmt: skip
    table = getattr(embeddings, "position_embeddings", None)
    registered = {name for name, _ in embeddings.named_buffers(recurse=False)} | {
        name for name, _ in embeddings.named_parameters(recurse=False)
    }
    if isinstance(table, torch.Tensor) and "position_embeddings" not in registered:
        embeddings.position_embeddings = table.to(device)


# --------------------------------------- transformers: the exported model's private imports (as source)
# An export whose table was interpolated ships its own modeling code (vidray.infer.export.CUSTOM_CODE),
# run by transformers.pipeline(trust_remote_code=True) without vidray installed, so its private imports
# travel as source text: the table builder above, and transformers/conversion_mapping.py, where
# transformers >= 5 keeps the renaming of VideoMAE's saved q_bias/v_bias by model_type. A custom-code
# class gets no renaming unless its model_type is registered. The try/except is the gate at load time
# (transformers 4 has no conversion_mapping and loads q_bias/v_bias as saved). If conversion_mapping
# moves: re-check that a vidray_videomae export still loads its q_bias/v_bias
# (tests/test_export_predict.py) and point the snippet at the new registration.
CONVERSION_MAPPING_VERIFIED_TRANSFORMERS = ("5.",)
EXPORT_CODE_PRIVATE_IMPORTS = '''\
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

try:
    # transformers >= 5 renames VideoMAE's saved q_bias/v_bias on load by model_type, and applies
    # no renaming to custom-code classes unless it is registered for them.
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    register_checkpoint_conversion_mapping(
        "vidray_videomae", get_checkpoint_conversion_mapping("videomae"), overwrite=True
    )
except ImportError:  # transformers 4 loads q_bias/v_bias as they are saved
    pass
'''


# ---------------------------------------------- transformers: VideoMAE's torchvision-free image processor
# transformers 5 splits image processors by backend; the PIL one (no torchvision, which vidray does not
# need) lives in transformers/models/videomae/image_processing_pil_videomae.py. transformers 4's default
# VideoMAEImageProcessor is the PIL/numpy one. If the module moves: find the class AutoImageProcessor
# picks for videomae without torchvision and import that.
IMAGE_PROCESSOR_VERIFIED_TRANSFORMERS = ("5.",)


def videomae_image_processor_class():
    """The VideoMAE image processor class that needs no torchvision."""
    try:
        from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

        return VideoMAEImageProcessorPil
    except ImportError:  # transformers 4: the default processor is the PIL/numpy one
        from transformers import VideoMAEImageProcessor

        return VideoMAEImageProcessor
