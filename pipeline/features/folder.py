"""The features folder's format, once: its manifest (how the features were made: their identity,
and per split the shards with their SHA-256), its verification, and bad_images.tsv.

A features folder holds::

    manifest.json             encoder, weights hash, preprocessing, grid, L, D, dtype, and per split
                              its shards with image counts, SHA-256 checksums and failed images
    vocab.json                the vocabulary (counted on the training split)
    captions.json             per split and image id: raw captions, their tokens and the image's path
    bad_images.tsv            images that could not be used, with the reason
    SPLIT/shard-NNNNN.h5      ``annotations`` (N, L, D) float16|float32, ``image_ids`` (N,) str
                              (pipeline.features.shards writes and reads them)
"""

import json
import re
import shlex
from pathlib import Path

import h5py
import numpy as np

from ..io.atomic import atomic_path, file_sha256, write_json
from ..io.errors import PipelineError, param

FORMAT = "show-attend-tell-shards/1"


MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


def shard_problem(features_dir: Path, entry: dict, manifest: dict) -> str | None:
    """Why the shard of manifest ``entry`` is unusable (missing, truncated or altered: its SHA-256
    differs from the manifest's; or annotations not (images, L, D) of the manifest's dtype), or
    None if it is whole."""
    path = features_dir / entry["file"]
    if not path.exists():
        return "missing"
    if file_sha256(path) != entry["sha256"]:
        return f"truncated or altered ({path.stat().st_size} bytes; its SHA-256 differs from the manifest's)"
    try:
        with h5py.File(path, "r") as f:
            shape, dtype, ids = f["annotations"].shape, f["annotations"].dtype, len(f["image_ids"])
    except (OSError, KeyError) as e:
        return f"not a readable shard ({e})"
    expected = (entry["images"], manifest["L"], manifest["D"])
    if shape != expected or dtype != np.dtype(manifest["dtype"]) or ids != entry["images"]:
        return f"annotations {shape} {dtype} with {ids} image ids, the manifest says {expected} {manifest['dtype']}"
    return None


def rebuild_hint(features_dir: Path, manifest: dict, split: str | None = None) -> str:
    """The command that rebuilds a features folder's missing or damaged shards (and only those):
    the features command recorded in the manifest (its last run's), with ``--out`` naming the
    folder where it is now (a copied or moved folder is rebuilt in place, not where it was made)
    and, for a shard of ``split``, ``--splits`` naming that split (the last run may have extracted
    another)."""
    command = manifest.get("command")
    try:
        args = shlex.split(command) if isinstance(command, str) else None
    except ValueError:
        args = None
    if not args:
        return f"python cli.py features --out {features_dir} (with the options that made it)"
    flags = {"--out": str(features_dir), **({"--splits": split} if split else {})}
    for flag, value in flags.items():
        args = [a for a in args if not a.startswith(f"{flag}=")]
        if flag in args[:-1]:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return shlex.join(args)


def text_record(features_dir: Path) -> dict:
    """The manifest's record of the folder's text files: {name: SHA-256} of captions.json and
    vocab.json, as :func:`text_problems` checks them."""
    return {name: file_sha256(Path(features_dir) / name) for name in (CAPTIONS, VOCAB)}


def text_problems(features_dir: Path, manifest: dict) -> list[str]:
    """Why the folder's captions.json or vocab.json cannot be used with its shards: missing, or
    (for manifests that record them) not the files written with the shards."""
    problems = []
    for name in (CAPTIONS, VOCAB):
        path = features_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif name in manifest.get("text", {}) and file_sha256(path) != manifest["text"][name]:
            problems.append(
                f"{path}: not the file written with these shards (its SHA-256 differs from the "
                "manifest's; copied from another folder, or edited)"
            )
    return problems


def nonfinite_rows(path: Path, block: int = 256) -> list[tuple[int, str]]:
    """(row, image id) of each image of the shard at ``path`` whose annotations hold a nan or inf."""
    bad = []
    with h5py.File(path, "r") as f:
        annotations, ids = f["annotations"], f["image_ids"]
        for start in range(0, len(annotations), block):
            finite = np.isfinite(annotations[start : start + block]).all(axis=(1, 2))
            bad += [(start + r, as_text(ids[start + r])) for r in np.flatnonzero(~finite)]
    return bad


def check_shards(features_dir, manifest: dict, splits=None, values: bool = False) -> list[str]:
    """One line per problem of a features folder with this ``manifest`` (:func:`load_manifest`),
    each naming the file, what is wrong and what to do: every unusable shard of ``splits``
    (default: all) with the command that rebuilds it; a missing or foreign captions.json or
    vocab.json; and with ``values``, every image whose annotation values are not finite (this reads
    every shard whole). Empty when all is well."""
    features_dir = Path(features_dir)
    hint = rebuild_hint(features_dir, manifest)
    problems = [f"{line}; rebuild it with: {hint}" for line in text_problems(features_dir, manifest)]
    for split, entry in manifest["splits"].items():
        split_hint = rebuild_hint(features_dir, manifest, split)
        for shard in entry["shards"] if splits is None or split in splits else []:
            reason = shard_problem(features_dir, shard, manifest)
            if reason:
                problems.append(f"{features_dir / shard['file']}: {reason}; rebuild it with: {split_hint}")
            elif values:
                problems += [
                    f"{features_dir / shard['file']}: image {image_id} (row {row}) has non-finite annotation "
                    f"values (nan or inf); delete the shard and rebuild it with: {split_hint}"
                    for row, image_id in nonfinite_rows(features_dir / shard["file"])
                ]
    return problems


