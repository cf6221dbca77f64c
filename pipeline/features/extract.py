"""Stage one: image corpus -> frozen CNN -> HDF5 shards of annotation vectors.

Images are decoded, resized and cropped in DataLoader worker processes (as uint8) while the main
process normalises whole batches, runs the encoder and writes shards, so decoding overlaps the
forward pass. The work is planned in shards of ``shard_size`` images; a rerun skips the shards
already on disk, so a killed run resumes where it stopped and gives the same values as an
uninterrupted one.
"""

import contextlib
import hashlib
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import FeatureConfig
from ..io import distributed
from ..io.atomic import is_temp_of, remove_stale_temps, write_json
from ..io.errors import PipelineError, param
from ..io.folders import folder_lock
from ..io.memory import configure_allocator
from ..options import CONFIG, write_toml
from ..text import Vocabulary, tokenize
from . import folder, shards
from .datasets import Record
from .encoders import build_encoder, preprocess_for
from .images import ImageFiles, collate, lower_priority

log = logging.getLogger(__name__)

OWN_FILES = (folder.MANIFEST, folder.VOCAB, folder.CAPTIONS, folder.BAD_IMAGES, CONFIG)  # written in --out
PRECISIONS = {"auto": None, "fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_precision(config: "FeatureConfig", device: torch.device) -> str:
    """The encoder's arithmetic for ``config.precision`` on ``device``: 'auto' is 'fp16' on CUDA
    when the annotation vectors are stored as float16 (the tensor cores' format, and no more
    rounding than storage applies), else 'fp32'."""
    if config.precision != "auto":
        return config.precision
    return "fp16" if device.type == "cuda" and config.dtype == "float16" else "fp32"


def decoding_workers(config: FeatureConfig, device: torch.device) -> int:
    """Image-decoding worker processes: ``config.num_workers`` if given, else 0 on a CPU and
    min(8, CPU cores) on a GPU. On a CPU the encoder's threads already use every core: workers
    only take cores from them mid-layer, and their batches arrive through inter-process queues,
    while decoding in the main process costs the same CPU time (docs/benchmarks.md). A GPU computes
    while the workers decode the next batches."""
    if config.num_workers is not None:
        return config.num_workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


@dataclass
class FeatureSummary:
    """What a run did: images written (this run), seconds, and the failed images of the splits asked for."""

    out: Path
    images: int = 0
    seconds: float = 0.0
    per_split: dict = field(default_factory=dict)  # split -> images in its shards (all runs)
    failures: list = field(default_factory=list)  # dicts: split, image_id, path, reason

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        splits = ", ".join(f"{n} {s}" for s, n in self.per_split.items())
        return (
            f"features: {self.images} images extracted in {self.seconds:.1f} s ({rate:.1f} images/s); "
            f"folder holds {splits}; {len(self.failures)} failed -> {self.out}"
        )


def _fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}\t{r.image_path}\n".encode())
    return h.hexdigest()


def write_text(records: list[Record], out: Path, min_count: int) -> Vocabulary:
    """Tokenise every caption, build the vocabulary on the training split, and write
    ``captions.json`` and ``vocab.json`` into ``out``. Raises PipelineError with no training split."""
    tokens = {r.image_id: [tokenize(c) for c in r.captions] for r in records}
    train = [t for r in records if r.split == "train" for t in tokens[r.image_id]]
    if not train:
        raise PipelineError("the dataset has no 'train' split to count the vocabulary on")
    vocab = Vocabulary.build(train, min_count)
    captions = {}
    for r in records:
        captions.setdefault(r.split, {})[r.image_id] = {
            "raw": list(r.captions),
            "tokens": tokens[r.image_id],
            "path": str(r.image_path) if r.image_path else None,
        }
    write_json(out / folder.CAPTIONS, captions)
    vocab.save(out / folder.VOCAB)
    return vocab


