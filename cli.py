"""Show, Attend and Tell: command line. Each command parses its options and calls ``pipeline``.

Every option is checked as it is parsed (ranges, finite numbers, an available device), so no bad
value reaches torch; every error ends as one line and exit status 2, never a traceback.
"""

import contextlib
import errno
import logging
import math
import os
import shlex
import sys
import warnings

import click
from click.core import ParameterSource
from PIL import Image

from pipeline.config import SECTIONS, DecodeConfig, DecoderConfig, FeatureConfig, ObjectiveConfig, TrainConfig
from pipeline.features.datasets import DATASETS
from pipeline.io import paths
from pipeline.io.atomic import disk_full_message
from pipeline.io.errors import PipelineError, Worded, describe, one_line, worded
from pipeline.io.folders import os_error_message
from pipeline.options import field_flag, flag_name, nest, specs

DEBUG = "SHOW_ATTEND_TELL_DEBUG"  # set to 1 to see the traceback of an unexpected error
CONFIGS = (TrainConfig, FeatureConfig, DecodeConfig, DecoderConfig, ObjectiveConfig)  # whose fields are options


def flag(name: str, value: str = "") -> str:
    """The command-line words of the option a library message names (:func:`pipeline.io.errors.param`):
    field ``name`` of a configuration ('model.gating' for the decoder's, 'objective.NAME' for the
    objective's) or a command's keyword, with ``value`` where given: ``--compile off``, ``--no-gating``."""
    section, _, field = name.rpartition(".")
    classes = {"model": (DecoderConfig,), "objective": (ObjectiveConfig,)}.get(section, CONFIGS)
    owner = next((cls for cls in classes if field in specs(cls)), None)
    words = field_flag(owner, field) if owner else "--" + field.replace("_", "-")
    return words if value in ("", "True", "False") else f"{words} {value}"


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
            raise Failure(one_line(e, flag)) from None
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished work is kept; run the same command again to continue (train: with --resume)",
                err=True,
            )
            sys.exit(130)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Failure(worded(disk_full_message(e.filename or "a file"), flag)) from None
            raise Failure(os_error_message(e)) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
            if os.environ.get(DEBUG):
                raise
            raise Failure(
                f"unexpected error ({describe(e)}); please report it with the command line "
                f"(set {DEBUG}=1 for the traceback)"
            ) from None