def as_text(value) -> str:
    """An HDF5 string (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else value


def load_manifest(features_dir) -> dict:
    """Read ``features_dir/manifest.json``. Raises PipelineError if absent, not a manifest, or
    malformed (:func:`manifest_problem`)."""
    path = Path(features_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: no features manifest here; run the features command with "
            f"{param('out', str(features_dir))} (or `make features`) first"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(
            f"{path}: corrupt manifest ({e}); restore the folder, or extract the features again into a "
            f"new {param('out')}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PipelineError(
            f"{path}: format {found!r} is not {FORMAT!r}; extract the features again into a new {param('out')}"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise PipelineError(
            f"{path}: {problem}; the manifest is damaged: restore the folder, or extract the "
            f"features again into a new {param('out')}"
        )
    return manifest


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_split_name(split) -> None:
    """Raise PipelineError unless ``split`` can name a split: letters, digits, '_' and '-' (so it
    names no path: the file names of shards and evaluations are made from it)."""
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise PipelineError(f"{split!r}: not a split name (letters, digits, _ and -); pass another {param('split')}")


IDENTITY = ("dataset", "encoder", "preprocess", "grid", "L", "D", "dtype")
"""The keys of how features were made that a checkpoint and a model folder record of them (a manifest
holds them beside what only a resume compares: precision, shard size, ...)."""


def identity(manifest: dict, features_dir=None) -> dict:
    """The record of how the features of ``manifest`` were made: its format and :data:`IDENTITY`,
    and, where ``features_dir`` is given, the folder they are in (``dir``, resolved)."""
    record = {k: manifest[k] for k in ("format", *IDENTITY)}
    return record if features_dir is None else dict(record, dir=str(Path(features_dir).resolve()))


def check_identity(recorded: dict, manifest: dict, features_dir, source) -> None:
    """Raise PipelineError if the features of ``manifest`` (in ``features_dir``) were not made like
    those ``recorded`` (a checkpoint's ``features``, read from ``source``); the folder may differ."""
    made = identity(manifest)
    differs = [k for k in {**recorded, **made} if k != "dir" and recorded.get(k) != made.get(k)]
    if differs:
        raise PipelineError(
            f"{features_dir}: features differ from those {source} was trained on ({', '.join(differs)}); "
            "extract them with the same encoder and weights"
        )


def identity_problem(identity) -> str | None:
    """What is missing or malformed in the record of how features were made (None if nothing):
    the keys of a manifest that training, scoring and captioning read, of their types, as a
    manifest, a checkpoint's ``features`` and an export's config.json hold them."""
    if not isinstance(identity, dict):
        return "not a JSON object"

    def fits(key, kind, test=lambda v: True):
        return isinstance(identity.get(key), kind) and test(identity[key])

    checks = {
        "dataset": fits("dataset", str),
        "encoder": fits("encoder", dict),
        "preprocess": fits("preprocess", dict),
        "grid": fits("grid", list, lambda g: len(g) == 2 and all(isinstance(n, int) and n > 0 for n in g)),
        "L": fits(
            "L",
            int,
            lambda n: (
                fits("grid", list) and len(identity["grid"]) == 2 and n == identity["grid"][0] * identity["grid"][1]
            ),
        ),
        "D": fits("D", int, lambda n: n > 0),
        "dtype": fits("dtype", str, lambda d: d in ("float16", "float32")),
    }
    bad = [key for key, ok in checks.items() if not ok]
    return f"missing or malformed {', '.join(repr(k) for k in bad)}" if bad else None


def manifest_problem(manifest: dict) -> str | None:
    """What is missing or malformed in a manifest (None if nothing): :func:`identity_problem`,
    its splits, and each shard file named ``SPLIT/shard-NNNNN.h5``, so that no path read from a
    manifest leads outside its folder."""
    problem = identity_problem(manifest)
    if problem or not isinstance(manifest.get("splits"), dict):
        return problem or "missing or malformed 'splits'"
    for split, entry in manifest["splits"].items():
        if not _SPLIT_NAME.fullmatch(split) or not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            return f"malformed split {split!r}"
        for shard in entry["shards"]:
            if not isinstance(shard, dict) or not {"file", "images", "sha256", "failures"} <= shard.keys():
                return f"malformed shard entry in split {split!r}"
            if not re.fullmatch(rf"{split}/shard-\d{{5}}\.h5", str(shard["file"])):
                return f"shard path {shard['file']!r} is not {split}/shard-NNNNN.h5 inside the folder"
    return None


def save_manifest(features_dir: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically, with each split's shards in order and its image total."""
    for entry in manifest["splits"].values():
        entry["shards"].sort(key=lambda e: e["file"])
        entry["images"] = sum(e["images"] for e in entry["shards"])
    write_json(Path(features_dir) / MANIFEST, manifest)


def write_bad_image_report(path: Path, failures: list[dict]) -> None:
    """Write the failed images as TSV (split, image_id, path, reason), atomically: one row each,
    tabs and line breaks in a value written as spaces."""
    lines = ["split\timage_id\tpath\treason"] + [
        "\t".join(" ".join(str(f[k]).replace("\t", " ").splitlines()) for k in ("split", "image_id", "path", "reason"))
        for f in failures
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
