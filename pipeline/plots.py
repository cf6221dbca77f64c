"""The attention figure of the paper's Figures 2 and 3: the image, then one panel per word with
its attention weights alpha_t upsampled to the image, the unattended regions darkened."""

import math
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # figures drawn off screen, whatever pyplot's backend (none chosen here)
from PIL import Image

from .io.atomic import atomic_path
from .io.folders import OWNER

MARK = {"Software": f"{OWNER} attention figure"}  # a PNG text chunk: how a rerun knows the file is its own
CURVES_MARK = {"Software": f"{OWNER} training curves"}  # not an attention figure: `caption` may not replace it


def upsample(alpha: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """alpha: (L,) weights of an h x w grid (row by row) -> (H, W) map, bilinear, stretched to
    [0, 1] from its minimum to its maximum (so that a map close to uniform still shows where it
    peaks; its sharpness is in the figure's numbers, not its contrast)."""
    a = alpha.detach().float().cpu().view(1, 1, *grid)
    up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = up.min(), up.max()
    return ((up - low) / (high - low).clamp_min(1e-12)).numpy()


def attention_overlay(image, alpha: torch.Tensor, grid: tuple[int, int]) -> Image.Image:
    """image (PIL RGB) with the regions that alpha (L,) attends least darkened: the attention
    map, upsampled and stretched from its minimum to its maximum, as brightness."""
    pixels = np.asarray(image)
    weight = upsample(alpha, grid, pixels.shape[:2])[..., None]
    return Image.fromarray((pixels * (0.15 + 0.85 * weight)).astype(np.uint8))


def attention_plot(image, words: list[str], alpha: torch.Tensor, grid: tuple[int, int], columns: int = 5):
    """The matplotlib figure: the whole caption as its title, the image, then one panel per word
    with its attention map over the image (each stretched to its own range) and, under the word,
    the largest weight max_i alpha_ti (1/L when uniform). A bare ``Figure``, not one of pyplot's:
    nothing to close.

    image: PIL RGB image as the encoder saw it (after resize/crop); words: the caption;
    alpha: (T, L) attention weights, row t for words[t] (T >= len(words)); grid: (h, w) with h*w = L.
    """
    panels = len(words) + 1
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    pixels = np.asarray(image)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pixels)
    title = textwrap.fill(" ".join(words), 16 * columns)
    fig.suptitle(title, fontsize=11)
    for t, word in enumerate(words):
        ax = axes.flat[t + 1]
        ax.imshow(attention_overlay(image, alpha[t], grid))
        ax.set_title(f"{word}\nmax alpha {alpha[t].max().item():.3f}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * (title.count("\n") + 1) / (2.6 * rows)))
    return fig


def attention_figure(image, words: list[str], alpha: torch.Tensor, grid: tuple[int, int], path) -> None:
    """Save :func:`attention_plot` as PNG at ``path`` (atomically), marked as this pipeline's."""
    _save(attention_plot(image, words, alpha, grid), path, MARK)


def _save(fig, path, mark: dict) -> None:
    """Save ``fig`` as PNG at ``path`` (atomically) with ``mark`` in its metadata."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata=mark)


def training_curves(records: list[dict], split: str, path) -> None:
    """Save the training curves as PNG at ``path`` (atomically): the training loss, the
    validation BLEU-4 and CIDEr-D by epoch. records: metrics.jsonl's lines (dicts with 'epoch',
    'loss', f'{split}_bleu4' and f'{split}_cider', the last absent from runs of earlier versions)."""
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(13, 3.2))
    axes = fig.subplots(1, 3)
    curves = [("loss", "training loss (per caption)"), (f"{split}_bleu4", f"{split} BLEU-4 (%)")]
    curves.append((f"{split}_cider", f"{split} CIDEr-D (%)"))
    for ax, (key, label), color in zip(axes, curves, ("tab:blue", "tab:green", "tab:purple")):
        ax.plot(epochs, [r.get(key, float("nan")) for r in records], marker="o", color=color)
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, CURVES_MARK)


def is_attention_figure(path) -> bool:
    """Whether ``path`` is a PNG that :func:`attention_figure` wrote (it carries ``MARK``)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == MARK["Software"]
    except (OSError, SyntaxError, ValueError):
        return False
