"""Bad input: the kinds tried across the adapters, `features`, `train`, `evaluate` and `caption`,
and what each gets.

Each case builds its input under a fresh folder and returns the command line to run (in-process,
through click) and a regular expression the message must match. Every case must end with one line
that names the input and says what to do, the exit status given, no traceback, and every file
that existed before the command (the trained run's included) unchanged.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import cli

from conftest import karpathy_json, png_header, tiny_flickr8k


def _features_cmd(tmp, *args):
    return [
        "features",
        "--encoder",
        "squeezenet1_1",
        "--weights",
        "random",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(tmp / "out"),
        *args,
    ]


def _small_corpus(root):
    """Options reading the small synthetic corpus (conftest's) through its Karpathy json."""
    return ["--dataset", "karpathy", "--karpathy-json", str(root / "dataset_synthetic.json"), "--image-dir", str(root)]


def _flickr8k(tmp, lines, splits=None):
    return _features_cmd(tmp, "--dataset", "flickr8k", "--data-dir", str(tiny_flickr8k(tmp, lines, splits)))


def _karpathy(tmp, images, root=None):
    return _features_cmd(
        tmp,
        "--dataset",
        "karpathy",
        "--karpathy-json",
        str(karpathy_json(tmp, images)),
        "--image-dir",
        str(root or tmp),
    )


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


class Pickled:
    """An object that only full unpickling can rebuild."""


def _resume_with_another_vocabulary(tmp, run):
    """A copy of the trained run, to be resumed on features whose vocabulary lost its last word."""
    shutil.copytree(run / "run", tmp / "run")
    features = _copy_features(run, tmp)
    words = json.loads((features / "vocab.json").read_text())["words"]
    (features / "vocab.json").write_text(json.dumps({"words": words[:-1]}))
    manifest = json.loads((features / "manifest.json").read_text())  # a folder whole in itself
    manifest["text"]["vocab.json"] = hashlib.sha256((features / "vocab.json").read_bytes()).hexdigest()
    (features / "manifest.json").write_text(json.dumps(manifest))
    return _train(features, tmp / "run", "--resume", "--epochs", "2")


def _caption_of(checkpoint, image, *args):
    return ["caption", str(image), "--checkpoint", str(checkpoint), *args]


def _evaluate(checkpoint, *args):
    return ["evaluate", "--checkpoint", str(checkpoint), "--no-progress", *args]


def _train(features, out, *args):
    return [
        "train",
        "--features",
        str(features),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--no-progress",
        "--embed-dim",
        "16",
        "--hidden-dim",
        "32",
        "--attention-dim",
        "16",
        *args,
    ]


def _first_image(root):
    return sorted((root / "images").glob("*.jpg"))[0]


# (id, build(tmp, run, root) -> (args, regex of the message), exit status); the case named
# 'evaluate-without-java' runs with a PATH that holds no java
CASES = [
    # -- dataset adapters -------------------------------------------------------------------------
    (
        "flickr8k-line-without-tab",
        lambda t, r, i: (
            _flickr8k(t, ["a.jpg#0\tA dog .", "a.jpg#1 no tab", "b.jpg#0\tx"]),
            r"Flickr8k.token.txt:2: expected 'IMAGE.jpg#N<TAB>caption'",
        ),
        2,
    ),
    (
        "flickr8k-line-without-caption-number",
        lambda t, r, i: (_flickr8k(t, ["a.jpg\tA dog .", "b.jpg#0\tx"]), r"Flickr8k.token.txt:1: expected"),
        2,
    ),
    (
        "flickr8k-empty-caption",
        lambda t, r, i: (
            _flickr8k(t, ["a.jpg#0\tA dog .", "a.jpg#1\t   ", "b.jpg#0\tx"]),
            r"Flickr8k.token.txt:2: empty caption for a.jpg; remove the line or add text",
        ),
        2,
    ),
    (
        "flickr8k-non-utf8-captions",
        lambda t, r, i: (
            _features_cmd(
                t,
                "--dataset",
                "flickr8k",
                "--data-dir",
                str(
                    _write(
                        tiny_flickr8k(t, []) / "Flickr8k_text" / "Flickr8k.token.txt", b"a.jpg#0\tcaf\xe9 au lait\n"
                    ).parents[1]
                ),
            ),
            r"Flickr8k.token.txt: not UTF-8 text .*re-save it as UTF-8",
        ),
        2,
    ),
    (
        "flickr8k-wrong-folder",
        lambda t, r, i: (
            _features_cmd(t, "--dataset", "flickr8k", "--data-dir", str(t)),
            r"Flickr8k.token.txt: missing caption file; point --data-dir at a folder laid out like",
        ),
        2,
    ),
    (
        "flickr8k-split-image-without-caption",
        lambda t, r, i: (
            _flickr8k(t, ["a.jpg#0\tA dog ."]),
            r"devImages.txt:1: b.jpg has no caption in .*Flickr8k.token.txt",
        ),
        2,
    ),
    (
        "flickr8k-image-in-two-splits",
        lambda t, r, i: (
            _flickr8k(t, ["a.jpg#0\tA dog ."], {"train": ["a.jpg"], "dev": ["a.jpg"], "test": []}),
            r"devImages.txt:1: a.jpg is listed twice across the split files",
        ),
        2,
    ),
    (
        "karpathy-unknown-split-name",
        lambda t, r, i: (
            _karpathy(t, [{"filename": "x.jpg", "split": "holdout", "sentences": [{"raw": "a"}]}]),
            r"dataset_coco.json: images\[0\] \(x.jpg\): unknown split 'holdout'; use one of restval, test, train, val",
        ),
        2,
    ),
    (
        "karpathy-entry-without-filename",
        lambda t, r, i: (
            _karpathy(t, [{"split": "train", "sentences": [{"raw": "a"}]}]),
            r"dataset_coco.json: images\[0\]: missing field 'filename'",
        ),
        2,
    ),
    (
        "karpathy-empty-caption",
        lambda t, r, i: (
            _karpathy(t, [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": " "}]}]),
            r"dataset_coco.json: images\[0\] \(x.jpg\): has an empty caption; fix or drop that sentence",
        ),
        2,
    ),
    (
        "karpathy-duplicate-image-id",
        lambda t, r, i: (
            _karpathy(t, [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": "a"}]}] * 2),
            r"dataset_coco.json: images\[1\]: duplicate image id x.jpg; each image must appear once",
        ),
        2,
    ),
    (
        "karpathy-not-json",
        lambda t, r, i: (
            _features_cmd(
                t,
                "--dataset",
                "karpathy",
                "--karpathy-json",
                str(_write(t / "dataset_coco.json", b"{")),
                "--image-dir",
                str(t),
            ),
            r"dataset_coco.json: not a Karpathy split json",
        ),
        2,
    ),
    (
        "karpathy-without-its-json",
        lambda t, r, i: (
            _features_cmd(t, "--dataset", "karpathy"),
            r"--dataset karpathy needs --karpathy-json and --image-dir",
        ),
        2,
    ),
    # -- features ---------------------------------------------------------------------------------
    (
        "features-unknown-split",
        lambda t, r, i: (
            _features_cmd(t, *_small_corpus(i), "--splits", "train,holdout"),
            r"unknown split\(s\) holdout for karpathy; it has train, val, test",
        ),
        2,
    ),
    (
        "features-weights-needing-unpickling",
        lambda t, r, i: (
            _features_cmd(
                t, *_small_corpus(i), "--weights", str(_pickle(t / "w.pth", {"features.0.weight": Pickled()}))
            ),
            r"w.pth: not a loadable state dict with weights_only=True",
        ),
        2,
    ),
    (
        "features-zero-byte-weights",
        lambda t, r, i: (
            _features_cmd(t, *_small_corpus(i), "--weights", str(_write(t / "w.pth", b""))),
            r"w.pth: not a loadable state dict",
        ),
        2,
    ),
    (
        "features-zero-shard-size",
        lambda t, r, i: (
            _features_cmd(t, *_small_corpus(i), "--shard-size", "0"),
            r"Invalid value for '--shard-size': 0 is not in the range x>=1",
        ),
        2,
    ),
    (
        "features-empty-split-name",
        lambda t, r, i: (
            _features_cmd(t, *_small_corpus(i), "--splits", ","),
            r"Invalid value for '--splits': ',' has an empty split name; give names such as train,dev",
        ),
        2,
    ),
    (
        "features-into-a-folder-of-other-settings",
        lambda t, r, i: (
            shutil.copytree(r / "features", t / "out") and _features_cmd(t, *_small_corpus(i), "--dtype", "float32"),
            r"out holds features made with a different dataset, dtype .*use another --out or delete it",
        ),
        2,
    ),
    # -- images ------------------------------------------------------------------------------------
    (
        "image-zero-bytes",
        lambda t, r, i: (_caption_with(r, _write(t / "zero.jpg", b"")), r"zero.jpg: error: empty file \(0 bytes\)"),
        1,
    ),
    (
        "image-truncated",
        lambda t, r, i: (
            _caption_with(r, _write(t / "cut.jpg", _first_image(i).read_bytes()[:1500])),
            r"cut.jpg: error: truncated or corrupt",
        ),
        1,
    ),
    (
        "image-not-an-image",
        lambda t, r, i: (
            _caption_with(r, _write(t / "notes.jpg", b"a caption, not a picture\n")),
            r"notes.jpg: error: not an image",
        ),
        1,
    ),
    (
        "image-decompression-bomb",
        lambda t, r, i: (_caption_with(r, png_header(t / "bomb.png", 40000, 40000)), r"bomb.png: error: too large"),
        1,
    ),
    ("image-missing", lambda t, r, i: (_caption_with(r, t / "absent.jpg"), r"absent.jpg: error: missing"), 1),
    # -- train -------------------------------------------------------------------------------------
    (
        "train-no-features-folder",
        lambda t, r, i: (
            _train(t / "nowhere", t / "run"),
            r"nowhere/manifest.json: no features manifest here; run the features command with --out .*nowhere ",
        ),
        2,
    ),
    (
        "train-features-of-the-wrong-shape",
        lambda t, r, i: (
            _train(_copy_features(r, t, lambda m: m.update(D=256)), t / "run"),
            r"train/shard-00000.h5: annotations \(40, 169, 512\) float16 .* "
            r"the manifest says \(40, 169, 256\) float16; "
            r"rebuild it with: python cli.py features",
        ),
        2,
    ),
    (
        "train-over-an-existing-run",
        lambda t, r, i: (
            shutil.copytree(r / "run", t / "run") and _train(r / "features", t / "run"),
            r"run already holds a run \(last.pt, best.pt, metrics.jsonl, curves.png, tensorboard, config.toml\); "
            r"pass --resume",
        ),
        2,
    ),
    (
        "train-resume-with-another-vocabulary",
        lambda t, r, i: (
            _resume_with_another_vocabulary(t, r),
            r"vocab.json: not the vocabulary .*last.pt was trained with",
        ),
        2,
    ),
    (
        "train-resume-without-a-run",
        lambda t, r, i: (_train(r / "features", t / "run", "--resume"), r"last.pt: no such checkpoint"),
        2,
    ),
    (
        "train-learning-rate-decay-above-1",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--lr-decay", "2"),
            r"Invalid value for '--lr-decay': 2.0 is not in the range 0<x<=1",
        ),
        2,
    ),
    (
        "train-semi-sampling-probability-above-1",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--attention", "hard", "--semi-sampling-p", "1.5"),
            r"Invalid value for '--semi-sampling-p': 1.5 is not in the range 0<=x<=1",
        ),
        2,
    ),
    # -- evaluate ----------------------------------------------------------------------------------
    (
        "checkpoint-not-a-checkpoint",
        lambda t, r, i: (
            _evaluate(_write(t / "notes.pt", b"hello")),
            r"notes.pt: not a checkpoint loadable with weights_only=True",
        ),
        2,
    ),
    (
        "checkpoint-needing-unpickling",
        lambda t, r, i: (
            _evaluate(_pickle(t / "pickled.pt", {"model": Pickled()})),
            r"pickled.pt: not a checkpoint loadable with weights_only=True \(UnpicklingError",
        ),
        2,
    ),
    (
        "checkpoint-of-another-vocabulary-size",
        lambda t, r, i: (
            _evaluate(
                _checkpoint(r, t, lambda s: s["model_config"].update(vocab_size=s["model_config"]["vocab_size"] + 1))
            ),
            r"edited.pt: its weights do not fit its model \(.*embedding.weight.*\); the file is damaged",
        ),
        2,
    ),
    (
        "checkpoint-of-another-encoder",
        lambda t, r, i: (
            _evaluate(
                _checkpoint(r, t, lambda s: s["features"]["encoder"].update(name="vgg19")),
                "--features",
                str(r / "features"),
            ),
            r"features differ from those .*edited.pt was trained on \(encoder\); extract them with the same encoder",
        ),
        2,
    ),
    (
        "evaluate-split-is-a-path",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--split", "a/b", "--out-dir", str(t / "out")),
            r"'a/b': not a split name \(letters, digits, _ and -\); pass another --split",
        ),
        2,
    ),
    (
        "evaluate-split-leaves-its-folder",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--split", "../../x/y", "--out-dir", str(t / "out" / "deep")),
            r"'../../x/y': not a split name",
        ),
        2,
    ),
    (
        "evaluate-unknown-split",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--split", "holdout"),
            r"no features for split 'holdout' \(have: train, val, test\); extract it \(the features command "
            r"with --splits holdout\)",
        ),
        2,
    ),
    (
        "evaluate-without-java",
        lambda t, r, i: (
            _evaluate(shutil.copy(r / "run" / "best.pt", t / "best.pt"), "--split", "val"),
            r"note: Java not found: METEOR and SPICE left out, .*install a Java runtime",
        ),
        0,
    ),
]