def extract_features(
    records: list[Record],
    out,
    config: FeatureConfig,
    dataset: str,
    splits: list[str] | None = None,
    progress: bool = True,
    command: str | None = None,
    options: dict | None = None,
) -> FeatureSummary:
    """Run the encoder over ``records`` (optionally only ``splits``) into shards under ``out``.

    Resumes: shards already complete in ``out`` are kept and not recomputed; a shard that is
    truncated or altered (its SHA-256 differs from the manifest's) is extracted again. ``command``
    (the command line of this run) is recorded in the manifest, to be shown as the way to
    rebuild damaged shards; ``options`` (the command's options by name), where given, in
    ``out/config.toml``, which ``cli.py features --config`` reads back. Bad images are skipped
    and listed in ``out/bad_images.tsv`` and in the returned summary (the caller decides whether
    that is an error).
    Under torchrun (:mod:`pipeline.io.distributed`) rank 0 plans the shards, every rank encodes and
    writes its share of them (balanced by images: :meth:`World.share_by_size`), and rank 0 writes
    the one manifest; the shards are the
    same files as one process writes. The summary is the whole run's on every rank.
    Rank 0 holds ``out``'s lock (:func:`pipeline.io.folders.folder_lock`) for the whole run.
    Warns (``warnings.warn``) where centre crops would cut the borders off images that are already
    the encoder's input size (:meth:`pipeline.features.images.Preprocess.border_warning`).
    Raises PipelineError for unknown split names, if another command holds ``out``, if ``out``
    holds files but no manifest (it is not a features folder), or if it holds features made with
    another dataset, encoder, weights, preprocessing, dtype, precision, shard size, vocabulary
    min count or image list (of any split it holds).
    """
    out = Path(out)
    known = list(dict.fromkeys(r.split for r in records))
    splits = splits or known
    unknown = [s for s in splits if s not in known]
    if unknown:
        raise PipelineError(f"unknown split(s) {', '.join(unknown)} for {dataset}; it has {', '.join(known)}")
    configure_allocator(huge_pages=True)
    with distributed.session(config.device) as world, contextlib.ExitStack() as held:
        encoder = build_encoder(config.encoder, config.weights, world.device)
        preprocess = preprocess_for(config.encoder, config.preprocess, config.image_size)
        setup = _setup(encoder, preprocess, config, dataset)
        plan = None
        if world.main:  # rank 0 holds the folder's lock for the whole job
            try:
                held.enter_context(folder_lock(out, "out"))
                plan = _plan(records, out, config, setup, splits, command)
                if options is not None:
                    write_toml(out / CONFIG, options, "the options of these features (cli.py features --config FILE)")
            except PipelineError as e:
                plan = e
        plan = world.broadcast(plan)  # the other ranks raise rank 0's error too
        if isinstance(plan, PipelineError):
            raise plan
        manifest, todo = plan
        if world.main and todo:
            warning = preprocess.border_warning(r.image_path for _, _, recs in todo for r in recs)
            if warning:
                warnings.warn(warning, stacklevel=2)
        encoder.inference_trunk()  # the forward pass's folded trunk, made before the clock starts
        start = time.perf_counter()
        mine = world.share_by_size(todo, [len(recs) for _, _, recs in todo])
        flat = [r for _, _, recs in mine for r in recs]
        written = (
            _run_encoder(
                encoder, flat, mine, out, config, preprocess, manifest, setup, progress and world.main, world.main
            )
            if flat
            else 0
        )
        world.barrier()
        if world.main and world.size > 1:
            _add_shards_of_other_ranks(out, manifest, todo)
        summary = FeatureSummary(out, images=sum(world.gather(written)), seconds=time.perf_counter() - start)
    return _finish(summary, manifest if world.main else folder.load_manifest(out), splits, world.main)


