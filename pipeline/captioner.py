"""A trained captioner in Python: images in, captions and their attention out.

    from pipeline import Captioner
    captioner = Captioner.from_checkpoint("data/runs/f8k-soft/best.pt", device="cpu")
    results = captioner(["photo.jpg", pil_image, uint8_chw_tensor], beam_size=3)
    best = results[0]
    best.text, best.tokens, best.log_prob, best.attention   # attention: (T, h, w), one map per word
    captioner.attention_figure(best, "att.png")              # the paper's Figure 2/3

The encoder is the one the checkpoint's features were made with (same weights, checked by hash,
and the same preprocessing), and one call runs it and the batched beam search over all its images
at once. Nothing is written unless asked.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import build_decoder, load_checkpoint
from .config import DecodeConfig
from .export import load_model_folder, prepare_folder, write_model_folder
from .features.encoders import Encoder, build_encoder, encoder_from_state
from .features.folder import identity_problem
from .features.images import Preprocess, open_rgb, to_rgb
from .io.errors import PipelineError, describe
from .model.compiled import decide_decoding, use_compiled
from .model.decode import n_best
from .model.decoder import Decoder
from .plots import attention_figure
from .text import Vocabulary


def checked_preprocess(identity, where, fix: str) -> Preprocess:
    """The preprocessing recorded in ``identity`` (a checkpoint's ``features``, an export's
    config.json: :func:`pipeline.features.folder.identity_problem`), its encoder record checked too (a
    name; weights and their SHA-256 as strings, or no weights for features made without an
    image encoder).
    Raises PipelineError naming ``where`` and saying ``fix`` for anything missing or malformed."""
    problem = identity_problem(identity)
    if problem is None:
        encoder = identity["encoder"]
        if not isinstance(encoder.get("name"), str) or (
            encoder.get("weights") is not None
            and not all(isinstance(encoder.get(k), str) for k in ("weights", "weights_sha256"))
        ):
            problem = "malformed 'encoder'"
    if problem is None:
        try:
            return Preprocess(**identity["preprocess"])
        except (TypeError, PipelineError) as e:
            problem = f"malformed 'preprocess' ({describe(e)})"
    raise PipelineError(f"{where}: its record of the features' making has {problem}; {fix}")


@dataclass
class Caption:
    """One image's caption.

    text: the words joined by spaces; tokens: the caption's words (no ``<start>``/``<end>``);
    log_prob: natural log-probability of the whole word sequence, ``<end>`` included;
    attention: (T, h, w) float, the attention weights alpha_t of word t over the feature grid
    (each map sums to 1; T = len(tokens)); image: the image as the encoder saw it (PIL RGB, after
    resizing and cropping), for figures.
    """

    text: str
    tokens: list[str]
    log_prob: float
    attention: torch.Tensor
    image: Image.Image


class Captioner:
    """An encoder, its preprocessing, a trained decoder and its vocabulary, ready to caption.

    Build one with :meth:`from_checkpoint`; call it on a list of images.
    """

    def __init__(
        self,
        encoder: Encoder,
        preprocess: Preprocess,
        decoder: Decoder,
        vocab: Vocabulary,
        grid: tuple[int, int],
        storage: torch.dtype = torch.float32,
        context: str = "expected",
    ):
        self.encoder, self.preprocess, self.decoder, self.vocab = encoder, preprocess, decoder.eval(), vocab
        self.grid, self.storage, self.context = tuple(grid), storage, context

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", checkpoint: dict | None = None) -> "Captioner":
        """The captioner of a ``best.pt`` or ``last.pt`` written by `cli.py train` (its weight
        average where the run kept one), on ``device`` ('cpu', 'cuda', 'cuda:1'); ``checkpoint``:
        the file as :func:`pipeline.checkpoint.load_checkpoint` already returned it, not read again.

        Raises PipelineError if the file is not such a checkpoint, its features came from no image
        encoder, or the encoder weights it names cannot be loaded or differ from those its
        features were made with.
        """
        checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
        identity = checkpoint["features"]
        preprocess = checked_preprocess(identity, path, "the file is damaged or was edited: use another checkpoint")
        recorded = identity["encoder"]
        if recorded.get("weights") is None:
            raise PipelineError(f"{path}: trained on features with no image encoder; it cannot caption images")
        sha = f"SHA-256 {recorded['weights_sha256'][:12]}..."
        try:
            encoder = build_encoder(recorded["name"], recorded["weights"], device)
        except PipelineError as e:
            raise PipelineError(
                f"{path}: its features were made with the {recorded['name']} weights "
                f"'{recorded['weights']}' ({sha}), which cannot be loaded now ({e}); put that file back "
                "where it was"
            ) from None
        if encoder.weights_sha256 != recorded["weights_sha256"]:
            raise PipelineError(
                f"{path}: the {recorded['name']} weights '{recorded['weights']}' found now differ "
                f"from those its features were made with ({sha})"
            )
        decoder, vocab = build_decoder(checkpoint, path)
        return cls(
            encoder,
            preprocess,
            decoder.to(device),
            vocab,
            identity["grid"],
            getattr(torch, identity["dtype"]),
            checkpoint["train_config"]["decode_context"],
        )

    @classmethod
    def from_pretrained(cls, model, device: str = "cpu") -> "Captioner":
        """The captioner of a model folder written by `cli.py export` (:mod:`pipeline.export`), or
        of a Hugging Face Hub repository id ('owner/name') holding one, on ``device``.

        Raises PipelineError if it cannot be had or is not a complete export, or if its encoder
        weights do not match the SHA-256 its config records.
        """
        config, trunk, decoder, vocab = load_model_folder(str(model), device)
        preprocess = checked_preprocess(config, model, "export it again")
        recorded = config["encoder"]
        encoder = encoder_from_state(recorded["name"], trunk, recorded["weights"], device)
        if encoder.weights_sha256 != recorded["weights_sha256"]:
            raise PipelineError(
                f"{model}: encoder.safetensors does not hold the {recorded['name']} weights its "
                f"config.json names (SHA-256 {recorded['weights_sha256'][:12]}...); export it again"
            )
        return cls(
            encoder,
            preprocess,
            decoder,
            vocab,
            config["grid"],
            getattr(torch, config["dtype"]),
            config["decode_context"],
        )

    @classmethod
    def from_source(cls, checkpoint=None, model=None, device: str = "cpu") -> "Captioner":
        """:meth:`from_checkpoint` of ``checkpoint`` if given, else :meth:`from_pretrained` of ``model``."""
        return cls.from_checkpoint(checkpoint, device) if checkpoint else cls.from_pretrained(model, device)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def load(self, image, index: int = 0) -> Image.Image:
        """One image as PIL RGB: a file path (str or Path), a PIL image, or a uint8 tensor
        (3, H, W) of RGB values (or (1, H, W) grey). ``index`` names it in errors.
        Raises PipelineError (an ImageError for files) if it is none of these or cannot be read."""
        if isinstance(image, (str, Path)):
            return open_rgb(image)
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3) or min(image.shape) < 1:
                raise PipelineError(
                    f"images[{index}]: a tensor image must be uint8 of shape (3, H, W) or (1, H, W); "
                    f"got {image.dtype} {tuple(image.shape)}"
                )
            return Image.fromarray(image.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())
        raise PipelineError(
            f"images[{index}]: {type(image).__name__} is not an image; pass a file path, a PIL image "
            "or a uint8 (3, H, W) tensor"
        )

    def __call__(self, images: list, **settings) -> list[Caption]:
        """Caption ``images`` (any mix of what :meth:`load` takes), all in one encoder batch and
        one batched beam search. settings: the decoding options of
        :class:`~pipeline.config.DecodeConfig` by name (beam_size, 1: greedy; max_len in words;
        length_penalty; allow_unk; block_trigrams; compile: 'auto' compiles a call of at least
        :data:`~pipeline.config.DECODE_ROWS` images x beam size, 'on' every call, the first one
        compiling, or loading the compile from its cache, :mod:`pipeline.model.compiled`), each at its
        default unless given.
        Returns one :class:`Caption` per image, in order.
        Raises PipelineError for an image that cannot be read (naming it) or a bad setting."""
        if "n" in settings:
            raise PipelineError(
                "n: a call gives each image's best caption; for the n best, captioner.n_best(images, n)"
            )
        return [found[0] for found in self.n_best(images, n=1, **settings)]

    @torch.inference_mode()
    def n_best(self, images: list, n: int | None = None, **settings) -> list[list[Caption]]:
        """As :meth:`__call__`, but the ``n`` best captions of each image (default: the beam size),
        best first (the first is :meth:`__call__`'s caption; fewer where fewer ended).
        Raises PipelineError as :meth:`__call__`, and for an ``n`` that is not a whole number >= 1."""
        if isinstance(images, (str, Path, Image.Image, torch.Tensor)):
            raise PipelineError("pass a list of images, even for one: captioner([image])")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PipelineError(f"n={n!r}: give the number of captions per image, a whole number >= 1")
        try:
            settings = DecodeConfig(**settings)
        except TypeError as e:
            raise PipelineError(f"{e}; the settings are those of DecodeConfig: beam_size, max_len, ...") from None
        if not images:
            return []
        pictures = [self.load(image, i) for i, image in enumerate(images)]
        pixels = self.preprocess.pixels()
        batch = torch.stack([pixels(p) for p in pictures]).to(self.device)
        annotations = self.encoder(self.preprocess.normalize(batch))
        annotations = annotations.to(self.storage).float()  # as stored in the shards the decoder learnt from
        use_compiled([self.decoder], decide_decoding(settings, self.device, len(images), note=False))
        found = n_best(self.decoder, annotations, self.vocab, settings, self.context, n or settings.beam_size)
        show = self.preprocess.crop()
        return [
            [self._caption(caption, seen) for caption in captions] for seen, captions in zip(map(show, pictures), found)
        ]

    def _caption(self, caption, image: Image.Image) -> Caption:
        words = [self.vocab.words[t] for t in caption.tokens]
        attention = caption.alpha[: len(words)].float().cpu().view(len(words), *self.grid)
        return Caption(" ".join(words), words, caption.log_prob, attention, image)

    def attention_figure(self, caption: Caption, path) -> Path:
        """Save ``caption``'s attention figure (the paper's Figure 2/3: the image, then each word
        with its attention map over it) as PNG at ``path``, atomically; returns the path."""
        attention_figure(caption.image, caption.tokens, caption.attention.flatten(1), self.grid, path)
        return Path(path)


def export_model(checkpoint_path, out) -> Path:
    """Write the model folder (:mod:`pipeline.export`) of the checkpoint at ``checkpoint_path``
    into ``out``: its captioner's decoder, encoder trunk and vocabulary, with its record and the
    scores `cli.py evaluate` wrote beside it. Returns ``out``.
    Raises PipelineError for an unusable checkpoint, a checkpoint whose features came from no
    image encoder, or an ``out`` that :func:`pipeline.export.prepare_folder` refuses."""
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    prepare_folder(out)
    checkpoint = load_checkpoint(checkpoint_path)
    captioner = Captioner.from_checkpoint(checkpoint_path, checkpoint=checkpoint)
    trunk = captioner.encoder.trunk.state_dict()
    return write_model_folder(out, checkpoint_path, checkpoint, captioner.decoder, trunk, captioner.vocab)
