"""Checkpoints: what `cli.py train` writes and every other stage reads.

A checkpoint is a dict of plain tensors and Python values, saved atomically with ``torch.save``
and read with ``torch.load(weights_only=True)``: ``model`` (the decoder's state dict), ``ema``
(its moving average, where the run kept one), ``optimizer``, ``model_config``, ``train_config``,
``objective_config``, ``vocab`` (the word list), ``features`` (the identity of the features it
was trained on: :func:`pipeline.features.folder.identity`), ``rng``, ``position`` and ``run``.
"""

from pathlib import Path

import torch

from .io.atomic import atomic_path
from .io.errors import PipelineError, describe
from .model.decoder import Decoder, DecoderConfig, upgrade_state_dict
from .text import Vocabulary

CHECKPOINT_KEYS = ("model", "model_config", "train_config", "vocab", "features")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    """Read a checkpoint with ``weights_only=True``. Raises PipelineError if absent, unreadable
    (including a file that needs arbitrary unpickling) or not written by `cli.py train`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for foreign files
        raise PipelineError(f"{path}: not a checkpoint loadable with weights_only=True ({describe(e)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise PipelineError(f"{path}: not a checkpoint written by `cli.py train` (no {', '.join(missing)})")
    return state


def decoder_config(checkpoint: dict, path) -> DecoderConfig:
    """The decoder's configuration stored in ``checkpoint`` (read from ``path``).
    Raises PipelineError if its fields or values are not this version's (a damaged or edited file)."""
    try:
        return DecoderConfig(**checkpoint["model_config"])
    except (TypeError, PipelineError) as e:
        raise PipelineError(
            f"{path}: its model configuration does not fit this version ({describe(e)}); the file is damaged or "
            "was edited: use another checkpoint"
        ) from None


def build_decoder(checkpoint: dict, path) -> tuple[Decoder, Vocabulary]:
    """The decoder and vocabulary stored in ``checkpoint`` (read from ``path``): the moving average
    of the weights where the run kept one (``ema_decay``), else the trained weights; weights of
    earlier versions are brought to this one's keys (:func:`pipeline.model.decoder.upgrade_state_dict`).
    Raises PipelineError if the weights or the vocabulary do not fit the model's config, or a
    weight is nan or inf."""
    config = decoder_config(checkpoint, path)
    weights = checkpoint["model"]
    if "ema" in checkpoint:
        weights = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
    decoder = Decoder(config)
    try:
        decoder.load_state_dict(upgrade_state_dict(weights, config))
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None
    except (RuntimeError, KeyError) as e:  # its first line is a heading; the second names the first misfit
        detail = next((line.strip() for line in str(e).splitlines()[1:]), describe(e))[:200]
        raise PipelineError(
            f"{path}: its weights do not fit its model ({detail}); the file is damaged or was "
            "edited: use another checkpoint"
        ) from None
    if not all(t.isfinite().all() for t in decoder.state_dict().values() if t.is_floating_point()):
        raise PipelineError(
            f"{path}: its weights hold nan or inf values (training diverged, or the file was "
            "edited); use another checkpoint"
        )
    if len(checkpoint["vocab"]) != config.vocab_size:
        raise PipelineError(
            f"{path}: its vocabulary has {len(checkpoint['vocab'])} words, its model "
            f"{config.vocab_size}; the file is damaged or was edited: use another checkpoint"
        )
    return decoder, Vocabulary(checkpoint["vocab"])
