"""The HDF5 shard format of annotation vectors: writer, manifest, and reader Datasets.

A features folder holds::

    manifest.json             encoder, weights hash, preprocessing, grid, L, D, dtype, and per split
                              its shards with image counts, SHA-256 checksums and failed images
    vocab.json                the vocabulary (counted on the training split)
    captions.json             per split and image id: raw captions, their tokens and the image's path
    bad_images.tsv            images that could not be used, with the reason
    SPLIT/shard-NNNNN.h5      ``annotations`` (N, L, D) float16|float32, ``image_ids`` (N,) str

Shard k of a split covers the split's images [k * shard_size, (k + 1) * shard_size) in record order.
A shard file is written under a temporary name and renamed when complete, so a file with the final
name is always whole; it also carries its own failures, so the manifest can be rebuilt from it.
"""

import contextlib
import json
import os
import re
import shlex
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.atomic import atomic_path, file_sha256, release_reserve, reserve_disk, write_json
from ..io.errors import PipelineError, describe
from ..text import Vocabulary

FORMAT = "show-attend-tell-shards/1"
MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


# bytes reserved beyond a shard's annotations for its ids, chunk index and metadata: measured
# 29 kB for 4 images and 246 kB for 2000 (Flickr8k ids)
RESERVE_FIXED, RESERVE_PER_IMAGE = 1 << 16, 256


SHARD_GLOB = "shard-*.h5"  # the files of a split's folder that shard_name names


def shard_name(split: str, k: int) -> str:
    """Path of shard ``k`` of ``split``, relative to the features folder."""
    return f"{split}/shard-{k:05d}.h5"


