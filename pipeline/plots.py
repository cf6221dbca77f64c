"""The attention figure of the paper's Figures 2 and 3: the image, then one panel per word with
its attention weights alpha_t upsampled to the image, the unattended regions darkened."""

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .folders import OWNER  # noqa: E402

MARK = {"Software": f"{OWNER} attention figure"}  # a PNG text chunk: how a rerun knows the file is its own


def upsample(alpha: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """alpha: (L,) weights of an h x w grid (row by row) -> (H, W) map, bilinear, scaled to [0, 1]."""
    a = alpha.detach().float().cpu().view(1, 1, *grid)
    up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up / up.max().clamp_min(1e-12)).numpy()


def attention_overlay(image, alpha: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """image (PIL RGB) with the regions that alpha (L,) attends least darkened: the attention
    map, upsampled and scaled to its maximum, as brightness."""
    pixels = np.asarray(image)
    weight = upsample(alpha, grid, pixels.shape[:2])[..., None]
    return Image.fromarray((pixels * (0.15 + 0.85 * weight)).astype(np.uint8))


def attention_plot(image, words: list[str], alpha: torch.Tensor, grid: tuple[int, int], columns: int = 5):
    """The matplotlib figure: the image with the whole caption as its title, then one panel per
    word with its attention map over the image (the caller closes it).

    image: PIL RGB image as the encoder saw it (after resize/crop); words: the caption;
    alpha: (T, L) attention weights, row t for words[t] (T >= len(words)); grid: (h, w) with h*w = L.
    """
    panels = len(words) + 1
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    pixels = np.asarray(image)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title(textwrap.fill(" ".join(words), 34), fontsize=8)
    for t, word in enumerate(words):
        ax = axes.flat[t + 1]
        ax.imshow(attention_overlay(image, alpha[t], grid))
        ax.set_title(word, fontsize=11)
    fig.tight_layout()
    return fig


def attention_figure(image, words: list[str], alpha: torch.Tensor, grid: tuple[int, int], path) -> None:
    """Save :func:`attention_plot` as PNG at ``path`` (atomically), marked as this pipeline's."""
    fig = attention_plot(image, words, alpha, grid)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata=MARK)
    plt.close(fig)


def training_curves(records: list[dict], split: str, path) -> None:
    """Save the training curves as PNG at ``path`` (atomically): the training loss and the
    validation BLEU-4 by epoch. records: metrics.jsonl's lines (dicts with 'epoch', 'loss' and
    f'{split}_bleu4')."""
    epochs = [r["epoch"] for r in records]
    fig, (loss, bleu) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss.plot(epochs, [r["loss"] for r in records], marker="o")
    loss.set(xlabel="epoch", ylabel="training loss (per caption)")
    bleu.plot(epochs, [r[f"{split}_bleu4"] for r in records], marker="o", color="tab:green")
    bleu.set(xlabel="epoch", ylabel=f"{split} BLEU-4 (%)")
    for ax in (loss, bleu):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata=MARK)
    plt.close(fig)


def is_attention_figure(path) -> bool:
    """Whether ``path`` is a PNG that :func:`attention_figure` wrote (it carries ``MARK``)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == MARK["Software"]
    except (OSError, SyntaxError, ValueError):
        return False
