"""Captioning image files with a trained checkpoint: the encoder recorded with the checkpoint's
features (same weights, same preprocessing), then beam search, optionally the attention figure.

Results come one image at a time, as each is done, so a caller that prints or saves them as they
come keeps everything finished when it is interrupted.
"""
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .decode import beam_search
from .encoders import ImageError, Preprocess, build_encoder, open_rgb
from .errors import PipelineError
from .folders import OWNER, check_writable, refuse_foreign
from .plots import attention_figure, is_attention_figure
from .train import build_decoder, load_checkpoint


@dataclass
class ImageCaption:
    """The result for one image file: its caption, or the reason it could not be read."""

    path: Path
    caption: str | None = None
    log_prob: float | None = None
    plot: Path | None = None
    error: str | None = None

    def to_json(self) -> str:
        """One JSON line: image, caption, log_prob (natural log), plot, error."""
        return json.dumps({"image": str(self.path), "caption": self.caption, "log_prob": self.log_prob,
                           "plot": str(self.plot) if self.plot else None, "error": self.error})


def plot_path(pattern: Path, image: Path, many: bool) -> Path:
    """``out.png`` for one image; ``out-IMAGESTEM.png`` for each of several."""
    return pattern.with_name(f"{pattern.stem}-{image.stem}{pattern.suffix or '.png'}") if many else pattern


def plot_paths(paths: list[Path], pattern, inputs: list[Path]) -> list[Path | None]:
    """The figure path of each image (all None without ``pattern``), checked before any work:
    names must differ (two images of one stem would share a figure), none may be an input
    (``inputs``: the images and the checkpoint), and a file already there must be an attention
    figure this pipeline drew. Raises PipelineError naming the offending path."""
    if pattern is None:
        return [None] * len(paths)
    plots = [plot_path(Path(pattern), p, len(paths) > 1) for p in paths]
    taken = {p.resolve() for p in inputs if p.exists()}
    seen = {}
    for image, plot in zip(paths, plots):
        if plot.resolve() in seen:
            raise PipelineError(f"{plot}: the attention figures of {seen[plot.resolve()]} and {image} would share this "
                                "name (the same file stem); caption them in separate commands")
        seen[plot.resolve()] = image
        if plot.resolve() in taken:
            raise PipelineError(f"{plot}: is an input of this command; pass another --attention-plot")
        if plot.exists() and not is_attention_figure(plot):
            refuse_foreign(plot, "`cli.py caption` (not one of its attention figures)", "--attention-plot")
        check_writable(plot.parent, "--attention-plot")
    return plots


def open_jsonl(path, inputs: list[Path], header: dict):
    """Open ``path`` to write JSON lines as results come: refused if it is an input, or an existing
    file whose first line is not the header this pipeline writes. Returns the open file (its
    header line written and flushed)."""
    path = Path(path)
    if path.exists():
        if path.resolve() in {p.resolve() for p in inputs if p.exists()}:
            raise PipelineError(f"{path}: is an input of this command; pass another --jsonl")
        try:
            with open(path, encoding="utf-8") as f:
                ours = json.loads(f.readline()).get("written_by") == OWNER
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours = False
        if not ours:
            refuse_foreign(path, "`cli.py caption`", "--jsonl")
    check_writable(path.parent, "--jsonl")
    f = open(path, "w", encoding="utf-8")
    f.write(json.dumps(dict(header, written_by=OWNER)) + "\n")
    f.flush()
    return f


def load_captioner(checkpoint_path, device="cpu"):
    """(encoder, preprocess, decoder, vocab, checkpoint) for a checkpoint.

    Raises PipelineError if the checkpoint's features came from no image encoder, or the encoder
    weights it names cannot be read or differ from those the features were made with.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    identity = checkpoint["features"]
    recorded = identity["encoder"]
    if recorded.get("weights") is None:
        raise PipelineError(f"{checkpoint_path}: trained on features with no image encoder; it cannot caption images")
    sha = f"SHA-256 {recorded['weights_sha256'][:12]}..."
    try:
        encoder = build_encoder(recorded["name"], recorded["weights"], device)
    except PipelineError as e:
        raise PipelineError(f"{checkpoint_path}: its features were made with the {recorded['name']} weights "
                            f"'{recorded['weights']}' ({sha}), which cannot be loaded now ({e}); put that file back "
                            "where it was") from None
    if encoder.weights_sha256 != recorded["weights_sha256"]:
        raise PipelineError(f"{checkpoint_path}: the {recorded['name']} weights '{recorded['weights']}' found now differ "
                            f"from those its features were made with ({sha})")
    decoder, vocab = build_decoder(checkpoint, checkpoint_path)
    return encoder, Preprocess(**identity["preprocess"]), decoder.to(device).eval(), vocab, checkpoint


def caption_images(paths, checkpoint_path, beam_size: int = 3, max_len: int = 20, plot=None,
                   device: str = "cpu") -> Iterator[ImageCaption]:
    """Caption each image file, yielding each result as soon as it is done; unreadable files get
    an ``error`` and the others go on.

    plot: where to save attention figures (see :func:`plot_path`), or None; the figure names are
    checked (:func:`plot_paths`) before the first image is read.
    Raises PipelineError for an unusable checkpoint or figure path.
    """
    paths = [Path(p) for p in paths]
    plots = plot_paths(paths, plot, [*paths, Path(checkpoint_path)])
    encoder, preprocess, decoder, vocab, checkpoint = load_captioner(checkpoint_path, device)
    identity = checkpoint["features"]
    storage = getattr(torch, identity["dtype"])
    context = checkpoint["train_config"]["decode_context"]
    transform = preprocess.transform()
    show = preprocess.crop()  # the image as the encoder saw it, for the figure
    for path, plot_file in zip(paths, plots):
        try:
            image = open_rgb(path)
        except ImageError as e:
            yield ImageCaption(path, error=e.reason)
            continue
        with torch.inference_mode():
            annotations = encoder(transform(image).unsqueeze(0).to(device))
        annotations = annotations.to(storage).float()  # as stored in the shards the decoder learnt from
        best = beam_search(decoder, annotations, vocab.start, vocab.end, beam_size, max_len, context=context)[0]
        words = [vocab.words[t] for t in best.tokens]
        if plot_file is not None:
            attention_figure(show(image), words, best.alpha, tuple(identity["grid"]), plot_file)
        yield ImageCaption(path, " ".join(words), best.log_prob, plot_file)
