"""The captioner in a person's hands: the three commands as written in a fresh copy of the
repository, and the Python API."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import pil_to_tensor

import cli
from pipeline import Captioner
from pipeline.features.datasets import draw_synthetic, synthetic_captions, synthetic_scene
from pipeline.io.errors import PipelineError

from conftest import ROOT


def _images(root, n=3):
    return sorted((root / "images").glob("*.jpg"))[:n]


def _files(*folders) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in Path(f).rglob("*")}


def test_a_mixed_batch_captions_as_one_image_at_a_time_and_as_the_command(trained_run, tmp_path, monkeypatch):
    out, root = trained_run
    monkeypatch.chdir(tmp_path)  # where a stray relative write would land
    before = _files(out, root)
    checkpoint = out / "run" / "best.pt"
    captioner = Captioner.from_checkpoint(checkpoint)
    files = _images(root)
    mixed = [str(files[0]), Image.open(files[1]), pil_to_tensor(Image.open(files[2]).convert("RGB"))]
    batch = captioner(mixed, beam_size=3)
    alone = [captioner([image], beam_size=3)[0] for image in mixed]
    assert [c.text for c in batch] == [c.text for c in alone]
    command = CliRunner().invoke(cli.main, ["caption", *map(str, files), "--checkpoint", str(checkpoint)])
    assert command.exit_code == 0, command.output
    assert command.output.splitlines() == [f"{f}: {c.text}" for f, c in zip(files, batch)]
    grid = tuple(torch.load(checkpoint, weights_only=True)["features"]["grid"])
    for c in batch:
        assert c.tokens == c.text.split() and c.log_prob < 0
        assert c.attention.shape == (len(c.tokens), *grid)
        assert torch.allclose(c.attention.sum((1, 2)), torch.ones(len(c.tokens)), atol=1e-3)
    assert list(tmp_path.iterdir()) == [] and _files(out, root) == before  # nothing written unless asked
    figure = captioner.attention_figure(batch[0], tmp_path / "att.png")
    assert Image.open(figure).size[0] > 300


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        ("photo.jpg", {}, r"pass a list of images, even for one"),
        (
            [torch.zeros(3, 8, 8)],
            {},
            r"images\[0\]: a tensor image must be uint8 of shape \(3, H, W\).*got torch.float32",
        ),
        ([torch.zeros(8, 8, dtype=torch.uint8)], {}, r"images\[0\]: a tensor image must be uint8"),
        ([3.5], {}, r"images\[0\]: float is not an image; pass a file path, a PIL image or a uint8"),
        (["absent.jpg"], {}, r"absent.jpg: missing"),
        ([Image.new("RGB", (8, 8))], {"beam_size": 0}, r"`beam_size`: 0 is not in the range 1<=x<=100"),
        ([Image.new("RGB", (8, 8))], {"max_len": 1.5}, r"`max_len`: 1.5 is not an integer"),
        ([Image.new("RGB", (8, 8))], {"n": 2}, r"n: a call gives each image's best caption; for the n best"),
    ],
)
def test_bad_inputs_raise_one_documented_error(trained_run, images, kwargs, message):
    captioner = Captioner.from_checkpoint(trained_run[0] / "run" / "best.pt")
    with pytest.raises(PipelineError, match=message):
        captioner(images, **kwargs)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_n_best_refuses_a_count_that_is_not_one_or_more(trained_run, n):
    captioner = Captioner.from_checkpoint(trained_run[0] / "run" / "best.pt")
    with pytest.raises(PipelineError, match=rf"n={n!r}: give the number of captions per image, a whole number >= 1"):
        captioner.n_best([Image.new("RGB", (8, 8))], n=n)


def test_from_checkpoint_refuses_other_encoder_weights(trained_run, tmp_path):
    state = torch.load(trained_run[0] / "run" / "best.pt", weights_only=True)
    state["features"]["encoder"]["weights_sha256"] = "0" * 64
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(PipelineError, match="differ from those its features were made with"):
        Captioner.from_checkpoint(tmp_path / "other.pt")


def _fresh_copy(folder: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore) copied into ``folder``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


def _small_flickr8k(folder: Path, sizes=(("train", 24), ("dev", 5), ("test", 2))) -> None:
    """A corpus in the official Flickr8k layout: generated scenes, two captions each."""
    rng = random.Random(0)
    images, text = folder / "Flicker8k_Dataset", folder / "Flickr8k_text"
    images.mkdir(parents=True), text.mkdir()
    tokens = []
    for split, n in sizes:
        names = [f"{split}{k}.jpg" for k in range(n)]
        for name in names:
            scene = synthetic_scene(rng)
            draw_synthetic(scene, rng, size=300).save(images / name)
            tokens += [f"{name}#{c}\t{caption}" for c, caption in enumerate(synthetic_captions(scene))]
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(f"{n}\n" for n in names))
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")


def test_the_three_commands_as_written(tmp_path):
    """`make features DATASET=flickr8k`, `python cli.py train --attention hard` (plus size and epoch
    flags) and `python cli.py caption img.jpg`, in sequence, in a fresh copy holding a small
    Flickr8k corpus and VGG-19 weights where torchvision looks for them."""
    from torchvision import models

    repo = _fresh_copy(tmp_path / "repo")
    _small_flickr8k(repo / "data" / "flickr8k")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(models.vgg19().state_dict(), checkpoints / Path(models.VGG19_Weights.DEFAULT.url).name)
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    shutil.copy(repo / "data" / "flickr8k" / "Flicker8k_Dataset" / "test0.jpg", repo / "img.jpg")

    def run(*args):
        done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run("make", "features", "DATASET=flickr8k")
    assert (repo / "data" / "features" / "flickr8k-vgg19" / "manifest.json").is_file()
    run(
        sys.executable,
        "cli.py",
        "train",
        "--attention",
        "hard",
        "--epochs",
        "1",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        "--no-progress",
    )
    caption = run(sys.executable, "cli.py", "caption", "img.jpg")
    # one line per image; a decoder trained for one step may end its caption at once, so words are not required
    assert re.fullmatch(r"img\.jpg: [a-z' ]*\n", caption.stdout), caption.stdout
    assert "using data/runs/flickr8k-vgg19-hard/best.pt (the newest best.pt under data/runs)" in caption.stderr


def test_export_then_from_pretrained_captions_as_the_checkpoint(trained_run, tmp_path):
    out, root = trained_run
    checkpoint = out / "run" / "best.pt"
    result = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    model = tmp_path / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "README.md",
        "config.json",
        "encoder.safetensors",
        "model.safetensors",
        "vocab.json",
    ]
    for path in model.iterdir():  # no pickle: safetensors, JSON and Markdown only
        head = path.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"PK"), path
    files = _images(root, 4)
    expected = [c.text for c in Captioner.from_checkpoint(checkpoint)(files)]
    assert [c.text for c in Captioner.from_pretrained(model)(files)] == expected
    command = CliRunner().invoke(cli.main, ["caption", str(files[0]), "--model", str(model)])
    assert command.exit_code == 0 and command.output == f"{files[0]}: {expected[0]}\n", command.output
    card = (model / "README.md").read_text()
    assert "Show, Attend and Tell" in card and "Captioner.from_pretrained" in card
    again = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(model)])
    assert again.exit_code == 0  # its own earlier export may be replaced
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k not in ("written_by", "files")})
    )
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # a Hub clone's
    legacy = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(model)])
    assert legacy.exit_code == 0, legacy.output  # an export of earlier versions (no SHA-256 record) is replaced
    assert (model / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"
    (model / "README.md").write_text(card + "\nMy notes.\n")  # a model card edited before a Hub push
    edited = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(model)])
    assert edited.exit_code == 2 and "README.md: exists and was not written by `cli.py export`" in edited.output
    assert (model / "README.md").read_text().endswith("My notes.\n")


def test_export_names_each_evaluation_and_refuses_what_is_not_its_own(trained_run, tmp_path):
    out, _ = trained_run
    checkpoint = Path(shutil.copy(out / "run" / "best.pt", tmp_path / "best.pt"))
    for name, bleu4 in (("test-beam3", 20.0), ("test-beam3-lp0", 19.0)):  # as `evaluate` names them
        record = {"split": "test", "beam_size": 3, "scores": {"BLEU-4": bleu4}}
        (tmp_path / f"best-{name}.scores.json").write_text(json.dumps(record))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(mine)])
    assert refused.exit_code == 2 and "mine: holds files that `cli.py export` did not write" in refused.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    model = tmp_path / "model"
    assert CliRunner().invoke(cli.main, ["export", "--checkpoint", str(checkpoint), "--out", str(model)]).exit_code == 0
    scores = json.loads((model / "config.json").read_text())["scores"]
    assert scores == {"test-beam3": {"BLEU-4": 20.0}, "test-beam3-lp0": {"BLEU-4": 19.0}}
    card = (model / "README.md").read_text()
    assert "| test-beam3 | nan | 20.0 |" in card and "| test-beam3-lp0 | nan | 19.0 |" in card
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    with pytest.raises(PipelineError, match=r"missing or malformed 'dtype'; export it again"):
        Captioner.from_pretrained(model)
    (model / "config.json").write_text(json.dumps(config))
    trunk = load_file(str(model / "encoder.safetensors"))
    first = next(iter(trunk))
    save_file(dict(trunk, **{first: trunk[first] + 1}), str(model / "encoder.safetensors"))
    with pytest.raises(PipelineError, match=r"encoder.safetensors does not hold the squeezenet1_1 weights"):
        Captioner.from_pretrained(model)


def test_from_pretrained_says_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="not a model folder written by `cli.py export`"):
        Captioner.from_pretrained(tmp_path / "empty")
    with pytest.raises(PipelineError, match="could not be had from the Hugging Face Hub"):
        Captioner.from_pretrained("nobody-here/no-such-model")  # no network here: the hub client's error, worded


def test_an_export_killed_while_it_replaces_files_is_no_model_until_rerun(trained_run, tmp_path, monkeypatch):
    """config.json is rewritten first without its format and last with it: an export stopped in
    between (here by an error at its second file) leaves a folder that loads as no model, and a
    rerun, which finds only files it wrote, completes it."""
    import pipeline.io.folders
    from pipeline.captioner import export_model

    checkpoint, model = trained_run[0] / "run" / "best.pt", tmp_path / "model"
    args = ["export", "--checkpoint", str(checkpoint), "--out", str(model)]
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    real, calls = pipeline.io.folders.atomic_path, []

    def dies_at_the_second_file(path):
        calls.append(path)
        if len(calls) == 2:  # after the pending config.json and model.safetensors
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(pipeline.io.folders, "atomic_path", dies_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        export_model(checkpoint, model)
    monkeypatch.setattr(pipeline.io.folders, "atomic_path", real)
    with pytest.raises(PipelineError, match="not a model folder written by `cli.py export`"):
        Captioner.from_pretrained(model)
    assert CliRunner().invoke(cli.main, args).exit_code == 0
    assert Captioner.from_pretrained(model).vocab.words == Captioner.from_checkpoint(checkpoint).vocab.words


def test_a_checkpoints_damaged_record_of_its_features_is_named(trained_run):
    from pipeline.checkpoint import load_checkpoint

    path = trained_run[0] / "run" / "best.pt"
    for edit, problem in (
        (lambda f: f.pop("grid"), r"missing or malformed 'grid', 'L'"),
        (lambda f: f["encoder"].update(weights=7), r"malformed 'encoder'"),
        (lambda f: f["preprocess"].update(mode="stretch"), r"malformed 'preprocess' \(PipelineError: .*stretch"),
    ):
        checkpoint = load_checkpoint(path)
        edit(checkpoint["features"])
        with pytest.raises(
            PipelineError, match=rf"best.pt: its record of the features' making has {problem}.*use another"
        ):
            Captioner.from_checkpoint(path, checkpoint=checkpoint)
