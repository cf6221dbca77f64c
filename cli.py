"""Show, Attend and Tell: command line. Each command parses its options and calls ``pipeline``."""
import sys
import warnings

import click

from pipeline.errors import PipelineError


class Failure(click.ClickException):
    exit_code = 2


class Group(click.Group):
    """Turns PipelineError into a one-line message and exit status 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            raise Failure(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Show, Attend and Tell (Xu et al. 2015): neural image captioning with visual attention.

    Stage one, `features`, runs a frozen CNN over an image corpus and stores annotation vectors in
    HDF5 shards; stage two trains the attention decoder on them.
    """
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@main.command()
@click.option("--dataset", type=click.Choice(["flickr8k", "karpathy", "synthetic"]), default="flickr8k",
              help="Corpus adapter: the official Flickr8k layout, a Karpathy-split json, or generated shapes.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Dataset folder. [default: data/flickr8k, or data/synthetic (generated there if absent)]")
@click.option("--karpathy-json", type=click.Path(dir_okay=False), default=None,
              help="With --dataset karpathy: the split json (dataset_coco.json, ...).")
@click.option("--image-dir", type=click.Path(file_okay=False), default=None,
              help="With --dataset karpathy: the folder the json's image paths are relative to.")
@click.option("--splits", default=None, help="Comma-separated splits to extract, e.g. train,dev. [default: all]")
@click.option("--encoder", type=click.Choice(["vgg19", "vgg16", "resnet101", "resnet152", "squeezenet1_1"]),
              default="vgg19", help="Frozen CNN; vgg19 gives conv5_4: 14x14x512 (L=196, D=512) at 224 px.")
@click.option("--weights", default="imagenet",
              help="'imagenet' (torchvision's weights, cached or downloaded), 'random' (seeded, untrained; "
                   "for tests), or a state-dict file.")
@click.option("--preprocess", type=click.Choice(["center-crop", "resize"]), default="center-crop",
              help="center-crop: shorter side to 256 then a 224 centre crop; resize: squash to 224x224.")
@click.option("--image-size", type=int, default=224, help="Encoder input side, in pixels.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              help="Storage type of the annotation vectors.")
@click.option("--shard-size", type=int, default=2000, help="Images per HDF5 shard (the unit of resume).")
@click.option("--batch-size", type=int, default=32, help="Images per encoder forward pass.")
@click.option("--workers", type=int, default=2, help="Image-decoding worker processes (0: decode in-process).")
@click.option("--device", default="cpu", help="Torch device for the encoder: cpu, cuda, cuda:1, ...")
@click.option("--min-count", type=int, default=5,
              help="Vocabulary: keep words seen at least this many times in the training captions.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Features folder. [default: data/features/DATASET-ENCODER]")
@click.option("--skip-bad-images", is_flag=True,
              help="Exit 0 even if some images could not be used (they are listed in OUT/bad_images.tsv).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def features(dataset, data_dir, karpathy_json, image_dir, splits, encoder, weights, preprocess, image_size, dtype,
             shard_size, batch_size, workers, device, min_count, out, skip_bad_images, no_progress):
    """Stage one: encode a corpus into HDF5 shards of annotation vectors.

    Reruns resume: finished shards are kept. Images that cannot be used are reported, the rest go
    on, and the exit status is 1 if any failed (unless --skip-bad-images).
    """
    from pipeline.datasets import load_records
    from pipeline.features import FeatureConfig, extract_features, failure_counts

    config = FeatureConfig(encoder=encoder, weights=weights, preprocess=preprocess, image_size=image_size,
                           dtype=dtype, shard_size=shard_size, batch_size=batch_size, num_workers=workers,
                           device=device, min_count=min_count)
    records = load_records(dataset, data_dir, karpathy_json, image_dir)
    out = out or f"data/features/{dataset}-{encoder}"
    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    summary = extract_features(records, out, config, dataset, split_list, progress=not no_progress)
    click.echo(summary.line())
    if summary.failures:
        kinds = ", ".join(f"{n} {why}" for why, n in failure_counts(summary.failures).most_common())
        click.echo(f"{len(summary.failures)} images could not be used ({kinds}); "
                   f"listed in {summary.out / 'bad_images.tsv'}", err=True)
        if not skip_bad_images:
            click.echo("exiting with status 1; pass --skip-bad-images (make: SKIP_BAD=1) to accept this", err=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