# -- issue 14: what a command may write, options checked as parsed, damaged folders ---------------

_MOUNTS = []  # read-only file systems mounted by _read_only, unmounted after each test


def _read_only(tmp):
    """A folder nothing can be written into, even by root: a read-only tmpfs where this user can
    mount one, else a folder without write permission (for a user that is not root)."""
    folder = tmp / "read-only"
    folder.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    ):
        _MOUNTS.append(folder)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
    else:
        pytest.skip("cannot make a read-only folder here")
    return folder


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while _MOUNTS:
        subprocess.run(["umount", str(_MOUNTS.pop())], check=True)


def _no_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")


def _image_copy(tmp, root, name="photo.jpg"):
    return Path(shutil.copy(_first_image(root), tmp / name))


def _caption_with(run, image, *args):
    """`caption IMAGE ARGS` with the trained run's best.pt."""
    return _caption_of(run / "run" / "best.pt", image, *args)


def _users_png(path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def _same_stem(tmp, root):
    for folder in ("a", "b"):
        (tmp / folder).mkdir()
        shutil.copy(_first_image(root), tmp / folder / "x.jpg")
    return ["caption", str(tmp / "a" / "x.jpg"), str(tmp / "b" / "x.jpg")]


def _run_without_last(run, tmp):
    shutil.copytree(run / "run", tmp / "run")
    (tmp / "run" / "last.pt").unlink()
    return tmp / "run"


def _synthetic_folder(tmp, files: dict):
    folder = tmp / "data"
    (folder / "images").mkdir(parents=True)
    for name, data in files.items():
        _write(folder / name, data)
    return [
        "features",
        "--dataset",
        "synthetic",
        "--data-dir",
        str(folder),
        "--encoder",
        "squeezenet1_1",
        "--weights",
        "random",
        "--no-progress",
        "--out",
        str(tmp / "out"),
    ]


def _evaluated(run, tmp, *args):
    """An earlier `evaluate` of the val split into tmp/scores, with ``args``."""
    result = CliRunner().invoke(
        cli.main, _evaluate(run / "run" / "best.pt", "--split", "val", "--out-dir", str(tmp / "scores"), *args)
    )
    assert result.exit_code == 0, result.output
    return tmp / "scores"


def _edited_evaluation(run, tmp):
    folder = _evaluated(run, tmp)
    path = folder / "best-val-beam3.captions.json"
    path.write_text(path.read_text().replace('"caption": "', '"caption": "my edit '))
    return _evaluate(run / "run" / "best.pt", "--split", "val", "--out-dir", str(folder))


def _features_edited(run, tmp, edit):
    """A copy of the trained run's features folder after ``edit(folder)``."""
    folder = _copy_features(run, tmp)
    edit(folder)
    return folder


def _truncate_first_shard(folder):
    shard = folder / "train" / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:5000])


