"""The HDF5 shard format of annotation vectors: writer, manifest, and reader Datasets.

A features folder holds::

    manifest.json             encoder, weights hash, preprocessing, grid, L, D, dtype, and per split
                              its shards with image counts, SHA-256 checksums and failed images
    vocab.json                the vocabulary (counted on the training split)
    captions.json             per split and image id: raw captions and their tokens
    bad_images.tsv            images that could not be used, with the reason
    SPLIT/shard-NNNNN.h5      ``annotations`` (N, L, D) float16|float32, ``image_ids`` (N,) str

Shard k of a split covers the split's images [k * shard_size, (k + 1) * shard_size) in record order.
A shard file is written under a temporary name and renamed when complete, so a file with the final
name is always whole; it also carries its own failures, so the manifest can be rebuilt from it.
"""
import contextlib
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .atomic import atomic_path, release_reserve, reserve_disk, write_json
from .errors import PipelineError
from .text import Vocabulary

FORMAT = "show-attend-tell-shards/1"
MANIFEST, VOCAB, CAPTIONS, BAD_IMAGES = "manifest.json", "vocab.json", "captions.json", "bad_images.tsv"


# bytes reserved beyond a shard's annotations for its ids, chunk index and metadata: measured
# 29 kB for 4 images and 246 kB for 2000 (Flickr8k ids)
RESERVE_FIXED, RESERVE_PER_IMAGE = 1 << 16, 256


def shard_name(split: str, k: int) -> str:
    """Path of shard ``k`` of ``split``, relative to the features folder."""
    return f"{split}/shard-{k:05d}.h5"


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _ShardRows:
    """Appends rows to an open HDF5 shard."""

    def __init__(self, f: h5py.File, L: int, D: int, dtype: str):
        self.f = f
        self.annotations = f.create_dataset("annotations", shape=(0, L, D), maxshape=(None, L, D),
                                            dtype=dtype, chunks=(1, L, D))
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
    here, cleanly (PipelineError, see :func:`pipeline.atomic.atomic_path`): HDF5 2.0 with h5py
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


def rebuild_hint(features_dir: Path, manifest: dict) -> str:
    """The command that rebuilds a features folder's missing or damaged shards (and only those)."""
    return manifest.get("command") or f"python cli.py features --out {features_dir} (with the options that made it)"


def check_shards(features_dir, manifest: dict, splits=None) -> list[str]:
    """One line per unusable shard of ``splits`` (default: all) of a features folder with this
    ``manifest`` (:func:`load_manifest`), naming the file, what is wrong and the command that
    rebuilds it; empty when every shard is whole."""
    features_dir = Path(features_dir)
    problems = []
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"] if splits is None or split in splits else []:
            reason = shard_problem(features_dir, shard, manifest)
            if reason:
                problems.append(f"{features_dir / shard['file']}: {reason}; rebuild it with: "
                                f"{rebuild_hint(features_dir, manifest)}")
    return problems


def load_manifest(features_dir) -> dict:
    """Read ``features_dir/manifest.json``. Raises PipelineError if absent or not a manifest."""
    path = Path(features_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no features manifest here; run `python cli.py features --out "
                            f"{features_dir}` (or `make features`) first") from None
    except ValueError as e:
        raise PipelineError(f"{path}: corrupt manifest ({e}); rerun `python cli.py features` into this folder") from None
    if manifest.get("format") != FORMAT:
        raise PipelineError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-extract the features")
    return manifest


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
    lists ``<start> ... <end>``), ``references`` (per image, its raw captions), ``vocab``,
    ``manifest``, ``L``, ``D``, ``grid`` (h, w).
    Raises PipelineError if the folder has no such split or a shard is missing, truncated or
    altered (:func:`check_shards`: every shard's SHA-256 is checked on opening).
    """

    def __init__(self, features_dir, split: str):
        self.dir = Path(features_dir)
        self.manifest = load_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise PipelineError(f"{self.dir}: no features for split {split!r} (have: {', '.join(splits) or 'none'}); "
                                f"extract it with `python cli.py features --splits {split}`")
        self.split, self.L, self.D, self.grid = split, self.manifest["L"], self.manifest["D"], tuple(self.manifest["grid"])
        self.vocab = Vocabulary.load(self.dir / VOCAB)
        problems = check_shards(self.dir, self.manifest, [split])
        if problems:
            raise PipelineError("; ".join(problems))
        self.rows, self.image_ids = [], []  # rows[i] = (shard file, row within it)
        for entry in splits[split]["shards"]:
            with h5py.File(self.dir / entry["file"], "r") as f:
                ids = [s.decode() if isinstance(s, bytes) else s for s in f["image_ids"][:]]
            self.rows += [(entry["file"], r) for r in range(len(ids))]
            self.image_ids += ids
        text = json.loads((self.dir / CAPTIONS).read_text(encoding="utf-8"))[split]
        self.references = [text[i]["raw"] for i in self.image_ids]
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
        name, row = self.rows[i]
        return torch.from_numpy(self._file(name)["annotations"][row].astype(np.float32))


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


def write_bad_image_report(path: Path, failures: list[dict]) -> None:
    """Write the failed images as TSV (split, image_id, path, reason), atomically."""
    lines = ["split\timage_id\tpath\treason"] + [
        "\t".join(str(f[k]).replace("\t", " ") for k in ("split", "image_id", "path", "reason")) for f in failures]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
