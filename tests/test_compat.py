"""The private Ray and transformers APIs vidray relies on, checked against the installed releases.

Every shim in vidray/compat.py has a test here that imports the private API, checks the attribute or
signature the shim reads, and fails when the installed release is outside the shim's version gate,
naming what to re-check. Nothing is mocked: these read the installed Ray and transformers.
"""

from __future__ import annotations

import inspect
import os
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vidray import compat, errors

REPO = Path(__file__).resolve().parents[1]

# What marks a private Ray/transformers API in vidray's source. tests/test_compat.py's own rule:
# only vidray/compat.py may name one.
PRIVATE_API = re.compile(
    r"_internal|StorageContext|_inter_actor_queue|conversion_mapping|ray\._private|_private\b"
    r"|modeling_videomae|image_processing_\w+_videomae|transformers\.(models|utils)\."
)


def _installed(package: str) -> str:
    return __import__(package).__version__


def assert_in_ray_gate(gate: tuple[str, ...], recheck: str) -> None:
    version = _installed("ray")
    assert version in gate, f"Ray {version} is outside vidray.compat's gate {gate}: {recheck}, then list it"


def assert_in_transformers_gate(gate: tuple[str, ...], recheck: str) -> None:
    version = _installed("transformers")
    assert version.startswith(gate), (
        f"transformers {version} is outside vidray.compat's gate {gate}: {recheck}, then list it"
    )


def test_only_compat_names_a_private_ray_or_transformers_api():
    offenders = []
    for path in sorted((REPO / "vidray").rglob("*.py")):
        if path.name == "compat.py" and path.parent.name == "vidray":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_API.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "private Ray/transformers APIs belong in vidray/compat.py:\n" + "\n".join(offenders)


def test_compat_imports_nothing_heavy():
    """The GPU check imports vidray.model.classifier (and so vidray.compat) where Ray is not installed."""
    probe = "import sys, vidray.compat; print(sorted({'ray', 'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ Ray


def test_ray_train_report_log_is_where_the_shim_quiets_it():
    from ray.train.v2._internal.execution import context

    assert_in_ray_gate(
        compat.TRAIN_REPORT_LOG_VERIFIED_RAY, "re-check where Ray Train logs 'Reporting training result'"
    )
    assert "Reporting training result" in inspect.getsource(context)
    assert context.logger is logging.getLogger(context.__file__)
    level = context.logger.level
    try:
        compat.quiet_ray_train_report_log()
        assert context.logger.level == logging.WARNING
    finally:
        context.logger.setLevel(level)


def test_a_ray_start_cluster_is_found_where_ray_records_it(tmp_path, monkeypatch):
    """ray.init() without an address joins the cluster the last `ray start` recorded in Ray's temp dir; vidray
    looks there first, so that it joins it as Ray would rather than start its own with keywords that do not fit."""
    from ray._common.utils import get_ray_address_file
    from ray._private.services import get_ray_address_from_environment

    assert_in_ray_gate(compat.STARTED_CLUSTER_VERIFIED_RAY, "re-check where ray.init() finds a `ray start` cluster")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert compat.started_cluster_address() is None and get_ray_address_from_environment(None, None) is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")  # what `ray start` writes
    assert get_ray_address_file(None) == str(tmp_path / "ray" / "ray_current_cluster")
    assert compat.started_cluster_address() == get_ray_address_from_environment(None, None) == "10.1.2.3:6379"


def test_a_command_joins_the_cluster_ray_start_left_running(ray_head, tmp_path):
    """The README's `ray start --head` then a vidray command without RAY_ADDRESS: it joins that cluster. It used to
    pass its new-cluster keywords (node IP 127.0.0.2, a dashboard of its own) to the ray.init that joined it, and
    failed after 60 s where the head's node IP was another (`--node-ip-address 127.0.0.1` becomes the host's)."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(ray_head["address"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    probe = ("import ray; from vidray.cluster import init_ray; from vidray.tune.local_ray import local_cluster_kwargs; "
             "init_ray(**local_cluster_kwargs()); print(ray.get_runtime_context().gcs_address)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split()[-1] == ray_head["address"], out.stderr[-3000:]


def test_the_raylets_worker_pool_warning_is_dropped_where_the_driver_prints_it(capsys):
    """The raylet still words its warning so, the driver still prints the raylet's pushed errors through the
    module's print_to_stdstream, and the shim drops that warning alone (and puts the printer back)."""
    import ray
    import ray._private.worker as ray_worker

    assert_in_ray_gate(compat.WORKER_POOL_WARNING_VERIFIED_RAY, "re-check how the driver prints the raylet's warnings")
    raylet = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
    assert compat.WORKER_POOL_WARNING.encode() in raylet.read_bytes()
    listener = inspect.getsource(ray_worker.listen_error_messages)
    assert "print_to_stdstream(" in listener and '"pid": "raylet"' in listener
    before = ray_worker.print_to_stdstream  # Ray's printer, or the shim's wrapper an earlier command in this process left
    original = getattr(before, "__wrapped__", before)
    warning = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.2, which is 4x "
               "the maximum expected startup concurrency (2). This could be a result of ...")  # fmt: skip
    try:
        compat.quiet_worker_pool_warning()
        compat.quiet_worker_pool_warning()  # twice: still one wrapper around Ray's printer
        assert ray_worker.print_to_stdstream.__wrapped__ is original
        ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": [warning, "a node died"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        out = capsys.readouterr().out
        assert "maximum expected startup concurrency" not in out and "a node died" in out
        compat.quiet_worker_pool_warning(False)  # --verbose: Ray's printer again
        assert ray_worker.print_to_stdstream is original
        ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        assert "4x the maximum expected startup concurrency" in capsys.readouterr().out
    finally:
        ray_worker.print_to_stdstream = before


