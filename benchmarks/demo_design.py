"""How the demo's design was chosen: one training run of the demo task in plain PyTorch, fast enough to compare many.

The same pieces as the demo (vidray's synthetic videos, decoder, model,
augmentation, optimizer and schedule), without Ray: one process, one thread,
the clips in memory. The demo's own numbers come from benchmarks/demo_seeds.py,
which runs the real pipeline; this script is for the design questions behind
it (how many videos, which input size, how many frames per token, MixUp or
not), where dozens of runs are needed.

    python benchmarks/demo_design.py --seed 1 --videos-per-class 250 --size 32 --tubelet 4
    python benchmarks/demo_design.py --seed 1 --videos-per-class 80 --size 48 --tubelet 2 --mixup 0.4

Prints one JSON line: the arguments, validation accuracy every 5 epochs, and
the final validation, test and frames-shuffled test accuracy. Videos and
decoded clips are cached under benchmarks/.cache/demo_design.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vidray.model import transforms
from vidray.train import augment
from vidray.config import ModelSettings, TrainSettings
from vidray.data.demo import DEMO_CLASSES, generate_demo_videos
from vidray.model.classifier import build_model
from vidray.train.optim import build_optimizer, build_lr_schedule
from vidray.data.video import read_clip

CACHE = Path(__file__).resolve().parent / ".cache" / "demo_design"


def load_clips(args) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Decoded clips and labels per split, generated and decoded once per (seed, videos, stored shape)."""
    name = f"s{args.seed}_v{args.videos_per_class}_c{args.classes}"
    cache = CACHE / f"{name}_{args.stored_frames}x{args.stored_size}.npz"
    classes = sorted(DEMO_CLASSES[: args.classes])
    if not cache.exists():
        root = CACHE / f"videos_{name}"
        if not root.exists():
            generate_demo_videos(root, classes=args.classes, videos_per_class=args.videos_per_class, seed=args.seed)
        arrays = {}
        for split in ("train", "val", "test"):
            clips, labels = [], []
            for label, name_ in enumerate(classes):
                for path in sorted((root / split / name_).glob("*.mp4")):
                    clips.append(read_clip(path, args.stored_frames, args.stored_size, num_threads=1).frames)
                    labels.append(label)
            arrays[f"{split}_x"], arrays[f"{split}_y"] = np.stack(clips), np.array(labels)
        np.savez(cache, **arrays)
    data = np.load(cache)
    videos = {s: torch.from_numpy(data[f"{s}_x"]) for s in ("train", "val", "test")}
    labels = {s: torch.from_numpy(data[f"{s}_y"]).long() for s in ("train", "val", "test")}
    return videos, labels, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data.demo.seed")
    parser.add_argument("--videos-per-class", type=int, default=250)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--stored-frames", type=int, default=16)
    parser.add_argument("--stored-size", type=int, default=36)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--tubelet", type=int, default=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--crop-scale", type=float, default=augment.CROP_SCALE[0], help="smallest crop area share")
    parser.add_argument("--prepare-only", action="store_true", help="generate and decode the clips, train nothing")
    args = parser.parse_args()

    torch.set_num_threads(1)  # what one Ray Train worker with 1 CPU gets
    videos, labels, classes = load_clips(args)
    if args.prepare_only:
        return
    augment.CROP_SCALE = (args.crop_scale, 1.0)
    torch.manual_seed(42)
    model_cfg = ModelSettings(init="scratch", size=args.model, patch_size=args.patch, tubelet_size=args.tubelet)
    model = build_model(model_cfg, classes, args.frames, args.size)
    train_cfg = TrainSettings(
        epochs=args.epochs, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup
    )
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    steps = len(labels["train"]) // args.batch
    scheduler = build_lr_schedule(optimizer, train_cfg, steps)
    generator = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def accuracy(split: str, shuffle: torch.Generator | None = None) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(labels[split]), 64):
            pixels = transforms.eval_transform(videos[split][i : i + 64], frames=args.frames, size=args.size)
            if shuffle is not None:
                pixels = transforms.shuffle_frames(pixels, shuffle)
            correct += (model(pixel_values=pixels).logits.argmax(-1) == labels[split][i : i + 64]).sum().item()
        return correct / len(labels[split])

    started, history = time.perf_counter(), []
    for epoch in range(args.epochs):
        model.train()
        order, loss_sum = torch.randperm(len(labels["train"]), generator=generator), 0.0
        for step in range(steps):
            rows = order[step * args.batch : (step + 1) * args.batch]
            pixels = augment.train_transform(videos["train"][rows], frames=args.frames, size=args.size, generator=generator)
            pixels, targets = augment.mix_batch(
                pixels, labels["train"][rows], num_classes=len(classes), generator=generator, mixup_alpha=args.mixup
            )
            loss = augment.soft_target_cross_entropy(model(pixel_values=pixels).logits, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss_sum += loss.item()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / steps, 3), "val_accuracy": accuracy("val")})
    print(json.dumps({
        "args": vars(args), "train_videos": len(labels["train"]), "history": history,
        "val_accuracy": accuracy("val"), "test_accuracy": accuracy("test"),
        "test_accuracy_frames_shuffled": accuracy("test", torch.Generator().manual_seed(0)),
        "train_seconds": round(time.perf_counter() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
