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


def attention_figure(image, words: list[str], alpha: torch.Tensor, grid: tuple[int, int], path, columns: int = 5) -> None:
    """Save the figure as PNG at ``path`` (atomically).

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
        weight = upsample(alpha[t], grid, pixels.shape[:2])[..., None]
        ax.imshow((pixels * (0.15 + 0.85 * weight)).astype(np.uint8))  # unattended regions darkened
        ax.set_title(word, fontsize=11)
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
