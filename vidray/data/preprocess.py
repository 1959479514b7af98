"""Decode a manifest's videos into the sharded Parquet dataset, on Ray (``vidray preprocess``).

The stages of one run, each in its own module:

* vidray/data/shards.py - read the manifest, plan work-balanced shards per
  split, give each an id that hashes its videos and the decode parameters
  (resume: a finished shard is reused; no mixing of manifests or parameters);
* vidray/data/shard_files.py - the dataset directory's layout; clear what the
  plan does not own, keep what is finished, write everything atomically;
* vidray/data/ray_decode.py - one Ray task per shard, handed out by Ray Data or
  as plain Ray tasks (``dispatch``), biggest first (the run does not end with one
  CPU decoding a heavy shard while the others idle); a shard whose worker dies is
  re-run one video per task;
* vidray/data/decode_shard.py - what a task does: decode each video or
  reject it with the reason, and write the shard.

Then, here: the rejects and ``dataset.json`` (written last: present ==
complete and consistent), after checking the invariant processed + rejected
== discovered. A rerun that finds every shard finished and nothing stale
leaves them as they are: it only reads, so runs that share a dataset can each
prepare it first.

Test-only fault injection: when the environment of the process calling
:func:`preprocess` has ``VIDRAY_TEST_CRASH_ON=<substring>``, the decode task
calls ``os._exit(1)`` (a real worker death, like a segfault) on every video
whose path contains that substring.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vidray.config import DEFAULT_DECODER, DEFAULT_JPEG_QUALITY, DISPATCHES, SPLITS, STORES, DecodeDevice, DecoderName, Dispatch, StoreName
from vidray.data.dataset import DATASET_INFO
from vidray.data.decode_shard import CRASH_ON_ENV
from vidray.data.shard_files import (
    WORKER_CRASH, check_writable, clear_stale, crash_hint, find_stale, inside_job_copy, is_written, write_rejects,
    write_text,
)  # fmt: skip
from vidray.data.shards import VIDEOS_PER_SHARD, DecodeSettings, Shard, default_stored, load_videos, plan_shards
from vidray.data.video import require_decoder
from vidray.errors import UserError
from vidray.folder_lock import FolderLock
from vidray.storage import check_storage_for_cluster, join_uri, open_filesystem, resolve_path, write_atomically


def preprocess(
    manifest: Path,
    out: str,
    frames: int = 16,
    size: int = 112,
    stored_frames: int | None = None,
    stored_size: int | None = None,
    videos_per_shard: int = VIDEOS_PER_SHARD,
    decoder: DecoderName = DEFAULT_DECODER,
    decoder_device: DecodeDevice = "cpu",
    store: StoreName = "raw",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    dispatch: Dispatch = "ray_data",
    verbose: bool = False,
    retry_crashed: bool = False,
    shared_filesystem: bool = False,
    out_key: str = "--out",
) -> dict[str, Any]:
    """Decode every video of ``manifest`` into the dataset directory ``out``.

    ``decoder`` (``pyav``, ``decord``, ``torchcodec``) and ``decoder_device``
    (``cpu``; ``cuda``: torchcodec on NVDEC, each task taking a share of a GPU)
    say how; ``store`` (``raw``, ``jpeg`` at ``jpeg_quality``: vidray/data/store.py)
    how the frames are stored; ``dispatch`` who hands the decode tasks out (``ray_data``, or
    ``ray_tasks``: plain Ray tasks, the same shards); ``verbose`` puts Ray's own lines on the console
    (vidray.cluster.console_settings); ``retry_crashed`` (``--retry-crashed`` of `vidray preprocess` and
    `vidray prepare`) decodes again the shards of videos that killed their worker last time (``worker_crash``:
    it need not recur). Without it a rerun keeps them as written, as a train or sweep preparing its data
    does: a run it continues must find the same data. ``shared_filesystem`` (``run.shared_filesystem``): the
    user vouches that a local ``out`` is the same folder on every node; without it a node-local ``out`` is
    refused on a multi-node cluster (:func:`refuse_node_local_output`, naming ``out_key``).
    Returns what ``out/dataset.json`` says (with
    ``dataset_dir`` added). Besides the dataset's counts and the decoder it
    holds this run's ``decoded_this_run``, ``shards_reused`` and
    ``shards_written``: re-running with the same manifest and parameters decodes nothing,
    and then leaves dataset.json as the run that wrote it left it (those three fields and
    ``seconds`` included).
    """
    started = time.monotonic()
    manifest = Path(manifest)
    # The decode tasks write the shards wherever they run: a relative path would land in each Ray
    # worker's own directory (on a running cluster, not the caller's), away from dataset.json.
    out = resolve_path(out)
    warn_if_inside_a_job_copy(out, out_key)
    refuse_node_local_output(out, out_key, shared_filesystem)  # connected already (`vidray prepare`): before writing
    stored_frames, stored_size = default_stored(frames, size, stored_frames, stored_size)
    if videos_per_shard < 1:
        raise UserError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    if store not in STORES:
        raise UserError(f"store {store!r} is not one of {', '.join(STORES)}")
    if dispatch not in DISPATCHES:
        raise UserError(f"dispatch {dispatch!r} is not one of {', '.join(DISPATCHES)}")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"jpeg_quality must be from 1 to 100, got {jpeg_quality}")
    require_decoder(decoder, decoder_device)  # a missing package fails here, not once per video
    settings = DecodeSettings(stored_frames, stored_size, decoder, decoder_device, store, jpeg_quality)
    videos, classes = load_videos(manifest)
    fs, root = open_filesystem(out)
    check_writable(fs, root, out)

    shards = plan_shards(videos, stored_frames, stored_size, videos_per_shard, decoder, decoder_device, store, jpeg_quality)
    # One writer per dataset: another run preparing it (a second sweep started beside this one) waits, then
    # reuses what this one wrote (vidray/folder_lock.py).
    with FolderLock(out, "vidray preprocess", wait=True):
        outcomes, stale = find_stale(fs, root, shards, retry_crashed)
        # Biggest first: the last tasks to start are the shortest, so no CPU waits long for one at the end.
        todo = sorted((s for s in shards if s.id not in outcomes), key=lambda s: (-s.work, s.id))
        reused = len(outcomes)
        if todo:
            # Ray costs seconds to import: a run that reuses every shard never loads it.
            from vidray.cluster import init_ray
            from vidray.data.ray_decode import check_cuda_workers, isolate_crashes, run_shards

            init_ray(verbose=verbose)
            refuse_node_local_output(out, out_key, shared_filesystem)  # before anything is deleted
        if stale or todo:
            clear_stale(fs, root, stale)
        if todo:
            if decoder_device == "cuda":
                check_cuda_workers(settings)
            crash_on = os.environ.get(CRASH_ON_ENV) or None
            finished = run_shards(todo, out, settings, crash_on, dispatch)
            crashed = [s for s in todo if s.id not in finished]
            if crashed:
                print(
                    f"vidray preprocess: {len(crashed)} shard task(s) died; re-running their videos one per task",
                    file=sys.stderr,
                    flush=True,
                )
                finished.update(isolate_crashes(crashed, out, settings, crash_on))
            outcomes.update(finished)

        summary = {
            "classes": classes,
            "frames": frames,
            "size": size,
            "stored_frames": stored_frames,
            "stored_size": stored_size,
            "decoder": decoder,
            "decoder_device": decoder_device,
            "store": store,
            **({"jpeg_quality": jpeg_quality} if store == "jpeg" else {}),
            "manifest": str(manifest.resolve()),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            **_count(shards, outcomes, classes, discovered=len(videos), raw_clip_bytes=stored_frames * stored_size**2 * 3),
            "seconds": round(time.monotonic() - started, 2),
            "decoded_this_run": sum(len(s.videos) for s in todo),
            "shards_reused": reused,
            "shards_written": len(todo),
        }
        rejected = [row for s in shards for row in outcomes[s.id] if row["status"] == "rejected"]
        if not is_written(fs, root, summary):
            write_rejects(fs, root, rejected)
            write_atomically(
                fs,
                join_uri(root, DATASET_INFO),
                lambda tmp: write_text(fs, tmp, json.dumps(summary, indent=2)),
            )
    print(
        f"vidray preprocess: {summary['discovered']} videos -> {summary['processed']} processed "
        f"({summary['padded']} padded), {summary['rejected']} rejected"
        + (f" (see {join_uri(out, 'rejects.csv')}{_crash_hint(rejected)})" if rejected else "")
        + f"; decoded {summary['decoded_this_run']}, reused {reused}/{len(shards)} shards; "
        f"{summary['seconds']} s -> {out}",
        file=sys.stderr,
        flush=True,
    )
    return {"dataset_dir": str(out), **summary}


def refuse_node_local_output(out: str, key: str, shared_filesystem: bool = False) -> None:
    """Refuse (one line naming ``key``) a dataset directory on a node's own disk when the connected Ray cluster has,
    or will get, several nodes: the decode tasks are spread over the nodes and each would write its shards to its
    own node, while dataset.json on the driver's lists them all (vidray.storage.check_storage_for_cluster, as
    `vidray train` checks it). Nothing to check while this process is not connected to Ray: importing Ray to ask
    costs seconds, and a run that decodes nothing never does."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        check_storage_for_cluster(out, key, shared_filesystem=shared_filesystem)


