"""Watching a training run: TensorBoard scalars and attention figures, and ``curves.png``.

Each epoch, :class:`Monitor` writes into ``RUN/tensorboard`` (torch.utils.tensorboard) the
numbers of that epoch's metrics.jsonl line that :func:`tag` names (each one scalar),
under the tag ``train/...``, ``SPLIT/...`` or ``run/...`` at step = epoch, and the attention figure
of the first validation image as decoded after that epoch; and it rewrites ``RUN/curves.png``
(training loss, validation BLEU-4 and CIDEr-D by epoch) for those who do not run TensorBoard.
``make tensorboard RUN=...`` opens the board.
"""

import json
from pathlib import Path

from PIL import Image

from ..features.images import Preprocess, open_rgb
from ..io.errors import PipelineError
from ..plots import attention_plot, training_curves

CURVES, BOARD = "curves.png", "tensorboard"  # in the run folder
TAGS = {
    "loss": "train/loss",
    "nll": "train/nll_per_caption",
    "doubly_stochastic": "train/doubly_stochastic",
    "beta": "train/gating_beta",
    "reward": "train/scst_reward_cider_d",
    "greedy_reward": "train/scst_greedy_reward_cider_d",
    "reference_nll": "train/scst_reference_nll_per_word",
    "reward_rms": "train/reinforce_reward_rms",
    "baseline": "train/reinforce_baseline",
    "lr": "run/learning_rate",
    "captions_per_s": "run/captions_per_s",
    "seconds": "run/epoch_seconds",
}


def tag(name: str, split: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl field (None for those that are not one scalar)."""
    if name in TAGS:
        return TAGS[name]
    if name in (f"{split}_bleu4", f"{split}_cider"):
        return f"{split}/{name.removeprefix(split + '_')}"
    if name == "attention_entropy":
        return f"{split}/attention_entropy_nats"
    return None


def figure_image(path, preprocess: dict) -> Image.Image:
    """The image at ``path`` as the encoder saw it, or a grey square where it cannot be read
    (features made without image files, or moved since)."""
    try:
        return Preprocess(**preprocess).crop()(open_rgb(path))
    except (PipelineError, TypeError):
        return Image.new("RGB", (224, 224), (128, 128, 128))


class Monitor:
    """TensorBoard (``tensorboard``: whether to write it) and curves.png of the run folder ``out``.

    resume_epoch: the epochs already done; TensorBoard drops what an earlier, killed process
    logged past them, so a resumed run's board holds each epoch once."""

    def __init__(self, out: Path, split: str, tensorboard: bool, resume_epoch: int = 0):
        self.out, self.split, self.writer = Path(out), split, None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / BOARD), purge_step=resume_epoch + 1)

    def epoch(self, record: dict, figure: tuple | None = None) -> None:
        """Log one epoch's metrics.jsonl ``record`` (already written) and, where given, the
        attention ``figure`` = (image, words, alpha (T, L), grid) of its first validation image."""
        if self.writer is not None:
            for name, value in record.items():
                if tag(name, self.split) and value is not None:
                    self.writer.add_scalar(tag(name, self.split), value, record["epoch"])
            if figure is not None:
                self.writer.add_figure(f"{self.split}/attention_first_image", attention_plot(*figure), record["epoch"])
            self.writer.flush()
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        training_curves(records, self.split, self.out / CURVES)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
