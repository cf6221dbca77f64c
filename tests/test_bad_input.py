"""Bad input: the kinds tried across the adapters, `features`, `train`, `evaluate` and `caption`,
and what each gets.

Each case builds its input under a fresh folder and returns the command line to run (in-process,
through click) and a regular expression the message must match. Every case must end with one line
that names the input and says what to do, the exit status given, no traceback, and every file
that existed before the command (the trained run's included) unchanged.
"""
import hashlib
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import karpathy_json, tiny_flickr8k

import cli


def _features_cmd(tmp, *args):
    return ["features", "--encoder", "squeezenet1_1", "--weights", "random", "--workers", "0", "--no-progress",
            "--out", str(tmp / "out"), *args]


def _small_corpus(root):
    """Options reading the small synthetic corpus (conftest's) through its Karpathy json."""
    return ["--dataset", "karpathy", "--karpathy-json", str(root / "dataset_synthetic.json"), "--image-dir", str(root)]


def _flickr8k(tmp, lines, splits=None):
    return _features_cmd(tmp, "--dataset", "flickr8k", "--data-dir", str(tiny_flickr8k(tmp, lines, splits)))


def _karpathy(tmp, images, root=None):
    return _features_cmd(tmp, "--dataset", "karpathy", "--karpathy-json", str(karpathy_json(tmp, images)),
                         "--image-dir", str(root or tmp))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _pickle(path, obj):
    """``obj`` saved with torch.save (full pickling)."""
    torch.save(obj, path)
    return path


