"""Shared fixtures: the real data in ../shared/data (skipped where absent) and a small generated corpus."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
FLICKR8K = SHARED / "flickr8k"
SQUEEZENET_WEIGHTS = SHARED / "weights" / "squeezenet1_1-imagenet-features.pth"


def need_shared(path: Path) -> Path:
    """``path`` inside ../shared/data, or skip the test saying why."""
    if not path.exists():
        pytest.skip(f"needs {path} (the real data beside the clone; set SHARED_DATA to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A synthetic corpus of 40 train, 10 val and 10 test images: (json path, image root)."""
    from pipeline.datasets import make_synthetic

    folder = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(folder, sizes={"train": 40, "val": 10, "test": 10}), folder