class Finite(click.FloatRange):
    """A number that is not nan or infinite, within the range given."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class FileOrNone(click.Path):
    """A file that exists, or '' (an option's default: no file)."""

    def __init__(self):
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        return value if value == "" else super().convert(value, param, ctx)


def split_names(ctx, param, value):
    """``--splits`` as given, refused at parsing where it holds an empty name (``,`` would have
    named no split, which means every split)."""
    if value is not None and not all(s.strip() for s in value.split(",")):
        raise click.BadParameter(f"{value!r} has an empty split name; give names such as train,dev")
    return value


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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Show, Attend and Tell (Xu et al. 2015): neural image captioning with visual attention.

    Stage one, `features`, runs a frozen CNN over an image corpus and stores annotation vectors in
    HDF5 shards; stage two trains the attention decoder on them.
    """
    warnings.formatwarning = lambda message, *args, **kwargs: (
        f"warning: {message.worded(flag) if isinstance(message, Worded) else message}\n"
    )
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # open_rgb refuses such images itself
    shown = logging.StreamHandler(sys.stderr)  # the library's notes and progress lines, as they are
    shown.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("pipeline").addHandler(shown)
    logging.getLogger("pipeline").setLevel(logging.INFO)


def config_options(*classes):
    """Decorator: one click option per field of the configuration dataclasses ``classes`` that
    carries a :class:`pipeline.options.Spec`, its name, default, type, range, choices and help
    all taken from the field (each option is defined once, in its dataclass)."""

    def decorate(command):
        for cls in reversed(classes):
            for name, (default, spec) in reversed(specs(cls).items()):
                if spec.cli:
                    command = click.option(flag_name(name, default, spec), name, **_option_kwargs(default, spec))(
                        command
                    )
        return command

    return decorate


def _option_kwargs(default, spec) -> dict:
    """click.option's keyword arguments for a configuration field."""
    help = spec.help + (f" Unit: {spec.unit}." if spec.unit else "")
    if isinstance(default, bool):
        return {"is_flag": True, "flag_value": not default, "default": default, "show_default": False, "help": help}
    if spec.kind == "device":
        kind = Device()
    elif spec.kind == "path":
        kind = FileOrNone()
    elif spec.choices:
        kind = click.Choice(spec.choices)
    elif isinstance(default, float):
        kind = Finite(spec.low, spec.high, min_open=spec.low_open, max_open=spec.high_open)
    elif isinstance(default, int) or spec.low is not None:
        kind = click.IntRange(spec.low, spec.high, min_open=spec.low_open, max_open=spec.high_open)
    else:
        kind = click.STRING
    return {"type": kind, "default": default, "help": help}


def _read_config(ctx: click.Context, param, path):
    """--config FILE: the file's options become the defaults, so flags given still win."""
    if path is not None:
        from pipeline.options import read_toml

        values = read_toml(path)
        known = {p.name for p in ctx.command.params}
        unknown = sorted(set(values) - known)
        if unknown:
            raise click.BadParameter(f"{path}: no option {unknown[0]!r} in `{ctx.command.name}`", ctx, param)
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


def config_file(what: str):
    return click.option(
        "--config",
        type=click.Path(exists=True, dir_okay=False),
        callback=_read_config,
        is_eager=True,
        expose_value=False,
        help=f"A TOML file of options (one flat table, as the config.toml that every {what} folder records): "
        "they become the defaults, and options given on the command line override them.",
    )


def checkpoint_option(required: bool = False, help: str = "A best.pt or last.pt of `cli.py train`."):
    return click.option(
        "--checkpoint",
        type=click.Path(exists=True, dir_okay=False),
        required=required,
        help=help + ("" if required else " [default: the newest best.pt under data/runs]"),
    )


model_option = click.option(
    "--model",
    default=None,
    help="Instead of --checkpoint: a model folder written by `cli.py export`, or a Hugging Face Hub id "
    "(owner/name) holding one.",
)
progress_option = click.option("--no-progress", is_flag=True, help="No progress bar.")
device_option = click.option("--device", type=Device(), default="cpu", help="Torch device: cpu, cuda, cuda:1, ...")


@main.command()
@config_file("features")
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default="flickr8k",
    help="Corpus adapter: the official Flickr8k layout; Flickr30k or COCO with their "
    "Karpathy json (README, Datasets); any Karpathy-split json; or generated shapes.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Dataset folder. [default: data/DATASET; synthetic is generated there if absent]",
)
@click.option(
    "--karpathy-json",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --dataset karpathy: the split json (dataset_coco.json, ...).",
)
@click.option(
    "--image-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --dataset karpathy: the folder the json's image paths are relative to.",
)
@click.option(
    "--splits",
    default=None,
    callback=split_names,
    help="Comma-separated splits to extract, e.g. train,dev. [default: all]",
)
@config_options(FeatureConfig)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Features folder. [default: data/features/DATASET-ENCODER, -IMAGE_SIZE added where --image-size is given]",
)
@click.option(
    "--skip-bad-images",
    is_flag=True,
    help="Exit 0 even if some images could not be used (they are listed in OUT/bad_images.tsv).",
)
@progress_option
def features(dataset, data_dir, karpathy_json, image_dir, splits, out, skip_bad_images, no_progress, **settings):
    """Stage one: encode a corpus into HDF5 shards of annotation vectors.

    Reruns resume: finished shards are kept. Images that cannot be used are reported, the rest go
    on, and the exit status is 1 if any failed (unless --skip-bad-images). The folder records its
    options in OUT/config.toml (`--config OUT/config.toml` repeats them).
    """
    from pipeline.features.datasets import load_records
    from pipeline.features.extract import extract_features, failure_counts
    from pipeline.io.distributed import main_process

    config = FeatureConfig(**settings)
    records = load_records(dataset, data_dir, karpathy_json, image_dir)
    out = out or paths.features_dir(dataset, config.encoder, config.image_size)
    split_list = list(dict.fromkeys(s.strip() for s in splits.split(","))) if splits else None
    options = dict(
        dataset=dataset,
        data_dir=data_dir,
        karpathy_json=karpathy_json,
        image_dir=image_dir,
        splits=splits,
        **settings,
        out=str(out),
    )
    summary = extract_features(
        records,
        out,
        config,
        dataset,
        split_list,
        progress=not no_progress,
        command=shlex.join(["python", *sys.argv]),
        options=options,
    )
    failed = bool(summary.failures) and not skip_bad_images
    if main_process():  # under torchrun rank 0 reports for all
        click.echo(summary.line())
        if summary.failures:
            kinds = ", ".join(f"{n} {why}" for why, n in failure_counts(summary.failures).most_common())
            click.echo(
                f"{len(summary.failures)} images could not be used ({kinds}); listed in "
                f"{summary.out / 'bad_images.tsv'}",
                err=True,
            )
        if failed:
            click.echo("exiting with status 1; pass --skip-bad-images (make: SKIP_BAD=1) to accept this", err=True)
    if failed:
        sys.exit(1)