def _finish(summary: FeatureSummary, manifest: dict, splits: list[str], main: bool) -> FeatureSummary:
    """``summary`` with the folder's images per split and the failures of ``splits`` from the whole
    run's ``manifest``; on the ``main`` process, out/bad_images.tsv written with every failure."""
    everything = []
    for split, entry in manifest["splits"].items():
        summary.per_split[split] = entry["images"]
        everything += [dict(f, split=split) for e in entry["shards"] for f in e["failures"]]
    if main:
        folder.write_bad_image_report(summary.out / folder.BAD_IMAGES, everything)
    summary.failures = [f for f in everything if f["split"] in splits]
    return summary


def _add_shards_of_other_ranks(out: Path, manifest: dict, todo: list) -> None:
    """Rank 0 under torchrun: enter the planned shards (``todo``: (split, k, records)) that other
    ranks wrote into ``manifest`` and save it."""
    for split, k, _ in todo:
        name, entries = shards.shard_name(split, k), manifest["splits"][split]["shards"]
        if not any(e["file"] == name for e in entries):
            entries.append(shards.shard_entry(out, name))
    folder.save_manifest(out, manifest)


def _setup(encoder, preprocess, config: FeatureConfig, dataset: str) -> dict:
    """What the manifest records of how the features are made (a resume must match it)."""
    h, w, D = encoder.grid(preprocess.image_size)
    return {
        "format": folder.FORMAT,
        "dataset": dataset,
        "encoder": encoder.describe(),
        "preprocess": preprocess.to_dict(),
        "grid": [h, w],
        "L": h * w,
        "D": D,
        "dtype": config.dtype,
        "precision": compute_precision(config, encoder.device),
        "shard_size": config.shard_size,
        "weights_name": encoder.weights_name,  # the ImageNet weights' name, for 'imagenet'
        "min_count": config.min_count,  # of vocab.json, rewritten by every run
    }


