"""Where things are by default, relative to the folder commands run in (the repository root, as
the Makefile runs them): corpora in ``data/DATASET``, features in ``data/features``, training
runs in ``data/runs``. The commands fall back on these when a path option is left out.

Also where the tests and benchmarks find the repository and the real data beside it
(``../shared/data``, or ``$SHARED_DATA``): one definition for both."""

import os
from pathlib import Path

from .errors import PipelineError, param

DATA = Path("data")
FEATURES = DATA / "features"
RUNS = DATA / "runs"

REPOSITORY = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SHARED_DATA", REPOSITORY.parent / "shared" / "data"))  # real data for tests, bench
FLICKR8K = SHARED / "flickr8k"
SQUEEZENET_WEIGHTS = SHARED / "weights" / "squeezenet1_1-imagenet-features.pth"


def features_dir(dataset: str, encoder: str, image_size: int | None = None) -> Path:
    """The features folder `cli.py features` and `make features` write by default:
    ``data/features/DATASET-ENCODER``, with ``-IMAGE_SIZE`` where an input size is given."""
    return FEATURES / f"{dataset}-{encoder}{f'-{image_size}' if image_size else ''}"


def run_dir(features, attention: str) -> Path:
    """The run folder `cli.py train` and `make train` write by default: ``data/runs/NAME-ATTENTION``,
    NAME the features folder's name (``data/runs/flickr8k-vgg19-hard``)."""
    return RUNS / f"{Path(features).name}-{attention}"


DEFAULT_FEATURES = features_dir("flickr8k", "vgg19")  # what `make features DATASET=flickr8k` writes


def default_features() -> tuple[Path, str | None]:
    """The features folder to train on when none is given: ``data/features/flickr8k-vgg19`` if it
    holds features, else the only features folder under ``data/features``.
    Returns (folder, a note saying which was picked, or None for the default itself).
    Raises PipelineError when there is none, or several to choose from."""
    if (DEFAULT_FEATURES / "manifest.json").is_file():
        return DEFAULT_FEATURES, None
    found = sorted(p.parent for p in FEATURES.glob("*/manifest.json"))
    if len(found) == 1:
        return found[0], f"using the features in {found[0]} (the only features folder under {FEATURES})"
    if not found:
        raise PipelineError(
            f"no features under {FEATURES}: run `make features DATASET=flickr8k` (or `python cli.py "
            f"features`) first, or pass {param('features')}"
        )
    raise PipelineError(
        f"{len(found)} features folders under {FEATURES} ({', '.join(p.name for p in found)}) and none "
        f"is {DEFAULT_FEATURES.name}: choose one with {param('features')}"
    )


def newest_checkpoint() -> tuple[Path, str]:
    """The most recently written ``best.pt`` under ``data/runs``, and a note saying so.
    Raises PipelineError when there is none."""
    found = sorted(RUNS.glob("**/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise PipelineError(
            f"no trained checkpoint under {RUNS}: train one with `python cli.py train` (or `make "
            f"train`), or pass {param('checkpoint')}"
        )
    return found[-1], f"using {found[-1]} (the newest best.pt under {RUNS})"
