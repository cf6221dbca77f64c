"""Memory: peak RSS of ``cli.py features`` and ``cli.py train`` over 1000 and over 7000 images,
each in its own process. Shards stream, so the peak must not grow with the number of images.
The vocabulary does grow with the corpus (words seen 5 times), and with it the decoder's output
layer and every (batch, T, V) tensor, so training is also measured over the 1000 images with the
7000-image vocabulary: the same model, only the number of images differs. Training's peak is
reached at the step of the largest minibatch (captions x tokens, section 4.3's one-length
batches), and a larger corpus fills whole minibatches of longer captions, so the table is
followed by each corpus's largest minibatch."""

import json
import shutil
from pathlib import Path

from pipeline.features import folder
from pipeline.features.shards import AnnotationShards, CaptionPairs
from pipeline.text import Vocabulary
from pipeline.train.loop import TrainConfig, epoch_batches

from .common import FLICKR8K, SQUEEZENET_WEIGHTS, corpus_records, run_measuring_memory

SIZES = {1000: (800, 200), 7000: (6000, 1000)}  # images: (train, val)
# A small decoder, so that one epoch over 7000 images (35,000 captions) takes seconds: memory here
# is about the data's path, and the model's own size does not depend on the number of images.
TRAIN_ARGS = [
    "--epochs",
    "1",
    "--embed-dim",
    "32",
    "--hidden-dim",
    "64",
    "--attention-dim",
    "32",
    "--val-images",
    "100",
    "--val-beam-size",
    "1",
    "--no-progress",
]


def corpus(workspace: Path, images: int) -> tuple[Path, Path]:
    """A Karpathy json of ``images`` real Flickr8k images (synthetic ones where ../shared/data is
    absent), split train/val as in SIZES; returns (json path, image folder)."""
    train, val = corpus_records(workspace / f"synthetic-{images}", *SIZES[images])
    entries = [
        {
            "filename": r.image_path.name,
            "split": "train" if r.split == "train" else "val",
            "sentences": [{"raw": c} for c in r.captions],
        }
        for r in train + val
    ]
    path = workspace / f"corpus-{images}.json"
    path.write_text(json.dumps({"images": entries}))
    return path, train[0].image_path.parent


def largest_minibatch(features: Path) -> tuple[int, int]:
    """(captions, tokens per caption) of the largest minibatch of training's first epoch."""
    pairs = CaptionPairs(AnnotationShards(features, "train"))
    lengths = pairs.lengths()
    batches = epoch_batches(pairs, TrainConfig(features=str(features), out=""), 0)
    return max(((len(b), lengths[b[0]]) for b in batches), key=lambda shape: shape[0] * shape[1])


def run(workspace: Path) -> tuple[list[str], Path]:
    """Returns the table and the features folder of 7000 images (for the shard-reading benchmark)."""
    weights = str(SQUEEZENET_WEIGHTS) if SQUEEZENET_WEIGHTS.exists() else "random"
    rows = {}
    for images in SIZES:
        corpus_json, image_dir = corpus(workspace, images)
        features, run_dir = workspace / f"features-{images}", workspace / f"run-{images}"
        rows[images] = (
            run_measuring_memory(
                [
                    "cli.py",
                    "features",
                    "--dataset",
                    "karpathy",
                    "--karpathy-json",
                    str(corpus_json),
                    "--image-dir",
                    str(image_dir),
                    "--encoder",
                    "squeezenet1_1",
                    "--weights",
                    weights,
                    "--out",
                    str(features),
                    "--no-progress",
                ]
            ),
            run_measuring_memory(["cli.py", "train", "--features", str(features), "--out", str(run_dir), *TRAIN_ARGS]),
        )
    same_vocab = workspace / "features-1000-vocab-7000"  # the 1000 images' shards, the 7000's vocabulary
    shutil.copytree(workspace / "features-1000", same_vocab, copy_function=shutil.copy)
    shutil.copy(workspace / "features-7000" / "vocab.json", same_vocab / "vocab.json")
    manifest = folder.load_manifest(same_vocab)  # the copy's record of its text files, as features writes it
    manifest["text"] = folder.text_record(same_vocab)
    manifest["vocab_size"] = len(Vocabulary.load(same_vocab / folder.VOCAB))
    folder.save_manifest(same_vocab, manifest)
    trained = run_measuring_memory(
        ["cli.py", "train", "--features", str(same_vocab), "--out", str(workspace / "run-1000-vocab-7000"), *TRAIN_ARGS]
    )
    vocab = {n: len(json.loads((workspace / f"features-{n}" / "vocab.json").read_text())["words"]) for n in SIZES}
    small, large = rows[1000], rows[7000]
    source = "Flickr8k" if FLICKR8K.exists() else "synthetic"
    lines = [
        "| stage | 1000 images: peak RSS MiB (s) | 7000 images: peak RSS MiB (s) | ratio (flat: about 1) |",
        "|---|---|---|---|",
    ]
    stages = (
        f"`cli.py features` (SqueezeNet, {source})",
        f"`cli.py train` (1 epoch, small decoder; vocabularies {vocab[1000]} and {vocab[7000]} words)",
    )
    for k, stage in enumerate(stages):
        (t1, m1), (t7, m7) = small[k], large[k]
        lines.append(f"| {stage} | {m1:.0f} ({t1:.0f} s) | {m7:.0f} ({t7:.0f} s) | **{m7 / m1:.2f}** |")
    (t1, m1), (t7, m7) = trained, large[1]
    lines.append(
        f"| `cli.py train`, the same model: the 1000 images with the 7000-image vocabulary | {m1:.0f} "
        f"({t1:.0f} s) | {m7:.0f} ({t7:.0f} s) | **{m7 / m1:.2f}** |"
    )
    (b1, t1), (b7, t7) = (largest_minibatch(workspace / f"features-{n}") for n in SIZES)
    lines += [
        "",
        f"Training's largest minibatch (captions x tokens): {b1} x {t1} over 1000 images, {b7} x {t7} "
        f"over 7000 ({b7 * t7 / (b1 * t1):.2f}x the tokens): its step sets the peak.",
    ]
    return lines, workspace / "features-7000"
