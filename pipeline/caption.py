"""Captioning image files with a trained checkpoint: the encoder recorded with the checkpoint's
features (same weights, same preprocessing), then beam search, optionally the attention figure."""
from dataclasses import dataclass
from pathlib import Path

import torch

from .decode import beam_search
from .encoders import ImageError, Preprocess, build_encoder, open_rgb
from .errors import PipelineError
from .plots import attention_figure
from .train import build_decoder, load_checkpoint


@dataclass
class ImageCaption:
    """The result for one image file: its caption, or the reason it could not be read."""

    path: Path
    caption: str | None = None
    log_prob: float | None = None
    plot: Path | None = None
    error: str | None = None


def plot_path(pattern: Path, image: Path, many: bool) -> Path:
    """``out.png`` for one image; ``out-IMAGESTEM.png`` for each of several."""
    return pattern.with_name(f"{pattern.stem}-{image.stem}{pattern.suffix or '.png'}") if many else pattern


def load_captioner(checkpoint_path, device="cpu"):
    """(encoder, preprocess, decoder, vocab, checkpoint) for a checkpoint.

    Raises PipelineError if the checkpoint's features came from no image encoder, or the encoder
    weights found now differ from those the features were made with.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    identity = checkpoint["features"]
    recorded = identity["encoder"]
    if recorded.get("weights") is None:
        raise PipelineError(f"{checkpoint_path}: trained on features with no image encoder; it cannot caption images")
    encoder = build_encoder(recorded["name"], recorded["weights"], device)
    if encoder.weights_sha256 != recorded["weights_sha256"]:
        raise PipelineError(f"{checkpoint_path}: the {recorded['name']} weights '{recorded['weights']}' found now differ "
                            f"from those its features were made with (SHA-256 {recorded['weights_sha256'][:12]}...)")
    decoder, vocab = build_decoder(checkpoint, checkpoint_path)
    return encoder, Preprocess(**identity["preprocess"]), decoder.to(device).eval(), vocab, checkpoint


def caption_images(paths, checkpoint_path, beam_size: int = 3, max_len: int = 20, plot=None,
                   device: str = "cpu") -> list[ImageCaption]:
    """Caption each image file; unreadable files get an ``error`` and the others go on.

    plot: where to save attention figures (see :func:`plot_path`), or None.
    """
    encoder, preprocess, decoder, vocab, checkpoint = load_captioner(checkpoint_path, device)
    identity = checkpoint["features"]
    storage = getattr(torch, identity["dtype"])
    context = checkpoint["train_config"]["decode_context"]
    transform = preprocess.transform()
    show = preprocess.crop()  # the image as the encoder saw it, for the figure
    results = []
    for path in map(Path, paths):
        try:
            image = open_rgb(path)
        except ImageError as e:
            results.append(ImageCaption(path, error=e.reason))
            continue
        with torch.inference_mode():
            annotations = encoder(transform(image).unsqueeze(0).to(device))
        annotations = annotations.to(storage).float()  # as stored in the shards the decoder learnt from
        best = beam_search(decoder, annotations, vocab.start, vocab.end, beam_size, max_len, context=context)[0]
        words = [vocab.words[t] for t in best.tokens]
        result = ImageCaption(path, " ".join(words), best.log_prob)
        if plot is not None:
            result.plot = plot_path(Path(plot), path, len(paths) > 1)
            attention_figure(show(image), words, best.alpha, tuple(identity["grid"]), result.plot)
        results.append(result)
    return results
