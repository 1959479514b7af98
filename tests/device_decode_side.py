"""The GPU decode path of the jpeg store (vidray/train/decoding.py) run on the CPU by a real batched
JPEG decoder: tests/test_device_decode.py runs this in the pipeline venv (``make pipeline-env``), the
one environment here with such a library (torchvision; the project's venv cannot import it beside its
CPU torch), with vidray's source on PYTHONPATH.

    .venv-pipeline/bin/python tests/device_decode_side.py CLIPS.npy     # prints one JSON object

``CLIPS.npy``: uint8 ``[n, stored_frames, S, S, 3]`` real frames. Each clip is stored as the jpeg
store stores it (vidray.data.store.encode_clip), and its batches are built twice on every path
(the device cache's StoredClips and the streamed rows' VideoBatchCollate): by the host decoder and
by the device decoder, whole clips and sampled frames.
"""

from __future__ import annotations

import json
import sys
import warnings
import zlib

import numpy as np
import pyarrow as pa
import torch

from vidray.config import TrainSettings
from vidray.data.store import _HEADER, StoredClipError, encode_clip, jpeg_frame_spans
from vidray.train.batches import VideoBatchCollate, train_batches
from vidray.train.decoding import DeviceJpegDecoder, agreement_db, device_decoder_for, jpeg_batch_decoder
from vidray.train.ingest import DeviceCache

BATCH = 4


class Tables:
    """The one call vidray's batch builders make of a Ray Data shard, over in-memory Arrow tables."""

    def __init__(self, tables: list[pa.Table]):
        self.tables = tables

    def iter_batches(self, *, batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        assert batch_format == "pyarrow"
        if batch_size is None:  # whole blocks, as Ray Data hands them over
            yield from self.tables
            return
        whole = pa.concat_tables(self.tables)
        for start in range(0, whole.num_rows, batch_size):
            yield whole.slice(start, batch_size)


def sampled(batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the frames each batch decoded, labels): a decoded batch's other slots hold nothing defined."""
    out = []
    for batch in batches:
        videos = batch["video"]
        if "frame_index" in batch:
            videos = videos[torch.arange(len(videos))[:, None], batch["frame_index"]]
        out.append((videos.clone(), batch["label"].clone()))
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def frame_sampler(seed: int, stored_frames: int, k: int):
    generator = np.random.default_rng(seed)
    return lambda clips: np.sort(generator.choice(stored_frames, (clips, k)), axis=1)


def main(clips_path: str) -> dict:
    warnings.simplefilter("ignore", UserWarning)  # torchvision 0.29: its JPEG decoder is deprecated for torchcodec's
    clips = np.load(clips_path)
    video_shape = tuple(clips.shape[1:])
    blobs = [encode_clip(clip, "jpeg", 90) for clip in clips]
    labels = list(range(len(blobs)))
    tables = [pa.table({"video": pa.array(blobs[i : i + 3], pa.binary()), "label": pa.array(labels[i : i + 3], pa.int64())})
              for i in range(0, len(blobs), 3)]  # fmt: skip
    library, decode = jpeg_batch_decoder()
    device = torch.device("cpu")
    decoder = DeviceJpegDecoder(device, library, decode)
    result: dict = {"library": library, "agreement_db": agreement_db(decoder)}

    train = TrainSettings(shuffle_buffer=4, seed=3)
    common = dict(batch_size=BATCH, train=train, epoch=1, rank=0)
    rows = len(blobs)
    paths = {}
    for name, device_decoder in (("host", None), ("device", decoder)):
        cache = DeviceCache.load(Tables(tables), Tables(tables), video_shape=video_shape, batch_size=BATCH, rank=0,
                                 world_size=1, device=device, train_rows=rows, val_rows=rows, store="jpeg",
                                 device_decoder=device_decoder)  # fmt: skip
        collate = VideoBatchCollate(video_shape, batch_size=BATCH, store="jpeg", device_decoder=device_decoder)
        k = video_shape[0] // 2
        paths[name] = {
            "cache_whole": sampled(cache.train_batches(**common)),
            "cache_sampled": sampled(cache.train_batches(frames=frame_sampler(7, video_shape[0], k), **common)),
            "cache_val": sampled(cache.val_batches(np.array([0, video_shape[0] - 1]))),
            "streamed_whole": sampled(train_batches(Tables(tables), collate=collate, **common)),
            "streamed_sampled": sampled(train_batches(Tables(tables), collate=collate,
                                                      frames=frame_sampler(7, video_shape[0], k), **common)),  # fmt: skip
        }
    result["batches"] = {key: len(paths["host"][key]) for key in paths["host"]}
    result["device_equals_host"] = {key: same(paths["device"][key], paths["host"][key]) for key in paths["host"]}
    result["streamed_equals_cache"] = same(paths["device"]["streamed_sampled"], paths["device"]["cache_sampled"])

    # A frame whose JPEG is not a JPEG but whose clip passes its checksum: named as the host path names it.
    damaged = bytearray(blobs[1])
    starts, ends = jpeg_frame_spans(damaged, video_shape[0])
    damaged[starts[2] : ends[2]] = bytes(ends[2] - starts[2])
    payload_start = int(starts[0])
    _HEADER.pack_into(damaged, 0, b"VJPG", video_shape[0], zlib.crc32(damaged[payload_start:]))
    try:
        decoder.decode([blobs[0], bytes(damaged)], video_shape, names=["v0", "v1"])
        result["damaged"] = None
    except StoredClipError as err:
        result["damaged"] = str(err)

    # Asked for on a CPU worker: refused in one line.
    try:
        device_decoder_for(TrainSettings(decode_device="cuda"), device, "jpeg")
    except Exception as err:  # noqa: BLE001 - reported to the test
        result["cuda_on_cpu"] = f"{type(err).__name__}: {err}"
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
