"""Shard reading: (annotations, caption) pairs per second read in training order (length buckets,
shuffled: random access across the shards) with 0 and 2 DataLoader workers, against the rate at
which a training step consumes them on the same features (default sizes, batch 64)."""

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.features.shards import AnnotationShards, CaptionPairs
from pipeline.train.loop import TrainConfig, epoch_batches, native_bf16

from . import training

BATCHES = 150


def read_rate(pairs: CaptionPairs, batches: list[list[int]], workers: int) -> float:
    """Captions/s of a DataLoader over ``batches`` (worker start-up included)."""
    start = time.perf_counter()
    loader = DataLoader(pairs, batch_sampler=batches, num_workers=workers)
    captions = sum(len(c) for _, c, _ in loader)
    return captions / (time.perf_counter() - start)


def run(features: Path) -> list[str]:
    """The shard-reading table: captions/s that DataLoaders of 0-N workers read from the ``features``
    folder (:func:`bench.memory.run`'s 7000 images), against the rate training consumes them."""
    shards = AnnotationShards(features, "train")
    pairs = CaptionPairs(shards)
    batches = epoch_batches(pairs, TrainConfig(features="", out=""), 0)
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    consumed = training.measure((512, 1000, 512), shards.L, 64, "soft", precision, "cpu")["captions_s"]
    lines = [
        f"Training consumes {consumed:.0f} captions/s (soft, 512/1000/512, L={shards.L}, batch 64, {precision}).",
        "",
        "| workers | captions/s read | annotation MiB/s read | ratio to training's rate (must be > 1) |",
        "|---|---|---|---|",
    ]
    for k, workers in enumerate((0, 2)):  # each reads its own batches
        rate = read_rate(pairs, batches[k * BATCHES : (k + 1) * BATCHES], workers)
        mib = rate * shards.L * shards.D * 2 / 2**20
        lines.append(f"| {workers} | {rate:.0f} | {mib:.0f} | **{rate / consumed:.1f}** |")
    return lines