def test_background_checkpoints_rest_on_a_checked_ray_api():
    import ray.train
    from ray.train.v2._internal.execution.storage import StorageContext

    assert_in_ray_gate(
        compat.BACKGROUND_CHECKPOINT_VERIFIED_RAY,
        "re-check vidray.train.epoch_report.report_epoch's background writer against StorageContext",
    )
    assert list(inspect.signature(StorageContext.persist_current_checkpoint).parameters) == [
        "self", "checkpoint", "checkpoint_dir_name"
    ]  # fmt: skip
    assert {"checkpoint_upload_mode", "checkpoint_upload_fn"} <= set(inspect.signature(ray.train.report).parameters)
    assert compat.background_checkpoints_supported()


def test_train_to_tune_handover_queue_is_where_the_workaround_uses_it():
    """The fast, static half; tests/test_tune.py runs the workaround on a live trial where the race is widest."""
    from ray.train._internal import session
    from ray.tune.integration import ray_train

    assert_in_ray_gate(
        compat.HANDOVER_VERIFIED_RAY, "re-check the Train->Tune race in ray/train/_internal/session.py"
    )
    assert callable(session.get_session)
    source = inspect.getsource(session._TrainSession)  # __init__ sets them through reset()
    for name in compat.HANDOVER_ATTRIBUTES:
        assert re.search(rf"self\.{name}\b[^=\n]*= ", source), f"_TrainSession no longer sets {name}"
    assert "self.result_queue = queue.Queue(1)" in source  # the one-slot queue the race is about
    # The main thread drops a falsy item (the wait's marker) instead of reporting it.
    assert not compat.HANDOVER_MARKER
    handover = inspect.getsource(session._TrainSession._get_result_from_queues)
    assert re.search(r"inter_actor_item = self\._inter_actor_queue\.get\(.*?\n\s+if inter_actor_item:", handover, re.S)
    # TuneReportCallback still hands reports over through that queue.
    assert "_get_or_create_inter_actor_queue()" in inspect.getsource(ray_train.TuneReportCallback)
    # Outside a trial there is no session: the shim says so without touching the attributes.
    errors._warned.discard("handover:attributes")
    try:
        with pytest.warns(RuntimeWarning, match="cannot find Ray Tune's Train->Tune report queue"):
            assert compat.train_to_tune_report_queue() is None
    finally:
        errors._warned.discard("handover:attributes")


# ------------------------------------------------------------------------------------------ transformers


def test_videomae_position_table_is_a_plain_attribute_built_by_the_sinusoid_helper():
    import torch
    from transformers import VideoMAEConfig
    from transformers.models.videomae import modeling_videomae

    assert_in_transformers_gate(
        compat.POSITION_TABLE_VERIFIED_TRANSFORMERS,
        "re-check vidray.model.classifier's position table (interpolate, install, to_device) "
        "and vidray.infer.export.CUSTOM_CODE against VideoMAEEmbeddings",
    )
    assert list(inspect.signature(modeling_videomae.get_sinusoid_encoding_table).parameters) == ["n_position", "d_hid"]
    table = compat.sinusoid_encoding_table(12, 8)
    assert table.shape == (1, 12, 8) and table.dtype == torch.float32
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=8)
    embeddings = modeling_videomae.VideoMAEEmbeddings(config)
    assert torch.equal(embeddings.position_embeddings, compat.sinusoid_encoding_table(2 * 2 * 2, 8))
    registered = dict(embeddings.named_buffers()) | dict(embeddings.named_parameters())
    assert "position_embeddings" not in registered  # so Module.to() leaves it behind
    assert "self.position_embeddings" in inspect.getsource(modeling_videomae.VideoMAEEmbeddings.forward)
    embeddings.to(torch.device("meta"))
    assert embeddings.position_embeddings.device.type == "cpu"
    compat.move_position_table_with_model(embeddings, torch.device("meta"))
    assert embeddings.position_embeddings.device.type == "meta"


