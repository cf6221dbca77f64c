"""The HDF5 shards of annotation vectors: the writer, and the Datasets training reads them with.

SPLIT/shard-NNNNN.h5 holds ``annotations`` (N, L, D) float16|float32 and ``image_ids`` (N,) str
(the folder around them: :mod:`pipeline.features.folder`). Shard k of a split covers the split's
images [k * shard_size, (k + 1) * shard_size) in record order. A shard file is written under a
temporary name and renamed when complete, so a file with the final name is always whole; it also
carries its own failures, so the manifest can be rebuilt from it.
"""

import contextlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ..io.atomic import atomic_path, file_sha256, release_reserve, reserve_disk
from ..io.errors import PipelineError, describe, param
from ..text import Vocabulary
from .folder import CAPTIONS, VOCAB, as_text, check_shards, load_manifest, rebuild_hint

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
                f"extract it (the features command with {param('splits', split)})"
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
                ids = [as_text(s) for s in f["image_ids"][:]]
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