def _copy_features(run, tmp, edit=None):
    """A copy of the trained run's features folder, its manifest changed by ``edit``."""
    folder = shutil.copytree(run / "features", tmp / "features")
    if edit:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _checkpoint(run, tmp, edit):
    """A copy of the trained run's best.pt with its state changed by ``edit``."""
    state = torch.load(run / "run" / "best.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp / "edited.pt")
    return tmp / "edited.pt"


def _png_header(path, width, height):
    """A PNG whose header claims width x height pixels (its pixel data is absent)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                      for kind, data in ((b"IHDR", ihdr), (b"IDAT", b""), (b"IEND", b"")))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


class Pickled:
    """An object that only full unpickling can rebuild."""


def _resume_with_another_vocabulary(tmp, run):
    """A copy of the trained run, to be resumed on features whose vocabulary lost its last word."""
    shutil.copytree(run / "run", tmp / "run")
    features = _copy_features(run, tmp)
    words = json.loads((features / "vocab.json").read_text())["words"]
    (features / "vocab.json").write_text(json.dumps({"words": words[:-1]}))
    return _train(features, tmp / "run", "--resume", "--epochs", "2")


def _caption(run, image):
    return ["caption", str(image), "--checkpoint", str(run / "run" / "best.pt")]


def _evaluate(checkpoint, *args):
    return ["evaluate", "--checkpoint", str(checkpoint), "--no-progress", *args]


def _train(features, out, *args):
    return ["train", "--features", str(features), "--out", str(out), "--epochs", "1", "--no-progress",
            "--embed-dim", "16", "--hidden-dim", "32", "--attention-dim", "16", *args]


def _first_image(root):
    return sorted((root / "images").glob("*.jpg"))[0]


# (id, build(tmp, run, root) -> (args, regex of the message), exit status); the case named
# 'evaluate-without-java' runs with a PATH that holds no java
CASES = [
    # -- dataset adapters -------------------------------------------------------------------------
    ("flickr8k-line-without-tab", lambda t, r, i: (
        _flickr8k(t, ["a.jpg#0\tA dog .", "a.jpg#1 no tab", "b.jpg#0\tx"]),
        r"Flickr8k.token.txt:2: expected 'IMAGE.jpg#N<TAB>caption'"), 2),
    ("flickr8k-line-without-caption-number", lambda t, r, i: (
        _flickr8k(t, ["a.jpg\tA dog .", "b.jpg#0\tx"]), r"Flickr8k.token.txt:1: expected"), 2),
    ("flickr8k-empty-caption", lambda t, r, i: (
        _flickr8k(t, ["a.jpg#0\tA dog .", "a.jpg#1\t   ", "b.jpg#0\tx"]),
        r"Flickr8k.token.txt:2: empty caption for a.jpg; remove the line or add text"), 2),
    ("flickr8k-non-utf8-captions", lambda t, r, i: (
        _features_cmd(t, "--dataset", "flickr8k", "--data-dir", str(_write(
            tiny_flickr8k(t, []) / "Flickr8k_text" / "Flickr8k.token.txt", b"a.jpg#0\tcaf\xe9 au lait\n").parents[1])),
        r"Flickr8k.token.txt: not UTF-8 text .*re-save it as UTF-8"), 2),
    ("flickr8k-wrong-folder", lambda t, r, i: (
        _features_cmd(t, "--dataset", "flickr8k", "--data-dir", str(t)),
        r"Flickr8k.token.txt: missing caption file; point --data-dir at a folder laid out like"), 2),
    ("flickr8k-split-image-without-caption", lambda t, r, i: (
        _flickr8k(t, ["a.jpg#0\tA dog ."]), r"devImages.txt:1: b.jpg has no caption in .*Flickr8k.token.txt"), 2),
    ("flickr8k-image-in-two-splits", lambda t, r, i: (
        _flickr8k(t, ["a.jpg#0\tA dog ."], {"train": ["a.jpg"], "dev": ["a.jpg"], "test": []}),
        r"devImages.txt:1: a.jpg is listed twice across the split files"), 2),
    ("karpathy-unknown-split-name", lambda t, r, i: (
        _karpathy(t, [{"filename": "x.jpg", "split": "holdout", "sentences": [{"raw": "a"}]}]),
        r"dataset_coco.json: images\[0\] \(x.jpg\): unknown split 'holdout'; use one of restval, test, train, val"), 2),
    ("karpathy-entry-without-filename", lambda t, r, i: (
        _karpathy(t, [{"split": "train", "sentences": [{"raw": "a"}]}]),
        r"dataset_coco.json: images\[0\]: missing field 'filename'"), 2),
    ("karpathy-empty-caption", lambda t, r, i: (
        _karpathy(t, [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": " "}]}]),
        r"dataset_coco.json: images\[0\] \(x.jpg\): has an empty caption; fix or drop that sentence"), 2),
    ("karpathy-duplicate-image-id", lambda t, r, i: (
        _karpathy(t, [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": "a"}]}] * 2),
        r"dataset_coco.json: images\[1\]: duplicate image id x.jpg; each image must appear once"), 2),
    ("karpathy-not-json", lambda t, r, i: (
        _features_cmd(t, "--dataset", "karpathy", "--karpathy-json", str(_write(t / "dataset_coco.json", b"{")),
                      "--image-dir", str(t)),
        r"dataset_coco.json: not a Karpathy split json"), 2),
    ("karpathy-without-its-json", lambda t, r, i: (
        _features_cmd(t, "--dataset", "karpathy"), r"--dataset karpathy needs --karpathy-json FILE and --image-dir DIR"),
     2),
    # -- features ---------------------------------------------------------------------------------
    ("features-unknown-split", lambda t, r, i: (
        _features_cmd(t, *_small_corpus(i), "--splits", "train,holdout"),
        r"unknown split\(s\) holdout for karpathy; it has train, val, test"), 2),
    ("features-weights-needing-unpickling", lambda t, r, i: (
        _features_cmd(t, *_small_corpus(i), "--weights", str(_pickle(t / "w.pth", {"features.0.weight": Pickled()}))),
        r"w.pth: not a loadable state dict with weights_only=True"), 2),
    ("features-zero-byte-weights", lambda t, r, i: (
        _features_cmd(t, *_small_corpus(i), "--weights", str(_write(t / "w.pth", b""))),
        r"w.pth: not a loadable state dict"), 2),
    ("features-zero-shard-size", lambda t, r, i: (
        _features_cmd(t, *_small_corpus(i), "--shard-size", "0"),
        r"--shard-size must be at least 1"), 2),
    ("features-into-a-folder-of-other-settings", lambda t, r, i: (
        shutil.copytree(r / "features", t / "out") and _features_cmd(t, *_small_corpus(i), "--dtype", "float32"),
        r"out holds features made with a different dataset, dtype .*use another --out or delete it"), 2),
    # -- images ------------------------------------------------------------------------------------
    ("image-zero-bytes", lambda t, r, i: (
        _caption(r, _write(t / "zero.jpg", b"")), r"zero.jpg: error: empty file \(0 bytes\)"), 1),
    ("image-truncated", lambda t, r, i: (
        _caption(r, _write(t / "cut.jpg", _first_image(i).read_bytes()[:1500])),
        r"cut.jpg: error: truncated or corrupt"), 1),
    ("image-not-an-image", lambda t, r, i: (
        _caption(r, _write(t / "notes.jpg", b"a caption, not a picture\n")),
        r"notes.jpg: error: not an image"), 1),
    ("image-decompression-bomb", lambda t, r, i: (
        _caption(r, _png_header(t / "bomb.png", 40000, 40000)), r"bomb.png: error: too large"), 1),
    ("image-missing", lambda t, r, i: (_caption(r, t / "absent.jpg"), r"absent.jpg: error: missing"), 1),
    # -- train -------------------------------------------------------------------------------------
    ("train-no-features-folder", lambda t, r, i: (
        _train(t / "nowhere", t / "run"),
        r"nowhere/manifest.json: no features manifest here; run `python cli.py features --out .*nowhere` "), 2),
    ("train-features-of-the-wrong-shape", lambda t, r, i: (
        _train(_copy_features(r, t, lambda m: m.update(D=256)), t / "run"),
        r"train/shard-00000.h5: annotations \(40, 169, 512\) float16 .* the manifest says \(40, 169, 256\) float16; "
        r"rebuild it with: python cli.py features"), 2),
    ("train-over-an-existing-run", lambda t, r, i: (
        shutil.copytree(r / "run", t / "run") and _train(r / "features", t / "run"),
        r"run already holds a run \(last.pt\); pass --resume to continue it, or another --out"), 2),
    ("train-resume-with-another-vocabulary", lambda t, r, i: (
        _resume_with_another_vocabulary(t, r), r"vocab.json: not the vocabulary .*last.pt was trained with"), 2),
    ("train-resume-without-a-run", lambda t, r, i: (
        _train(r / "features", t / "run", "--resume"), r"last.pt: no such checkpoint"), 2),
    ("train-learning-rate-decay-above-1", lambda t, r, i: (
        _train(r / "features", t / "run", "--lr-decay", "2"), r"--lr-decay must be in \(0, 1\]"), 2),
    ("train-semi-sampling-probability-above-1", lambda t, r, i: (
        _train(r / "features", t / "run", "--attention", "hard", "--semi-sampling-p", "1.5"),
        r"--semi-sampling-p must be in \[0, 1\]"), 2),
    # -- evaluate ----------------------------------------------------------------------------------
    ("checkpoint-not-a-checkpoint", lambda t, r, i: (
        _evaluate(_write(t / "notes.pt", b"hello")),
        r"notes.pt: not a checkpoint loadable with weights_only=True"), 2),
    ("checkpoint-needing-unpickling", lambda t, r, i: (
        _evaluate(_pickle(t / "pickled.pt", {"model": Pickled()})),
        r"pickled.pt: not a checkpoint loadable with weights_only=True \(UnpicklingError"), 2),
    ("checkpoint-of-another-vocabulary-size", lambda t, r, i: (
        _evaluate(_checkpoint(r, t, lambda s: s["model_config"].update(vocab_size=s["model_config"]["vocab_size"] + 1))),
        r"edited.pt: its weights do not fit its model \(.*embedding.weight.*\); the file is damaged"), 2),
    ("checkpoint-of-another-encoder", lambda t, r, i: (
        _evaluate(_checkpoint(r, t, lambda s: s["features"]["encoder"].update(name="vgg19")), "--features",
                  str(r / "features")),
        r"features differ from those .*edited.pt was trained on \(encoder\); extract them with the same encoder"), 2),
    ("evaluate-unknown-split", lambda t, r, i: (
        _evaluate(r / "run" / "best.pt", "--split", "holdout"),
        r"no features for split 'holdout' \(have: train, val, test\); extract it with"), 2),
    ("evaluate-without-java", lambda t, r, i: (
        _evaluate(shutil.copy(r / "run" / "best.pt", t / "best.pt"), "--split", "val"),
        r"note: Java not found: METEOR and SPICE left out, .*install a Java runtime"), 0),
]


def _snapshot(*folders):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in Path(f).rglob("*") if p.is_file()}


@pytest.mark.parametrize("build, status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(build, status, trained_run, tmp_path, request):
    run, root = trained_run
    args, pattern = build(tmp_path, run, root)
    before = _snapshot(tmp_path, run, root)
    env = {"PATH": str(tmp_path / "no-java")} if request.node.callspec.id == "evaluate-without-java" else None
    result = CliRunner().invoke(cli.main, args, env=env)
    output = result.output
    assert result.exit_code == status, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert re.search(pattern, output), output
    if status:
        message = [line for line in output.splitlines() if re.search(pattern, line)]
        assert len(message) == 1 and len(message[0]) < 600, output
    after = _snapshot(tmp_path, run, root)
    assert {p: h for p, h in after.items() if p in before} == before, "a file written before was changed"


def test_at_least_twenty_kinds_are_tried():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)