@main.command()
@config_file("run")
@click.option(
    "--features",
    type=click.Path(file_okay=False),
    default=None,
    help="Features folder written by `cli.py features` (needs train, and dev or val). [default: with --resume, the "
    "run's own; else data/features/flickr8k-vgg19, what `make features DATASET=flickr8k` writes, or the only folder "
    "under data/features]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder for checkpoints (last.pt, best.pt), metrics.jsonl, curves.png, tensorboard/ and config.toml. "
    "[default: data/runs/FEATURES-ATTENTION, FEATURES the features folder's name]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last.pt, with its saved options (--features and --out as given). It may "
    "change --epochs, --patience, --checkpoint-every, --workers, --no-tensorboard and --compile; any other option "
    "given with another value than the run's is refused.",
)
@config_options(TrainConfig, DecoderConfig, ObjectiveConfig)
@progress_option
def train(features, out, resume, no_progress, **settings):
    """Stage two: train the attention decoder on feature shards.

    Validates each epoch by free-running beam-search decoding scored with BLEU-4 and CIDEr-D,
    keeps last.pt and best.pt, decays the learning rate and stops early when the validation score
    (--val-metric) stops improving. `--objective scst --init RUN/best.pt` fine-tunes an XE-trained
    decoder by self-critical sequence training. The run records its options in OUT/config.toml
    (`--config OUT/config.toml` repeats them).
    """
    from pipeline.io.distributed import main_process
    from pipeline.train.loop import train as run_training
    from pipeline.train.validate import METRIC_NAMES

    if features is None and not resume:  # a resume defaults to the run's own features
        features, note = paths.default_features()
        if note and main_process():
            click.echo(note, err=True)
    fields = nest(settings, SECTIONS)
    typed = set(_given(click.get_current_context(), "resume", "no_progress"))
    if settings["init"]:  # the decoder's options come from --init's checkpoint: those typed must agree with it
        fields["model"] = {k: v for k, v in fields["model"].items() if k in typed}
    config = TrainConfig(
        features=features and str(features),
        out=str(out or paths.run_dir(features or paths.default_features()[0], settings["attention"])),
        **fields,
    )
    where = {k: f"{section}.{k}" for section in SECTIONS for k in fields[section]}
    given = {where.get(name, name) for name in typed}
    state = run_training(config, resume=resume, progress=not no_progress, given=given)
    ran = TrainConfig(**state["train_config"])  # a resumed run's own options (e.g. --objective scst), not the defaults
    run, metric = state["run"], METRIC_NAMES[ran.selection_metric]
    if main_process():  # under torchrun rank 0 reports for all
        click.echo(
            f"train: best {metric} {run['best_score']:.2f} at epoch {run['best_epoch']}; checkpoints in {ran.out}"
        )


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
    return [
        name
        for name in ctx.params
        if name not in ignored and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]