def _escaping_manifest(run, tmp):
    """A copy of the features whose manifest names a shard outside the folder, where a file lies."""
    _write(tmp / "victim.h5", b"the user's own file")
    return _copy_features(run, tmp, lambda m: m["splits"]["train"]["shards"][0].update(file="../victim.h5"))


def _foreign_captions(folder):
    text = json.loads((folder / "captions.json").read_text())
    (folder / "captions.json").write_text(
        json.dumps({split: {f"x{i}": v for i, v in caps.items()} for split, caps in text.items()})
    )


def _resume(run, tmp, *args):
    shutil.copytree(run / "run", tmp / "run")
    return _train(run / "features", tmp / "run", "--resume", *args)


def _moved_weights(run, tmp, root):
    """A checkpoint whose features were made with a weights file that is no longer where it was."""
    edited = _checkpoint(run, tmp, lambda s: s["features"]["encoder"].update(weights=str(tmp / "moved" / "w.pth")))
    return _caption_of(edited, _first_image(root))


def _users_folder(tmp):
    (tmp / "out").mkdir()
    _write(tmp / "out" / "captions.json", b"mine")


def _moved_folder(run, tmp):
    """A copy of the features made by a recorded command whose --out named another place; its
    first shard truncated."""
    folder = _copy_features(
        run, tmp, lambda m: m.update(command="python cli.py features --dataset synthetic --out /old/place")
    )
    _truncate_first_shard(folder)
    return folder