def test_exported_code_registers_videomae_renaming_for_its_model_type():
    from transformers import conversion_mapping

    assert_in_transformers_gate(
        compat.CONVERSION_MAPPING_VERIFIED_TRANSFORMERS,
        "re-check that a vidray_videomae export loads its q_bias/v_bias (tests/test_export_predict.py) "
        "and vidray.compat.EXPORT_CODE_PRIVATE_IMPORTS",
    )
    register = inspect.signature(conversion_mapping.register_checkpoint_conversion_mapping).parameters
    assert list(register)[1] == "mapping" and "overwrite" in register  # the snippet passes (model_type, mapping)
    videomae = conversion_mapping.get_checkpoint_conversion_mapping("videomae")
    assert videomae, "transformers no longer renames VideoMAE's saved weights by model_type"
    namespace: dict = {}
    exec(compile(compat.EXPORT_CODE_PRIVATE_IMPORTS, "exported-code", "exec"), namespace)
    assert namespace["get_sinusoid_encoding_table"] is not None
    registered = conversion_mapping.get_checkpoint_conversion_mapping("vidray_videomae")
    assert [repr(rule) for rule in registered] == [repr(rule) for rule in videomae]


def test_torchvision_free_videomae_image_processor_is_where_the_shim_finds_it():
    from transformers.image_processing_utils import BaseImageProcessor

    assert_in_transformers_gate(
        compat.IMAGE_PROCESSOR_VERIFIED_TRANSFORMERS,
        "re-check which VideoMAE image processor AutoImageProcessor picks without torchvision",
    )
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    assert compat.videomae_image_processor_class() is VideoMAEImageProcessorPil
    assert issubclass(VideoMAEImageProcessorPil, BaseImageProcessor)


def test_parquet_footer_readers_are_sized_where_ray_builds_its_read(monkeypatch):
    """vidray.data.dataset.read_split sizes Ray Data's footer-reader pool and its calls through the
    environment, which Ray reads when read_parquet builds its file indexer; the indexer keeps both for the
    whole read."""
    import ray.data
    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer
    from ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer import FooterFileIndexer

    assert_in_ray_gate(compat.PARQUET_FOOTER_READERS_VERIFIED_RAY, "re-check how read_parquet sizes its footer readers")
    assert footer_file_indexer._DEFAULT_NUM_ACTORS == compat.PARQUET_FOOTER_READERS_MAX
    assert footer_file_indexer._DEFAULT_BATCH_SIZE == 10  # Ray's, replaced below
    # One call's files are read at once on the reader's own threads: a call of 128 keeps them all busy.
    assert footer_file_indexer._DEFAULT_IO_CONCURRENCY == compat.PARQUET_FOOTERS_PER_CALL
    # read_parquet builds the indexer when it is called (not when the dataset executes), so a
    # setting around the call holds for the read.
    assert "_get_file_indexer()" in inspect.getsource(ray.data.read_api)

    def sizes() -> tuple[int, int]:
        indexer = FooterFileIndexer(ignore_missing_paths=False)
        return indexer._num_actors, indexer._footer_batch_size

    for name in (compat.PARQUET_FOOTER_READERS_ENV, compat.PARQUET_FOOTER_BATCH_ENV):
        monkeypatch.delenv(name, raising=False)
    sized = {}
    for files in (1, 119, 4096, 4097, 30_000, 1_000_000):
        with compat.parquet_footer_readers_for(files):
            sized[files] = sizes()
    assert sized == {1: (1, 128), 119: (1, 128), 4096: (1, 128), 4097: (2, 128), 30_000: (8, 128), 1_000_000: (32, 128)}
    for name in (compat.PARQUET_FOOTER_READERS_ENV, compat.PARQUET_FOOTER_BATCH_ENV):
        assert name not in os.environ  # left as it was
    assert sizes() == (compat.PARQUET_FOOTER_READERS_MAX, 10)  # Ray's own outside the block
    # A user's own setting wins, each on its own.
    monkeypatch.setenv(compat.PARQUET_FOOTER_READERS_ENV, "3")
    with compat.parquet_footer_readers_for(1000):
        assert sizes() == (3, 128)
    assert os.environ[compat.PARQUET_FOOTER_READERS_ENV] == "3" and compat.PARQUET_FOOTER_BATCH_ENV not in os.environ
    monkeypatch.setenv(compat.PARQUET_FOOTER_BATCH_ENV, "7")
    with compat.parquet_footer_readers_for(1000):
        assert sizes() == (3, 7)
    assert os.environ[compat.PARQUET_FOOTER_BATCH_ENV] == "7"


def test_a_first_read_inside_the_footer_reader_shim_leaves_rays_default_for_later_reads():
    """read_parquet imports the footer indexer on its first call, and the module keeps the environment's value
    as its default: had vidray's first read of a process been that import, every later read in the process
    (a user's own too) would have got its one-off size (1 reader for a small split) instead of Ray's 32.
    A fresh process, so that this first import is really the first."""
    code = (
        "from vidray import compat\n"
        "with compat.parquet_footer_readers_for(5):\n"
        "    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer as indexer\n"
        "    inside = indexer.FooterFileIndexer(ignore_missing_paths=False)._num_actors\n"
        "print(inside, indexer._DEFAULT_NUM_ACTORS, indexer.FooterFileIndexer(ignore_missing_paths=False)._num_actors)\n"
    )
    ours = (compat.PARQUET_FOOTER_READERS_ENV, compat.PARQUET_FOOTER_BATCH_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", str(compat.PARQUET_FOOTER_READERS_MAX), str(compat.PARQUET_FOOTER_READERS_MAX)]