def warn_if_inside_a_job_copy(out: str, key: str) -> None:
    """Under `ray job submit --working-dir`, the job runs in a copy of that folder that Ray deletes when the job
    ends: a dataset directory inside it (a relative data.dataset_dir, as by default) goes with it. Say so once.
    (vidray/train/driver.py's warn_if_inside_a_job_copy says it of the run's outputs.)"""
    if not inside_job_copy(out):
        return
    print(f"vidray preprocess: warning: {key} ({out}) is inside this job's working-directory copy ({Path.cwd()}), "
          "which Ray deletes when the job ends; use an absolute path outside it", file=sys.stderr, flush=True)  # fmt: skip


def _crash_hint(rejected: list[dict]) -> str:
    return crash_hint(sum(row["error"] == WORKER_CRASH for row in rejected))


def _count(shards: list[Shard], outcomes: dict[str, list[dict]], classes: list[str], discovered: int, raw_clip_bytes: int) -> dict:
    rows = [row for s in shards for row in outcomes[s.id]]
    processed = [r for r in rows if r["status"] == "processed"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    if len(processed) + len(rejected) != discovered or len(rows) != discovered:
        raise RuntimeError(
            f"internal error: {len(processed)} processed + {len(rejected)} rejected != {discovered} discovered"
        )
    splits = {}
    for split in SPLITS:
        per_class = Counter(r["label"] for r in processed if r["split"] == split)
        splits[split] = {"videos": sum(per_class.values()), "per_class": {c: per_class.get(c, 0) for c in classes}}
    return {
        "splits": splits,
        # Bytes of each split's stored clips (what a cache of it holds); records older than the
        # stores have no stored_bytes and were raw.
        "stored_bytes": {
            split: sum(r.get("stored_bytes") or raw_clip_bytes for r in processed if r["split"] == split) for split in SPLITS
        },
        "discovered": discovered,
        "processed": len(processed),
        "rejected": len(rejected),
        "padded": sum(1 for r in processed if r["padded"]),
        "rejected_by_error": dict(Counter(r["error"] for r in rejected)),
        "shards": [s.parquet_name for s in shards if any(r["status"] == "processed" for r in outcomes[s.id])],
    }
