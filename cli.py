"""Show, Attend and Tell: command line. Each command parses its options and calls ``pipeline``.

Every option is checked as it is parsed (ranges, finite numbers, an available device), so no bad
value reaches torch; every error ends as one line and exit status 2, never a traceback.
"""
import errno
import math
import os
import shlex
import sys
import warnings

import click
from click.core import ParameterSource

from pipeline import paths
from pipeline.atomic import disk_full_message
from pipeline.errors import PipelineError, describe, one_line
from pipeline.folders import os_error_message

DEBUG = "SHOW_ATTEND_TELL_DEBUG"  # set to 1 to see the traceback of an unexpected error


class Failure(click.ClickException):
    exit_code = 2


class Group(click.Group):
    """Turns every error into a one-line message and exit status 2 (no traceback): PipelineError,
    a full disk, any other OSError (naming its path), and, as a last resort, an unexpected error
    (its type and message; ``SHOW_ATTEND_TELL_DEBUG=1`` shows its traceback). Ctrl-C exits 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except PipelineError as e:
            raise Failure(one_line(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; run the same command again to continue "
                       "(train: with --resume)", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Failure(disk_full_message(e.filename or "a file")) from None
            raise Failure(os_error_message(e)) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
            if os.environ.get(DEBUG):
                raise
            raise Failure(f"unexpected error ({describe(e)}); please report it with the command line "
                          f"(set {DEBUG}=1 for the traceback)") from None


class Finite(click.FloatRange):
    """A number that is not nan or infinite, within the range given."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class Device(click.ParamType):
    """A torch device that this machine has: cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value, param, ctx):
        if value == "cpu":
            return value
        import torch

        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a device; use cpu, cuda or cuda:N", param, ctx)
        if device.type not in ("cpu", "cuda"):
            self.fail(f"{value!r}: only cpu and cuda devices are supported", param, ctx)
        if device.type == "cuda" and not torch.cuda.is_available():
            self.fail(f"{value!r}: no CUDA device is available here; use --device cpu", param, ctx)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
        return value


POSITIVE = click.IntRange(min=1)
COUNT = click.IntRange(min=0)
PROBABILITY = Finite(0, 1, max_open=True)
SIZE = click.IntRange(1, 16384)
BEAM = click.IntRange(1, 100)
MAX_LEN = click.IntRange(1, 200)
WORKERS = click.IntRange(0, 64)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Show, Attend and Tell (Xu et al. 2015): neural image captioning with visual attention.

    Stage one, `features`, runs a frozen CNN over an image corpus and stores annotation vectors in
    HDF5 shards; stage two trains the attention decoder on them.
    """
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@main.command()
@click.option("--dataset", type=click.Choice(["flickr8k", "flickr30k", "coco", "karpathy", "synthetic"]),
              default="flickr8k", help="Corpus adapter: the official Flickr8k layout; Flickr30k or COCO with their "
                                       "Karpathy json (README, Datasets); any Karpathy-split json; or generated shapes.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Dataset folder. [default: data/DATASET; synthetic is generated there if absent]")
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
@click.option("--image-size", type=click.IntRange(32, 1024), default=224, help="Encoder input side, in pixels (32 to 1024).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              help="Storage type of the annotation vectors.")
@click.option("--shard-size", type=POSITIVE, default=2000, help="Images per HDF5 shard (the unit of resume).")
@click.option("--batch-size", type=POSITIVE, default=32, help="Images per encoder forward pass.")
@click.option("--workers", type=WORKERS, default=None,
              help="Image-decoding worker processes (0: decode in the main process). [default: 0 on a CPU, where "
                   "the encoder's threads use every core already; min(8, CPU cores) on a GPU]")
@click.option("--device", type=Device(), default="cpu", help="Torch device for the encoder: cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              help="Encoder arithmetic: fp32, or autocast to fp16/bf16; auto: fp16 on CUDA when --dtype is float16 "
                   "(tensor cores), else fp32. Recorded in the manifest: a resume must use the same.")
@click.option("--min-count", type=POSITIVE, default=5,
              help="Vocabulary: keep words seen at least this many times in the training captions.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Features folder. [default: data/features/DATASET-ENCODER]")
@click.option("--skip-bad-images", is_flag=True,
              help="Exit 0 even if some images could not be used (they are listed in OUT/bad_images.tsv).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def features(dataset, data_dir, karpathy_json, image_dir, splits, encoder, weights, preprocess, image_size, dtype,
             shard_size, batch_size, workers, device, precision, min_count, out, skip_bad_images, no_progress):
    """Stage one: encode a corpus into HDF5 shards of annotation vectors.

    Reruns resume: finished shards are kept. Images that cannot be used are reported, the rest go
    on, and the exit status is 1 if any failed (unless --skip-bad-images).
    """
    from pipeline.datasets import load_records
    from pipeline.distributed import main_process
    from pipeline.features import FeatureConfig, extract_features, failure_counts

    config = FeatureConfig(encoder=encoder, weights=weights, preprocess=preprocess, image_size=image_size,
                           dtype=dtype, shard_size=shard_size, batch_size=batch_size, num_workers=workers,
                           device=device, precision=precision, min_count=min_count)
    records = load_records(dataset, data_dir, karpathy_json, image_dir)
    out = out or paths.features_dir(dataset, encoder)
    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    summary = extract_features(records, out, config, dataset, split_list, progress=not no_progress,
                               command=shlex.join(["python", *sys.argv]))
    failed = bool(summary.failures) and not skip_bad_images
    if main_process():  # under torchrun rank 0 reports for all
        click.echo(summary.line())
        if summary.failures:
            kinds = ", ".join(f"{n} {why}" for why, n in failure_counts(summary.failures).most_common())
            click.echo(f"{len(summary.failures)} images could not be used ({kinds}); "
                       f"listed in {summary.out / 'bad_images.tsv'}", err=True)
        if failed:
            click.echo("exiting with status 1; pass --skip-bad-images (make: SKIP_BAD=1) to accept this", err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.option("--features", "features_dir", type=click.Path(file_okay=False), default=None,
              help="Features folder written by `cli.py features` (needs train, and dev or val). [default: "
                   "with --resume, the run's own; else data/features/flickr8k-vgg19, what `make features "
                   "DATASET=flickr8k` writes, or the only folder under data/features]")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder for checkpoints (last.pt, best.pt) and metrics.jsonl. [default: data/runs/ATTENTION]")
@click.option("--attention", type=click.Choice(["soft", "hard"]), default="soft",
              help="soft: deterministic expected context (eq. 13); hard: sampled locations trained with REINFORCE "
                   "(eq. 10-12).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last.pt, with its saved options (--features and --out as given). "
                   "It may change --epochs, --patience, --checkpoint-every and --workers; any other option given "
                   "with another value than the run's is refused.")
@click.option("--optimizer", type=click.Choice(["adam", "rmsprop"]), default="adam",
              help="Adam (authors' code) or RMSProp (the paper's choice for Flickr8k).")
@click.option("--lr", type=Finite(0, min_open=True), default=4e-4,
              help="Initial learning rate (the authors used 2e-4 without decay; 4e-4 with --lr-decay scored higher).")
@click.option("--batch-size", type=POSITIVE, default=64, help="Captions per minibatch (all of one length).")
@click.option("--epochs", type=POSITIVE, default=20, help="Maximum epochs.")
@click.option("--patience", type=COUNT, default=5,
              help="Early stopping: epochs without a better validation BLEU-4 (0: never stop early).")
@click.option("--lr-decay", type=Finite(0, 1, min_open=True), default=0.5,
              help="Multiply the learning rate by this when validation BLEU-4 stops improving (1: constant).")
@click.option("--lr-patience", type=COUNT, default=0,
              help="Epochs without a better validation BLEU-4 tolerated before each learning-rate decay.")
@click.option("--clip", type=Finite(0), default=5.0, help="Gradient L2-norm clipping threshold (0: off).")
@click.option("--ema-decay", type=PROBABILITY, default=0.999,
              help="Keep an exponential moving average of the weights (decay per step), and validate, keep and "
                   "score it instead of the last weights (0: off; on Flickr8k it gave dev BLEU-4 19.6 vs 18.8).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Random seed (initialisation, batch order, dropout, sampling).")
@click.option("--device", type=Device(), default="cpu", help="Torch device: cpu, cuda, cuda:1, ...")
@click.option("--embed-dim", type=SIZE, default=512, help="Word embedding size m.")
@click.option("--hidden-dim", type=SIZE, default=1000, help="LSTM size n.")
@click.option("--attention-dim", type=SIZE, default=512, help="Hidden size of the attention MLP f_att.")
@click.option("--attention-layers", type=click.IntRange(1, 2), default=1,
              help="Layers of f_att: 1 as in eq. 4; 2 as in the authors' COCO config.")
@click.option("--attention-input-scale", type=Finite(0), default=1.0,
              help="f_att sees the annotation vectors divided by this; 0: their RMS over the first 256 training "
                   "images, so that its tanh does not saturate at initialisation (SqueezeNet's RMS is 11: 66% of "
                   "its inputs past |2| unscaled).")
@click.option("--dropout", type=PROBABILITY, default=0.5, help="Dropout probability on h_t and the deep output layer.")
@click.option("--output-tanh", is_flag=True, help="tanh before L_o in the deep output (authors' code; not the paper).")
@click.option("--no-gating", is_flag=True, help="Drop the gating scalar beta_t (section 4.2.1).")
@click.option("--alpha-c", type=Finite(0), default=1.0, help="Weight lambda of the doubly stochastic regularisation (eq. 14).")
@click.option("--entropy-c", type=Finite(0), default=0.002, help="Hard attention: entropy bonus weight lambda_e (eq. 12).")
@click.option("--reinforce-scale", type=Finite(0), default=0.1, help="Hard attention: reward scale lambda_r (eq. 12).")
@click.option("--baseline", type=click.Choice(["batch", "moving"]), default="batch",
              help="Hard attention: REINFORCE baseline: the mean reward of the other captions of the minibatch "
                   "(same length), or the paper's moving average over minibatches (eq. 12; on Flickr8k its "
                   "rewards had RMS 9.6 nats against 5.7).")
@click.option("--baseline-decay", type=PROBABILITY, default=0.9, help="Hard attention: decay of the moving-average baseline.")
@click.option("--semi-sampling-p", type=Finite(0, 1), default=0.75,
              help="Hard attention: probability that a minibatch uses the expected context instead of a sample "
                   "(the paper: 0.5; on Flickr8k with SqueezeNet features 0.75 kept the gate open: dev BLEU-4 "
                   "19.2 against 17.3 at epoch 7, with --soft-warmup-epochs 2).")
@click.option("--soft-warmup-epochs", type=COUNT, default=2,
              help="Hard attention: epochs trained on the expected context only (soft attention) before "
                   "sampling starts, so that the context is in use before sampled locations' noise can shut "
                   "the gate (0: sample from the first step, as the paper).")
@click.option("--decode-context", type=click.Choice(["expected", "sample", "argmax"]), default="expected",
              help="Hard attention at validation: expected alpha (mean-field, the authors'), a sample, or argmax.")
@click.option("--val-split", default="", help="Validation split. [default: dev or val, whichever exists]")
@click.option("--val-images", type=COUNT, default=0, help="Validate on the first N images only (0: all).")
@click.option("--val-beam-size", type=BEAM, default=3, help="Beam size of validation decoding (1: greedy).")
@click.option("--max-len", type=MAX_LEN, default=20, help="Longest caption decoded at validation, in words.")
@click.option("--checkpoint-every", type=COUNT, default=0, help="Also write last.pt every N steps (0: epoch ends only).")
@click.option("--workers", type=WORKERS, default=0, help="DataLoader processes reading the shards (0: in-process).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="bf16: autocast matrix products to bfloat16 (weights stay fp32), about 2x faster on CPUs with "
                   "AVX512-BF16; auto: bf16 where the CPU or GPU computes it natively, else fp32.")
@click.option("--no-tensorboard", is_flag=True,
              help="Do not write OUT/tensorboard (the scalars of metrics.jsonl and an attention figure per epoch); "
                   "OUT/curves.png is written either way.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(features_dir, out, attention, resume, optimizer, lr, batch_size, epochs, patience, lr_decay, lr_patience,
          clip, ema_decay, seed, device, embed_dim, hidden_dim, attention_dim, attention_layers, attention_input_scale,
          dropout, output_tanh, no_gating, alpha_c, entropy_c, reinforce_scale, baseline, baseline_decay,
          semi_sampling_p, soft_warmup_epochs, decode_context, val_split, val_images, val_beam_size, max_len,
          checkpoint_every, workers, precision, no_tensorboard, no_progress):
    """Stage two: train the attention decoder on feature shards.

    Validates each epoch by free-running beam-search decoding scored with BLEU-4, keeps last.pt
    and best.pt, decays the learning rate and stops early when BLEU-4 stops improving.
    """
    from pipeline.distributed import main_process
    from pipeline.train import TrainConfig, train as run_training

    if features_dir is None and not resume:  # a resume defaults to the run's own features
        features_dir, note = paths.default_features()
        if note and main_process():
            click.echo(note, err=True)

    model = dict(embed_dim=embed_dim, hidden_dim=hidden_dim, attention_dim=attention_dim,
                 attention_layers=attention_layers, attention_input_scale=attention_input_scale, dropout=dropout,
                 output_tanh=output_tanh, gating=not no_gating)
    objective = dict(alpha_c=alpha_c, entropy_c=entropy_c, reinforce_scale=reinforce_scale, baseline=baseline,
                     baseline_decay=baseline_decay)
    config = TrainConfig(
        features=features_dir and str(features_dir), out=str(out or paths.RUNS / attention), attention=attention, optimizer=optimizer, lr=lr,
        batch_size=batch_size, epochs=epochs, patience=patience, lr_decay=lr_decay, lr_patience=lr_patience, clip=clip,
        ema_decay=ema_decay, seed=seed, device=device, val_split=val_split, val_images=val_images,
        val_beam_size=val_beam_size, max_len=max_len, decode_context=decode_context,
        semi_sampling_p=semi_sampling_p, soft_warmup_epochs=soft_warmup_epochs,
        checkpoint_every=checkpoint_every, workers=workers, precision=precision, tensorboard=not no_tensorboard,
        model=model, objective=objective)
    sections = {"features_dir": "features", "no_gating": "model.gating", "output_tanh": "model.output_tanh",
                "no_tensorboard": "tensorboard",
                **{k: f"model.{k}" for k in model}, **{k: f"objective.{k}" for k in objective}}
    given = {sections.get(name, name) for name in _given(click.get_current_context(), "resume", "no_progress")}
    state = run_training(config, resume=resume, progress=not no_progress, given=given)
    run = state["run"]
    if main_process():  # under torchrun rank 0 reports for all
        click.echo(f"train: best BLEU-4 {run['best_bleu4']:.2f} at epoch {run['best_epoch']}; "
                   f"checkpoints in {config.out}")


def _captioner_source(checkpoint, model) -> tuple:
    """(checkpoint, model) as given, or the newest best.pt under data/runs when neither is (saying so)."""
    if checkpoint and model:
        raise Failure("--checkpoint and --model name two captioners: give one")
    if checkpoint is None and model is None:
        checkpoint, note = paths.newest_checkpoint()
        click.echo(note, err=True)
    return checkpoint, model


def _given(ctx: click.Context, *ignored: str) -> list[str]:
    """Names of the options given on the command line (not left to their defaults)."""
    return [name for name in ctx.params
            if name not in ignored and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True, help="A best.pt or last.pt of `cli.py train`.")
@click.option("--split", default="test", help="Split of the features to caption and score.")
@click.option("--beam-size", type=BEAM, default=3, help="Beam size k (1: greedy; at most 100).")
@click.option("--max-len", type=MAX_LEN, default=20, help="Longest caption, in words (at most 200).")
@click.option("--length-penalty", type=Finite(0, 10), default=0.0,
              help="Rank beams by log-probability / length**this (0: plain log-probability).")
@click.option("--features", "features_dir", type=click.Path(file_okay=False), default=None,
              help="Features folder. [default: the one the checkpoint was trained on]")
@click.option("--batch-size", type=POSITIVE, default=50, help="Images decoded at once.")
@click.option("--device", type=Device(), default="cpu", help="Torch device: cpu, cuda, ...")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the captions, references and scores files. [default: the checkpoint's folder]")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def evaluate(checkpoint, split, beam_size, max_len, length_penalty, features_dir, batch_size, device, out_dir,
             no_progress):
    """Caption a split with beam search and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr (coco-caption).

    Writes the captions (COCO results json), the references (COCO caption annotation json) and
    the scores (json) into --out-dir, named by the checkpoint, split and every setting that is not
    its default (NAME-SPLIT-beamK[-lenN][-lpP][-features-HASH]), so no two settings collide; a
    rerun replaces only the files an earlier run wrote.
    """
    from pipeline.evaluate import evaluate as run_evaluation

    result = run_evaluation(checkpoint, split, beam_size, max_len, length_penalty, features_dir, batch_size, device,
                            progress=not no_progress, out_dir=out_dir)
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    for image_id, caption in result["examples"]:
        click.echo(f"{image_id}: {caption}")
    click.echo(f"{split} ({result['images']} images, beam {beam_size}): " +
               ", ".join(f"{k} {v:.1f}" for k, v in result["scores"].items()))
    click.echo(f"captions: {result['captions']}\nscores: {result['scores_file']}\n"
               f"references (COCO format): {result['references']}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="A best.pt or last.pt of `cli.py train`. [default: the newest best.pt under data/runs]")
@click.option("--beam-size", type=BEAM, default=3, help="Beam size k (1: greedy; at most 100).")
@click.option("--max-len", type=MAX_LEN, default=20, help="Longest caption, in words (at most 200).")
@click.option("--attention-plot", type=click.Path(dir_okay=False), default=None,
              help="Save the attention figure (paper Fig. 2/3) here as PNG; with several images, as PATH-STEM-IMAGE.png. "
                   "An existing file there is replaced only if it is an attention figure this command drew.")
@click.option("--jsonl", type=click.Path(dir_okay=False), default=None,
              help="Also write each result as a JSON line here (image, caption, log_prob, plot, error) as soon as it "
                   "is done.")
@click.option("--model", default=None,
              help="Instead of --checkpoint: a model folder written by `cli.py export`, or a Hugging Face Hub id "
                   "(owner/name) holding one.")
@click.option("--device", type=Device(), default="cpu", help="Torch device: cpu, cuda, ...")
def caption(images, checkpoint, beam_size, max_len, attention_plot, jsonl, model, device):
    """Caption image files (any size; JPEG, PNG, ...) with a trained checkpoint.

    Runs the encoder the checkpoint's features were made with, and prints each caption as soon as
    it is done. Unreadable files are reported and the others still captioned; the exit status is 1
    if any failed.
    """
    from pathlib import Path

    from pipeline.caption import caption_images, open_jsonl

    checkpoint, model = _captioner_source(checkpoint, model)
    inputs = [*map(Path, images), *(Path(p) for p in (checkpoint, model) if p)]
    header = {"checkpoint": str(checkpoint) if checkpoint else None, "model": model, "beam_size": beam_size}
    lines = open_jsonl(jsonl, inputs, header) if jsonl else None
    failed = 0
    try:
        for result in caption_images(images, checkpoint, model, beam_size, max_len, attention_plot, device):
            if result.error:
                failed += 1
                click.echo(f"{result.path}: error: {result.error}", err=True)
            else:
                click.echo(f"{result.path}: {result.caption}" + (f"  [{result.plot}]" if result.plot else ""))
            if lines:
                lines.write(result.to_json() + "\n")
                lines.flush()
    finally:
        if lines:
            lines.close()
    if failed:
        sys.exit(1)


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="A best.pt or last.pt of `cli.py train`. [default: the newest best.pt under data/runs]")
@click.option("--model", default=None,
              help="Instead of --checkpoint: a model folder written by `cli.py export`, or a Hugging Face Hub id.")
@click.option("--host", default="127.0.0.1",
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, help="TCP port to listen on.")
@click.option("--examples", type=click.Path(exists=True, file_okay=False), default=None,
              help="A folder of images; its first 8 (by name) are offered as examples on the page.")
@click.option("--device", type=Device(), default="cpu", help="Torch device: cpu, cuda, ...")
def serve(checkpoint, model, host, port, examples, device):
    """Serve a web page (Gradio) that captions uploaded images: the k best captions with their
    log-probabilities, and the attention of the best over the image, word by word.

    Uploads are limited to 20 MiB and 40 megapixels. Stop it with Ctrl-C.
    """
    from pathlib import Path

    from pipeline import Captioner
    from pipeline.app import IMAGE_TYPES, serve as serve_page

    checkpoint, model = _captioner_source(checkpoint, model)
    captioner = Captioner.from_source(checkpoint, model, device)
    shown = sorted(str(p) for p in Path(examples).iterdir() if p.suffix.lower() in IMAGE_TYPES)[:8] if examples else []
    click.echo(f"serve: http://{host}:{port} (Ctrl-C stops it)", err=True)
    serve_page(captioner, host, port, shown)


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True,
              help="A best.pt or last.pt of `cli.py train` (its weight average where the run kept one).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Model folder to write (new, empty, or an earlier export).")
def export(checkpoint, out):
    """Write a model to share: safetensors weights (decoder and encoder), config.json, vocab.json
    and a model card README.md with the scores `cli.py evaluate` wrote for the checkpoint.

    Load it with `Captioner.from_pretrained(FOLDER)` or `cli.py caption --model FOLDER`.
    """
    from pipeline.export import export_model

    click.echo(f"export: {export_model(checkpoint, out)}")


@main.command()
@click.argument("features_dir", type=click.Path(file_okay=False))
def verify(features_dir):
    """Check a features folder as training and scoring read it: the manifest's keys, every shard
    present with the manifest's SHA-256 and its annotations of the manifest's shape (N, L, D) and
    dtype, every annotation value finite, and captions.json and vocab.json those written with the
    shards.

    Prints one line per problem with what to do (for a damaged shard, the command that rebuilds
    it), and exits 1 if any.
    """
    from pipeline.shards import check_shards, load_manifest

    manifest = load_manifest(features_dir)
    problems = check_shards(features_dir, manifest, values=True)
    for line in problems:
        click.echo(line, err=True)
    if problems:
        sys.exit(1)
    counts = ", ".join(f"{s} {e['images']} images in {len(e['shards'])} shards" for s, e in manifest["splits"].items())
    click.echo(f"verify: {features_dir} is whole ({counts}; L={manifest['L']}, D={manifest['D']}, {manifest['dtype']})")


if __name__ == "__main__":
    main()
