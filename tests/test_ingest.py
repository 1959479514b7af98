"""The data path (vidray/train/placement.py, batches.py, ingest.py): every place the splits can live gives the same batches.

Real Parquet shards read by real Ray Data on the session's local cluster; every
video's pixels encode its row id, so a batch's content says exactly which rows
it holds and in which order.
"""

from __future__ import annotations

import json
import re
import threading
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vidray.config import TrainSettings
from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA, read_dataset_info, videos_from_bytes
from vidray.data.store import encode_clip
from vidray.errors import UserError
from vidray.train.batches import (
    BatchBuffers,
    VideoBatchCollate,
    prefetch_in_thread,
    shuffle_buffer_order,
    train_batches,
    val_batches,
    val_rows_of_rank,
)
from vidray.train.rows import arrow_videos
from vidray.train.ingest import DEVICE_CACHE_FRACTION, DeviceCache, StoredClips, device_memory_bytes, should_cache_on_device
from vidray.train.placement import build_datasets, cache_splits

VIDEO_SHAPE = (2, 4, 4, 3)  # 96 bytes: row id in the first two bytes, the rest its label
TRAIN_VIDEOS, VAL_VIDEOS = 70, 13
BATCH = 8


def video_of(row_id: int, label: int) -> bytes:
    video = np.full(VIDEO_SHAPE, label, dtype=np.uint8)
    video.reshape(-1)[:2] = (row_id % 256, row_id // 256)
    return video.tobytes()


def row_ids(videos: torch.Tensor) -> list[int]:
    flat = videos.reshape(videos.shape[0], -1).to(torch.int64)
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ingest")
    counts, shards = {}, []
    for split, count, base in (("train", TRAIN_VIDEOS, 0), ("val", VAL_VIDEOS, 1000)):
        (root / split).mkdir()
        rows = [
            dict(video=video_of(base + i, i % 5), label=i % 5, label_name=f"c{i % 5}", video_id=f"{split}{i}",
                 path=f"/x/{split}{i}.mp4", source_frames=2, padded=False)
            for i in range(count)
        ]  # fmt: skip
        for k in range(0, count, 9):  # 9 rows a shard: batches straddle blocks
            pq.write_table(pa.Table.from_pylist(rows[k : k + 9], schema=SHARD_SCHEMA), root / split / f"part-{k:05d}.parquet")
            shards.append(f"{split}/part-{k:05d}.parquet")
        counts[split] = {"videos": count}
    # Listed shards, as `vidray preprocess` writes them: Ray Data then reads their footers with one
    # actor, not its default 32 (a pool it starts and kills on every read of the split).
    info = dict(classes=[f"c{i}" for i in range(5)], frames=2, size=4, stored_frames=2, stored_size=4, splits=counts,
                shards=shards)  # fmt: skip
    (root / DATASET_INFO).write_text(json.dumps(info))
    return str(root)


@pytest.fixture(scope="module")
def splits(ray_cluster, dataset_dir):
    """(streamed train, cached train, streamed val, cached val): as vidray.train.placement.build_datasets builds them."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    info = read_dataset_info(dataset_dir)
    streamed = build_datasets(dataset_dir, TrainSettings(cache_dataset="never", seed=3), info)
    cached = build_datasets(dataset_dir, TrainSettings(cache_dataset="always", seed=3), info)
    return streamed["train"], cached["train"], streamed["val"], cached["val"]


def _collate() -> VideoBatchCollate:
    return VideoBatchCollate(VIDEO_SHAPE, batch_size=BATCH)


# ----------------------------------------------------------------- no Ray needed


def test_shuffle_buffer_order_is_a_seeded_permutation_that_ignores_the_items():
    order = list(shuffle_buffer_order(range(100), 16, seed=5))
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert list(shuffle_buffer_order(range(100), 16, seed=5)) == order
    assert list(shuffle_buffer_order(range(100), 16, seed=6)) != order
    # What is emitted when depends on positions only: any items come out in the order of range(n).
    letters = [f"row{i}" for i in range(100)]
    assert list(shuffle_buffer_order(letters, 16, seed=5)) == [letters[i] for i in order]
    assert list(shuffle_buffer_order(range(10), 0, seed=5)) == list(range(10))
    # A buffer larger than the data is a full permutation.
    assert sorted(shuffle_buffer_order(range(10), 64, seed=1)) == list(range(10))


def test_arrow_videos_are_views_of_the_arrow_buffer_and_sizes_are_checked():
    table = pa.Table.from_pylist([{"video": video_of(i, 1)} for i in range(5)])
    column = pa.chunked_array([table["video"].chunk(0).slice(0, 2), table["video"].chunk(0).slice(2)])
    views = arrow_videos(column, VIDEO_SHAPE)
    assert [len(v) for v in views] == [2, 3]
    assert [row_ids(torch.from_numpy(v.copy())) for v in views] == [[0, 1], [2, 3, 4]]
    buffer = np.frombuffer(table["video"].chunk(0).buffers()[2], dtype=np.uint8)
    assert np.shares_memory(views[1], buffer)  # no copy
    bad = pa.chunked_array([pa.array([b"x" * 95], type=pa.binary())])
    with pytest.raises(ValueError, match=r"video blob of 95 bytes does not match shape \(2, 4, 4, 3\) \(96 bytes\)"):
        arrow_videos(bad, VIDEO_SHAPE)


def test_a_raw_blob_of_the_wrong_size_is_named_by_its_video_with_the_fix():
    """A raw clip of another size stopped the worker with "video blob of N bytes does not match shape ...",
    naming no video: one line now names it (the table's video_id, counted across its chunks) and says how to
    decode its shard again, as a compressed clip that does not decode is named (vidray.data.store.clip_error)."""
    from vidray.data.store import DECODE_SHARD_AGAIN, StoredClipError
    from vidray.train.rows import arrow_rows

    blobs = [video_of(i, 1) for i in range(5)]
    blobs[3] = blobs[3][:-1]
    table = pa.table({"video": pa.array(blobs, pa.binary()), "label": [1] * 5, "video_id": [f"v{i}" for i in range(5)]})
    table = pa.concat_tables([table.slice(0, 2), table.slice(2)])  # two chunks: v3 is row 1 of the second
    assert table.column("video").num_chunks == 2
    expected = (r"^stored clip of video v3: video blob of 95 bytes does not match shape \(2, 4, 4, 3\) \(96 bytes\); "
                + re.escape(DECODE_SHARD_AGAIN) + "$")  # fmt: skip
    with pytest.raises(StoredClipError, match=expected):
        arrow_videos(table.column("video"), VIDEO_SHAPE, table.column("video_id"))
    with pytest.raises(StoredClipError, match=expected):  # the rows a worker batches (host path)
        list(arrow_rows(table, VIDEO_SHAPE))
    with pytest.raises(StoredClipError, match=r"^stored clip of video row 3 of a batch: video blob of 95 bytes"):
        list(arrow_rows(table.drop_columns(["video_id"]), VIDEO_SHAPE))  # a batch without ids: its row
    # The numpy batches Ray Data collates, and the batches evaluation stacks (`vidray evaluate`, a sweep's
    # held-out test): the same line, which evaluation passes on as it is.
    numpy_batch = {"video": np.array(blobs, dtype=object), "label": np.ones(5, np.int64), "video_id": np.array([f"v{i}" for i in range(5)])}
    with pytest.raises(StoredClipError, match=expected):
        VideoBatchCollate(VIDEO_SHAPE, batch_size=5)(numpy_batch)
    with pytest.raises(StoredClipError, match=expected):
        videos_from_bytes(blobs, VIDEO_SHAPE, "raw", [f"v{i}" for i in range(5)])


def test_batch_buffers_reuse_a_slot_only_when_nobody_holds_its_batch():
    buffers = BatchBuffers((4, 8), torch.uint8, pin_memory=False, depth=2)
    first = buffers.get(4)
    second = buffers.get(4)
    first_id = id(first)
    del first
    assert id(buffers.get(4)) == first_id  # nobody else held it: the same tensor again
    kept = second
    del second
    assert buffers.get(4) is not kept  # still held: a fresh tensor, the kept one untouched
    assert buffers.get(3).shape == (3, 8)  # an odd size never takes a slot


def test_prefetch_thread_hands_over_items_and_errors_and_stops_when_abandoned():
    assert list(prefetch_in_thread(iter(range(20)), depth=2)) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("read failed")

    with pytest.raises(RuntimeError, match="read failed"):
        list(prefetch_in_thread(failing(), depth=2))
    def producers() -> list[threading.Thread]:
        # vidray's own producer, by name: a count of all threads would let Ray's come and go mask a leak.
        return [t for t in threading.enumerate() if t.name == "vidray-batches"]

    assert not producers()
    batches = prefetch_in_thread(iter(range(1000)), depth=2)
    assert next(batches) == 0
    (producer,) = producers()
    batches.close()  # the consumer stops early: the producer thread must end
    assert not producer.is_alive() and not producers()


def test_device_caching_decision():
    cpu = torch.device("cpu")
    memory = device_memory_bytes(cpu, 1)
    assert memory > 0 and device_memory_bytes(cpu, 4) == memory // 4
    fits, too_big = int(DEVICE_CACHE_FRACTION * memory) - 1, int(DEVICE_CACHE_FRACTION * memory) + 1
    assert should_cache_on_device(TrainSettings(cache_dataset="auto"), fits, cpu)
    assert not should_cache_on_device(TrainSettings(cache_dataset="auto"), too_big, cpu)
    assert should_cache_on_device(TrainSettings(cache_dataset="device"), too_big, cpu)  # forced, and it fits at all
    for placement in ("always", "never"):
        assert not should_cache_on_device(TrainSettings(cache_dataset=placement), 1, cpu)
    with pytest.raises(UserError, match=r"train.cache_dataset=device: this worker's shard .* GiB but its share of cpu memory is"):
        should_cache_on_device(TrainSettings(cache_dataset="device"), memory + 1, cpu)


def test_val_rows_of_rank_add_up_to_the_split():
    for world in (1, 2, 3, 5):
        assert sum(val_rows_of_rank(VAL_VIDEOS, BATCH, r, world) for r in range(world)) == VAL_VIDEOS
    assert [val_rows_of_rank(13, 8, r, 2) for r in range(2)] == [8, 5]


# ----------------------------------------------------------------- Ray Data


def _batches(iterable) -> list[tuple[list[int], list[int]]]:
    return [(row_ids(b["video"]), b["label"].tolist()) for b in iterable]


def test_streamed_cached_and_device_paths_give_identical_batches(splits):
    streamed, cached, val, _ = splits
    train = TrainSettings(shuffle_buffer=16, prefetch_batches=2, seed=11)
    cache = DeviceCache.load(
        cached.iterator(), val.iterator(), video_shape=VIDEO_SHAPE, batch_size=BATCH, rank=0, world_size=1,
        device=torch.device("cpu"), train_rows=TRAIN_VIDEOS, val_rows=VAL_VIDEOS,
    )  # fmt: skip
    assert cache.train_videos.shape == (TRAIN_VIDEOS, *VIDEO_SHAPE)
    epochs = []
    for epoch in (0, 1):
        paths = {
            name: _batches(train_batches(ds.iterator(), batch_size=BATCH, train=train, epoch=epoch, rank=0, collate=_collate()))
            for name, ds in (("streamed", streamed), ("cached", cached))
        }
        paths["device"] = _batches(cache.train_batches(batch_size=BATCH, train=train, epoch=epoch, rank=0))
        assert paths["streamed"] == paths["cached"] == paths["device"], epoch
        ids = [i for batch, _ in paths["device"] for i in batch]
        assert len(ids) == (TRAIN_VIDEOS // BATCH) * BATCH and len(set(ids)) == len(ids)  # last partial batch dropped
        for batch, labels in paths["device"]:
            assert labels == [i % 5 for i in batch]  # labels travel with their videos
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # a new order every epoch
    # Another rank (its own shard in real runs) gets another order from the same rows.
    other = _batches(cache.train_batches(batch_size=BATCH, train=train, epoch=0, rank=1))
    assert [i for b, _ in other for i in b] != epochs[0]


def test_a_raw_clip_of_the_wrong_size_stops_every_path_naming_its_video(ray_cluster, tmp_path):
    """The raw store's splits are read with their video ids, so a worker that meets a clip of the wrong size
    (streamed, from the object store, or loading its device cache) names it, as it would a compressed clip."""
    from vidray.data.store import DECODE_SHARD_AGAIN, StoredClipError

    rows = [dict(video=video_of(i, 0), label=0, label_name="c0", video_id=f"clip{i}", path=f"/x/clip{i}.mp4",
                 source_frames=2, padded=False) for i in range(6)]  # fmt: skip
    rows[4]["video"] = rows[4]["video"][:90]
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), tmp_path / split / "part-00000.parquet")
    splits = {"train": {"videos": 6}, "val": {"videos": 6}}
    info = dict(classes=["c0"], frames=2, size=4, stored_frames=2, stored_size=4, splits=splits,
                shards=["train/part-00000.parquet", "val/part-00000.parquet"])  # fmt: skip
    (tmp_path / DATASET_INFO).write_text(json.dumps(info))
    info = read_dataset_info(str(tmp_path))
    named = rf"^stored clip of video clip4: video blob of 90 bytes .*; {re.escape(DECODE_SHARD_AGAIN)}$"
    train = TrainSettings(shuffle_buffer=0, prefetch_batches=1, seed=3)
    for placement in ("never", "always"):
        ds = build_datasets(str(tmp_path), TrainSettings(cache_dataset=placement, seed=3), info)
        with pytest.raises(StoredClipError, match=named):
            list(train_batches(ds["train"].iterator(), batch_size=2, train=train, epoch=0, rank=0, collate=_collate()))
        with pytest.raises(StoredClipError, match=named):
            DeviceCache.load(ds["train"].iterator(), ds["val"].iterator(), video_shape=VIDEO_SHAPE, batch_size=2, rank=0,
                             world_size=1, device=torch.device("cpu"), train_rows=6, val_rows=6)  # fmt: skip


def test_runs_given_cached_splits_share_their_blocks_each_in_its_own_order(ray_cluster, dataset_dir):
    """A sweep's trials (vidray/tune/sweep.py) share the splits its driver cached: no block copied, and
    each trial's train set in the block order of its seed, the order streaming gives."""
    import ray.data

    def block_refs(ds) -> list:
        return [entry.ref for bundle in ds.iter_internal_ref_bundles() for entry in bundle.blocks]

    def rows(ds) -> list[bytes]:
        return [row["video"][:2] for row in ds.take_all()]  # the row id

    info = read_dataset_info(dataset_dir)
    context = ray.data.DataContext.get_current()
    block_bytes, in_order = context.target_max_block_size, context.execution_options.preserve_order
    context.target_max_block_size = 1024  # blocks of ~10 rows, not one for all these tiny shards: an order to check
    context.execution_options.preserve_order = True  # as a run streams (placement.data_config)
    try:
        shared = cache_splits(dataset_dir, 3)
        runs = {
            seed: build_datasets(dataset_dir, TrainSettings(cache_dataset="always", seed=seed), info, cached_splits=shared)
            for seed in (3, 4)
        }
        streamed = build_datasets(dataset_dir, TrainSettings(cache_dataset="never", seed=3), info)["train"]
        shared_blocks = sorted(ref.hex() for ref in block_refs(shared.train))
        assert len(shared_blocks) > 1
        for run in runs.values():
            assert sorted(ref.hex() for ref in block_refs(run["train"])) == shared_blocks
            assert run["val"] is shared.val
        assert block_refs(runs[3]["train"]) != block_refs(runs[4]["train"])
        assert rows(runs[3]["train"]) == rows(streamed)
    finally:
        context.target_max_block_size, context.execution_options.preserve_order = block_bytes, in_order


def test_a_streamed_split_comes_in_its_seeds_order_without_waiting_for_all_of_it(splits, dataset_dir, capsys):
    """Streamed, the train split (and pretraining's splits together) were put in order by Ray's
    ``randomize_block_order``, which waits for every block before it passes one on: each epoch read the whole
    split into the object store (spilled to disk when larger than it) before the first batch. Its shards are read
    in a seeded order now: the plan is a read alone, and the order is the seed's."""
    from vidray.config import load_config
    from vidray.pretrain.driver import build_pretraining_datasets

    streamed = splits[0]
    cfg = load_config(None, ["pretrain.splits=[train,val]", "train.cache_dataset=never", "train.seed=3"])
    pretraining = build_pretraining_datasets(dataset_dir, cfg, read_dataset_info(dataset_dir))["train"]
    for ds in (streamed, pretraining):
        ds.explain()
        plan = capsys.readouterr().out
        assert "ReadFiles" in plan and "RandomizeBlocks" not in plan and "AllToAll" not in plan, plan
    def shards(ds) -> list[tuple[int, int]]:
        """(split, shard) of the rows in the order they come: 9 rows a shard, val's ids from 1000."""
        ids = [row["video"][0] + 256 * row["video"][1] for row in ds.take_all()]
        return list(dict.fromkeys((i // 1000, i % 1000 // 9) for i in ids))

    train_shards = [(0, k) for k in range(-(-TRAIN_VIDEOS // 9))]
    order = shards(streamed)
    assert sorted(order) == train_shards and order != train_shards  # every shard, not as written
    reread = build_datasets(dataset_dir, TrainSettings(cache_dataset="never", seed=3), read_dataset_info(dataset_dir))["train"]
    assert shards(reread) == order  # the seed's order
    assert sorted(shards(pretraining)) == train_shards + [(1, k) for k in range(-(-VAL_VIDEOS // 9))]


def test_a_sweeps_trials_stream_when_it_says_so_and_count_the_node_as_shared(ray_cluster, dataset_dir):
    """A sweep decides once whether its trials read the object store or stream (vidray/tune/sweep.py), and
    leaves device caches to each trial's workers: a trial's ``train.cache_dataset`` stays the user's ``auto``,
    which alone would cache these tiny splits, so ``stream`` must hold whatever ``auto`` would choose. On CPU
    a trial's worker's share of the node's memory is split by as many workers as the node hosts (the session's
    node: 2 CPUs), not by its own trial's workers only: trials side by side each counted the whole node."""
    from ray.data.dataset import MaterializedDataset

    from vidray.train.loop import workers_sharing_node
    from vidray.train.placement import should_cache_dataset

    info = read_dataset_info(dataset_dir)
    auto = TrainSettings(cache_dataset="auto")
    assert should_cache_dataset(auto, info)
    assert isinstance(build_datasets(dataset_dir, auto, info)["train"], MaterializedDataset)
    streamed = build_datasets(dataset_dir, auto, info, stream=True)
    assert not any(isinstance(ds, MaterializedDataset) for ds in streamed.values())
    assert workers_sharing_node(TrainSettings(cpus_per_worker=1), 1) == 2
    assert workers_sharing_node(TrainSettings(cpus_per_worker=0.5), 1) == 4
    assert workers_sharing_node(TrainSettings(cpus_per_worker=1), 3) == 3  # a run's own count when larger
    assert workers_sharing_node(TrainSettings(use_gpu=True), 1) == 1  # no GPU here: only its own


def test_val_batches_cover_every_video_once_across_uneven_ranks_on_every_path(splits):
    _, _, val, cached_val = splits
    for world in (2, 3):
        seen = []
        for rank in range(world):
            ray_data = _batches(val_batches(cached_val.iterator(), batch_size=BATCH, rank=rank, world_size=world,
                                            prefetch_batches=1, collate=_collate()))  # fmt: skip
            cache = DeviceCache.load(
                cached_val.iterator(), val.iterator(), video_shape=VIDEO_SHAPE, batch_size=BATCH, rank=rank,
                world_size=world, device=torch.device("cpu"), train_rows=0,
                val_rows=val_rows_of_rank(VAL_VIDEOS, BATCH, rank, world),
            )  # fmt: skip
            assert _batches(cache.val_batches()) == ray_data
            seen += [i for batch, _ in ray_data for i in batch]
        assert sorted(seen) == [1000 + i for i in range(VAL_VIDEOS)], world


def test_collate_of_numpy_rows_copies_once_into_its_buffer():
    collate = _collate()
    batch = {"video": np.array([video_of(i, 2) for i in range(BATCH)], dtype=object), "label": np.full(BATCH, 2)}
    out = collate(batch)
    assert row_ids(out["video"]) == list(range(BATCH)) and out["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="does not match shape"):
        collate({"video": np.array([b"x"], dtype=object), "label": np.zeros(1)})


def test_a_compressed_cache_is_held_once_in_host_memory_while_it_loads():
    """A compressed store's cache (data.store=jpeg, train.cache_dataset auto or device) copied each table's clips into
    a part, then the parts into one array while they were all alive: loading it peaked at twice its size in host
    memory, where the auto rule budgets it once. The same bytes and offsets come back."""
    ramp = np.linspace(0, 1, 64)[None, :, None, None] * np.linspace(0, 1, 64)[None, None, :, None]
    noise = np.random.default_rng(0).integers(0, 30, (40 * 5, 4, 64, 64, 3))
    blobs = [encode_clip(np.clip(20 + 100 * ramp + i + noise[i], 0, 255).astype(np.uint8), "jpeg", 90) for i in range(200)]
    tables = [pa.table({"video": blobs[k : k + 5], "label": [k % 3] * 5, "video_id": [f"v{k + j}" for j in range(5)]})
              for k in range(0, 200, 5)]  # fmt: skip
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        clips, labels, sizes = StoredClips.gather(tables, (4, 64, 64, 3), "jpeg", fill=True)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert clips.data.tobytes() == b"".join(blobs)
    assert clips.offsets.tolist() == [0, *np.cumsum([len(blob) for blob in blobs]).tolist()]
    assert clips.video_ids == [f"v{i}" for i in range(200)] and sizes == [5] * 40
    assert labels.tolist() == [k // 5 * 5 % 3 for k in range(200)]
    assert peak <= 1.2 * clips.data.nbytes, peak / clips.data.nbytes
