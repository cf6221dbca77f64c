"""Shared fixtures: the real data in ../shared/data (skipped where absent), a small generated corpus,
its features with a decoder trained on them, and builders of tiny corpora in the adapters' formats."""

import json
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, so `pipeline` imports

from pipeline.io.paths import FLICKR8K, SHARED, SQUEEZENET_WEIGHTS  # noqa: E402,F401 - one definition, shared with bench
from pipeline.io.paths import REPOSITORY as ROOT  # noqa: E402


def run_cli(*args, **kwargs) -> subprocess.Popen:
    """``python cli.py ARGS`` started from the repository root, its output as text pipes, and Ctrl-C
    (SIGINT) acted on as at a terminal, also where the tests themselves run under ``nohup ... &``,
    which passes SIGINT on as ignored."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )


def need_shared(path: Path) -> Path:
    """``path`` inside ../shared/data, or skip the test saying why."""
    if not path.exists():
        pytest.skip(f"needs {path} (the real data beside the clone; set SHARED_DATA to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A synthetic corpus of 40 train, 10 val and 10 test images: (json path, image root)."""
    from pipeline.features.datasets import make_synthetic

    folder = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(folder, sizes={"train": 40, "val": 10, "test": 10}), folder


@pytest.fixture(scope="session")
def trained_run(small_corpus, tmp_path_factory):
    """Features of the small corpus (random SqueezeNet) and a small decoder trained on them for one
    epoch: (folder holding features/ and run/best.pt, image root)."""
    from pipeline.features.datasets import load_karpathy
    from pipeline.features.extract import FeatureConfig, extract_features
    from pipeline.train.loop import TrainConfig, train

    json_path, root = small_corpus
    out = tmp_path_factory.mktemp("run")
    extract_features(
        load_karpathy(json_path, root),
        out / "features",
        FeatureConfig(encoder="squeezenet1_1", weights="random", num_workers=0),
        "synthetic",
        progress=False,
    )
    train(
        TrainConfig(
            features=str(out / "features"),
            out=str(out / "run"),
            epochs=1,
            model=dict(embed_dim=16, hidden_dim=32, attention_dim=16),
        ),
        progress=False,
    )
    return out, root


def tiny_flickr8k(folder: Path, token_lines: list[str], splits: dict | None = None) -> Path:
    """A Flickr8k release layout under ``folder`` with these caption lines (no images)."""
    text = folder / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    splits = splits or {"train": ["a.jpg"], "dev": ["b.jpg"], "test": []}
    for split, names in splits.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("".join(n + "\n" for n in names))
    return folder


def karpathy_json(folder: Path, images: list[dict], name: str = "dataset_coco.json") -> Path:
    """A Karpathy-split json holding ``images``."""
    path = folder / name
    path.write_text(json.dumps({"dataset": name.removeprefix("dataset_").removesuffix(".json"), "images": images}))
    return path


def png_header(path, width, height):
    """A PNG whose header claims width x height pixels (its pixel data is absent)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in ((b"IHDR", ihdr), (b"IDAT", b""), (b"IEND", b""))
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path
