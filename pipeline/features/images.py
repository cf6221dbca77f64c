"""From an image file to the encoder's input: opening it safely (:func:`open_rgb`), the
preprocessing each encoder's weights were trained with (:class:`Preprocess`: resize, crop,
normalisation, as torchvision's weights carry their transforms), and the Dataset that decodes a
run's images in batches (:class:`ImageFiles`)."""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as transforms

from ..io.errors import PipelineError, PipelineWarning, param
from .datasets import Record

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(PipelineError):
    """An image file that cannot be used; ``reason`` says why in a few words."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def open_rgb(path) -> Image.Image:
    """Decode an image file to 8-bit RGB, whatever its format and mode.

    EXIF orientation is applied; greyscale (8/16-bit), CMYK and palette images are converted;
    transparency is composited onto white. Images over PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels) are refused.

    Raises ImageError (missing, empty, not an image, truncated or corrupt, too large).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:  # checked here: warning filters are per process
                raise ImageError(
                    path,
                    f"too large to decode safely ({img.width} x {img.height} pixels; the limit is "
                    f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels)",
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise ImageError(path, "missing (no such file)") from None
    except IsADirectoryError:
        raise ImageError(path, "a folder, not an image file") from None
    except PermissionError:
        raise ImageError(path, "not readable (permission denied)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:  # Image.open's own refusal, at twice the limit
        raise ImageError(path, f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"truncated or corrupt image data ({e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB: high bit-depth greyscale rescaled to its range,
    transparency composited onto white, everything else converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit-depth greyscale
        a = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.uint8(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-6)))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def bound_aspect(image: Image.Image, ratio: float = 2.0) -> Image.Image:
    """The centre of ``image`` with its long side cut to at most ``ratio`` times its short side.

    Resizing the short side of a 1 x 80,000,000-pixel image to 256 would make an image of 20
    billion pixels, of which the centre crop keeps a square; this keeps everything that square
    covers (it spans 224/256 of the short side) and bounds the resized image to
    256 x 256 * ``ratio`` pixels. Images within the ratio are returned as they are."""
    w, h = image.size
    longest = math.ceil(min(w, h) * ratio)
    if max(w, h) <= longest:
        return image
    return transforms.functional.center_crop(image, [min(h, longest), min(w, longest)])


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the encoder's input tensor (3, image_size, image_size).

    mode 'center-crop': shorter side resized to ``resize`` pixels, then a centre crop of
    image_size (torchvision's convention); 'resize': direct resize to a square (keeps the whole
    image, squashing its aspect ratio). Then RGB scaled to [0, 1] and normalised by ``mean`` and
    ``std`` (per channel).
    resize: None for image_size * 256/224 (256 for 224: the paper's and VGG's weights'); an
    encoder whose weights were trained otherwise gives its own (:func:`preprocess_for`), as it
    gives its ``interpolation`` ('bilinear' or 'bicubic') and normalisation (ImageNet's mean and
    std by default; EfficientNet-Lite's weights want mean = std = 0.5, i.e. RGB in [-1, 1]).
    Raises PipelineError for an unknown mode or interpolation, or a mean or std that is not three
    numbers (std positive).
    """

    mode: str = "center-crop"
    image_size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.mode not in ("center-crop", "resize"):
            raise PipelineError(f"unknown preprocessing {self.mode!r}; choose center-crop or resize")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise PipelineError(f"unknown interpolation {self.interpolation!r}; choose bilinear or bicubic")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not (
                isinstance(value, list | tuple)
                and len(value) == 3
                and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
            ) or (key == "std" and min(value) <= 0):
                raise PipelineError(f"preprocessing {key} must be three numbers (std positive), not {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))  # a manifest's JSON list reads as a tuple

    def crop(self):
        """The torchvision transform of the geometry: PIL image -> PIL image (image_size square).
        For 'center-crop', an image longer than twice its width (or the reverse) first loses what
        the centre crop would drop anyway (:func:`bound_aspect`), so memory stays bounded whatever
        its shape."""
        if self.mode == "center-crop":
            return transforms.Compose(
                [
                    transforms.Lambda(bound_aspect),
                    transforms.Resize(self.resize or round(self.image_size * 256 / 224), self._interpolation()),
                    transforms.CenterCrop(self.image_size),
                ]
            )
        return transforms.Resize((self.image_size, self.image_size), self._interpolation())

    def _interpolation(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def pixels(self):
        """PIL RGB image -> (3, image_size, image_size) uint8 tensor: the part done per image (in
        DataLoader workers); uint8 is a quarter of float32 to pass between processes."""
        return transforms.Compose([self.crop(), transforms.PILToTensor()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> float32 scaled to [0, 1] and normalised by ``mean`` and ``std``
        (done on whole batches, on the encoder's device)."""
        return transforms.functional.normalize(
            transforms.functional.to_dtype(images, torch.float32, scale=True), self.mean, self.std
        )

    def transform(self):
        """PIL RGB image -> (3, image_size, image_size) float encoder input: ``pixels`` then ``normalize``."""
        pixels = self.pixels()
        return lambda image: self.normalize(pixels(image))

    def border_warning(self, paths, sample: int = 8) -> PipelineWarning | None:
        """A warning when 'center-crop' would cut the borders off images that are already
        image_size squares (a corpus resized beforehand, as ../shared's copy of Flickr8k): the
        first ``sample`` of ``paths`` that open (their headers only) all are. None otherwise, and
        always for 'resize'. (docs/benchmarks.md, "Figures behind the code's choices", compares
        the two on that copy.)"""
        if self.mode != "center-crop":
            return None
        size, opened = self.image_size, []
        for path in paths:
            if len(opened) == sample:
                break
            try:
                with Image.open(path) as img:
                    opened.append((path, img.size))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue  # reported as a bad image when it is decoded
        if not opened or any(s != (size, size) for _, s in opened):
            return None
        enlarged = self.resize or round(size * 256 / 224)
        kept = round(size * size / enlarged)
        return PipelineWarning(
            f"{opened[0][0]} and the next images are already {size}x{size} pixels: "
            f"{param('preprocess', 'center-crop')} enlarges each to {enlarged} and keeps its central {kept}x{kept} "
            f"pixels; {param('preprocess', 'resize')} keeps them whole"
        )

    def to_dict(self) -> dict:
        """As the manifest records it: ``resize``, ``interpolation``, ``mean`` and ``std`` only where
        they are not the defaults, so a record without them (every record before these fields) reads
        as the same preprocessing."""
        default = Preprocess()
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k in ("mode", "image_size") or v != getattr(default, k)
        }


class ImageFiles(Dataset):
    """Decodes, resizes and crops images, in DataLoader workers or in the main process.

    Item i -> (i, image (3, S, S) uint8 or None, reason str or None); a bad image gives None and
    its reason instead of an exception, so one bad file does not stop the run. In the main
    process a batch's images are decoded by as many threads as the encoder computes on
    (``torch.get_num_threads()``; PIL releases the GIL while it decodes and resizes), as the
    encoder is idle meanwhile.
    """

    def __init__(self, records: list[Record], transform):
        self.records, self.transform = records, transform
        self._threads = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_rgb(self.records[i].image_path)), None
        except ImageError as e:
            return i, None, e.reason

    def __getitems__(self, indices: list[int]) -> list:
        """A batch of items (DataLoader's batched fetch)."""
        if get_worker_info() is not None:  # a worker process: one of several already
            return [self[i] for i in indices]
        if self._threads is None:
            self._threads = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="decode")
        return list(self._threads.map(self.__getitem__, indices))

    def __getstate__(self):  # to worker processes, without the thread pool
        return dict(self.__dict__, _threads=None)


def lower_priority(_worker_id: int) -> None:
    """Decoding workers yield the CPU to the encoder's threads, whose parallel regions would
    otherwise stall whenever a worker takes one of their cores."""
    os.nice(10)


def collate(items):
    """DataLoader's collate of :class:`ImageFiles` items: (indices of the decoded images, their
    images stacked (B, 3, S, S) uint8 or None if none was, [(index, reason) of those that failed])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad
