"""``python -m torch.distributed.run --standalone --nproc-per-node N -m bench.ranks ...``: one
end-to-end ``extract_features`` run over the first images of the benchmark's corpus, split between
N processes (torchrun gives each one thread), and rank 0 prints its images/s as the last line.
:func:`bench.features.ranks_rate` starts it; it exists so that data parallelism across single-thread
processes can be measured beside one process computing on every core. The warm-up is a forward
pass of a copy of the encoder (oneDNN's kernels are made once a process), not a first
``extract_features`` run: a second process group in one torchrun process fails to connect."""

import sys
from pathlib import Path

import click
import torch

from pipeline.features.encoders import build_encoder, preprocess_for
from pipeline.features.extract import FeatureConfig, extract_features
from pipeline.io.distributed import main_process

from .common import corpus_records


@click.command()
@click.option("--encoder", required=True)
@click.option("--weights", required=True)
@click.option("--image-size", type=int, default=None)
@click.option("--images", "n", type=int, required=True)
@click.option("--batch-size", type=int, required=True)
@click.option("--corpus", type=click.Path(path_type=Path), required=True, help="images made here if no ../shared")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(encoder, weights, image_size, n, batch_size, corpus, out):
    records = corpus_records(corpus, n)[0]
    config = FeatureConfig(
        encoder=encoder, weights=weights, image_size=image_size, batch_size=batch_size, shard_size=batch_size
    )
    size = preprocess_for(encoder, image_size=image_size).image_size
    with torch.inference_mode():
        build_encoder(encoder, weights)(torch.zeros(batch_size, 3, size, size))
    summary = extract_features(records, out / "run", config, "bench", progress=False)
    if main_process():
        print(summary.images / summary.seconds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
