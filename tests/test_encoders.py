import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.features.encoders import build_encoder, state_sha256
from pipeline.features.images import ImageError, Preprocess, open_rgb
from pipeline.io.errors import PipelineError

from conftest import SQUEEZENET_WEIGHTS, need_shared


def _jpeg(path, size=(64, 48), colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path, format="JPEG", quality=90)
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_text("this is a caption, not a picture\n"), "not an image"),
        (lambda p: None, "missing"),
        (lambda p: p.write_bytes(_jpeg(p, (300, 200)).read_bytes()[:1500]), "truncated or corrupt"),
        (lambda p: p.mkdir(), "a folder, not an image file"),
    ],
)
def test_unusable_images_raise_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError, match=re.escape(reason)) as e:
        open_rgb(path)
    assert e.value.path == path and str(path) in str(e.value)


@pytest.mark.parametrize("side", [120, 250])  # past the limit (PIL warns), past twice the limit (PIL refuses)
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side):
    path = _jpeg(tmp_path / "big.jpg", (side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="too large to decode safely"):
        open_rgb(path)


def test_modes_become_rgb(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.new("L", (10, 8), 77).save(grey)
    assert open_rgb(grey).mode == "RGB" and open_rgb(grey).getpixel((5, 4))[0] in range(75, 80)
    cmyk = _jpeg(tmp_path / "cmyk.jpg", (10, 8), (0, 255, 255, 0), mode="CMYK")  # pure red in CMYK
    r, g, b = open_rgb(cmyk).getpixel((5, 4))
    assert r > 200 and g < 60 and b < 60
    rgba = Image.new("RGBA", (10, 8), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: must become white, not black
    rgba.save(tmp_path / "alpha.png")
    img = open_rgb(tmp_path / "alpha.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((5, 5)) == (0, 0, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert open_rgb(tmp_path / "pal.png").getpixel((1, 1)) == (0, 255, 0)
    deep = Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)).convert("I;16")
    deep.putpixel((0, 0), 0)
    deep.save(tmp_path / "deep.png")
    img = open_rgb(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)


@pytest.mark.parametrize("mode, size", [("center-crop", (500, 375)), ("resize", (500, 375)), ("center-crop", (30, 90))])
def test_preprocess_gives_square_normalised_tensor(mode, size):
    x = Preprocess(mode, 224).transform()(Image.new("RGB", size, (124, 116, 104)))
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.02  # the ImageNet mean colour maps to ~0


def test_center_crop_keeps_the_middle_and_resize_keeps_the_borders():
    img = Image.new("RGB", (448, 224), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 224))  # a white band at the left edge
    crop, squash = Preprocess("center-crop").transform()(img), Preprocess("resize").transform()(img)
    assert crop[0, :, 0].mean() < 0 < squash[0, :, 0].mean()


def test_centre_crops_of_images_already_at_the_input_size_are_warned_of(tmp_path):
    squares = [_jpeg(tmp_path / f"{n}.jpg", (224, 224)) for n in range(3)]
    (tmp_path / "bad.jpg").write_text("not an image")
    warning = str(Preprocess("center-crop").border_warning([tmp_path / "bad.jpg", *squares]))
    assert warning.startswith(f"{squares[0]} and the next images are already 224x224 pixels")
    assert "enlarges each to 256 and keeps its central 196x196 pixels" in warning
    assert (
        str(Preprocess("center-crop", 224, 232).border_warning(squares)).count("232 and keeps its central 216x216") == 1
    )
    assert Preprocess("resize").border_warning(squares) is None  # nothing is cut
    assert Preprocess("center-crop", 256).border_warning(squares) is None  # not the input size
    larger = _jpeg(tmp_path / "larger.jpg", (500, 375))
    assert Preprocess("center-crop").border_warning([*squares, larger]) is None  # a corpus of mixed sizes
    assert Preprocess("center-crop").border_warning([tmp_path / "bad.jpg"]) is None


@pytest.mark.parametrize(
    "name, grid",
    [("squeezenet1_1", (13, 13, 512)), ("vgg19", (14, 14, 512)), ("vgg16", (14, 14, 512)), ("resnet101", (7, 7, 2048))],
)
def test_encoder_grids(name, grid):
    encoder = build_encoder(name, "random")
    assert encoder.grid(224) == grid
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training


def test_annotations_are_the_feature_map_read_row_by_row():
    encoder = build_encoder("squeezenet1_1", "random")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fmap, a = encoder.trunk(x), encoder(x)
    assert a.shape == (2, 169, 512)
    r, c = 4, 9
    torch.testing.assert_close(a[:, r * 13 + c], fmap[:, :, r, c])


def test_random_weights_are_seeded():
    assert state_sha256(build_encoder("squeezenet1_1", "random")) == state_sha256(
        build_encoder("squeezenet1_1", "random")
    )


def test_weights_file_with_features_keys_only():
    path = need_shared(SQUEEZENET_WEIGHTS)
    encoder = build_encoder("squeezenet1_1", str(path))
    sd = torch.load(path, weights_only=True)
    torch.testing.assert_close(encoder.trunk[0].weight, sd["features.0.weight"])
    assert encoder.describe()["weights"] == str(path.resolve())
    assert encoder.weights_sha256 != build_encoder("squeezenet1_1", "random").weights_sha256


def test_whole_model_state_dict_and_bad_weight_files(tmp_path):
    from torchvision import models

    torch.save(models.squeezenet1_1().state_dict(), tmp_path / "whole.pth")
    build_encoder("squeezenet1_1", str(tmp_path / "whole.pth"))
    torch.save(models.squeezenet1_1().state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(PipelineError, match="wrong.pth: weights do not fit"):
        build_encoder("vgg19", str(tmp_path / "wrong.pth"))
    partial = {k: v for k, v in models.squeezenet1_1().state_dict().items() if not k.startswith("features.12")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(PipelineError, match="missing.*features.12"):
        build_encoder("squeezenet1_1", str(tmp_path / "partial.pth"))
    torch.save({"a": object}, tmp_path / "pickle.pth")  # needs arbitrary unpickling: refused
    with pytest.raises(PipelineError, match="pickle.pth: not a loadable state dict with weights_only=True"):
        build_encoder("squeezenet1_1", str(tmp_path / "pickle.pth"))
    with pytest.raises(PipelineError, match="no such weights file"):
        build_encoder("squeezenet1_1", str(tmp_path / "absent.pth"))
    with pytest.raises(PipelineError, match="unknown encoder"):
        build_encoder("alexnet", "random")


def test_imagenet_without_network_or_cache_says_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(
        PipelineError, match=r"ImageNet weights for squeezenet1_1 are not cached at .*`weights='random'`"
    ):
        build_encoder("squeezenet1_1", "imagenet")
    cached = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"PK\x03\x04 cut short")  # a download interrupted, or a bad copy
    with pytest.raises(PipelineError, match=r"are cached at .*squeezenet1_1-b8a52dc0.pth but cannot be read .*delete"):
        build_encoder("squeezenet1_1", "imagenet")


@pytest.mark.parametrize("name", ["vgg19", "resnet101", "squeezenet1_1"])
def test_preprocessing_is_the_weights_own(name):
    """The encoder's input is what its ImageNet weights were trained on: torchvision's own
    transforms of the default weights (ResNet's IMAGENET1K_V2 resizes to 232, not 256)."""
    from pipeline.features.encoders import ENCODERS, preprocess_for

    image = Image.effect_noise((300, 260), 60).convert("RGB")
    ours = preprocess_for(name).transform()(image)
    theirs = ENCODERS[name].weights.transforms()(image)
    assert torch.allclose(ours, theirs, atol=1e-5)