def _nan_weights(state):
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key][0] = float("nan")
    state.pop("ema", None)


INVALID = "Invalid value for '{}'"
CASES += [
    # -- outputs that would replace the user's files -------------------------------------------------
    (
        "caption-plot-onto-its-checkpoint",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--attention-plot", str(r / "run" / "best.pt")),
            r"best.pt: is an input of this command; pass another --attention-plot",
        ),
        2,
    ),
    (
        "caption-plot-onto-its-image",
        lambda t, r, i: (
            _caption_with(r, _image_copy(t, i), "--attention-plot", str(t / "photo.jpg")),
            r"photo.jpg: is an input of this command",
        ),
        2,
    ),
    (
        "caption-plot-onto-a-users-png",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--attention-plot", str(_users_png(t / "mine.png"))),
            r"mine.png: exists and was not written by `cli.py caption` .* "
            r"move it away or pass another --attention-plot",
        ),
        2,
    ),
    (
        "caption-plot-onto-the-training-curves",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--attention-plot", str(r / "run" / "curves.png")),
            r"curves.png: exists and was not written by `cli.py caption`",
        ),
        2,
    ),
    (
        "caption-plots-of-two-images-of-one-stem",
        lambda t, r, i: (
            [*_same_stem(t, i), "--checkpoint", str(r / "run" / "best.pt"), "--attention-plot", str(t / "att.png")],
            r"att-x.png: the attention figures of .*a/x.jpg and .*b/x.jpg would share this name",
        ),
        2,
    ),
    (
        "caption-jsonl-onto-a-users-file",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--jsonl", str(_write(t / "notes.jsonl", b'{"mine": 1}\n'))),
            r"notes.jsonl: exists and was not written by `cli.py caption`",
        ),
        2,
    ),
    (
        "caption-jsonl-of-an-earlier-run-with-a-broken-checkpoint",
        lambda t, r, i: (
            _caption_of(
                _write(t / "notes.pt", b"hello"),
                _first_image(i),
                "--jsonl",
                str(_write(t / "earlier.jsonl", b'{"written_by": "show-attend-tell"}\n{"image": "a.jpg"}\n')),
            ),
            r"notes.pt: not a checkpoint loadable with weights_only=True",
        ),
        2,
    ),
    (
        "caption-jsonl-onto-its-image",
        lambda t, r, i: (
            _caption_with(r, _image_copy(t, i), "--jsonl", str(t / "photo.jpg")),
            r"photo.jpg: is an input",
        ),
        2,
    ),
    (
        "caption-jsonl-onto-its-figure",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--attention-plot", str(t / "o.x"), "--jsonl", str(t / "o.x")),
            r"o.x: is an input or an attention figure of this command; pass another --jsonl",
        ),
        2,
    ),
    (
        "train-into-a-run-with-best-but-no-last",
        lambda t, r, i: (
            _train(r / "features", _run_without_last(r, t)),
            r"run already holds a run \(best.pt, metrics.jsonl, curves.png, tensorboard, config.toml\); "
            r"it has no last.pt",
        ),
        2,
    ),
    (
        "synthetic-into-a-folder-of-users-images",
        lambda t, r, i: (
            _synthetic_folder(t, {"images/00000.jpg": b"my photo"}),
            r"data: holds files of its own, so the synthetic corpus is not generated there",
        ),
        2,
    ),
    (
        "synthetic-json-of-other-settings",
        lambda t, r, i: (
            _synthetic_folder(t, {"dataset_synthetic.json": json.dumps({"params": {"sizes": {"train": 3}}}).encode()}),
            r"dataset_synthetic.json: generated with other settings .*pass another --data-dir",
        ),
        2,
    ),
    (
        "features-into-a-folder-of-users-files",
        lambda t, r, i: (
            _users_folder(t) or _features_cmd(t, *_small_corpus(i)),
            r"out: holds files that `cli.py features` did not write \(captions.json\) and no manifest",
        ),
        2,
    ),
    (
        "features-manifest-naming-a-path-outside",
        lambda t, r, i: (
            shutil.copytree(_escaping_manifest(r, t), t / "out") and _features_cmd(t, *_small_corpus(i)),
            r"manifest.json: shard path '../victim.h5' is not train/shard-NNNNN.h5 inside the folder",
        ),
        2,
    ),
    (
        "evaluate-output-name-taken-by-a-users-file",
        lambda t, r, i: (
            _evaluate(
                r / "run" / "best.pt",
                "--split",
                "val",
                "--out-dir",
                str(_write(t / "best-val-beam3.captions.json", b"[]").parent),
            ),
            r"best-val-beam3.captions.json: exists and was not written by `cli.py evaluate`",
        ),
        2,
    ),
    (
        "evaluate-over-an-edited-earlier-output",
        lambda t, r, i: (_edited_evaluation(r, t), r"best-val-beam3.captions.json: exists and was not written by"),
        2,
    ),
    (
        "evaluate-with-another-max-len-beside-earlier-outputs",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--split", "val", "--max-len", "5", "--out-dir", str(_evaluated(r, t))),
            r"captions: .*best-val-beam3-len5.captions.json",
        ),
        0,
    ),
    # -- options checked as they are parsed ----------------------------------------------------------
    *[
        (
            f"train-{flag[2:]}-{value}",
            lambda t, r, i, flag=flag, value=value: (
                _train(r / "features", t / "run", flag, value),
                re.escape(INVALID.format(flag)),
            ),
            2,
        )
        for flag, value in [
            ("--lr", "inf"),
            ("--lr", "nan"),
            ("--lr", "0"),
            ("--lr", "-1"),
            ("--max-len", "0"),
            ("--dropout", "2"),
            ("--workers", "-1"),
            ("--patience", "-1"),
            ("--batch-size", "0"),
            ("--epochs", "0"),
            ("--clip", "-1"),
            ("--clip", "nan"),
            ("--ema-decay", "1"),
            ("--alpha-c", "-1"),
            ("--entropy-c", "inf"),
            ("--reinforce-scale", "nan"),
            ("--baseline-decay", "1.5"),
            ("--val-beam-size", "0"),
            ("--val-images", "-1"),
            ("--checkpoint-every", "-1"),
            ("--attention-layers", "3"),
            ("--embed-dim", "0"),
            ("--hidden-dim", "100000"),
            ("--attention-input-scale", "-1"),
            ("--seed", "-1"),
            ("--soft-warmup-epochs", "-1"),
            ("--lr-patience", "-1"),
            ("--device", "nonsense"),
        ]
    ],
    *[
        (
            f"features-{flag[2:]}-{value}",
            lambda t, r, i, flag=flag, value=value: (
                _features_cmd(t, *_small_corpus(i), flag, value),
                re.escape(INVALID.format(flag)),
            ),
            2,
        )
        for flag, value in [
            ("--image-size", "16"),
            ("--image-size", "5000"),
            ("--shard-size", "-5"),
            ("--batch-size", "0"),
            ("--min-count", "0"),
            ("--workers", "-2"),
            ("--device", "gpu0"),
        ]
    ],
    *[
        (
            f"evaluate-{flag[2:]}-{value}",
            lambda t, r, i, flag=flag, value=value: (
                _evaluate(r / "run" / "best.pt", flag, value),
                re.escape(INVALID.format(flag)),
            ),
            2,
        )
        for flag, value in [
            ("--beam-size", "0"),
            ("--max-len", "0"),
            ("--batch-size", "0"),
            ("--length-penalty", "nan"),
            ("--length-penalty", "inf"),
            ("--length-penalty", "-1"),
            ("--device", "nonsense"),
        ]
    ],
    *[
        (
            f"caption-{flag[2:]}-{value}",
            lambda t, r, i, flag=flag, value=value: (
                _caption_with(r, _first_image(i), flag, value),
                re.escape(INVALID.format(flag)),
            ),
            2,
        )
        for flag, value in [("--beam-size", "-1"), ("--beam-size", "1000"), ("--max-len", "0"), ("--device", "tpu")]
    ],
    (
        "train-device-cuda-without-a-gpu",
        lambda t, r, i: (
            _no_cuda() or _train(r / "features", t / "run", "--device", "cuda"),
            r"'cuda': no CUDA device is available here; use --device cpu",
        ),
        2,
    ),
    (
        "caption-device-cuda-without-a-gpu",
        lambda t, r, i: (
            _no_cuda() or _caption_with(r, _first_image(i), "--device", "cuda:1"),
            r"no CUDA device is available here",
        ),
        2,
    ),
    (
        "train-resume-with-another-learning-rate",
        lambda t, r, i: (
            _resume(r, t, "--lr", "0.001"),
            r"last.pt: a resumed run keeps its options, so --lr \(the run has 0.0004, given 0.001\) cannot be used",
        ),
        2,
    ),
    (
        "train-resume-without-the-gate",
        lambda t, r, i: (
            _resume(r, t, "--no-gating"),
            r"so --no-gating \(the run has True, given False\) cannot be used; .*a resume may change --epochs, "
            r"--patience, --checkpoint-every, --workers, --no-tensorboard, --compile\)",
        ),
        2,
    ),
    (
        "train-resume-with-another-model-size",
        lambda t, r, i: (
            _resume(r, t, "--hidden-dim", "64"),
            r"so --hidden-dim \(the run has 32, given 64\) cannot be used",
        ),
        2,
    ),
    (
        "train-resume-with-another-attention",
        lambda t, r, i: (
            _resume(r, t, "--attention", "hard"),
            r"so --attention \(the run has soft, given hard\) cannot be used",
        ),
        2,
    ),
    (
        "train-out-is-a-file",
        lambda t, r, i: (
            _train(r / "features", _write(t / "run.txt", b"notes")),
            r"Invalid value for '--out'.*is a file",
        ),
        2,
    ),
    (
        "train-features-is-a-file",
        lambda t, r, i: (
            _train(_write(t / "f.txt", b"notes"), t / "run"),
            r"Invalid value for '--features'.*is a file",
        ),
        2,
    ),
    (
        "evaluate-checkpoint-is-a-folder",
        lambda t, r, i: (_evaluate(r / "run"), r"Invalid value for '--checkpoint'.*is a directory"),
        2,
    ),
    (
        "evaluate-out-dir-is-a-file",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--out-dir", str(_write(t / "o.txt", b""))),
            r"Invalid value for '--out-dir'.*is a file",
        ),
        2,
    ),
    (
        "caption-image-is-a-folder",
        lambda t, r, i: (_caption_with(r, t), r"Invalid value for 'IMAGES...'.*is a directory"),
        2,
    ),
    # -- folders that cannot be written ----------------------------------------------------------------
    (
        "features-into-a-read-only-folder",
        lambda t, r, i: (
            _features_cmd(t, *_small_corpus(i), "--out", str(_read_only(t) / "out")),
            r"read-only/out: cannot write there .*pass another --out or make it writable",
        ),
        2,
    ),
    (
        "train-into-a-read-only-folder",
        lambda t, r, i: (_train(r / "features", _read_only(t)), r"read-only: cannot write there .*pass another --out"),
        2,
    ),
    (
        "evaluate-into-a-read-only-folder",
        lambda t, r, i: (
            _evaluate(r / "run" / "best.pt", "--out-dir", str(_read_only(t))),
            r"read-only: cannot write there .*pass another --out-dir",
        ),
        2,
    ),
    (
        "caption-plot-into-a-read-only-folder",
        lambda t, r, i: (
            _caption_with(r, _first_image(i), "--attention-plot", str(_read_only(t) / "att.png")),
            r"read-only: cannot write there .*--attention-plot",
        ),
        2,
    ),
    # -- damaged or mismatched features folders --------------------------------------------------------
    (
        "train-manifest-missing-a-key",
        lambda t, r, i: (
            _train(_copy_features(r, t, lambda m: m.pop("L")), t / "run"),
            r"manifest.json: missing or malformed 'L'; the manifest is damaged",
        ),
        2,
    ),
    (
        "train-manifest-with-a-string-for-D",
        lambda t, r, i: (
            _train(_copy_features(r, t, lambda m: m.update(D="512")), t / "run"),
            r"missing or malformed 'D'",
        ),
        2,
    ),
    (
        "verify-manifest-not-a-dict",
        lambda t, r, i: (
            ["verify", str(_features_edited(r, t, lambda f: _write(f / "manifest.json", b"[1, 2]")))],
            r"manifest.json: format 'list' is not",
        ),
        2,
    ),
    (
        "verify-manifest-naming-a-path-outside",
        lambda t, r, i: (
            ["verify", str(_escaping_manifest(r, t))],
            r"shard path '../victim.h5' is not train/shard-NNNNN.h5",
        ),
        2,
    ),
    (
        "train-manifest-naming-a-path-outside",
        lambda t, r, i: (_train(_escaping_manifest(r, t), t / "run"), r"shard path '../victim.h5'"),
        2,
    ),
    (
        "train-without-captions-json",
        lambda t, r, i: (
            _train(_features_edited(r, t, lambda f: (f / "captions.json").unlink()), t / "run"),
            r"captions.json: missing; rebuild it with: python cli.py features",
        ),
        2,
    ),
    (
        "verify-without-captions-json",
        lambda t, r, i: (
            ["verify", str(_features_edited(r, t, lambda f: (f / "captions.json").unlink()))],
            r"captions.json: missing; rebuild it with",
        ),
        1,
    ),
    (
        "evaluate-captions-json-of-another-folder",
        lambda t, r, i: (
            _evaluate(
                r / "run" / "best.pt", "--split", "val", "--features", str(_features_edited(r, t, _foreign_captions))
            ),
            r"captions.json: not the file written with these shards",
        ),
        2,
    ),
    (
        "verify-captions-json-of-another-folder",
        lambda t, r, i: (
            ["verify", str(_features_edited(r, t, _foreign_captions))],
            r"captions.json: not the file written with",
        ),
        1,
    ),
    (
        "verify-without-vocab-json",
        lambda t, r, i: (
            ["verify", str(_features_edited(r, t, lambda f: (f / "vocab.json").unlink()))],
            r"vocab.json: missing",
        ),
        1,
    ),
    (
        "train-vocab-json-edited",
        lambda t, r, i: (
            _train(_features_edited(r, t, lambda f: _write(f / "vocab.json", b'{"words": ["<pad>"]}')), t / "run"),
            r"vocab.json: not the file written with these shards",
        ),
        2,
    ),
    (
        "verify-hint-names-the-folder-as-it-is-now",
        lambda t, r, i: (
            ["verify", str(_moved_folder(r, t))],
            r"shard-00000.h5: truncated or altered .*rebuild it with: python cli.py features --dataset synthetic --out "
            rf"{re.escape(str(t / 'features'))} --splits train(?:\n|$)",
        ),
        1,
    ),
    (
        "verify-a-folder-that-is-not-there",
        lambda t, r, i: (["verify", str(t / "nowhere")], r"nowhere/manifest.json: no features manifest here"),
        2,
    ),
    (
        "evaluate-checkpoint-with-nan-weights",
        lambda t, r, i: (_evaluate(_checkpoint(r, t, _nan_weights)), r"edited.pt: its weights hold nan or inf values"),
        2,
    ),
    (
        "caption-with-moved-encoder-weights",
        lambda t, r, i: (
            _moved_weights(r, t, i),
            r"edited.pt: its features were made with the squeezenet1_1 weights .*moved/w.pth"
            r".* which cannot be loaded now .*put that file back",
        ),
        2,
    ),
    (
        "karpathy-images-not-a-list",
        lambda t, r, i: (
            _features_cmd(
                t,
                "--dataset",
                "karpathy",
                "--karpathy-json",
                str(_write(t / "dataset_coco.json", b'{"images": 5}')),
                "--image-dir",
                str(t),
            ),
            r"dataset_coco.json: 'images' is a int, not a list of image entries",
        ),
        2,
    ),
    (
        "train-scst-without-init",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--objective", "scst"),
            r"--objective scst trains an XE-trained decoder: give its checkpoint \(RUN/best.pt\) as --init",
        ),
        2,
    ),
    (
        "train-init-missing",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--init", str(t / "nope.pt")),
            r"Invalid value for '--init': File '.*nope.pt' does not exist",
        ),
        2,
    ),
    (
        "export-checkpoint-missing",
        lambda t, r, i: (
            ["export", "--checkpoint", str(t / "typo.pt"), "--out", str(t / "models" / "new")],
            r"Invalid value for '--checkpoint': File '.*typo.pt' does not exist",
        ),
        2,
    ),
    (
        "caption-checkpoint-missing",
        lambda t, r, i: (
            _caption_of(t / "typo.pt", _first_image(i), "--attention-plot", str(t / "a" / "b" / "out.png")),
            r"Invalid value for '--checkpoint': File '.*typo.pt' does not exist",
        ),
        2,
    ),
    (
        "train-init-with-other-sizes",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--init", str(r / "run" / "best.pt"), "--hidden-dim", "7"),
            r"best.pt: the decoder's sizes and switches come from this checkpoint; drop --hidden-dim 7 \(it has "
            r"hidden_dim = \d+\)",
        ),
        2,
    ),
    (
        "train-init-without-the-gate",
        lambda t, r, i: (
            _train(r / "features", t / "run", "--init", str(r / "run" / "best.pt"), "--no-gating"),
            r"best.pt: the decoder's sizes and switches come from this checkpoint; drop --no-gating \(it has "
            r"gating = True\)",
        ),
        2,
    ),
    (
        "features-karpathy-json-with-flickr8k",
        lambda t, r, i: (
            [*_flickr8k(t, ["1000_a.jpg#0\ta dog runs"]), "--karpathy-json", str(i / "dataset_synthetic.json")],
            r"--karpathy-json and --image-dir are read with --dataset karpathy only; --dataset flickr8k reads "
            r"--data-dir",
        ),
        2,
    ),
    (
        "features-data-dir-with-karpathy",
        lambda t, r, i: (
            [*_features_cmd(t, *_small_corpus(i)), "--data-dir", str(t)],
            r"--dataset karpathy reads --karpathy-json and --image-dir, not --data-dir",
        ),
        2,
    ),
    (
        "train-features-without-a-validation-split",
        lambda t, r, i: (
            _train(_copy_features(r, t, lambda m: m["splits"].pop("val")), t / "run"),
            r"features: no 'dev' or 'val' features to validate on; pass --val-split",
        ),
        2,
    ),
    (
        "features-weights-is-a-folder",
        lambda t, r, i: (_features_cmd(t, *_small_corpus(i), "--weights", str(t)), r"not a loadable state dict"),
        2,
    ),
]


def _snapshot(*folders):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in Path(f).rglob("*") if p.is_file()}


@pytest.mark.parametrize("build, status", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(build, status, trained_run, tmp_path, request):
    run, root = trained_run
    args, pattern = build(tmp_path, run, root)
    before, folders = _snapshot(tmp_path, run, root), {p for p in tmp_path.rglob("*") if p.is_dir()}
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
    if status:
        left = [p for p in tmp_path.rglob("*") if p.is_dir() and p not in folders and not any(p.iterdir())]
        assert not left, f"a refused command left empty folders: {left}"


def test_every_kind_is_named_once():
    assert len({c[0] for c in CASES}) == len(CASES)
