"""Where a compressed store's batches decode in a training worker: how many host threads
(``train.decode_threads``, :func:`decode_threads_for`; the host decoder is vidray.train.batches.decode_rows_into),
or on the GPU (``train.decode_device``): nvJPEG, one call a batch.

On a GPU worker the host's cores would otherwise cap a ``jpeg`` dataset's ingest at about 500
clips/s per decode thread (docs/benchmarks.md, section 7). Here the JPEGs of every frame a
batch's step samples go to the GPU in one batched call
(``torchcodec.decoders.decode_jpeg(list, device=cuda)``, torchcodec >= 0.16; else torchvision's
``decode_jpeg``, which torchcodec superseded), and the frames land in their slots of a
``[B, stored_frames, S, S, 3]`` uint8 tensor on the device: the batch the host path builds, in
device memory (``auto`` chooses this for GPU workers with fewer than :data:`AUTO_BELOW_HOST_THREADS`
decode threads). Unsampled slots are left as allocated, as the host path leaves them stale; the
step reads only the sampled ones and checks it (vidray.train.augment.check_decoded_frames).

nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: pixels differ from the host path's
by a level or two (the self-check at start asks >= :data:`MIN_AGREEMENT_DB` of PSNR), so a run
decoding on the GPU is reproducible against itself, not bit for bit against one decoding on the
CPU. That is why ``train.decode_device`` is part of what a resumed run may not change.

Threads: batches are decoded ahead of the step, in a producer thread. Each decoder works on a CUDA
stream of its own and waits for it before handing a batch over, and the batch is marked as used
on the consumer's stream (``record_stream``), so the caching allocator does not give its memory
to the next batch while the step still reads it. That wait also leaves the stream idle whenever a
decode call starts, which the libraries rely on: torchvision's CUDA ``decode_jpeg`` allocates its
outputs on the caller's stream but writes them from a private one without waiting for the caller's
(pytorch/vision#9606; torchcodec's hardware path had a similar gap until meta-pytorch/torchcodec#1634), so
a block freed while kernels queued on the caller's stream still read it could be overwritten. With
nothing queued on this stream, no such block exists.

Nothing here imports Ray or pyarrow; the decoders' CPU mode (``device="cpu"``) runs the same code
without a GPU (tests/test_device_decode.py runs it in the pipeline venv, which has torchvision).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from vidray.config import StoreName, TrainSettings
from vidray.data.store import StoredClipError, clip_error, decode_frames_into, encode_clip, jpeg_frame_spans
from vidray.errors import UserError, warn_once

# Lowest PSNR between the device decoder and the host's on the start-up test image (nvJPEG against
# libjpeg-turbo: rounding in the IDCT and the chroma upsampling, a level or two).
MIN_AGREEMENT_DB = 40.0

# ``auto`` decodes on the GPU for workers with fewer host decode threads than this. Measured on an
# H200 (docs/benchmarks.md, "The GPU check: first run"): nvJPEG decoded 128² frames at 50,585/s in
# batches, about 3,200 clips/s of 16 sampled frames, while one host thread in a training worker
# builds about 500 clips/s (section 7, simplejpeg): six threads match it, and they leave the GPU
# alone. Larger frames favour nvJPEG (26x one CPU thread at 720p).
AUTO_BELOW_HOST_THREADS = 6

JpegBatchDecode = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def decode_threads_for(train: TrainSettings, device: torch.device) -> int:
    """``train.decode_threads``, or its default: the worker's whole CPUs beside a GPU, one on CPU."""
    if train.decode_threads is not None:
        return train.decode_threads
    return max(1, int(train.cpus_per_worker)) if device.type == "cuda" else 1


def jpeg_batch_decoder() -> tuple[str, JpegBatchDecode] | None:
    """(library, ``decode(jpegs, device) -> [3, H, W] uint8 tensors``) of the first library that decodes
    a list of JPEGs on a device in one call: torchcodec >= 0.16, then torchvision; None without either."""
    try:
        from torchcodec.decoders import decode_jpeg  # torchcodec >= 0.16

        return "torchcodec", lambda jpegs, device: decode_jpeg(jpegs, mode="RGB", device=device)
    except (ImportError, OSError, RuntimeError):  # older torchcodec, or its libraries do not load
        pass
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        return "torchvision", lambda jpegs, device: tv_decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except (ImportError, OSError, RuntimeError):
        return None