@main.command()
@checkpoint_option(required=True)
@click.option("--split", default="test", help="Split of the features to caption and score.")
@config_options(DecodeConfig)
@click.option(
    "--features",
    "features_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Features folder. [default: the one the checkpoint was trained on]",
)
@click.option("--batch-size", type=POSITIVE, default=50, help="Images decoded at once.")
@device_option
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the captions, references and scores files. [default: the checkpoint's folder]",
)
@progress_option
def evaluate(checkpoint, split, features_dir, batch_size, device, out_dir, no_progress, **settings):
    """Caption a split with beam search and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr (coco-caption).

    Writes the captions (COCO results json), the references (COCO caption annotation json) and
    the scores (json) into --out-dir, named by the checkpoint, split and every setting that is not
    its default (NAME-SPLIT-beamK[-lenN][-lpP][-unk][-blocktrigrams][-features-HASH]), so no two settings collide; a
    rerun replaces only the files an earlier run wrote.
    """
    from pipeline.eval.evaluate import evaluate as run_evaluation

    settings = DecodeConfig(**settings)
    result = run_evaluation(
        checkpoint, split, settings, features_dir, batch_size, device, progress=not no_progress, out_dir=out_dir
    )
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    for image_id, caption in result["examples"]:
        click.echo(f"{image_id}: {caption}")
    click.echo(
        f"{split} ({result['images']} images, beam {settings.beam_size}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["scores"].items())
    )
    click.echo(
        f"captions: {result['captions']}\nscores: {result['scores_file']}\n"
        f"references (COCO format): {result['references']}"
    )


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@checkpoint_option()
@model_option
@config_options(DecodeConfig)
@click.option(
    "--attention-plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save the attention figure (paper Fig. 2/3) here as PNG; with several images, as PATH-STEM-IMAGE.png. "
    "An existing file there is replaced only if it is an attention figure this command drew.",
)
@click.option(
    "--jsonl",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write each result as a JSON line here (image, caption, log_prob, plot, error): into FILE.tmp-PID as "
    "each is done, which replaces FILE when the command ends (also on Ctrl-C or SIGTERM).",
)
@device_option
def caption(images, checkpoint, model, attention_plot, jsonl, device, **settings):
    """Caption image files (any size; JPEG, PNG, ...) with a trained checkpoint.

    Runs the encoder the checkpoint's features were made with, and prints each caption as soon as
    it is done. Unreadable files are reported and the others still captioned; the exit status is 1
    if any failed.
    """
    from pipeline.serve.caption import JsonLines, caption_images

    checkpoint, model = _captioner_source(checkpoint, model)
    settings = DecodeConfig(**settings)
    header = {"checkpoint": str(checkpoint) if checkpoint else None, "model": model, **vars(settings)}
    results = caption_images(images, checkpoint, model, settings, attention_plot, device, jsonl)  # checked, loaded
    failed = 0
    with JsonLines(jsonl, header) if jsonl else contextlib.nullcontext() as lines:
        for result in results:
            if result.error:
                failed += 1
                click.echo(f"{result.path}: error: {result.error}", err=True)
            else:
                click.echo(f"{result.path}: {result.caption}" + (f"  [{result.plot}]" if result.plot else ""))
            if lines:
                lines.write(result.to_json())
    if failed:
        sys.exit(1)


@main.command()
@checkpoint_option()
@model_option
@config_options(DecodeConfig)
@click.option(
    "--host",
    default="127.0.0.1",
    help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network interface).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=7860, help="TCP port to listen on.")
@click.option(
    "--examples",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A folder of images; its first 8 (by name) are offered as examples on the page.",
)
@device_option
def serve(checkpoint, model, host, port, examples, device, **settings):
    """Serve a web page (Gradio) that captions uploaded images: the k best captions with their
    log-probabilities, and the attention of the best over the image, word by word.

    The page's beam size starts at --beam-size. Uploads are limited to 20 MiB and 40 megapixels.
    Stop it with Ctrl-C.
    """
    from pathlib import Path

    from pipeline import Captioner
    from pipeline.serve.web import IMAGE_TYPES
    from pipeline.serve.web import serve as serve_page

    checkpoint, model = _captioner_source(checkpoint, model)
    captioner = Captioner.from_source(checkpoint, model, device)
    shown = sorted(str(p) for p in Path(examples).iterdir() if p.suffix.lower() in IMAGE_TYPES)[:8] if examples else []
    click.echo(f"serve: http://{host}:{port} (Ctrl-C stops it)", err=True)
    serve_page(captioner, host, port, shown, DecodeConfig(**settings))


@main.command()
@checkpoint_option(True, "A best.pt or last.pt of `cli.py train` (its weight average where the run kept one).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Model folder to write (new, empty, or an earlier export).",
)
def export(checkpoint, out):
    """Write a model to share: safetensors weights (decoder and encoder), config.json, vocab.json
    and a model card README.md with the scores `cli.py evaluate` wrote for the checkpoint.

    Load it with `Captioner.from_pretrained(FOLDER)` or `cli.py caption --model FOLDER`.
    """
    from pipeline.captioner import export_model

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
    from pipeline.features.folder import check_shards, load_manifest

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