class _ShardRows:
    """Appends rows to an open HDF5 shard."""

    def __init__(self, f: h5py.File, L: int, D: int, dtype: str):
        self.f = f
        self.annotations = f.create_dataset(
            "annotations", shape=(0, L, D), maxshape=(None, L, D), dtype=dtype, chunks=(1, L, D)
        )
        self.image_ids = f.create_dataset("image_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype())

    def add(self, image_ids: list[str], annotations: torch.Tensor) -> None:
        """Append ``annotations``: (B, L, D) float (any float dtype, any device; converted to the
        storage dtype before leaving the device), with their ``image_ids``."""
        n, b = len(self.image_ids), len(image_ids)
        self.annotations.resize(n + b, axis=0)
        self.image_ids.resize(n + b, axis=0)
        self.annotations[n:] = annotations.detach().to("cpu", getattr(torch, self.annotations.dtype.name)).numpy()
        self.image_ids[n:] = image_ids


@contextlib.contextmanager
def write_shard(path: Path, L: int, D: int, dtype: str = "float16", images: int = 0):
    """Context manager yielding a writer with ``add(image_ids, annotations)`` and a ``failures``
    list (dicts with image_id, path, reason) to fill; the shard appears at ``path`` only when the
    block completes (temporary file, then rename).

    The disk space of ``images`` rows is allocated before any is written, so a full disk raises
    here, cleanly (PipelineError, see :func:`pipeline.io.atomic.atomic_path`): HDF5 2.0 with h5py
    3.16 crashes the interpreter (segfault) when objects of a file whose write failed are freed.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            reserve_disk(tmp, images * (L * D * np.dtype(dtype).itemsize + RESERVE_PER_IMAGE) + RESERVE_FIXED)
            rows = _ShardRows(f, L, D, dtype)
            rows.failures = []
            yield rows
            f.attrs["failures"] = json.dumps(rows.failures)
        release_reserve(tmp)


def shard_entry(features_dir: Path, name: str) -> dict:
    """The manifest entry of a finished shard file, read from the file itself."""
    path = features_dir / name
    with h5py.File(path, "r") as f:
        images, failures = len(f["image_ids"]), json.loads(f.attrs["failures"])
    return {"file": name, "images": images, "sha256": file_sha256(path), "failures": failures}


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
            bad += [(start + r, _text(ids[start + r])) for r in np.flatnonzero(~finite)]
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


def load_manifest(features_dir) -> dict:
    """Read ``features_dir/manifest.json``. Raises PipelineError if absent, not a manifest, or
    malformed (:func:`manifest_problem`)."""
    path = Path(features_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: no features manifest here; run `python cli.py features --out "
            f"{features_dir}` (or `make features`) first"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(
            f"{path}: corrupt manifest ({e}); restore the folder, or extract the features again into a new --out"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PipelineError(f"{path}: format {found!r} is not {FORMAT!r}; extract the features again into a new --out")
    problem = manifest_problem(manifest)
    if problem:
        raise PipelineError(
            f"{path}: {problem}; the manifest is damaged: restore the folder, or extract the "
            "features again into a new --out"
        )
    return manifest


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


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


class AnnotationShards(Dataset):
    """The annotation vectors of one split, image by image, read lazily from the HDF5 shards.

    Each DataLoader worker opens the shard files on its first read (an h5py handle must not cross
    a fork), so ``num_workers > 0`` works. Item i -> annotations (L, D) float32 of image i.

    Attributes: ``image_ids`` (list of str), ``captions`` (per image, its captions as token-id
    lists ``<start> ... <end>``), ``references`` (per image, its raw captions), ``paths`` (per
    image, its file as the features command read it, or None), ``vocab``,
    ``manifest``, ``L``, ``D``, ``grid`` (h, w).
    Raises PipelineError if the folder has no such split, a shard is missing, truncated or
    altered (:func:`check_shards`: every shard's SHA-256 is checked on opening), captions.json or
    vocab.json is missing or belongs to another folder, or (as an item is read) an image's
    annotation values are not finite.
    """

    def __init__(self, features_dir, split: str):
        self.dir = Path(features_dir)
        self.manifest = load_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise PipelineError(
                f"{self.dir}: no features for split {split!r} (have: {', '.join(splits) or 'none'}); "
                f"extract it with `python cli.py features --splits {split}`"
            )
        self.split, self.L, self.D, self.grid = (
            split,
            self.manifest["L"],
            self.manifest["D"],
            tuple(self.manifest["grid"]),
        )
        problems = check_shards(self.dir, self.manifest, [split])
        if problems:
            raise PipelineError("; ".join(problems))
        self.vocab = Vocabulary.load(self.dir / VOCAB)
        self.rows, self.image_ids = [], []  # rows[i] = (shard file, row within it)
        for entry in splits[split]["shards"]:
            with h5py.File(self.dir / entry["file"], "r") as f:
                ids = [_text(s) for s in f["image_ids"][:]]
            self.rows += [(entry["file"], r) for r in range(len(ids))]
            self.image_ids += ids
        text = _split_captions(self.dir, split, self.image_ids, rebuild_hint(self.dir, self.manifest))
        self.references = [text[i]["raw"] for i in self.image_ids]
        self.paths = [text[i].get("path") for i in self.image_ids]  # absent in folders made before it was kept
        self.captions = [[self.vocab.encode(t) for t in text[i]["tokens"]] for i in self.image_ids]
        self._files, self._pid = {}, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state

    def _file(self, name: str) -> h5py.File:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if name not in self._files:
            self._files[name] = h5py.File(self.dir / name, "r")
        return self._files[name]

    def __getitem__(self, i: int) -> torch.Tensor:
        """annotations (L, D) float32 of image i. Raises PipelineError if a value is nan or inf."""
        name, row = self.rows[i]
        values = self._file(name)["annotations"][row].astype(np.float32)
        if not np.isfinite(values).all():
            raise PipelineError(
                f"{self.dir / name}: image {self.image_ids[i]} (row {row}) has non-finite annotation "
                f"values (nan or inf); run `python cli.py verify {self.dir}` for what to do"
            )
        return torch.from_numpy(values)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _split_captions(features_dir: Path, split: str, image_ids: list[str], hint: str) -> dict:
    """captions.json's entries of ``split``: image id -> {'raw', 'tokens'}. Raises PipelineError if
    it is unreadable or lacks an image of the shards (a file from another folder)."""
    path = features_dir / CAPTIONS
    try:
        text = json.loads(path.read_text(encoding="utf-8")).get(split, {})
        missing = next(
            (i for i in image_ids if not isinstance(text.get(i), dict) or not {"raw", "tokens"} <= text[i].keys()), None
        )
    except (OSError, ValueError, AttributeError) as e:
        raise PipelineError(f"{path}: not readable ({describe(e)}); rebuild it with: {hint}") from None
    if missing is not None:
        raise PipelineError(
            f"{path}: no captions of image {missing} of the {split} shards (the file belongs to "
            f"another folder, or was edited); rebuild it with: {hint}"
        )
    return text


class CaptionPairs(Dataset):
    """(image, caption) pairs of a split for training: item j -> (annotations (L, D) float32,
    caption (T,) int64 token ids ``<start> ... <end>``, image index int)."""

    def __init__(self, shards: AnnotationShards):
        self.shards = shards
        self.pairs = [(i, c) for i, caps in enumerate(shards.captions) for c in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> list[int]:
        """Token count of each pair's caption (with ``<start>`` and ``<end>``)."""
        return [len(self.shards.captions[i][c]) for i, c in self.pairs]

    def __getitem__(self, j: int):
        i, c = self.pairs[j]
        return self.shards[i], torch.tensor(self.shards.captions[i][c]), i


class Images(Dataset):
    """The images of a split for self-critical training: item i -> (annotations (L, D) float32,
    image index i)."""

    def __init__(self, shards: AnnotationShards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        return self.shards[i], i


def write_bad_image_report(path: Path, failures: list[dict]) -> None:
    """Write the failed images as TSV (split, image_id, path, reason), atomically."""
    lines = ["split\timage_id\tpath\treason"] + [
        "\t".join(str(f[k]).replace("\t", " ") for k in ("split", "image_id", "path", "reason")) for f in failures
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