class DeviceJpegDecoder:
    """Decodes a ``jpeg`` store's clips (or only their sampled frames) into a uint8 batch on ``device``."""

    def __init__(self, device: torch.device, library: str, decode: JpegBatchDecode):
        self.device, self.library, self._decode = device, library, decode
        cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if cuda else None
        # The stream the training step reads batches on (the default one of the thread that built us).
        self._consumer = torch.cuda.current_stream(device) if cuda else None

    def decode(self, blobs: list, video_shape: tuple[int, ...], frames: np.ndarray | None = None,
               names: list[str] | None = None) -> torch.Tensor:  # fmt: skip
        """``[len(blobs), *video_shape]`` uint8 on the device: every stored frame of each clip, or with
        ``frames`` (``[len(blobs), k]``) only clip ``i``'s frames ``frames[i]``, each in its own slot.

        ``blobs`` passed :func:`vidray.data.store.check_blob`; a frame the device decoder refuses is
        named as the host path names it (``names[i]``: the clip's video id), via the host decoder."""
        stored_frames, height, width, channels = video_shape
        picks = np.ascontiguousarray(np.arange(stored_frames)[None].repeat(len(blobs), 0) if frames is None else frames, dtype=np.int64)
        pieces = []
        for blob, row in zip(blobs, picks):
            starts, ends = jpeg_frame_spans(blob, stored_frames)
            view = memoryview(blob)
            pieces.extend(view[starts[f] : ends[f]] for f in row)
        # One host copy of the batch's JPEGs (a few KB a frame), writable as torch wants; the decoders take CPU tensors.
        payload = torch.from_numpy(np.concatenate([np.frombuffer(piece, np.uint8) for piece in pieces]))
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        jpegs = [payload[bounds[j] : bounds[j + 1]] for j in range(len(pieces))]
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            try:
                images = self._decode(jpegs, self.device)
            except (RuntimeError, ValueError):  # the whole batch refused: a bad frame, or the decoder itself
                self._name_the_bad_frame(blobs, video_shape, picks, names)  # raises when a frame is at fault
                raise  # every frame decodes on the host: the device decoder failed (memory, driver), not the data
            for j, image in enumerate(images):
                if tuple(image.shape) != (channels, height, width):
                    clip, k = divmod(j, picks.shape[1])
                    who = names[clip] if names else f"clip {clip}"
                    raise clip_error(who, f"frame {int(picks[clip, k])} decodes to {tuple(image.shape)}, "
                                          f"the dataset stores {(channels, height, width)}")  # fmt: skip
            decoded = torch.stack(images).permute(0, 2, 3, 1).reshape(len(blobs), picks.shape[1], height, width, channels)
            out = torch.empty((len(blobs), *video_shape), dtype=torch.uint8, device=self.device)
            rows = torch.arange(len(blobs), device=self.device)[:, None]
            out[rows, torch.from_numpy(picks).to(self.device)] = decoded
            if self._stream is not None:
                out.record_stream(self._consumer)
                self._stream.synchronize()  # this thread waits, not the step: the batch is whole when handed over
        return out

    def _name_the_bad_frame(self, blobs: list, video_shape: tuple[int, ...], picks: np.ndarray, names: list[str] | None) -> None:
        scratch = np.empty((picks.shape[1], *video_shape[1:]), np.uint8)
        for i, blob in enumerate(blobs):
            try:
                decode_frames_into(blob, "jpeg", scratch, picks[i])
            except StoredClipError as err:
                raise clip_error(names[i] if names else str(i), err) from None


def agreement_db(decoder: DeviceJpegDecoder) -> float:
    """PSNR of ``decoder`` against the host decoder (libjpeg-turbo) on a smooth 64x64 test frame at quality 90."""
    y, x = np.mgrid[0:64, 0:64]
    frame = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)[None]
    blob = encode_clip(frame, "jpeg", 90)
    host = np.empty_like(frame)
    decode_frames_into(blob, "jpeg", host)
    device = decoder.decode([blob], frame.shape).cpu().numpy()
    mse = float(np.mean((device.astype(np.float64) - host) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def device_decoder_for(train: TrainSettings, device: torch.device, store: StoreName, host_threads: int = 1) -> DeviceJpegDecoder | None:
    """The worker's device decoder, or None when the host decodes (``train.decode_device``; a raw store
    decodes nothing). ``auto``: on a GPU worker whose ``host_threads`` decode threads would decode
    less than nvJPEG (fewer than :data:`AUTO_BELOW_HOST_THREADS`), where a library can and it agrees
    with the host decoder."""
    wanted = train.decode_device
    if store == "raw" or wanted == "cpu":
        return None
    if wanted == "auto" and (device.type != "cuda" or host_threads >= AUTO_BELOW_HOST_THREADS):
        return None
    if device.type != "cuda":
        raise UserError("train.decode_device=cuda needs a GPU worker: set train.use_gpu=true, or train.decode_device=auto")
    backend = jpeg_batch_decoder()
    if backend is None:
        fix = "install torchcodec>=0.16 (or torchvision) built for this CUDA"
        if wanted == "cuda":
            raise UserError(f"train.decode_device=cuda: no library here decodes JPEG on the GPU; {fix}")
        warn_once(f"the jpeg store decodes on the CPU: no library here decodes JPEG on the GPU ({fix})")
        return None
    decoder = DeviceJpegDecoder(device, *backend)
    try:
        agreement = agreement_db(decoder)
    except Exception as err:  # noqa: BLE001 - a broken install must not stop an auto run; it says why
        agreement, why = 0.0, f"{type(err).__name__}: {err}"
    else:
        why = f"{agreement:.1f} dB from the CPU decoder's pixels, under {MIN_AGREEMENT_DB:.0f}"
    if agreement < MIN_AGREEMENT_DB:
        message = f"{backend[0]}'s JPEG decoder on {device} fails its check ({why})"
        if wanted == "cuda":
            raise UserError(f"train.decode_device=cuda: {message}; use train.decode_device=cpu")
        warn_once(f"the jpeg store decodes on the CPU: {message}")
        return None
    return decoder