def _plan(
    records: list[Record], out: Path, config: FeatureConfig, setup: dict, splits: list[str], command: str | None
) -> tuple[dict, list]:
    """Prepare ``out`` for a run: the manifest to continue (damaged shards dropped from it and
    deleted), the text files, and the shards still to write: (manifest, [(split, k, records)])."""
    if not (out / folder.MANIFEST).exists():  # its own temporaries aside (a first manifest being written)
        foreign = sorted(p.name for p in out.iterdir() if not is_temp_of(p, OWN_FILES))
        if foreign:
            raise PipelineError(
                f"{out}: holds files that `cli.py features` did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}) and no manifest; pass a new or empty {param('out')}"
            )
        # first, so that the folder is known as ours from its first file
        folder.save_manifest(out, dict(setup, splits={}))
    remove_stale_temps(out, OWN_FILES)  # a manifest or text file being written when a run was killed
    manifest = _resume_manifest(out, setup)
    manifest["command"] = command or manifest.get("command")
    by_split = {s: [r for r in records if r.split == s] for s in dict.fromkeys([*splits, *manifest["splits"]])}
    fingerprints = {split: _fingerprint(recs) for split, recs in by_split.items()}
    for split, fp in fingerprints.items():  # every split the folder holds: the text files cover them all
        old = manifest["splits"].get(split)
        if old and old["fingerprint"] != fp:
            raise PipelineError(
                f"{out}: its {split} shards were made from a different image list than the corpus has now; "
                f"extract into another {param('out')}"
            )
    todo = []  # (split, shard index, records)
    for split in splits:
        recs, old = by_split[split], manifest["splits"].get(split)
        entries = {}
        for entry in (old or {}).get("shards", []):
            problem = folder.shard_problem(out, entry, manifest)
            if problem is None:
                entries[entry["file"]] = entry
            elif problem != "missing":
                warnings.warn(f"{out / entry['file']}: {problem}; extracting it again", stacklevel=2)
                (out / entry["file"]).unlink()
        (out / split).mkdir(exist_ok=True)
        remove_stale_temps(out / split, (shards.SHARD_GLOB,))
        for k in range(0, -(-len(recs) // config.shard_size)):
            name = shards.shard_name(split, k)
            if name not in entries and (out / name).exists():  # renamed, but the manifest not yet written
                entries[name] = shards.shard_entry(out, name)
            if name not in entries:
                todo.append((split, k, recs[k * config.shard_size : (k + 1) * config.shard_size]))
        manifest["splits"][split] = {
            "images": None,
            "planned": len(recs),
            "fingerprint": fingerprints[split],
            "shards": list(entries.values()),
        }
    manifest["vocab_size"] = len(write_text(records, out, config.min_count))  # only once the folder fits
    manifest["text"] = folder.text_record(out)
    folder.save_manifest(out, manifest)
    return manifest, todo


def _resume_manifest(out: Path, setup: dict) -> dict:
    """The folder's manifest (:func:`_plan` writes one first) brought up to ``setup``.
    Raises PipelineError if it was made with another setup."""
    # keys that came later: fp32 was the only precision; the weights' name and min_count went unrecorded
    later = {"precision": "fp32", "weights_name": setup["weights_name"], "min_count": setup["min_count"]}
    old = dict(later, **folder.load_manifest(out))
    differs = [k for k in setup if old.get(k) != setup[k]]
    if differs:
        raise PipelineError(
            f"{out} holds features made with a different {', '.join(differs)} "
            f"({', '.join(f'{k}={old.get(k)}' for k in differs)}); use another {param('out')} or delete it"
        )
    return dict(old, **setup)


def _run_encoder(encoder, flat, todo, out, config, preprocess, manifest, setup, progress, save_manifest) -> int:
    """Encode the images of the shards in ``todo`` (``flat`` is their records in order); returns
    the number of images written. Each finished shard is added to ``manifest``, and the manifest
    written if ``save_manifest`` (rank 0's job)."""
    batches, offset = [], 0
    for _, _, recs in todo:  # batches never cross a shard, so shard k is the same whatever was done before
        batches += [
            list(range(offset + i, offset + min(i + config.batch_size, len(recs))))
            for i in range(0, len(recs), config.batch_size)
        ]
        offset += len(recs)
    workers = decoding_workers(config, encoder.device)
    loader = DataLoader(
        ImageFiles(flat, preprocess.pixels()),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=encoder.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=lower_priority,
    )
    written, batch_iter = 0, iter(loader)
    half = PRECISIONS[setup["precision"]]
    bar = tqdm(total=len(flat), unit="img", desc="features", disable=not progress, dynamic_ncols=True)
    shown_failures = 0
    with torch.inference_mode():
        for split, k, recs in todo:
            name = shards.shard_name(split, k)
            with shards.write_shard(out / name, setup["L"], setup["D"], config.dtype, len(recs)) as shard:
                done = 0
                while done < len(recs):
                    indices, images, bad = next(batch_iter)
                    if images is not None:
                        with torch.autocast(encoder.device.type, dtype=half, enabled=half is not None):
                            annotations = encoder(preprocess.normalize(images.to(encoder.device, non_blocking=True)))
                        shard.add([flat[i].image_id for i in indices], annotations)
                    for i, reason in bad:
                        shard.failures.append(
                            {"image_id": flat[i].image_id, "path": str(flat[i].image_path), "reason": reason}
                        )
                        if shown_failures < 20:
                            bar.write(f"skipped {flat[i].image_path}: {reason}")
                        shown_failures += 1
                    done += len(indices) + len(bad)
                    written += len(indices)
                    bar.update(len(indices) + len(bad))
            manifest["splits"][split]["shards"].append(shards.shard_entry(out, name))
            if save_manifest:
                folder.save_manifest(out, manifest)
    bar.close()
    if shown_failures > 20:
        log.warning(f"... and {shown_failures - 20} more skipped images (all listed in {out / folder.BAD_IMAGES})")
    return written


def failure_counts(failures: list[dict]) -> Counter:
    """How many failures of each kind (the reason's first words)."""
    return Counter(f["reason"].split(" (")[0] for f in failures)
